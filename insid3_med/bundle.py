"""The MONAI face of insid3-med: the bundle's network (a ``torch.nn.Module`` around the library) and its transforms.

The bundle in ``monai_bundle/`` builds :class:`OneShotNetwork` as its ``network_def``. The network holds the frozen
backbone and the reference (an image and its label map, read through the same MONAI preprocessing as the studies)
and, for every study, calls :class:`insid3_med.volume.StudyTransfer` (a reference from another study) or
:func:`insid3_med.volume.propagate_through_slices` (the study is the reference itself, labelled on some slices). It
holds no segmentation logic of its own.

Frames: MONAI arrays are (X, Y, Z) = (i, j, k) with an (i, j, k) -> RAS affine; the library's
:class:`~insid3_med.imaging.geometry.Volume` is (K, J, I) in LPS. :func:`volume_from_metatensor` and
:func:`labels_to_channel_first` convert between the two.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.data import Dataset, MetaTensor, list_data_collate
from monai.data.image_writer import NibabelWriter
from monai.data.utils import create_file_basename
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, MapTransform, Orientationd
from monai.utils import convert_to_dst_type
from torch import nn

from insid3_med.backbones import Backbone, load_backbone
from insid3_med.engine import EngineParams
from insid3_med.imaging.dicom import display_metadata, list_dicom_series
from insid3_med.imaging.errors import ImageNotFoundError, ImageReadError, OutputExistsError
from insid3_med.imaging.geometry import Geometry, Volume
from insid3_med.imaging.intensity import intensity_mapping
from insid3_med.imaging.readers import read_label_volume
from insid3_med.outputs import RunInputs, partial_path, same_file
from insid3_med.predictor import OneShotSegmenter
from insid3_med.propagation import params_from_settings
from insid3_med.volume import (
    StudyTransfer,
    axis_mismatch,
    check_label_grid,
    is_auto_axis,
    labelled_slices,
    propagate_through_slices,
    propagation_axis,
    propagation_description,
)

logger = logging.getLogger(__name__)

#: The display window of a volume already scaled to [0, 1] by the preprocessing: the library's ``dicom`` preset
#: then maps every value to itself (LINEAR_EXACT window from 0 to 1, DICOM PS3.3 C.11.2.1.3.2).
UNIT_DISPLAY: dict[str, Any] = {"window_center": 0.5, "window_width": 1.0, "voi_lut_function": "LINEAR_EXACT"}
UNIT_PRESET = "dicom"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
STUDY_SUFFIXES = (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd")
"""Study files MONAI's LoadImaged reads (NibabelReader, ITKReader); a Slicer ``.seg.nrrd`` is a label map."""
MAX_LABEL = int(np.iinfo(np.uint8).max)


# ---------------------------------------------------------------------------------------------------------------
# Frames: MONAI (channel, X, Y, Z) + RAS affine <-> Volume (K, J, I) + LPS geometry
# ---------------------------------------------------------------------------------------------------------------


def _spatial_array(image: torch.Tensor | np.ndarray, channel: int | None = None) -> np.ndarray:
    """The (X, Y, Z) array of a (C, X, Y, Z) or (X, Y, Z) image: channel ``channel``, or its only channel."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 4:
        if channel is not None:
            if not 0 <= channel < array.shape[0]:
                raise ValueError(f"channel {channel} asked of an image of {array.shape[0]} channels")
            array = array[channel]
        elif array.shape[0] != 1:
            raise ValueError(f"expected one channel, got an array of shape {array.shape} (channel first): a 4D "
                             f"study ({array.shape[0]} frames or contrasts)? Choose its frame with the bundle's "
                             "frame setting (an index, or 'all')")
        else:
            array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a (C, X, Y, Z) or (X, Y, Z) volume, got shape {array.shape}")
    return array


def volume_from_metatensor(image: torch.Tensor | np.ndarray, affine: np.ndarray | torch.Tensor | None = None, *,
                           channel: int | None = None, modality: str | None = None,
                           metadata: Mapping[str, Any] | None = None) -> Volume:
    """A MONAI image, (1, X, Y, Z) or (X, Y, Z), or channel ``channel`` of a (C, X, Y, Z) one (a frame of a 4D
    study), as a library :class:`Volume` (K, J, I) = (Z, Y, X) in LPS.

    affine: (4, 4) (i, j, k) -> mm; default the MetaTensor's own (identity for a plain tensor). Its frame is the
    MetaTensor's ``space`` meta entry (RAS unless it says LPS). The array is copied; ``source`` is the MetaTensor's
    ``filename_or_obj``.
    """
    meta = image.meta if isinstance(image, MetaTensor) else {}
    if affine is None:
        affine = image.affine if isinstance(image, MetaTensor) else np.eye(4)
    affine = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a (4, 4) affine, got shape {affine.shape}")
    space = str(meta.get("space", "RAS")).upper()
    geometry = Geometry.from_ijk_to_lps(affine) if space == "LPS" else Geometry.from_ijk_to_ras(affine)
    array = np.ascontiguousarray(_spatial_array(image, channel).transpose(2, 1, 0))
    source = meta.get("filename_or_obj")
    return Volume(array=array, geometry=geometry, modality=modality, source=Path(source) if source else None,
                  metadata=dict(metadata or {}))


def labels_to_channel_first(labels: np.ndarray) -> torch.Tensor:
    """(K, J, I) label map -> (1, X, Y, Z) tensor, MONAI's layout (same dtype)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a (K, J, I) label map, got shape {labels.shape}")
    return torch.from_numpy(np.ascontiguousarray(labels.transpose(2, 1, 0)))[None]


