"""Dataset adapters: folders of labelled 2D images and 3D volumes, read into episodes' raw material.

2D layouts (:func:`open_image_dataset`), and what a *class* is in each:

- ``isic``: the ISIC 2018 task 1 layout, ``ISIC_nnnnnnn.jpg`` with ``ISIC_nnnnnnn_segmentation.png`` anywhere under
  the folder. Classes: the groups of the split used in cross-domain few-shot segmentation when the images lie in
  sub-folders named by group (``1/``, ``2/``, ``3/``) or when a ``class_split.csv`` (``image id,class``) is in the
  folder; otherwise one class ``lesion``. Foreground: mask >= 128.
- ``cxr-lung``: the chest X-ray protocol layout, ``CXR_png/`` + ``masks/``; the episode pool is the set of mask
  files; an image's name is its mask's name for ``MCUCXR*`` files, else the mask name with ``_mask.png`` replaced
  by ``.png``. One class ``lung``; foreground: mask >= 128.
- ``images-masks``: a plain ``images/`` + ``masks/`` folder, pairs matched by stem (the mask stem may add
  ``_mask``, ``_segmentation``, ``_lesion``, ``_seg`` or ``_label``). Binary masks ({0, 255} or {0, 1}) give one class
  ``foreground`` (mask >= 128, resp. > 0); other masks give one class per non-zero label value (mask == value).
  The shared ``ph2/`` set (``images/IMDnnn.jpg`` + ``masks/IMDnnn_lesion.png``, 0/255) is this layout with one
  class, named ``lesion``; the shared ``cxr/`` set (``images/NAME.png`` + ``masks/NAME.png``, labels 1 right lung,
  2 left lung, 3 cardiomediastinum) is this layout with one class per label value, named after the anatomy.

3D layouts (:func:`open_volume_dataset`), each with the structures it scores and the rule for its slice axis:

- ``msd``: the Medical Segmentation Decathlon, ``imagesTr/`` + ``labelsTr/`` (+ ``dataset.json`` for label names;
  4D multi-modal images use ``channel``, default 0). One structure per label value.
- ``images-labels``: ``images/`` + ``labels/`` with the same file names (the ``hippocampus`` and ``acdc`` sets).
  One structure per label value (named for the known sets).
- ``brats``: one folder per case holding modality files (``*flair*``, ``*t1c*``/``*t1ce*``, ``*t1*``, ``*t2*``) and
  a label file (``OTMultiClass*`` or ``*seg*``). Structures: whole tumour (labels > 0), scored on FLAIR, and
  tumour core (labels 1, 3, 4: necrosis, non-enhancing and enhancing tumour), scored on T1c — the modality in which
  each is delineated clinically.

Slice axis (the array axis of the (K, J, I) volume along which a slice is labelled and propagated), per dataset:
``"axial"`` is the array axis whose voxel direction is closest to the S (head-foot) direction; ``"fewest_voxels"``
the array axis with the fewest voxels; ``"through_plane"`` (the default) the axis of largest spacing when the
spacing is anisotropic (max/min > 1.2), else the axis with at most half the voxels of both others, else axial.
The ``hippocampus`` and ``brats`` sets use ``axial``; ``acdc`` uses ``fewest_voxels`` (its files carry a false
1 mm identity affine, so spacing says nothing; its 8 to 10 short-axis slices are the through-plane axis).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from PIL import Image

from insid3_med.imaging.geometry import Volume
from insid3_med.imaging.readers import read_label_volume, read_volume
from insid3_med.volume import acquisition_axis

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
MASK_NAME_SUFFIXES = ("_segmentation", "_mask", "_lesion", "_seg", "_label", "")

KNOWN_STRUCTURES: dict[str, dict[int, str]] = {
    "hippocampus": {1: "anterior hippocampus", 2: "posterior hippocampus"},
    "acdc": {1: "right ventricle", 2: "myocardium", 3: "left ventricle"},
}
KNOWN_SLICE_AXIS_RULES = {"hippocampus": "axial", "brats": "axial", "acdc": "fewest_voxels"}
KNOWN_MODALITIES = {"hippocampus": "MR", "acdc": "MR", "brats": "MR"}
KNOWN_CLASS_NAMES: dict[str, dict[int | str, str]] = {
    "ph2": {"foreground": "lesion"},
    "cxr": {1: "right lung", 2: "left lung", 3: "cardiomediastinum"},
}
SLICE_AXIS_RULES = ("through_plane", "axial", "fewest_voxels", "largest_spacing")


class DatasetError(ValueError):
    """A data folder that does not match any supported layout, or a case that cannot be used."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The data folder (or a file it names) does not exist."""


