"""A STAND-IN for the ``insid3-med`` command line, for tests only: no model, no weights.

It speaks the same command line as ``python -m insid3_med propagate|transfer`` (the options the Slicer module
passes), prints ``PROGRESS <done> <total>`` lines, and writes label maps on the right grids, but its
"segmentation" is a copy of the nearest labelled slice. Tests of the job runner and of the Slicer module use it
to exercise everything around the model (export, subprocess, progress, cancel, error codes, import of results)
without the real tool. Needs only numpy and SimpleITK (both in Slicer).

Environment knobs: ``STAND_IN_MODE`` = ``ok`` (default), ``fail`` (exit 1), ``bad-input`` (exit 2),
``no-weights`` (exit 3), ``terminated`` (exit 143), ``hang`` (sleeps forever after the first progress line; with ``STAND_IN_GRANDCHILD_PID``
set to a file path it first starts a sleeping grandchild and writes its pid there; with
``STAND_IN_IGNORE_TERM=1`` it ignores SIGTERM); ``STAND_IN_DELAY`` = seconds per slice; ``STAND_IN_ARGS_FILE`` =
a path where the received arguments are written as JSON.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

AXES = {"k": 0, "j": 1, "i": 2}


def progress(done, total):
    print(f"PROGRESS {done} {total}", flush=True)


def parse_slices(text, count):
    if not text:
        return 0, count
    first, _, end = text.partition(":")
    return int(first or 0), int(end) if end else count


def stem(path):
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def nearest_fill(labels, axis, first, end, delay):
    """Copy the nearest labelled slice (within first..end-1) into each unlabelled slice of that range."""
    moved = np.moveaxis(labels, axis, 0).copy()
    labelled = [k for k in range(first, end) if moved[k].any()]
    todo = [k for k in range(first, end) if k not in labelled]
    progress(0, len(todo))
    for done, k in enumerate(todo, start=1):
        source = min(labelled, key=lambda s: (abs(s - k), s))
        moved[k] = moved[source]
        time.sleep(delay)
        progress(done, len(todo))
    return np.moveaxis(moved, 0, axis)


def write_like(array, like, path):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(np.uint8)))
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path), True)


def hang():
    progress(0, 10)
    pid_file = os.environ.get("STAND_IN_GRANDCHILD_PID")
    if pid_file:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(pid_file).write_text(str(child.pid))
    if os.environ.get("STAND_IN_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("stand-in is hanging", flush=True)
    while True:
        time.sleep(1)


def main(argv):
    parser = argparse.ArgumentParser(prog="stand_in_insid3_med")
    parser.add_argument("command", choices=["propagate", "transfer"])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--axis", default="k")
    parser.add_argument("--slices")
    parser.add_argument("--progress", default="bar")
    parser.add_argument("--weights")
    parser.add_argument("--device")
    parser.add_argument("--precision")
    parser.add_argument("--image-size")
    args = parser.parse_args(argv)
    if os.environ.get("STAND_IN_ARGS_FILE"):
        Path(os.environ["STAND_IN_ARGS_FILE"]).write_text(json.dumps(argv))
    mode = os.environ.get("STAND_IN_MODE", "ok")
    delay = float(os.environ.get("STAND_IN_DELAY", "0"))
    if mode == "fail":
        print("Traceback (most recent call last):\nRuntimeError: stand-in failure", file=sys.stderr, flush=True)
        return 1
    if mode == "bad-input":
        print(f"error: {args.inputs[1]}: label map is empty", file=sys.stderr, flush=True)
        return 2
    if mode == "no-weights":
        print("error: no DINOv3 weights found; see https://github.com/facebookresearch/dinov3", file=sys.stderr)
        return 3
    if mode == "terminated":  # as insid3-med ends when another program sends it SIGTERM
        print("insid3-med: terminated; nothing partial was kept", file=sys.stderr, flush=True)
        return 143
    if mode == "hang":
        hang()
    if args.axis == "auto":  # the reference's axis with the fewest labelled slices (the real tool's rule, simplified)
        labelled = sitk.GetArrayFromImage(sitk.ReadImage(args.inputs[1])) > 0
        axis = int(np.argmin([np.count_nonzero(labelled.any(axis=tuple(b for b in range(3) if b != a)))
                              for a in range(3)]))
    else:
        axis = AXES[args.axis]
    if args.command == "propagate":
        volume_path, labels_path = args.inputs[:2]
        image = sitk.ReadImage(labels_path)
        labels = sitk.GetArrayFromImage(image)
        first, end = parse_slices(args.slices, labels.shape[axis])
        result = nearest_fill(labels, axis, first, end, delay)
        write_like(result, image, args.output)
        return 0
    reference_labels = sitk.GetArrayFromImage(sitk.ReadImage(args.inputs[1]))
    moved = np.moveaxis(reference_labels, axis, 0)
    labelled = [k for k in range(moved.shape[0]) if moved[k].any()]
    for target in args.inputs[2:]:
        target_image = sitk.ReadImage(target)
        shape = sitk.GetArrayFromImage(target_image).shape
        out = np.zeros(shape, np.uint8)
        out_moved = np.moveaxis(out, axis, 0)
        progress(0, out_moved.shape[0])
        for k in range(out_moved.shape[0]):
            if labelled and out_moved[k].shape == moved[labelled[0]].shape:
                out_moved[k] = moved[labelled[0]]
            progress(k + 1, out_moved.shape[0])
        write_like(out, target_image, Path(args.output) / f"{stem(target)}_seg.nii.gz")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
