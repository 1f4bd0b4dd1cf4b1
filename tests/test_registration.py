"""Study registration (insid3_med.registration): it finds a known shift and gives the same answer every run."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from insid3_med.evaluation.baselines import RegistrationParams
from insid3_med.imaging.geometry import Geometry, Volume
from insid3_med.registration import affine_study_transform, carry_labels_to_study


def phantom(shift: tuple[float, float, float] = (0.0, 0.0, 0.0), shape: tuple[int, int, int] = (28, 40, 40)) -> Volume:
    """(K, J, I) volume, 1 mm voxels: a hard-edged "head" ellipsoid (grey 50) holding a bright off-centre ellipsoid
    (100, the structure) and a dim box (25), all moved by ``shift`` voxels along (K, J, I)."""
    k, j, i = (axis - centre - offset for axis, centre, offset in zip(
        np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"),
        (shape[0] / 2, shape[1] / 2, shape[2] / 2), shift, strict=True))
    array = np.where((k / 10.0) ** 2 + (j / 15.0) ** 2 + (i / 13.0) ** 2 <= 1.0, 50.0, 0.0)
    array[((k - 2.0) / 4.0) ** 2 + ((j + 4.0) / 6.0) ** 2 + ((i - 3.0) / 3.0) ** 2 <= 1.0] = 100.0
    array[(np.abs(k + 3.0) <= 2.0) & (np.abs(j - 6.0) <= 3.0) & (np.abs(i + 5.0) <= 2.0)] = 25.0
    return Volume(array.astype(np.float32), Geometry())


def test_affine_registration_is_the_same_run_after_run() -> None:
    fixed, moving = phantom(), phantom((0.0, 2.0, -3.0))
    first = np.array(affine_study_transform(fixed, moving).GetParameters())
    for _ in range(2):
        # ITK's threads may add in another order: the last bits can differ (1e-8 measured), the sampling may not
        # (with the wall-clock seed the parameters differed by 0.03).
        np.testing.assert_allclose(affine_study_transform(fixed, moving).GetParameters(), first, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="wall clock"):
        affine_study_transform(fixed, moving, seed=0)
    with pytest.raises(ValueError, match="wall clock"):
        RegistrationParams(seed=0)  # the evaluation's registration baseline shares mattes_affine


def test_affine_registration_finds_the_shift_and_carries_the_labels_along() -> None:
    fixed, moving = phantom(), phantom((0.0, 2.0, -3.0))
    transform = affine_study_transform(fixed, moving)
    # fixed -> moving physical points (x, y, z) = (I, J, K) mm: every point moves by the shift.
    for point in ((20.0, 20.0, 14.0), (23.0, 16.0, 16.0), (15.0, 26.0, 11.0)):
        moved = np.array(transform.TransformPoint(point)) - np.array(point)
        np.testing.assert_allclose(moved, (-3.0, 2.0, 0.0), atol=0.5)
    labels = (moving.array == 100.0).astype(np.int64)
    carried = carry_labels_to_study(moving, labels, fixed, transform)
    truth = fixed.array == 100.0
    dice = 2.0 * np.count_nonzero((carried == 1) & truth) / (np.count_nonzero(carried == 1) + np.count_nonzero(truth))
    assert dice > 0.9, dice
    assert isinstance(transform, sitk.Transform)


def test_large_studies_are_registered_on_binned_grids_of_a_bounded_size() -> None:
    """A study above max_voxels is averaged over bins (its finest axes first, none below 8 voxels), and the
    registration found there still carries the labels; smaller studies are registered at full resolution."""
    from insid3_med.registration import deformable_study_transform, registration_shrink_factors, study_image

    assert registration_shrink_factors((40, 40, 28), (1.0, 1.0, 1.0), None) == [1, 1, 1]
    assert registration_shrink_factors((40, 40, 28), (1.0, 1.0, 1.0), 40 * 40 * 28) == [1, 1, 1]
    # a CT of 512 x 512 x 300 voxels of 0.8 x 0.8 x 1.5 mm: in-plane axes binned first, towards cubic voxels
    factors = registration_shrink_factors((512, 512, 300), (0.8, 0.8, 1.5), 2**20)
    assert np.prod([-(-n // f) for n, f in zip((512, 512, 300), factors, strict=True)]) <= 2**20
    assert abs(factors[0] - factors[1]) <= 1 and 1 <= factors[2] < min(factors[:2])  # binned voxels of 4 to 5 mm
    assert max(s * f for s, f in zip((0.8, 0.8, 1.5), factors, strict=True)) <= 5.0
    assert registration_shrink_factors((10, 400, 400), (5.0, 1.0, 1.0), 4096)[0] == 1  # 10 voxels: kept
    fixed, moving = phantom(), phantom((0.0, 2.0, -3.0))
    assert study_image(fixed).GetSize() == (40, 40, 28)
    assert study_image(fixed, 40 * 40 * 28 // 6).GetSize() == (20, 20, 14)
    labels = (moving.array == 100.0).astype(np.int64)
    truth = fixed.array == 100.0
    for max_voxels in (None, 40 * 40 * 28 // 6):
        transform = deformable_study_transform(fixed, moving, iterations=20, max_voxels=max_voxels)
        carried = carry_labels_to_study(moving, labels, fixed, transform)
        overlap = np.count_nonzero((carried == 1) & truth)
        dice = 2.0 * overlap / (np.count_nonzero(carried == 1) + np.count_nonzero(truth))
        assert dice > 0.85, (max_voxels, dice)
