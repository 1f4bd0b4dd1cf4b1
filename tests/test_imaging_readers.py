"""Readers on real data: NIfTI, NRRD, MHA/MHD, PNG/JPEG/BMP/TIFF, label maps, and bad inputs."""

from __future__ import annotations

import gzip
from pathlib import Path

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

from insid3_med.imaging.errors import ImageNotFoundError, ImageReadError, SeveralFramesError
from insid3_med.imaging.geometry import Geometry, OutsideGridError, Volume, place_on_grid
from insid3_med.imaging.readers import (
    check_frame,
    count_frames,
    describe,
    read_image_2d,
    read_label_names,
    read_label_volume,
    read_volume,
)


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
    shifted_affine[:3, 3] += [0.5, 0.0, 0.0]  # half a voxel: off the image's voxel lattice
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj), shifted_affine), shifted)
    with pytest.raises(ImageReadError, match=r"lies on another grid: voxels up to 0.5 mm \(0.5 voxel\) from the "
                       r"image's, where up to 0.01 mm is the same grid \(origin ") as caught:
        read_label_volume(shifted, like)
    assert "shifted.nii.gz" in str(caught.value)
    # a header that differs by a fraction of a percent of a voxel (written in float32, or rounded) is the same grid
    for offset, same in ((0.004, True), (0.03, False)):
        nudged_affine = labels.affine.copy()
        nudged_affine[:3, 3] += [offset, -offset, 0.0]
        nib.save(nib.Nifti1Image(np.asarray(labels.dataobj), nudged_affine), tmp_path / "nudged.nii.gz")
        if same:
            np.testing.assert_array_equal(read_label_volume(tmp_path / "nudged.nii.gz", like),
                                          read_label_volume(data_file(HIPPOCAMPUS_LABELS), like))
        else:
            with pytest.raises(ImageReadError, match="0.0424 mm"):
                read_label_volume(tmp_path / "nudged.nii.gz", like)
    # a spacing 0.1% off is 0.07 mm at the far corner of this 35 x 50 x 35 grid: another grid, and the message says
    scaled_affine = labels.affine.copy()
    scaled_affine[:3, :3] *= 1.001
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj), scaled_affine), tmp_path / "scaled.nii.gz")
    with pytest.raises(ImageReadError, match=r"\(spacing \[1.001, 1.001, 1.001\] mm against \[1.0, 1.0, 1.0\]\)"):
        read_label_volume(tmp_path / "scaled.nii.gz", like)


def test_an_image_given_as_its_labels_is_refused(data_file, tmp_path):
    """The arguments swapped (the image where its label map goes) would propagate hundreds of "structures" for
    hours: an MR volume as 16 or 8 bits is refused; a map of 100 structures over 60% of the voxels (an atlas, a
    whole-body segmentation) is not."""
    like = read_volume(data_file(HIPPOCAMPUS_IMAGE))
    source = nib.load(data_file(HIPPOCAMPUS_IMAGE))
    values = np.asarray(source.dataobj)
    for name, image in (("u16.nii.gz", values.round().astype(np.uint16)),
                        ("u8.nii.gz", (values / values.max() * 255).round().astype(np.uint8))):
        nib.save(nib.Nifti1Image(image, source.affine), tmp_path / name)
        with pytest.raises(ImageReadError, match=rf"{name}: \d+ distinct values over 100% of the voxels: an image "
                           "rather than a label map"):
            read_label_volume(tmp_path / name, like)
    atlas = np.zeros(values.shape, np.uint8)
    flat = atlas.reshape(-1)
    covered = int(0.6 * flat.size)
    flat[:covered] = np.arange(covered) * 100 // covered + 1  # 100 structures in runs over 60% of the voxels
    nib.save(nib.Nifti1Image(atlas, source.affine), tmp_path / "atlas.nii.gz")
    assert len(np.unique(read_label_volume(tmp_path / "atlas.nii.gz", like))) == 101


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


