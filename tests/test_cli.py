"""The insid3-med command line end to end: real volumes, a generated DICOM series, every output format, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import dice_of
from PIL import Image

from insid3_med.cli import main
from insid3_med.imaging.errors import ImageReadError
from insid3_med.imaging.readers import read_label_names, read_label_volume, read_volume
from insid3_med.imaging.writers import write_nifti_labels

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / ".." / "shared" / "weights" / "dinov2-small-standin"
pytestmark = pytest.mark.skipif(not STANDIN.is_dir(), reason=f"stand-in weights not found at {STANDIN}")
FAST = ["--weights", str(STANDIN), "--image-size", "224", "--progress", "none"]


def one_slice_labels(labels_path: Path, out: Path, axis: int = 0) -> tuple[Path, int]:
    """Keep only the slice (along array ``axis``) with the largest labelled area; returns (path, slice index)."""
    volume = read_volume(labels_path)
    labels = read_label_volume(labels_path, volume)
    other = tuple(a for a in range(3) if a != axis)
    best = int(np.argmax((labels > 0).sum(axis=other)))
    kept = np.zeros_like(labels)
    selection = [slice(None)] * 3
    selection[axis] = best
    kept[tuple(selection)] = labels[tuple(selection)]
    write_nifti_labels(kept, volume, out)
    return out, best


@pytest.fixture(scope="module")
def hippocampus(data_file: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hippo")
    labels, best = one_slice_labels(data_file("hippocampus/labels/hippocampus_007.nii.gz"), folder / "one.nii.gz")
    return {"image": data_file("hippocampus/images/hippocampus_007.nii.gz"), "one": labels,
            "full": data_file("hippocampus/labels/hippocampus_007.nii.gz"), "best": Path(str(best)),
            "other": data_file("hippocampus/images/hippocampus_017.nii.gz"),
            "third": data_file("hippocampus/images/hippocampus_019.nii.gz")}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_propagate_writes_every_format_on_the_input_grid(hippocampus: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.nii.gz"
    code, stdout, stderr = run_cli(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o", str(out),
                                    "--seg-nrrd", str(tmp_path / "out.seg.nrrd"), "--overlay",
                                    str(tmp_path / "out.png"), "--summary", str(tmp_path / "out.json"), *FAST],
                                   capsys)
    assert code == 0, stderr
    source = nib.load(hippocampus["image"])
    written = nib.load(out)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert written.get_data_dtype() == np.uint8 and written.header.get_intent()[0] == "label"
    labels = np.asarray(written.dataobj)
    reference = np.asarray(nib.load(hippocampus["one"]).dataobj)
    best = int(hippocampus["best"].name)
    assert np.array_equal(labels[..., best], reference[..., best])  # the labelled slice is kept as given
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels > 0).sum() > (reference > 0).sum()
    truth = np.asarray(nib.load(hippocampus["full"]).dataobj) > 0
    dice = 2 * np.sum((labels > 0) & truth) / (np.sum(labels > 0) + np.sum(truth))
    assert dice > 0.3, dice
    import slicerio

    segmentation = slicerio.read_segmentation(str(tmp_path / "out.seg.nrrd"))
    assert {segment["labelValue"] for segment in segmentation["segments"]} == {1, 2}
    assert Image.open(tmp_path / "out.png").size[0] > 100
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["labelled_slices"] == [best] and summary["model"]["backbone"] == "dinov2_vits14_standin"
    # what was propagated from, said on stdout too: the labelled slice, its plane and the array axis
    assert f"from {summary['slice_plane']} slice(s) {best} (array axis k); wrote {out}" in stdout, stdout
    assert summary["model"]["weights_sha256"].startswith("8b38fc0f")
    assert summary["labels"]["1"]["volume_ml"] > 0 and "propagate" in summary["timings_s"]
    assert summary["propagation"]["mode"] == "volume"
    import torch

    import insid3_med
    from insid3_med.backbones import bf16_pays_on_cpu

    assert summary["software"] == {**summary["software"], "insid3_med": insid3_med.__version__,
                                   "torch": torch.__version__}

    assert summary["model"]["precision"] == ("bf16" if bf16_pays_on_cpu() else "fp32")  # --precision auto


def test_propagate_published_mode_segments_every_slice(hippocampus: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "published.nii.gz"
    code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o", str(out),
                               "--mode", "published", "--summary", str(tmp_path / "s.json"), *FAST], capsys)
    assert code == 0, stderr
    published = json.loads((tmp_path / "s.json").read_text())
    assert published["propagation"] == {"mode": "published"} and published["model"]["precision"] == "fp32"
    labels = np.asarray(nib.load(out).dataobj)
    assert (labels > 0).sum() > (np.asarray(nib.load(hippocampus["one"]).dataobj) > 0).sum()
    with pytest.raises(SystemExit) as exited:
        main(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o", str(tmp_path / "x.nii.gz"),
              "--mode", "chained", *FAST])
    assert exited.value.code == 2 and "--mode" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_propagate_set_changes_a_volume_mode_setting_and_records_it(hippocampus: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "strict.nii.gz"
    code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o", str(out),
                               "--set", "stop_ratio=0.99", "--set", "stop_confidence=none",
                               "--summary", str(tmp_path / "s.json"), *FAST], capsys)
    assert code == 0, stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["propagation"]["stop_ratio"] == 0.99 and summary["propagation"]["stop_confidence"] is None
    default = tmp_path / "default.nii.gz"
    assert run_cli(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o", str(default), *FAST],
                   capsys)[0] == 0
    # a structure ends where its area falls below 99% of its labelled area: a few slices from the labelled one
    # instead of at the hippocampus's ends
    # labelled slices along k, the last axis of nibabel's (I, J, K) arrays
    strict, loose = (np.count_nonzero(np.asarray(nib.load(path).dataobj).any(axis=(0, 1))) for path in (out, default))
    assert strict < loose, (strict, loose)
    for bad, message in ((["--set", "stop_ratio=high"], "stop_ratio='high': expected float"),
                         (["--set", "stop_ratio=0.5", "--mode", "published"], "volume mode only")):
        target = tmp_path / "bad.nii.gz"
        code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o",
                                   str(target), *bad, *FAST], capsys)
        assert code == 2 and message in stderr and not target.exists()


def test_propagate_dicom_series_writes_dicom_seg(ct_series, data_file: Callable[[str], Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import highdicom

    volume = read_volume(ct_series.folder)
    truth = np.asarray(nib.load(data_file("hippocampus/labels/hippocampus_007.nii.gz")).dataobj).transpose(2, 1, 0)
    one = np.zeros_like(truth)
    one[20] = truth[20]
    write_nifti_labels(one, volume, tmp_path / "one.nii.gz")
    out = tmp_path / "ct_seg.nii.gz"
    code, _, stderr = run_cli(["propagate", str(ct_series.folder), str(tmp_path / "one.nii.gz"), "-o", str(out),
                               "--dicom-seg", str(tmp_path / "seg.dcm"), "--slices", "15:25", *FAST], capsys)
    assert code == 0, stderr
    labels = read_label_volume(out, volume)
    assert labels[:15].max() == 0 and labels[25:].max() == 0 and labels[15:25].max() > 0
    seg = highdicom.seg.segread(tmp_path / "seg.dcm")
    referenced = {item.ReferencedSeriesSequence[0].SeriesInstanceUID for item in [seg]}
    assert ct_series.series_uid in referenced
    assert seg.number_of_segments == 2


def test_a_series_of_a_folder_of_several_is_picked_by_number_or_by_one_of_its_files(
        two_series_folder, data_file: Callable[[str], Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A study folder holding two series: refused without a choice, saying how to choose; ``--series 3`` and one
    file of series 3 give the same result; a transfer target given as one file is named by folder and series."""
    folder, series = two_series_folder
    ct = series[3]
    truth = np.asarray(nib.load(data_file("hippocampus/labels/hippocampus_007.nii.gz")).dataobj).transpose(2, 1, 0)
    one = np.zeros_like(truth)
    one[20] = truth[20]
    labels = write_nifti_labels(one, ct.expected, tmp_path / "one.nii.gz")
    code, _, stderr = run_cli(["propagate", str(folder), str(labels), "-o", str(tmp_path / "x.nii.gz"), *FAST],
                              capsys)
    assert code == 2 and "2 DICOM series" in stderr and "give one of its files" in stderr, stderr
    assert "--series NUMBER" in stderr and ct.series_uid in stderr
    by_number, by_file = tmp_path / "by_number.nii.gz", tmp_path / "by_file.nii.gz"
    for study, out, extra in ((folder, by_number, ["--series", "3"]), (ct.files[5], by_file, [])):
        code, _, stderr = run_cli(["propagate", str(study), str(labels), "-o", str(out), "--slices", "17:23", *extra,
                                   *FAST], capsys)
        assert code == 0, stderr
    result = read_label_volume(by_file, ct.expected)
    np.testing.assert_array_equal(result, read_label_volume(by_number, ct.expected))
    assert result[17:23].any(axis=(1, 2)).all() and not result[:17].any() and not result[23:].any()
    out_dir = tmp_path / "transfer"
    out_dir.mkdir()
    # the folder of two series as a transfer target: refused before any work, with the ways to choose
    code, _, stderr = run_cli(["transfer", str(ct.files[0]), str(labels), str(ct.files[3]), str(folder), "-o",
                               str(out_dir), *FAST, "--weights", str(tmp_path / "no_weights_needed_yet")], capsys)
    assert code == 2 and "2 DICOM series" in stderr and "give one of its files" in stderr, stderr
    assert list(out_dir.iterdir()) == []
    code, _, stderr = run_cli(["transfer", str(ct.files[0]), str(labels), str(ct.files[3]), "-o", str(out_dir),
                               "--dicom-seg", *FAST, "--mode", "published"], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{folder.name}_series3_seg.dcm",
                                                         f"{folder.name}_series3_seg.nii.gz"]
    seg = pydicom.dcmread(out_dir / f"{folder.name}_series3_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(ct.files)


def test_study_stems_name_outputs_after_the_study(two_series_folder, tmp_path: Path) -> None:
    """A series given by one of its files is named by folder and series number; a multi-frame file, a volume file
    and a series folder by their own names."""
    from pydicom.dataset import FileMetaDataset

    from insid3_med.jobs import study_stem

    folder, series = two_series_folder
    assert study_stem(series[7].files[2]) == f"{folder.name}_series7"
    assert study_stem(folder) == folder.name
    assert study_stem(tmp_path / "case_01.nii.gz") == "case_01"
    multiframe = pydicom.Dataset()
    multiframe.file_meta = FileMetaDataset()
    multiframe.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    multiframe.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    multiframe.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    multiframe.SeriesNumber, multiframe.NumberOfFrames = 30, 40
    multiframe.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    assert study_stem(tmp_path / "enhanced.dcm") == "enhanced"


def test_propagate_reads_a_dicom_seg_as_the_labelled_slice(ct_series, data_file: Callable[[str], Path],
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The label map may be a DICOM SEG of the series (as a PACS viewer such as OHIF saves one)."""
    from insid3_med.imaging.writers import write_dicom_seg

    volume = read_volume(ct_series.folder)
    truth = np.asarray(nib.load(data_file("hippocampus/labels/hippocampus_007.nii.gz")).dataobj).transpose(2, 1, 0)
    one = np.zeros_like(truth)
    one[20] = truth[20]
    seg = write_dicom_seg(one, volume, tmp_path / "slice20_seg.dcm", {1: "anterior", 2: "posterior"})
    out = tmp_path / "from_seg.nii.gz"
    code, _, stderr = run_cli(["propagate", str(ct_series.folder), str(seg), "-o", str(out), "--slices", "15:25",
                               "--seg-nrrd", str(tmp_path / "from_seg.seg.nrrd"), "--dicom-seg",
                               str(tmp_path / "from_seg.dcm"), *FAST], capsys)
    assert code == 0, stderr
    labels = read_label_volume(out, volume)
    np.testing.assert_array_equal(labels[20], one[20])
    assert labels[:15].max() == 0 and labels[25:].max() == 0
    assert all(labels[k].max() > 0 for k in (18, 19, 21, 22))
    # The segment names travel from the input to the outputs
    names = {1: "anterior", 2: "posterior"}
    assert read_label_names(tmp_path / "from_seg.seg.nrrd") == names
    assert read_label_names(tmp_path / "from_seg.dcm") == names
    np.testing.assert_array_equal(read_label_volume(tmp_path / "from_seg.dcm", volume), labels)


def test_a_slice_drawn_in_another_view_propagates_across_that_view(hippocampus: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # one sagittal slice labelled (array axis i; nibabel's first axis): the default axis (auto) slices across it
    sagittal, index = one_slice_labels(hippocampus["full"], tmp_path / "sagittal.nii.gz", axis=2)
    truth = np.asarray(nib.load(hippocampus["full"]).dataobj)
    out, summary = tmp_path / "auto.nii.gz", tmp_path / "auto.json"
    code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(sagittal), "-o", str(out),
                               "--summary", str(summary), *FAST], capsys)
    assert code == 0 and "warning" not in stderr, stderr
    record = json.loads(summary.read_text())
    assert record["axis"] == 2 and record["labelled_slices"] == [index] and record["warnings"] == []
    result = np.asarray(nib.load(out).dataobj)
    dice = 2 * np.count_nonzero((result > 0) & (truth > 0)) / (np.count_nonzero(result) + np.count_nonzero(truth))
    assert np.count_nonzero(result.any(axis=(1, 2))) > 5 and dice > 0.6, dice  # propagated across sagittal slices
    # the axis given as k: every axial slice holds a line of the drawn slice, kept as drawn; the user is told
    strict = tmp_path / "k.nii.gz"
    code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(sagittal), "-o", str(strict), "--axis", "k",
                               "--summary", str(tmp_path / "k.json"), *FAST], capsys)
    assert code == 0 and "insid3-med: warning:" in stderr and "across axis i (sagittal)" in stderr, stderr
    assert json.loads((tmp_path / "k.json").read_text())["warnings"] == [stderr.split("warning: ", 1)[1].strip()]


def test_transfer_writes_one_output_per_target(hippocampus: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run_cli(["transfer", str(hippocampus["image"]), str(hippocampus["one"]),
                                    str(hippocampus["other"]), str(hippocampus["third"]), "-o", str(tmp_path),
                                    "--seg-nrrd", "--summary", *FAST], capsys)
    assert code == 0, stderr
    for stem in ("hippocampus_017", "hippocampus_019"):
        written = nib.load(tmp_path / f"{stem}_seg.nii.gz")
        source = nib.load(hippocampus["other"] if stem.endswith("17") else hippocampus["third"])
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert (tmp_path / f"{stem}_seg.seg.nrrd").is_file()
        assert json.loads((tmp_path / f"{stem}_summary.json").read_text())["command"] == "transfer"


def test_transfer_goes_target_by_target_and_skips_an_unreadable_one(
        hippocampus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each target is read when its turn comes (one in memory) and its outputs are in place before the next is
    read; a corrupt target in the middle is skipped with a warning, the others are written, and the run ends with
    exit 2 naming it."""
    import insid3_med.jobs as jobs

    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(hippocampus["other"].read_bytes()[:300])
    out = tmp_path / "out"
    out.mkdir()
    seen: list[tuple[str, list[str]]] = []
    read_study = jobs.read_study

    def recorded(path: Path, series: str | None = None, frame: int | None = None):  # noqa: ANN202
        seen.append((path.name, sorted(p.name for p in out.iterdir())))
        return read_study(path, series, frame)

    monkeypatch.setattr(jobs, "read_study", recorded)
    targets = [hippocampus["other"], corrupt, hippocampus["third"]]
    code, stdout, stderr = run_cli(["transfer", str(hippocampus["image"]), str(hippocampus["one"]),
                                    *map(str, targets), "-o", str(out), *FAST, "--mode", "published",
                                    "--progress", "lines"], capsys)
    assert code == 2, stderr
    # progress over the whole run: one fraction that only grows, up to 1 at the end of the last target
    fractions = [int(done) / int(total) for _, done, total in
                 (line.split() for line in stdout.splitlines() if line.startswith("PROGRESS"))]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] < 1 / 3, fractions
    assert "broken.nii.gz" in stderr and "skipped" in stderr and "1 of 3 targets" in stderr, stderr
    assert sorted(p.name for p in out.iterdir()) == ["hippocampus_017_seg.nii.gz", "hippocampus_019_seg.nii.gz"]
    assert f"{hippocampus['other']}: done" in stdout and f"{hippocampus['third']}: done" in stdout
    # the reference first, then each target in turn, the earlier ones' outputs already in place
    assert seen == [(hippocampus["image"].name, []), (hippocampus["other"].name, []),
                    ("broken.nii.gz", ["hippocampus_017_seg.nii.gz"]),
                    (hippocampus["third"].name, ["hippocampus_017_seg.nii.gz"])]


def permuted_axes(path: Path, out: Path) -> Path:
    """The same image stored with its voxel axes in another order (nibabel's (x, y, z) -> (z, x, y)), the affine
    permuted with them: the same anatomy in space, another array order (as another scanner might store it)."""
    image = nib.load(path)
    affine = image.affine.copy()
    affine[:, :3] = image.affine[:, [2, 0, 1]]
    nib.save(nib.Nifti1Image(np.transpose(np.asarray(image.dataobj), (2, 0, 1)), affine), out)
    return out


def test_transfer_slices_a_target_stored_in_another_axis_order_in_the_labelled_plane(
        hippocampus: dict[str, Path], data_file: Callable[[str], Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # the reference labelled on one axial slice; the target's axial slices are its array axis i. Measured with the
    # stand-in: 3D Dice 0.828 / 0.759 (0.823 / 0.732 on the target as stored originally); with --axis k (its
    # sagittal slices) 0.519 / 0.569.
    target = permuted_axes(hippocampus["other"], tmp_path / "permuted.nii.gz")
    truth = np.asarray(nib.load(permuted_axes(data_file("hippocampus/labels/hippocampus_017.nii.gz"),
                                              tmp_path / "permuted_truth.nii.gz")).dataobj)
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = run_cli(["transfer", str(hippocampus["image"]), str(hippocampus["one"]), str(target), "-o",
                               str(out), "--summary", *FAST], capsys)
    assert code == 0, stderr
    assert json.loads((out / "permuted_summary.json").read_text())["axis"] == 2
    result = np.asarray(nib.load(out / "permuted_seg.nii.gz").dataobj)
    dices = [2 * np.count_nonzero((result == v) & (truth == v)) / (np.count_nonzero(result == v)
                                                                    + np.count_nonzero(truth == v)) for v in (1, 2)]
    assert min(dices) > 0.68, dices


def test_segment_2d_writes_masks_of_the_target_size(data_file: Callable[[str], Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    targets = [data_file("ph2/images/IMD003.jpg"), data_file("ph2/images/IMD004.jpg")]
    code, stdout, stderr = run_cli(["segment", str(data_file("ph2/images/IMD002.jpg")),
                                    str(data_file("ph2/masks/IMD002_lesion.png")), *map(str, targets),
                                    "-o", str(tmp_path), *FAST], capsys)
    assert code == 0, stderr
    for target in targets:
        mask = np.asarray(Image.open(tmp_path / f"{target.stem}_mask.png"))
        assert mask.shape == np.asarray(Image.open(target)).shape[:2]
        assert set(np.unique(mask)) <= {0, 255} and (mask == 255).any()


def test_segment_multi_label_reference_keeps_label_values(data_file: Callable[[str], Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    name = "2966893D-5DDF-4B68-9E2B-4979D5956C8E.png"
    others = sorted(p for p in data_file("cxr/images").iterdir() if p.name != name)[:1]
    code, _, stderr = run_cli(["segment", str(data_file(f"cxr/images/{name}")), str(data_file(f"cxr/masks/{name}")),
                               str(others[0]), "-o", str(tmp_path), *FAST], capsys)
    assert code == 0, stderr
    mask = np.asarray(Image.open(tmp_path / f"{others[0].stem}_mask.png"))
    assert set(np.unique(mask)) <= {0, 1, 2, 3} and len(np.unique(mask)) >= 3


def test_the_package_warnings_read_as_the_tool_s_own_lines(ct_series, tmp_path: Path) -> None:
    """A warning of the library (here a series with a file missing) reaches the user as one ``insid3-med:
    warning:`` line, not as Python's ``file:line: UserWarning`` with a line of source under it."""
    import shutil

    folder = tmp_path / "gap"
    folder.mkdir()
    for f in ct_series.files[:12] + ct_series.files[13:]:
        shutil.copy(f, folder / f.name)
    run = subprocess.run([sys.executable, "-m", "insid3_med", "info", str(folder)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "insid3-med: warning: " in run.stderr and "a missing file?" in run.stderr, run.stderr
    assert "UserWarning" not in run.stderr and "warnings.warn" not in run.stderr, run.stderr


def test_info_lists_the_series_of_a_folder(two_series_folder, capsys: pytest.CaptureFixture[str]) -> None:
    folder, series = two_series_folder
    code, stdout, _ = run_cli(["info", str(folder)], capsys)
    assert code == 0
    text = stdout
    assert series[3].series_uid in text and series[7].series_uid in text


def test_bad_inputs_exit_2_and_write_nothing(hippocampus: dict[str, Path], data_file: Callable[[str], Path],
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.nii.gz"
    cases = [
        ([str(tmp_path / "missing.nii.gz"), str(hippocampus["one"])], "missing.nii.gz"),
        ([str(hippocampus["other"]), str(hippocampus["one"])], "differs"),  # labels of another subject's grid
        ([str(hippocampus["image"]), str(hippocampus["one"]), "--dicom-seg", str(tmp_path / "x.dcm")], "DICOM"),
    ]
    for args, expected in cases:
        code, _, stderr = run_cli(["propagate", *args[:2], "-o", str(out), *args[2:], *FAST], capsys)
        assert code == 2, (args, stderr)
        assert expected.lower() in stderr.lower(), stderr
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    # a device that is not there: named before anything is read (the volume here does not even exist)
    code, _, stderr = run_cli(["propagate", str(tmp_path / "missing.nii.gz"), str(hippocampus["one"]), "-o",
                               str(out), *FAST, "--device", "tpu"], capsys)
    assert code == 2 and "unknown device 'tpu'" in stderr and "Traceback" not in stderr, stderr
    # a 2D photograph as a volume (propagate) or as a target study (transfer): segment is the command for it
    photo = str(data_file("ph2/images/IMD003.jpg"))
    for command in (["propagate", photo, str(hippocampus["one"]), "-o", str(out)],
                    ["transfer", str(hippocampus["image"]), str(hippocampus["one"]), photo, "-o", str(tmp_path)]):
        code, _, stderr = run_cli([*command, *FAST], capsys)
        assert code == 2 and "IMD003.jpg" in stderr and "insid3-med segment" in stderr, stderr
        assert list(tmp_path.iterdir()) == []


def test_all_frames_segments_every_phase_of_a_cine_from_one_labelled_slice(
        cine: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """propagate --frame 0 --all-frames: frame 0 is exactly what propagate --frame 0 writes; end-systole, never
    labelled, is segmented better than by carrying the end-diastolic result over unchanged (the ventricles
    shrink), and the summary's volumes per frame show the left ventricle smaller at end-systole."""
    out, summary = tmp_path / "cine_seg.nii.gz", tmp_path / "cine.json"
    code, stdout, stderr = run_cli(["propagate", str(cine["cine"]), str(cine["drawn"]), "--frame", "0",
                                    "--all-frames", "-o", str(out), "--summary", str(summary), *FAST], capsys)
    assert code == 0, stderr
    assert "then the other 1 frame(s) from frame 0" in stdout, stdout
    code, _, stderr = run_cli(["propagate", str(cine["cine"]), str(cine["drawn"]), "--frame", "0",
                               "-o", str(tmp_path / "ed.nii.gz"), *FAST], capsys)
    assert code == 0, stderr
    written, source = nib.load(out), nib.load(cine["cine"])
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    assert np.allclose(written.affine, source.affine) and written.header.get_zooms()[3] == 25.0
    assert written.header.get_xyzt_units() == ("mm", "msec")
    frames = np.asarray(written.dataobj)
    assert np.array_equal(frames[..., 0], np.asarray(nib.load(tmp_path / "ed.nii.gz").dataobj))
    es_truth = np.load(cine["es"])
    carried = [dice_of(frames[..., 0], es_truth, value) for value in (1, 2, 3)]
    segmented = [dice_of(frames[..., 1], es_truth, value) for value in (1, 2, 3)]
    assert np.mean(segmented) > np.mean(carried) + 0.05, (segmented, carried)
    assert np.mean([dice_of(frames[..., 0], np.load(cine["ed"]), value) for value in (1, 2, 3)]) > 0.7
    record = json.loads(summary.read_text())
    assert record["frames"] == 2 and record["frame"] == 0 and len(record["labels_by_frame"]) == 2
    left_ventricle = [frame["3"]["volume_ml"] for frame in record["labels_by_frame"]]
    assert left_ventricle[1] < 0.9 * left_ventricle[0], left_ventricle
    assert "other_frames" in record["timings_s"]


def test_all_frames_is_refused_where_it_cannot_run_before_any_work(
        cine: dict[str, Path], hippocampus: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without the labelled frame, on a 3D study, with a slice range or with outputs that hold one 3D segmentation:
    refused naming the problem, before the model loads (absent weights), nothing written."""
    out = str(tmp_path / "o.nii.gz")
    absent = ["--weights", str(tmp_path / "absent"), "--progress", "none"]
    for study, extra, expected in (
            (cine["cine"], [], "--all-frames needs --frame N"),
            (hippocampus["image"], ["--frame", "0"], "a frame is chosen in a 4D image only"),
            (cine["cine"], ["--frame", "2"], "frame 2 asked of a 4D image with 2 frames"),
            (cine["cine"], ["--frame", "0", "--slices", "0:5"], "leave out --slices"),
            (tmp_path / "missing.nii.gz", ["--frame", "0"], "missing.nii.gz: no such file or folder"),
            (cine["cine"], ["--frame", "0", "--seg-nrrd", str(tmp_path / "o.seg.nrrd")], "4D NIfTI")):
        labels = cine["drawn"] if study == cine["cine"] else hippocampus["one"]
        code, _, stderr = run_cli(["propagate", str(study), str(labels), "--all-frames", "-o", out, *extra,
                                   *absent], capsys)
        assert code == 2 and expected in stderr and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_empty_label_volume_and_4d_input_are_refused(hippocampus: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    source = nib.load(hippocampus["image"])
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(source.shape, np.uint8), source.affine), empty)
    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*source.shape, 2), np.float32), source.affine), four_d)
    before = set(tmp_path.iterdir())
    code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(empty), "-o", str(tmp_path / "o.nii.gz"),
                               *FAST], capsys)
    assert code == 2 and "labelled slice" in stderr and "empty.nii.gz" in stderr  # the file is named
    code, _, stderr = run_cli(["propagate", str(four_d), str(empty), "-o", str(tmp_path / "o.nii.gz"), *FAST], capsys)
    assert code == 2 and "4d.nii.gz" in stderr and "choose one with --frame N (0 to 1)" in stderr, stderr
    assert set(tmp_path.iterdir()) == before


def test_a_frame_of_4d_studies_propagates_and_transfers_as_the_3d_volume(
        hippocampus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--frame N reads frame N of a 4D study (a cine's phase, a multi-modal study's contrast): the same label maps as
    the 3D volume stored alone, and the summary records the frame."""
    def four_d(path: Path, out: Path) -> Path:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
        nib.save(nib.Nifti1Image(np.stack([np.flip(data, 0), data], axis=-1), image.affine), out)  # frame 1: the 3D
        return out

    reference, target = four_d(hippocampus["image"], tmp_path / "ref4d.nii.gz"), four_d(hippocampus["other"],
                                                                                       tmp_path / "other4d.nii.gz")
    for name, study in (("3d", hippocampus["image"]), ("4d", reference)):
        code, _, stderr = run_cli(["propagate", str(study), str(hippocampus["one"]), "-o",
                                   str(tmp_path / f"{name}.nii.gz"), "--summary", str(tmp_path / f"{name}.json"),
                                   *(["--frame", "1"] if name == "4d" else []), *FAST], capsys)
        assert code == 0, stderr
    assert np.array_equal(nib.load(tmp_path / "3d.nii.gz").get_fdata(), nib.load(tmp_path / "4d.nii.gz").get_fdata())
    assert nib.load(tmp_path / "4d.nii.gz").shape == nib.load(hippocampus["image"]).shape
    assert json.loads((tmp_path / "4d.json").read_text())["frame"] == 1
    # transfer: every study, reference and targets, read at that frame; a 4D target without --frame or a 3D one
    # with it is refused before the model loads
    out = tmp_path / "transfer"
    out.mkdir()
    absent = ["--weights", str(tmp_path / "absent"), "--progress", "none"]
    for args, expected in (([str(target)], "choose one with --frame N (0 to 1)"),
                           ([str(target), str(hippocampus["third"]), "--frame", "1"], "a frame is chosen in a 4D")):
        code, _, stderr = run_cli(["transfer", str(hippocampus["image"] if "--frame" not in args else reference),
                                   str(hippocampus["one"]), *args, "-o", str(out), *absent], capsys)
        assert code == 2 and expected in stderr, stderr
    code, _, stderr = run_cli(["transfer", str(reference), str(hippocampus["one"]), str(target), "-o", str(out),
                               "--frame", "1", "--mode", "published", *FAST], capsys)
    assert code == 0, stderr
    code, _, stderr = run_cli(["transfer", str(hippocampus["image"]), str(hippocampus["one"]),
                               str(hippocampus["other"]), "-o", str(out), "--mode", "published", *FAST], capsys)
    assert code == 0, stderr
    assert np.array_equal(nib.load(out / "other4d_seg.nii.gz").get_fdata(),
                          nib.load(out / "hippocampus_017_seg.nii.gz").get_fdata())


def test_a_slice_range_without_a_labelled_slice_is_refused_before_the_model_loads(
        hippocampus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    best = int(str(hippocampus["best"]))
    out = tmp_path / "out.nii.gz"
    code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o", str(out),
                               "--slices", f"{best + 1}:{best + 5}", "--weights", str(tmp_path / "absent")], capsys)
    assert code == 2 and str(hippocampus["one"]) in stderr and f"labelled slices are {best}" in stderr, stderr
    assert not out.exists()


def test_output_names_are_checked_before_the_model_loads(hippocampus: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A label map named .png, a .seg.nrrd named .nrrd, or a folder as the output: refused at once, naming the path
    given (the wrong names were found only when written, after the whole run, naming a temporary file; a folder
    was "an output that exists", to be replaced with --force)."""
    folder = tmp_path / "existing_folder"
    folder.mkdir()
    absent = ["--weights", str(tmp_path / "absent"), "--progress", "none"]
    cases = [(["-o", str(tmp_path / "x.png")], f"{tmp_path / 'x.png'}: the label map is written as NIfTI"),
             (["-o", str(tmp_path / "y.nii.gz"), "--seg-nrrd", str(tmp_path / "y.nrrd")],
              f"{tmp_path / 'y.nrrd'}: a Slicer segmentation file name ends with .seg.nrrd"),
             (["-o", str(folder), "--force"], f"{folder}: is a folder; give the output's file name")]
    for output, expected in cases:
        code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), *output, *absent],
                                  capsys)
        assert code == 2 and f"insid3-med: error: {expected}" in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_folder"] and not any(folder.iterdir())


@pytest.mark.parametrize("side", ["0", "-5", "63", "5000", "big"])
def test_an_image_size_out_of_range_is_refused(side: str, capsys: pytest.CaptureFixture[str]) -> None:
    # 0 and -5 ran before: rounded up to one patch, they gave a one-patch "segmentation" with exit code 0
    with pytest.raises(SystemExit) as exit_:
        main(["segment", "a.png", "b.png", "c.png", "-o", ".", "--image-size", side])
    assert exit_.value.code == 2 and "argument --image-size: expects" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--episodes", "--shots", "--threads", "--limit-cases"])
def test_evaluate_counts_below_one_are_refused(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    # --episodes 0, --shots 0 and --threads 0 ran before and wrote a report of nothing
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "slices", "data", "-o", "report", option, "0"])
    assert exit_.value.code == 2 and f"argument {option}: expects 1 or more, not 0" in capsys.readouterr().err


def test_existing_output_is_kept_without_force(hippocampus: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"precious")
    best = int(str(hippocampus["best"]))
    near = f"{best - 1}:{best + 2}"  # a short range around the labelled slice
    code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o", str(out),
                               "--slices", near, *FAST], capsys)
    assert code == 2 and "--force" in stderr and out.read_bytes() == b"precious"
    code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o", str(out),
                               "--slices", near, "--force", *FAST], capsys)
    assert code == 0, stderr
    assert nib.load(out).shape == nib.load(hippocampus["image"]).shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]  # no temporary left behind


def test_an_input_is_never_an_output_even_with_force(hippocampus: dict[str, Path], data_file: Callable[[str], Path],
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.nii.gz"
    labels.write_bytes(hippocampus["one"].read_bytes())
    before = labels.read_bytes()
    elsewhere = ["-o", str(tmp_path / "x.nii.gz"), "--summary", str(tmp_path / "." / labels.name)]
    for output in (["-o", str(labels)], elsewhere):
        code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(labels), *output, "--force", *FAST],
                                  capsys)
        assert code == 2 and "is an input of the run" in stderr and str(labels) in stderr, stderr
        assert labels.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]
    # 2D: the reference mask stored where a target's mask would be written (<target stem>_mask.png)
    mask = tmp_path / "IMD003_mask.png"
    mask.write_bytes(data_file("ph2/masks/IMD002_lesion.png").read_bytes())
    code, _, stderr = run_cli(["segment", str(data_file("ph2/images/IMD002.jpg")), str(mask),
                               str(data_file("ph2/images/IMD003.jpg")), "-o", str(tmp_path), "--force", *FAST], capsys)
    assert code == 2 and "is an input of the run" in stderr, stderr
    assert mask.read_bytes() == data_file("ph2/masks/IMD002_lesion.png").read_bytes()


def test_2d_bad_inputs(data_file: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(empty)
    image = data_file("ph2/images/IMD002.jpg")
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, stderr = run_cli(["segment", str(image), str(empty), str(image), "-o", str(outdir), *FAST], capsys)
    assert code == 2 and "empty.png" in stderr and "differs" in stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    code, _, stderr = run_cli(["segment", str(image), str(data_file("ph2/masks/IMD002_lesion.png")), str(broken),
                               "-o", str(outdir), *FAST], capsys)
    assert code == 2 and "broken.png" in stderr
    assert list(outdir.iterdir()) == []
    # beside a readable target, an unreadable one is skipped with a warning; the other's mask is written
    other = data_file("ph2/images/IMD003.jpg")
    code, stdout, stderr = run_cli(["segment", str(image), str(data_file("ph2/masks/IMD002_lesion.png")), str(broken),
                                    str(other), "-o", str(outdir), *FAST], capsys)
    assert code == 2 and "broken.png" in stderr and "skipped" in stderr and "1 of 2 targets" in stderr, stderr
    assert [p.name for p in outdir.iterdir()] == ["IMD003_mask.png"] and "IMD003_mask.png" in stdout


def test_targets_whose_outputs_share_a_name_are_named_and_refused_before_the_model_loads(
        hippocampus: dict[str, Path], data_file: Callable[[str], Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    photo = data_file("ph2/images/IMD004.jpg")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same_stem = [tmp_path / "a" / "IMD003.png", tmp_path / "b" / "IMD003.bmp"]
    for path in same_stem:
        Image.open(photo).save(path)
    out = tmp_path / "out"
    out.mkdir()
    absent = ["--weights", str(tmp_path / "absent"), "--progress", "none"]
    code, _, stderr = run_cli(["segment", str(data_file("ph2/images/IMD002.jpg")),
                               str(data_file("ph2/masks/IMD002_lesion.png")), str(photo), *map(str, same_stem),
                               "-o", str(out), *absent], capsys)
    assert code == 2 and f"{same_stem[0]}, {same_stem[1]} would both write IMD003_mask.png" in stderr, stderr
    assert str(photo) not in stderr.split("collide:")[1].split(" would")[0]  # only the clashing targets are named
    twins = [tmp_path / "a" / "ct.nii.gz", tmp_path / "b" / "ct.nii.gz"]
    for path in twins:
        path.write_bytes(hippocampus["other"].read_bytes())
    code, _, stderr = run_cli(["transfer", str(hippocampus["image"]), str(hippocampus["one"]), *map(str, twins),
                               "-o", str(out), *absent], capsys)
    assert code == 2 and f"{twins[0]}, {twins[1]} would both write ct_seg.nii.gz" in stderr, stderr
    assert list(out.iterdir()) == []


def test_2d_masks_saved_as_jpeg_or_in_colour_read_as_one_structure(data_file: Callable[[str], Path],
                                                                    tmp_path: Path) -> None:
    from insid3_med.imaging.readers import read_image_2d
    from insid3_med.jobs import read_mask_2d

    like = read_image_2d(data_file("ph2/images/IMD002.jpg"))
    drawn = np.asarray(Image.open(data_file("ph2/masks/IMD002_lesion.png")).convert("L")) > 127
    green = np.zeros(drawn.shape + (3,), np.uint8)
    green[drawn] = (0, 200, 0)
    saved = {"grey.jpg": Image.fromarray(drawn.astype(np.uint8) * 255), "green.png": Image.fromarray(green),
             "green.jpg": Image.fromarray(green)}
    for name, image in saved.items():
        image.save(tmp_path / name, quality=85)
        mask = read_mask_2d(tmp_path / name, like)
        assert set(np.unique(mask)) == {0, 1}, name
        assert np.count_nonzero(mask != drawn) < 0.002 * drawn.size, name  # JPEG: at most a few edge pixels
    if len(np.unique(np.asarray(Image.open(tmp_path / "grey.jpg")))) <= 2:
        pytest.fail("the JPEG mask came back without compression noise: the case no longer tests it")
    two = green.copy()
    two[: drawn.shape[0] // 2][drawn[: drawn.shape[0] // 2]] = (200, 0, 0)
    Image.fromarray(two).save(tmp_path / "two.png")
    photo = np.asarray(Image.open(data_file("ph2/images/IMD002.jpg")).convert("L"))
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(photo).save(tmp_path / "photo.jpg")
    for name, message in (("two.png", "colour mask with 2 colours"), ("photo.png", "distinct values"),
                          ("photo.jpg", "must be black and white")):
        with pytest.raises(ImageReadError, match=message):
            read_mask_2d(tmp_path / name, like)


def test_missing_weights_exit_3_with_instructions(hippocampus: dict[str, Path], tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1",
           "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "insid3_med", "propagate", str(hippocampus["image"]),
                             str(hippocampus["one"]), "-o", str(tmp_path / "o.nii.gz"), "--progress", "none"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 3, result.stderr
    assert "DINOv3" in result.stderr and "INSID3_MED_WEIGHTS" in result.stderr and "--weights" in result.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_version_is_the_installed_package_s(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"insid3-med {version('insid3-med')}"


def test_progress_lines_are_machine_readable(hippocampus: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = ["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o", str(tmp_path / "o.nii.gz"),
            "--slices", "14:18", *FAST[:-2], "--progress", "lines"]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    lines = [line for line in stdout.splitlines() if line.startswith("PROGRESS")]
    assert lines[-1] == f"PROGRESS {len(lines)} {len(lines)}" and len(lines) >= 3


def test_sigterm_mid_write_exits_143_and_leaves_no_partial_file(hippocampus: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch scheduler's or the Slicer extension's SIGTERM arriving while the outputs are written: the run stops
    with exit code 143 and a message, and deletes its temporaries (before, the process died and left them)."""
    import signal

    import insid3_med.jobs as jobs

    write_seg_nrrd = jobs.write_seg_nrrd

    def terminated_while_writing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        write_seg_nrrd(*args, **kwargs)  # the label map and this file are written to their temporaries
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(jobs, "write_seg_nrrd", terminated_while_writing)

    def not_handled_by_the_command(*_: object) -> None:  # without the command's handler the signal lands here
        raise AssertionError("SIGTERM reached the caller's handler")

    before = signal.signal(signal.SIGTERM, not_handled_by_the_command)
    try:
        code, _, stderr = run_cli(["propagate", str(hippocampus["image"]), str(hippocampus["one"]), "-o",
                                   str(tmp_path / "o.nii.gz"), "--seg-nrrd", str(tmp_path / "o.seg.nrrd"),
                                   "--slices", "14:18", *FAST], capsys)
        assert signal.getsignal(signal.SIGTERM) is not_handled_by_the_command  # the command's only while it runs
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143 and "insid3-med: terminated; nothing partial was kept" in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_a_sigterm_that_arrives_inside_a_finaliser_still_stops_the_run() -> None:
    """Python swallows an exception raised in a __del__ (the garbage collector's finalisers, nibabel's among them):
    a SIGTERM handled there must still stop the run, raised once the finaliser is done or, if the run ends first,
    as it ends; it was lost once (the run went on to the end and exited 0)."""
    import signal
    import time

    from insid3_med.cli import Terminated, terminate_on_sigterm

    class SignalledWhileFinalised:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # handled here, inside the finaliser

    handler, hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    for seconds in (5.0, 0.0):  # a run that goes on (the signal is raised in it), one that ends at once
        reached_the_end = False
        with pytest.raises(Terminated), terminate_on_sigterm():
            SignalledWhileFinalised()  # dropped at once: its __del__ runs
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                time.sleep(0.01)
            reached_the_end = seconds == 0.0
        assert reached_the_end == (seconds == 0.0)
    assert signal.getsignal(signal.SIGTERM) is handler and sys.unraisablehook is hook


def test_a_terminated_transfer_keeps_the_targets_it_had_finished(hippocampus: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """A real process sent SIGTERM by another (as a scheduler does) once its first target is done."""
    import signal

    command = [sys.executable, "-m", "insid3_med", "transfer", str(hippocampus["image"]), str(hippocampus["one"]),
               str(hippocampus["other"]), str(hippocampus["third"]), "-o", str(tmp_path), "--mode", "published",
               *FAST]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if ": done in " in line:  # the first target's outputs are in place
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "terminated; nothing partial was kept" in stderr, stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hippocampus_017_seg.nii.gz"]


def test_command_sets_a_passive_openmp_wait_policy_before_torch_loads() -> None:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import os, sys\nfrom insid3_med.cli import main\ntry:\n    main(['info', sys.argv[1]])\n"
            "finally:\n    print('POLICY', os.environ.get('OMP_WAIT_POLICY'))")
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__))], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert "POLICY PASSIVE" in result.stdout, result.stdout + result.stderr
    environment["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's own setting wins
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__))], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert "POLICY ACTIVE" in result.stdout, result.stdout + result.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly(hippocampus: dict[str, Path]) -> None:
    """`insid3-med info x | head -1`: the closed pipe ends the command with 141 (128 + SIGPIPE), as cat does,
    without a traceback."""
    process = subprocess.Popen([sys.executable, "-m", "insid3_med", "info", str(hippocampus["image"])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command writes: its first write meets a closed pipe
    code = process.wait(timeout=120)
    stderr = process.stderr.read()
    assert code == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, (code, stderr)
