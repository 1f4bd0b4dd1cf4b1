"""Baselines that the harness scores on the same episodes as the one-shot method.

- Copy: the labelled slice copied to every slice (:func:`copy_labelled_slice`); a label map copied by voxel position
  after aligning the centres of the two images' grids (:func:`copy_by_position`); a 2D mask resized onto the
  target image (:func:`copy_mask_2d`).
- Interpolation: shape-based interpolation of signed distances between labelled slices, what a "fill between
  slices" tool does (:func:`insid3_med.interpolation.interpolate_between_slices`; 3D Slicer's own effect uses
  morphological contour interpolation); for several labelled slices of a structure, nothing beyond the first and
  last.
- Registration (SimpleITK): slice-to-slice deformable registration chained outwards from the labelled slice
  (:class:`SliceChainRegistration`); affine then deformable registration of one image to another, label warped
  with nearest-neighbour interpolation (:func:`register_affine_deformable`, :func:`warp_labels`), in 2D or 3D.

Images go to SimpleITK with their physical spacing; intensities are first clipped to their 1st..99th percentiles
and scaled to [0, 1]. The deformable step is SimpleITK's fast symmetric-forces demons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from insid3_med.imaging.geometry import Volume
from insid3_med.registration import (
    check_sampling_seed,
    matched_demons_field,
    mattes_affine,
    unit_intensity,
    volume_to_sitk,
)


@contextmanager
def sitk_threads(count: int) -> Iterator[None]:
    """Run SimpleITK filters with ``count`` threads inside the block (restores the previous global default)."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(count)))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def image_2d(array: np.ndarray, spacing_rows_cols: Sequence[float] = (1.0, 1.0)) -> sitk.Image:
    """A 2D SimpleITK image of a (rows, cols) array with (row, column) spacing in mm."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((float(spacing_rows_cols[1]), float(spacing_rows_cols[0])))
    return image


# ------------------------------------------------------------------------------------------------------------
# Copy baselines
# ------------------------------------------------------------------------------------------------------------


def labelled_slice_index(labels: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the one labelled slice of ``labels``; raises if there is not exactly one."""
    other = tuple(a for a in range(labels.ndim) if a != axis)
    labelled = np.flatnonzero(np.any(labels != 0, axis=other))
    if labelled.size != 1:
        raise ValueError(f"expected exactly one labelled slice along axis {axis}, found {labelled.size}")
    return int(labelled[0])


def copy_labelled_slice(labels: np.ndarray, axis: int) -> np.ndarray:
    """Copy the one labelled slice of ``labels`` (K, J, I) to every slice along ``axis``; same shape and dtype."""
    index = labelled_slice_index(labels, axis)
    template = np.take(labels, [index], axis=axis)
    return np.repeat(template, labels.shape[axis], axis=axis)


def copy_by_position(reference_labels: np.ndarray, reference: Volume, target: Volume) -> np.ndarray:
    """Reference label map moved onto the target grid by the shift that aligns the two grids' centres.

    (K, J, I) labels of ``reference`` -> (K', J', I') labels of ``target`` (nearest neighbour; outside: 0).
    """
    moving = volume_to_sitk(reference, reference_labels.astype(np.int16))
    fixed = volume_to_sitk(target, np.zeros(target.shape, dtype=np.int16))
    shift = np.asarray(_grid_centre(moving)) - np.asarray(_grid_centre(fixed))
    transform = sitk.TranslationTransform(3, tuple(float(s) for s in shift))
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    return sitk.GetArrayFromImage(warped).astype(reference_labels.dtype)


def _grid_centre(image: sitk.Image) -> tuple[float, ...]:
    centre_index = [(n - 1) / 2.0 for n in image.GetSize()]
    return image.TransformContinuousIndexToPhysicalPoint(centre_index)