def test_a_frame_of_a_4d_nifti_is_read_and_4d_without_a_frame_is_refused(data_file, tmp_path):
    image = nib.load(data_file(HIPPOCAMPUS_IMAGE))
    data = np.asarray(image.dataobj)
    path = tmp_path / "dynamic.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, 2 * data, 3 * data], axis=-1), image.affine), path)
    shape = r"\(34, 47, 40, 3\)"
    with pytest.raises(SeveralFramesError, match=rf"dynamic.nii.gz: 4D image of shape {shape}: 3 frames") as caught:
        read_volume(path)
    assert caught.value.frames == 3
    whole = read_volume(data_file(HIPPOCAMPUS_IMAGE))
    for frame in range(3):
        volume = read_volume(path, frame=frame)
        np.testing.assert_array_equal(volume.array, (frame + 1) * whole.array)
        assert volume.geometry.allclose(whole.geometry) and volume.metadata["frame"] == frame
    for call in (read_volume, check_frame):
        with pytest.raises(ImageReadError, match=r"frame 3 asked of a 4D image with 3 frames \(0 to 2\)"):
            call(path, frame=3)
        with pytest.raises(ImageReadError, match="a 3D image of shape .*: a frame is chosen in a 4D image only"):
            call(data_file(HIPPOCAMPUS_IMAGE), frame=0)
    check_frame(path, 2)  # headers only: nothing to say
    assert count_frames(path) == 3
    for other, message in ((data_file(HIPPOCAMPUS_IMAGE), "a 3D image of shape"),
                           (tmp_path, "4D NIfTI, NRRD or MetaImage file only")):
        with pytest.raises(ImageReadError, match=message):
            count_frames(other)
    info = describe(path)
    assert (info["kind"], info["frames"], info["described_frame"], info["shape"]) == ("4d_file", 3, 0, [40, 47, 34])
    single = tmp_path / "single_frame.nii.gz"
    nib.save(nib.Nifti1Image(data[..., np.newaxis], image.affine), single)
    assert read_volume(single).shape == tuple(reversed(data.shape))  # a trailing 1 is still 3D


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_a_frame_of_a_4d_nrrd_or_metaimage_is_read(tmp_path, suffix):
    frames = np.arange(2 * 6 * 5 * 4, dtype=np.int16).reshape(2, 6, 5, 4)  # (t, z, y, x)
    image = sitk.JoinSeries([sitk.GetImageFromArray(frame) for frame in frames])
    path = tmp_path / f"dynamic{suffix}"
    sitk.WriteImage(image, str(path))
    with pytest.raises(SeveralFramesError, match="2 frames"):
        read_volume(path)
    np.testing.assert_array_equal(read_volume(path, frame=1).array, frames[1])
    assert count_frames(path) == 2
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "photo.png")
    for other in (tmp_path / "photo.png", tmp_path):  # a 2D image, a folder (DICOM)
        with pytest.raises(ImageReadError, match="a frame is chosen in a 4D NIfTI, NRRD or MetaImage file only"):
            read_volume(other, frame=0)


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
    assert info["slice_planes"] == {"k": "axial", "j": "coronal", "i": "sagittal"}  # a BraTS volume is stored axially
    volume = read_volume(data_file(BRATS_FLAIR))
    assert info["intensity_min"] == pytest.approx(float(volume.array.min()))
    assert info["intensity_max"] == pytest.approx(float(volume.array.max()))
    photo = describe(data_file(PH2_IMAGE))
    assert photo["rgb"] is True and photo["preset"] == "rgb" and photo["modality"] == "XC"


def _sub_grid(labels: np.ndarray, geometry: Geometry, low_ijk: tuple[int, int, int], high_ijk: tuple[int, int, int],
              order: tuple[int, int, int] = (0, 1, 2), reversed_axes: tuple[bool, bool, bool] = (False, False, False),
              ) -> tuple[np.ndarray, Geometry]:
    """The box [low, high) (i, j, k) of ``labels`` (K, J, I) stored as its own grid: its voxel axis c runs along the
    image's axis ``order[c]``, backwards where ``reversed_axes[c]``. Zeros where the box leaves the image."""
    size = [high_ijk[a] - low_ijk[a] for a in range(3)]
    box = np.zeros(size[::-1], dtype=labels.dtype)
    inside = tuple(slice(max(low_ijk[a], 0), min(high_ijk[a], labels.shape[2 - a])) for a in (2, 1, 0))
    box[tuple(slice(s.start - low_ijk[2 - n], s.stop - low_ijk[2 - n]) for n, s in enumerate(inside))] = labels[inside]
    array = np.transpose(box, [2 - order[c] for c in (2, 1, 0)])  # source (k, j, i) axes
    axes = np.zeros((3, 3))
    start = np.asarray(low_ijk, dtype=np.float64)
    for c in range(3):
        axes[order[c], c] = -1.0 if reversed_axes[c] else 1.0
        if reversed_axes[c]:
            array = np.flip(array, axis=2 - c)
            start[order[c]] = high_ijk[order[c]] - 1
    image = geometry.ijk_to_lps()
    affine = np.eye(4)
    affine[:3, :3] = image[:3, :3] @ axes
    affine[:3, 3] = image[:3, :3] @ start + image[:3, 3]
    return np.ascontiguousarray(array), Geometry.from_ijk_to_lps(affine)


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 0, 1)])
@pytest.mark.parametrize("reversed_axes", [(False, False, False), (True, False, False), (False, True, True)])
def test_place_on_grid_undoes_crop_axis_order_and_reversal(order, reversed_axes):
    rng = np.random.default_rng(3)
    image = oblique_ct_geometry()
    labels = np.zeros((12, 30, 25), dtype=np.uint8)
    labels[3:8, 10:20, 5:15] = rng.integers(0, 3, (5, 10, 10))
    array, geometry = _sub_grid(labels, image, (3, 8, 2), (20, 25, 10), order, reversed_axes)
    assert not geometry.allclose(image)
    placed = place_on_grid(array, geometry, image, labels.shape)
    expected = np.zeros_like(labels)
    expected[2:10, 8:25, 3:20] = labels[2:10, 8:25, 3:20]
    assert placed is not None and placed.dtype == labels.dtype
    np.testing.assert_array_equal(placed, expected)


