"""Tests of insid3_med.propagation: region of interest, label transfer, gate, refinement and the chain's stop logic.

The chain is checked on synthetic slices whose patch features are known exactly, so the right answer is known.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from insid3_med.propagation import (
    ContextSlice,
    PropagationParams,
    SquareBox,
    carry_labels,
    crop_square,
    intensity_likelihood,
    label_slice,
    labelled_intensity_histograms,
    majority_labels,
    nearest_line,
    neighbourhood_mask,
    one_tissue_partners,
    params_from_settings,
    part_boundaries,
    paste_square,
    patch_label_fractions,
    propagate_crops,
    refine_with_intensity,
    region_of_interest,
    registration_shrink,
    spatial_gate,
    split_by_part_boundary,
    straight_part_boundary,
    structure_groups,
    tracked_gate_centre,
    transfer_labels,
    with_overrides,
)
from insid3_med.registration import demons_label_warp


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_region_of_interest_is_a_square_around_every_mask() -> None:
    mask = np.zeros((40, 60), dtype=np.int64)
    mask[10:20, 30:34] = 1  # 10 x 4
    other = np.zeros_like(mask)
    other[18:22, 36:38] = 2
    box = region_of_interest([mask, other], crop_scale=2.0)
    assert box.side == 24  # 2 x the union's larger side (12 rows x 8 columns)
    assert (box.top, box.left) == (4, 22)  # centred on rows 10..21, columns 30..37
    assert region_of_interest([mask], 1.0, min_fraction=0.5).side == 30
    with pytest.raises(ValueError, match="empty"):
        region_of_interest([np.zeros((5, 5))], 2.0)


def test_crop_and_paste_are_inverse_and_pad_with_zeros_past_the_edges() -> None:
    image = np.arange(30 * 20, dtype=np.float32).reshape(30, 20) + 1
    box = SquareBox(top=-5, left=10, side=16)
    crop = crop_square(image, box)
    assert crop.shape == (16, 16)
    assert np.all(crop[:5] == 0) and np.all(crop[:, 10:] == 0)
    np.testing.assert_array_equal(crop[5:, :10], image[:11, 10:20])
    back = paste_square(crop, box, image.shape)
    np.testing.assert_array_equal(back[:11, 10:], image[:11, 10:])
    assert np.all(back[11:] == 0) and np.all(back[:, :10] == 0)
    rgb = crop_square(np.ones((8, 8, 3), dtype=np.float32), SquareBox(0, 0, 10))
    assert rgb.shape == (10, 10, 3) and rgb[..., 0].sum() == 64


def test_patch_label_fractions_are_area_shares_per_class() -> None:
    labels = np.zeros((8, 8), dtype=np.int64)
    labels[:4, :4] = 3
    labels[:2, 4:] = 5
    fractions = patch_label_fractions(labels, [3, 5], (2, 2))
    assert fractions.shape == (4, 3)
    torch.testing.assert_close(fractions.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(fractions[0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(fractions[1], torch.tensor([0.5, 0.0, 0.5]))
    torch.testing.assert_close(fractions[3], torch.tensor([1.0, 0.0, 0.0]))


def test_neighbourhood_mask_is_a_chebyshev_window() -> None:
    allowed = neighbourhood_mask((3, 3), 1)
    assert allowed.shape == (9, 9)
    assert bool(allowed[4].all())  # the centre sees everything
    assert allowed[0].nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert neighbourhood_mask((3, 3), 0).equal(torch.eye(9, dtype=torch.bool))


def test_transfer_labels_takes_the_labels_of_the_most_similar_allowed_patch() -> None:
    context = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]), dim=1)
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    target = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    everywhere = torch.ones(4, 4, dtype=torch.bool)
    out = transfer_labels(target, [context], [labels], everywhere, top_k=1, temperature=0.1)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    # Restricted to its own position, each target patch can only copy the patch there.
    only_self = torch.eye(4, dtype=torch.bool)
    out = transfer_labels(target, [context], [labels], only_self, top_k=3, temperature=0.1)
    torch.testing.assert_close(out, labels)


def test_spatial_gate_is_one_on_the_structure_and_decays_outside() -> None:
    labels = np.zeros((11, 11), dtype=np.int64)
    labels[5, 5] = 2
    gate = spatial_gate(labels, [1, 2], sigma=2.0)
    assert gate.shape == (3, 11, 11)
    assert torch.all(gate[0] == 1) and torch.all(gate[1] == 0)
    assert float(gate[2, 5, 5]) == 1.0
    assert float(gate[2, 5, 7]) == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert float(gate[2, 0, 0]) == pytest.approx(np.exp(-0.5 * 50 / 4), rel=1e-5)  # 7.07 px away


def test_refine_with_intensity_moves_a_blurred_boundary_to_the_intensity_edge() -> None:
    from scipy.ndimage import gaussian_filter

    image = np.full((40, 40), 0.2, dtype=np.float32)
    truth = disk((40, 40), (20, 20), 10)
    image[truth] = 0.8
    # Upsampled patch probabilities: smooth, and 2 pixels too wide.
    foreground = gaussian_filter(disk((40, 40), (20, 20), 12).astype(np.float32), 3.0)
    probabilities = torch.from_numpy(np.stack([1 - foreground, foreground]))
    refined = refine_with_intensity(probabilities, image, band=3.0)
    assert refined.shape == probabilities.shape
    torch.testing.assert_close(refined.sum(dim=0), torch.ones(40, 40))
    before = (probabilities.argmax(0).numpy() == 1) != truth
    after = (refined.argmax(0).numpy() == 1) != truth
    assert before.sum() > 50 and after.sum() <= 0.2 * before.sum()
    far = np.ones((40, 40), dtype=bool)
    far[5:36, 5:36] = False
    torch.testing.assert_close(refined[:, far], probabilities[:, far])  # only the boundary band changes


def test_params_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        PropagationParams(crop_scale=0.5)
    with pytest.raises(ValueError, match="temperature"):
        PropagationParams(temperature=0)
    with pytest.raises(ValueError, match="registration_weight"):
        PropagationParams(registration_weight=2.0)
    with pytest.raises(ValueError, match="stop_confidence"):
        PropagationParams(stop_confidence=0.0)
    with pytest.raises(ValueError, match="transfer_reference_stop_confidence"):
        PropagationParams(transfer_reference_stop_confidence=1.5)
    with pytest.raises(ValueError, match="transfer_registration_weight"):
        PropagationParams(transfer_registration_weight=-0.1)
    with pytest.raises(ValueError, match="transfer_context_span"):
        PropagationParams(transfer_context_span=-1)
    with pytest.raises(ValueError, match="intensity_likelihood"):
        PropagationParams(intensity_likelihood=0.0)
    with pytest.raises(ValueError, match="crop_handoffs"):
        PropagationParams(crop_handoffs=-1)
    with pytest.raises(ValueError, match="handoff_margin"):
        PropagationParams(handoff_margin=0.5)
    # a negative sigma was taken as its absolute value, a zero band divided by zero
    for name in ("gate_sigma", "transfer_gate_sigma", "transfer_reference_gate_sigma", "refine_band"):
        with pytest.raises(ValueError, match=f"{name} must be > 0 or None"):
            PropagationParams(**{name: -0.02})
    with pytest.raises(ValueError, match="max_image_size must be >= image_size"):
        PropagationParams(max_image_size=100)
    with pytest.raises(ValueError, match="min_crop_fraction"):
        PropagationParams(min_crop_fraction=1.5)
    with pytest.raises(ValueError, match="transfer_neighbourhood and transfer_search"):
        PropagationParams(transfer_search=-1)


def test_an_empty_slice_range_says_how_negative_ends_were_read() -> None:
    from insid3_med.volume import resolve_slice_range

    assert resolve_slice_range(40, (-5, 40)) == (35, 40)
    with pytest.raises(ValueError, match=r"empty slice range -5:30 \(that is 35:30: a negative end counts from the "
                       r"end\) for 40 slices \(0:40\)"):
        resolve_slice_range(40, (-5, 30))
    with pytest.raises(ValueError, match=r"empty slice range 50:60 for 40 slices \(0:40\)$"):
        resolve_slice_range(40, (50, 60))


def test_with_overrides_reads_each_value_as_its_field_type() -> None:
    params = with_overrides(PropagationParams(), ["gate_sigma=0.05", "flip=true", "stop_confidence=none",
                                                  "top-k=5", "crop_scale=3"])
    assert params == PropagationParams(gate_sigma=0.05, flip=True, stop_confidence=None, top_k=5, crop_scale=3.0)
    assert isinstance(params.top_k, int) and isinstance(params.crop_scale, float)
    assert with_overrides(params, []) == params and with_overrides(params, ["flip=off"]).flip is False
    # a config file's typed values take the same path
    assert params_from_settings({"top_k": 5, "flip": True, "stop_confidence": None}) == PropagationParams(
        top_k=5, flip=True, stop_confidence=None)
    assert params_from_settings(None) == params_from_settings({}) == PropagationParams()
    walk = with_overrides(PropagationParams(), ["random_walk_beta=130", "random_walk_band=2"])
    assert (walk.random_walk_beta, walk.random_walk_band) == (130.0, 2)
    assert with_overrides(PropagationParams(), ["random_walk_beta=none"]).random_walk_beta is None


def test_crop_ensemble_is_read_as_numbers_from_a_command_line_or_a_config_file() -> None:
    assert PropagationParams().crop_ensemble == ()
    assert with_overrides(PropagationParams(), ["crop_ensemble=1.25, 1.5,1.75"]).crop_ensemble == (1.25, 1.5, 1.75)
    assert params_from_settings({"crop_ensemble": [1.25, 2]}).crop_ensemble == (1.25, 2.0)
    assert with_overrides(PropagationParams(crop_ensemble=(1.5, 2.0)), ["crop_ensemble=none"]).crop_ensemble == ()
    with pytest.raises(ValueError, match=re.escape("crop_ensemble='1.5,big': expected comma-separated numbers")):
        with_overrides(PropagationParams(), ["crop_ensemble=1.5,big"])
    with pytest.raises(ValueError, match="every crop_ensemble scale must be >= 1"):
        with_overrides(PropagationParams(), ["crop_ensemble=0.5,1.5"])


def test_majority_labels_keeps_what_more_than_half_of_the_maps_say() -> None:
    maps = [np.array([[1, 1, 2, 0], [2, 0, 0, 3]]), np.array([[1, 2, 2, 0], [2, 1, 0, 0]]),
            np.array([[1, 0, 2, 1], [0, 2, 0, 0]])]
    voted = majority_labels(maps)
    assert voted.dtype == np.int64
    np.testing.assert_array_equal(voted, [[1, 0, 2, 0], [2, 0, 0, 0]])  # 1/2/0 split and 3 on 1 of 3: background
    np.testing.assert_array_equal(majority_labels(maps[:2]), [[1, 0, 2, 0], [2, 0, 0, 0]])  # two: both agree
    with pytest.raises(ValueError, match="at least one"):
        majority_labels([])


@pytest.mark.parametrize(("item", "message"), [
    ("gate_sgima=0.05", "unknown propagation setting 'gate_sgima'; choose from image_size"),
    ("gate_sigma", "expected KEY=VALUE"),
    ("top_k=0.5", "top_k='0.5': expected int"),
    ("top_k=none", "top_k cannot be none"),
    ("flip=maybe", "flip='maybe': expected bool"),
    ("stop_confidence=high", "expected float or none"),
    ("temperature=0", "temperature must be > 0"),  # the dataclass's own checks still run
    ("random_walk_beta=-1", "random_walk_beta must be > 0 or None"),
    ("random_walk_band=0", "random_walk_band must be at least 1 pixel"),
])
def test_with_overrides_names_the_bad_setting(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        with_overrides(PropagationParams(), [item])


# -- the chain on slices with exactly known features ---------------------------------------------------------

SIDE, GRID = 32, (8, 8)


def exact_features(labels: np.ndarray, values: list[int]) -> torch.Tensor:
    """(N, C) features that say exactly which class covers most of each patch (plus a small shared part)."""
    fractions = patch_label_fractions(labels, values, GRID)
    one_hot = F.one_hot(fractions.argmax(dim=1), len(values) + 1).float()
    return F.normalize(one_hot + 0.05, dim=1)


def run_chain(truth: dict[int, np.ndarray], anchors: list[int], count: int, values: list[int],
              params: PropagationParams | None = None) -> dict[int, np.ndarray]:
    return propagate_crops({n: truth[n] for n in anchors}, lambda n: exact_features(truth[n], values), values,
                           GRID, params or PropagationParams(refine_band=None), start=0, stop=count,
                           images=lambda n: (truth[n] > 0).astype(np.float32))


def test_chain_follows_a_moving_structure_and_stops_where_it_ends() -> None:
    # A disk drifting one pixel per slice, present on slices 3..9, largest on slice 6; a look-alike appears far
    # from it on slices 10..13 (after the structure ended) and must not be picked up.
    truth = {}
    for n in range(14):
        labels = np.zeros((SIDE, SIDE), dtype=np.int64)
        radius = {3: 6, 4: 7, 5: 8, 6: 9, 7: 8, 8: 7, 9: 6}.get(n, 0)
        if radius:
            labels[disk((SIDE, SIDE), (16, 10 + n), radius)] = 1
        if n >= 10:
            labels[disk((SIDE, SIDE), (4, 4), 4)] = 1
        truth[n] = labels
    visited: list[int] = []
    result = propagate_crops({6: truth[6]}, lambda n: exact_features(truth[n], [1]), [1], GRID,
                             PropagationParams(), start=0, stop=14, progress=visited.append,
                             images=lambda n: np.where(truth[n] > 0, 0.8, 0.3).astype(np.float32))
    for n in range(3, 10):
        overlap = np.logical_and(result[n] == 1, truth[n] == 1).sum()
        dice = 2 * overlap / ((result[n] == 1).sum() + (truth[n] == 1).sum())
        assert dice > 0.85, f"slice {n}: Dice {dice:.2f}"
    for n in (0, 1, 2, 10, 11, 12, 13):
        assert n not in result or not result[n].any(), f"slice {n} beyond the structure is labelled"
    assert 6 not in visited and 5 in visited and 7 in visited
    assert max(visited) <= 11 and min(visited) >= 1  # the chain stopped soon after the structure ended


@pytest.mark.parametrize("independent", [False, True])
def test_chain_keeps_two_structures_apart_and_each_stops_on_its_own(independent: bool) -> None:
    truth = {}
    for n in range(10):
        labels = np.zeros((SIDE, SIDE), dtype=np.int64)
        labels[disk((SIDE, SIDE), (10, 10), 6)] = 1  # structure 1 on every slice
        if 2 <= n <= 6:
            labels[disk((SIDE, SIDE), (22, 22), 6)] = 4  # structure 4 only on slices 2..6
        truth[n] = labels
    result = run_chain(truth, [4], 10, [1, 4], PropagationParams(refine_band=None, independent_structures=independent))
    for n in range(10):
        for value in (1, 4):
            predicted, expected = result[n] == value, truth[n] == value
            if expected.any():
                dice = 2 * np.logical_and(predicted, expected).sum() / (predicted.sum() + expected.sum())
                assert dice > 0.9, f"slice {n}, structure {value}: Dice {dice:.2f}"
            else:
                assert not predicted.any(), f"slice {n}: structure {value} after its end"


def test_between_two_labelled_slices_each_anchor_serves_its_half() -> None:
    truth = {n: np.zeros((SIDE, SIDE), dtype=np.int64) for n in range(9)}
    for n in range(9):
        truth[n][disk((SIDE, SIDE), (16, 8 + 2 * n), 6)] = 2
    seen: list[int] = []
    result = propagate_crops({1: truth[1], 7: truth[7]}, lambda n: exact_features(truth[n], [2]), [2], GRID,
                             PropagationParams(refine_band=None), start=0, stop=9, progress=seen.append)
    assert sorted(seen) == [0, 2, 3, 4, 5, 6, 8]  # every slice once, labelled slices untouched
    assert all(result[n].any() for n in range(9))
    np.testing.assert_array_equal(result[1], truth[1])
    np.testing.assert_array_equal(result[7], truth[7])


def test_structures_drawn_on_different_slices_are_each_chained_from_their_own() -> None:
    # Structure 1 on every slice, drawn on slice 1 only; structure 3 on every slice, drawn on slice 7 only. Each
    # reaches every slice (not only the half nearer to the slice it was drawn on), the drawn slices included: there
    # the structure drawn stays exactly as drawn and the other one is predicted from its own slice.
    truth = {}
    for n in range(9):
        labels = np.zeros((SIDE, SIDE), dtype=np.int64)
        labels[disk((SIDE, SIDE), (10, 10), 6)] = 1
        labels[disk((SIDE, SIDE), (22, 22), 6)] = 3
        truth[n] = labels
    drawn = {1: np.where(truth[1] == 1, 1, 0), 7: np.where(truth[7] == 3, 3, 0)}
    assert structure_groups(drawn, [1, 3]) == [([1], [1]), ([7], [3])]
    assert structure_groups({1: truth[1], 7: truth[7]}, [1, 3]) == [([1, 7], [1, 3])]
    seen: list[int] = []
    result = propagate_crops(drawn, lambda n: exact_features(truth[n], [1, 3]), [1, 3], GRID,
                             PropagationParams(refine_band=None), start=0, stop=9,
                             images=lambda n: (truth[n] > 0).astype(np.float32), progress=seen.append)
    assert sorted(seen) == [0, 2, 3, 4, 5, 6, 8]
    for n in range(9):
        for value in (1, 3):
            predicted, expected = result[n] == value, truth[n] == value
            dice = 2 * np.logical_and(predicted, expected).sum() / (predicted.sum() + expected.sum())
            assert dice > 0.85, f"slice {n}, structure {value}: Dice {dice:.2f}"
    np.testing.assert_array_equal(result[1] == 1, drawn[1] == 1)
    np.testing.assert_array_equal(result[7] == 3, drawn[7] == 3)


def test_chain_stops_where_its_confidence_drops_though_a_look_alike_keeps_the_area() -> None:
    # A disk on slices 2..7 (largest on slice 5); on slices 8..11 a disk of the same size at the same place whose
    # patches look as much like the structure as like the background. The area rule keeps part of it on slice 8
    # (more than stop_ratio of the labelled area, but decided with low confidence); the confidence rule ends the
    # structure there, and cuts nothing inside it.
    truth, looks = {}, {}
    for n in range(12):
        labels = np.zeros((SIDE, SIDE), dtype=np.int64)
        radius = {2: 6, 3: 7, 4: 8, 5: 9, 6: 8, 7: 8}.get(n, 0)
        if radius:
            labels[disk((SIDE, SIDE), (16, 16), radius)] = 1
        truth[n] = labels
        looks[n] = disk((SIDE, SIDE), (16, 16), 8) if n >= 8 else np.zeros((SIDE, SIDE), dtype=bool)

    def features(n: int) -> torch.Tensor:
        fractions = patch_label_fractions(truth[n], [1], GRID)
        one_hot = F.one_hot(fractions.argmax(dim=1), 2).float()
        alike = patch_label_fractions(looks[n].astype(np.int64), [1], GRID)[:, 1] > 0.5
        one_hot[alike] = 0.5
        return F.normalize(one_hot + 0.05, dim=1)

    def run(params: PropagationParams) -> dict[int, np.ndarray]:
        return propagate_crops({5: truth[5]}, features, [1], GRID, params, start=0, stop=12)

    area_only = run(PropagationParams(refine_band=None, stop_confidence=None))
    assert (area_only[8] == 1).sum() > 0.1 * truth[5].sum()  # the area rule keeps the look-alike on slice 8
    result = run(PropagationParams(refine_band=None))
    for n in range(2, 8):
        dice = 2 * np.logical_and(result[n] == 1, truth[n] == 1).sum() / ((result[n] == 1).sum() + truth[n].sum())
        assert dice > 0.75, f"slice {n}: Dice {dice:.2f}"
        np.testing.assert_array_equal(result[n], area_only[n])  # inside the structure nothing is cut
    for n in (0, 1, 8, 9, 10, 11):
        assert n not in result or not result[n].any(), f"slice {n} beyond the structure is labelled"


def test_labelled_intensity_histograms_give_each_class_the_likelihood_of_its_grey_values() -> None:
    labels = np.zeros((SIDE, SIDE), dtype=np.int64)
    labels[disk((SIDE, SIDE), (16, 16), 8)] = 3
    image = np.where(labels == 3, 0.45, 0.9).astype(np.float32)
    histograms = labelled_intensity_histograms({0: labels}, lambda n: image, [3])
    assert histograms.shape == (2, 32)
    np.testing.assert_allclose(histograms.sum(axis=1), 1.0)
    assert histograms[1].argmax() == int(0.45 * 32) and histograms[0].argmax() == int(0.9 * 32)
    probe = np.array([[0.45, 0.9]], dtype=np.float32)
    likelihood = intensity_likelihood(histograms, probe, 1.0)
    assert likelihood.shape == (2, 1, 2)
    assert likelihood[1, 0, 0] > 10 * likelihood[0, 0, 0] and likelihood[0, 0, 1] > 10 * likelihood[1, 0, 1]
    torch.testing.assert_close(intensity_likelihood(histograms, probe, 0.5), likelihood**0.5)


def test_the_grey_value_likelihood_changes_the_decision_but_not_the_confidence() -> None:
    # Every target patch is ambiguous (as like the structure as the background); the grey values decide.
    labels = np.zeros((SIDE, SIDE), dtype=np.int64)
    labels[:, :16] = 1
    image = np.where(labels == 1, 0.3, 0.8).astype(np.float32)
    context = [ContextSlice(exact_features(labels, [1]), patch_label_fractions(labels, [1], GRID))]
    target = F.normalize(torch.ones(GRID[0] * GRID[1], 2), dim=1)
    params = PropagationParams(refine_band=None)
    allowed = neighbourhood_mask(GRID, 8)
    plain, weighed = [], []
    without = label_slice(target, context, [1], GRID, SIDE, params, allowed, confidence=plain)
    likelihood = intensity_likelihood(labelled_intensity_histograms({0: labels}, lambda n: image, [1]), image, 0.2)
    decided = label_slice(target, context, [1], GRID, SIDE, params, allowed, confidence=weighed,
                          likelihood=likelihood)
    np.testing.assert_array_equal(decided, labels)
    assert not np.array_equal(without, labels)
    np.testing.assert_array_equal(plain[0], weighed[0])


def test_one_tissue_partners_are_structures_that_touch_and_share_their_grey_values() -> None:
    labels = np.zeros((SIDE, SIDE), dtype=np.int64)
    labels[4:14, 4:14], labels[4:14, 14:24] = 1, 2  # 1 and 2 side by side, of one grey
    labels[20:28, 4:12], labels[20:28, 20:28] = 3, 4  # 3 touches nothing; 4 has the grey of 1 and 2
    labels[20:28, 12:20] = 5  # 5 touches 3 and 4 but is darker
    image = np.where(np.isin(labels, [1, 2, 3, 4]), 0.7, np.where(labels == 5, 0.2, 0.5)).astype(np.float32)
    partners = one_tissue_partners({0: labels}, lambda n: image, [1, 2, 3, 4, 5])
    assert partners.dtype == bool and np.array_equal(partners, partners.T)
    assert {(i + 1, j + 1) for i, j in zip(*np.nonzero(partners), strict=True) if i < j} == {(1, 2)}


def test_the_straight_boundary_between_two_parts_separates_them_and_weighs_a_small_part_as_much() -> None:
    labels = np.zeros((40, 40), dtype=np.int64)
    labels[disk((40, 40), (20, 20), 15)] = 1
    labels[(labels == 1) & (np.arange(40)[None, :] + 0.5 * np.arange(40)[:, None] > 38)] = 2  # an oblique cut
    line = straight_part_boundary(labels, 1, 2)
    assert line is not None
    other = labels.copy()
    other[other > 0] = 2  # the whole union given to one part, as a drifting chain might
    split_by_part_boundary(other, 1, 2, line)
    np.testing.assert_array_equal(other, labels)
    small = labels.copy()
    small[(small == 2) & (np.arange(40)[None, :] < 31)] = 1  # part 2 keeps a sliver of the disc
    assert 0 < np.count_nonzero(small == 2) < 0.1 * np.count_nonzero(small)
    line = straight_part_boundary(small, 1, 2)
    assert line is not None  # balanced: the sliver still gets its own side
    resplit = small.copy()
    split_by_part_boundary(resplit, 1, 2, line)
    assert np.mean(resplit[small == 2] == 2) > 0.9 and np.mean(resplit[small == 1] == 1) > 0.9


def test_no_straight_boundary_where_a_part_is_missing_or_a_line_cannot_follow_it() -> None:
    ring = np.zeros((40, 40), dtype=np.int64)
    ring[disk((40, 40), (20, 20), 15)] = 2
    ring[disk((40, 40), (20, 20), 8)] = 1  # a disc inside a ring: no line separates them
    assert straight_part_boundary(ring, 1, 2) is None
    assert straight_part_boundary(np.where(ring == 1, 1, 0), 1, 2) is None


def test_the_boundaries_drawn_are_kept_per_pair_of_partners_and_the_nearest_slice_draws() -> None:
    left_right = np.zeros((20, 20), dtype=np.int64)
    left_right[5:15, 4:10], left_right[5:15, 10:16] = 1, 2  # a vertical cut
    top_bottom = np.zeros((20, 20), dtype=np.int64)
    top_bottom[4:10, 5:15], top_bottom[10:16, 5:15] = 1, 2  # a horizontal cut
    one_part = np.where(left_right > 0, 1, 0)  # part 2 absent: no line here
    partners = np.array([[False, True, False], [True, False, False], [False, False, False]])
    boundaries = part_boundaries({2: left_right, 9: top_bottom, 5: one_part}, [1, 2, 3], partners)
    assert list(boundaries) == [(1, 2)] and sorted(boundaries[1, 2]) == [2, 9]
    assert part_boundaries({2: left_right}, [1, 2, 3], np.zeros((3, 3), dtype=bool)) == {}
    for index, drawn in ((0, left_right), (5, left_right), (6, top_bottom), (12, top_bottom)):
        union = np.where(drawn > 0, 2, 0)
        split_by_part_boundary(union, 1, 2, nearest_line(boundaries[1, 2], index))
        np.testing.assert_array_equal(union, drawn)
    tie = {4: np.array([1.0, 0.0, 0.0]), 8: np.array([0.0, 1.0, 0.0])}
    assert nearest_line(tie, 6) is tie[4]  # equally near: the lower slice


def test_parts_of_one_tissue_may_take_each_others_places_and_the_others_may_not() -> None:
    # The features say structure 2 now lies where structure 1 lay on the previous slice.
    labels = np.zeros((SIDE, SIDE), dtype=np.int64)
    labels[8:24, 8:16] = 2
    prior = np.zeros((SIDE, SIDE), dtype=np.int64)
    prior[8:24, 8:16], prior[8:24, 16:24] = 1, 2
    context = [ContextSlice(exact_features(labels, [1, 2]), patch_label_fractions(labels, [1, 2], GRID))]
    target = exact_features(labels, [1, 2])
    params = PropagationParams(refine_band=None, gate_sigma=0.02)
    allowed = neighbourhood_mask(GRID, 2)
    kept = label_slice(target, context, [1, 2], GRID, SIDE, params, allowed, prior=prior)
    traded = label_slice(target, context, [1, 2], GRID, SIDE, params, allowed, prior=prior,
                         partners=np.array([[False, True], [True, False]]))
    assert np.mean(kept[labels == 2] == 2) < 0.2  # without partners 2 stays out of 1's place (its gate's rim aside)
    assert np.mean(traded[labels == 2] == 2) > 0.9
    union_params = PropagationParams(refine_band=None, gate_sigma=0.02, gate_union=True)
    everyone = label_slice(target, context, [1, 2], GRID, SIDE, union_params, allowed, prior=prior,
                           partners=np.zeros((2, 2), dtype=bool))
    np.testing.assert_array_equal(everyone, traded)  # gate_union: every structure may, whatever the partners


def test_the_labelled_slices_grey_values_keep_the_chain_off_tissue_of_another_grey() -> None:
    # A disk (grey 0.4) on every slice; from slice 5 on, tissue of grey 0.9 (a grey the labelled slice holds only
    # far from the structure) beside it, whose patches look a little more like the structure than the background.
    # Without the gate the features alone take it in; the labelled slice's grey values keep it out.
    truth, images, alike = {}, {}, {}
    for n in range(9):
        labels = np.zeros((SIDE, SIDE), dtype=np.int64)
        labels[disk((SIDE, SIDE), (16, 12), 7)] = 1
        truth[n] = labels
        alike[n] = np.zeros((SIDE, SIDE), dtype=bool)
        if n >= 5:
            alike[n][8:24, 20:28] = True
        images[n] = np.where(labels == 1, 0.4, np.where(alike[n], 0.9, 0.15)).astype(np.float32)
        images[n][:, :4] = 0.9  # tissue of that grey far from the structure, on the labelled slice too

    def features(n: int) -> torch.Tensor:
        one_hot = F.one_hot(patch_label_fractions(truth[n], [1], GRID).argmax(dim=1), 2).float()
        tissue = patch_label_fractions(alike[n].astype(np.int64), [1], GRID)[:, 1] > 0.5
        one_hot[tissue] = torch.tensor([0.49, 0.51])
        return F.normalize(one_hot + 0.05, dim=1)

    def run(likelihood: float | None) -> dict[int, np.ndarray]:
        params = PropagationParams(refine_band=None, gate_sigma=None, stop_confidence=None,
                                   intensity_likelihood=likelihood)
        return propagate_crops({2: truth[2]}, features, [1], GRID, params, start=0, stop=9, images=images.get)

    assert all((run(None)[n] == 1)[alike[n]].mean() > 0.5 for n in range(5, 9))
    result = run(0.2)
    assert (result[5] == 1)[alike[5]].mean() < 0.5  # its first slice: the context still holds no such tissue
    for n in range(9):
        assert n == 5 or not (result[n] == 1)[alike[n]].any(), f"slice {n}: the tissue of another grey is labelled"
        dice = 2 * np.logical_and(result[n] == 1, truth[n] == 1).sum() / ((result[n] == 1).sum() + truth[n].sum())
        assert dice > 0.85, f"slice {n}: Dice {dice:.2f}"


def test_tracked_gate_centre_takes_each_structure_from_the_track_unless_the_track_lost_it() -> None:
    previous = np.zeros((6, 6), dtype=np.int64)
    previous[0, :2], previous[5, :2] = 1, 2
    tracked = np.zeros((6, 6), dtype=np.int64)
    tracked[1, 2:4] = 1  # the track moved structure 1 and lost structure 2
    centre = tracked_gate_centre(previous, tracked, [1, 2])
    np.testing.assert_array_equal(centre == 1, tracked == 1)
    np.testing.assert_array_equal(centre == 2, previous == 2)


def test_carry_labels_moves_labels_with_the_image() -> None:
    moving = disk((SIDE, SIDE), (16, 12), 6)
    fixed = disk((SIDE, SIDE), (16, 15), 6)
    warp = demons_label_warp(moving.astype(np.float32), fixed.astype(np.float32))
    carried = carry_labels(warp, moving.astype(np.int64), [1])
    dice = 2 * np.logical_and(carried == 1, fixed).sum() / ((carried == 1).sum() + fixed.sum())
    assert dice > 0.85
    assert not carry_labels(warp, np.zeros((SIDE, SIDE), np.int64), [1]).any()


@pytest.mark.parametrize("shrink", [2, 3])
def test_a_registration_on_binned_crops_carries_labels_as_well_onto_the_full_grid(shrink: int) -> None:
    # A smooth blob and a disk on it, both shifted by (4, -3) pixels on a 120 px crop; binned by 2 or 3, the
    # registration's field is resampled onto the full grid and carries the disk as well as the full-size one does.
    side = 120
    rows, cols = np.mgrid[:side, :side]

    def blob(row: float, col: float) -> np.ndarray:
        return np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * 18.0**2)).astype(np.float32)

    moving_labels = disk((side, side), (58, 62), 20).astype(np.int64)
    fixed_labels = disk((side, side), (62, 59), 20)
    results = {}
    for factor in (1, shrink):
        soft = demons_label_warp(blob(58, 62), blob(62, 59), factor)(moving_labels, [1])
        assert soft.shape == (2, side, side)
        carried = soft.argmax(0).numpy() == 1
        results[factor] = 2 * np.logical_and(carried, fixed_labels).sum() / (carried.sum() + fixed_labels.sum())
    unmoved = 2 * np.logical_and(moving_labels == 1, fixed_labels).sum() / (moving_labels.sum() + fixed_labels.sum())
    assert results[shrink] > 0.95 > unmoved and results[shrink] > results[1] - 0.02, (results, unmoved)


def test_registration_shrink_bins_the_crop_to_about_the_registration_size() -> None:
    assert [registration_shrink(side, 112) for side in (64, 112, 224, 336, 448)] == [1, 1, 2, 3, 4]
    assert registration_shrink(336, None) == 1
    with pytest.raises(ValueError, match="shrink"):
        demons_label_warp(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32), 0)
    with pytest.raises(ValueError, match="registration_size"):
        PropagationParams(registration_size=8)


def test_tracked_gate_follows_a_structure_that_moves_faster_than_a_tight_gate_allows() -> None:
    # A disk moving 3 pixels per slice (the images: a smooth blob at its place); under a gate of a third of a pixel,
    # a gate centred on the previous slice's prediction keeps only the overlap of the disk with where it was, which
    # shrinks slice by slice until it is lost, while a gate centred on the registration track moves with the image.
    truth = {n: disk((SIDE, SIDE), (16, 7 + 3 * n), 5).astype(np.int64) for n in range(7)}
    rows, cols = np.mgrid[:SIDE, :SIDE]

    def image(n: int) -> np.ndarray:
        return np.exp(-((rows - 16) ** 2 + (cols - 7 - 3 * n) ** 2) / (2 * 4.0**2)).astype(np.float32)

    def dice_far_out(tracking: bool) -> float:
        params = PropagationParams(refine_band=None, gate_sigma=0.01, gate_tracking=tracking, stop_ratio=0.0,
                                   stop_confidence=None)
        result = propagate_crops({0: truth[0]}, lambda n: exact_features(truth[n], [1]), [1], GRID, params,
                                 start=0, stop=7, images=image)
        return float(np.mean([2 * np.logical_and(result[n] == 1, truth[n] == 1).sum()
                              / ((result[n] == 1).sum() + truth[n].sum()) for n in range(4, 7)]))

    tracked, untracked = dice_far_out(True), dice_far_out(False)
    assert tracked > 0.7 and untracked < 0.1, (tracked, untracked)


def test_each_chained_slice_is_split_by_the_boundary_drawn_between_parts_of_one_tissue() -> None:
    # One bar of one grey drifting a pixel right per slice, drawn on slice 0 as part 1 left of column 16 and part 2
    # (small: 36 pixels against 168) right of it. The features see one tissue, so the part drawn small is outvoted
    # on the next slice unless each chained slice is split by the drawn line, when it grows as the bar crosses it.
    truth, images = {}, {}
    for n in range(8):
        tissue = np.zeros((SIDE, SIDE), dtype=bool)
        tissue[10:22, 2 + n : 19 + n] = True
        truth[n] = np.where(tissue, np.where(np.arange(SIDE) < 16, 1, 2), 0)
        images[n] = np.where(tissue, 0.6, 0.15).astype(np.float32)

    def features(n: int) -> torch.Tensor:
        return exact_features((truth[n] > 0).astype(np.int64), [1])

    def run(split: bool) -> dict[int, np.ndarray]:
        params = PropagationParams(refine_band=None, split_parts_in_chain=split)
        return propagate_crops({0: truth[0]}, features, [1, 2], GRID, params, start=0, stop=8, images=images.get)

    split, after_only = run(True), run(False)
    for n in range(1, 5):  # while both parts are chained: each labelled pixel on its part's side of the line
        assert not (split[n][:, :16] == 2).any() and not (split[n][:, 16:] == 1).any()
        assert np.mean(split[n][truth[n] == 2] == 2) > 0.95
    assert all((split[n] == 2).any() for n in range(8))
    assert not any((after_only[n] == 2).any() for n in range(1, 8))  # the chain alone loses the small part
