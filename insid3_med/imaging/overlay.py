"""PNG montage of slices with their labels drawn over them, for a quick look at a segmentation."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from insid3_med.imaging.errors import ImageWriteError
from insid3_med.imaging.geometry import Volume
from insid3_med.imaging.intensity import intensity_mapping
from insid3_med.imaging.writers import atomic_output, label_color

#: Frame colour of the slices that were labelled by hand (the one-shot reference slices).
HIGHLIGHT_COLOR = (255, 215, 0)


def _default_slices(labels: np.ndarray, highlight: set[int], max_tiles: int) -> list[int]:
    depth = labels.shape[0]
    labelled = [k for k in range(depth) if labels[k].any()]
    pool = labelled if labelled else list(range(depth))
    if len(pool) <= max_tiles:
        chosen = set(pool)
    else:
        chosen = {pool[int(round(n))] for n in np.linspace(0, len(pool) - 1, max_tiles)}
    chosen |= {k for k in highlight if 0 <= k < depth}
    return sorted(chosen)


def _tile_shape(shape: tuple[int, int], spacing: Sequence[float], tile_size: int) -> tuple[int, int]:
    """(height, width) in pixels of a tile showing a (J, I) slice at its physical aspect ratio."""
    height_mm, width_mm = shape[0] * float(spacing[1]), shape[1] * float(spacing[0])
    scale = tile_size / max(height_mm, width_mm)
    return max(1, int(round(height_mm * scale))), max(1, int(round(width_mm * scale)))


def _draw_labels(rgb: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """Blend label colours over an (H, W, 3) float image in [0, 1] and draw each label's contour opaque."""
    out = rgb.copy()
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        color = np.asarray(label_color(int(value)), dtype=np.float32)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * color
        contour = mask & ~ndimage.binary_erosion(mask)
        out[contour] = color
    return out


def write_overlay_montage(
    image: Volume | np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    slices: Sequence[int] | None = None,
    highlight: Iterable[int] | None = None,
    overwrite: bool = False,
    preset: str | None = None,
    max_tiles: int = 16,
    tile_size: int = 256,
    alpha: float = 0.35,
) -> Path:
    """PNG montage of slices ``k`` of ``image`` (Volume or (K, J, I[, 3]) array) with ``labels`` (K, J, I)
    drawn as translucent fill plus opaque contour; returns ``path``.

    ``slices``: which k to show (default: up to ``max_tiles`` labelled slices, evenly spread, or evenly spread
    over the volume when nothing is labelled). ``highlight``: labelled (reference) slice indices, framed in
    gold and captioned "ref". Tiles keep the physical aspect ratio (from the geometry) at ``tile_size`` pixels
    on their longer side; rows are j (downwards), columns i, as stored. Intensities via ``preset`` (default:
    by modality).
    """
    from PIL import Image, ImageDraw

    path = Path(path)
    volume = image if isinstance(image, Volume) else Volume(array=np.asarray(image))
    if volume.array.ndim not in (3, 4):
        raise ImageWriteError(
            path, f"image of shape {volume.array.shape}; expected (K, J, I) or (K, J, I, 3)"
        )
    labels = np.asarray(labels)
    if labels.ndim == 2 and volume.shape[0] == 1:
        labels = labels[np.newaxis]
    if labels.shape != volume.shape:
        raise ImageWriteError(
            path, f"labels of shape {labels.shape} do not match the image grid {volume.shape}"
        )
    highlight_set = {int(k) for k in (highlight or ())}
    chosen = (
        _default_slices(labels, highlight_set, max_tiles) if slices is None else [int(k) for k in slices]
    )
    depth = volume.shape[0]
    bad = [k for k in chosen if not 0 <= k < depth]
    if bad or not chosen:
        raise ImageWriteError(path, f"slice indices {bad or chosen} are outside 0..{depth - 1}")
    try:
        mapping = intensity_mapping(volume, preset)
    except ValueError as error:
        raise ImageWriteError(path, str(error)) from error

    tile_h, tile_w = _tile_shape(volume.shape[1:3], volume.geometry.spacing, tile_size)
    caption_h, gap = 14, 4
    columns = math.ceil(math.sqrt(len(chosen)))
    rows = math.ceil(len(chosen) / columns)
    canvas = Image.new(
        "RGB", (columns * (tile_w + gap) + gap, rows * (tile_h + caption_h + gap) + gap), (0, 0, 0)
    )
    draw = ImageDraw.Draw(canvas)
    for n, k in enumerate(chosen):
        grey = Image.fromarray(np.round(mapping.slice(volume, k) * 255).astype(np.uint8))
        rgb = np.asarray(grey.resize((tile_w, tile_h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        label_tile = np.asarray(
            Image.fromarray(labels[k].astype(np.int32)).resize((tile_w, tile_h), Image.Resampling.NEAREST)
        )
        tile = np.round(_draw_labels(rgb, label_tile, alpha) * 255).astype(np.uint8)
        x = gap + (n % columns) * (tile_w + gap)
        y = gap + (n // columns) * (tile_h + caption_h + gap)
        canvas.paste(Image.fromarray(tile), (x, y + caption_h))
        marked = k in highlight_set
        draw.text(
            (x + 2, y + 1),
            f"k={k}" + (" ref" if marked else ""),
            fill=HIGHLIGHT_COLOR if marked else (230,) * 3,
        )
        if marked:
            draw.rectangle(
                [x - 2, y + caption_h - 2, x + tile_w + 1, y + caption_h + tile_h + 1],
                outline=HIGHLIGHT_COLOR,
                width=2,
            )
    with atomic_output(path, overwrite) as temporary:
        canvas.save(temporary, format="PNG")
    return path
