"""Intensity presets: raw scanner values -> the 3-channel float32 image in [0, 1] that the backbone expects.

A preset is resolved ONCE per volume into an :class:`IntensityMapping` (for example the MR percentiles are
computed over the whole volume, so that every slice is scaled alike); the mapping then converts any slice
cheaply, which is what the slice-streaming volume pipeline needs. Grey images are repeated into three
identical channels.

Presets (``PRESETS``):

- CT windows in Hounsfield units, ``(center, width)``: ``soft_tissue`` (40, 400), ``abdomen`` (40, 350),
  ``lung`` (-600, 1500), ``bone`` (400, 1800), ``brain`` (40, 80). Values ``center - width/2`` -> 0 and
  ``center + width/2`` -> 1, linear between, clipped.
- ``dicom``: the display stored in the DICOM header: the VOI LUT sequence if present, else the first window
  (center/width) with its VOI LUT function (LINEAR, LINEAR_EXACT or SIGMOID, DICOM PS3.3 C.11.2.1.2).
- ``mr``: linear between the low and high percentiles (default 0.5 and 99.5) of the WHOLE volume, clipped.
- ``radiograph``: the header display as ``dicom`` when there is one; else [0, 255] for 8-bit images; else the
  image's min..max.
- ``rgb``: colour photographs unchanged, divided by their type's maximum (255 for 8 bits).

Every grey preset inverts MONOCHROME1 images (and a Presentation LUT Shape INVERSE): 1 is always shown white.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from insid3_med.imaging.geometry import Volume

#: CT windows in HU as (center, width).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (40.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
PRESETS: tuple[str, ...] = (*CT_WINDOWS, "dicom", "mr", "radiograph", "rgb")
#: DICOM modalities of projection radiography (the ``radiograph`` preset).
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "IO", "PX", "RG", "DR"})
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)


def ct_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """HU values (any shape) -> float32 in [0, 1]: ``center - width/2`` -> 0, ``center + width/2`` -> 1."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    return np.clip((np.asarray(values, dtype=np.float32) - low) / np.float32(width), 0.0, 1.0)


@dataclass(frozen=True, eq=False)
class IntensityMapping:
    """One volume's intensity -> [0, 1] mapping, resolved from a preset (see :func:`intensity_mapping`).

    Grey: values at ``low`` -> 0 and ``high`` -> 1, linear between (``function="sigmoid"``: the DICOM sigmoid
    with center ``(low+high)/2`` and width ``high-low``), or the ``lut`` (looked up at ``value - lut_first``)
    when given; then ``1 - y`` when ``invert``. RGB: divided by ``high``.
    """

    preset: str
    low: float = 0.0
    high: float = 1.0
    function: str = "linear"
    invert: bool = False
    rgb: bool = False
    lut: np.ndarray | None = None
    lut_first: int = 0

    def to_unit(self, values: np.ndarray) -> np.ndarray:
        """Grey values (any shape) -> float32 in [0, 1], same shape."""
        values = np.asarray(values)
        if self.lut is not None:
            index = np.clip(np.rint(values).astype(np.int64) - self.lut_first, 0, len(self.lut) - 1)
            unit = self.lut[index].astype(np.float32)
        elif self.function == "sigmoid":
            center, width = (self.low + self.high) / 2.0, max(self.high - self.low, 1e-6)
            unit = (1.0 / (1.0 + np.exp(-4.0 * (values.astype(np.float32) - center) / width))).astype(
                np.float32
            )
        elif self.high > self.low:
            scale = np.float32(1.0 / (self.high - self.low))
            unit = np.clip((values.astype(np.float32) - np.float32(self.low)) * scale, 0.0, 1.0)
        else:
            unit = (values > self.low).astype(np.float32)
        if values.dtype.kind == "f":
            unit = np.nan_to_num(unit, nan=0.0, copy=False)  # NaN voxels (outside a field of view) -> black
        return 1.0 - unit if self.invert else unit

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """Any stack of grey values (..., ) -> (..., 3) float32 in [0, 1]; RGB (..., 3) -> (..., 3) scaled."""
        array = np.asarray(array)
        if self.rgb:
            if array.shape[-1] != 3:
                raise ValueError(
                    f"the {self.preset} preset expects RGB input (..., 3), got shape {array.shape}"
                )
            return np.clip(array.astype(np.float32) / np.float32(self.high), 0.0, 1.0)
        unit = self.to_unit(array)
        return np.repeat(unit[..., np.newaxis], 3, axis=-1)

    def slice(self, volume: Volume, k: int) -> np.ndarray:
        """Slice ``k`` of ``volume`` as the backbone input: (J, I, 3) float32 in [0, 1]."""
        return self(volume.array[k])


def _inverted(volume: Volume) -> bool:
    monochrome1 = str(volume.metadata.get("photometric_interpretation") or "").upper() == "MONOCHROME1"
    inverse_plut = str(volume.metadata.get("presentation_lut_shape") or "").upper() == "INVERSE"
    return monochrome1 != inverse_plut


