"""DICOM reading: series listing and choice, slice order from positions, rescale to HU, radiographs."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import HIPPOCAMPUS_IMAGE, oblique_ct_geometry, write_dicom_series

from insid3_med.imaging.dicom import list_dicom_series, modality_values
from insid3_med.imaging.errors import ImageReadError, SeveralSeriesError
from insid3_med.imaging.geometry import Geometry
from insid3_med.imaging.intensity import choose_preset, normalise
from insid3_med.imaging.readers import describe, read_image_2d, read_volume


def test_list_dicom_series_finds_one_series_and_skips_other_files(ct_series, tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(ct_series.folder, folder)
    (folder / "README.txt").write_text("not an image")
    (folder / "notes").write_bytes(b"\x00\x01 no dicom here")
    series = list_dicom_series(folder)
    assert len(series) == 1
    info = series[0]
    assert info.series_instance_uid == ct_series.series_uid
    assert info.series_number == 3 and info.modality == "CT"
    assert info.n_files == ct_series.expected.shape[0]
    assert (info.rows, info.columns) == ct_series.expected.shape[1:]


def compressed_copy(files, folder, compressor: str):
    """The series with its pixel data compressed as a PACS may store it: ``RLE`` encoded by pydicom, ``JPEG``
    (lossless, process 14) or ``JPEG2000`` (lossless) encoded by GDCM through SimpleITK; every other element kept."""
    folder.mkdir()
    for path in files:
        ds = pydicom.dcmread(path)
        if compressor == "RLE":
            ds.compress(pydicom.uid.RLELossless)
        else:
            encoded_path = folder / "encoded.tmp"
            writer = sitk.ImageFileWriter()
            writer.SetImageIO("GDCMImageIO")
            writer.SetFileName(str(encoded_path))
            writer.SetUseCompression(True)
            writer.SetCompressor(compressor)
            writer.Execute(sitk.GetImageFromArray(ds.pixel_array[np.newaxis]))
            encoded = pydicom.dcmread(encoded_path)
            encoded_path.unlink()
            ds.PixelData = encoded.PixelData
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            ds.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID
        ds.save_as(folder / path.name, enforce_file_format=True)
    return sorted(folder.iterdir())


@pytest.mark.parametrize(("compressor", "syntax"), [("RLE", "1.2.840.10008.1.2.5"), ("JPEG", "1.2.840.10008.1.2.4.70"),
                                                    ("JPEG2000", "1.2.840.10008.1.2.4.90")])
def test_a_compressed_series_reads_as_the_uncompressed_one(ct_series, tmp_path, compressor, syntax):
    """RLE is decoded by pydicom; JPEG lossless and JPEG 2000, which pydicom cannot decode without optional
    plugins, by SimpleITK's GDCM."""
    files = compressed_copy(ct_series.files, tmp_path / compressor, compressor)
    assert str(pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID) == syntax
    volume = read_volume(tmp_path / compressor)
    np.testing.assert_array_equal(volume.array, ct_series.expected.array)
    assert volume.geometry.allclose(ct_series.expected.geometry, atol=1e-4)


def test_ct_series_reads_back_in_hu_on_its_oblique_grid(ct_series):
    volume = read_volume(ct_series.folder)
    assert volume.shape == ct_series.expected.shape
    assert volume.array.dtype == np.int16  # 0.5 * stored - 1024 is integral here: HU fits int16
    np.testing.assert_array_equal(volume.array, ct_series.expected.array)
    assert volume.geometry.allclose(ct_series.expected.geometry, atol=1e-4)
    assert volume.modality == "CT"
    meta = volume.metadata
    assert meta["format"] == "dicom"
    assert meta["series_instance_uid"] == ct_series.series_uid
    assert meta["study_instance_uid"] == ct_series.study_uid
    assert meta["photometric_interpretation"] == "MONOCHROME2"
    assert (meta["window_center"], meta["window_width"]) == (40.0, 400.0)
    assert (meta["rescale_slope"], meta["rescale_intercept"]) == (0.5, -1024.0)
    assert meta["source_files"] == [str(p.resolve()) for p in ct_series.files]


def test_slice_order_comes_from_positions_not_file_names(ct_series):
    by_name = sorted(str(p.resolve()) for p in ct_series.files)
    volume = read_volume(ct_series.folder)
    assert volume.metadata["source_files"] != by_name  # the fixture really shuffles names
    instance_numbers = [
        int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber)
        for f in volume.metadata["source_files"]
    ]
    assert instance_numbers != sorted(instance_numbers)  # ... and instance numbers
    normal = np.cross(
        *np.asarray(pydicom.dcmread(ct_series.files[0]).ImageOrientationPatient, float).reshape(2, 3)
    )
    distances = [
        float(np.dot(pydicom.dcmread(f).ImagePositionPatient, normal))
        for f in volume.metadata["source_files"]
    ]
    assert np.all(np.diff(distances) > 0)


