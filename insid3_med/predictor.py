"""``OneShotSegmenter``: images in, masks out, in the spirit of segment-anything's predictor.

    segmenter = OneShotSegmenter(load_backbone("path/to/weights"), image_size=448)
    segmenter.set_reference(reference_image, reference_mask)   # call add_reference for more shots
    mask = segmenter.segment(target_image)                     # (H, W) label map

Images: (H, W) grey or (H, W, 3) RGB numpy arrays, uint8 (0..255) or float in [0, 1]. Masks: (H, W) integer label
maps; each label value > 0 is one structure, and the prediction carries the same values. Encoded images
(:meth:`OneShotSegmenter.encode`) can be passed anywhere an image can, so a reference or a target is encoded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F

from insid3_med.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone
from insid3_med.clustering import average_linkage_clusters
from insid3_med.engine import (
    EmptyReferenceError,
    EngineParams,
    ReferenceShot,
    debias,
    flatten_features,
    labels_from_masks,
    mask_to_patch_grid,
    positional_basis,
    segment_patches,
    upsample_masks,
)

ImageLike = np.ndarray | torch.Tensor


def _pair(sizes: Sequence[int]) -> tuple[int, int]:
    """The two sizes of an (H, W) or (h, w) shape (for example ``tensor.shape[-2:]``) as a typed pair."""
    first, second = sizes
    return (first, second)


@dataclass
class EncodedImage:
    """An image after the backbone: plain and debiased (N, C) features on an (h, w) grid.

    model_size: the (s, s) side the image was resized to; original_size: its (H, W).
    """

    plain: torch.Tensor
    debiased: torch.Tensor
    grid: tuple[int, int]
    model_size: tuple[int, int]
    original_size: tuple[int, int]
    content_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    clusters: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.content_box == (0, 0, 0, 0):
            self.content_box = (0, 0, *self.model_size)


def image_to_tensor(image: ImageLike) -> torch.Tensor:
    """(H, W) or (H, W, 3) uint8 / float [0, 1] array, or a (3, H, W) tensor -> (3, H, W) float32 in [0, 1]."""
    if isinstance(image, torch.Tensor):
        tensor = image.float()
        if tensor.ndim == 3 and tensor.shape[0] == 3:
            return tensor
        image = tensor.cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {array.shape}")
    scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


def normalise_for_backbone(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class PositionalBasisCache:
    """U (C, r) per (backbone, input size, probe, rank), computed once (ALGORITHM.md step 2)."""

    def __init__(self) -> None:
        self._bases: dict[tuple, torch.Tensor] = {}

    def get(self, backbone: Backbone, size: tuple[int, int], probe: str, rank: int) -> torch.Tensor:
        key = (backbone.identity, tuple(size), probe, rank)
        if key not in self._bases:
            if probe == "black":
                image = torch.zeros(1, 3, *size)
            else:
                generator = torch.Generator().manual_seed(0)
                image = torch.rand(1, 3, *size, generator=generator)
            features = flatten_features(backbone.encode(normalise_for_backbone(image))[0])
            self._bases[key] = positional_basis(features, rank)
        return self._bases[key]


BASIS_CACHE = PositionalBasisCache()


class OneShotSegmenter:
    """Segments, in target images, the structures a reference image's label map marks.

    image_size: the square side s every image is resized to (a multiple of the backbone's patch size; other values
    are rounded to the nearest multiple). params: the method's parameters (:class:`EngineParams`).
    fit: "stretch" resizes every image to s x s regardless of its aspect (the published method); "letterbox" scales
    its longer side to s, keeps the aspect, and pads the rest with black.
    """

    def __init__(self, backbone: Backbone, image_size: int = 448, params: EngineParams | None = None,
                 fit: str = "stretch") -> None:
        if fit not in ("stretch", "letterbox"):
            raise ValueError(f"fit must be 'stretch' or 'letterbox', not {fit!r}")
        if image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, not {image_size}")
        self.fit = fit
        patch = backbone.patch_size
        side = max(patch, int(round(image_size / patch)) * patch)
        self.backbone = backbone
        self.image_size = side
        self.params = params or EngineParams()
        rank = self.params.basis_rank if self.params.basis_rank is not None else backbone.spec.default_basis_rank
        if rank >= backbone.embed_dim:
            raise ValueError(f"basis_rank {rank} must be below the backbone width {backbone.embed_dim}")
        self.basis_rank = rank
        self._shots: list[tuple[EncodedImage, np.ndarray]] = []
        self._references: dict[int, list[ReferenceShot]] = {}

    # -- encoding ---------------------------------------------------------------------------------------------

    @property
    def model_size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    def basis(self) -> torch.Tensor:
        """The positional basis U (C, r) for this backbone and input size (cached)."""
        return BASIS_CACHE.get(self.backbone, self.model_size, self.params.probe, self.basis_rank).to(
            self.backbone.device)

    def content_box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """Where an (H, W) image lands in the (s, s) model input: (top, left, height, width) in model pixels."""
        if self.fit == "stretch":
            return (0, 0, *self.model_size)
        scale = self.image_size / max(size)
        height = max(1, min(self.image_size, round(size[0] * scale)))
        width = max(1, min(self.image_size, round(size[1] * scale)))
        return ((self.image_size - height) // 2, (self.image_size - width) // 2, height, width)

    def place(self, image: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(B, ch, H, W) float -> (B, ch, s, s): resized into the content box, zero elsewhere."""
        top, left, height, width = self.content_box(_pair(image.shape[-2:]))
        kwargs = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
        resized = F.interpolate(image, size=(height, width), mode=mode, **kwargs)
        if (height, width) == self.model_size:
            return resized
        canvas = torch.zeros(*image.shape[:2], *self.model_size, dtype=image.dtype, device=image.device)
        canvas[..., top : top + height, left : left + width] = resized
        return canvas

    def prepare(self, image: ImageLike) -> torch.Tensor:
        """An image -> (3, s, s) ImageNet-normalised tensor at the model size."""
        return normalise_for_backbone(self.place(image_to_tensor(image)[None]))[0]

    @overload
    def encode(self, images: ImageLike, batch_size: int = 8) -> EncodedImage: ...

    @overload
    def encode(self, images: list[ImageLike], batch_size: int = 8) -> list[EncodedImage]: ...

    def encode(self, images: ImageLike | list[ImageLike], batch_size: int = 8) -> EncodedImage | list[EncodedImage]:
        """Encode one image or a list (batched through the backbone). Returns EncodedImage(s)."""
        single = not isinstance(images, list)
        items = images if isinstance(images, list) else [images]
        tensors = [image_to_tensor(item) for item in items]
        sizes = [_pair(tensor.shape[1:]) for tensor in tensors]
        batch = torch.stack([self.prepare(tensor) for tensor in tensors])
        feature_maps = self.backbone.encode(batch, batch_size=batch_size)
        basis = self.basis()
        encoded = []
        for feature_map, size in zip(feature_maps, sizes, strict=True):
            plain = flatten_features(feature_map)
            encoded.append(EncodedImage(plain, debias(plain, basis), _pair(feature_map.shape[1:]), self.model_size,
                                        size, self.content_box(size)))
        return encoded[0] if single else encoded

    def _encoded(self, image: ImageLike | EncodedImage) -> EncodedImage:
        return image if isinstance(image, EncodedImage) else self.encode(image)

    # -- references -------------------------------------------------------------------------------------------

    def set_reference(self, image: ImageLike | EncodedImage, mask: np.ndarray | torch.Tensor) -> None:
        """Replace the references with one shot: an image and its (H, W) label map (labels > 0 are structures)."""
        self._shots.clear()
        self._references.clear()
        self.add_reference(image, mask)

    def add_reference(self, image: ImageLike | EncodedImage, mask: np.ndarray | torch.Tensor) -> None:
        """Add one more shot. Raises EmptyReferenceError for an all-background mask, ValueError on a size mismatch."""
        encoded = self._encoded(image)
        labels = torch.as_tensor(np.asarray(mask)).long()
        if labels.ndim != 2:
            raise ValueError(f"reference mask must be (H, W), got shape {tuple(labels.shape)}")
        if tuple(labels.shape) != tuple(encoded.original_size):
            raise ValueError(f"reference mask size {tuple(labels.shape)} differs from its image's "
                             f"{tuple(encoded.original_size)}")
        values = [int(v) for v in torch.unique(labels) if v > 0]
        if not values:
            raise EmptyReferenceError("the reference mask is empty: label the structure in the reference first")
        for value in values:
            structure = labels == value
            if self.fit == "letterbox":
                structure = self.place(structure.float()[None, None], mode="nearest")[0, 0] > 0.5
            patch_mask = mask_to_patch_grid(structure, encoded.grid).flatten().to(encoded.debiased.device)
            self._references.setdefault(value, []).append(ReferenceShot(encoded.debiased, patch_mask))
        self._shots.append((encoded, labels.numpy()))

    @property
    def label_values(self) -> list[int]:
        """The structures' label values, ascending."""
        return sorted(self._references)

    # -- prediction -------------------------------------------------------------------------------------------

    def segment_patch_masks(self, target: ImageLike | EncodedImage) -> tuple[torch.Tensor, EncodedImage]:
        """(L, h * w) bool exclusive patch masks, one per label value, and the encoded target."""
        if not self._references:
            raise RuntimeError("set_reference(image, mask) must be called before segment()")
        encoded = self._encoded(target)
        if encoded.clusters is None:
            encoded.clusters = average_linkage_clusters(encoded.plain, 1.0 - self.params.tau)
        references = [self._references[value] for value in self.label_values]
        patches = segment_patches(encoded.plain, encoded.debiased, references, self.params, encoded.clusters)
        return patches, encoded

    def segment(self, target: ImageLike | EncodedImage) -> np.ndarray:
        """The target's (H, W) int64 label map at its original size."""
        patches, encoded = self.segment_patch_masks(target)
        return self.patch_masks_to_labels(patches, encoded)

    def patch_masks_to_labels(self, patches: torch.Tensor, encoded: EncodedImage) -> np.ndarray:
        """(L, h * w) bool patch masks -> the (H, W) int64 label map at the image's original size (step 9)."""
        top, left, height, width = encoded.content_box
        if (height, width) == tuple(encoded.model_size):
            masks = upsample_masks(patches, encoded.grid, encoded.model_size, encoded.original_size)
        else:
            model = upsample_masks(patches, encoded.grid, encoded.model_size, encoded.model_size)
            cropped = model[:, top : top + height, left : left + width].float()[:, None]
            masks = F.interpolate(cropped, size=encoded.original_size, mode="bilinear", align_corners=False)[:, 0] > 0.5
        return labels_from_masks(masks, self.label_values).cpu().numpy()


__all__ = ["EmptyReferenceError", "EncodedImage", "OneShotSegmenter", "image_to_tensor"]
