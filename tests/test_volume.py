"""Tests of insid3_med.volume: both propagation modes, their errors, and a real hippocampus check.

The synthetic checks use a stand-in backbone whose patch feature is a direction set by the patch's mean grey value,
so that a bright structure on a dark background has a known answer without any model weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from insid3_med.backbones import IMAGENET_MEAN, IMAGENET_STD
from insid3_med.imaging.geometry import Geometry, Volume
from insid3_med.propagation import PropagationParams, SquareBox
from insid3_med.volume import (
    LabelGridError,
    NoLabelledSliceError,
    StudyTransfer,
    acquisition_axis,
    axis_mismatch,
    drawn_axis,
    labelled_slices,
    near_crop_edge,
    propagate_through_slices,
    propagation_axis,
    study_axes,
    transfer_to_study,
)

ROOT = Path(__file__).resolve().parents[1] / ".."
STANDIN = ROOT / "shared" / "weights" / "dinov2-small-standin"
HIPPOCAMPUS = ROOT / "shared" / "data" / "hippocampus"


class GreyLevelBackbone:
    """(B, 3, H, W) ImageNet-normalised images -> (B, 4, H/14, W/14): each patch's mean grey value as an angle."""

    patch_size = 14

    def encode(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        grey = images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        mean = F.avg_pool2d(grey[:, None], self.patch_size)[:, 0]
        angle = mean.clamp(0, 1) * math.pi
        return torch.stack([angle.cos(), angle.sin(), 0.1 * torch.ones_like(angle), torch.zeros_like(angle)], 1)


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def synthetic_study(shift: tuple[int, int, int] = (0, 0, 0), seed: int = 0) -> tuple[Volume, np.ndarray]:
    """12 slices of 64 x 72 (1 mm, 2 mm between slices): a bright disk on slices 2..8 drifting right, largest on
    slice 5, and a second bright disk in a corner of slices 9..11 that belongs to nothing labelled. ``shift``
    moves the disk by (slices, rows, columns); the brain-like frame around it stays."""
    rng = np.random.default_rng(seed)
    array = 0.2 + 0.03 * rng.standard_normal((12, 64, 72))
    rows, cols = slice(4 + shift[1], 60 + shift[1]), slice(4 + shift[2], 68 + shift[2])
    array[max(0, shift[0]):, rows, cols] += 0.2  # anatomy around the structure, moving with it
    truth = np.zeros((12, 64, 72), dtype=np.int64)
    for n, radius in {2: 5, 3: 8, 4: 10, 5: 12, 6: 10, 7: 8, 8: 5}.items():
        truth[n + shift[0]][disk((64, 72), (32 + shift[1], 30 + n + shift[2]), radius)] = 1
    array[truth == 1] = 0.9
    for n in (9, 10, 11):
        array[n][disk((64, 72), (12, 12), 5)] = 0.9
    volume = Volume(array.astype(np.float32), Geometry(spacing=(1.0, 1.0, 2.0)), modality="MR")
    return volume, truth


def only_slice(labels: np.ndarray, index: int) -> np.ndarray:
    given = np.zeros_like(labels)
    given[index] = labels[index]
    return given


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def test_volume_mode_follows_the_structure_and_leaves_the_slices_beyond_it_empty() -> None:
    volume, truth = synthetic_study()
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    calls: list[tuple[int, int]] = []
    output = propagate_through_slices(segmenter, volume, only_slice(truth, 5), axis="k",  # type: ignore[arg-type]
                                      progress=lambda done, total: calls.append((done, total)))
    assert output.shape == truth.shape and output.dtype == np.int64
    np.testing.assert_array_equal(output[5], truth[5])  # the labelled slice is kept as given
    assert dice(output == 1, truth == 1) > 0.9
    assert labelled_slices(output, 0) == list(range(2, 9))  # nothing on 0, 1 nor on the look-alike of 9..11
    assert calls and calls[-1] == (11, 11) and all(total == 11 for _, total in calls)


def test_random_walk_refinement_moves_only_boundary_voxels_onto_the_edges() -> None:
    from scipy import ndimage

    volume, truth = synthetic_study()
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    given = only_slice(truth, 5)
    coarse = PropagationParams(refine_band=None, random_walk_beta=None,  # boundaries as coarse as the patch grid
                              intensity_likelihood=None)
    chained = propagate_through_slices(segmenter, volume, given, axis=0, params=coarse)  # type: ignore[arg-type]
    walked = propagate_through_slices(segmenter, volume, given, axis=0,  # type: ignore[arg-type]
                                      params=replace(coarse, random_walk_beta=130.0))
    changed = walked != chained
    assert changed.any()
    plane = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)
    boundary = ndimage.binary_dilation(chained != 0, plane) & ~ndimage.binary_erosion(chained != 0, plane)
    assert not (changed & ~boundary).any()  # only voxels at the chain's boundary, in the slice plane
    np.testing.assert_array_equal(walked[5], truth[5])
    assert labelled_slices(walked, 0) == labelled_slices(chained, 0)
    assert dice(walked == 1, truth == 1) > dice(chained == 1, truth == 1)