def test_ct_series_matches_simpleitk_series_reader(ct_series):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(ct_series.folder)))
    reference = reader.Execute()
    volume = read_volume(ct_series.folder)
    np.testing.assert_allclose(volume.array, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(volume.geometry.spacing, reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(volume.geometry.origin, reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(
        volume.geometry.direction_matrix().ravel(), reference.GetDirection(), atol=1e-5
    )


def test_folder_with_two_series_needs_a_choice(two_series_folder):
    folder, series = two_series_folder
    listed = list_dicom_series(folder)
    assert [s.series_number for s in listed] == [3, 7]
    with pytest.raises(ImageReadError) as caught:
        read_volume(folder)
    message = str(caught.value)
    assert str(folder) in message and "2 DICOM series" in message
    for s in series.values():
        assert s.series_uid in message
    assert "series number 3" in message and "series number 7" in message


def test_pick_series_by_number_or_uid(two_series_folder):
    folder, series = two_series_folder
    mr = read_volume(folder, series_number=7)
    assert mr.modality == "MR" and mr.shape == series[7].expected.shape
    np.testing.assert_array_equal(mr.array, series[7].expected.array)
    assert mr.geometry.allclose(series[7].expected.geometry)
    ct = read_volume(folder, series_uid=series[3].series_uid)
    np.testing.assert_array_equal(ct.array, series[3].expected.array)
    with pytest.raises(ImageReadError, match="no series with series number 5"):
        read_volume(folder, series_number=5)
    with pytest.raises(ImageReadError, match="no series with SeriesInstanceUID 1.2.3"):
        read_volume(folder, series_uid="1.2.3")


def test_a_file_of_a_series_stands_for_the_whole_series(two_series_folder):
    """As viewers open a series from one of its files: ``whole_series`` reads every file of that series from the
    file's folder, and only those (the folder holds two series); without it the file is one slice."""
    folder, series = two_series_folder
    for number in (3, 7):
        one_file = series[number].files[len(series[number].files) // 2]
        whole = read_volume(one_file, whole_series=True)
        np.testing.assert_array_equal(whole.array, series[number].expected.array)
        assert whole.geometry.allclose(series[number].expected.geometry)
        assert whole.metadata["series_number"] == number
        assert read_volume(one_file).shape[0] == 1
    with pytest.raises(SeveralSeriesError, match="2 DICOM series"):
        read_volume(folder)


def test_describe_dicom_folders(two_series_folder, ct_series):
    folder, series = two_series_folder
    info = describe(folder)
    assert info["kind"] == "dicom_folder" and len(info["series"]) == 2
    assert {s["series_number"] for s in info["series"]} == {3, 7}
    one_file = describe(series[7].files[4])  # the series it stands for, as propagate reads it
    assert one_file["kind"] == "dicom_series_file" and one_file["series_files"] == len(series[7].files)
    assert one_file["shape"] == list(series[7].expected.shape) and one_file["modality"] == "MR"
    single = describe(ct_series.folder)
    assert single["shape"] == list(ct_series.expected.shape)
    assert single["modality"] == "CT" and single["preset"] == "dicom"
    assert single["window_center"] == 40.0
    assert single["intensity_min"] == float(ct_series.expected.array.min())


def test_slices_stacked_against_the_normal_come_back_right_handed(tmp_path, data_file):
    """Slices written along -normal: the reader sorts along +normal, so k is reversed and the origin moves."""
    import nibabel as nib

    values = np.asarray(nib.load(data_file(HIPPOCAMPUS_IMAGE)).dataobj).transpose(2, 1, 0)[:8].round()
    left_handed = Geometry(
        spacing=(1.0, 1.0, 3.0),
        origin=(0.0, 0.0, 50.0),
        direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    )
    series = write_dicom_series(tmp_path / "lh", values, left_handed)
    volume = read_volume(series.folder)
    np.testing.assert_array_equal(volume.array, values[::-1])
    expected = Geometry(
        spacing=(1.0, 1.0, 3.0),
        origin=(0.0, 0.0, 50.0 - 7 * 3.0),
        direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    )
    assert volume.geometry.allclose(expected)
    # The same physical point holds the same value in both grids.
    point = left_handed.ijk_to_lps() @ np.array([5, 7, 2, 1.0])
    i, j, k, _ = np.rint(np.linalg.inv(volume.geometry.ijk_to_lps()) @ point).astype(int)
    assert volume.array[k, j, i] == values[2, 7, 5]


def test_truncated_pixel_data_names_the_file(ct_series, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(ct_series.folder, folder)
    victim = sorted(folder.iterdir())[3]
    content = victim.read_bytes()
    victim.write_bytes(content[: len(content) - 500])
    with pytest.raises(ImageReadError) as caught:
        read_volume(folder)
    assert victim.name in str(caught.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_garbage_after_dicom_marker_names_the_file(ct_series, tmp_path):
    folder = tmp_path / "garbage"
    shutil.copytree(ct_series.folder, folder)
    bad = folder / "corrupt.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + bytes(range(256)) * 4)
    with pytest.raises(ImageReadError, match="corrupt.dcm"):
        read_volume(folder)
    with pytest.raises(ImageReadError, match="corrupt.dcm"):
        read_volume(bad)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_modality_values_of_an_unreadable_file_names_it(ct_series, tmp_path):
    # An unknown VR makes pydicom's dcmread raise NotImplementedError: modality_values read the file itself (no
    # dataset given) and once failed with a TypeError on the missing dataset instead of an ImageReadError.
    content = ct_series.files[0].read_bytes()
    tag = b"\x02\x00\x10\x00UI"  # TransferSyntaxUID, explicit VR
    assert tag in content
    bad = tmp_path / "bad_vr.dcm"
    bad.write_bytes(content.replace(tag, b"\x02\x00\x10\x00U\xff", 1))
    with pytest.raises(ImageReadError, match="bad_vr.dcm.*cannot be read"):
        modality_values(bad)


def test_a_localizer_kept_in_the_series_is_named(ct_series, tmp_path):
    """Files of one series with another orientation or size (a localizer, a reformat) are named, with what differs."""
    for case in ("orientation", "size"):
        folder = tmp_path / case
        shutil.copytree(ct_series.folder, folder)
        odd = sorted(folder.iterdir())[3]
        ds = pydicom.dcmread(odd)
        if case == "orientation":
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal image among oblique axial ones
            expected = rf"ImageOrientationPatient: 1 of {len(ct_series.files)} files \({odd.name}\) have orientation"
        else:
            ds.Rows = ds.Rows // 2
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
            expected = rf"differ in size: 1 of {len(ct_series.files)} files \({odd.name}\) have rows, columns"
        ds.save_as(odd)
        with pytest.raises(ImageReadError, match=expected + r".*a localizer or a reformat kept in the series"):
            read_volume(folder)


def test_a_missing_slice_is_named_with_the_error_it_causes(ct_series, tmp_path):
    """A series with one file missing is read with an even spacing; the warning says where the gap is, that a
    file may be missing and how far slices then lie from their true positions."""
    folder = tmp_path / "gap"
    folder.mkdir()
    kept = [f for n, f in enumerate(ct_series.files) if n != 12]  # files in slice order: slice 12 missing
    for f in kept:
        shutil.copy(f, folder / f.name)
    spacing = ct_series.expected.geometry.spacing[2]
    with pytest.warns(UserWarning, match=r"5 mm between slices 11 and 12 \(a missing file\?\)") as caught:
        volume = read_volume(folder)
    assert volume.shape[0] == len(kept)
    message = str(caught[0].message)
    assert f"slices are {spacing:.3g} mm apart" in message and "DICOM SEG keeps each slice's own position" in message
    # the worst displacement of an even spacing over 39 slices with one double step
    mean = spacing * len(ct_series.files[:-1]) / (len(kept) - 1)
    worst = max(abs(spacing * (k + (k >= 12)) - mean * k) for k in range(len(kept)))
    assert f"up to {worst:.3g} mm" in message


def test_two_slices_at_one_position_are_refused_as_4d(ct_series, tmp_path):
    folder = tmp_path / "echoes"
    shutil.copytree(ct_series.folder, folder)
    duplicate = pydicom.dcmread(ct_series.files[5])
    duplicate.SOPInstanceUID = pydicom.uid.generate_uid()
    duplicate.file_meta.MediaStorageSOPInstanceUID = duplicate.SOPInstanceUID
    duplicate.save_as(folder / "second_echo", enforce_file_format=True)
    with pytest.raises(ImageReadError, match="share a position"):
        read_volume(folder)


def test_empty_folder_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no DICOM image series found: the folder holds no files"):
        read_volume(tmp_path / "empty")
    # a folder of NIfTI studies: what it holds, and that a NIfTI study is given as its file
    (tmp_path / "nifti" / "images").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "nifti" / "images" / "case.nii.gz")
    for call in (read_volume, describe):
        with pytest.raises(ImageReadError, match=r"holds 1 other file\(s\) \(images/case.nii.gz\): give a NIfTI"):
            call(tmp_path / "nifti")
    # DICOM files that hold no image (here a structured report)
    report = pydicom.Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    report.SOPInstanceUID = report.SeriesInstanceUID = pydicom.uid.generate_uid()
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    (tmp_path / "reports").mkdir()
    report.save_as(tmp_path / "reports" / "sr.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"its 1 DICOM file\(s\) \(sr.dcm\) hold no images"):
        read_volume(tmp_path / "reports")
    with pytest.raises(FileNotFoundError):
        read_volume(tmp_path / "nowhere")


def test_monochrome1_radiograph_is_flagged_and_inverted_by_the_preset(monochrome1_radiograph):
    path, png = monochrome1_radiograph
    image = read_image_2d(path)
    assert image.shape == (1,) + png.shape and image.modality == "DX"
    np.testing.assert_array_equal(image.array[0], 4095 - 16 * png.astype(np.int32))  # stored, not inverted
    assert image.metadata["photometric_interpretation"] == "MONOCHROME1"
    assert (image.metadata["window_center"], image.metadata["window_width"]) == (2048.0, 4096.0)
    assert image.geometry.spacing[:2] == (0.15, 0.15)  # from ImagerPixelSpacing
    assert choose_preset(image) == "radiograph"
    shown = normalise(image)
    assert shown.shape == (1,) + png.shape + (3,)
    np.testing.assert_allclose(shown[0, ..., 0], png / 255.0, atol=0.005)  # bright bone stays bright


def test_read_image_2d_refuses_a_series_folder(ct_series):
    with pytest.raises(ImageReadError, match="folder"):
        read_image_2d(ct_series.folder)


def test_enhanced_multiframe_ct_reads_like_its_series(ct_series, tmp_path):
    import highdicom as hd

    legacy = [pydicom.dcmread(f) for f in ct_series.files]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=hd.UID(), series_number=30, sop_instance_uid=hd.UID(), instance_number=1
    )
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    volume = read_volume(path)
    reference = read_volume(ct_series.folder)
    assert volume.shape == reference.shape
    np.testing.assert_allclose(volume.array, reference.array)
    assert volume.geometry.allclose(reference.geometry, atol=1e-3)
    assert volume.metadata["multiframe"] is True


def test_oblique_fixture_geometry_is_really_oblique():
    direction = oblique_ct_geometry().direction_matrix()
    assert not np.allclose(direction, np.eye(3), atol=0.05)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-12)
    assert np.linalg.det(direction) > 0


def test_series_listing_is_recursive(ct_series, tmp_path):
    nested = tmp_path / "export" / "patient" / "study"
    shutil.copytree(ct_series.folder, nested / "series")
    assert [s.n_files for s in list_dicom_series(tmp_path / "export")] == [len(ct_series.files)]
    assert list_dicom_series(tmp_path / "export", recursive=False) == []


def test_voi_lut_sequence_of_a_radiograph_matches_pydicom(tmp_path, data_file):
    from conftest import CXR_IMAGE, DX_IMAGE_STORAGE, _base_dataset
    from PIL import Image
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_voi_lut

    png = np.asarray(Image.open(data_file(CXR_IMAGE)).convert("L"))[:200, :300]
    ds = _base_dataset(DX_IMAGE_STORAGE, "DX", pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 1)
    ds.InstanceNumber, ds.Rows, ds.Columns = 1, *png.shape
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.PixelData = (png.astype(np.uint16) * 16).tobytes()
    item = Dataset()
    item.LUTDescriptor = [3000, 500, 12]  # 3000 entries from stored value 500, 12-bit output
    item.add_new(
        "LUTData", "US", np.round(4095 * np.sqrt(np.linspace(0, 1, 3000))).astype(np.uint16).tolist()
    )
    ds.VOILUTSequence = [item]
    path = tmp_path / "lut.dcm"
    ds.save_as(path, enforce_file_format=True)
    image = read_image_2d(path)
    assert image.metadata["voi_lut"]["first_mapped"] == 500 and len(image.metadata["voi_lut"]["data"]) == 3000
    assert choose_preset(image) == "radiograph"
    expected = apply_voi_lut(pydicom.dcmread(path).pixel_array, pydicom.dcmread(path)) / 4095.0
    np.testing.assert_allclose(normalise(image)[0, ..., 0], expected, atol=1e-6)
