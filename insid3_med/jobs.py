"""File-to-file jobs: read inputs, run the one-shot pipeline, write every requested output or none.

These are what the command line (and through it the Slicer extension) runs; they hold no segmentation logic of their
own: reading is :mod:`insid3_med.imaging.readers`, the work is :mod:`insid3_med.volume`, writing is
:mod:`insid3_med.imaging.writers`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from insid3_med.backbones import Backbone, load_backbone, resolve_precision
from insid3_med.engine import EngineParams
from insid3_med.imaging.dicom import list_dicom_series, select_series
from insid3_med.imaging.errors import (
    ImageNotFoundError,
    ImageReadError,
    ImageWriteError,
    OutputExistsError,
    SeveralFramesError,
    SeveralSeriesError,
)
from insid3_med.imaging.geometry import Volume
from insid3_med.imaging.intensity import intensity_mapping
from insid3_med.imaging.overlay import write_overlay_montage
from insid3_med.imaging.readers import (
    DICOM_SUFFIXES,
    IMAGE_2D_SUFFIXES,
    check_frame,
    count_frames,
    is_dicom_file,
    read_image_2d,
    read_label_names,
    read_label_volume,
    read_volume,
)
from insid3_med.imaging.writers import write_dicom_seg, write_nifti_label_frames, write_nifti_labels, write_seg_nrrd
from insid3_med.outputs import OutputSet, RunInputs, label_statistics, output_set, software_versions, write_json
from insid3_med.predictor import OneShotSegmenter
from insid3_med.propagation import PropagationParams, label_dtype
from insid3_med.volume import (
    AUTO_AXIS,
    ProgressCallback,
    StudyTransfer,
    axis_mismatch,
    check_range_holds_a_labelled_slice,
    is_auto_axis,
    labelled_slices,
    propagate_through_slices,
    propagation_axis,
    propagation_description,
    resolve_slice_range,
)

Warn = Callable[[str], None]
"""Receives a sentence for the user (the CLI prints it on stderr); the same sentences go into the summaries."""

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd", *DICOM_SUFFIXES)


@dataclass
class ModelOptions:
    """How to build the segmenter: weights, device, precision, input side, feature block and engine parameters.

    precision: "fp32", "bf16" or "auto" (:func:`insid3_med.backbones.resolve_precision`: bf16 for the chained volume
    propagation on a CPU where bf16 measures faster, else fp32).
    """

    weights: str | None = None
    device: str | None = None
    precision: str = "fp32"
    image_size: int = 448
    feature_block: int | None = None
    fit: str = "stretch"
    params: EngineParams = field(default_factory=EngineParams)

    def build(self, chained: bool = False) -> OneShotSegmenter:
        """The segmenter; ``chained``: it serves the volume mode's chained propagation (for "auto" precision)."""
        precision = resolve_precision(self.precision, self.device, chained=chained)
        backbone = load_backbone(self.weights, device=self.device, precision=precision,
                                 feature_block=self.feature_block)
        return OneShotSegmenter(backbone, image_size=self.image_size, params=self.params, fit=self.fit)


@dataclass
class VolumeOutputs:
    """Where a volume job writes: the NIfTI label map always; the others when given."""

    labels: Path
    seg_nrrd: Path | None = None
    dicom_seg: Path | None = None
    overlay: Path | None = None
    summary: Path | None = None


def model_description(segmenter: OneShotSegmenter) -> dict[str, Any]:
    backbone: Backbone = segmenter.backbone
    return {
        "backbone": backbone.spec.name,
        "weights": backbone.location,
        "weights_sha256": backbone.weights_sha256(),
        "feature_block": backbone.feature_block,
        "precision": backbone.precision,
        "device": str(backbone.device),
        "image_size": segmenter.image_size,
        "fit": segmenter.fit,
        "basis_rank": segmenter.basis_rank,
        "params": asdict(segmenter.params),
    }


