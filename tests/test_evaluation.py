"""Tests of the evaluation harness: adapters, episodes, metrics, baselines, resume and reports."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from insid3_med.evaluation.baselines import (
    SliceChainRegistration,
    copy_by_position,
    copy_labelled_slice,
    copy_mask_2d,
    register_volume_labels,
    sitk_threads,
)
from insid3_med.evaluation.datasets import (
    DatasetError,
    DatasetNotFoundError,
    ImageClass,
    open_image_dataset,
    open_volume_dataset,
    slice_axis,
)
from insid3_med.evaluation.episodes import (
    labelled_slice,
    sample_image_episodes,
    sample_pairs,
    select_cases,
    spaced_slices,
)
from insid3_med.evaluation.methods import CopyMethod, InterpolationMethod
from insid3_med.evaluation.metrics import (
    confusion_counts,
    dice,
    dice_by_distance,
    false_positive_slices,
    hd95_mm,
    pooled_iou,
)
from insid3_med.evaluation.report import ReportExistsError, compare_reports
from insid3_med.evaluation.run import run_evaluation
from insid3_med.evaluation.store import code_fingerprint
from insid3_med.evaluation.tasks import SliceTask
from insid3_med.imaging.geometry import Geometry, Volume
from insid3_med.interpolation import interpolate_between_slices

DATA = Path(__file__).parents[1] / ".." / "shared" / "data"


def shared(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"shared test data {path} is absent (a fresh machine without ../shared/data)")
    return path


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def save_nifti(path: Path, array_ijk: np.ndarray, zooms: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array_ijk, np.diag([*zooms, 1.0])), path)


# ------------------------------------------------------------------------------------------------------------
# dataset adapters: shared data
# ------------------------------------------------------------------------------------------------------------


def test_shared_2d_sets_have_the_documented_classes() -> None:
    ph2 = open_image_dataset(shared("ph2"))
    assert len(ph2.cases) == 200 and [c.name for c in ph2.classes] == ["lesion"]
    assert ph2.cases[0].mask_path.name == f"{ph2.cases[0].name}_lesion.png"
    cxr = open_image_dataset(shared("cxr"))
    assert [c.name for c in cxr.classes] == ["right lung", "left lung", "cardiomediastinum"]
    assert [c.values for c in cxr.classes] == [(1,), (2,), (3,)]
    assert all(len(cxr.pools[c.name]) >= 2 for c in cxr.classes)


@pytest.mark.parametrize(
    ("name", "structures", "rule"),
    [
        ("hippocampus", ["anterior hippocampus", "posterior hippocampus"], "axial"),
        ("acdc", ["right ventricle", "myocardium", "left ventricle"], "fewest_voxels"),
        ("brats", ["whole tumour", "tumour core"], "axial"),
    ],
)
def test_shared_3d_sets_load_with_their_structures_and_slice_axis(name: str, structures: list[str],
                                                                   rule: str) -> None:
    dataset = open_volume_dataset(shared(name))
    assert [s.name for s in dataset.structures] == structures
    assert dataset.slice_axis_rule == rule
    case = dataset.cases[0]
    volume = dataset.load_image(case, dataset.structures[-1])
    labels = dataset.load_labels(case, volume)
    assert labels.shape == volume.shape and volume.modality == "MR"
    # every set here is stored with k along the acquisition's slice axis: array axis 0
    assert dataset.slice_axis(volume) == 0
    assert dataset.structures[0].binary(labels).any()


def test_brats_structures_use_flair_and_t1c() -> None:
    dataset = open_volume_dataset(shared("brats"))
    whole, core = dataset.structures
    assert whole.modality == "flair" and core.modality == "t1c" and core.values == (1, 3, 4)
    case = dataset.cases[0]
    assert "Flair" in dataset.image_path(case, whole).name and "T1c" in dataset.image_path(case, core).name


# ------------------------------------------------------------------------------------------------------------
# dataset adapters: synthetic layouts
# ------------------------------------------------------------------------------------------------------------


def test_isic_layout_flat_grouped_and_split_file(tmp_path: Path) -> None:
    image = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    for n, group in enumerate(["1", "1", "2", "2"]):
        save_png(tmp_path / "grouped" / group / f"ISIC_000000{n}.jpg", image)
        save_png(tmp_path / "grouped" / "masks" / f"ISIC_000000{n}_segmentation.png", mask)
        save_png(tmp_path / "flat" / f"ISIC_000000{n}.jpg", image)
        save_png(tmp_path / "flat" / f"ISIC_000000{n}_segmentation.png", mask)
    grouped = open_image_dataset(tmp_path / "grouped")
    assert grouped.layout == "isic" and [c.name for c in grouped.classes] == ["group 1", "group 2"]
    assert [len(grouped.pools[c.name]) for c in grouped.classes] == [2, 2]
    flat = open_image_dataset(tmp_path / "flat")
    assert [c.name for c in flat.classes] == ["lesion"] and len(flat.cases) == 4
    (tmp_path / "flat" / "class_split.csv").write_text("image,class\nISIC_0000000,a\nISIC_0000001,a\n"
                                                       "ISIC_0000002,b\nISIC_0000003,b\n")
    split = open_image_dataset(tmp_path / "flat")
    assert [c.name for c in split.classes] == ["group a", "group b"]
    assert split.classes[0].binary(np.array([[0, 127, 128, 255]])).tolist() == [[False, False, True, True]]


def test_cxr_protocol_layout_names_images_after_masks(tmp_path: Path) -> None:
    image = np.full((8, 8), 90, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[1:7, 1:4] = 255
    save_png(tmp_path / "CXR_png" / "MCUCXR_0001_0.png", image)
    save_png(tmp_path / "masks" / "MCUCXR_0001_0.png", mask)
    save_png(tmp_path / "CXR_png" / "CHNCXR_0001_0.png", image)
    save_png(tmp_path / "masks" / "CHNCXR_0001_0_mask.png", mask)
    save_png(tmp_path / "CXR_png" / "CHNCXR_0002_1.png", image)  # an image without a mask is not in the pool
    dataset = open_image_dataset(tmp_path)
    assert dataset.layout == "cxr-lung" and [c.name for c in dataset.classes] == ["lung"]
    assert sorted(c.image_path.name for c in dataset.cases) == ["CHNCXR_0001_0.png", "MCUCXR_0001_0.png"]
    save_png(tmp_path / "masks" / "CHNCXR_0003_0_mask.png", mask)
    with pytest.raises(DatasetNotFoundError, match="CHNCXR_0003_0.png"):
        open_image_dataset(tmp_path)


def test_plain_image_mask_folder_multilabel(tmp_path: Path) -> None:
    for n in range(3):
        save_png(tmp_path / "images" / f"case{n}.png", np.full((6, 6), 50, np.uint8))
        mask = np.zeros((6, 6), np.uint8)
        mask[:2] = 1
        mask[4:] = 2 if n < 2 else 0
        save_png(tmp_path / "masks" / f"case{n}_mask.png", mask)
    dataset = open_image_dataset(tmp_path)
    assert dataset.layout == "images-masks"
    assert [c.name for c in dataset.classes] == ["label 1", "label 2"]
    assert dataset.pools == {"label 1": [0, 1, 2], "label 2": [0, 1]}
    with pytest.raises(DatasetError, match="not a supported 2D layout"):
        open_image_dataset(tmp_path / "images")


def test_msd_layout_with_dataset_json_and_4d_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for n in range(2):
        save_nifti(tmp_path / "imagesTr" / f"prostate_{n:02d}.nii.gz", rng.random((6, 5, 4, 2)).astype(np.float32),
                   (0.6, 0.6, 3.0))
        labels = np.zeros((6, 5, 4), np.uint8)
        labels[1:3, 1:3, 1:3] = 1
        labels[3:5, 2:4, 2:3] = 2
        save_nifti(tmp_path / "labelsTr" / f"prostate_{n:02d}.nii.gz", labels, (0.6, 0.6, 3.0))
    (tmp_path / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"macOS resource fork")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "PZ", "2": "TZ"},
                                                       "modality": {"0": "T2", "1": "ADC"}}))
    dataset = open_volume_dataset(tmp_path, channel=1)
    assert dataset.layout == "msd" and [s.name for s in dataset.structures] == ["PZ", "TZ"]
    assert dataset.modality == "MR" and len(dataset.cases) == 2
    volume = dataset.load_image(dataset.cases[0])
    assert volume.shape == (4, 5, 6)  # (K, J, I)
    expected = np.asarray(nib.load(tmp_path / "imagesTr" / "prostate_00.nii.gz").dataobj)[..., 1]
    np.testing.assert_allclose(volume.array, expected.transpose(2, 1, 0))
    assert dataset.slice_axis(volume) == 0  # 3 mm between slices: the through-plane axis
    assert np.unique(dataset.load_labels(dataset.cases[0], volume)).tolist() == [0, 1, 2]


def test_brats_case_folders_2021_naming(tmp_path: Path) -> None:
    for case in ("BraTS2021_00000", "BraTS2021_00002"):
        for modality in ("flair", "t1", "t1ce", "t2"):
            save_nifti(tmp_path / case / f"{case}_{modality}.nii.gz", np.zeros((4, 4, 3), np.float32))
        save_nifti(tmp_path / case / f"{case}_seg.nii.gz", np.zeros((4, 4, 3), np.uint8))
    dataset = open_volume_dataset(tmp_path)
    assert dataset.layout == "brats" and len(dataset.cases) == 2
    images = dataset.cases[0].images
    assert images["t1c"].name.endswith("_t1ce.nii.gz") and images["t1"].name.endswith("_t1.nii.gz")
    assert images["flair"].name.endswith("_flair.nii.gz") and images["t2"].name.endswith("_t2.nii.gz")
    assert dataset.cases[0].label_path.name.endswith("_seg.nii.gz")


def test_slice_axis_rules() -> None:
    anisotropic = Volume(np.zeros((10, 20, 30)), Geometry(spacing=(0.7, 0.7, 5.0)))
    assert slice_axis(anisotropic) == 0
    thin = Volume(np.zeros((64, 64, 8)))  # I has the fewest voxels, spacing isotropic
    assert slice_axis(thin) == 2 and slice_axis(thin, "fewest_voxels") == 2
    # voxel axis i runs head-foot (S): axial slicing is along array axis 2
    sagittal_stack = Volume(np.zeros((30, 30, 30)), Geometry(direction=((0, 0, 1), (0, 1, 0), (1, 0, 0))))
    assert slice_axis(sagittal_stack, "axial") == 2 and slice_axis(sagittal_stack) == 2
    with pytest.raises(ValueError, match="unknown slice-axis rule"):
        slice_axis(thin, "oblique")


# ------------------------------------------------------------------------------------------------------------
# episodes
# ------------------------------------------------------------------------------------------------------------


def test_image_episodes_follow_the_reference_protocol(tmp_path: Path) -> None:
    for n in range(5):
        save_png(tmp_path / "images" / f"c{n}.png", np.zeros((4, 4), np.uint8))
        mask = np.zeros((4, 4), np.uint8)
        mask[0, 0], mask[3, 3] = 1, 2
        save_png(tmp_path / "masks" / f"c{n}.png", mask)
    dataset = open_image_dataset(tmp_path)
    first = sample_image_episodes(dataset, 20, seed=0)
    assert first == sample_image_episodes(dataset, 20, seed=0)
    assert first != sample_image_episodes(dataset, 20, seed=1)
    assert [e.class_name for e in first[:4]] == ["label 1", "label 2", "label 1", "label 2"]
    assert all(e.target not in e.references for e in first)
    # the draws are numpy's global stream: target, then references until one differs from the target
    np.random.seed(0)
    target = int(np.random.choice(list(range(5)), 1, replace=False)[0])
    reference = int(np.random.choice(list(range(5)), 1, replace=False)[0])
    while reference == target:
        reference = int(np.random.choice(list(range(5)), 1, replace=False)[0])
    assert (first[0].target, first[0].references) == (target, (reference,))
    assert sample_image_episodes(dataset, 30, seed=0)[:20] == first


def test_case_subsets_pairs_and_labelled_slices_are_seeded() -> None:
    assert select_cases(10, None) == list(range(10))
    small, large = select_cases(100, 5, seed=3), select_cases(100, 20, seed=3)
    assert set(small) <= set(large) and small == select_cases(100, 5, seed=3)
    pairs = sample_pairs(6, 10, seed=0)
    assert pairs == sample_pairs(6, 10, seed=0) and len(set(pairs)) == 10 and all(a != b for a, b in pairs)
    subjects = ["p1", "p1", "p2", "p2", "p3"]  # two time frames of p1 and p2, one of p3
    assert len(sample_pairs(5, 50, seed=0, subjects=subjects)) == 16  # 20 ordered pairs less the 4 within p1, p2
    assert sorted(sample_pairs(5, 50, seed=0, subjects=subjects, same_subject=True)) == [(0, 1), (1, 0), (2, 3),
                                                                                           (3, 2)]
    with pytest.raises(ValueError, match="2 cases of one subject"):
        sample_pairs(3, 5, subjects=["a", "b", "c"], same_subject=True)
    mask = np.zeros((9, 4, 4), bool)
    mask[2:7, :2, :2] = True
    mask[4, :, :] = True
    assert labelled_slice(mask, 0, "largest", 0, 0, 0) == 4
    drawn = {labelled_slice(mask, 0, "random", seed, 0, 0) for seed in range(30)}
    assert drawn <= set(range(2, 7)) and len(drawn) > 1
    assert labelled_slice(mask, 0, "random", 5, 1, 1) == labelled_slice(mask, 0, "random", 5, 1, 1)


# ------------------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------------------


def test_dice_and_hd95_on_known_masks() -> None:
    square = np.zeros((40, 40), bool)
    square[10:20, 10:20] = True
    other = np.zeros_like(square)
    other[25:35, 25:35] = True
    assert dice(square, square) == pytest.approx(1.0)
    assert dice(square, other) == pytest.approx(0.0)
    shifted = np.roll(square, 3, axis=1)
    assert dice(square, shifted) == pytest.approx(2 * 70 / 200)
    # a 3-column shift at 0.5 mm x 2 mm pixels: 6 mm
    assert hd95_mm(square, shifted, (0.5, 2.0)) == (pytest.approx(6.0), False)
    cube = np.zeros((12, 12, 12), bool)
    cube[3:7, 3:7, 3:7] = True
    assert hd95_mm(np.roll(cube, 2, axis=0), cube, (2.5, 1.0, 1.0))[0] == pytest.approx(5.0)
    empty = np.zeros_like(cube)
    distance, capped = hd95_mm(empty, cube, (2.0, 1.0, 1.0))
    assert capped and distance == pytest.approx(np.sqrt(24**2 + 12**2 + 12**2))


def test_confusion_counts_pooled_iou_and_slice_metrics() -> None:
    truth = np.zeros((10, 10), bool)
    truth[:5] = True
    prediction = np.zeros_like(truth)
    prediction[3:8] = True
    counts = confusion_counts(prediction, truth)
    assert counts == {"tp": 20, "fp": 30, "tn": 20, "fn": 30}
    pooled = pooled_iou([counts, {"tp": 50, "fp": 0, "tn": 50, "fn": 0}])
    assert pooled["iou"] == pytest.approx(70 / 130) and pooled["background_iou"] == pytest.approx(70 / 130)

    volume_truth = np.zeros((10, 6, 6), bool)
    volume_truth[2:7, 1:4, 1:4] = True
    volume_pred = volume_truth.copy()
    volume_pred[0:1, 1:4, 1:4] = True  # one slice beyond the extent
    volume_pred[9, 0, 0] = True  # and another
    volume_pred[6] = False  # distance 2 from slice 4 missed on one side (slice 2 found)
    assert false_positive_slices(volume_pred, volume_truth, 0) == (2, 5)
    assert dice_by_distance(volume_pred, volume_truth, 0, 4) == {1: 1.0, 2: 0.5}


# ------------------------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------------------------


def moving_disk_volume(slices: int = 9, shift: int = 2) -> tuple[Volume, np.ndarray]:
    """A bright disk moving ``shift`` pixels right per slice, on a textured background, and its labels."""
    rng = np.random.default_rng(0)
    array = np.zeros((slices, 48, 48), np.float32)
    labels = np.zeros(array.shape, np.int16)
    for n in range(slices):
        mask = disk((48, 48), (24, 14 + shift * n), 7)
        array[n] = 0.2 + 0.6 * mask + 0.02 * rng.standard_normal((48, 48))
        labels[n] = mask
    return Volume(array, Geometry()), labels


def test_copy_baselines() -> None:
    labels = np.zeros((5, 6, 7), np.int16)
    labels[2, 1:3, 2:5] = 2
    copied = copy_labelled_slice(labels, axis=0)
    assert copied.shape == labels.shape and all((copied[n] == labels[2]).all() for n in range(5))
    along_i = copy_labelled_slice(np.moveaxis(labels, 0, 2), axis=2)
    assert (np.moveaxis(along_i, 2, 0) == copied).all()
    with pytest.raises(ValueError, match="exactly one labelled slice"):
        copy_labelled_slice(copied, axis=0)
    # copy by position: grid centres aligned, so a label at the reference's centre lands at the target's centre
    reference = Volume(np.zeros((9, 9, 9), np.float32))
    target = Volume(np.zeros((13, 11, 9), np.float32), Geometry(origin=(50.0, -20.0, 7.0)))
    centre = np.zeros((9, 9, 9), np.int16)
    centre[4, 4, 4] = 1
    moved = copy_by_position(centre, reference, target)
    assert moved.shape == (13, 11, 9) and list(zip(*np.nonzero(moved), strict=True)) == [(6, 5, 4)]
    assert copy_mask_2d(np.eye(2, dtype=np.uint8), (4, 4)).tolist() == np.kron(np.eye(2), np.ones((2, 2))).tolist()


def test_registration_chain_follows_a_moving_structure() -> None:
    volume, truth = moving_disk_volume()
    given = np.zeros_like(truth)
    given[4] = truth[4]
    with sitk_threads(1):
        registered = SliceChainRegistration().propagate(volume, given, axis=0)
    copied = copy_labelled_slice(given, 0)
    assert (registered[4] == truth[4]).all()
    assert dice(registered, truth) > 0.85 > dice(copied, truth) + 0.2
    for n in (0, 8):  # 8 pixels away from the labelled slice, the label followed the disk
        assert dice(registered[n], truth[n]) > 0.7


def test_volume_registration_recovers_a_known_shift() -> None:
    rng = np.random.default_rng(1)
    grid = np.mgrid[:24, :24, :24]
    blob = (((grid - np.array([12, 11, 12])[:, None, None, None]) ** 2).sum(0) <= 36)
    second = (((grid - np.array([8, 16, 10])[:, None, None, None]) ** 2).sum(0) <= 9)
    array = (0.2 + 0.5 * blob + 0.3 * second + 0.02 * rng.standard_normal(blob.shape)).astype(np.float32)
    labels = blob.astype(np.int16)
    reference = Volume(array, Geometry())
    target_array = np.roll(array, (2, -1, 1), axis=(0, 1, 2))
    target_labels = np.roll(labels, (2, -1, 1), axis=(0, 1, 2))
    target = Volume(target_array, Geometry(origin=(3.0, 3.0, 3.0)))  # other origin: centring matters
    with sitk_threads(1):
        warped = register_volume_labels(reference, labels, target)
    assert dice(warped, target_labels) > 0.85
    assert dice(labels, target_labels) < 0.7


# ------------------------------------------------------------------------------------------------------------
# harness: end to end, resume, reports
# ------------------------------------------------------------------------------------------------------------


def make_volume_set(root: Path, cases: int = 3) -> Path:
    """images/ + labels/ with moving-disk volumes (label 1), stored (i, j, k) as NIfTI."""
    for n in range(cases):
        volume, labels = moving_disk_volume(slices=7 + n, shift=1)
        save_nifti(root / "images" / f"case{n}.nii.gz", volume.array.transpose(2, 1, 0))
        save_nifti(root / "labels" / f"case{n}.nii.gz", labels.astype(np.uint8).transpose(2, 1, 0))
    return root


def test_slices_copy_end_to_end_on_two_hippocampus_volumes(tmp_path: Path) -> None:
    data = shared("hippocampus")
    document = run_evaluation("slices", data, tmp_path / "report", method="copy", limit_cases=2, progress=False)
    for name in ("results.json", "results.md", "dice_by_distance.png", "dice_per_structure.png", "episodes.jsonl"):
        assert (tmp_path / "report" / name).is_file(), name
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(document["summary"]))
    assert saved["config"]["method"]["method"] == "copy" and saved["machine"]["torch"]
    summary = saved["summary"]
    assert summary["episodes"] == 8  # 2 cases x 2 structures x (largest, random)
    largest = summary["overall"]["largest"]
    assert 0.1 < largest["dice"]["mean"] < 0.6 and largest["fp_slice_share"] == 1.0
    assert largest["dice_by_distance"]["1"]["mean"] > largest["dice_by_distance"]["5"]["mean"]
    assert "| anterior hippocampus | largest | 2 |" in (tmp_path / "report" / "results.md").read_text()


def record_copy_propagations(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """The label maps CopyMethod.propagate is given from now on (one per run), appended to the returned list."""
    calls: list[np.ndarray] = []
    original = CopyMethod.propagate

    def counting(self: CopyMethod, volume, labels, axis, cache_key=None):  # noqa: ANN001, ANN202
        calls.append(np.asarray(labels))
        return original(self, volume, labels, axis, cache_key)

    monkeypatch.setattr(CopyMethod, "propagate", counting)
    return calls


def test_each_largest_kind_draws_every_structure_on_its_own_slice_in_one_run(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data = shared("hippocampus")
    calls = record_copy_propagations(monkeypatch)
    document = run_evaluation("slices", data, tmp_path / "report", method="copy", limit_cases=2,
                              kinds=["each_largest"], progress=False)
    summary = document["summary"]
    assert summary["episodes"] == 4 and len(calls) == 2  # one run per volume, scored per structure
    for given in calls:
        assert sorted(int(v) for v in np.unique(given)) == [0, 1, 2]
        slices = {v: np.flatnonzero(np.any(given == v, axis=(1, 2))).tolist() for v in (1, 2)}
        assert len(slices[1]) == 1 and len(slices[2]) == 1 and slices[1] != slices[2]
    records = [json.loads(line) for line in (tmp_path / "report" / "episodes.jsonl").read_text().splitlines()]
    assert {r["result"]["kind"] for r in records if "result" in r} == {"each_largest"}
    assert 0.1 < summary["overall"]["each_largest"]["dice"]["mean"] < 0.6
    with pytest.raises(ValueError, match="overlaps another"):  # BraTS: the tumour core lies inside the whole tumour
        run_evaluation("slices", shared("brats"), tmp_path / "brats", method="copy", limit_cases=1,
                       kinds=["each_largest"], progress=False)


def test_union_largest_kind_draws_every_structure_on_the_slice_of_largest_union(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = shared("hippocampus")
    calls = record_copy_propagations(monkeypatch)
    document = run_evaluation("slices", data, tmp_path / "report", method="copy", limit_cases=2,
                              kinds=["union_largest", "each_largest"], progress=False)
    assert document["summary"]["episodes"] == 8 and len(calls) == 4  # one run per volume and kind
    records = [json.loads(line)["result"] for line in (tmp_path / "report" / "episodes.jsonl").read_text().splitlines()
               if "result" in json.loads(line)]
    dataset = open_volume_dataset(data)
    for case in dataset.cases[:2]:
        volume = dataset.load_image(case)
        labels = dataset.load_labels(case, volume)
        axis = dataset.slice_axis(volume)
        other = tuple(a for a in range(3) if a != axis)
        union = int(np.argmax(np.count_nonzero(labels, axis=other)))
        given = next(g for g in calls if np.any(np.moveaxis(g, axis, 0)[union]) and
                     np.count_nonzero(np.any(g != 0, axis=other)) == 1)
        expected = np.zeros_like(given)  # both parts exactly as in the data (the hippocampus labels are 1 and 2)
        expected[tuple(union if a == axis else slice(None) for a in range(3))] = labels.take(union, axis=axis)
        np.testing.assert_array_equal(given, expected)
        mine = [r for r in records if r["case"] == case.name and r["kind"] == "union_largest"]
        assert len(mine) == 2 and {r["slice"] for r in mine} == {union}
        own = {r["structure"]: r["slice"] for r in records if r["case"] == case.name and r["kind"] == "each_largest"}
        assert set(own.values()) != {union}  # the parts' own largest slices are not the union's
    with pytest.raises(ValueError, match="overlaps another"):
        run_evaluation("slices", shared("brats"), tmp_path / "brats", method="copy", limit_cases=1,
                       kinds=["union_largest"], progress=False)


def test_spaced_slices_spread_over_the_extent() -> None:
    mask = np.zeros((20, 4, 4), bool)
    mask[4:16] = True  # extent 4..15: three parts of 4 slices, centres 5.5, 9.5, 13.5
    assert spaced_slices(mask, 0, 3) == [5, 9, 13]
    assert spaced_slices(mask, 0, 2) == [6, 12] and spaced_slices(mask, 0, 1) == [9]
    mask[9:11] = False  # a gap: the nearest slice holding the structure
    assert spaced_slices(mask, 0, 3) == [5, 8, 13]
    assert spaced_slices(np.moveaxis(mask, 0, 2), 2, 3) == [5, 8, 13]
    short = np.zeros((20, 4, 4), bool)
    short[4:6] = True
    assert spaced_slices(short, 0, 3) == [4, 5]  # no more slices than the extent holds
    with pytest.raises(ValueError, match="absent"):
        spaced_slices(np.zeros((5, 4, 4), bool), 0, 2)


def test_a_structure_drawn_on_several_slices_serves_the_nearer_slices_in_the_baselines() -> None:
    labels = np.zeros((10, 8, 8), np.int16)
    labels[2, 1:3, 1:3] = 1  # drawn on slices 2 and 8, another shape on each
    labels[8, 4:7, 4:7] = 1
    copied = CopyMethod().propagate(Volume(np.zeros(labels.shape, np.float32)), labels, axis=0)
    for n in range(10):  # slice 5 lies 3 from both: the lower one serves it
        np.testing.assert_array_equal(copied[n], labels[2] if n <= 5 else labels[8], err_msg=f"slice {n}")
    truth = np.zeros((10, 8, 8), bool)
    truth[1:10, 1:3, 1:3] = True
    by_distance = dice_by_distance(copied > 0, truth, 0, [2, 8])
    assert sorted(by_distance) == [1, 2, 3] and by_distance[3] == 1.0  # slice 5, from slice 2
    assert by_distance[1] == pytest.approx(np.mean([1.0, 1.0, 0.0, 0.0]))  # slices 1, 3 right; 7, 9 wrong


def test_interpolation_between_labelled_slices() -> None:
    labels = np.zeros((9, 21, 21), np.int16)
    labels[2][disk((21, 21), (10, 10), 3)] = 1  # radius 3 on slice 2, radius 7 on slice 6
    labels[6][disk((21, 21), (10, 10), 7)] = 1
    labels[4, 0:2, 0:2] = 2  # another structure, drawn on slice 4 only: kept as drawn
    output = InterpolationMethod().propagate(Volume(np.zeros(labels.shape, np.float32)), labels, axis=0)
    np.testing.assert_array_equal(output[[2, 6]], labels[[2, 6]])
    assert not output[[0, 1, 7, 8]].any()  # nothing beyond the first and last labelled slice
    areas = [int(np.count_nonzero(output[n] == 1)) for n in range(2, 7)]
    assert areas == sorted(areas) and areas[0] < areas[2] < areas[4]  # grows from radius 3 to 7
    middle = np.zeros((21, 21), bool)
    middle[disk((21, 21), (10, 10), 5)] = True
    assert dice(output[4] == 1, middle) > 0.9  # halfway: about radius 5
    assert (output[4, 0:2, 0:2] == 2).all()
    scaled = interpolate_between_slices(labels, 0, (1.0, 2.0))  # anisotropic pixels: distances in mm
    assert scaled.shape == labels.shape and (scaled[2] == labels[2]).all()
    with pytest.raises(ValueError, match="several labelled slices"):
        InterpolationMethod().segment_image([], np.zeros((4, 4, 3)))


def test_spaced_kind_labels_several_slices_of_one_structure(tmp_path: Path) -> None:
    data = make_volume_set(tmp_path / "data", cases=2)
    document = run_evaluation("slices", data, tmp_path / "report", method="copy", kinds=["spaced3", "largest"],
                              progress=False)
    records = [json.loads(line)["result"] for line in (tmp_path / "report" / "episodes.jsonl").read_text().splitlines()]
    spaced = [r for r in records if r["kind"] == "spaced3"]
    assert len(spaced) == 2 and all(len(r["slice"]) == 3 for r in spaced)
    summary = document["summary"]["overall"]
    assert summary["spaced3"]["dice"]["mean"] > summary["largest"]["dice"]["mean"]  # the disk moves: more slices help
    assert all(r["dice_unlabelled"] < r["dice"] for r in spaced)
    interpolated = run_evaluation("slices", data, tmp_path / "interpolation", method="interpolation",
                                  kinds=["spaced3"], progress=False)["summary"]["overall"]["spaced3"]
    assert 0.6 < interpolated["dice"]["mean"] < 1.0  # the slices beyond the first and last labelled one stay empty
    with pytest.raises(ValueError, match="unknown slice kinds"):
        run_evaluation("slices", data, tmp_path / "other", method="copy", kinds=["spaced1"], progress=False)


def test_transfer_each_largest_reference_draws_every_structure_on_its_own_largest_slice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = shared("hippocampus")
    given_labels: list[tuple[np.ndarray, np.ndarray]] = []
    original = CopyMethod.transfer

    def recording(self: CopyMethod, reference, reference_labels, target, axis, same_subject=False):  # noqa: ANN001, ANN202
        given_labels.append(np.asarray(reference_labels))
        return original(self, reference, reference_labels, target, axis)

    monkeypatch.setattr(CopyMethod, "transfer", recording)
    document = run_evaluation("transfer", data, tmp_path / "report", method="copy", episodes=2,
                              reference_mode="each_largest", progress=False)
    assert document["config"]["task_options"]["reference_mode"] == "each_largest"
    records = [json.loads(line)["result"] for line in (tmp_path / "report" / "episodes.jsonl").read_text().splitlines()]
    assert len(given_labels) == len(records) == 2
    from insid3_med.imaging.readers import read_label_volume, read_volume

    for given, record in zip(given_labels, records, strict=True):
        volume = read_volume(data / "images" / f"{record['reference']}.nii.gz")
        full = read_label_volume(data / "labels" / f"{record['reference']}.nii.gz", volume)
        assert set(record["slices"]) == {"anterior hippocampus", "posterior hippocampus"}
        for value, name in ((1, "anterior hippocampus"), (2, "posterior hippocampus")):
            drawn = np.flatnonzero(np.any(given == value, axis=(1, 2))).tolist()
            largest = int(np.argmax(np.count_nonzero(full == value, axis=(1, 2))))
            assert drawn == [record["slices"][name]] == [largest]
            np.testing.assert_array_equal(given[largest] == value, full[largest] == value)
    # the registration baseline chains each structure from where its slice lands (measured on this first pair:
    # anterior 0.243, posterior 0.427; carrying the two sparse slices as they were gave two sheets)
    registration = run_evaluation("transfer", data, tmp_path / "registration", method="registration", episodes=1,
                                  reference_mode="each_largest", progress=False)
    scores = registration["summary"]["structures"]
    assert scores["anterior hippocampus"]["dice"]["mean"] > 0.2
    assert scores["posterior hippocampus"]["dice"]["mean"] > 0.35
    with pytest.raises(ValueError, match="overlaps another"):  # the tumour core lies inside the whole tumour
        run_evaluation("transfer", shared("brats"), tmp_path / "brats", method="copy", episodes=1,
                       reference_mode="each_largest", progress=False)


def test_transfer_between_the_time_frames_of_each_subject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pairing="frames": every ordered pair of ACDC's end-diastole and end-systole of one patient (30 of 15
    patients), recorded in the configuration, each target given to the method as the same subject's; the copy
    baseline scores each as the two expert label maps' overlap."""
    data = shared("acdc")
    calls: list[bool] = []
    copy_transfer = CopyMethod.transfer

    def recorded(self: CopyMethod, reference: Volume, labels: np.ndarray, target: Volume, axis: int,
                 same_subject: bool = False) -> np.ndarray:
        calls.append(same_subject)
        return copy_transfer(self, reference, labels, target, axis)

    monkeypatch.setattr(CopyMethod, "transfer", recorded)
    document = run_evaluation("transfer", data, tmp_path / "frames", method="copy", pairing="frames",
                              progress=False)
    assert calls == [True] * 30
    assert document["config"]["task_options"]["pairing"] == "frames"
    records = [json.loads(line)["result"] for line in (tmp_path / "frames" / "episodes.jsonl").read_text().splitlines()]
    assert len(records) == 30
    patients = {r["reference"][:10] for r in records}
    assert len(patients) == 15 and {(r["reference"], r["target"]) for r in records} == {
        (f"{p}_frame0{a}", f"{p}_frame0{b}") for p in patients for a, b in ((1, 2), (2, 1))}
    first = records[0]
    reference, target = (np.asarray(nib.load(data / "labels" / f"{first[key]}.nii.gz").dataobj)
                         for key in ("reference", "target"))
    left_ventricle = 2 * np.sum((reference == 3) & (target == 3)) / (np.sum(reference == 3) + np.sum(target == 3))
    assert first["structures"]["left ventricle"]["dice"] == pytest.approx(left_ventricle)
    assert "pairing" not in run_evaluation("transfer", data, tmp_path / "subjects", method="copy", episodes=1,
                                           progress=False)["config"]["task_options"]  # the default: earlier key
    assert calls[30:] == [False]
    with pytest.raises(ValueError, match="2 cases of one subject"):
        run_evaluation("transfer", shared("hippocampus"), tmp_path / "hippocampus", method="copy", pairing="frames",
                       progress=False)


