"""``insid3-med demo``: one labelled slice of a real brain MRI, propagated through the volume, scored in 3D.

The volume arrives with the install: the ICBM 2009a symmetric MNI152 template that the ``nilearn`` package ships
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``: a skull-stripped T1-weighted
brain MRI and its grey- and white-matter probability maps, 197 x 233 x 189 voxels of 1 mm). What the demo does:

1. Reference labels, from the template's own tissue maps: the lateral ventricles, the largest connected region whose
   CSF probability ``1 - p(grey) - p(white)`` exceeds 0.5 and that is enclosed by brain tissue (it does not reach
   the outer 3 mm of the brain, where the CSF around the brain lies).
2. The volume used: the T1 cropped to the brain's bounding box (plus 4 voxels in-plane), keeping every second axial
   slice (2 mm slices, as in a routine clinical MRI; the reference labels are taken on the same slices).
3. The "clinician's label": the reference labels of one axial slice, the middle one of the ventricles' extent.
4. Propagation with :func:`insid3_med.volume.propagate_through_slices` over the ventricles' axial extent plus
   ``margin`` slices on each side (the range a user would give with ``--slices``; the label should stay empty there).
5. Outputs (all or nothing): the volume, the reference labels, the one-slice input label, the propagated label map
   (NIfTI and 3D Slicer .seg.nrrd), a PNG montage of labelled and propagated slices, a PNG comparison with the
   reference, and a report (JSON and text) with the 3D Dice against the reference labels and the time taken.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from insid3_med.backbones import DINOV3_HELP, WeightsNotFoundError, resolve_weights
from insid3_med.imaging.geometry import Geometry, Volume, float_triple
from insid3_med.imaging.overlay import write_overlay_montage
from insid3_med.imaging.readers import read_volume
from insid3_med.imaging.writers import write_nifti_labels, write_seg_nrrd
from insid3_med.jobs import ModelOptions, model_description
from insid3_med.outputs import machine_description, output_set, write_json
from insid3_med.volume import ProgressCallback, propagate_through_slices

DEMO_MODE = "volume"

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
STRUCTURE = "lateral ventricles"
UNGATED_HUB_ID = "facebook/dinov2-small"
HUB_HOST = "huggingface.co"

#: Files the demo writes into its output folder, all or none.
OUTPUT_FILES = (
    "image.nii.gz",
    "reference_labels.nii.gz",
    "clinician_label.nii.gz",
    "propagated.nii.gz",
    "propagated.seg.nrrd",
    "overlay.png",
    "comparison.png",
    "report.json",
    "report.txt",
)


class DemoDataError(FileNotFoundError):
    """The template files the demo needs (shipped by nilearn) are missing or not what was expected."""


@dataclass
class DemoCase:
    """The demo's volume and its reference labels on the same (K, J, I) grid, K axial.

    volume: the cropped T1 (uint8); reference: (K, J, I) uint8, 1 = the structure; clinician_slice: the labelled
    axial slice; crop: the kept (start, stop, step) of the template along k, j, i.
    """

    volume: Volume
    reference: np.ndarray
    clinician_slice: int
    crop: dict[str, list[int]]
    sources: dict[str, str] = field(default_factory=dict)

    def clinician_label(self) -> np.ndarray:
        """(K, J, I) uint8: the reference labels on the clinician's slice only."""
        labels = np.zeros_like(self.reference)
        labels[self.clinician_slice] = self.reference[self.clinician_slice]
        return labels

    def slice_range(self, margin: int) -> tuple[int, int]:
        """Half-open axial range to propagate over: the structure's extent plus ``margin`` slices each side."""
        extent = np.flatnonzero(self.reference.any(axis=(1, 2)))
        return max(0, int(extent[0]) - margin), min(self.volume.shape[0], int(extent[-1]) + 1 + margin)


# ---------------------------------------------------------------------------------------------------------------
# The volume and its reference labels
# ---------------------------------------------------------------------------------------------------------------