def copy_mask_2d(reference_mask: np.ndarray, target_shape: Sequence[int]) -> np.ndarray:
    """(H, W) reference mask resized (nearest neighbour) to the target's (H', W')."""
    if tuple(reference_mask.shape) == tuple(target_shape):
        return reference_mask.copy()
    rows = (np.arange(target_shape[0]) + 0.5) * reference_mask.shape[0] / target_shape[0]
    cols = (np.arange(target_shape[1]) + 0.5) * reference_mask.shape[1] / target_shape[1]
    return reference_mask[np.floor(rows).astype(int)[:, None], np.floor(cols).astype(int)[None, :]]


# ------------------------------------------------------------------------------------------------------------
# Registration baselines
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistrationParams:
    """Settings of the SimpleITK registrations (affine: Mattes MI, regular-step gradient descent; demons)."""

    affine_iterations: int = 200
    histogram_bins: int = 32
    sampling_fraction: float = 0.25
    max_samples: int = 50_000  # per metric evaluation of the affine registration
    demons_iterations: int = 50
    demons_sigma_mm: float = 1.5
    seed: int = 1  # the affine metric's sampling seed, >= 1 (0 would seed from the wall clock)
    max_voxels: int = 2_000_000  # larger 3D images are registered on a grid shrunk by a whole factor
    max_pixels: int = 65_536  # the same for 2D images

    def __post_init__(self) -> None:
        check_sampling_seed(self.seed)

    def shrink_factor(self, image: sitk.Image) -> int:
        """The whole factor that brings ``image`` to at most ``max_voxels`` (3D) / ``max_pixels`` (2D) voxels."""
        limit = self.max_pixels if image.GetDimension() == 2 else self.max_voxels
        count = float(np.prod(image.GetSize()))
        return max(1, int(np.ceil((count / limit) ** (1.0 / image.GetDimension()))))

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def demons_field(fixed: sitk.Image, moving: sitk.Image, params: RegistrationParams) -> sitk.Image:
    """Displacement field (fixed grid) of fast symmetric-forces demons moving -> fixed, after histogram matching."""
    return matched_demons_field(fixed, moving, params.demons_iterations, params.demons_sigma_mm)


def affine_registration(fixed: sitk.Image, moving: sitk.Image, params: RegistrationParams) -> sitk.Transform:
    """Affine transform (fixed -> moving physical points) by Mattes MI, multi-resolution, centred initialisation."""
    base = params.shrink_factor(fixed)
    levels = [f * base for f in (4, 2, 1) if min(fixed.GetSize()) // (f * base) >= 16] or [base]
    voxels = float(np.prod(fixed.GetSize()))
    fractions = [min(params.sampling_fraction, params.max_samples * f ** fixed.GetDimension() / voxels)
                 for f in levels]
    return mattes_affine(fixed, moving, shrink_factors=levels, sampling=fractions, iterations=params.affine_iterations,
                         bins=params.histogram_bins, seed=params.seed, smoothing_in_mm=False)


def register_affine_deformable(fixed: sitk.Image, moving: sitk.Image,
                               params: RegistrationParams | None = None) -> sitk.Transform:
    """Affine then demons registration; the transform maps fixed points to moving points (2D or 3D).

    Both images should hold intensities normalised to [0, 1] (:func:`unit_intensity`).
    """
    params = params or RegistrationParams()
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    affine = affine_registration(fixed, moving, params)
    shrink = params.shrink_factor(fixed)
    grid = sitk.Shrink(fixed, [shrink] * fixed.GetDimension()) if shrink > 1 else fixed
    moved = sitk.Resample(moving, grid, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    field = demons_field(grid, moved, params)  # a physical field: it serves the full-resolution grid too
    # CompositeTransform applies its last transform first: p -> p + d(p) (fixed grid), then the affine.
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)])