def volume_stem(path: Path) -> str:
    """A file's name without its image suffix (.nii.gz, .nrrd, ...), or a DICOM folder's name."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_study_path(path: Path) -> None:
    """Refuse, naming the file, a study path that does not exist or is a 2D image file (PNG, JPEG ...: ``segment``
    is the command for those); nothing is read."""
    if not path.exists():
        raise ImageNotFoundError(path, "no such file or folder")
    if path.suffix.lower() in IMAGE_2D_SUFFIXES:
        raise ImageReadError(path, "a 2D image: propagate and transfer take volumes (NIfTI, NRRD, MHA or a DICOM "
                             "series folder); segment 2D images with `insid3-med segment`")


def read_study(path: Path, series: str | None = None, frame: int | None = None) -> Volume:
    """A volume for ``propagate`` or ``transfer``.

    A DICOM image file stands for its whole series; ``series`` (a series number or a SeriesInstanceUID) picks one
    series of a DICOM folder; ``frame`` one frame of a 4D file. A 2D image file (PNG, JPEG ...) is refused, naming
    ``segment``; a folder of several series or a 4D file without a choice is refused, saying how to choose.
    """
    check_study_path(path)
    number, uid = (int(series), None) if series is not None and series.isdigit() else (None, series)
    try:
        return read_volume(path, series_uid=uid, series_number=number, whole_series=True, frame=frame)
    except SeveralSeriesError as error:
        raise how_to_choose_a_series(path, error) from error
    except SeveralFramesError as error:
        raise how_to_choose_a_frame(path, error) from error


def how_to_choose_a_frame(path: Path, error: SeveralFramesError) -> ImageReadError:
    """The 4D error of a study file, with the command line's way to choose a frame."""
    return ImageReadError(path, f"{error.problem} with --frame N (0 to {error.frames - 1})")


def check_study_frame(path: Path, frame: int | None) -> None:
    """:func:`~insid3_med.imaging.readers.check_frame` with the command line's way to choose (headers only)."""
    try:
        check_frame(path, frame)
    except SeveralFramesError as error:
        raise how_to_choose_a_frame(path, error) from error


def how_to_choose_a_series(path: Path, error: SeveralSeriesError) -> ImageReadError:
    """The several-series error of a study folder, with the command line's ways to choose one."""
    return ImageReadError(path, f"{error.problem}\ngive one of its files in place of the folder (any file of a "
                          "series stands for the whole series), or, with propagate, --series NUMBER")


def check_one_series(folder: Path) -> None:
    """Refuse a DICOM study folder that holds no image series or several (headers only), saying how to choose."""
    try:
        select_series(folder, list_dicom_series(folder))
    except SeveralSeriesError as error:
        raise how_to_choose_a_series(folder, error) from error


def is_dicom_study(path: Path) -> bool:
    """Whether a study path is DICOM (a series folder or a DICOM file), from the path and the file's marker."""
    return path.is_dir() or (path.is_file() and is_dicom_file(path))


def study_stem(path: Path) -> str:
    """The name a study's outputs start with: the file's stem or the DICOM folder's name; a DICOM series given by
    one of its single-frame files is named by its folder and series number (``<folder>_series<N>``)."""
    if path.is_file() and is_dicom_study(path):
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesNumber", "NumberOfFrames"],
                                 force=True)
        number = header.get("SeriesNumber")
        if int(header.get("NumberOfFrames", 1) or 1) == 1:  # a multi-frame file is its own series: its stem
            series = f"series{number}" if number not in (None, "") else path.stem
            return f"{path.parent.name}_{series}"
    return volume_stem(path)


def input_files(volume: Volume) -> list[Path]:
    """The files a volume was read from where it came from a folder (a DICOM series' slices); else none."""
    return [Path(path) for path in volume.metadata.get("source_files", ())]