def _header_display(volume: Volume, preset: str, invert: bool) -> IntensityMapping | None:
    """The VOI LUT or the first window of the DICOM header, or ``None`` when the header has neither."""
    lut = volume.metadata.get("voi_lut")
    if lut is not None:
        data = np.asarray(lut["data"], dtype=np.float64)
        top = max(float(2 ** int(lut.get("bits", 16)) - 1), float(data.max()) if data.size else 1.0)
        return IntensityMapping(
            preset=preset,
            invert=invert,
            lut=(data / top).astype(np.float32),
            lut_first=int(lut.get("first_mapped", 0)),
        )
    center, width = volume.metadata.get("window_center"), volume.metadata.get("window_width")
    if center is None or width is None or float(width) <= 0:
        return None
    center, width = float(center), float(width)
    function = str(volume.metadata.get("voi_lut_function") or "LINEAR").upper()
    if function == "SIGMOID":
        return IntensityMapping(preset, center - width / 2, center + width / 2, "sigmoid", invert)
    if function == "LINEAR_EXACT":
        return IntensityMapping(preset, center - width / 2, center + width / 2, "linear", invert)
    half = (width - 1.0) / 2.0  # LINEAR, PS3.3 C.11.2.1.2.1
    return IntensityMapping(preset, center - 0.5 - half, center - 0.5 + half, "linear", invert)


def _finite_values(array: np.ndarray) -> np.ndarray:
    return array[np.isfinite(array)] if array.dtype.kind == "f" else array.reshape(-1)


def volume_percentiles(array: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(low, high) percentiles of all finite values of a volume (not per slice)."""
    values = _finite_values(array)
    if values.size == 0:
        raise ValueError("the volume holds no finite value")
    low, high = np.percentile(values, percentiles)
    return float(low), float(high)


def looks_like_ct(volume: Volume) -> bool:
    """True for a grey volume of unknown modality whose values look like HU (air near -1000, tissue above)."""
    if volume.is_rgb or volume.shape[0] < 2:
        return False
    values = _finite_values(volume.array)[:: max(1, volume.array.size // 200_000)]
    if values.size == 0:
        return False
    low, high = np.percentile(values, (1.0, 99.0))
    return bool(-1100.0 <= low <= -900.0 and high > -200.0)


def choose_preset(volume: Volume) -> str:
    """The preset for a volume, from its modality.

    RGB -> ``rgb``; CT -> ``dicom`` when the header holds a window, else ``soft_tissue``; radiographs (CR, DX,
    MG...) and grey 2D images -> ``radiograph``; a volume of unknown modality whose values look like HU ->
    ``soft_tissue``; everything else (MR, PET, unknown) -> ``mr``.
    """
    if volume.is_rgb:
        return "rgb"
    modality = (volume.modality or "").upper()
    has_header_display = "voi_lut" in volume.metadata or volume.metadata.get("window_width") is not None
    if modality == "CT":
        return "dicom" if has_header_display else "soft_tissue"
    if modality in RADIOGRAPH_MODALITIES:
        return "radiograph"
    if modality in {"OT", "XC", "SC"} and volume.shape[0] == 1:
        return "radiograph"
    if not modality and looks_like_ct(volume):
        return "soft_tissue"
    return "mr"


def intensity_mapping(
    volume: Volume, preset: str | None = None, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> IntensityMapping:
    """Resolve ``preset`` (``None``: :func:`choose_preset`) for this volume, computing any statistics once."""
    preset = choose_preset(volume) if preset is None else preset
    if preset not in PRESETS:
        raise ValueError(f"unknown intensity preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "rgb":
        if not volume.is_rgb:
            raise ValueError(
                f"the rgb preset needs a colour image; {volume.source or 'this volume'} is grey"
            )
        array = volume.array
        if array.dtype.kind in "ui":
            top = float(np.iinfo(array.dtype).max)
        else:
            top = 255.0 if float(np.nanmax(array)) > 1.0 else 1.0
        return IntensityMapping(preset="rgb", high=top, rgb=True)
    if volume.is_rgb:
        raise ValueError(
            f"the {preset} preset needs a grey image; {volume.source or 'this volume'} is RGB"
        )
    invert = _inverted(volume)
    if preset in CT_WINDOWS:
        center, width = CT_WINDOWS[preset]
        return IntensityMapping(preset, center - width / 2, center + width / 2, "linear", invert)
    if preset in ("dicom", "radiograph"):
        mapping = _header_display(volume, preset, invert)
        if mapping is not None:
            return mapping
        if preset == "dicom":
            raise ValueError(
                f"{volume.source or 'this volume'} has no window or VOI LUT in its header; the dicom preset "
                f"needs one (choose one of {', '.join(p for p in PRESETS if p != 'dicom')})"
            )
        if volume.array.dtype == np.uint8:
            return IntensityMapping(preset, 0.0, 255.0, "linear", invert)
        low, high = volume_percentiles(volume.array, (0.0, 100.0))
        return IntensityMapping(preset, low, high, "linear", invert)
    low_p, high_p = percentiles
    if not 0.0 <= low_p < high_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    low, high = volume_percentiles(volume.array, (low_p, high_p))
    return IntensityMapping("mr", low, high, "linear", invert)


def normalise(
    volume: Volume, preset: str | None = None, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> np.ndarray:
    """The whole volume as backbone input: (K, J, I, 3) float32 in [0, 1]; ``preset=None``: by modality."""
    return intensity_mapping(volume, preset, percentiles)(volume.array)
