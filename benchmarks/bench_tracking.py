"""What the tracked gate costs: volume-mode propagation with and without it, paired in one run.

    python benchmarks/bench_tracking.py [--repeats 4] [--precision bf16] [--threads 2] [--json PATH]

On one ACDC, one hippocampus and one BraTS volume of ``../shared/data`` (the slice of largest labelled area given,
every structure), each repeat runs three settings one after the other: the default (the gate follows the labelled
slice carried by demons registration of crops binned to about ``registration_size`` px), the same with the crops
registered at their full side (``registration_size=None``), and the gate on the previous slice's prediction
(``gate_tracking=False``, no registration). Printed: the median propagation time of each (the first repeat is left
out as a warm-up), its ratio to the untracked chain, the crop side and how many slices each labels. Alternating the
settings inside each repeat keeps the ratios fair on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import common
import numpy as np
import torch

from insid3_med.imaging.readers import read_label_volume, read_volume
from insid3_med.predictor import OneShotSegmenter
from insid3_med.propagation import PropagationParams, registration_shrink
from insid3_med.volume import propagate_through_slices


@dataclass(frozen=True)
class Case:
    name: str
    image: str  # relative to ../shared/data
    labels: str
    axis: int  # the slice axis of the (K, J, I) array
    merge_labels: bool = False  # BraTS: every tumour label as one whole-tumour structure


CASES = (
    Case("ACDC patient001_frame01", "acdc/images/patient001_frame01.nii.gz",
         "acdc/labels/patient001_frame01.nii.gz", 0),
    Case("hippocampus_007", "hippocampus/images/hippocampus_007.nii.gz",
         "hippocampus/labels/hippocampus_007.nii.gz", 0),
    Case("BraTS pat0001 (whole tumour)", "brats/brats_2013_pat0001_1/Flair_subtrMeanDivStd.nii.gz",
         "brats/brats_2013_pat0001_1/OTMultiClass.nii.gz", 0, merge_labels=True),
)

SETTINGS = {
    "tracked, binned (default)": PropagationParams(),
    "tracked, full side": PropagationParams(registration_size=None),
    "previous-slice gate": PropagationParams(gate_tracking=False),
}


def largest_slice_only(labels: np.ndarray, axis: int) -> np.ndarray:
    """(K, J, I) labels -> the same with only the slice of largest labelled area along ``axis`` kept."""
    other = tuple(a for a in range(labels.ndim) if a != axis)
    index = int(np.argmax(np.count_nonzero(labels, axis=other)))
    given = np.zeros_like(labels)
    where = [slice(None)] * labels.ndim
    where[axis] = index
    given[tuple(where)] = labels[tuple(where)]
    return given


def crop_side(segmenter: OneShotSegmenter, volume: object, given: np.ndarray, axis: int) -> int:
    """The side in pixels of the crops the chain registers (spied from the chain itself)."""
    import insid3_med.propagation as propagation

    sides: list[int] = []
    chain = propagation._propagate_chain

    def spy(anchors, *args, **kwargs):  # type: ignore[no-untyped-def]
        sides.append(next(iter(anchors.values())).shape[0])
        return chain(anchors, *args, **kwargs)

    propagation._propagate_chain = spy
    try:
        propagate_through_slices(segmenter, volume, given, axis=axis)  # type: ignore[arg-type]
    finally:
        propagation._propagate_chain = chain
    return sides[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="runs of each setting per case (the first is a warm-up)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    data = common.SHARED / "data"
    missing = [case.image for case in CASES if not (data / case.image).is_file()]
    if missing:
        print(f"skipped: {data} lacks {', '.join(missing)}")
        return 0
    torch.set_num_threads(args.threads)
    segmenter = OneShotSegmenter(common.load_model("standin", args.precision))
    facts = common.machine()
    print(f"# tracked gate cost, stand-in, {args.precision}, {args.threads} threads; {common.describe_machine(facts)}")
    rows = []
    for case in CASES:
        volume = read_volume(data / case.image)
        labels = read_label_volume(data / case.labels, volume).astype(np.int64)
        if case.merge_labels:
            labels = (labels > 0).astype(np.int64)
        given = largest_slice_only(labels, case.axis)
        side = crop_side(segmenter, volume, given, case.axis)
        times: dict[str, list[float]] = {name: [] for name in SETTINGS}
        reached: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, params in SETTINGS.items():
                start = time.perf_counter()
                out = propagate_through_slices(segmenter, volume, given, axis=case.axis, params=params)
                times[name].append(time.perf_counter() - start)
                other = tuple(a for a in range(3) if a != case.axis)
                reached[name] = int(np.count_nonzero(np.any(out != 0, axis=other)))
        median = {name: statistics.median(values[1:] or values) for name, values in times.items()}
        base = median["previous-slice gate"]
        shrink = registration_shrink(side, PropagationParams().registration_size)
        print(f"{case.name} {volume.shape}, crops {side} px (binned by {shrink}): "
              + "; ".join(f"{name} {median[name]:.2f} s ({median[name] / base:.2f}x, {reached[name]} slices)"
                          for name in SETTINGS), flush=True)
        rows.append({"case": case.name, "shape": list(volume.shape), "crop_side": side, "shrink": shrink,
                     "seconds": median, "slices_labelled": reached})
    if args.json:
        common.write_json(args.json, {"machine": facts, "precision": args.precision, "threads": args.threads,
                                      "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