def check_outputs(outputs: VolumeOutputs, dicom_input: bool, source: Path, outputs_set: OutputSet) -> dict[str, Path]:
    """Claim every output path (refusing existing ones unless overwriting) before any work starts; a DICOM SEG
    needs a DICOM ``source``."""
    if outputs.dicom_seg is not None and not dicom_input:
        raise ImageReadError(source, "--dicom-seg needs a DICOM series as input (this input is not DICOM)")
    claimed = {"labels": outputs_set.claim(outputs.labels)}
    for key in ("seg_nrrd", "dicom_seg", "overlay", "summary"):
        path = getattr(outputs, key)
        if path is not None:
            claimed[key] = outputs_set.claim(path)
    if not outputs.labels.name.lower().endswith((".nii", ".nii.gz")):
        raise ImageWriteError(outputs.labels, "the label map is written as NIfTI: its name ends with .nii.gz or .nii "
                              "(--seg-nrrd writes a Slicer .seg.nrrd, --dicom-seg a DICOM SEG, beside it)")
    if outputs.seg_nrrd is not None and not outputs.seg_nrrd.name.lower().endswith(".seg.nrrd"):
        raise ImageWriteError(outputs.seg_nrrd, "a Slicer segmentation file name ends with .seg.nrrd")
    return claimed


def write_volume_outputs(labels: np.ndarray, volume: Volume, claimed: dict[str, Path],
                         highlight: Sequence[int], axis: int, summary: dict[str, Any],
                         names: dict[int, str] | None = None) -> None:
    """Write the label map and the optional outputs to their claimed temporary paths (the label map only where
    ``claimed`` names one)."""
    if "labels" in claimed:
        write_nifti_labels(labels, volume, claimed["labels"], overwrite=True)
    if "seg_nrrd" in claimed:
        write_seg_nrrd(labels, volume, claimed["seg_nrrd"], segment_names=names, overwrite=True)
    if "dicom_seg" in claimed:
        write_dicom_seg(labels, volume, claimed["dicom_seg"], segment_names=names, overwrite=True)
    if "overlay" in claimed:
        shown = volume if axis == 0 else np.moveaxis(volume.array, axis, 0)
        shown_labels = labels if axis == 0 else np.moveaxis(labels, axis, 0)
        write_overlay_montage(shown, shown_labels, claimed["overlay"], highlight=set(highlight), overwrite=True)
    if "summary" in claimed:
        summary["labels"] = label_statistics(labels, volume, axis, names)
        summary["software"] = software_versions()
        write_json(summary, claimed["summary"])


def resolved_axis(volume: Volume, labels: np.ndarray, labels_path: Path, axis: int | str,
                  warn: Warn | None) -> tuple[int, list[str]]:
    """The array axis to slice ``volume`` along (:func:`~insid3_med.volume.propagation_axis`) and the warnings to
    give: an axis given explicitly across which the labels were not drawn. An empty label map raises
    :class:`ImageReadError` naming ``labels_path``."""
    if not labels.any():  # before the model loads, naming the file
        raise ImageReadError(labels_path, "no labelled slice (the label map is empty): label the structure on at "
                             "least one slice")
    array_axis = propagation_axis(volume, labels, axis)
    mismatch = None if is_auto_axis(axis) else axis_mismatch(volume, labels, array_axis)
    warnings = [f"{labels_path}: {mismatch}"] if mismatch else []
    for message in warnings:
        if warn is not None:
            warn(message)
    return array_axis, warnings