# ------------------------------------------------------------------------------------------------------------
# 2D image / mask folders
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageCase:
    """One image with its mask; ``group`` is the class-split group (ISIC) or None."""

    name: str
    image_path: Path
    mask_path: Path
    group: str | None = None


@dataclass(frozen=True)
class ImageClass:
    """What counts as foreground for one evaluation class.

    ``values``: the label values that form the class (mask == any of them), or None for a threshold
    ``mask >= min_value``. ``group``: restrict the class's pool to cases of that split group (ISIC).
    """

    name: str
    values: tuple[int, ...] | None = None
    min_value: int = 128
    group: str | None = None

    def binary(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) integer mask -> (H, W) bool foreground of this class."""
        if self.values is None:
            return mask >= self.min_value
        return np.isin(mask, self.values)


@dataclass
class ImageDataset:
    """A labelled 2D set: cases, classes and, per class, the sorted pool of case indices an episode draws from."""

    name: str
    layout: str
    root: Path
    cases: list[ImageCase]
    classes: list[ImageClass]
    pools: dict[str, list[int]] = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "layout": self.layout,
            "root": str(self.root),
            "cases": len(self.cases),
            "classes": [
                {"name": c.name, "values": list(c.values) if c.values is not None else None,
                 "min_value": c.min_value if c.values is None else None, "group": c.group,
                 "pool": len(self.pools.get(c.name, []))}
                for c in self.classes
            ],
        }


def read_rgb_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB (grey images are replicated to three channels, as the reference protocol does)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError as error:
        raise DatasetNotFoundError(f"{path}: image file not found") from error
    except OSError as error:
        raise DatasetError(f"{path}: cannot read image ({error})") from error


def read_mask(path: Path) -> np.ndarray:
    """(H, W) uint8/uint16 label mask: palette PNGs give their indices, other modes their grey value."""
    try:
        with Image.open(path) as image:
            if image.mode in ("P", "L", "I;16", "I"):
                return np.asarray(image).astype(np.int32)
            return np.asarray(image.convert("L")).astype(np.int32)
    except FileNotFoundError as error:
        raise DatasetNotFoundError(f"{path}: mask file not found") from error
    except OSError as error:
        raise DatasetError(f"{path}: cannot read mask ({error})") from error


def _files(folder: Path, suffixes: Sequence[str], recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in folder.glob(pattern)
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(tuple(suffixes))
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def detect_image_layout(root: Path) -> str:
    """The 2D layout name of ``root`` (see the module docstring); raises :class:`DatasetError` if none fits."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: data folder not found")
    if (root / "CXR_png").is_dir() and (root / "masks").is_dir():
        return "cxr-lung"
    if any(root.rglob("ISIC_*_segmentation.png")):
        return "isic"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "images-masks"
    raise DatasetError(
        f"{root}: not a supported 2D layout (expected ISIC_*_segmentation.png files, CXR_png/ + masks/, "
        "or images/ + masks/)"
    )