def template_folder() -> Path:
    """nilearn's bundled data folder (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise DemoDataError("the demo's brain MRI comes with the nilearn package, which is not installed "
                            "(pip install nilearn)")
    return Path(spec.origin).parent / "datasets" / "data"


def lateral_ventricles(brain: np.ndarray, grey: np.ndarray, white: np.ndarray, shell_mm: int = 3) -> np.ndarray:
    """(K, J, I) bool: the largest CSF region enclosed by brain tissue.

    brain: (K, J, I) bool brain mask (1 mm voxels); grey, white: tissue probabilities in [0, 1]. CSF is where
    ``1 - grey - white > 0.5`` inside the brain; regions reaching the outer ``shell_mm`` of the brain are the CSF
    around it and are skipped.
    """
    csf = brain & (grey + white < 0.5)
    shell = brain & ~ndimage.binary_erosion(brain, iterations=shell_mm)
    regions, count = ndimage.label(csf)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    outer = set(np.unique(regions[shell]).tolist())
    enclosed = [(int(sizes[n]), n) for n in range(1, count + 1) if n not in outer]
    if not enclosed:
        raise DemoDataError("no CSF region enclosed by brain tissue was found in the template")
    return regions == max(enclosed)[1]


def crop_volume(volume: Volume, box: tuple[slice, slice, slice], metadata: dict[str, Any]) -> Volume:
    """The sub-volume ``volume.array[box]`` (slices with steps allowed) with its geometry placed accordingly."""
    starts = [s.start or 0 for s in box]  # k, j, i
    steps = [s.step or 1 for s in box]
    affine = volume.geometry.ijk_to_lps()
    origin = affine @ np.array([starts[2], starts[1], starts[0], 1.0])
    spacing = float_triple(volume.geometry.spacing[n] * steps[2 - n] for n in range(3))
    geometry = Geometry(spacing=spacing, origin=float_triple(origin[:3]),
                        direction=volume.geometry.direction)
    return Volume(np.ascontiguousarray(volume.array[box]), geometry, modality="MR", source=volume.source,
                  metadata=metadata)


def load_demo_case(slice_step: int = 2, border: int = 4) -> DemoCase:
    """The template T1 and its lateral ventricles, cropped to the brain, every ``slice_step``-th axial slice."""
    folder = template_folder()
    paths = {key: folder / name for key, name in TEMPLATE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DemoDataError(f"the demo's template files are missing from the nilearn install: {', '.join(missing)}")
    t1 = read_volume(paths["t1"])
    grey = read_volume(paths["gm"]).array.astype(np.float32) / 255.0
    white = read_volume(paths["wm"]).array.astype(np.float32) / 255.0
    if grey.shape != t1.shape or white.shape != t1.shape:
        raise DemoDataError(f"{folder}: the template's tissue maps are not on the T1 grid")
    brain = ndimage.binary_fill_holes(t1.array > 0)
    ventricles = lateral_ventricles(brain, grey, white)
    voxel_ml = float(np.prod(t1.geometry.spacing)) / 1000.0
    if not 5.0 <= ventricles.sum() * voxel_ml <= 60.0:
        raise DemoDataError(f"{paths['t1']}: the ventricles found measure {ventricles.sum() * voxel_ml:.1f} mL, "
                            "not a plausible adult volume; the template files are not the expected ones")
    box = []
    for axis in range(3):
        present = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        pad = 0 if axis == 0 else border
        step = slice_step if axis == 0 else 1
        box.append(slice(max(0, int(present[0]) - pad), min(brain.shape[axis], int(present[-1]) + 1 + pad), step))
    region = (box[0], box[1], box[2])
    volume = crop_volume(t1, region, dict(t1.metadata))
    reference = np.ascontiguousarray(ventricles[region].astype(np.uint8))
    extent = np.flatnonzero(reference.any(axis=(1, 2)))
    return DemoCase(
        volume=volume,
        reference=reference,
        clinician_slice=int(extent[(len(extent) - 1) // 2]),
        crop={"kji"[n]: [s.start, s.stop, s.step or 1] for n, s in enumerate(region)},
        sources={key: str(path) for key, path in paths.items()},
    )


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice overlap of two binary masks (any shape); 1.0 when both are empty."""
    a, b = np.asarray(prediction) > 0, np.asarray(reference) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def slice_scores(prediction: np.ndarray, reference: np.ndarray, slices: range, skip: int) -> list[dict[str, Any]]:
    """Per axial slice in ``slices`` except ``skip``: Dice and voxel counts (Dice None where both are empty)."""
    scores = []
    for k in slices:
        if k == skip:
            continue
        ref, pred = int((reference[k] > 0).sum()), int((prediction[k] > 0).sum())
        scores.append({"k": k, "dice": None if ref + pred == 0 else round(dice(prediction[k], reference[k]), 4),
                       "reference_voxels": ref, "propagated_voxels": pred})
    return scores


def copy_baseline(case: DemoCase, first: int, stop: int) -> np.ndarray:
    """(K, J, I) uint8: the clinician's slice copied unchanged to every slice of [first, stop)."""
    copied = np.zeros_like(case.reference)
    copied[first:stop] = case.reference[case.clinician_slice]
    return copied


def summarise(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "min": None, "median": None, "mean": None, "max": None}
    array = np.asarray(values, dtype=float)
    return {"count": int(array.size), "min": round(float(array.min()), 4), "median": round(float(np.median(array)), 4),
            "mean": round(float(array.mean()), 4), "max": round(float(array.max()), 4)}


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------


