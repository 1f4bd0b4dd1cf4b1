"""The "One-shot propagate" Segment Editor effect (registered by the OneShotPropagate module at startup)."""

from .SegmentEditorEffect import SegmentEditorEffect

__all__ = ["SegmentEditorEffect"]