def open_image_dataset(root: str | Path, layout: str | None = None, name: str | None = None) -> ImageDataset:
    """Scan a labelled 2D folder into an :class:`ImageDataset` (layout detected unless given)."""
    root = Path(root)
    layout = layout or detect_image_layout(root)
    name = name or root.name
    builders = {
        "isic": _isic_dataset,
        "cxr-lung": _cxr_lung_dataset,
        "images-masks": _paired_folder_dataset,
    }
    if layout not in builders:
        raise DatasetError(f"{root}: unknown 2D layout {layout!r}; choose from {sorted(builders)}")
    dataset = builders[layout](root, layout, name)
    if not dataset.cases:
        raise DatasetError(f"{root}: no image/mask pairs found for layout {layout!r}")
    for image_class in dataset.classes:
        if len(dataset.pools.get(image_class.name, [])) < 2:
            raise DatasetError(f"{root}: class {image_class.name!r} has fewer than 2 images; no episode possible")
    return dataset


def _isic_dataset(root: Path, layout: str, name: str) -> ImageDataset:
    masks = {m.name[: -len("_segmentation.png")]: m for m in root.rglob("ISIC_*_segmentation.png")}
    images = [p for p in _files(root, (".jpg", ".jpeg", ".png"), recursive=True)
              if re.fullmatch(r"ISIC_\d+", _stem(p))]
    split: dict[str, str] = {}
    split_file = root / "class_split.csv"
    if split_file.is_file():
        with split_file.open(newline="") as handle:
            for row in csv.reader(handle):
                if len(row) >= 2 and row[0].strip() and not row[0].lower().startswith("image"):
                    split[_stem(Path(row[0].strip()))] = row[1].strip()
    cases = []
    for image in images:
        key = _stem(image)
        if key not in masks:
            continue
        group = split.get(key)
        if group is None and image.parent != root and image.parent.name.isdigit():
            group = image.parent.name
        cases.append(ImageCase(key, image, masks[key], group))
    cases.sort(key=lambda c: (c.group or "", c.name))
    groups = sorted({c.group for c in cases if c.group is not None})
    if groups and all(c.group is not None for c in cases):
        classes = [ImageClass(f"group {g}", None, 128, g) for g in groups]
        pools = {c.name: [i for i, case in enumerate(cases) if case.group == c.group] for c in classes}
    else:
        classes = [ImageClass("lesion", None, 128)]
        pools = {"lesion": list(range(len(cases)))}
    return ImageDataset(name, layout, root, cases, classes, pools)


def _cxr_lung_dataset(root: Path, layout: str, name: str) -> ImageDataset:
    cases = []
    for mask in _files(root / "masks", (".png",)):
        image_name = mask.name if mask.name.startswith("MCUCXR") else mask.name.replace("_mask.png", ".png")
        image = root / "CXR_png" / image_name
        if not image.is_file():
            raise DatasetNotFoundError(f"{image}: image of mask {mask} not found")
        cases.append(ImageCase(Path(image_name).stem, image, mask))
    classes = [ImageClass("lung", None, 128)]
    return ImageDataset(name, layout, root, cases, classes, {"lung": list(range(len(cases)))})


def _paired_folder_dataset(root: Path, layout: str, name: str) -> ImageDataset:
    masks = {_stem(m): m for m in _files(root / "masks", IMAGE_SUFFIXES)}
    cases = []
    for image in _files(root / "images", IMAGE_SUFFIXES):
        stem = _stem(image)
        mask = next((masks[stem + s] for s in MASK_NAME_SUFFIXES if stem + s in masks), None)
        if mask is not None:
            cases.append(ImageCase(stem, image, mask))
    names = KNOWN_CLASS_NAMES.get(name.lower(), {})
    values_per_case = [_mask_values(c.mask_path) for c in cases]
    all_values = set().union(*values_per_case) if values_per_case else set()
    if all_values <= {0, 255} or all_values <= {0, 1}:
        class_name = names.get("foreground", "foreground")
        classes = [ImageClass(class_name, None, 128 if 255 in all_values else 1)]
        return ImageDataset(name, layout, root, cases, classes, {class_name: list(range(len(cases)))})
    class_values = sorted(all_values - {0})
    classes = [ImageClass(names.get(v, f"label {v}"), (v,)) for v in class_values]
    pools = {c.name: [i for i, vals in enumerate(values_per_case) if v in vals]
             for c, v in zip(classes, class_values, strict=True)}
    return ImageDataset(name, layout, root, cases, classes, pools)


