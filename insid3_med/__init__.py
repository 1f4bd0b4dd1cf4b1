"""insid3-med: one-shot segmentation of medical images and volumes with frozen ViT features (INSID3)."""

__version__ = "0.1.0"