def propagate_file(volume_path: Path, labels_path: Path, outputs: VolumeOutputs, model: ModelOptions, *,
                   axis: int | str = AUTO_AXIS, slice_range: tuple[int, int] | None = None, preset: str | None = None,
                   force: bool = False, series: str | None = None, frame: int | None = None, mode: str = "volume",
                   params: PropagationParams | None = None, all_frames: bool = False,
                   progress: ProgressCallback | None = None, warn: Warn | None = None) -> dict[str, Any]:
    """``insid3-med propagate``: labelled slices of ``labels_path`` through ``volume_path``; returns the summary.

    axis: "auto" (default: the axis the labels were drawn across), an array axis or an anatomical plane;
    mode: ``volume`` (chained, the default) or ``published`` (each slice on its own), see :mod:`insid3_med.volume`;
    params: the volume mode's settings (default: the measured defaults); warn: receives warnings before the work;
    series, frame: which series of a DICOM folder, which frame of a 4D file. all_frames: with ``frame``, the
    labels (drawn on that frame) are propagated through it, and every other frame of the 4D file is segmented from
    them as ``transfer`` segments another study (:func:`segment_other_frames`); the label map written is 4D, one
    frame per frame of the input.
    """
    propagation = propagation_description(mode, params)  # a bad mode fails before anything is read
    started = time.perf_counter()
    frames = check_all_frames(volume_path, frame, slice_range, outputs) if all_frames else 1
    volume = read_study(volume_path, series=series, frame=frame)
    labels = read_label_volume(labels_path, volume)
    array_axis, warnings = resolved_axis(volume, labels, labels_path, axis, warn)
    references = labelled_slices(labels, array_axis)
    if mode == "volume":  # before the model loads, naming the file
        start, stop = resolve_slice_range(volume.shape[array_axis], slice_range)
        try:
            check_range_holds_a_labelled_slice(references, start, stop, array_axis)
        except ValueError as error:
            raise ImageReadError(labels_path, str(error)) from error
    intensity_mapping(volume, preset)  # a bad preset fails before the model loads
    with output_set(force, inputs=[volume_path, labels_path, *input_files(volume)]) as outputs_set:
        claimed = check_outputs(outputs, "source_files" in volume.metadata, volume_path, outputs_set)
        segmenter = model.build(chained=mode == "volume")
        loaded = time.perf_counter()
        result = propagate_through_slices(segmenter, volume, labels, axis=array_axis, slice_range=slice_range,
                                          preset=preset, progress=overall_progress(progress, 0, frames), mode=mode,
                                          params=params)
        finished = time.perf_counter()
        timings = {"read_and_load": round(loaded - started, 3), "propagate": round(finished - loaded, 3)}
        summary: dict[str, Any] = {
            "command": "propagate", "volume": str(volume_path), **({"frame": frame} if frame is not None else {}),
            "labels_input": str(labels_path),
            "axis": array_axis, "slice_plane": volume.geometry.slice_plane(array_axis),
            "labelled_slices": references, "slice_range": slice_range, "warnings": warnings,
            "model": model_description(segmenter), "propagation": propagation,
            "timings_s": timings,
        }
        names = read_label_names(labels_path) or None
        if all_frames:
            assert frame is not None  # checked by check_all_frames
            every = segment_other_frames(segmenter, volume_path, volume, labels, result, frame, frames, array_axis,
                                         preset=preset, mode=mode, params=params, progress=progress)
            summary["frames"] = frames
            summary["labels_by_frame"] = [label_statistics(labels_of_frame, volume, array_axis, names)
                                          for labels_of_frame in every]
            timings["other_frames"] = round(time.perf_counter() - finished, 3)
            write_volume_outputs(result, volume, {k: v for k, v in claimed.items() if k != "labels"}, references,
                                 array_axis, summary, names=names)
            write_nifti_label_frames(every, volume, claimed["labels"], overwrite=True)
        else:
            write_volume_outputs(result, volume, claimed, references, array_axis, summary, names=names)
    return summary


def check_all_frames(path: Path, frame: int | None, slice_range: tuple[int, int] | None,
                     outputs: VolumeOutputs) -> int:
    """Before any work, what ``propagate --all-frames`` needs: the labelled frame given, a 4D file, no slice range
    and no output that holds one 3D segmentation only (a ``.seg.nrrd``, a DICOM SEG). Returns the frame count."""
    if frame is None:
        raise ImageReadError(path, "--all-frames needs --frame N: the frame the labels were drawn on")
    if slice_range is not None:
        raise ImageReadError(path, "--all-frames segments every slice of every frame: leave out --slices")
    for option, given in (("--seg-nrrd", outputs.seg_nrrd), ("--dicom-seg", outputs.dicom_seg)):
        if given is not None:
            raise ImageWriteError(given, f"{option} holds one 3D segmentation; with --all-frames the label map is "
                                  "a 4D NIfTI file (one frame per frame of the input)")
    check_study_path(path)  # a missing file or a 2D image is said as read_study says it
    check_study_frame(path, frame)
    return count_frames(path)