@lru_cache(maxsize=4096)
def _mask_values_cached(path: str, mtime: float) -> frozenset[int]:
    return frozenset(int(v) for v in np.unique(read_mask(Path(path))))


def _mask_values(path: Path) -> frozenset[int]:
    return _mask_values_cached(str(path), path.stat().st_mtime)


# ------------------------------------------------------------------------------------------------------------
# 3D volume / label folders
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Structure:
    """A structure scored in 3D: the label values that form it and, for multi-modal cases, the image it is seen in."""

    name: str
    values: tuple[int, ...]
    modality: str | None = None

    def binary(self, labels: np.ndarray) -> np.ndarray:
        """(K, J, I) label map -> (K, J, I) bool mask of this structure."""
        return np.isin(labels, self.values)


@dataclass(frozen=True)
class VolumeCase:
    """One case: its image file(s) (one per modality name, ``"image"`` for single-modality sets) and label file."""

    name: str
    images: dict[str, Path]
    label_path: Path

    @property
    def subject(self) -> str:
        """The subject the case belongs to: its name without a time-frame suffix (ACDC ``patient001_frame01``)."""
        return re.sub(r"_(frame|time|tp)\d+$", "", self.name)


@dataclass
class VolumeDataset:
    """A labelled 3D set with its structures and slice-axis rule (see the module docstring)."""

    name: str
    layout: str
    root: Path
    cases: list[VolumeCase]
    structures: list[Structure]
    slice_axis_rule: str = "through_plane"
    channel: int = 0
    modality: str | None = None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "layout": self.layout,
            "root": str(self.root),
            "cases": len(self.cases),
            "structures": [{"name": s.name, "values": list(s.values), "modality": s.modality}
                           for s in self.structures],
            "slice_axis_rule": self.slice_axis_rule,
            "modality": self.modality,
        }

    def image_path(self, case: VolumeCase, structure: Structure | None = None) -> Path:
        """The image file a structure is scored on (its modality's file, else the case's first image)."""
        if structure is not None and structure.modality is not None:
            if structure.modality not in case.images:
                raise DatasetError(f"{case.label_path.parent}: no {structure.modality} image for {structure.name}")
            return case.images[structure.modality]
        return next(iter(case.images.values()))

    def load_image(self, case: VolumeCase, structure: Structure | None = None) -> Volume:
        """The case's image volume (for ``structure``'s modality): (K, J, I) float32 with its geometry."""
        return load_volume(self.image_path(case, structure), channel=self.channel, modality=self.modality)

    def load_labels(self, case: VolumeCase, like: Volume) -> np.ndarray:
        """(K, J, I) int16 label map of the case, checked to lie on ``like``'s grid."""
        return read_label_volume(case.label_path, like).astype(np.int16)

    def slice_axis(self, volume: Volume) -> int:
        """The array axis (0, 1 or 2 of the (K, J, I) array) along which slices are labelled."""
        return slice_axis(volume, self.slice_axis_rule)


def slice_axis(volume: Volume, rule: str = "through_plane") -> int:
    """Array axis (of (K, J, I)) chosen by ``rule`` (see the module docstring)."""
    spacing_kji = np.asarray(volume.geometry.spacing, dtype=float)[::-1]
    shape = np.asarray(volume.shape)
    direction = volume.geometry.direction_matrix()
    axial = int(2 - np.argmax(np.abs(direction[2, :])))  # column c is voxel axis c (i, j, k) -> array axis 2 - c
    if rule == "axial":
        return axial
    if rule == "fewest_voxels":
        return int(np.argmin(shape))
    if rule == "largest_spacing":
        return int(np.argmax(spacing_kji)) if spacing_kji.max() > spacing_kji.min() else axial
    if rule == "through_plane":
        return acquisition_axis(volume)
    raise ValueError(f"unknown slice-axis rule {rule!r}; choose from {SLICE_AXIS_RULES}")