def test_place_on_grid_refuses_other_lattices_and_labels_outside():
    image = oblique_ct_geometry()
    labels = np.zeros((12, 30, 25), dtype=np.uint8)
    labels[3:8, 10:20, 5:15] = 1
    array, geometry = _sub_grid(labels, image, (3, 8, 2), (20, 25, 10))
    half_voxel = Geometry(geometry.spacing, tuple(np.add(geometry.origin, np.asarray(image.direction_matrix())[:, 0]
                                                         * 0.35)), geometry.direction)
    coarser = Geometry(tuple(2 * s for s in geometry.spacing), geometry.origin, geometry.direction)
    assert place_on_grid(array, half_voxel, image, labels.shape) is None
    assert place_on_grid(array, coarser, image, labels.shape) is None
    beyond, beyond_geometry = _sub_grid(labels, image, (-4, 8, 2), (20, 25, 10))  # 4 columns left of the image
    assert place_on_grid(beyond, beyond_geometry, image, labels.shape) is not None  # empty there: fine
    beyond[:, :, 0] = 2
    with pytest.raises(OutsideGridError, match="outside"):
        place_on_grid(beyond, beyond_geometry, image, labels.shape)


def test_cropped_and_reordered_label_maps_land_on_the_image_grid(data_file, tmp_path):
    """A segmentation saved cropped to its structure (older 3D Slicer versions did so by default), as .seg.nrrd or
    NRRD, or a NIfTI label map whose axes are stored reversed, reads back on the image's grid."""
    from insid3_med.imaging.writers import write_seg_nrrd

    like = read_volume(data_file(HIPPOCAMPUS_IMAGE))
    labels = read_label_volume(data_file(HIPPOCAMPUS_LABELS), like)
    nonzero = np.nonzero(labels)
    low = tuple(int(nonzero[2 - a].min()) for a in range(3))
    high = tuple(int(nonzero[2 - a].max()) + 1 for a in range(3))
    cropped, cropped_geometry = _sub_grid(labels, like.geometry, low, high)
    assert cropped.shape != labels.shape and int(np.count_nonzero(cropped)) == int(np.count_nonzero(labels))
    seg = write_seg_nrrd(cropped, Volume(array=cropped, geometry=cropped_geometry), tmp_path / "cropped.seg.nrrd")
    np.testing.assert_array_equal(read_label_volume(seg, like), labels)
    image = sitk.GetImageFromArray(cropped)
    image.SetSpacing(cropped_geometry.spacing)
    image.SetOrigin(cropped_geometry.origin)
    image.SetDirection(cropped_geometry.direction_matrix().ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / "cropped.nrrd"))
    np.testing.assert_array_equal(read_label_volume(tmp_path / "cropped.nrrd", like), labels)
    full = tuple(int(s) for s in like.shape[::-1])
    flipped, flipped_geometry = _sub_grid(labels, like.geometry, (0, 0, 0), full, reversed_axes=(True, False, True))
    nib.save(nib.Nifti1Image(flipped.transpose(2, 1, 0), flipped_geometry.ijk_to_ras()), tmp_path / "flipped.nii.gz")
    np.testing.assert_array_equal(read_label_volume(tmp_path / "flipped.nii.gz", like), labels)
    # Two voxels further along i: the same lattice, so the labels move with it
    moved, moved_geometry = _sub_grid(labels, like.geometry, (-2, 0, 0), (full[0] - 2, full[1], full[2]))
    nib.save(nib.Nifti1Image(moved.transpose(2, 1, 0), moved_geometry.ijk_to_ras()), tmp_path / "moved.nii.gz")
    np.testing.assert_array_equal(read_label_volume(tmp_path / "moved.nii.gz", like), labels)