def segment_other_frames(segmenter: OneShotSegmenter, path: Path, labelled: Volume, drawn: np.ndarray,
                         propagated: np.ndarray, frame: int, frames: int, axis: int, *, preset: str | None,
                         mode: str, params: PropagationParams | None,
                         progress: ProgressCallback | None) -> list[np.ndarray]:
    """Every frame's (K, J, I) label map, in frame order: ``propagated`` (the ``drawn`` labels propagated through
    the ``labelled`` volume) for ``frame``, and each other frame of the 4D file ``path``, read in turn, segmented
    from the ``drawn`` labels of ``labelled`` as ``transfer`` segments another study of the same subject
    (:class:`~insid3_med.volume.StudyTransfer`, sliced along the same array ``axis``, the reference's own chain run
    once; the evaluation harness's transfer task with ``pairing="frames"`` measures exactly this)."""
    transfer = StudyTransfer(segmenter, labelled, drawn, axis=axis, preset=preset, mode=mode, params=params)
    every: list[np.ndarray] = []
    for index in range(frames):
        if index == frame:
            every.append(propagated)
            continue
        position = index if index > frame else index + 1  # the labelled frame came first
        labels = transfer.segment(read_study(path, frame=index), progress=overall_progress(progress, position, frames),
                                  same_subject=True)
        every.append(labels.astype(label_dtype([int(drawn.max())])))  # frames kept small until written
    return every


class SkippedTargets:
    """The targets of a batch that could not be read: each is warned about when met, and :meth:`raise_if_any` ends
    the run naming them all once the others are done."""

    def __init__(self, warn: Warn | None) -> None:
        self.warn = warn
        self.errors: list[str] = []

    def add(self, error: Exception) -> None:
        self.errors.append(str(error))
        if self.warn is not None:
            self.warn(f"{error}; this target is skipped, the others go on")

    def raise_if_any(self, output_dir: Path, targets: int, done: int, outputs: str) -> None:
        """An ImageReadError naming every skipped target; ``outputs`` says what they lack ("outputs", "mask")."""
        if self.errors:
            raise ImageReadError(output_dir, f"{len(self.errors)} of {targets} targets could not be read and have no "
                                 f"{outputs} ({done} done):\n  " + "\n  ".join(self.errors))


def overall_progress(progress: ProgressCallback | None, index: int, count: int) -> ProgressCallback | None:
    """Target ``index`` of ``count``'s (done, total) reported as progress over all targets: the fraction
    (index + done / total) / count, so a progress bar fills once over the run instead of once per target."""
    if progress is None or count == 1:
        return progress
    report = progress

    def overall(done: int, total: int) -> None:
        report(index * total + done, count * total)

    return overall


def check_distinct_names(output_dir: Path, targets: Sequence[Path], output_names: Sequence[str]) -> None:
    """Refuse targets whose outputs would have the same name (``a/ct.nii.gz`` and ``b/ct.nii.gz``, ``img.bmp`` and
    ``img.tif``), naming each group of them and the output they would share."""
    by_name: dict[str, list[Path]] = {}
    for path, name in zip(targets, output_names, strict=True):
        by_name.setdefault(name, []).append(path)
    clashes = [f"{', '.join(str(path) for path in paths)} would {'both' if len(paths) == 2 else 'all'} write {name}"
               for name, paths in by_name.items() if len(paths) > 1]
    if clashes:
        raise ImageReadError(output_dir, "targets share a name, so their outputs would collide: "
                             + "; ".join(clashes) + " (give them separate runs or output folders, or rename them)")