def hub_reachable(timeout_s: float = 3.0, host: str = HUB_HOST) -> bool:
    """True when ``host`` resolves and accepts a TCP connection on port 443 within ``timeout_s`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def demo_model_options(model: ModelOptions, *, interactive: bool | None = None,
                       online: Callable[[], bool] | None = None, ask: Callable[[str], str] = input) -> ModelOptions:
    """``model`` when weights are found (--weights, $INSID3_MED_WEIGHTS, Hugging Face cache); else, when the hub
    answers (``online``, default :func:`hub_reachable`) and the session is ``interactive`` (default: stdin is a
    terminal), offer the ungated DINOv2.

    Raises :class:`WeightsNotFoundError` saying what was looked for, how to get DINOv3 weights and, when the hub
    answers, to pass ``--weights facebook/dinov2-small``.
    """
    try:
        resolve_weights(model.weights)
        return model
    except WeightsNotFoundError as error:
        looked_for = str(error)
    if not (online or hub_reachable)():
        raise WeightsNotFoundError(f"{looked_for} The Hugging Face hub ({HUB_HOST}) cannot be reached from this "
                                   "machine, so the ungated DINOv2 cannot be downloaded either; the demo wrote "
                                   "nothing.")
    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    offer = (f"The Hugging Face hub answers: the demo can download and use the ungated DINOv2 ({UNGATED_HUB_ID}, "
             "about 90 MB) instead of DINOv3.")
    if not interactive:
        raise WeightsNotFoundError(f"{looked_for} {offer} To do so, run the demo again with --weights "
                                   f"{UNGATED_HUB_ID}.")
    print(f"{looked_for}\n\n{offer}", file=sys.stderr)
    answer = ask(f"Use {UNGATED_HUB_ID}? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise WeightsNotFoundError(f"No backbone weights: {DINOV3_HELP}")
    return replace(model, weights=UNGATED_HUB_ID)


# ---------------------------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------------------------


def write_image_nifti(volume: Volume, path: Path) -> None:
    """The volume's grey values as NIfTI at ``path`` (a temporary path from an OutputSet), geometry as read."""
    import nibabel as nib

    affine = volume.geometry.ijk_to_ras()
    image = nib.Nifti1Image(np.ascontiguousarray(volume.array.transpose(2, 1, 0)), affine)
    qform = int(volume.metadata.get("nifti_qform_code", 0) or 0)
    sform = int(volume.metadata.get("nifti_sform_code", 0) or 0)
    image.set_qform(affine, code=qform if qform or sform else 1)
    image.set_sform(affine, code=sform if qform or sform else 1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)


def montage_slices(first: int, stop: int, clinician_slice: int, tiles: int = 16) -> list[int]:
    """Up to ``tiles`` axial slices evenly spread over [first, stop), always with the clinician's slice."""
    chosen = {int(round(k)) for k in np.linspace(first, stop - 1, min(tiles - 1, stop - first))}
    return sorted(chosen | {clinician_slice})


def format_report(report: dict[str, Any]) -> str:
    """The few lines the demo prints."""
    scores, model = report["scores"], report["model"]
    per_slice = scores["per_slice_dice"]
    lines = [
        f"insid3-med demo: {report['structure']} in the MNI152 (ICBM 2009a) T1 template shipped by nilearn",
        f"  volume {report['volume']['shape_kji']} (K, J, I), spacing (i, j, k) {report['volume']['spacing_mm']} mm; "
        f"clinician's label on axial slice k={report['clinician_slice']}; propagated over slices "
        f"{report['slice_range'][0]}..{report['slice_range'][1] - 1}",
        f"  3D Dice vs the reference labels: {scores['dice_3d']:.3f} "
        f"({scores['dice_3d_propagated_slices']:.3f} without the labelled slice)",
        f"  (copying the labelled slice unchanged to every slice of that range: {scores['copy_baseline_dice_3d']:.3f})",
        f"  per-slice Dice over {per_slice['count']} propagated slices: median {per_slice['median']}, "
        f"min {per_slice['min']}, max {per_slice['max']}",
        f"  volume: reference {scores['reference_ml']} mL, propagated {scores['propagated_ml']} mL",
        f"  backbone {model['backbone']} (block {model['feature_block']}, {model['image_size']} px, "
        f"{model['device']}) from {model['weights']}",
        f"  time: {report['timings_s']['total']:.1f} s in all ({report['timings_s']['propagate']:.1f} s propagating "
        f"{report['propagated_slices']} slices)",
        f"  wrote {', '.join(report['outputs'])} in {report['output_dir']}",
        "  overlay.png: the propagated label (gold frame: the labelled slice); comparison.png: green = both agree, "
        "red = propagated only, blue = reference only",
    ]
    return "\n".join(lines)