# ---------------------------------------------------------------------------------------------------------------
# Dataset and intensities
# ---------------------------------------------------------------------------------------------------------------


def list_studies(dataset_dir: str | Path) -> list[str]:
    """The studies directly inside ``dataset_dir``, sorted by name: image files (NIfTI, NRRD, MHA/MHD) and DICOM
    series folders.

    A folder counts as a study when it holds exactly one DICOM image series (MONAI's ITK reader would silently read
    only the first of several); other folders and files (a Slicer ``.seg.nrrd``, a detached header's data file,
    notes) are skipped, and the skipped ones are logged. Raises :class:`ImageReadError` when ``dataset_dir`` is not
    a folder, holds no study, or has a folder with several series.
    """
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise ImageNotFoundError(folder, "dataset_dir is not a folder (pass --dataset_dir DIR)")
    studies: list[str] = []
    skipped: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        name = entry.name.lower()
        if entry.is_file() and name.endswith(STUDY_SUFFIXES) and not name.endswith(".seg.nrrd"):
            studies.append(str(entry))
        elif entry.is_dir() and (series := list_dicom_series(entry, recursive=False)):
            if len(series) > 1:
                listing = "\n  ".join(s.summary() for s in series)
                raise ImageReadError(entry, f"holds {len(series)} DICOM series; put each series in a folder of "
                                            f"its own:\n  {listing}")
            studies.append(str(entry))
        else:
            skipped.append(entry.name)
    if not studies:
        raise ImageReadError(folder, "no study found: expected image files (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd) "
                                     "or DICOM series folders")
    if skipped:
        logger.info("%s: %d entries that are not studies skipped: %s", folder, len(skipped),
                    ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return studies


def dicom_header_metadata(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """(modality, display metadata) of a DICOM series folder or file; (None, {}) for anything else (NIfTI, NRRD)."""
    path = Path(path)
    if path.is_dir():
        series = list_dicom_series(path, recursive=False)
        if len(series) != 1:
            return None, {}
        first = series[0].files[0]
    elif path.is_file() and not path.name.lower().endswith(STUDY_SUFFIXES):
        first = path
    else:
        return None, {}
    try:
        ds = pydicom.dcmread(first, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not a DICOM file: no header to use
        return None, {}
    return (str(ds.get("Modality", "")) or None), display_metadata(ds)


class ScaleIntensityPresetd(MapTransform):
    """Scale images to [0, 1] float32 with the library's intensity presets, as the command line does.

    preset: a name of :data:`insid3_med.imaging.intensity.PRESETS` (CT windows such as ``soft_tissue``, ``dicom``,
    ``mr``, ``radiograph``) or None to choose per study from its modality (see
    :func:`insid3_med.imaging.intensity.choose_preset`). modality: forced modality ("CT", "MR"...); None reads it
    from the DICOM header when the study is a DICOM series (NIfTI carries none: then values that look like HU are
    treated as CT, everything else as MR). Statistics (MR percentiles) are computed over the whole volume; each
    frame of a 4D study (channel first, C > 1) is scaled on its own, as the command line reads a frame.
    """

    def __init__(self, keys: KeysCollection, preset: str | None = None, modality: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.preset = preset or None
        self.modality = modality or None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            modality: str | None = None
            header: dict[str, Any] = {}
            if isinstance(image, MetaTensor) and image.meta.get("filename_or_obj"):
                modality, header = dicom_header_metadata(image.meta["filename_or_obj"])
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            scaled = np.empty(array.shape, np.float32)
            presets: list[str] = []
            for channel in range(array.shape[0]) if array.ndim == 4 else [None]:  # each frame of a 4D study alone
                volume = volume_from_metatensor(image, channel=channel, modality=self.modality or modality,
                                                metadata=header)
                mapping = intensity_mapping(volume, self.preset)
                part = np.s_[:] if channel is None else np.s_[channel]
                scaled[part] = mapping.to_unit(array[part])
                presets.append(mapping.preset)
            d[key] = convert_to_dst_type(scaled, image, dtype=torch.float32)[0]
            if isinstance(d[key], MetaTensor):
                d[key].meta["intensity_preset"] = ",".join(dict.fromkeys(presets))
        return d


def _frames_last(image: MetaTensor) -> bool:
    """Whether ``image`` is a 4D study as ``LoadImaged`` reads it, (X, Y, Z, T) with its frames last, not yet
    channel first (``EnsureChannelFirstd`` moves them to the channel)."""
    spatial = image.meta.get("spatial_shape")
    return (image.ndim == 4 and spatial is not None and str(image.meta.get("original_channel_dim")) == "-1"
            and tuple(image.shape[:3]) == tuple(int(n) for n in spatial))


class LoadLabelOnImageGridd(MapTransform):
    """Read label maps onto the grid of an image already loaded (by ``LoadImaged``), as the command line reads them.

    Each key holds a label map's path: NIfTI, NRRD, MHA, a Slicer ``.seg.nrrd`` or a DICOM SEG (segment n -> label
    n), also one saved cropped to its structure or holding only its labelled frames, which is placed onto the image's
    grid voxel for voxel (:func:`insid3_med.imaging.readers.read_label_volume`). The result is a MetaTensor laid out
    and oriented like ``data[image_key]`` ((X, Y, Z) with its affine and meta, ``filename_or_obj`` the label's path);
    for a 4D image (a cine) it is one 3D label map on the frames' grid (channel first: (1, X, Y, Z)).
    A label map that cannot be read or lies on another grid raises :class:`ImageReadError` naming its file.
    """

    def __init__(self, keys: KeysCollection, image_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        if not isinstance(image, MetaTensor):
            raise TypeError(f"{self.image_key!r} must be loaded first (a MetaTensor, as LoadImaged gives)")
        frames_last = _frames_last(image)
        spatial = image[..., 0] if frames_last else image  # every frame of a 4D study has the same grid
        like = volume_from_metatensor(spatial, channel=0 if spatial.ndim == 4 else None)
        for key in self.key_iterator(d):
            path = Path(str(d[key]))
            labels = read_label_volume(path, like=like)  # (K, J, I) on the image's grid
            array = torch.from_numpy(np.ascontiguousarray(labels.transpose(2, 1, 0)))
            if image.ndim == 4 and not frames_last:  # the image has its channel already
                array = array[None]
            meta = {k: v for k, v in image.meta.items() if k != "affine"}  # the affine is given on its own
            meta["filename_or_obj"] = str(path)
            if frames_last:  # one label map for the frames: EnsureChannelFirstd adds its channel
                meta["original_channel_dim"] = "no_channel"
            d[key] = MetaTensor(array, affine=image.affine.clone(), meta=meta)
        return d


def reference_preprocessing(preset: str | None = None, modality: str | None = None) -> Compose:
    """The default reference transform: load the image, its label map onto its grid (any label format the command
    line reads, :class:`LoadLabelOnImageGridd`), channel first, RAS, image scaled to [0, 1].

    The bundle's configs spell the same transforms out (``reference_preprocessing``) so that they can be overridden.
    """
    keys = ["image", "label"]
    return Compose([
        LoadImaged(keys="image", image_only=True),
        LoadLabelOnImageGridd(keys="label", image_key="image"),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
        ScaleIntensityPresetd(keys="image", preset=preset, modality=modality),
    ])


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BundleReference:
    """The reference study after preprocessing: ``volume`` (K, J, I) in [0, 1] and its (K, J, I) int64 labels;
    ``frame``: the frame of a 4D reference image they are drawn on (None for a 3D image)."""

    volume: Volume
    labels: np.ndarray
    image_path: Path
    label_path: Path
    frame: int | None = None

    @property
    def label_values(self) -> list[int]:
        return [int(v) for v in np.unique(self.labels) if v > 0]


class _NetworkSegmenter(OneShotSegmenter):
    """A :class:`OneShotSegmenter` whose positional basis is its network's ``positional_basis`` buffer when set."""

    state_basis: torch.Tensor | None = None

    def basis(self) -> torch.Tensor:
        if self.state_basis is None:
            return super().basis()
        return self.state_basis.to(self.backbone.device)


def _existing_reference_path(name: str, path: str | Path | None, either: str | Path | None) -> Path:
    """``path`` of the reference pair's ``name`` ("reference_image" or "reference_label") as a Path, checked: raises
    ImageReadError when it is not given (naming ``either``, the one of the pair that is) or ImageNotFoundError when
    it does not exist."""
    if not path:
        raise ImageReadError(Path(str(either)), f"{name} is missing: give both the reference image and its label map")
    if not Path(path).exists():
        raise ImageNotFoundError(Path(path), f"{name} not found")
    return Path(path)


ALL_FRAMES = "all"


def check_frame_setting(name: str, value: object, allow_all: bool) -> int | str | None:
    """The bundle's ``frame`` (None, a frame index or ``"all"``) or ``reference_frame`` (None or an index) setting,
    checked; raises ValueError naming ``name`` and what it takes."""
    if value is None or (allow_all and value == ALL_FRAMES):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, str) and value.isdigit():  # --frame 1 on the command line
        return int(value)
    takes = "null, a frame index (0, 1, ...) or 'all'" if allow_all else "null or a frame index (0, 1, ...)"
    raise ValueError(f"{name} must be {takes}, not {value!r}")


def _rank() -> str:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return f" [rank {torch.distributed.get_rank()}/{torch.distributed.get_world_size()}]"
    return ""


class OneShotNetwork(nn.Module):
    """One-shot segmentation as a MONAI network: (B, 1, X, Y, Z) image in [0, 1] -> (B, 1, X, Y, Z) uint8 labels.

    reference_image, reference_label: the reference study and its label map (NIfTI files or DICOM series folders;
    the label on the image's grid), read through ``reference_transform`` (default :func:`reference_preprocessing`),
    which must be the studies' own preprocessing with a ``label`` key added. A study that IS the reference image
    gets its unlabelled slices filled by propagation through slices; any other study is segmented from the
    reference's labelled slices (at most ``max_shots``). Label values (1..255) carry over.

    weights: backbone weights (None: the ``INSID3_MED_WEIGHTS`` variable, then the Hugging Face cache); image_size,
    feature_block, precision, fit, tau, merge_threshold, basis_rank, probe: as in :class:`OneShotSegmenter`
    and :class:`EngineParams`. axis: the slicing axis ("axial", "coronal", "sagittal", k/j/i, or "auto": the
    plane the reference was labelled in), per study.
    frame: what to segment of a 4D study (a cine's phases: the image's channels, C > 1): None refuses it (the study
    is skipped, saying so), an index segments that frame (one label map out), ``"all"`` every frame (a 4D label map
    out, one frame per channel). A 3D study is segmented whatever ``frame`` says. reference_frame: the frame of a
    4D reference image that its label map is drawn on (needed for a 4D reference). That frame of the reference's
    own file is filled by propagation through slices; its other frames, as every other study, by transfer.
    mode: ``volume`` or ``published`` (:mod:`insid3_med.volume`); propagation: volume-mode settings, a mapping of
    :class:`~insid3_med.propagation.PropagationParams` fields to values (None or empty: the measured defaults).
    device: where the backbone loads (``.to(device)`` moves it later too).

    State (``state_dict``): ``positional_basis`` (C, r) float32, the basis the features are debiased with, and
    ``state_fingerprint`` (32,) uint8, the sha256 of the weights file, feature block, precision, probe, input side
    and rank it was computed for. Loading a state with another fingerprint keeps the network's own basis and logs a
    warning. The backbone's weights are not part of the state; they load from ``weights``.
    """

    positional_basis: torch.Tensor  # buffers registered in __init__
    state_fingerprint: torch.Tensor

    def __init__(self, reference_image: str | Path | None = None, reference_label: str | Path | None = None, *,
                 reference_transform: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
                 weights: str | Path | None = None, image_size: int = 448, axis: str | int = "axial",
                 feature_block: int | None = None, precision: str = "fp32", fit: str = "stretch",
                 max_shots: int = 8, mode: str = "volume", tau: float = 0.6, merge_threshold: float = 0.2,
                 basis_rank: int | None = None, probe: str = "black", batch_size: int = 4,
                 propagation: Mapping[str, Any] | None = None, frame: int | str | None = None,
                 reference_frame: int | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        if max_shots < 1:
            raise ValueError(f"max_shots must be at least 1, not {max_shots}")
        self.frame = check_frame_setting("frame", frame, allow_all=True)
        reference = check_frame_setting("reference_frame", reference_frame, allow_all=False)
        self.reference_frame = reference if isinstance(reference, int) else None
        backbone = load_backbone(weights, device=device, precision=precision, feature_block=feature_block)
        params = EngineParams(tau=tau, merge_threshold=merge_threshold, basis_rank=basis_rank, probe=probe)
        self.segmenter = _NetworkSegmenter(backbone, image_size=image_size, params=params, fit=fit)
        self.axis = axis
        self.max_shots = int(max_shots)
        # The library's default volume mode (mode="published" segments each slice on its own, as the paper). Its
        # registration and refinement steps see MONAI's [0, 1]-scaled intensities instead of the raw ones a library
        # run reads; every step is invariant to that scaling up to rounding (the outputs measured identical).
        self.mode = mode
        # Volume-mode settings ({PropagationParams field: value}); checked now, so a typo fails before any study.
        self.params = params_from_settings(propagation) if propagation else None
        if self.params is not None:
            propagation_description(mode, self.params)  # the published mode has no settings
        self.batch_size = int(batch_size)
        self.register_buffer("positional_basis", self.segmenter.basis().detach().clone())
        self.register_buffer("state_fingerprint", self.expected_fingerprint().to(self.positional_basis.device))
        self.reference_transform = reference_transform or reference_preprocessing()
        self.reference: BundleReference | None = None
        self._transfer: tuple[BundleReference, StudyTransfer] | None = None  # other studies' transfer, this reference
        if reference_image or reference_label:
            self.reference = self.load_reference(reference_image, reference_label)

    # -- backbone and state -----------------------------------------------------------------------------------

    @property
    def backbone(self) -> Backbone:
        return self.segmenter.backbone

    def state_description(self) -> str:
        """What the state was computed for: weights sha256, feature block, precision, probe, input side, rank."""
        backbone = self.backbone
        return (f"{backbone.weights_sha256() or backbone.location}|{backbone.spec.name}|block{backbone.feature_block}"
                f"|{backbone.precision}|{self.segmenter.params.probe}|{self.segmenter.image_size}"
                f"|rank{self.segmenter.basis_rank}")

    def expected_fingerprint(self) -> torch.Tensor:
        """(32,) uint8: sha256 of :meth:`state_description`."""
        digest = hashlib.sha256(self.state_description().encode()).digest()
        return torch.tensor(list(digest), dtype=torch.uint8)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> OneShotNetwork:
        """``.to(device)`` and friends also move the backbone, which is not a registered submodule."""
        super()._apply(fn, recurse)
        self.backbone.network._apply(fn)
        self.backbone.device = self.positional_basis.device
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        stored = state_dict.get(prefix + "state_fingerprint")
        if stored is not None and not torch.equal(torch.as_tensor(stored).cpu(), self.state_fingerprint.cpu()):
            logger.warning("the loaded network state (models/model.pt) was computed for other weights or settings "
                           "than this network's (%s); keeping the positional basis computed for this network. Write "
                           "a matching state with insid3_med.bundle.write_network_state.", self.state_description())
            state_dict[prefix + "state_fingerprint"] = self.state_fingerprint
            state_dict[prefix + "positional_basis"] = self.positional_basis
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- reference --------------------------------------------------------------------------------------------

    def load_reference(self, image: str | Path | None, label: str | Path | None) -> BundleReference:
        """Read and check the reference pair through ``reference_transform``; raises ImageReadError on bad input."""
        image_path = _existing_reference_path("reference_image", image, image or label)
        label_path = _existing_reference_path("reference_label", label, image or label)
        try:
            data = self.reference_transform({"image": str(image), "label": str(label)})
        except RuntimeError as error:  # MONAI's Compose wraps what a transform raises: name the file, not the chain
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, ImageReadError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from error
        frame = self._reference_frame_of(image_path, data["image"])
        volume = volume_from_metatensor(data["image"], channel=frame, metadata=UNIT_DISPLAY)
        label_volume = volume_from_metatensor(data["label"])
        if label_volume.shape != volume.shape or not label_volume.geometry.allclose(volume.geometry, atol=1e-3):
            raise ImageReadError(label_path, f"the reference label map (shape {label_volume.shape}) is not on the "
                                             f"grid of the reference image {image} (shape {volume.shape})")
        try:
            labels = check_label_grid(volume, label_volume.array)
        except ValueError as error:
            raise ImageReadError(label_path, str(error)) from error
        if labels.max() > MAX_LABEL:
            raise ImageReadError(label_path, f"label value {int(labels.max())} exceeds {MAX_LABEL}: the bundle "
                                             "writes uint8 label maps")
        if not labels.any():
            raise ImageReadError(label_path, "the reference label map has no labelled voxel")
        try:
            axis = propagation_axis(volume, labels, self.axis)
        except ValueError as error:
            raise ImageReadError(label_path, str(error)) from error
        mismatch = None if is_auto_axis(self.axis) else axis_mismatch(volume, labels, axis)
        if mismatch:
            logger.warning("%s: %s", label, mismatch)
        reference = BundleReference(volume, labels, image_path, label_path, frame)
        logger.info("reference %s%s with labels %s from %s (%d labelled slices along %s: array axis %d)", image,
                    "" if frame is None else f" (frame {frame})", reference.label_values, label,
                    len(labelled_slices(labels, axis)), self.axis, axis)
        return reference

    def _reference_frame_of(self, path: Path, image: torch.Tensor) -> int | None:
        """The channel of the preprocessed reference ``image`` (C, X, Y, Z) its labels are drawn on: None for a 3D
        image; ``reference_frame`` for a 4D one (raises ImageReadError naming ``path`` when it is unset or out of
        range, or set for a 3D image)."""
        frames = int(image.shape[0]) if image.ndim == 4 else 1
        chosen = self.reference_frame
        if frames == 1:
            if chosen not in (None, 0):
                raise ImageReadError(path, f"reference_frame {chosen} asked of a 3D image: a frame is chosen in a 4D "
                                           "image only")
            return None
        if chosen is None:
            raise ImageReadError(path, f"a 4D image ({frames} frames or contrasts): set reference_frame to the frame "
                                       f"its label map is drawn on (0 to {frames - 1})")
        if chosen >= frames:
            raise ImageReadError(path, f"reference_frame {chosen} asked of a 4D image with {frames} frames "
                                       f"(0 to {frames - 1})")
        return int(chosen)

    # -- inference --------------------------------------------------------------------------------------------

    def segment_volume(self, volume: Volume, frame: int | None = None) -> np.ndarray:
        """One preprocessed study (values in [0, 1]; ``frame``: which frame of a 4D study it is, None for a 3D one)
        -> its (K, J, I) int64 label map, through the library."""
        if self.reference is None:
            raise ValueError("no reference: give the reference image and its label map (--reference_image PATH "
                             "--reference_label PATH)")
        self.segmenter.state_basis = self.positional_basis
        reference = self.reference
        is_reference = volume.source is not None and same_file(volume.source, reference.image_path)
        if is_reference and volume.shape == reference.volume.shape and frame == reference.frame:
            return propagate_through_slices(self.segmenter, volume, reference.labels, axis=self.axis,
                                            preset=UNIT_PRESET, batch_size=self.batch_size, mode=self.mode,
                                            params=self.params)
        if self._transfer is None or self._transfer[0] is not reference:  # the reference's own chain runs once
            self._transfer = (reference, StudyTransfer(self.segmenter, reference.volume, reference.labels,
                                                       axis=self.axis, preset=UNIT_PRESET, max_shots=self.max_shots,
                                                       batch_size=self.batch_size, mode=self.mode,
                                                       params=self.params))
        # another frame of the reference's own file: the same subject, registered as frames are
        return self._transfer[1].segment(volume, target_preset=UNIT_PRESET, same_subject=is_reference)

    def frames_to_segment(self, name: str | Path, frames: int) -> list[int | None]:
        """The frames of a study of ``frames`` channels to segment, as ``frame`` says: [None] for a 3D study
        (one channel). Raises ImageReadError naming the study ``name`` for a 4D one that ``frame`` does not choose
        in (the bundle then skips it, saying why)."""
        if frames == 1:
            return [None]
        if self.frame is None:
            raise ImageReadError(name, f"a 4D study ({frames} frames or contrasts); set the bundle's frame to the one "
                                       f"to segment (0 to {frames - 1}) or to 'all' (--frame all)")
        if self.frame == ALL_FRAMES:
            return list(range(frames))
        if int(self.frame) >= frames:
            raise ImageReadError(name, f"frame {self.frame} asked of a 4D study with {frames} frames "
                                       f"(0 to {frames - 1})")
        return [int(self.frame)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) float in [0, 1] -> (B, C', X, Y, Z) uint8 label maps (a MetaTensor for a MetaTensor).

        C = 1 for 3D studies (C' = 1); C > 1 for the frames of 4D studies, of which ``frame`` chooses: one (C' = 1)
        or all (C' = C)."""
        if images.ndim != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) batch of volumes (C = 1, or a 4D study's frames), got "
                             f"{tuple(images.shape)}")
        outputs = []
        for index in range(images.shape[0]):
            item = images[index]
            source = item.meta.get("filename_or_obj") if isinstance(item, MetaTensor) else None
            name = source or f"volume {index} of the batch"
            frames = self.frames_to_segment(name, int(item.shape[0]))
            low, high = float(item.min()), float(item.max())
            if low < -1e-3 or high > 1 + 1e-3:
                raise ValueError(f"{name}: intensities span [{low:g}, {high:g}]; the network expects them scaled to "
                                 "[0, 1] by the bundle's preprocessing (ScaleIntensityPresetd)")
            channels = []
            for frame in frames:
                volume = volume_from_metatensor(item, channel=0 if frame is None else frame, metadata=UNIT_DISPLAY)
                start = time.perf_counter()
                labels = self.segment_volume(volume, frame)
                logger.info("%s%s: labels %s on %d of %d voxels in %.1f s%s", name,
                            "" if frame is None else f" frame {frame}", [int(v) for v in np.unique(labels) if v > 0],
                            int(np.count_nonzero(labels)), labels.size, time.perf_counter() - start, _rank())
                channels.append(labels_to_channel_first(labels.astype(np.uint8))[0])
            outputs.append(torch.stack(channels))
        output = torch.stack(outputs).to(images.device)
        if isinstance(images, MetaTensor):
            result = MetaTensor(output)
            result.copy_meta_from(images)
            return result
        return output


def write_network_state(path: str | Path, network: OneShotNetwork | None = None, *, overwrite: bool = False,
                        **network_args: Any) -> Path:
    """Write ``network``'s state (or that of ``OneShotNetwork(**network_args)``) to ``path`` (``models/model.pt``).

    The file is a plain state dict (``positional_basis``, ``state_fingerprint``), written whole or not at all;
    an existing file is kept unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path, "exists; pass overwrite=True to replace it")
    network = network or OneShotNetwork(**network_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def check_outputs_absent(studies: Sequence[str | Path], output_dir: str | Path, output_postfix: str,
                         output_ext: str, separate_folder: bool = True, overwrite: bool = False,
                         inputs: Sequence[str | Path | None] = ()) -> list[Path]:
    """The label maps SaveImaged will write for ``studies``.

    Raises OutputExistsError if one exists and not ``overwrite`` (MONAI's writer itself replaces files silently),
    or, even with ``overwrite``, if one would replace a study or another of the run's ``inputs`` (the reference
    image and label map; ``None`` entries are skipped).
    """
    planned = [Path(create_file_basename(output_postfix, str(study), str(output_dir), separate_folder=separate_folder,
                                         makedirs=False) + output_ext) for study in studies]
    sources = RunInputs(path for path in [*studies, *inputs] if path is not None)
    for path in planned:
        if path in sources:
            raise OutputExistsError(path, "this output would replace an input of the run (a study or the reference); "
                                          "choose another --output_dir or --output_postfix")
    existing = [path for path in planned if path.exists()]
    if existing and not overwrite:
        listing = ", ".join(str(path) for path in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise OutputExistsError(Path(output_dir), f"{len(existing)} output(s) exist ({listing}); choose another "
                                                  "--output_dir or pass --overwrite true")
    return planned


def frames_header(meta_dict: Mapping | None, data: Any) -> nib.Nifti1Header | None:
    """A NIfTI header holding the time between frames (``pixdim[4]``) and the units of the 4D NIfTI study named by
    ``meta_dict["filename_or_obj"]``, for the channel-last ``data`` (X, Y, Z, T) written from its every frame; None
    when ``data`` is not that (a 3D label map, a frame of the study, a study that is not a NIfTI file)."""
    source = (meta_dict or {}).get("filename_or_obj")
    if not source or np.ndim(data) != 4 or not str(source).lower().endswith(NIFTI_SUFFIXES):
        return None
    try:
        study = nib.load(str(source)).header
    except (OSError, nib.filebasedimages.ImageFileError):
        return None
    if not isinstance(study, nib.Nifti1Header) or study["dim"][0] != 4 or int(study["dim"][4]) != np.shape(data)[3]:
        return None
    header = nib.Nifti1Header()
    header.set_xyzt_units(*study.get_xyzt_units())
    header["pixdim"][4] = study["pixdim"][4]
    header["toffset"] = study["toffset"]
    return header


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's NIfTI writer, writing each file to a temporary name beside it and renaming it into place.

    ``SaveImaged(writer=AtomicNibabelWriter)``: a run stopped while writing leaves no partial label map under the
    final name (the temporary file is deleted on an error; only a killed process can leave one, named
    ``.insid3-partial-*``), and an existing file is replaced only once its successor is complete. The label map
    of every frame of a 4D NIfTI study keeps the study's time between frames and its units (MONAI's reader drops
    them: :func:`frames_header`).
    """

    frames_header: nib.Nifti1Header | None = None

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options: Any) -> None:
        super().set_metadata(meta_dict, resample, **options)
        self.frames_header = frames_header(meta_dict, self.data_obj)

    def write(self, filename: str | os.PathLike[str], verbose: bool = False, **obj_kwargs: Any) -> None:
        final = Path(filename)
        temporary = partial_path(final)
        if self.frames_header is not None and "header" not in obj_kwargs:
            header = self.frames_header.copy()  # nibabel takes the data type from a given header
            header.set_data_dtype(self.output_dtype if self.output_dtype is not None else self.data_obj.dtype)
            obj_kwargs["header"] = header
        try:
            super().write(temporary, verbose=verbose, **obj_kwargs)
            os.replace(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)


# -- a batch goes on past an unreadable study -------------------------------------------------------------------

UNREADABLE = "unreadable"
"""The key of the item that stands for a study that could not be read (its path) in :class:`ReadableStudies`."""


def _root_cause(error: BaseException) -> str:
    """The innermost cause of an error MONAI wrapped (``applying transform ...``), as ``Type: message``."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error.problem if isinstance(error, ImageReadError) else f"{type(error).__name__}: {error}"


class ReadableStudies(Dataset):
    """MONAI's ``Dataset`` whose item for a study that cannot be read (a truncated file, an unsupported one) is
    ``{"unreadable": path, "reason": why}`` instead of an error that would end the whole run: the study is
    logged as skipped, the batch goes on (:func:`collate_readable`, :func:`skip_unreadable`), and
    :func:`report_skipped` ends the run with exit code 2 naming it."""

    def _transform(self, index: int) -> Any:
        item = self.data[index]
        try:
            return super()._transform(index)
        except Exception as error:  # noqa: BLE001 - any reader or transform failure: skip this study, not the run
            path = str(item.get("image", item)) if isinstance(item, Mapping) else str(item)
            reason = _root_cause(error)
            logger.warning("skipped %s: %s%s", path, reason, _rank())
            return {UNREADABLE: path, "reason": reason}


def collate_readable(batch: Sequence[Any]) -> Any:
    """The DataLoader's collate: MONAI's ``list_data_collate``, except that a batch of unreadable studies passes
    as ``{"unreadable": [paths], "reason": [why]}``. Studies differ in shape, so the bundle batches one study at a
    time; an unreadable study among others in one batch is an error."""
    skipped = [item for item in batch if isinstance(item, Mapping) and UNREADABLE in item]
    if not skipped:
        return list_data_collate(batch)
    if len(skipped) != len(batch):
        raise ValueError(f"an unreadable study ({skipped[0][UNREADABLE]}) in a batch of {len(batch)}: give the "
                         "DataLoader batch_size 1")
    return {UNREADABLE: [item[UNREADABLE] for item in skipped], "reason": [item["reason"] for item in skipped]}


def skip_unreadable(engine: Any, batch: Any) -> Any:
    """The evaluator's ``iteration_update``: a batch of unreadable studies, or a study the network refuses (an
    :class:`ImageReadError` or ``ValueError``, e.g. a 4D study), is recorded in ``engine.skipped_studies`` and
    skipped (no prediction, nothing written); any other batch runs as ``SupervisedEvaluator`` runs it."""
    skipped: list[tuple[str, str]] = engine.__dict__.setdefault("skipped_studies", [])
    if isinstance(batch, Mapping) and UNREADABLE in batch:
        skipped.extend(zip(batch[UNREADABLE], batch["reason"], strict=True))
        return {}
    try:
        return engine._iteration(engine, batch)
    except ValueError as error:  # ImageReadError is one
        paths = _batch_paths(batch) or ["a study"]
        reason = _root_cause(error)
        for path in paths:
            logger.warning("skipped %s: %s%s", path, reason, _rank())
            skipped.append((path, reason))
        return {}


def _batch_paths(batch: Any) -> list[str]:
    """The study paths of a collated batch (MONAI's ``filename_or_obj``), or none."""
    image = batch.get("image") if isinstance(batch, Mapping) else None
    if not isinstance(image, MetaTensor):
        return []
    names = image.meta.get("filename_or_obj")
    return [str(name) for name in (names if isinstance(names, (list, tuple)) else [names])]


def report_skipped(evaluator: Any) -> None:
    """After the run: log the studies skipped (this process's, in a distributed run once every process is done)
    and end the run with exit code 2 when there were any; studies read and written are kept."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # a process that exits early would have the launcher stop the others
    skipped = getattr(evaluator, "skipped_studies", [])
    if not skipped:
        return
    listing = "\n  ".join(f"{path}: {reason}" for path, reason in skipped)
    logger.error("%d stud%s skipped, not segmented%s:\n  %s", len(skipped), "y" if len(skipped) == 1 else "ies",
                 _rank(), listing)
    raise SystemExit(2)


def exit_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's, or torchrun stopping the other workers after one failed) end the run as an
    exception would, with exit code 143: ``finally`` blocks run, so a label map being written leaves no temporary
    file behind. Called by the configs' ``initialize``; a no-op outside the main thread."""
    import signal
    import sys

    def stop(signum: int, frame: object) -> None:
        logger.error("terminated (SIGTERM)%s", _rank())
        sys.exit(143)

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        pass


def locate_bundle_root(start: str | Path | None = None) -> str:
    """The bundle folder: ``start`` (default the working folder) if it is one, else its ``monai_bundle`` folder.

    A bundle folder holds ``configs/inference.json``. Running from elsewhere needs ``--bundle_root PATH``.
    """
    here = Path(start or os.getcwd())
    for candidate in (here, here / "monai_bundle"):
        if (candidate / "configs" / "inference.json").is_file():
            return str(candidate)
    raise ImageNotFoundError(here, "is neither a MONAI bundle folder nor a folder holding monai_bundle/; run from "
                                   "either or pass --bundle_root PATH")


__all__: Sequence[str] = [
    "AtomicNibabelWriter",
    "BundleReference",
    "check_outputs_absent",
    "collate_readable",
    "exit_on_sigterm",
    "ReadableStudies",
    "report_skipped",
    "skip_unreadable",
    "OneShotNetwork",
    "ScaleIntensityPresetd",
    "dicom_header_metadata",
    "labels_to_channel_first",
    "list_studies",
    "locate_bundle_root",
    "reference_preprocessing",
    "volume_from_metatensor",
    "write_network_state",
]