def test_labels_beyond_the_image_are_refused_naming_the_file(data_file, tmp_path):
    like = read_volume(data_file(HIPPOCAMPUS_IMAGE))
    labels = read_label_volume(data_file(HIPPOCAMPUS_LABELS), like)
    full = tuple(int(s) for s in like.shape[::-1])
    larger, larger_geometry = _sub_grid(labels, like.geometry, (-3, 0, 0), full)
    larger[:, :, 0] = 1  # a column of labels left of the image
    nib.save(nib.Nifti1Image(larger.transpose(2, 1, 0), larger_geometry.ijk_to_ras()), tmp_path / "larger.nii.gz")
    with pytest.raises(ImageReadError, match="outside the image") as caught:
        read_label_volume(tmp_path / "larger.nii.gz", like)
    assert "larger.nii.gz" in str(caught.value)


def test_dicom_seg_reads_as_labels_on_its_series_and_on_a_nifti_copy(ct_series, data_file, tmp_path,
                                                                      monkeypatch):
    """A DICOM SEG (here this package's own, holding three labelled slices) as the label map of the series it
    references, by SOPInstanceUID, and of a NIfTI copy of that series, by its frames' positions."""
    import highdicom as hd
    import pydicom

    from insid3_med.imaging.writers import write_dicom_seg

    volume = read_volume(ct_series.folder)
    assert volume.metadata["sop_instance_uids"] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in volume.metadata["source_files"]]
    truth = np.asarray(nib.load(data_file(HIPPOCAMPUS_LABELS)).dataobj).transpose(2, 1, 0).astype(np.uint8)
    some = np.zeros_like(truth)
    some[[10, 12, 20]] = truth[[10, 12, 20]]
    seg = write_dicom_seg(some, volume, tmp_path / "three_slices.dcm", {1: "anterior", 2: "posterior"})
    with monkeypatch.context() as patch:  # on its own series, the SEG is read by SOPInstanceUID, not by positions

        def by_positions(*args: object, **kwargs: object) -> None:
            raise AssertionError("read by positions")

        patch.setattr(hd.seg.Segmentation, "get_volume", by_positions)
        np.testing.assert_array_equal(read_label_volume(seg, volume), some)
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume.array.transpose(2, 1, 0), volume.geometry.ijk_to_ras()), nifti)
    np.testing.assert_array_equal(read_label_volume(seg, read_volume(nifti)), some)
    first = np.zeros_like(truth)  # frames from the series' first slice on: the SEG's volume starts where the image does
    first[:3, 10:30, 10:20] = 1
    seg = write_dicom_seg(first, volume, tmp_path / "first_slices.dcm")
    np.testing.assert_array_equal(read_label_volume(seg, read_volume(nifti)), first)


def test_a_broken_dicom_seg_names_the_file(ct_series, data_file, tmp_path):
    from insid3_med.imaging.writers import write_dicom_seg

    volume = read_volume(ct_series.folder)
    truth = np.asarray(nib.load(data_file(HIPPOCAMPUS_LABELS)).dataobj).transpose(2, 1, 0).astype(np.uint8)
    seg = write_dicom_seg(truth, volume, tmp_path / "seg.dcm")
    broken = tmp_path / "broken_seg.dcm"
    broken.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    with pytest.raises(ImageReadError) as caught:
        read_label_volume(broken, volume)
    assert "broken_seg.dcm" in str(caught.value)