def test_a_transfer_walks_the_target_with_the_weights_the_reference_labelled_slices_gave(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import insid3_med.volume as volume_module

    calls: list[tuple[tuple[int, ...], object]] = []
    refine = volume_module.refine_volume_boundaries

    def spy(labels, stack, keep_slices, params, label_weights=None):  # type: ignore[no-untyped-def]
        calls.append((tuple(keep_slices), label_weights))
        return refine(labels, stack, keep_slices, params, label_weights)

    monkeypatch.setattr(volume_module, "refine_volume_boundaries", spy)
    reference, reference_truth = synthetic_study()
    target, target_truth = synthetic_study(shift=(1, 3, -4), seed=1)
    output = transfer_to_study(SimpleNamespace(backbone=GreyLevelBackbone()), reference,  # type: ignore[arg-type]
                               only_slice(reference_truth, 5), target, axis="k",
                               params=PropagationParams(random_walk_beta=130.0))
    assert dice(output == 1, target_truth == 1) > 0.8
    (reference_call, target_call) = calls
    assert reference_call == ((5,), None)  # the reference's chain: calibrated on its labelled slice
    assert target_call[0] == () and isinstance(target_call[1], dict) and set(target_call[1]) == {1}


def drifting_pair() -> tuple[Volume, np.ndarray]:
    """16 slices of 64 x 96: structure 1 (grey 0.9) stays in place on slices 1..14; structure 2 (grey 0.6) beside it
    drifts 2 columns a slice to the right, out of a crop cut around both on slice 4."""
    rng = np.random.default_rng(0)
    array = 0.2 + 0.03 * rng.standard_normal((16, 64, 96))
    truth = np.zeros((16, 64, 96), dtype=np.int64)
    for n in range(1, 15):
        truth[n][disk((64, 96), (32, 30), 8)] = 1
        truth[n][disk((64, 96), (32, 44 + 2 * n), 5) & (truth[n] == 0)] = 2
    array[truth == 1] = 0.9
    array[truth == 2] = 0.6
    return Volume(array.astype(np.float32), Geometry(spacing=(1.0, 1.0, 2.0)), modality="MR"), truth


def test_a_structure_drawn_with_another_is_followed_out_of_the_crop() -> None:
    volume, truth = drifting_pair()
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    fixed, followed = (propagate_through_slices(segmenter, volume, only_slice(truth, 4), axis="k",  # type: ignore[arg-type]
                                                params=replace(PropagationParams(), crop_handoffs=handoffs))
                       for handoffs in (0, 3))
    np.testing.assert_array_equal(followed == 1, fixed == 1)  # the structure that stays inside is left as it was
    for n in (10, 11):  # past the fixed crop's side the structure is cut off; followed, it stays whole
        area = int((truth[n] == 2).sum())
        assert (fixed[n] == 2).sum() < 0.8 * area <= 0.9 * area <= (followed[n] == 2).sum(), n
    assert dice(followed == 2, truth == 2) >= dice(fixed == 2, truth == 2) + 0.05
    assert dice(followed == 2, truth == 2) > 0.9
    # drawn alone, a structure keeps the fixed crop (its edge ends chains sliding along a neighbour)
    alone = np.where(truth == 2, 2, 0)
    outputs = [propagate_through_slices(segmenter, volume, only_slice(alone, 4), axis="k",  # type: ignore[arg-type]
                                        params=replace(PropagationParams(), crop_handoffs=handoffs))
               for handoffs in (0, 3)]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_near_crop_edge_counts_only_sides_inside_the_slice() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, 27:30] = True  # 2 pixels from the right side of the box (columns 5..31)
    assert near_crop_edge(mask, SquareBox(5, 5, 27), (40, 40), margin=3)
    assert not near_crop_edge(mask, SquareBox(5, 5, 27), (40, 40), margin=2)
    assert not near_crop_edge(mask, SquareBox(5, 15, 27), (40, 40), margin=3)  # that side lies past the slice
    assert not near_crop_edge(np.zeros((40, 40), dtype=bool), SquareBox(5, 5, 27), (40, 40), margin=3)


def test_volume_mode_respects_the_slice_range_and_carries_label_values() -> None:
    volume, truth = synthetic_study()
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    output = propagate_through_slices(segmenter, volume, only_slice(truth, 5) * 7, axis=0,  # type: ignore[arg-type]
                                      slice_range=(4, 7), params=PropagationParams(image_size=112))
    assert set(np.unique(output)) == {0, 7}
    assert labelled_slices(output, 0) == [4, 5, 6]
    with pytest.raises(NoLabelledSliceError, match=r"no labelled slice inside the slice range 7:12 along axis k "
                                                   r"\(the labelled slices are 5\)"):
        propagate_through_slices(segmenter, volume, only_slice(truth, 5), axis=0,  # type: ignore[arg-type]
                                 slice_range=(7, 12))


@pytest.mark.parametrize(("self_propagation", "random_walk_beta"), [(True, None), (False, None), (True, 130.0)])
def test_volume_mode_transfer_finds_the_structure_in_another_study(self_propagation: bool,
                                                                   random_walk_beta: float | None) -> None:
    reference, reference_truth = synthetic_study()
    target, target_truth = synthetic_study(shift=(1, 3, -4), seed=1)
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    calls: list[tuple[int, int]] = []
    output = transfer_to_study(segmenter, reference, only_slice(reference_truth, 5), target,  # type: ignore[arg-type]
                               axis="k", progress=lambda done, total: calls.append((done, total)),
                               params=PropagationParams(transfer_self_propagation=self_propagation,
                                                        random_walk_beta=random_walk_beta))
    assert output.shape == target.shape
    assert dice(output == 1, target_truth == 1) > 0.8
    # nothing beyond the structure; the confidence stop (0.875 of the peak) may cut its faint tip slice
    found, present = labelled_slices(output, 0), labelled_slices(target_truth, 0)
    assert set(found) <= set(present) and len(found) >= len(present) - 1
    assert calls[-1] == (12, 12)