def test_baselines_take_each_structure_from_its_own_slice() -> None:
    labels = np.zeros((6, 5, 5), np.int16)
    labels[1, 0:2, 0:2] = 1
    labels[4, 1:3, 1:3] = 2
    copied = CopyMethod().propagate(Volume(np.zeros((6, 5, 5), np.float32)), labels, axis=0)
    # each structure copied to every slice; where the two copies meet (1, 1), the nearer drawn slice wins
    assert (copied[0:3, 1, 1] == 1).all() and (copied[3:6, 1, 1] == 2).all()
    assert (copied[:, 0, 0] == 1).all() and (copied[:, 2, 2] == 2).all()
    labels[5, 4, 4] = 2  # structure 2 on two slices too: slice 5 serves itself, slice 4 the slices below it
    copied = CopyMethod().propagate(Volume(np.zeros((6, 5, 5), np.float32)), labels, axis=0)
    assert (copied[3:5, 2, 2] == 2).all() and copied[5, 2, 2] == 0 and copied[5, 4, 4] == 2
    assert (copied[:5, 4, 4] == 0).all() and (copied[:, 0, 0] == 1).all()


def test_transfer_baselines_take_each_structure_from_its_own_slice() -> None:
    # A reference with each structure on its own slice: each is transferred alone (its slice copied through the
    # target) and, where two meet, the structure whose slice landed nearer wins, as in the slices task. Before, the
    # two sparse slices were carried as they were, leaving every other target slice empty.
    labels = np.zeros((6, 5, 5), np.int16)
    labels[1, 0:2, 0:2] = 1
    labels[4, 1:3, 1:3] = 2
    reference = Volume(np.zeros((6, 5, 5), np.float32))
    target = Volume(np.zeros((8, 5, 5), np.float32))  # one slice more on each side: centred, slice n -> n + 1
    copied = CopyMethod().transfer(reference, labels, target, axis=0)
    assert copied.shape == (8, 5, 5)
    assert (copied[1:7, 0, 0] == 1).all() and (copied[1:7, 2, 2] == 2).all()
    assert (copied[1:4, 1, 1] == 1).all() and (copied[4:7, 1, 1] == 2).all()  # slices 2 and 5 are the drawn ones
    whole = labels.copy()
    whole[2, 0:2, 0:2] = 1  # structure 1 on two slices: a labelled volume, carried as it is
    carried = CopyMethod().transfer(reference, whole, target, axis=0)
    assert sorted(np.flatnonzero(carried.any(axis=(1, 2))).tolist()) == [2, 3, 5]