def load_volume(path: Path, channel: int = 0, modality: str | None = None) -> Volume:
    """Read a volume file as a (K, J, I) :class:`Volume` (LPS geometry) with the project's reader.

    4D files (multi-modal MSD tasks) give their ``channel``-th 3D volume. ``modality`` fills in a modality the
    file does not state (NIfTI does not), so that intensity presets suit the images.
    """
    path = Path(path)
    if _is_4d_nifti(path):
        volume = _read_nifti_channel(path, channel)
    else:
        volume = read_volume(path)
    if volume.modality is None and modality is not None:
        volume.modality = modality
    return volume


def _is_4d_nifti(path: Path) -> bool:
    import nibabel as nib

    if not path.name.lower().endswith((".nii", ".nii.gz")) or not path.is_file():
        return False
    try:
        shape = cast("SpatialImage", nib.load(path)).shape  # a NIfTI image; the stub says FileBasedImage
    except Exception:  # noqa: BLE001 - let the project's reader report what is wrong with the file
        return False
    return len(shape) == 4 and shape[3] > 1


def _read_nifti_channel(path: Path, channel: int) -> Volume:
    import nibabel as nib

    from insid3_med.imaging.geometry import Geometry

    image = cast("SpatialImage", nib.load(path))  # a NIfTI image; the stub says FileBasedImage
    if not 0 <= channel < image.shape[3]:
        raise DatasetError(f"{path}: 4D volume has {image.shape[3]} channels, channel {channel} asked")
    data = np.asarray(image.dataobj[..., channel], dtype=np.float32)
    return Volume(array=np.ascontiguousarray(data.transpose(2, 1, 0)),
                  geometry=Geometry.from_ijk_to_ras(image.affine), source=path, metadata={"channel": channel})