def warp_labels(labels: sitk.Image, fixed: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """Labels resampled onto ``fixed``'s grid through ``transform`` (nearest neighbour): an int16 array."""
    warped = sitk.Resample(sitk.Cast(labels, sitk.sitkInt16), fixed, transform, sitk.sitkNearestNeighbor, 0,
                           sitk.sitkInt16)
    return sitk.GetArrayFromImage(warped)


def register_volume_labels(reference: Volume, reference_labels: np.ndarray, target: Volume,
                           params: RegistrationParams | None = None) -> np.ndarray:
    """Reference (K, J, I) labels carried onto ``target``'s grid by affine + demons registration of the images."""
    fixed = volume_to_sitk(target, unit_intensity(target.array))
    moving = volume_to_sitk(reference, unit_intensity(reference.array))
    transform = register_affine_deformable(fixed, moving, params)
    labels = volume_to_sitk(reference, reference_labels.astype(np.int16))
    return warp_labels(labels, fixed, transform).astype(reference_labels.dtype)


def register_mask_2d(reference_image: np.ndarray, reference_mask: np.ndarray, target_image: np.ndarray,
                     params: RegistrationParams | None = None) -> np.ndarray:
    """(H, W) reference mask carried onto the (H', W') target by 2D affine + demons registration of grey images."""
    fixed = image_2d(unit_intensity(_grey(target_image)))
    moving = image_2d(unit_intensity(_grey(reference_image)))
    transform = register_affine_deformable(fixed, moving, params)
    return warp_labels(image_2d(reference_mask.astype(np.int16)), fixed, transform).astype(reference_mask.dtype)


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    return image.mean(axis=-1) if image.ndim == 3 else image


class SliceChainRegistration:
    """Propagate one labelled slice through a volume by chained slice-to-slice demons registration.

    From the labelled slice outwards in both directions, slice ``n`` (moving) is registered to its neighbour
    ``n + 1`` (fixed) and the label propagated so far is warped onward with nearest-neighbour interpolation. A
    chain stops once the warped label is empty. Pairwise registrations are cached for the last volume seen
    (``cache_key``), so several episodes on one volume register each slice pair once.
    """

    def __init__(self, params: RegistrationParams | None = None) -> None:
        self.params = params or RegistrationParams()
        self._cache_key: object = None
        self._transforms: dict[tuple[int, int], sitk.Transform] = {}
        self._slices: list[sitk.Image] = []

    def propagate(self, volume: Volume, labels: np.ndarray, axis: int, cache_key: object = None,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(K, J, I) labels with one labelled slice along ``axis`` -> (K, J, I) propagated labels (same dtype)."""
        if labels.shape != volume.shape:
            raise ValueError(f"labels shape {labels.shape} differs from the volume's {volume.shape}")
        start = labelled_slice_index(labels, axis)
        self._prepare(volume, axis, cache_key)
        moved = np.moveaxis(labels, axis, 0)
        output = np.zeros_like(moved)
        output[start] = moved[start]
        for step in (1, -1):
            current = moved[start].astype(np.int16)
            index = start + step
            while 0 <= index < moved.shape[0] and np.any(current):
                transform = self._transform(index - step, index)
                current = warp_labels(self._label_image(current, index - step), self._slices[index], transform)
                output[index] = current
                if progress is not None:
                    progress(index)
                index += step
        return np.moveaxis(output, 0, axis)

    def _prepare(self, volume: Volume, axis: int, cache_key: object) -> None:
        key = (cache_key, axis) if cache_key is not None else None
        if key is not None and key == self._cache_key:
            return
        in_plane = volume.in_plane_spacing(axis)
        normalised = np.moveaxis(unit_intensity(volume.array), axis, 0)
        self._slices = [image_2d(s, in_plane) for s in normalised]
        self._transforms = {}
        self._cache_key = key

    def _transform(self, moving: int, fixed: int) -> sitk.Transform:
        if (moving, fixed) not in self._transforms:
            field = demons_field(self._slices[fixed], self._slices[moving], self.params)
            self._transforms[(moving, fixed)] = sitk.DisplacementFieldTransform(field)
        return self._transforms[(moving, fixed)]

    def _label_image(self, labels_2d: np.ndarray, index: int) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(labels_2d.astype(np.int16)))
        image.CopyInformation(self._slices[index])
        return image