def run_demo(output_dir: Path, model: ModelOptions, force: bool = False, progress: ProgressCallback | None = None,
             *, slice_step: int = 2, margin: int = 3, interactive: bool | None = None) -> dict[str, Any]:
    """Label one slice of the template's lateral ventricles, propagate it, write the outputs and print a report.

    output_dir: created if absent; existing demo outputs there are refused unless ``force``. Nothing is written when
    anything fails (weights missing: :class:`WeightsNotFoundError`). Returns the report (also ``report.json``).
    """
    started = time.perf_counter()
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"{output_dir}: exists and is not a folder")
    if not force:
        existing = [name for name in OUTPUT_FILES if (output_dir / name).exists()]
        if existing:
            raise FileExistsError(f"{output_dir}: holds demo outputs already ({', '.join(existing)}); use --force "
                                  "to overwrite them")
    model = demo_model_options(model, interactive=interactive)
    case = load_demo_case(slice_step=slice_step)
    segmenter = model.build(chained=DEMO_MODE == "volume")
    loaded = time.perf_counter()

    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with output_set(force) as outputs:
            claimed = {name: outputs.claim(output_dir / name) for name in OUTPUT_FILES}
            volume, reference = case.volume, case.reference
            first, stop = case.slice_range(margin)
            # The library's default volume mode: with the stand-in it measured a 3D Dice of 0.89 on these ventricles
            # (the published per-slice mode 0.55, copying the labelled slice 0.35).
            propagated = propagate_through_slices(segmenter, volume, case.clinician_label(), axis=0,
                                                  slice_range=(first, stop), progress=progress, mode=DEMO_MODE)
            propagated = propagated.astype(np.uint8)
            finished = time.perf_counter()

            voxel_ml = float(np.prod(volume.geometry.spacing)) / 1000.0
            others = np.ones(volume.shape[0], dtype=bool)
            others[case.clinician_slice] = False
            per_slice = slice_scores(propagated, reference, range(first, stop), case.clinician_slice)
            report: dict[str, Any] = {
                "command": "demo",
                "structure": STRUCTURE,
                "data": {
                    "template": "ICBM 2009a nonlinear symmetric MNI152 T1 (skull-stripped), shipped by nilearn",
                    "files": case.sources,
                    "reference_labels": "largest CSF region (1 - p(grey) - p(white) > 0.5) enclosed by brain "
                                        "tissue, from the template's tissue probability maps",
                    "crop_kji": case.crop,
                },
                "volume": {"shape_kji": list(volume.shape), "spacing_mm": list(volume.geometry.spacing),
                           "origin_lps_mm": list(volume.geometry.origin)},
                "clinician_slice": case.clinician_slice,
                "slice_range": [first, stop],
                "propagated_slices": stop - first - 1,
                "scores": {
                    "dice_3d": round(dice(propagated, reference), 4),
                    "dice_3d_propagated_slices": round(dice(propagated[others], reference[others]), 4),
                    "copy_baseline_dice_3d": round(dice(copy_baseline(case, first, stop), reference), 4),
                    "per_slice_dice": summarise([s["dice"] for s in per_slice if s["dice"] is not None]),
                    "reference_ml": round(float(reference.sum()) * voxel_ml, 3),
                    "propagated_ml": round(float(propagated.sum()) * voxel_ml, 3),
                    "slices": per_slice,
                },
                "model": model_description(segmenter),
                "machine": machine_description(),
                "output_dir": str(output_dir),
                "outputs": list(OUTPUT_FILES),
            }

            names = {1: STRUCTURE}
            write_image_nifti(volume, claimed["image.nii.gz"])
            write_nifti_labels(reference, volume, claimed["reference_labels.nii.gz"], overwrite=True)
            write_nifti_labels(case.clinician_label(), volume, claimed["clinician_label.nii.gz"], overwrite=True)
            write_nifti_labels(propagated, volume, claimed["propagated.nii.gz"], overwrite=True)
            write_seg_nrrd(propagated, volume, claimed["propagated.seg.nrrd"], segment_names=names, overwrite=True)
            shown = montage_slices(first, stop, case.clinician_slice)
            write_overlay_montage(volume, propagated, claimed["overlay.png"], slices=shown,
                                  highlight=[case.clinician_slice], overwrite=True)
            pred, ref = propagated > 0, reference > 0
            agreement = np.where(pred & ref, 2, np.where(pred, 1, np.where(ref, 3, 0))).astype(np.uint8)
            write_overlay_montage(volume, agreement, claimed["comparison.png"], slices=shown,
                                  highlight=[case.clinician_slice], overwrite=True)
            report["timings_s"] = {"prepare_and_load": round(loaded - started, 3),
                                   "propagate": round(finished - loaded, 3),
                                   "total": round(time.perf_counter() - started, 3)}
            text = format_report(report)
            write_json(report, claimed["report.json"])
            claimed["report.txt"].write_text(text + "\n")
    except BaseException:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    print(text, flush=True)
    return json.loads(json.dumps(report, default=str))
