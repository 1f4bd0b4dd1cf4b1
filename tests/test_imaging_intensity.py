"""Intensity presets: CT windows, header windows and VOI LUTs, MR volume percentiles, radiographs, RGB."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BRATS_FLAIR, CXR_IMAGE, HIPPOCAMPUS_IMAGE, PH2_IMAGE

from insid3_med.imaging.geometry import Volume
from insid3_med.imaging.intensity import (
    CT_WINDOWS,
    PRESETS,
    choose_preset,
    ct_window,
    intensity_mapping,
    normalise,
)
from insid3_med.imaging.readers import read_image_2d, read_volume


def _ct(values, **metadata) -> Volume:
    return Volume(
        array=np.asarray(values, dtype=np.float32).reshape(1, 1, -1), modality="CT", metadata=metadata
    )


@pytest.mark.parametrize("preset", sorted(CT_WINDOWS))
def test_ct_windows_map_their_hu_range_to_0_1(preset):
    center, width = CT_WINDOWS[preset]
    hu = [center - width, center - width / 2, center, center + width / 4, center + width / 2, center + width]
    out = normalise(_ct(hu), preset)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, :, 0], [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])  # grey: three equal channels


def test_named_ct_windows_are_the_usual_ones():
    assert CT_WINDOWS["lung"] == (-600.0, 1500.0)
    assert CT_WINDOWS["bone"] == (400.0, 1800.0)
    assert CT_WINDOWS["brain"] == (40.0, 80.0)
    assert CT_WINDOWS["soft_tissue"] == (40.0, 400.0)
    assert CT_WINDOWS["abdomen"] == (40.0, 350.0)
    np.testing.assert_allclose(
        ct_window(np.array([-1000.0, -600.0, 150.0]), -600, 1500), [0.2333333, 0.5, 1.0], atol=1e-6
    )
    with pytest.raises(ValueError, match="width"):
        ct_window(np.zeros(3), 0, 0)


def test_ct_window_on_the_dicom_series_reads_hu(ct_series):
    volume = read_volume(ct_series.folder)
    lung = normalise(volume, "lung")[..., 0]
    expected = np.clip((ct_series.expected.array + 1350.0) / 1500.0, 0, 1)
    np.testing.assert_allclose(lung, expected, atol=1e-6)


def test_dicom_preset_uses_the_header_window_linear_formula():
    # DICOM PS3.3 C.11.2.1.2.1: LINEAR with c=40, w=400 -> 0 at <= -160 (c - 0.5 - (w-1)/2), 1 above 239.
    volume = _ct([-161, -160, 39, 40, 239, 240], window_center=40.0, window_width=400.0)
    out = normalise(volume, "dicom")[0, 0, :, 0]
    np.testing.assert_allclose(out, [0.0, 0.0, (39 + 160) / 399, (40 + 160) / 399, 1.0, 1.0], atol=1e-6)
    exact = _ct([-160, 40, 240], window_center=40.0, window_width=400.0, voi_lut_function="LINEAR_EXACT")
    np.testing.assert_allclose(normalise(exact, "dicom")[0, 0, :, 0], [0.0, 0.5, 1.0], atol=1e-6)
    sigmoid = _ct([-1000, 40, 1000], window_center=40.0, window_width=400.0, voi_lut_function="SIGMOID")
    out = normalise(sigmoid, "dicom")[0, 0, :, 0]
    assert out[0] < 1e-3 and out[1] == pytest.approx(0.5) and out[2] > 1 - 1e-3


def test_dicom_preset_without_a_header_window_is_a_clear_error():
    with pytest.raises(ValueError, match="no window"):
        normalise(_ct([0, 1, 2]), "dicom")


def test_voi_lut_sequence_is_applied():
    lut = {"first_mapped": 100, "bits": 8, "data": np.array([0, 51, 102, 255], dtype=np.float64)}
    volume = Volume(
        array=np.array([[[50, 100, 101, 102, 103, 500]]]), modality="DX", metadata={"voi_lut": lut}
    )
    out = normalise(volume)[0, 0, :, 0]  # DX -> radiograph -> the header VOI LUT
    np.testing.assert_allclose(out, [0.0, 0.0, 0.2, 0.4, 1.0, 1.0], atol=1e-6)


def test_monochrome1_is_inverted_by_every_grey_preset():
    metadata = {"photometric_interpretation": "MONOCHROME1", "window_center": 40.0, "window_width": 400.0}
    plain = _ct([-160, 40, 240], window_center=40.0, window_width=400.0)
    inverted = _ct([-160, 40, 240], **metadata)
    for preset in ("soft_tissue", "dicom", "mr", "radiograph"):
        np.testing.assert_allclose(normalise(inverted, preset), 1.0 - normalise(plain, preset), atol=1e-6)


def test_mr_percentiles_are_computed_over_the_volume_not_per_slice(data_file):
    volume = read_volume(data_file(BRATS_FLAIR))
    mapping = intensity_mapping(volume, "mr")
    low, high = np.percentile(volume.array, (0.5, 99.5))
    assert (mapping.low, mapping.high) == pytest.approx((low, high), rel=1e-6)
    whole = normalise(volume)
    assert whole.shape == volume.shape + (3,) and whole.dtype == np.float32
    assert whole.min() >= 0.0 and whole.max() <= 1.0
    for k in (0, 40, 77, 154):
        np.testing.assert_array_equal(mapping.slice(volume, k), whole[k])
    # A slice near the top of the head never reaches the volume's bright end: slices stay comparable.
    top = mapping.slice(volume, 150)[..., 0]
    per_slice_high = np.percentile(volume.array[150], 99.5)
    assert per_slice_high < high and top.max() < 1.0


def test_mr_custom_percentiles_and_bad_percentiles(data_file):
    volume = read_volume(data_file(HIPPOCAMPUS_IMAGE))
    mapping = intensity_mapping(volume, "mr", percentiles=(2.0, 98.0))
    assert (mapping.low, mapping.high) == pytest.approx(tuple(np.percentile(volume.array, (2.0, 98.0))))
    with pytest.raises(ValueError, match="percentiles"):
        intensity_mapping(volume, "mr", percentiles=(50.0, 10.0))


def test_radiograph_png_is_scaled_by_its_8_bit_range(data_file):
    image = read_image_2d(data_file(CXR_IMAGE))
    out = normalise(image)
    np.testing.assert_allclose(out[0, ..., 1], image.array[0] / 255.0, atol=1e-6)


def test_radiograph_without_header_display_uses_its_range():
    volume = Volume(array=np.array([[[1000, 1500, 3000]]], dtype=np.uint16), modality="CR")
    np.testing.assert_allclose(normalise(volume)[0, 0, :, 0], [0.0, 0.25, 1.0], atol=1e-6)


def test_rgb_photograph_is_unchanged_but_scaled(data_file):
    image = read_image_2d(data_file(PH2_IMAGE))
    out = normalise(image)
    assert out.shape == image.array.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, image.array / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="grey"):
        normalise(image, "mr")
    grey = read_image_2d(data_file(CXR_IMAGE))
    with pytest.raises(ValueError, match="colour"):
        normalise(grey, "rgb")


def test_choose_preset_by_modality(data_file, ct_series, monochrome1_radiograph):
    assert choose_preset(read_volume(ct_series.folder)) == "dicom"
    assert choose_preset(_ct([0, 1])) == "soft_tissue"
    assert choose_preset(Volume(array=np.zeros((3, 4, 4)), modality="MR")) == "mr"
    assert choose_preset(read_volume(data_file(HIPPOCAMPUS_IMAGE))) == "mr"
    assert choose_preset(read_image_2d(monochrome1_radiograph[0])) == "radiograph"
    assert choose_preset(read_image_2d(data_file(CXR_IMAGE))) == "radiograph"
    assert choose_preset(read_image_2d(data_file(PH2_IMAGE))) == "rgb"
    # A CT exported to NIfTI loses its modality: HU-like values still pick a CT window.
    hu = Volume(array=ct_series.expected.array.astype(np.float32), modality=None)
    assert choose_preset(hu) == "soft_tissue"


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown intensity preset 'liver'"):
        normalise(_ct([0]), "liver")
    assert set(PRESETS) >= {
        "soft_tissue",
        "lung",
        "bone",
        "brain",
        "abdomen",
        "dicom",
        "mr",
        "radiograph",
        "rgb",
    }


def test_nan_voxels_become_black_not_nan():
    volume = Volume(array=np.array([[[np.nan, 0.0, 1.0, 2.0]]], dtype=np.float32), modality="MR")
    out = normalise(volume, "mr", percentiles=(0.0, 100.0))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 0, :, 0], [0.0, 0.0, 0.5, 1.0], atol=1e-6)
