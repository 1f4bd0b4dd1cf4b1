"""Readers on real data: NIfTI, NRRD, MHA/MHD, PNG/JPEG/BMP/TIFF, label maps, and bad inputs."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import (
    ACDC_IMAGE,
    ACDC_LABELS,
    BRATS_FLAIR,
    BRATS_LABELS,
    CXR_IMAGE,
    CXR_MASK,
    HIPPOCAMPUS_IMAGE,
    HIPPOCAMPUS_LABELS,
    PH2_IMAGE,
    PH2_MASK,
    oblique_ct_geometry,
)
from PIL import Image

from insid3_med.imaging.errors import ImageNotFoundError, ImageReadError
from insid3_med.imaging.geometry import Geometry
from insid3_med.imaging.readers import describe, read_image_2d, read_label_volume, read_volume


def _sitk_geometry(image: sitk.Image) -> Geometry:
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return Geometry(image.GetSpacing(), image.GetOrigin(), tuple(tuple(r) for r in direction))


@pytest.mark.parametrize("relative", [HIPPOCAMPUS_IMAGE, ACDC_IMAGE, BRATS_FLAIR])
def test_nifti_reads_as_kji_with_the_nibabel_affine(data_file, relative):
    path = data_file(relative)
    image = nib.load(path)
    volume = read_volume(path)
    assert volume.shape == tuple(reversed(image.shape))
    np.testing.assert_array_equal(volume.array, np.asarray(image.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(volume.geometry.ijk_to_ras(), image.affine, atol=1e-5)
    assert volume.metadata["format"] == "nifti"
    assert volume.metadata["nifti_qform_code"] == int(image.header["qform_code"])
    assert volume.metadata["nifti_sform_code"] == int(image.header["sform_code"])
    assert volume.array.flags.c_contiguous and volume.source == path


@pytest.mark.parametrize("relative", [HIPPOCAMPUS_IMAGE, BRATS_FLAIR])
def test_nifti_geometry_in_lps_agrees_with_simpleitk(data_file, relative):
    path = data_file(relative)
    volume = read_volume(path)
    reference = sitk.ReadImage(str(path))
    assert volume.geometry.allclose(_sitk_geometry(reference), atol=1e-4)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_nrrd_and_metaimage_keep_oblique_geometry(data_file, tmp_path, suffix):
    source = read_volume(data_file(HIPPOCAMPUS_IMAGE))
    geometry = oblique_ct_geometry()
    image = sitk.GetImageFromArray(source.array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction_matrix().ravel().tolist())
    path = tmp_path / f"hippocampus{suffix}"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, source.array)
    assert volume.geometry.allclose(geometry, atol=1e-5)
    assert volume.metadata["format"] == ("nrrd" if suffix in (".nrrd", ".nhdr") else "metaimage")


def test_png_radiograph_reads_as_one_grey_slice(data_file):
    path = data_file(CXR_IMAGE)
    volume = read_image_2d(path)
    expected = np.asarray(Image.open(path))
    assert volume.array.shape == (1,) + expected.shape and volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array[0], expected)
    assert volume.modality == "OT" and not volume.is_rgb
    assert read_volume(path).shape == volume.shape  # read_volume hands 2D files to read_image_2d


def test_jpeg_photograph_stays_rgb(data_file):
    path = data_file(PH2_IMAGE)
    volume = read_image_2d(path)
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert volume.array.shape == (1,) + expected.shape and volume.is_rgb
    np.testing.assert_array_equal(volume.array[0], expected)
    assert volume.modality == "XC" and volume.metadata["format"] == "jpeg"


@pytest.mark.parametrize("suffix", [".bmp", ".tif"])
def test_bmp_and_tiff(data_file, tmp_path, suffix):
    grey = np.asarray(Image.open(data_file(CXR_IMAGE)))
    path = tmp_path / f"cxr{suffix}"
    Image.fromarray(grey).convert("RGB").save(path)  # saved as RGB: three equal channels come back grey
    volume = read_image_2d(path)
    np.testing.assert_array_equal(volume.array[0], grey)
    assert volume.metadata["grey_from_rgb"] is True


def test_16_bit_tiff_keeps_its_values(tmp_path):
    values = (np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) * 13 % 4096).astype(np.uint16)
    path = tmp_path / "detector.tiff"
    Image.fromarray(values).save(path)
    volume = read_image_2d(path)
    assert volume.array.dtype == np.uint16
    np.testing.assert_array_equal(volume.array[0], values)


def test_read_image_2d_refuses_a_volume(data_file):
    with pytest.raises(ImageReadError, match="slices; a 2D image"):
        read_image_2d(data_file(HIPPOCAMPUS_IMAGE))


@pytest.mark.parametrize(
    ("image", "labels", "values"),
    [
        (HIPPOCAMPUS_IMAGE, HIPPOCAMPUS_LABELS, {0, 1, 2}),
        (ACDC_IMAGE, ACDC_LABELS, {0, 1, 2, 3}),
        (BRATS_FLAIR, BRATS_LABELS, {0, 1, 2, 3, 4}),  # stored as float32 in the file
    ],
)
def test_label_volumes_on_their_image_grid(data_file, image, labels, values):
    like = read_volume(data_file(image))
    label_map = read_label_volume(data_file(labels), like)
    assert label_map.shape == like.shape and label_map.dtype == np.uint8
    assert set(np.unique(label_map).tolist()) == values
    expected = np.asarray(nib.load(data_file(labels)).dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(label_map, expected)


def test_2d_masks(data_file):
    cxr = read_image_2d(data_file(CXR_IMAGE))
    lungs = read_label_volume(data_file(CXR_MASK), cxr)
    assert lungs.shape == cxr.shape and set(np.unique(lungs).tolist()) <= {0, 1, 2, 3}
    assert lungs.any()
    ph2 = read_image_2d(data_file(PH2_IMAGE))
    lesion = read_label_volume(data_file(PH2_MASK), ph2)
    assert lesion.shape == ph2.shape and set(np.unique(lesion).tolist()) == {0, 255}


def test_palette_png_labels_are_palette_indices(tmp_path):
    from insid3_med.imaging.geometry import Volume

    indices = np.zeros((20, 30), dtype=np.uint8)
    indices[5:10, 5:25] = 2
    indices[12:18, 3:8] = 5
    mask = Image.fromarray(indices, mode="P")
    mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9, 200, 200, 0] + [0] * 750)
    path = tmp_path / "mask.png"
    mask.save(path)
    like = Volume(array=np.zeros((1, 20, 30), dtype=np.uint8))
    np.testing.assert_array_equal(read_label_volume(path, like)[0], indices)


def test_label_grid_mismatch_is_refused(data_file, tmp_path):
    like = read_volume(data_file(HIPPOCAMPUS_IMAGE))
    other = sorted((data_file(HIPPOCAMPUS_IMAGE).parents[1] / "labels").glob("*.nii.gz"))
    other_labels = next(
        p for p in other if nib.load(p).shape != nib.load(data_file(HIPPOCAMPUS_LABELS)).shape
    )
    with pytest.raises(ImageReadError, match="shape"):
        read_label_volume(other_labels, like)
    labels = nib.load(data_file(HIPPOCAMPUS_LABELS))
    shifted_affine = labels.affine.copy()
    shifted_affine[:3, 3] += [2.0, 0.0, 0.0]
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj), shifted_affine), shifted)
    with pytest.raises(ImageReadError, match="geometry") as caught:
        read_label_volume(shifted, like)
    assert "shifted.nii.gz" in str(caught.value)


def test_non_integer_label_map_is_refused(data_file):
    like = read_volume(data_file(HIPPOCAMPUS_IMAGE))
    with pytest.raises(ImageReadError, match="non-integer"):
        read_label_volume(data_file(HIPPOCAMPUS_IMAGE), like)  # an intensity image is no label map


def test_rgb_label_map_is_refused(data_file):
    ph2 = read_image_2d(data_file(PH2_IMAGE))
    with pytest.raises(ImageReadError, match="RGB"):
        read_label_volume(data_file(PH2_IMAGE), ph2)


def test_missing_file_is_an_image_read_error_and_file_not_found(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    for reader in (read_volume, read_image_2d, describe):
        with pytest.raises(ImageNotFoundError) as caught:
            reader(missing)
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, FileNotFoundError)
        assert str(missing) in str(caught.value)


def test_4d_nifti_is_refused(data_file, tmp_path):
    image = nib.load(data_file(HIPPOCAMPUS_IMAGE))
    data = np.asarray(image.dataobj)
    path = tmp_path / "dynamic.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), image.affine), path)
    with pytest.raises(ImageReadError, match="4D") as caught:
        read_volume(path)
    assert "dynamic.nii.gz" in str(caught.value)
    single = tmp_path / "single_frame.nii.gz"
    nib.save(nib.Nifti1Image(data[..., np.newaxis], image.affine), single)
    assert read_volume(single).shape == tuple(reversed(data.shape))  # a trailing 1 is still 3D


def test_4d_nrrd_is_refused(tmp_path):
    path = tmp_path / "dynamic.nrrd"
    sitk.WriteImage(sitk.Image([4, 5, 6, 2], sitk.sitkUInt8), str(path))
    with pytest.raises(ImageReadError, match="4D"):
        read_volume(path)


def test_corrupt_files_are_image_read_errors(data_file, tmp_path):
    truncated = tmp_path / "truncated.nii.gz"
    content = data_file(HIPPOCAMPUS_IMAGE).read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(ImageReadError, match="truncated.nii.gz"):
        read_volume(truncated)
    not_gzip = tmp_path / "plain.nii.gz"
    not_gzip.write_bytes(b"this is not a NIfTI file at all" * 20)
    with pytest.raises(ImageReadError, match="plain.nii.gz"):
        read_volume(not_gzip)
    broken_png = tmp_path / "broken.png"
    broken_png.write_bytes(data_file(CXR_IMAGE).read_bytes()[:200])
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image_2d(broken_png)
    broken_nrrd = tmp_path / "broken.nrrd"
    broken_nrrd.write_text("NRRD0004\ntype: what\ndimension: 9\n\n")
    with pytest.raises(ImageReadError, match="broken.nrrd"):
        read_volume(broken_nrrd)
    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello")
    with pytest.raises(ImageReadError, match="unsupported format"):
        read_volume(unknown)
    with gzip.open(tmp_path / "empty.nii.gz", "wb"):
        pass
    with pytest.raises(ImageReadError):
        read_volume(tmp_path / "empty.nii.gz")


def test_series_choice_on_a_file_is_an_error(data_file):
    with pytest.raises(ImageReadError, match="DICOM folder"):
        read_volume(data_file(HIPPOCAMPUS_IMAGE), series_number=2)


def test_describe_a_nifti_file_and_a_photo(data_file):
    import json

    info = describe(data_file(BRATS_FLAIR))
    json.dumps(info)  # JSON-ready for the info command
    assert info["kind"] == "file" and info["format"] == "nifti"
    assert info["shape"] == [155, 240, 240] and info["dtype"] == "float32"
    assert info["spacing"] == [1.0, 1.0, 1.0] and info["preset"] == "mr"
    volume = read_volume(data_file(BRATS_FLAIR))
    assert info["intensity_min"] == pytest.approx(float(volume.array.min()))
    assert info["intensity_max"] == pytest.approx(float(volume.array.max()))
    photo = describe(data_file(PH2_IMAGE))
    assert photo["rgb"] is True and photo["preset"] == "rgb" and photo["modality"] == "XC"