def test_a_study_transfer_chains_the_reference_once_for_every_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """StudyTransfer.segment gives each target exactly what transfer_to_study gives it, while the reference's own
    chain runs once for all targets (transfer to many studies, every frame of a cine, a bundle run)."""
    import insid3_med.volume as volume_module

    chains: list[int] = []
    real_chain = volume_module.reference_self_propagation

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the wrapped function's own arguments
        chains.append(1)
        return real_chain(*args, **kwargs)

    monkeypatch.setattr(volume_module, "reference_self_propagation", counted)
    reference, reference_truth = synthetic_study()
    targets = [synthetic_study(shift=(1, 3, -4), seed=1), synthetic_study(shift=(-1, -2, 3), seed=2)]
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    given = only_slice(reference_truth, 5)
    alone = [transfer_to_study(segmenter, reference, given, target, axis="k")  # type: ignore[arg-type]
             for target, _ in targets]
    assert len(chains) == 2
    chains.clear()
    transfer = StudyTransfer(segmenter, reference, given, axis="k")  # type: ignore[arg-type]
    for (target, truth), expected in zip(targets, alone, strict=True):
        output = transfer.segment(target)
        np.testing.assert_array_equal(output, expected)
        assert dice(output == 1, truth == 1) > 0.8
        assert transfer.target_axis(target) == 0
    assert len(chains) == 1
    with pytest.raises(NoLabelledSliceError):
        StudyTransfer(segmenter, reference, np.zeros_like(given))  # type: ignore[arg-type]