class Interrupted(Exception):
    """Stands for Ctrl-C (pytest treats a real KeyboardInterrupt as the end of the session)."""


def test_resume_skips_finished_episodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_volume_set(tmp_path / "data", cases=3)
    report = tmp_path / "report"
    calls: list[str] = []
    interrupt_at = [3]
    original = SliceTask.run

    def counting_run(self: SliceTask, episode, method):  # noqa: ANN001
        calls.append(episode.episode_id)
        if len(calls) == interrupt_at[0]:
            raise Interrupted  # an interruption after two finished episodes
        return original(self, episode, method)

    monkeypatch.setattr(SliceTask, "run", counting_run)
    with pytest.raises(Interrupted):
        run_evaluation("slices", data, report, method="copy", episodes=2, progress=False)
    interrupt_at[0] = 0
    assert len((report / "episodes.jsonl").read_text().splitlines()) == 2 and not (report / "results.json").exists()
    calls.clear()
    first = run_evaluation("slices", data, report, method="copy", episodes=2, progress=False)
    assert len(calls) == 2 and first["summary"]["episodes"] == 4
    calls.clear()
    again = run_evaluation("slices", data, report, method="copy", episodes=3, progress=False)
    assert len(calls) == 2 and again["summary"]["episodes"] == 6  # only the new case's two episodes ran
    with pytest.raises(ReportExistsError, match="another configuration"):
        run_evaluation("slices", data, report, method="copy", episodes=3, kinds=["largest"], progress=False)
    # A forced rerun that is interrupted loses nothing: the earlier report and its episodes stay as they were.
    before = {name: (report / name).read_bytes() for name in ("results.json", "results.md", "episodes.jsonl")}
    calls.clear()
    interrupt_at[0] = 2
    with pytest.raises(Interrupted):
        run_evaluation("slices", data, report, method="copy", episodes=3, kinds=["largest"], overwrite=True,
                       progress=False)
    interrupt_at[0] = 0
    assert (report / "results.json").read_bytes() == before["results.json"]
    assert (report / "results.md").read_bytes() == before["results.md"]
    assert (report / "episodes.jsonl").read_bytes().startswith(before["episodes.jsonl"])  # one new line after them
    calls.clear()
    replaced = run_evaluation("slices", data, report, method="copy", episodes=3, kinds=["largest"],
                              overwrite=True, progress=False)
    assert len(calls) == 2 and replaced["summary"]["episodes"] == 3  # the episode finished before is kept
    records = [json.loads(line) for line in (report / "episodes.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {r["config"] for r in records} == {replaced["config"]["config_hash"]}
    assert json.loads((report / "results.json").read_text())["summary"]["episodes"] == 3
    calls.clear()
    restarted = run_evaluation("slices", data, report, method="copy", episodes=3, kinds=["largest"], resume=False,
                               overwrite=True, progress=False)
    assert len(calls) == 3 and restarted["summary"]["episodes"] == 3
    assert len((report / "episodes.jsonl").read_text().splitlines()) == 3
    assert restarted["config"]["code"] == code_fingerprint() and len(code_fingerprint()) == 16
    with monkeypatch.context() as patch:  # the same command after a change of the package's code: nothing reused
        patch.setattr("insid3_med.evaluation.run.code_fingerprint", lambda: "changed code")
        with pytest.raises(ReportExistsError, match="another configuration"):
            run_evaluation("slices", data, report, method="copy", episodes=3, kinds=["largest"], progress=False)
        calls.clear()
        rerun = run_evaluation("slices", data, report, method="copy", episodes=3, kinds=["largest"],
                               overwrite=True, progress=False)
        assert len(calls) == 3 and rerun["config"]["code"] == "changed code"


def test_images_task_pools_iou_over_episodes(tmp_path: Path) -> None:
    for n in range(4):
        save_png(tmp_path / "data" / "images" / f"c{n}.png", np.full((20, 20, 3), 40 * n, np.uint8))
        mask = np.zeros((20, 20), np.uint8)
        mask[2 + n : 10 + n, 4:12] = 255
        save_png(tmp_path / "data" / "masks" / f"c{n}.png", mask)
    document = run_evaluation("images", tmp_path / "data", tmp_path / "report", method="copy", episodes=6,
                              image_size=20, progress=False)
    records = [json.loads(line)["result"] for line in (tmp_path / "report" / "episodes.jsonl").read_text().split("\n")
               if line]
    tp = sum(r["tp"] for r in records)
    union = sum(r["tp"] + r["fp"] + r["fn"] for r in records)
    summary = document["summary"]
    assert summary["episodes"] == 6 and summary["miou"] == pytest.approx(100 * tp / union)
    assert 0 < summary["miou"] < 100 and summary["fbiou"] > summary["miou"]
    assert (tmp_path / "report" / "dice_histogram.png").is_file()
    assert ImageClass("foreground").binary(np.array([255])).all()
    two_shots = run_evaluation("images", tmp_path / "data", tmp_path / "two", method="copy", episodes=4, shots=2,
                               image_size=20, progress=False)
    record = json.loads((tmp_path / "two" / "episodes.jsonl").read_text().split("\n")[0])["result"]
    assert len(record["references"]) == 2 and record["target"] not in record["references"]
    assert two_shots["config"]["task_options"]["shots"] == 2


def test_transfer_and_comparison_table(tmp_path: Path) -> None:
    data = make_volume_set(tmp_path / "data", cases=3)
    copy = run_evaluation("transfer", data, tmp_path / "copy", method="copy", episodes=2, progress=False)
    registration = run_evaluation("transfer", data, tmp_path / "registration", method="registration", episodes=2,
                                  progress=False)
    assert copy["summary"]["episodes"] == 2 and registration["summary"]["structures"]["label 1"]["episodes"] == 2
    assert registration["config"]["method"]["registration"]["demons_iterations"] > 0
    table = compare_reports([tmp_path / "copy", tmp_path / "registration" / "results.json"], tmp_path / "cmp")
    assert "| transfer | data | label 1 | Dice (volume) |" in table and "copy | registration |" in table
    assert (tmp_path / "cmp" / "comparison.png").is_file() and (tmp_path / "cmp" / "comparison.md").is_file()


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="data folder not found"):
        run_evaluation("slices", tmp_path / "nowhere", tmp_path / "report", method="copy")
    with pytest.raises(ValueError, match="unknown task"):
        run_evaluation("movies", tmp_path, tmp_path / "report", method="copy")
    with pytest.raises(ValueError, match="unknown method"):
        run_evaluation("slices", tmp_path, tmp_path / "report", method="magic")
    with pytest.raises(ValueError, match="unknown propagation mode"):
        run_evaluation("slices", tmp_path, tmp_path / "report", method="ours", mode="sideways")
    from insid3_med.propagation import PropagationParams

    with pytest.raises(ValueError, match="volume mode only"):  # before any data or weights are read
        run_evaluation("slices", tmp_path / "nowhere", tmp_path / "report", method="ours", mode="published",
                       propagation=PropagationParams(top_k=3))
    assert not (tmp_path / "report").exists()


def test_reports_are_written_whole_with_the_umask_permissions(tmp_path: Path) -> None:
    from insid3_med.evaluation.report import write_text

    umask = os.umask(0o022)
    try:
        path = tmp_path / "results.json"
        write_text(path, "{}\n")
        write_text(path, '{"replaced": true}\n')  # replacing is allowed: reports are rewritten as episodes finish
    finally:
        os.umask(umask)
    # readable by others as any new file (a temporary file's private 0600 mode used to stay on the report)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == '{"replaced": true}\n' and [p.name for p in tmp_path.iterdir()] == ["results.json"]
