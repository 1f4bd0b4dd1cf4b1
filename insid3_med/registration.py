"""Registration that tells the propagation where a structure moved (SimpleITK).

- :func:`demons_label_warp`: demons registration of one slice onto its neighbour, to carry label maps across
  (images: (S, S) float arrays in [0, 1] on the same square-pixel grid).
- :func:`mattes_affine`, :func:`matched_demons_field`: the two registrations everything here (and the evaluation's
  registration baseline) is built from, on SimpleITK images.
- :func:`carry_labels_to_study`: affine registration of one study onto another (Mattes mutual information), to put
  a reference's labels where the target's anatomy is; :func:`deformable_study_transform` refines that affine with
  3D demons.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from insid3_med.imaging.geometry import Volume

DEMONS_ITERATIONS = 40
DEMONS_SIGMA = 1.5  # pixels, smoothing of the displacement field


def demons_displacement(fixed: np.ndarray, moving: np.ndarray, iterations: int = DEMONS_ITERATIONS,
                        sigma: float = DEMONS_SIGMA) -> sitk.Image:
    """Displacement field (on ``fixed``'s grid) that maps fixed pixels to where they lie in ``moving``."""
    fixed_image = sitk.GetImageFromArray(np.ascontiguousarray(fixed, dtype=np.float32))
    moving_image = sitk.GetImageFromArray(np.ascontiguousarray(moving, dtype=np.float32))
    return matched_demons_field(fixed_image, moving_image, iterations, sigma)


def matched_demons_field(fixed_image: sitk.Image, moving_image: sitk.Image, iterations: int,
                         sigma: float) -> sitk.Image:
    """Demons displacement field of two float32 images on one grid, after matching ``moving_image``'s grey-value
    histogram to ``fixed_image``'s; ``sigma``: smoothing of the field in pixels (voxels)."""
    moving_image = sitk.HistogramMatching(moving_image, fixed_image, numberOfHistogramLevels=64,
                                          numberOfMatchPoints=7, thresholdAtMeanIntensity=False)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(sigma)
    return demons.Execute(fixed_image, moving_image)


LabelWarp = Callable[[np.ndarray, Sequence[int]], torch.Tensor]
"""(S, S) label map and its label values -> (L + 1, S, S) soft labels carried by one registration."""


def demons_label_warp(moving_image: np.ndarray, fixed_image: np.ndarray, shrink: int = 1) -> LabelWarp:
    """One demons registration of ``moving_image`` onto ``fixed_image`` ((S, S) grey arrays), as a function that
    carries any (S, S) label map of the moving image onto the fixed one: (L + 1, S, S) soft labels, channel 0 the
    background, channel l the share of label ``values[l - 1]`` (linear interpolation of one-hot maps). Several label
    maps carried across the same pair of slices share the registration.

    shrink: register the images averaged over ``shrink`` x ``shrink`` pixel bins (the field's smoothing scaled to
    match), then resample the field onto the (S, S) grid: about shrink^2 times faster for a smooth enough field.
    """
    if shrink < 1:
        raise ValueError(f"shrink must be >= 1, not {shrink}")
    reference = sitk.GetImageFromArray(np.zeros(fixed_image.shape, dtype=np.float32))
    if shrink == 1:
        field = demons_displacement(fixed_image, moving_image)
    else:
        fixed_small, moving_small = (sitk.BinShrink(sitk.GetImageFromArray(np.ascontiguousarray(a, np.float32)),
                                                    [shrink, shrink]) for a in (fixed_image, moving_image))
        coarse = matched_demons_field(fixed_small, moving_small, DEMONS_ITERATIONS, DEMONS_SIGMA / shrink)
        field = sitk.Resample(coarse, reference, sitk.Transform(), sitk.sitkLinear, 0.0, coarse.GetPixelID(),
                              useNearestNeighborExtrapolator=True)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))

    def warp(moving_labels: np.ndarray, values: Sequence[int]) -> torch.Tensor:
        channels = []
        for value in values:
            onehot = sitk.GetImageFromArray((moving_labels == value).astype(np.float32))
            warped = sitk.Resample(onehot, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            channels.append(sitk.GetArrayFromImage(warped))
        foreground = np.stack(channels) if channels else np.zeros((0, *fixed_image.shape), dtype=np.float32)
        background = np.clip(1.0 - foreground.sum(axis=0, keepdims=True), 0.0, 1.0)
        return torch.from_numpy(np.concatenate([background, foreground]).astype(np.float32))

    return warp


def volume_to_sitk(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image of ``array`` (default: the volume's (K, J, I) grey array) on the volume's grid."""
    data = volume.array if array is None else array
    if data.shape[:3] != volume.shape:
        raise ValueError(f"array shape {data.shape} does not match the volume's grid {volume.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(data))
    image.SetSpacing(tuple(float(s) for s in volume.geometry.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.geometry.origin))
    image.SetDirection(tuple(float(v) for v in volume.geometry.direction_matrix().ravel()))
    return image


def unit_intensity(array: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Grey values clipped to their ``low``..``high`` percentiles and scaled to [0, 1] (float32, same shape)."""
    array = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(array, [low, high]) if array.size else (0.0, 1.0)
    if hi <= lo:
        return np.zeros_like(array)
    return ((np.clip(array, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def check_sampling_seed(seed: int) -> None:
    """Raise a ValueError unless ``seed`` >= 1: SimpleITK reads a sampling seed of 0 as "seed from the wall clock"."""
    if seed < 1:
        raise ValueError(f"seed must be >= 1 (SimpleITK takes 0 to mean the wall clock), got {seed}")


def mattes_affine(fixed: sitk.Image, moving: sitk.Image, *, shrink_factors: Sequence[int],
                  sampling: Sequence[float], iterations: int, bins: int = 32, seed: int = 1,
                  smoothing_in_mm: bool = True) -> sitk.Transform:
    """Affine transform (``fixed`` -> ``moving`` physical points): Mattes mutual information, regular-step gradient
    descent, geometric centring, one pyramid level per shrink factor (smoothing sigma = factor // 2, in mm or voxels).

    sampling: the share of voxels the metric samples at each level. seed: the sampling seed, >= 1 (SimpleITK reads 0
    as "seed from the wall clock", which made every run differ). With a fixed thread count the result is the same
    run after run; with several threads the last bits may differ.
    """
    check_sampling_seed(seed)
    dimension = fixed.GetDimension()
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(dimension),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel([float(f) for f in sampling], seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([int(f) for f in shrink_factors])
    method.SetSmoothingSigmasPerLevel([float(f // 2) for f in shrink_factors])
    if not smoothing_in_mm:
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))


AFFINE_ITERATIONS = 100  # per pyramid level, between two studies
SAMPLING_SEED = 1  # of the affine metric's random sampling (SimpleITK reads 0 as the wall clock)


STUDY_REGISTRATION_VOXELS = 2**20
"""The most voxels two studies are registered on (:func:`study_image`): a larger study is averaged over bins of
voxels first. Registering two CTs of 512x512x300 at full resolution took most of an hour on a CPU core; every study of
../shared/data but BraTS (240x240x155) is smaller and registers at full resolution."""


def registration_shrink_factors(size: Sequence[int], spacing: Sequence[float], max_voxels: int | None) -> list[int]:
    """Per-axis bin sizes (in ``size``'s axis order) that bring a grid of ``size`` voxels of ``spacing`` mm to at
    most ``max_voxels`` voxels (None: no limit): the axis with the finest binned spacing grows first, so the
    binned voxels tend towards cubes; no axis falls below 8 voxels."""
    factors = [1] * len(size)
    if max_voxels is None:
        return factors
    while int(np.prod([-(-n // f) for n, f in zip(size, factors, strict=True)])) > max_voxels:
        axes = [a for a in range(len(size)) if size[a] // (factors[a] + 1) >= 8]
        if not axes:
            break
        axis = min(axes, key=lambda a: (spacing[a] * factors[a], -size[a] // factors[a]))
        factors[axis] += 1
    return factors


def study_image(volume: Volume, max_voxels: int | None = STUDY_REGISTRATION_VOXELS) -> sitk.Image:
    """The volume's grey values as :func:`unit_intensity` float32 on its grid, averaged over bins of voxels where
    it holds more than ``max_voxels`` (:func:`registration_shrink_factors`; None: never): what the study
    registrations see."""
    image = volume_to_sitk(volume, unit_intensity(volume.array))
    factors = registration_shrink_factors(image.GetSize(), image.GetSpacing(), max_voxels)
    return image if factors == [1] * len(factors) else sitk.BinShrink(image, factors)


def affine_study_transform(fixed: Volume, moving: Volume, iterations: int = AFFINE_ITERATIONS,
                           seed: int = SAMPLING_SEED, max_voxels: int | None = STUDY_REGISTRATION_VOXELS
                           ) -> sitk.Transform:
    """Affine transform mapping ``fixed`` physical points to ``moving`` ones (:func:`mattes_affine`, 3 levels,
    25% of the voxels sampled, on :func:`study_image`'s grids of at most ``max_voxels``); seed: the sampling seed,
    >= 1."""
    return _affine_of_images(study_image(fixed, max_voxels), study_image(moving, max_voxels), iterations, seed)


def _affine_of_images(fixed_image: sitk.Image, moving_image: sitk.Image, iterations: int, seed: int) -> sitk.Transform:
    levels = [f for f in (4, 2, 1) if min(fixed_image.GetSize()) // f >= 8] or [1]
    return mattes_affine(fixed_image, moving_image, shrink_factors=levels, sampling=[0.25] * len(levels),
                         iterations=iterations, seed=seed)


STUDY_DEMONS_SIGMA = 2.0  # voxels, smoothing of the 3D displacement field between two studies


def deformable_study_transform(fixed: Volume, moving: Volume, affine: sitk.Transform | None = None,
                               iterations: int = 50, sigma: float = STUDY_DEMONS_SIGMA,
                               max_voxels: int | None = STUDY_REGISTRATION_VOXELS) -> sitk.Transform:
    """``affine`` (``fixed`` -> ``moving`` physical points; default: :func:`affine_study_transform` of the two,
    from the same intensity-scaled images) refined by 3D demons on ``fixed``'s grid (binned to at most
    ``max_voxels``, :func:`study_image`; the field is interpolated between its voxels).

    The moving study is resampled through ``affine`` onto the fixed grid, its grey values matched to the fixed
    study's histogram, and a displacement field (smoothed with ``sigma`` voxels) registers the two. Returns the
    composite transform (displacement first, then ``affine``), usable as :func:`carry_labels_to_study`'s transform.
    """
    fixed_image, moving_image = study_image(fixed, max_voxels), study_image(moving, max_voxels)
    if affine is None:
        affine = _affine_of_images(fixed_image, moving_image, AFFINE_ITERATIONS, SAMPLING_SEED)
    moved = sitk.Resample(moving_image, fixed_image, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    field = matched_demons_field(fixed_image, moved, iterations, sigma)
    displacement = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([affine, displacement])  # applied last to first: displacement, then affine


def carry_labels_to_study(reference: Volume, labels: np.ndarray, target: Volume,
                          transform: sitk.Transform | None = None) -> np.ndarray:
    """The reference's (K, J, I) label map moved onto the target's grid by registration (nearest neighbour).

    transform: target -> reference physical points (default: :func:`affine_study_transform` of the two studies;
    :func:`deformable_study_transform` refines one).
    Returns the target's (K', J', I') int64 label map.
    """
    transform = transform if transform is not None else affine_study_transform(target, reference)
    moving = volume_to_sitk(reference, np.asarray(labels).astype(np.int16))
    fixed = volume_to_sitk(target, np.zeros(target.shape, dtype=np.int16))
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    return sitk.GetArrayFromImage(warped).astype(np.int64)
