"""Writers: NIfTI, .seg.nrrd, DICOM SEG and PNG montage round trips (labels and geometry, RAS and LPS)."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import (
    ACDC_IMAGE,
    ACDC_LABELS,
    CXR_IMAGE,
    CXR_MASK,
    HIPPOCAMPUS_IMAGE,
    HIPPOCAMPUS_LABELS,
    PH2_IMAGE,
    PH2_MASK,
)
from PIL import Image

from insid3_med.imaging.errors import ImageWriteError, OutputExistsError
from insid3_med.imaging.geometry import LPS_TO_RAS, Geometry, Volume
from insid3_med.imaging.overlay import HIGHLIGHT_COLOR, write_overlay_montage
from insid3_med.imaging.readers import read_image_2d, read_label_volume, read_volume
from insid3_med.imaging.writers import (
    atomic_output,
    label_color,
    write_dicom_seg,
    write_nifti_label_frames,
    write_nifti_labels,
    write_seg_nrrd,
)


@pytest.fixture(scope="module")
def hippocampus(data_file):
    volume = read_volume(data_file(HIPPOCAMPUS_IMAGE))
    return volume, read_label_volume(data_file(HIPPOCAMPUS_LABELS), volume)


@pytest.fixture(scope="module")
def ct_with_labels(ct_series, data_file):
    """The DICOM CT (oblique grid) with the hippocampus labels, which lie on the same (K, J, I) voxels."""
    volume = read_volume(ct_series.folder)
    labels = np.asarray(nib.load(data_file(HIPPOCAMPUS_LABELS)).dataobj).transpose(2, 1, 0).astype(np.uint8)
    return volume, labels


def _sitk_geometry(image: sitk.Image) -> Geometry:
    return Geometry(
        image.GetSpacing(), image.GetOrigin(), tuple(map(tuple, np.reshape(image.GetDirection(), (3, 3))))
    )


def test_nifti_labels_keep_the_source_nifti_geometry_and_codes(hippocampus, data_file, tmp_path):
    volume, labels = hippocampus
    path = write_nifti_labels(labels, volume, tmp_path / "labels.nii.gz")
    written, source = nib.load(path), nib.load(data_file(HIPPOCAMPUS_IMAGE))
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(
        np.asarray(written.dataobj), np.asarray(nib.load(data_file(HIPPOCAMPUS_LABELS)).dataobj)
    )
    assert written.header.get_intent()[0] == "label"
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 1)
    # ACDC has qform 0 / sform 2: both kept.
    acdc = read_volume(data_file(ACDC_IMAGE))
    acdc_labels = read_label_volume(data_file(ACDC_LABELS), acdc)
    acdc_path = write_nifti_labels(acdc_labels, acdc, tmp_path / "acdc.nii")
    header = nib.load(acdc_path).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (0, 2)
    np.testing.assert_array_equal(read_label_volume(acdc_path, acdc), acdc_labels)


def test_nifti_labels_on_an_oblique_dicom_grid_in_ras_and_lps(ct_with_labels, tmp_path):
    volume, labels = ct_with_labels
    path = write_nifti_labels(labels, volume, tmp_path / "ct_labels.nii.gz")
    written = nib.load(path)
    np.testing.assert_allclose(written.affine, volume.geometry.ijk_to_ras(), atol=1e-5)  # RAS (nibabel)
    np.testing.assert_allclose(LPS_TO_RAS @ written.affine, volume.geometry.ijk_to_lps(), atol=1e-5)
    itk = sitk.ReadImage(str(path))  # LPS (ITK, Slicer)
    assert _sitk_geometry(itk).allclose(volume.geometry, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk), labels)
    np.testing.assert_array_equal(read_label_volume(path, volume), labels)


def test_nifti_labels_switch_to_uint16_above_255(hippocampus, tmp_path):
    volume, labels = hippocampus
    big = labels.astype(np.int64) * 150  # up to 300
    path = write_nifti_labels(big, volume, tmp_path / "big.nii.gz")
    assert nib.load(path).get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj).transpose(2, 1, 0), big)


def test_bad_labels_are_refused_and_leave_no_file(hippocampus, tmp_path):
    volume, labels = hippocampus
    cases = [
        (labels[:-1], "do not match"),
        (labels.astype(np.float32) + 0.5, "integers"),
        (labels.astype(np.int32) - 1, "negative"),
        (labels.astype(np.int64) * 40000, "16 bits"),
    ]
    for bad, message in cases:
        with pytest.raises(ImageWriteError, match=message):
            write_nifti_labels(bad, volume, tmp_path / "bad.nii.gz")
    with pytest.raises(ImageWriteError, match=".nii"):
        write_nifti_labels(labels, volume, tmp_path / "labels.png")
    assert list(tmp_path.iterdir()) == []


def test_nifti_label_frames_are_one_4d_file_with_the_source_frame_step(data_file, tmp_path):
    """One label map per frame, stacked on the 4th axis of a NIfTI file on the frames' grid, the time between
    frames and its unit copied from the 4D source; uint16 when any frame needs it; bad frames refused, no file."""
    image = nib.load(data_file(HIPPOCAMPUS_IMAGE))
    data = np.asarray(image.dataobj)
    source = nib.Nifti1Image(np.stack([data, data], axis=-1), image.affine)
    source.header.set_xyzt_units("mm", "msec")
    source.header.set_zooms((*source.header.get_zooms()[:3], 40.0))
    nib.save(source, tmp_path / "cine.nii.gz")
    volume = read_volume(tmp_path / "cine.nii.gz", frame=1)
    labels = read_label_volume(data_file(HIPPOCAMPUS_LABELS), volume)
    path = write_nifti_label_frames([labels, 2 * labels], volume, tmp_path / "frames.nii.gz")
    written = nib.load(path)
    assert written.shape == (*data.shape, 2) and written.get_data_dtype() == np.uint8
    assert np.allclose(written.affine, image.affine) and written.header.get_zooms()[3] == 40.0
    assert written.header.get_xyzt_units() == ("mm", "msec") and written.header.get_intent()[0] == "label"
    for frame, expected in enumerate((labels, 2 * labels)):
        np.testing.assert_array_equal(np.asarray(written.dataobj)[..., frame].transpose(2, 1, 0), expected)
    big = write_nifti_label_frames([labels, 150 * labels.astype(np.int64)], volume, tmp_path / "big.nii.gz")
    assert nib.load(big).get_data_dtype() == np.uint16
    assert np.asarray(nib.load(big).dataobj)[..., 1].max() == 300
    for frames, message in (([labels, labels[:-1]], "do not match"), ([], "no frame")):
        with pytest.raises(ImageWriteError, match=message):
            write_nifti_label_frames(frames, volume, tmp_path / "bad.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.nii.gz", "cine.nii.gz", "frames.nii.gz"]


def test_existing_output_is_kept_unless_overwrite(hippocampus, tmp_path):
    volume, labels = hippocampus
    path = tmp_path / "labels.nii.gz"
    write_nifti_labels(labels, volume, path)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError) as caught:
        write_nifti_labels(np.zeros_like(labels), volume, path)
    assert isinstance(caught.value, FileExistsError) and isinstance(caught.value, ValueError)
    assert path.read_bytes() == before
    write_nifti_labels(np.zeros_like(labels), volume, path, overwrite=True)
    assert not np.asarray(nib.load(path).dataobj).any()
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]  # no temporary left


def test_atomic_output_removes_the_temporary_on_failure(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_bytes(b"half a file")
            raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(tmp_path / "sub" / "ok.txt") as temporary:
        assert temporary.parent == tmp_path / "sub" and temporary.name.endswith(".txt")
        temporary.write_text("done")
    assert (tmp_path / "sub" / "ok.txt").read_text() == "done"


def test_seg_nrrd_round_trip_with_slicerio(ct_with_labels, tmp_path):
    import slicerio

    volume, labels = ct_with_labels
    names = {1: "anterior hippocampus", 2: "posterior hippocampus", 3: "not drawn"}
    path = write_seg_nrrd(labels, volume, tmp_path / "hippocampus.seg.nrrd", names, colors={2: (0, 128, 255)})
    segmentation = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(segmentation["ijkToLPS"], volume.geometry.ijk_to_lps(), atol=1e-6)
    np.testing.assert_array_equal(segmentation["voxels"], labels.transpose(2, 1, 0))  # i, j, k order
    by_value = {s["labelValue"]: s for s in segmentation["segments"]}
    assert set(by_value) == {1, 2, 3}
    assert by_value[1]["name"] == "anterior hippocampus" and by_value[3]["name"] == "not drawn"
    np.testing.assert_allclose(by_value[2]["color"], (0.0, 128 / 255, 1.0), atol=1e-6)
    np.testing.assert_allclose(by_value[1]["color"], label_color(1), atol=1e-6)
    mask = slicerio.segment_mask(segmentation, by_value[2])
    np.testing.assert_array_equal(mask, labels.transpose(2, 1, 0) == 2)
    # ITK reads the same grid in LPS, and the label reader accepts it on the CT grid.
    assert _sitk_geometry(sitk.ReadImage(str(path))).allclose(volume.geometry, atol=1e-4)
    np.testing.assert_array_equal(read_label_volume(path, volume), labels)
    with pytest.raises(OutputExistsError):
        write_seg_nrrd(labels, volume, path)


def test_seg_nrrd_needs_its_suffix(hippocampus, tmp_path):
    volume, labels = hippocampus
    with pytest.raises(ImageWriteError, match=".seg.nrrd"):
        write_seg_nrrd(labels, volume, tmp_path / "labels.nrrd")


def test_dicom_seg_references_the_source_series(ct_with_labels, ct_series, tmp_path):
    import highdicom as hd

    volume, labels = ct_with_labels
    path = write_dicom_seg(labels, volume, tmp_path / "seg.dcm", {1: "anterior", 2: "posterior"})
    seg = hd.seg.segread(path)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == ct_series.study_uid
    assert seg.FrameOfReferenceUID == pydicom.dcmread(ct_series.files[0]).FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series.series_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["anterior", "posterior"]
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
        assert segment.SegmentAlgorithmName == "insid3-med"
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.metadata["source_files"]]
    pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True)
    np.testing.assert_array_equal(pixels, labels)  # labels per source slice
    # Frames sit at their source slices' positions (LPS) and orientation.
    positions = {tuple(np.round(s.ImagePositionPatient, 3)) for s in sources}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert tuple(np.round(np.asarray(position, dtype=float), 3)) in positions
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose(
        np.asarray(orientation, float), np.asarray(sources[0].ImageOrientationPatient, float)
    )
    # highdicom's own volume (slice, row, column) lies on the CT grid: same voxels at the same LPS points.
    seg_volume = seg.get_volume(combine_segments=True)
    ijk_to_lps = volume.geometry.ijk_to_lps()
    labelled = np.nonzero(labels.any(axis=(1, 2)))[0]
    inside = [
        tuple(v) for v in np.argwhere(seg_volume.array > 0)[:: max(1, int((seg_volume.array > 0).sum()) // 5)]
    ]
    for s, r, c in [(0, 0, 0), (seg_volume.array.shape[0] - 1, 46, 33), *inside]:
        point = seg_volume.affine @ [s, r, c, 1]
        i, j, k, _ = np.linalg.inv(ijk_to_lps) @ point
        assert (
            np.allclose([i, j, k], np.rint([i, j, k]), atol=1e-3) and labelled[0] <= round(k) <= labelled[-1]
        )
        assert seg_volume.array[s, r, c] == labels[round(k), round(j), round(i)]


def test_dicom_seg_on_a_radiograph(monochrome1_radiograph, data_file, tmp_path):
    import highdicom as hd

    image = read_image_2d(monochrome1_radiograph[0])
    lungs = np.asarray(Image.open(data_file(CXR_MASK)))[np.newaxis]
    path = write_dicom_seg(lungs, image, tmp_path / "lungs.dcm", {1: "right lung", 2: "left lung"})
    seg = hd.seg.segread(path)
    uid = pydicom.dcmread(monochrome1_radiograph[0], stop_before_pixels=True).SOPInstanceUID
    pixels = seg.get_pixels_by_source_instance([uid], combine_segments=True)
    np.testing.assert_array_equal(pixels, lungs)


def test_dicom_seg_needs_a_dicom_source(hippocampus, tmp_path):
    volume, labels = hippocampus
    with pytest.raises(ImageWriteError, match="read from DICOM") as caught:
        write_dicom_seg(labels, volume, tmp_path / "seg.dcm")
    assert "nifti" in str(caught.value)
    assert not (tmp_path / "seg.dcm").exists()


def _colour_pixels(png: np.ndarray, rgb: tuple[float, ...]) -> int:
    target = np.round(np.asarray(rgb) * 255).astype(np.uint8) if max(rgb) <= 1 else np.asarray(rgb, np.uint8)
    return int(np.all(png == target, axis=-1).sum())


def test_overlay_montage_of_a_volume(hippocampus, tmp_path):
    volume, labels = hippocampus
    labelled = [k for k in range(labels.shape[0]) if labels[k].any()]
    reference = labelled[len(labelled) // 2]
    path = write_overlay_montage(volume, labels, tmp_path / "montage.png", highlight={reference})
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape[0] > 256 and png.shape[1] > 256
    assert _colour_pixels(png, label_color(1)) > 50 and _colour_pixels(png, label_color(2)) > 50
    assert _colour_pixels(png, HIGHLIGHT_COLOR) > 4 * 200  # the reference slice's frame
    with pytest.raises(OutputExistsError):
        write_overlay_montage(volume, labels, path)


def test_overlay_montage_of_chosen_slices_and_plain_arrays(hippocampus, tmp_path):
    volume, labels = hippocampus
    path = write_overlay_montage(volume.array, labels, tmp_path / "two.png", slices=[0, 20])
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape[1] < 2 * 256 + 3 * 4 + 1  # two tiles side by side
    assert _colour_pixels(png, HIGHLIGHT_COLOR) == 0
    with pytest.raises(ImageWriteError, match="outside"):
        write_overlay_montage(volume, labels, tmp_path / "bad.png", slices=[99])
    with pytest.raises(ImageWriteError, match="do not match"):
        write_overlay_montage(volume, labels[:, :10], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_overlay_montage_of_2d_images(data_file, tmp_path):
    cxr = read_image_2d(data_file(CXR_IMAGE))
    lungs = read_label_volume(data_file(CXR_MASK), cxr)
    path = write_overlay_montage(cxr, lungs, tmp_path / "cxr.png", highlight={0})
    png = np.asarray(Image.open(path).convert("RGB"))
    assert _colour_pixels(png, label_color(1)) > 100 and _colour_pixels(png, label_color(3)) > 100
    ph2 = read_image_2d(data_file(PH2_IMAGE))
    lesion = (read_label_volume(data_file(PH2_MASK), ph2) > 0).astype(np.uint8)
    write_overlay_montage(ph2, lesion, tmp_path / "ph2.png")
    assert Image.open(tmp_path / "ph2.png").size[0] > 200


def test_volume_without_geometry_metadata_writes_with_identity(tmp_path):
    volume = Volume(array=np.zeros((2, 3, 4), dtype=np.int16))
    labels = np.zeros((2, 3, 4), dtype=np.uint8)
    labels[1, 1, 2] = 7
    path = write_nifti_labels(labels, volume, tmp_path / "tiny.nii.gz")
    written = nib.load(path)
    np.testing.assert_allclose(written.affine, LPS_TO_RAS)
    assert int(written.header["qform_code"]) == 1 and np.asarray(written.dataobj)[2, 1, 1] == 7


def test_dicom_seg_on_an_enhanced_multiframe_ct(ct_series, ct_with_labels, tmp_path):
    import highdicom as hd

    _, labels = ct_with_labels
    legacy = [pydicom.dcmread(f) for f in ct_series.files]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=hd.UID(), series_number=30, sop_instance_uid=hd.UID(), instance_number=1
    )
    enhanced.save_as(tmp_path / "enhanced.dcm")
    volume = read_volume(tmp_path / "enhanced.dcm")
    seg = hd.seg.segread(write_dicom_seg(labels, volume, tmp_path / "seg.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == enhanced.SeriesInstanceUID
    seg_volume = seg.get_volume(combine_segments=True)
    to_ijk = np.linalg.inv(volume.geometry.ijk_to_lps())
    inside = np.argwhere(seg_volume.array > 0)
    assert len(inside) == int((labels > 0).sum())
    for s, r, c in inside[:: max(1, len(inside) // 20)]:
        i, j, k, _ = np.rint(to_ijk @ (seg_volume.affine @ [s, r, c, 1])).astype(int)
        assert seg_volume.array[s, r, c] == labels[k, j, i]


def dciodvfy_errors(path) -> list[str]:
    """The Error and Warning lines of dicom3tools' IOD validator on one file."""
    import subprocess

    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(("Error", "Warning"))]


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools, installed by .ci/run) is not on PATH")
def test_dicom_seg_passes_the_dicom3tools_validator(data_file, tmp_path):
    """What a PACS or OHIF checks a DICOM SEG against: dciodvfy finds no error and no warning in the SEG of a
    classic MR series, nor in that of an enhanced multi-frame CT, each with two named segments."""
    import highdicom as hd
    from conftest import write_dicom_series

    image = np.asarray(nib.load(data_file(HIPPOCAMPUS_IMAGE)).dataobj, dtype=np.float64).transpose(2, 1, 0)
    # A grid stored in another orientation than the patient's axes (rows along A-P, columns along S-I).
    geometry = Geometry(spacing=(0.75, 0.75, 2.5), origin=(-12.5, 20.0, 5.0),
                        direction=((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)))
    classic = write_dicom_series(tmp_path / "mr", np.round(image), geometry, modality="MR", series_number=4)
    labels = np.zeros(classic.expected.shape, np.uint8)
    labels[15:25, 10:30, 10:25] = 1
    labels[18:22, 30:40, 5:15] = 2
    names = {1: "anterior hippocampus", 2: "posterior hippocampus"}
    seg = write_dicom_seg(labels, read_volume(classic.folder), tmp_path / "mr_seg.dcm", segment_names=names)
    assert dciodvfy_errors(seg) == []

    ct = write_dicom_series(tmp_path / "ct", np.round(image) - 1024.0, geometry, series_number=5,
                            rescale_intercept=-1024.0)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(f) for f in ct.files], series_instance_uid=hd.UID(), series_number=30,
        sop_instance_uid=hd.UID(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    seg = write_dicom_seg(labels, read_volume(tmp_path / "enhanced.dcm"), tmp_path / "ct_seg.dcm", segment_names=names)
    assert dciodvfy_errors(seg) == []