def test_another_frame_of_the_same_subject_registers_on_the_frames_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A target that is another frame of the reference's subject (same_subject) is registered on grids of at most
    frames_registration_voxels, any other study on grids of at most transfer_registration_voxels."""
    import insid3_med.volume as volume_module

    limits: list[int | None] = []
    real_registration = volume_module.registered_reference

    def recorded(ref_stack, labels, tgt_stack, iterations, max_voxels):  # noqa: ANN001, ANN202
        limits.append(max_voxels)
        return real_registration(ref_stack, labels, tgt_stack, iterations, max_voxels)

    monkeypatch.setattr(volume_module, "registered_reference", recorded)
    reference, reference_truth = synthetic_study()
    target, truth = synthetic_study(shift=(1, 3, -4), seed=1)
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    params = PropagationParams(transfer_registration_voxels=None, frames_registration_voxels=8192)
    transfer = StudyTransfer(segmenter, reference, only_slice(reference_truth, 5), axis="k",  # type: ignore[arg-type]
                             params=params)
    other_study = transfer.segment(target)
    same_subject = transfer.segment(target, same_subject=True)
    assert limits == [None, 8192]
    assert dice(same_subject == 1, truth == 1) > 0.8 and dice(other_study == 1, truth == 1) > 0.8
    assert PropagationParams().frames_registration_voxels == 2**18
    with pytest.raises(ValueError, match="frames_registration_voxels must be at least 4096"):
        PropagationParams(frames_registration_voxels=100)


def test_a_transfer_weighs_each_target_slice_by_the_reference_pseudo_labelled_grey_values(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import insid3_med.volume as volume_module

    reference, reference_truth = synthetic_study()
    target, target_truth = synthetic_study(shift=(1, 3, -4), seed=1)
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    histograms: list[tuple[list[int], np.ndarray]] = []
    weighed: list[tuple[np.ndarray, float]] = []
    real_histograms, real_likelihood = volume_module.labelled_intensity_histograms, volume_module.intensity_likelihood

    def spy_histograms(anchors, images, values):  # noqa: ANN001, ANN202 - the wrapped function's own types
        result = real_histograms(anchors, images, values)
        histograms.append((sorted(anchors), result))
        return result

    def spy_likelihood(table, image, power):  # noqa: ANN001, ANN202
        weighed.append((table, power))
        return real_likelihood(table, image, power)

    # only the target side calls them through insid3_med.volume (the reference's chain calls its own module's)
    monkeypatch.setattr(volume_module, "labelled_intensity_histograms", spy_histograms)
    monkeypatch.setattr(volume_module, "intensity_likelihood", spy_likelihood)
    output = transfer_to_study(segmenter, reference, only_slice(reference_truth, 5), target,  # type: ignore[arg-type]
                               axis="k", params=PropagationParams(random_walk_beta=None))
    assert dice(output == 1, target_truth == 1) > 0.8
    assert len(histograms) == 1
    slices, table = histograms[0]
    assert len(slices) >= 5 and 5 in slices  # the reference's pseudo-labelled slices, not only the drawn one
    assert int(np.argmax(table[1])) >= 24 and int(np.argmax(table[0])) < 16  # bright structure, darker rest
    assert len(weighed) >= len(labelled_slices(output, 0))  # every target slice the carried labels reach
    assert all(t is table and power == 0.2 for t, power in weighed)
    histograms.clear()
    weighed.clear()
    transfer_to_study(segmenter, reference, only_slice(reference_truth, 5), target,  # type: ignore[arg-type]
                      axis="k", params=PropagationParams(random_walk_beta=None, intensity_likelihood=None))
    assert not histograms and not weighed


def test_independent_structures_on_one_labelled_slice_stay_in_one_crop(monkeypatch: pytest.MonkeyPatch) -> None:
    # One labelled slice with two structures: even with independent_structures the volume mode keeps one crop and
    # lets propagate_crops merge the structures by confidence; separate crops merged by the distance to their
    # labelled slices are for structures drawn on different slices (where that distance means something).
    import insid3_med.volume as volume_module

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("structures on one labelled slice went to _propagate_groups")

    monkeypatch.setattr(volume_module, "_propagate_groups", refuse)
    volume, truth = synthetic_study()
    labels = only_slice(truth, 5)
    labels[5][disk((64, 72), (52, 60), 4)] = 2
    output = propagate_through_slices(SimpleNamespace(backbone=GreyLevelBackbone()), volume,  # type: ignore[arg-type]
                                      labels, axis=0, params=PropagationParams(independent_structures=True))
    np.testing.assert_array_equal(output[5], labels[5])
    assert dice(output == 1, truth == 1) > 0.8


def test_crop_ensemble_runs_a_chain_per_scale_and_keeps_their_majority(monkeypatch: pytest.MonkeyPatch) -> None:
    import insid3_med.volume as volume_module

    volume, truth = synthetic_study()
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    labels = only_slice(truth, 5)
    single = {scale: propagate_through_slices(segmenter, volume, labels, axis=0,  # type: ignore[arg-type]
                                              params=PropagationParams(crop_scale=scale))
              for scale in (1.25, 2.0, 3.0)}
    scales: list[float] = []
    chain = volume_module._propagate_volume_mode

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        params = args[6]
        if not params.crop_ensemble:
            scales.append(params.crop_scale)
        return chain(*args, **kwargs)

    monkeypatch.setattr(volume_module, "_propagate_volume_mode", recording)
    calls: list[tuple[int, int]] = []
    output = propagate_through_slices(segmenter, volume, labels, axis=0,  # type: ignore[arg-type]
                                      params=PropagationParams(crop_ensemble=(1.25, 2.0, 3.0)),
                                      progress=lambda done, total: calls.append((done, total)))
    assert scales == [1.25, 2.0, 3.0]
    votes = sum((single[s] == 1).astype(int) for s in scales)
    np.testing.assert_array_equal(output, np.where(votes >= 2, 1, 0))
    np.testing.assert_array_equal(output[5], truth[5])
    assert dice(output == 1, truth == 1) > 0.9
    assert calls[-1] == (33, 33) and [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_reference_chain_uses_the_transfer_reference_gate_and_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    import insid3_med.volume as volume_module

    seen: list[PropagationParams] = []
    real = volume_module.propagate_crops

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - passes through
        seen.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(volume_module, "propagate_crops", spy)
    reference, reference_truth = synthetic_study()
    target, _ = synthetic_study(shift=(1, 3, -4), seed=1)
    params = PropagationParams(gate_tracking=True, gate_sigma=0.02, stop_confidence=0.9, gate_union=True,
                               transfer_reference_gate_tracking=False, transfer_reference_gate_sigma=0.04,
                               transfer_reference_stop_confidence=0.7, transfer_reference_gate_union=False)
    transfer_to_study(SimpleNamespace(backbone=GreyLevelBackbone()), reference,  # type: ignore[arg-type]
                      only_slice(reference_truth, 5), target, axis="k", params=params)
    assert len(seen) == 1  # the reference's own chain; the target's slices are labelled by height
    assert (seen[0].gate_tracking, seen[0].gate_sigma, seen[0].stop_confidence, seen[0].gate_union) == (
        False, 0.04, 0.7, False)


def test_reference_chain_follows_structures_drawn_on_different_slices_like_the_volume_mode() -> None:
    # A reference with each structure painted on its own slice (the Slicer workflow) is chained exactly as
    # propagate_through_slices chains it: each structure from its own slice in a crop of its own. The former shared
    # crop, around both, saw the first disk at a coarser scale and lost its smallest slice (2).
    from dataclasses import replace

    from insid3_med.imaging.intensity import intensity_mapping
    from insid3_med.volume import SliceStack, reference_self_propagation

    reference, truth = synthetic_study()
    for n in (9, 10, 11):
        truth[n][disk((64, 72), (12, 12), 5)] = 2
    given = only_slice(truth, 5) * (only_slice(truth, 5) == 1)
    given[10] = np.where(truth[10] == 2, 2, 0)
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    params = PropagationParams()
    pseudo = reference_self_propagation(segmenter, SliceStack(reference, 0, intensity_mapping(reference, None)),  # type: ignore[arg-type]
                                        given, [5, 10], params)
    assert labelled_slices(pseudo == 1, 0) == list(range(2, 9))
    assert labelled_slices(pseudo == 2, 0) == [9, 10, 11]
    within = replace(params, gate_tracking=params.transfer_reference_gate_tracking,
                     gate_sigma=params.transfer_reference_gate_sigma,
                     stop_confidence=params.transfer_reference_stop_confidence,
                     gate_union=params.transfer_reference_gate_union)
    np.testing.assert_array_equal(pseudo, propagate_through_slices(segmenter, reference, given, axis=0,  # type: ignore[arg-type]
                                                                   params=within))


def test_registered_reference_puts_labels_and_slice_heights_where_the_target_has_them() -> None:
    from insid3_med.imaging.intensity import intensity_mapping
    from insid3_med.volume import SliceStack, matching_reference_slices, registered_reference

    reference, reference_truth = synthetic_study()
    target, target_truth = synthetic_study(shift=(1, 3, -4), seed=1)
    ref_stack = SliceStack(reference, 0, intensity_mapping(reference, None))
    tgt_stack = SliceStack(target, 0, intensity_mapping(target, None))
    for max_voxels in (None, reference.array.size // 4):  # full resolution; averaged over bins of voxels
        registered = registered_reference(ref_stack, reference_truth, tgt_stack, 20, max_voxels)
        assert registered is not None
        carried, heights = registered
        assert carried.shape == heights.shape == target.shape
        assert dice(carried == 1, target_truth == 1) > 0.7
        matches = matching_reference_slices(carried, heights, tgt_stack)
        structure = labelled_slices(target_truth, 0)  # slices 3..9, the reference's 2..8 one slice further
        assert sum(matches[n] == n - 1 for n in structure) >= len(structure) - 1


def test_propagation_description_names_the_mode_and_every_setting() -> None:
    from insid3_med.volume import propagation_description

    assert propagation_description("published") == {"mode": "published"}
    described = propagation_description(params=PropagationParams(top_k=3))
    assert described["mode"] == "volume" and described["top_k"] == 3 and "gate_sigma" in described
    with pytest.raises(ValueError, match="unknown propagation mode"):
        propagation_description("video")


def test_bad_inputs_raise_clear_errors() -> None:
    volume, truth = synthetic_study()
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    with pytest.raises(NoLabelledSliceError):
        propagate_through_slices(segmenter, volume, np.zeros_like(truth))  # type: ignore[arg-type]
    with pytest.raises(LabelGridError, match="shape"):
        propagate_through_slices(segmenter, volume, truth[:5])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown propagation mode"):
        propagate_through_slices(segmenter, volume, truth, mode="video")  # type: ignore[arg-type]


# -- the real stand-in backbone on real hippocampus volumes -------------------------------------------------------

needs_real = pytest.mark.skipif(not (STANDIN.is_dir() and HIPPOCAMPUS.is_dir()),
                                reason="needs ../shared/weights/dinov2-small-standin and ../shared/data/hippocampus")


@pytest.fixture(scope="module")
def segmenter():  # noqa: ANN201 - OneShotSegmenter, imported lazily
    from insid3_med.backbones import load_backbone
    from insid3_med.predictor import OneShotSegmenter

    return OneShotSegmenter(load_backbone(STANDIN, device="cpu"), image_size=112)


def hippocampus_case(name: str) -> tuple[Volume, np.ndarray]:
    from insid3_med.imaging.readers import read_label_volume, read_volume

    volume = read_volume(HIPPOCAMPUS / "images" / f"{name}.nii.gz")
    return volume, read_label_volume(HIPPOCAMPUS / "labels" / f"{name}.nii.gz", volume).astype(np.int64)


def largest_slice(mask: np.ndarray, axis: int) -> int:
    other = tuple(a for a in range(3) if a != axis)
    return int(np.argmax(np.count_nonzero(mask, axis=other)))


@needs_real
@pytest.mark.slow
@pytest.mark.parametrize(("name", "structure", "floor", "beyond_at_most"),
                         # measured with the defaults (stand-in backbone, reports/accuracy): 0.723 with 2 slices
                         # beyond the structure (0.817 with the former gate on the previous slice), 0.803 with 0;
                         # floors leave room for CPU rounding differences
                         [("hippocampus_007", 1, 0.69, 3), ("hippocampus_017", 2, 0.75, 2)])
def test_real_hippocampus_volume_mode_beats_copying_the_slice(segmenter, name: str, structure: int, floor: float,
                                                              beyond_at_most: int) -> None:
    volume, labels = hippocampus_case(name)
    truth = labels == structure
    index = largest_slice(truth, 0)
    given = only_slice(truth.astype(np.int64), index)
    started = time.perf_counter()
    output = propagate_through_slices(segmenter, volume, given, axis=0)
    seconds = time.perf_counter() - started
    copied = np.repeat(truth[index : index + 1], truth.shape[0], axis=0)
    score = dice(output > 0, truth)
    assert score >= floor, f"3D Dice {score:.3f} below the measured floor {floor}"
    assert score >= dice(copied, truth) + 0.15
    extent = labelled_slices(truth.astype(np.int64), 0)
    beyond = [n for n in labelled_slices(output, 0) if not extent[0] <= n <= extent[-1]]
    assert len(beyond) <= beyond_at_most, f"slices labelled beyond the structure: {beyond}"
    assert seconds < 60


@needs_real
@pytest.mark.slow
def test_real_hippocampus_crop_ensemble_stops_where_a_single_crop_runs_on(segmenter) -> None:
    # hippocampus_007's posterior part from its largest slice, with the defaults of 2026-11-27 (the grey-value
    # likelihood): one 1.5x crop gives Dice 0.809 with 5 slices beyond the structure; the ensemble of 1.25x, 1.5x and
    # 1.75x crops 0.812 with 1 (before the likelihood: 0.795 with 5, 0.826 with none).
    volume, labels = hippocampus_case("hippocampus_007")
    truth = labels == 2
    given = only_slice(truth.astype(np.int64), largest_slice(truth, 0))
    extent = labelled_slices(truth.astype(np.int64), 0)
    results = {}
    for name, params in (("single", PropagationParams()), ("ensemble", PropagationParams(crop_ensemble=(1.25, 1.5,
                                                                                                          1.75)))):
        output = propagate_through_slices(segmenter, volume, given, axis=0, params=params)
        beyond = [n for n in labelled_slices(output, 0) if not extent[0] <= n <= extent[-1]]
        results[name] = (dice(output > 0, truth), len(beyond))
    assert results["ensemble"][1] < results["single"][1], results
    assert results["ensemble"][0] >= 0.8 and results["ensemble"][0] >= results["single"][0], results


@needs_real
@pytest.mark.slow
def test_real_hippocampus_parts_drawn_on_different_slices_are_each_chained_from_their_own(segmenter) -> None:
    # The anterior part drawn on its largest slice (12), the posterior on its own (16), in one label map: each part
    # is chained from its own slice in its own crop, and each drawn slice keeps the other part's prediction. Measured
    # with the defaults: anterior 0.853, posterior 0.797 (0.845 / 0.779 while each drawn slice was put back alone,
    # erasing the other part there, until 2026-11-27); with one crop around both parts 0.837 / 0.728; when each drawn
    # slice served only the half of the volume nearer to it (before 2026-11-26) the posterior scored 0.374.
    volume, labels = hippocampus_case("hippocampus_017")
    given = np.zeros_like(labels)
    for value in (1, 2):
        index = largest_slice(labels == value, 0)
        given[index][labels[index] == value] = value
    output = propagate_through_slices(segmenter, volume, given, axis=0)
    anterior, posterior = (dice(output == v, labels == v) for v in (1, 2))
    assert anterior >= 0.82, f"anterior 3D Dice {anterior:.3f} below the measured floor"
    assert posterior >= 0.77, f"posterior 3D Dice {posterior:.3f} below the measured floor"


@needs_real
@pytest.mark.slow
def test_real_hippocampus_transfer_from_one_slice_finds_both_structures(segmenter) -> None:
    # one labelled slice (largest union) of hippocampus_017 -> all of hippocampus_007; measured with the defaults:
    # anterior 0.817, posterior 0.552 (shots only, one registered first slice chained: 0.748 and 0.0)
    reference, reference_labels = hippocampus_case("hippocampus_017")
    target, target_labels = hippocampus_case("hippocampus_007")
    given = only_slice(reference_labels, largest_slice(reference_labels > 0, 0))
    output = transfer_to_study(segmenter, reference, given, target, axis=0)
    anterior, posterior = (dice(output == v, target_labels == v) for v in (1, 2))
    assert anterior >= 0.72, f"anterior 3D Dice {anterior:.3f} below the measured floor"
    assert posterior >= 0.45, f"posterior 3D Dice {posterior:.3f} below the measured floor"


@needs_real
def test_published_mode_segments_each_slice_from_the_shots(segmenter) -> None:
    volume, labels = hippocampus_case("hippocampus_007")
    truth = (labels == 1).astype(np.int64)
    index = largest_slice(truth, 0)
    output = propagate_through_slices(segmenter, volume, only_slice(truth, index), axis=0, mode="published",
                                      slice_range=(index - 2, index + 3))
    np.testing.assert_array_equal(output[index], truth[index])
    assert labelled_slices(output, 0)[0] >= index - 2 and labelled_slices(output, 0)[-1] <= index + 2
    assert dice(output[index - 2 : index + 3] > 0, truth[index - 2 : index + 3] > 0) > 0.2


def test_crop_features_keep_only_a_window_of_slices_in_memory() -> None:
    from insid3_med.imaging.intensity import intensity_mapping
    from insid3_med.propagation import SquareBox
    from insid3_med.volume import CropFeatures, SliceStack

    volume, _ = synthetic_study()
    stack = SliceStack(volume, 0, intensity_mapping(volume, None))
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    source = CropFeatures(segmenter, stack, SquareBox(0, 0, 28), PropagationParams(), batch_size=2,  # type: ignore[arg-type]
                          image_size=28)
    first = source.features(0).clone()
    for index in range(len(stack)):
        source.features(index)
        source.image(index)
        assert len(source._features) <= 9 and len(source._crops) <= 9  # within 2 * batch_size either side
    assert source.encoded == len(stack)  # walking onwards, each slice was encoded once
    assert torch.equal(source.features(0), first)  # a forgotten slice is encoded again, the same
    assert source.encoded == len(stack) + 1  # walking down from the top, slice 0 is the last of its batch


def test_crop_features_encode_ahead_two_slices_on_a_cpu_and_the_batch_on_an_accelerator() -> None:
    from insid3_med.imaging.intensity import intensity_mapping
    from insid3_med.propagation import SquareBox
    from insid3_med.volume import CPU_LOOKAHEAD, CropFeatures, SliceStack

    volume, _ = synthetic_study()
    stack = SliceStack(volume, 0, intensity_mapping(volume, None))

    class OnDevice(GreyLevelBackbone):
        def __init__(self, device: str) -> None:
            self.device = torch.device(device)

    def source(backbone: object, batch_size: int) -> CropFeatures:
        return CropFeatures(SimpleNamespace(backbone=backbone), stack, SquareBox(0, 0, 28),  # type: ignore[arg-type]
                            PropagationParams(), batch_size=batch_size, image_size=28)

    on_cpu = source(OnDevice("cpu"), 4)
    on_cpu.features(5)
    assert CPU_LOOKAHEAD == 2 and on_cpu.batch_size == 2 and sorted(on_cpu._features) == [5, 6]
    assert source(GreyLevelBackbone(), 4).batch_size == 2  # a backbone that names no device runs on the CPU
    assert source(OnDevice("cpu"), 1).batch_size == 1
    assert source(OnDevice("cuda"), 4).batch_size == 4  # only the attribute is read: no GPU is needed


def test_label_maps_are_kept_in_a_compact_dtype_and_outputs_stay_int64() -> None:
    from insid3_med.volume import check_label_grid

    volume, truth = synthetic_study()
    small = truth.astype(np.uint8)
    assert check_label_grid(volume, small) is small  # no copy when already compact
    assert check_label_grid(volume, truth.astype(np.float32)).dtype == np.uint8
    assert check_label_grid(volume, truth.astype(np.int64) * 300).dtype == np.int32
    segmenter = SimpleNamespace(backbone=GreyLevelBackbone())
    output = propagate_through_slices(segmenter, volume, only_slice(truth, 5).astype(np.uint16) * 300,  # type: ignore[arg-type]
                                      axis="k")
    assert output.dtype == np.int64 and set(np.unique(output)) == {0, 300}


@needs_real
def test_real_hippocampus_between_labelled_slices_the_interpolated_shape_is_kept(segmenter) -> None:
    # The posterior part of hippocampus_017 drawn on three slices spread over its extent: between them, every voxel
    # the shape-based interpolation of the drawn slices holds is in the result (fill_between_labelled), and the chain
    # alone misses some of them.
    from insid3_med.evaluation.episodes import spaced_slices
    from insid3_med.interpolation import interpolate_between_slices

    volume, labels = hippocampus_case("hippocampus_017")
    truth = (labels == 2).astype(np.int64)
    slices = spaced_slices(truth, 0, 3)
    given = np.zeros_like(truth)
    given[slices] = truth[slices]
    interpolated = interpolate_between_slices(given, 0, volume.geometry.spacing[1::-1]) > 0
    unwalked = PropagationParams(random_walk_beta=None)  # the fill itself, before the walk re-decides boundaries
    output = propagate_through_slices(segmenter, volume, given, axis=0, params=unwalked)
    chain_only = propagate_through_slices(segmenter, volume, given, axis=0,
                                          params=replace(unwalked, fill_between_labelled=False))
    assert interpolated.any() and (output[interpolated] == 1).all()
    assert (chain_only[interpolated] == 0).any()
    np.testing.assert_array_equal(output[slices], given[slices])
    assert (output[chain_only == 1] == 1).all()  # the fill only adds
    assert dice(output > 0, truth > 0) >= dice(chain_only > 0, truth > 0) - 0.01


def test_parts_of_one_tissue_are_split_by_the_boundary_drawn_between_them() -> None:
    from insid3_med.imaging.intensity import intensity_mapping
    from insid3_med.volume import SliceStack, split_one_tissue_parts

    # Two bars across 8 slices, drawn on slice 3: the upper one, of one grey, as part 1 (left) and part 2 (right);
    # the lower one as 3 (left) and 4 (right), which touch but differ in grey, so they are not parts of one tissue.
    rng = np.random.default_rng(0)
    array = 0.2 + 0.02 * rng.standard_normal((8, 48, 64))
    left, right = np.arange(64)[None, :] < 30, np.arange(64)[None, :] >= 30
    upper, lower = np.zeros((48, 64), dtype=bool), np.zeros((48, 64), dtype=bool)
    upper[8:18, 8:56], lower[30:40, 8:56] = True, True
    array[:, upper] = 0.7
    array[:, lower & left], array[:, lower & right] = 0.7, 0.45
    volume = Volume(array.astype(np.float32), Geometry(spacing=(1.0, 1.0, 2.0)), modality="MR")
    drawn = np.zeros((8, 48, 64), dtype=np.int64)
    drawn[3][upper & left], drawn[3][upper & right] = 1, 2
    drawn[3][lower & left], drawn[3][lower & right] = 3, 4
    chained = np.zeros_like(drawn)
    chained[:, upper], chained[:, lower] = 1, 3  # a chain whose first part took each whole bar on every slice
    chained[3] = drawn[3]
    stack = SliceStack(volume, 0, intensity_mapping(volume, None))
    split = split_one_tissue_parts(chained.copy(), stack, drawn, [3], PropagationParams())
    for n in range(8):
        np.testing.assert_array_equal(split[n][upper], drawn[3][upper])  # the drawn boundary, on every slice
    np.testing.assert_array_equal(np.delete(split, 3, 0)[:, lower], np.delete(chained, 3, 0)[:, lower])
    assert np.array_equal(split > 0, chained > 0)  # the union is kept
    off = split_one_tissue_parts(chained.copy(), stack, drawn, [3], PropagationParams(split_one_tissue_parts=False))
    np.testing.assert_array_equal(off, chained)


@needs_real
@pytest.mark.slow
def test_real_hippocampus_a_part_drawn_small_grows_when_each_chained_slice_is_split(segmenter) -> None:
    # hippocampus_336, both parts drawn on the slice of largest union, where the posterior part holds 18 pixels
    # against the anterior's 130: split on every chained slice (the default), the posterior part grows where the
    # tissue crosses the drawn boundary; split only after the chain, it is outvoted and dies out within a few
    # slices. Measured: posterior 0.833 against 0.362, anterior 0.843 against 0.846.
    volume, labels = hippocampus_case("hippocampus_336")
    given = only_slice(labels, largest_slice(labels > 0, 0))
    split = propagate_through_slices(segmenter, volume, given, axis=0)
    after = propagate_through_slices(segmenter, volume, given, axis=0,
                                     params=PropagationParams(split_parts_in_chain=False))
    posterior, posterior_after = dice(split == 2, labels == 2), dice(after == 2, labels == 2)
    assert posterior >= 0.75, f"posterior 3D Dice {posterior:.3f} below the measured floor"
    assert posterior_after <= 0.5, f"posterior {posterior_after:.3f} without the in-chain split: the case changed"
    assert dice(split == 1, labels == 1) >= 0.8


# -- which axis: the one the labels were drawn across ---------------------------------------------------------------

SAGITTAL_STACK = ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
"""Direction cosines (row-major) of a sagittal acquisition: voxel i runs along P, j along S, k (the slices) along L."""


def blob(shape: tuple[int, int, int] = (20, 24, 28)) -> np.ndarray:
    """(K, J, I) uint8 ellipsoid filling the middle of the grid: a whole 3D segmentation."""
    grid = np.indices(shape).astype(float)
    centre = [(n - 1) / 2 for n in shape]
    radius = [n / 3 for n in shape]
    return (sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True)) <= 1).astype(np.uint8)


def keep_slices(labels: np.ndarray, axis: int, indices: list[int]) -> np.ndarray:
    kept = np.zeros_like(labels)
    for n in indices:
        selection = [slice(None)] * 3
        selection[axis] = n
        kept[tuple(selection)] = labels[tuple(selection)]
    return kept


def test_drawn_axis_is_the_axis_the_slices_were_drawn_across() -> None:
    volume = Volume(np.zeros((20, 24, 28), np.float32), Geometry())
    full = blob()
    for axis in range(3):
        middle = full.shape[axis] // 2
        assert drawn_axis(keep_slices(full, axis, [middle]), volume) == axis
        assert drawn_axis(keep_slices(full, axis, [middle - 3, middle + 3]), volume) == axis  # with a gap
        assert propagation_axis(volume, keep_slices(full, axis, [middle]), "auto") == axis
        assert propagation_axis(volume, keep_slices(full, axis, [middle]), "AUTO") == axis
    assert drawn_axis(full, volume) is None  # a whole segmentation
    with pytest.raises(NoLabelledSliceError):
        drawn_axis(np.zeros_like(full), volume)
    # a single labelled voxel lies on one slice across every axis: the acquisition's slice axis decides
    dot = np.zeros_like(full)
    dot[10, 12, 14] = 1
    thick = Volume(np.zeros(full.shape, np.float32), Geometry(spacing=(1.0, 3.0, 1.0)))  # j: 3 mm
    assert acquisition_axis(thick) == 1 and drawn_axis(dot, thick) == 1


def test_auto_axis_falls_back_to_the_acquisition_axis_for_a_whole_segmentation() -> None:
    full = blob()
    anisotropic = Volume(np.zeros(full.shape, np.float32), Geometry(spacing=(0.8, 0.8, 5.0)))
    assert propagation_axis(anisotropic, full, "auto") == 0  # k: 5 mm between slices
    thin = blob((20, 60, 64))
    assert acquisition_axis(Volume(np.zeros(thin.shape, np.float32), Geometry())) == 0  # a thin slab, isotropic
    sagittal = Volume(np.zeros(full.shape, np.float32), Geometry(direction=SAGITTAL_STACK))
    assert [sagittal.geometry.slice_plane(axis) for axis in range(3)] == ["sagittal", "axial", "coronal"]
    assert acquisition_axis(sagittal) == 1  # isotropic, comparable sizes: the axial slices (rows of the array)
    assert propagation_axis(sagittal, full, "auto") == 1
    assert propagation_axis(sagittal, full, "sagittal") == 0 and propagation_axis(sagittal, full, "k") == 0


def test_transfer_axes_follow_the_plane_the_reference_was_labelled_in() -> None:
    full = blob()
    reference = Volume(np.zeros(full.shape, np.float32), Geometry())  # identity: k axial, j coronal, i sagittal
    target = Volume(np.zeros(full.shape, np.float32), Geometry(direction=SAGITTAL_STACK))
    axial_slice = keep_slices(full, 0, [10])
    assert study_axes(reference, axial_slice, target, "auto") == (0, 1)  # the target's axial slices: its j axis
    assert study_axes(reference, keep_slices(full, 2, [14]), target, "auto") == (2, 0)  # sagittal: its k axis
    assert study_axes(reference, axial_slice, target, "k") == (0, 0)  # an array axis stays an array axis
    assert study_axes(reference, axial_slice, target, "axial") == (0, 1)


def test_axis_mismatch_names_the_axis_the_labels_were_drawn_across() -> None:
    full = blob()
    volume = Volume(np.zeros(full.shape, np.float32), Geometry())
    message = axis_mismatch(volume, keep_slices(full, 2, [14]), 0)
    assert message is not None
    assert "1 slice across axis i (sagittal)" in message and "along axis k (axial)" in message, message
    assert axis_mismatch(volume, keep_slices(full, 2, [8, 14, 20]), 0) is not None  # slices with gaps
    assert axis_mismatch(volume, keep_slices(full, 2, [14]), 2) is None  # the right axis
    assert axis_mismatch(volume, keep_slices(full, 2, [13, 14]), 0) is None  # consecutive: could be 3D
    assert axis_mismatch(volume, full, 0) is None  # a whole segmentation