def transfer_files(reference_path: Path, reference_labels_path: Path, targets: Sequence[Path], output_dir: Path,
                   model: ModelOptions, *, axis: int | str = AUTO_AXIS, preset: str | None = None, force: bool = False,
                   seg_nrrd: bool = False, dicom_seg: bool = False, overlay: bool = False, summary: bool = False,
                   mode: str = "volume", params: PropagationParams | None = None, frame: int | None = None,
                   progress: ProgressCallback | None = None, warn: Warn | None = None,
                   done: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """``insid3-med transfer``: one output set per target in ``output_dir`` (``<stem>_seg.nii.gz`` and friends).

    Before any work, the reference is read and every target path and output path is checked (missing targets, 2D
    images, outputs that exist without ``force`` or collide). Targets are then read and segmented one at a time, so
    one is in memory at once, and each target's outputs are renamed into place together as soon as they are
    written (``done`` receives its summary). A target that cannot be read is skipped with a warning and the others
    go on; the run then ends with an :class:`ImageReadError` naming the skipped ones.
    axis, mode, params, warn: as in :func:`propagate_file` ("auto": each target sliced in the plane the reference
    was labelled in). frame: the frame read of every study, reference and targets, each a 4D file (the same
    contrast of multi-modal studies, the same phase of cines).
    """
    propagation = propagation_description(mode, params)
    reference = read_study(reference_path, frame=frame)
    reference_labels = read_label_volume(reference_labels_path, reference)
    _, warnings = resolved_axis(reference, reference_labels, reference_labels_path, axis, warn)
    if not output_dir.is_dir():
        raise ImageReadError(output_dir, "output folder does not exist")
    for path in targets:
        check_study_path(path)
        if path.is_dir():
            check_one_series(path)
        check_study_frame(path, frame)
    stems = [study_stem(path) for path in targets]
    check_distinct_names(output_dir, targets, [f"{stem}_seg.nii.gz" for stem in stems])
    names = read_label_names(reference_labels_path) or None
    inputs = RunInputs([reference_path, reference_labels_path, *targets, *input_files(reference)])
    plans = []
    for path, stem in zip(targets, stems, strict=True):
        outputs_set = OutputSet(force, inputs)
        outputs = VolumeOutputs(
            labels=output_dir / f"{stem}_seg.nii.gz",
            seg_nrrd=output_dir / f"{stem}_seg.seg.nrrd" if seg_nrrd else None,
            dicom_seg=output_dir / f"{stem}_seg.dcm" if dicom_seg else None,
            overlay=output_dir / f"{stem}_overlay.png" if overlay else None,
            summary=output_dir / f"{stem}_summary.json" if summary else None,
        )
        plans.append((path, outputs_set, check_outputs(outputs, is_dicom_study(path), path, outputs_set)))
    segmenter = model.build(chained=mode == "volume")
    transfer = StudyTransfer(segmenter, reference, reference_labels, axis=axis, preset=preset, mode=mode,
                             params=params)
    summaries: list[dict[str, Any]] = []
    skipped = SkippedTargets(warn)
    for index, (path, outputs_set, claimed) in enumerate(plans):
        try:
            study = read_study(path, frame=frame)
            outputs_set.protect(input_files(study))
        except (ImageReadError, OutputExistsError) as error:
            skipped.add(error)
            continue
        with outputs_set:
            started = time.perf_counter()
            result = transfer.segment(study, progress=overall_progress(progress, index, len(plans)))
            target_axis = transfer.target_axis(study)
            record = {
                "command": "transfer", "reference": str(reference_path), "reference_labels": str(reference_labels_path),
                "target": str(path), **({"frame": frame} if frame is not None else {}), "axis": target_axis,
                "warnings": warnings,
                "model": model_description(segmenter),
                "propagation": propagation,
                "timings_s": {"transfer": round(time.perf_counter() - started, 3)},
            }
            write_volume_outputs(result, study, claimed, [], target_axis, record, names=names)
        del study, result
        summaries.append(record)
        if done is not None:
            done(record)
    skipped.raise_if_any(output_dir, len(targets), len(summaries), "outputs")
    return summaries


LOSSY_SUFFIXES = (".jpg", ".jpeg")
MAX_MASK_LABELS = 64
"""More distinct values than this in a lossless 2D mask: a grey-scale image given as the mask, refused."""


def read_mask_2d(path: Path, like: Volume) -> np.ndarray:
    """A 2D label mask as an (H, W) int64 label map: grey or palette values are the labels, except that a black and
    white mask (0/255) and a mask of one colour on black give 0/1, and a JPEG mask (lossy compression blurs its
    edges into other values) is thresholded at 128 into 0/1."""
    mask = read_image_2d(path).array[0]
    if mask.shape[:2] != like.array.shape[1:3]:
        raise ImageReadError(path, f"mask size {mask.shape[:2]} differs from its image's {like.array.shape[1:3]}")
    lossy = path.suffix.lower() in LOSSY_SUFFIXES
    if mask.ndim == 3:  # colour: its channels differ somewhere
        if not lossy:
            colours = np.unique(mask.reshape(-1, 3), axis=0)
            colours = colours[colours.any(axis=1)]
            if len(colours) > 1:
                raise ImageReadError(path, f"colour mask with {len(colours)} colours: save one label value per "
                                     "structure in a grey-scale or palette PNG (0 = background)")
            mask = np.where(mask.any(axis=-1), 255, 0)  # one colour on black: one structure
        else:
            mask = mask.max(axis=-1)
    mask = np.rint(mask).astype(np.int64)
    values = np.unique(mask)
    if lossy:
        grey = np.count_nonzero((mask >= 64) & (mask < 192)) / mask.size
        if grey > 0.02:
            raise ImageReadError(path, f"{grey:.0%} of its pixels are grey, neither near black nor near white: a "
                                 "JPEG mask must be black and white (several labels need a lossless PNG)")
        mask = (mask >= 128).astype(np.int64)
    elif len(values) > MAX_MASK_LABELS + 1:
        raise ImageReadError(path, f"{len(values)} distinct values: a grey-scale image rather than a label mask "
                             "(0 = background, one value per structure)?")
    elif set(values.tolist()) <= {0, 255}:
        mask = (mask > 0).astype(np.int64)
    if not mask.any():
        raise ImageReadError(path, "the reference mask is empty")
    return mask


def segment_images(reference_image: Path, reference_mask: Path, targets: Sequence[Path], output_dir: Path,
                   model: ModelOptions, *, force: bool = False, progress: ProgressCallback | None = None,
                   warn: Warn | None = None, done: Callable[[Path], None] | None = None) -> list[Path]:
    """``insid3-med segment``: one mask PNG per target (``<stem>_mask.png``, the target's size; 0/255 for one
    structure, the label values for several); returns the masks written.

    Every target path and mask path is checked before any work (missing targets, folders, masks that exist
    without ``force`` or collide); each target is then read when its turn comes and its mask put in place as soon
    as it is written (``done`` receives its path). A target that cannot be read is skipped with a warning and the
    others go on; the run then ends with an :class:`ImageReadError` naming the skipped ones.
    """
    reference = read_image_2d(reference_image)
    mask = read_mask_2d(reference_mask, reference)
    if not output_dir.is_dir():
        raise ImageReadError(output_dir, "output folder does not exist")
    for path in targets:
        if not path.is_file():
            raise ImageNotFoundError(path, "no such file" if not path.exists() else "a folder, not a 2D image file")
    outputs = [output_dir / f"{Path(p).stem}_mask.png" for p in targets]
    check_distinct_names(output_dir, targets, [output.name for output in outputs])
    inputs = RunInputs([reference_image, reference_mask, *targets])
    plans = []
    for path, output in zip(targets, outputs, strict=True):
        outputs_set = OutputSet(force, inputs)
        plans.append((path, output, outputs_set, outputs_set.claim(output)))
    segmenter = model.build()
    segmenter.set_reference(intensity_mapping(reference)(reference.array[0]), mask)
    binary = segmenter.label_values == [1]
    written: list[Path] = []
    skipped = SkippedTargets(warn)
    for index, (path, output, outputs_set, temporary) in enumerate(plans, start=1):
        try:
            image = read_image_2d(path)
        except ImageReadError as error:
            skipped.add(error)
            continue
        with outputs_set:
            prediction = segmenter.segment(intensity_mapping(image)(image.array[0]))
            out = (prediction > 0).astype(np.uint8) * 255 if binary else prediction
            mode = "L" if out.max() < 256 else "I;16"
            Image.fromarray(out.astype(np.uint8 if mode == "L" else np.uint16), mode=mode).save(temporary,
                                                                                              format="PNG")
        written.append(output)
        if done is not None:
            done(output)
        if progress is not None:
            progress(index, len(plans))
    skipped.raise_if_any(output_dir, len(targets), len(written), "mask")
    return written