def _highdicom_seg(volume, pixels: np.ndarray, path: Path, segments: int, fractional: bool = False) -> Path:
    """A DICOM SEG built with highdicom itself on the series ``volume`` was read from; pixels: (frames, rows,
    columns, segments) (binary) or (frames, rows, columns) in [0, 1] (fractional, one segment)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in volume.metadata["source_files"]]
    algorithm = hd.AlgorithmIdentificationSequence(name="test", family=codes.cid7162.ArtificialIntelligence,
                                                   version="1")
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=f"part {n}", segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for n in range(1, segments + 1)]
    kind = hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY
    segmentation = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=kind, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="0")
    segmentation.save_as(path)
    return path


def test_fractional_or_overlapping_dicom_seg_is_refused_naming_the_file(ct_series, tmp_path):
    """A label map needs one label per voxel: a fractional SEG (probabilities) and a binary SEG whose segments
    overlap are both refused with a message that names the file."""
    volume = read_volume(ct_series.folder)
    frames = np.zeros(volume.shape, dtype=np.float32)
    frames[10, 5:15, 5:15] = 0.7
    fractional = _highdicom_seg(volume, frames, tmp_path / "fractional_seg.dcm", 1, fractional=True)
    with pytest.raises(ImageReadError, match="needs a binary segmentation") as caught:
        read_label_volume(fractional, volume)
    assert "fractional_seg.dcm" in str(caught.value)
    both = np.zeros((*volume.shape, 2), dtype=np.uint8)
    both[10, 5:15, 5:15, 0] = 1
    both[10, 10:20, 10:20, 1] = 1  # overlaps segment 1 on a 5 x 5 square
    overlapping = _highdicom_seg(volume, both, tmp_path / "overlapping_seg.dcm", 2)
    nifti = tmp_path / "ct.nii.gz"  # by SOPInstanceUID on its series, by positions on a NIfTI copy
    nib.save(nib.Nifti1Image(volume.array.transpose(2, 1, 0), volume.geometry.ijk_to_ras()), nifti)
    for like in (volume, read_volume(nifti)):
        with pytest.raises(ImageReadError, match="segments overlap; a label map holds one structure per voxel: "
                           "propagate overlapping segments in separate runs") as caught:
            read_label_volume(overlapping, like)
        assert "overlapping_seg.dcm" in str(caught.value)
    # a Slicer segmentation stores overlapping segments in layers: the message names the segments of each layer
    import slicerio

    segmentation = slicerio.create_segmentation(volume.shape[::-1], volume.geometry.ijk_to_lps())
    for n, name in enumerate(("whole tumour", "core")):
        slicerio.add_segment(segmentation, both[..., n].transpose(2, 1, 0) > 0, {"id": name, "name": name})
    slicerio.write_segmentation(str(tmp_path / "layers.seg.nrrd"), segmentation)
    with pytest.raises(ImageReadError, match=r"layers.seg.nrrd: segments overlap \(2 layers: layer 1: whole tumour; "
                       r"layer 2: core\); a label map holds one structure per voxel"):
        read_label_volume(tmp_path / "layers.seg.nrrd", volume)
    apart = both.copy()
    apart[10, 10:15, 10:15, 1] = 0  # without the overlap the same file reads: segment n -> label n
    expected = np.zeros(volume.shape, dtype=np.uint8)
    expected[10, 5:15, 5:15] = 1
    expected[10][(apart[10, ..., 1] == 1)] = 2
    read = read_label_volume(_highdicom_seg(volume, apart, tmp_path / "apart_seg.dcm", 2), volume)
    np.testing.assert_array_equal(read, expected)


def test_label_names_and_info_of_segmentation_files(ct_series, data_file, tmp_path):
    from insid3_med.imaging.writers import write_dicom_seg, write_seg_nrrd

    volume = read_volume(ct_series.folder)
    truth = np.asarray(nib.load(data_file(HIPPOCAMPUS_LABELS)).dataobj).transpose(2, 1, 0).astype(np.uint8)
    names = {1: "anterior hippocampus", 2: "posterior hippocampus"}
    seg = write_dicom_seg(truth, volume, tmp_path / "seg.dcm", names)
    nrrd = write_seg_nrrd(truth, volume, tmp_path / "labels.seg.nrrd", segment_names=names)
    assert read_label_names(seg) == names
    assert read_label_names(nrrd) == names
    assert read_label_names(data_file(HIPPOCAMPUS_LABELS)) == {}  # NIfTI carries no names
    info = describe(seg)
    assert info["kind"] == "dicom_seg" and info["segmentation_type"] == "BINARY"
    assert [s["label"] for s in info["segments"]] == list(names.values())
    assert info["referenced_series_instance_uids"] == [ct_series.series_uid]
    assert info["rows"] == volume.shape[1] and info["columns"] == volume.shape[2]


def test_in_plane_spacing_follows_the_slicing_axis() -> None:
    volume = Volume(np.zeros((4, 5, 6), np.float32), Geometry(spacing=(0.5, 0.7, 3.0)))  # (i, j, k) spacing
    assert volume.in_plane_spacing(0) == (0.7, 0.5)  # slices across k: rows j, columns i
    assert volume.in_plane_spacing(1) == (3.0, 0.5)
    assert volume.in_plane_spacing(2) == (3.0, 0.7)