def detect_volume_layout(root: Path) -> str:
    """The 3D layout name of ``root``; raises :class:`DatasetError` if none fits."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: data folder not found")
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        return "msd"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "images-labels"
    if any(_brats_label_file(d) is not None for d in sorted(root.iterdir()) if d.is_dir()):
        return "brats"
    raise DatasetError(
        f"{root}: not a supported 3D layout (expected imagesTr/ + labelsTr/, images/ + labels/, "
        "or BraTS case folders with modality and OTMultiClass/seg files)"
    )


def open_volume_dataset(root: str | Path, layout: str | None = None, name: str | None = None,
                        slice_axis_rule: str | None = None, channel: int = 0) -> VolumeDataset:
    """Scan a labelled 3D folder into a :class:`VolumeDataset` (layout and slice-axis rule chosen unless given).

    Finding the structures of ``msd``/``images-labels`` sets reads every label file once (for its label values).
    """
    root = Path(root)
    layout = layout or detect_volume_layout(root)
    name = name or root.name
    modality = KNOWN_MODALITIES.get(name.lower())
    if layout == "msd":
        cases, structures, modality = _msd_cases(root)
    elif layout == "images-labels":
        cases = _paired_volume_cases(root / "images", root / "labels")
        structures = _structures_from_labels(cases, KNOWN_STRUCTURES.get(name.lower(), {}))
    elif layout == "brats":
        cases = _brats_cases(root)
        structures = [Structure("whole tumour", (1, 2, 3, 4), "flair"), Structure("tumour core", (1, 3, 4), "t1c")]
        modality = "MR"
    else:
        raise DatasetError(f"{root}: unknown 3D layout {layout!r}; choose from ['brats', 'images-labels', 'msd']")
    if not cases:
        raise DatasetError(f"{root}: no image/label pairs found for layout {layout!r}")
    rule = slice_axis_rule or KNOWN_SLICE_AXIS_RULES.get(name.lower(), "through_plane")
    if rule not in SLICE_AXIS_RULES:
        raise ValueError(f"unknown slice-axis rule {rule!r}; choose from {SLICE_AXIS_RULES}")
    return VolumeDataset(name, layout, root, cases, structures, rule, channel, modality)


def _paired_volume_cases(images: Path, labels: Path) -> list[VolumeCase]:
    label_files = {_stem(p): p for p in _files(labels, VOLUME_SUFFIXES)}
    cases = []
    for image in _files(images, VOLUME_SUFFIXES):
        stem = _stem(image)
        if stem in label_files:
            cases.append(VolumeCase(stem, {"image": image}, label_files[stem]))
        else:
            # MSD test-style names with a modality suffix (case_0000) pair with "case"
            base = re.sub(r"_\d{4}$", "", stem)
            if base in label_files:
                cases.append(VolumeCase(base, {"image": image}, label_files[base]))
    return cases


def _structures_from_labels(cases: list[VolumeCase], names: dict[int, str]) -> list[Structure]:
    values: set[int] = set()
    for case in cases:
        values |= _label_values(case.label_path)
    return [Structure(names.get(v, f"label {v}"), (v,)) for v in sorted(values - {0})]


@lru_cache(maxsize=4096)
def _label_values_cached(path: str, mtime: float) -> frozenset[int]:
    import nibabel as nib

    if path.endswith((".nii", ".nii.gz")):
        data = np.asanyarray(cast("SpatialImage", nib.load(path)).dataobj)  # a NIfTI image
    else:
        data = read_volume(Path(path)).array
    return frozenset(int(v) for v in np.unique(np.rint(data)))


def _label_values(path: Path) -> frozenset[int]:
    return _label_values_cached(str(path), path.stat().st_mtime)


def _msd_cases(root: Path) -> tuple[list[VolumeCase], list[Structure], str | None]:
    cases = _paired_volume_cases(root / "imagesTr", root / "labelsTr")
    names: dict[int, str] = {}
    modality = None
    meta = root / "dataset.json"
    if meta.is_file():
        try:
            description = json.loads(meta.read_text())
        except json.JSONDecodeError as error:
            raise DatasetError(f"{meta}: not valid JSON ({error})") from error
        labels = description.get("labels", {})
        modalities = description.get("modality") or description.get("channel_names") or {}
        first = str(next(iter(modalities.values()), "")).upper() if isinstance(modalities, dict) else ""
        modality = "CT" if first.startswith("CT") else "MR" if first else None
        for key, value in labels.items():  # MSD: {"0": "background", "1": "Anterior"}; nnU-Net v2 the reverse
            if str(key).isdigit():
                names[int(key)] = str(value)
            elif isinstance(value, int):
                names[value] = str(key)
    if names:
        structures = [Structure(names[v], (v,)) for v in sorted(names) if v != 0]
    else:
        structures = _structures_from_labels(cases, {})
    return cases, structures, modality


BRATS_MODALITY_PATTERNS = {
    "flair": r"flair",
    "t1c": r"t1c|t1ce|t1gd|t1_?contrast",
    "t2": r"t2(?!.*flair)",
    "t1": r"t1(?!c|ce|gd)",
}


def _brats_label_file(folder: Path) -> Path | None:
    for candidate in _files(folder, VOLUME_SUFFIXES):
        stem = _stem(candidate).lower()
        if stem.startswith("otmulticlass") or re.search(r"(^|_)seg$", stem):
            return candidate
    return None


def _brats_cases(root: Path) -> list[VolumeCase]:
    cases = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        label = _brats_label_file(folder)
        if label is None:
            continue
        images: dict[str, Path] = {}
        for candidate in _files(folder, VOLUME_SUFFIXES):
            stem = _stem(candidate).lower()
            if candidate == label or "mask" in stem:
                continue
            for modality, pattern in BRATS_MODALITY_PATTERNS.items():
                if modality not in images and re.search(pattern, stem):
                    images[modality] = candidate
                    break
        if "flair" not in images or "t1c" not in images:
            raise DatasetError(f"{folder}: BraTS case needs a FLAIR and a T1c image, found {sorted(images)}")
        cases.append(VolumeCase(folder.name, images, label))
    return cases
