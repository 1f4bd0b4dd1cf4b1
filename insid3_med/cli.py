"""The ``insid3-med`` command line: a thin face over :mod:`insid3_med.jobs` and the evaluation harness.

Exit codes: 0 success; 2 bad input (the message names the file and the problem); 3 backbone weights missing or
unreadable (the message says how to get DINOv3 weights); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM, as a
batch scheduler or the Slicer extension's Cancel sends it). Interrupted or terminated, a run deletes the temporary
files of its unfinished outputs; the outputs it had completed stay.

The command sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it) before torch loads: with OpenMP's
spinning default, the many small parallel regions of an episode ran 30 to 50 times slower whenever the CPU was
shared with other work (reports/performance/README.md); on an idle machine the difference is within noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from insid3_med import __version__

EXIT_BAD_INPUT = 2
EXIT_WEIGHTS = 3


class CommandError(Exception):
    """A user-facing error with its exit code."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def parse_slices(text: str) -> tuple[int, int]:
    """"A:B" -> (A, B), a half-open range of slice indices (either side may be empty)."""
    try:
        start, stop = text.split(":")
        return (int(start) if start else 0, int(stop) if stop else sys.maxsize)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--slices expects A:B (for example 10:40), not {text!r}") from error


def whole_number(low: int, high: int | None = None, unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` (to ``high``), ``unit`` named in the message."""
    bounds = f"{low} or more" if high is None else f"{low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expects a whole number ({bounds}{unit}), not {text!r}") from error
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expects {bounds}{unit}, not {value}")
        return value

    return parse


positive_int = whole_number(1)
"""A count of at least 1 (episodes, shots, threads)."""
frame_index = whole_number(0, unit=" (a 0-based frame number)")
IMAGE_SIZE_LIMITS = (64, 4096)
"""The model input side the command accepts, in pixels: at least 4 patches across, at most what fits in memory."""
image_side = whole_number(*IMAGE_SIZE_LIMITS, unit=" pixels")


def add_model_options(parser: argparse.ArgumentParser, image_size: int = 448, precision: str = "fp32") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--weights", help="DINOv3 .pth file, Hugging Face model folder or hub id "
                       "(default: $INSID3_MED_WEIGHTS, then the Hugging Face cache)")
    group.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=precision,
                       help=f"backbone precision (default {precision}; auto: bf16 for the volume mode on a CPU with "
                       "native bf16 that measures at least 1.2x faster than fp32 at start-up; fp32 otherwise)")
    group.add_argument("--image-size", type=image_side, default=image_size,
                       help=f"model input side in pixels, {IMAGE_SIZE_LIMITS[0]} to {IMAGE_SIZE_LIMITS[1]}, rounded to "
                       f"whole patches (default {image_size})")
    group.add_argument("--feature-block", type=int, help="backbone block whose features are used (default: per "
                       "backbone)")
    group.add_argument("--fit", choices=("stretch", "letterbox"), default="stretch",
                       help="resize to a square ignoring the aspect (published) or keep it and pad")
    group.add_argument("--tau", type=float, default=0.6, help="clustering granularity (default 0.6)")
    group.add_argument("--merge-threshold", type=float, default=0.2, help="cluster merge threshold (default 0.2)")
    group.add_argument("--basis-rank", type=int, help="positional directions removed (default: per backbone)")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    parser.add_argument("--progress", choices=("bar", "lines", "none"), default="bar",
                        help="progress as a bar on stderr, as 'PROGRESS done total' lines on stdout, or none")


def add_mode_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("volume", "published"), default="volume",
                        help="volume: chain the labels slice to slice around the structure (default); published: "
                        "segment every slice on its own, as the INSID3 paper does")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a volume-mode setting (repeatable), e.g. --set gate_sigma=0.05 --set "
                        "stop_confidence=none; keys: the fields of insid3_med.propagation.PropagationParams")


def propagation_params(args: argparse.Namespace):  # noqa: ANN201 - imported lazily to keep --help fast
    """The volume mode's settings from ``--set`` (None when none is given: the defaults)."""
    if not args.settings:
        return None
    from insid3_med.propagation import PropagationParams, with_overrides

    try:
        return with_overrides(PropagationParams(), args.settings)
    except ValueError as error:
        raise CommandError(f"--set: {error}") from None


def model_options(args: argparse.Namespace):  # noqa: ANN201 - imported lazily to keep --help fast
    from insid3_med.backbones import pick_device
    from insid3_med.engine import EngineParams
    from insid3_med.jobs import ModelOptions

    pick_device(args.device)  # a device that is not there fails before anything is read
    return ModelOptions(weights=args.weights, device=args.device, precision=args.precision,
                        image_size=args.image_size, feature_block=args.feature_block, fit=args.fit,
                        params=EngineParams(tau=args.tau, merge_threshold=args.merge_threshold,
                                            basis_rank=args.basis_rank))


def progress_reporter(mode: str, description: str) -> Callable[[int, int], None] | None:
    """A (done, total) callback printing a tqdm bar, machine-readable lines, or nothing."""
    if mode == "none":
        return None
    if mode == "lines":
        def report_line(done: int, total: int) -> None:
            print(f"PROGRESS {done} {total}", flush=True)
        return report_line
    from tqdm import tqdm

    state: dict[str, tqdm] = {}

    def report_bar(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=total, desc=description, unit="slice", file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return report_bar


# ---------------------------------------------------------------------------------------------------------------


def command_segment(args: argparse.Namespace) -> int:
    from insid3_med.jobs import segment_images

    segment_images(args.reference_image, args.reference_mask, args.targets, args.output, model_options(args),
                   force=args.force, progress=progress_reporter(args.progress, "segment"), warn=print_warning,
                   done=lambda path: print(path, flush=True))
    return 0


def volume_outputs(args: argparse.Namespace):  # noqa: ANN201
    from insid3_med.jobs import VolumeOutputs

    return VolumeOutputs(labels=args.output, seg_nrrd=args.seg_nrrd, dicom_seg=args.dicom_seg, overlay=args.overlay,
                         summary=args.summary)


def print_warning(message: str) -> None:
    """A warning for the user on stderr, in the form of argparse's errors."""
    print(f"insid3-med: warning: {message}", file=sys.stderr)


def show_package_warnings_plainly() -> None:
    """The package's own warnings (``warnings.warn`` in insid3_med, e.g. an irregular DICOM slice spacing) as
    ``insid3-med: warning: ...`` lines; other libraries' warnings keep Python's form. Installed once."""
    shown = warnings.showwarning
    if getattr(shown, "insid3_med", False):
        return

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if issubclass(category, UserWarning) and f"{os.sep}insid3_med{os.sep}" in filename:
            print_warning(str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    show.insid3_med = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def command_propagate(args: argparse.Namespace) -> int:
    from insid3_med.jobs import propagate_file
    from insid3_med.volume import ARRAY_AXIS_LETTERS

    summary = propagate_file(args.volume, args.labels, volume_outputs(args), model_options(args), axis=args.axis,
                             slice_range=args.slices, preset=args.preset, force=args.force,
                             series=args.series, frame=args.frame, mode=args.mode, params=propagation_params(args),
                             all_frames=args.all_frames, progress=progress_reporter(args.progress, "propagate"),
                             warn=print_warning)
    slices = ", ".join(str(k) for k in summary["labelled_slices"])
    timings = summary["timings_s"]
    frames = (f", then the other {summary['frames'] - 1} frame(s) from frame {summary['frame']}"
              if "frames" in summary else "")
    print(f"propagated from {summary['slice_plane']} slice(s) {slices} (array axis "
          f"{ARRAY_AXIS_LETTERS[summary['axis']]}){frames}; wrote {args.output} "
          f"({timings['propagate'] + timings.get('other_frames', 0.0):.1f} s)")
    return 0


def command_transfer(args: argparse.Namespace) -> int:
    from insid3_med.jobs import transfer_files

    summaries = transfer_files(args.reference_volume, args.reference_labels, args.targets, args.output,
                               model_options(args), axis=args.axis, preset=args.preset, force=args.force,
                               seg_nrrd=args.seg_nrrd, dicom_seg=args.dicom_seg, overlay=args.overlay,
                               summary=args.summary, mode=args.mode, params=propagation_params(args),
                               frame=args.frame, progress=progress_reporter(args.progress, "transfer"),
                               warn=print_warning,
                               done=print_transfer_done)
    print(f"{len(summaries)} target(s) done")
    return 0


def print_transfer_done(record: dict[str, Any]) -> None:
    """One line per target as soon as its outputs are in place."""
    print(f"{record['target']}: done in {record['timings_s']['transfer']:.1f} s", flush=True)


def command_info(args: argparse.Namespace) -> int:
    from insid3_med.imaging.readers import describe

    print(json.dumps(describe(args.path), indent=2, default=str))
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    from insid3_med.evaluation.run import run_evaluation

    summary = run_evaluation(args.task, args.data_dir, args.output, method=args.method, episodes=args.episodes,
                             seed=args.seed, model=model_options(args), limit_cases=args.limit_cases,
                             resume=not args.restart, overwrite=args.force, progress=args.progress != "none",
                             kinds=tuple(args.kinds.split(",")), reference_mode=args.reference_mode,
                             pairing=args.pairing,
                             shots=args.shots, threads=args.threads, mode=args.mode,
                             propagation=propagation_params(args),
                             command=" ".join(["insid3-med", *sys.argv[1:]]))
    print(json.dumps(summary.get("headline", summary), indent=2, default=str)[:4000])
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from insid3_med.demo import run_demo

    run_demo(args.output, model_options(args), force=args.force, progress=progress_reporter(args.progress, "demo"))
    return 0


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="insid3-med", description="One-shot segmentation of medical images and "
                                     "volumes with frozen DINOv3 features (INSID3).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="2D: segment targets from one labelled reference image")
    segment.add_argument("reference_image", type=Path)
    segment.add_argument("reference_mask", type=Path)
    segment.add_argument("targets", type=Path, nargs="+")
    segment.add_argument("-o", "--output", type=Path, required=True, help="output folder (must exist)")
    add_model_options(segment)
    segment.set_defaults(handler=command_segment)

    def add_volume_options(sub: argparse.ArgumentParser, flags_only: bool) -> None:
        if flags_only:
            sub.add_argument("--seg-nrrd", action="store_true", help="also write <stem>_seg.seg.nrrd (3D Slicer)")
            sub.add_argument("--dicom-seg", action="store_true", help="also write <stem>_seg.dcm (DICOM SEG)")
            sub.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
            sub.add_argument("--summary", action="store_true", help="also write <stem>_summary.json")
        else:
            sub.add_argument("--seg-nrrd", type=Path, help="also write a 3D Slicer .seg.nrrd")
            sub.add_argument("--dicom-seg", type=Path, help="also write a DICOM SEG (DICOM input only)")
            sub.add_argument("--overlay", type=Path, help="also write a PNG overlay montage")
            sub.add_argument("--summary", type=Path, help="also write a JSON summary")
        add_mode_option(sub)
        sub.add_argument("--axis", default="auto", help="slice axis: auto (default: the axis the labelled slices were "
                         "drawn across; for a whole 3D segmentation the acquisition's slice axis), k/j/i (array), "
                         "axial/coronal/sagittal")
        sub.add_argument("--preset", help="intensity preset (default: from the modality): soft_tissue, abdomen, "
                         "lung, bone, brain, dicom, mr, radiograph, rgb")
        sub.add_argument("--frame", type=frame_index, help="the frame of a 4D NIfTI, NRRD or MetaImage file to read "
                         "(0-based: a phase of a cine, a contrast of a multi-modal study)" +
                         ("; the same frame of every study" if flags_only else ""))
        add_model_options(sub, precision="auto")

    propagate = commands.add_parser("propagate", help="propagate labelled slices through a volume")
    propagate.add_argument("volume", type=Path, help="NIfTI, NRRD, MHA file, DICOM series folder or one file of a "
                           "DICOM series (the whole series is read)")
    propagate.add_argument("labels", type=Path, help="label volume on the same grid with one or more labelled slices")
    propagate.add_argument("-o", "--output", type=Path, required=True, help="output label map (.nii.gz)")
    propagate.add_argument("--slices", type=parse_slices, help="only slices A:B (half-open)")
    propagate.add_argument("--all-frames", action="store_true", help="with --frame N (the frame the labels were "
                           "drawn on): also segment every other frame of the 4D file from them, as transfer "
                           "segments another study; the output is a 4D label map")
    propagate.add_argument("--series", "--series-uid", dest="series", help="the series to read when the DICOM folder "
                           "holds several: its series number or SeriesInstanceUID")
    add_volume_options(propagate, flags_only=False)
    propagate.set_defaults(handler=command_propagate)

    transfer = commands.add_parser("transfer", help="segment other studies from a labelled reference study")
    transfer.add_argument("reference_volume", type=Path)
    transfer.add_argument("reference_labels", type=Path)
    transfer.add_argument("targets", type=Path, nargs="+", help="studies to segment: volume files, DICOM series "
                          "folders or one file of each DICOM series")
    transfer.add_argument("-o", "--output", type=Path, required=True, help="output folder (must exist)")
    add_volume_options(transfer, flags_only=True)
    transfer.set_defaults(handler=command_transfer)

    info = commands.add_parser("info", help="what a file or folder holds (series, geometry, intensities)")
    info.add_argument("path", type=Path)
    info.set_defaults(handler=command_info)

    evaluate = commands.add_parser("evaluate", help="evaluate on a labelled data set, beside baselines")
    evaluate.add_argument("task", choices=("images", "slices", "transfer"))
    evaluate.add_argument("data_dir", type=Path)
    evaluate.add_argument("-o", "--output", type=Path, required=True, help="report folder")
    evaluate.add_argument("--method", default="ours",
                          help="ours, copy, registration or interpolation (between labelled slices)")
    evaluate.add_argument("--episodes", type=positive_int, help="images: episodes (default 600); slices: volumes, a "
                          "seeded subset (default all); transfer: seeded pairs (default 50)")
    evaluate.add_argument("--kinds", default="largest,random", help="slices task: which slice is labelled "
                          "(largest, random: one structure per episode; each_largest: every structure at once, "
                          "each on its own largest slice; union_largest: every structure on the one slice of "
                          "largest union; spaced2 to spaced9: one structure labelled on N slices spread evenly over "
                          "its extent; comma-separated)")
    evaluate.add_argument("--reference-mode", choices=("volume", "slice", "each_largest"), default="volume",
                          help="transfer task: the whole labelled volume, its one slice of largest labelled area, "
                          "or each structure on its own slice of largest area (each_largest) as reference")
    evaluate.add_argument("--pairing", choices=("subjects", "frames"), default="subjects",
                          help="transfer task: reference and target of different subjects (default), or two time "
                          "frames of one subject (ACDC: end-diastole to end-systole and back)")
    evaluate.add_argument("--shots", type=positive_int, default=1, help="labelled slices per episode (default 1)")
    evaluate.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--limit-cases", type=positive_int, help="only the first N volumes (slices task)")
    evaluate.add_argument("--restart", action="store_true", help="ignore finished episodes of an earlier run")
    add_mode_option(evaluate)
    add_model_options(evaluate)
    evaluate.set_defaults(handler=command_evaluate)

    demo = commands.add_parser("demo", help="label one slice of a bundled brain MRI, propagate it, report Dice")
    demo.add_argument("-o", "--output", type=Path, required=True, help="output folder (created)")
    add_model_options(demo, precision="auto")
    demo.set_defaults(handler=command_demo)
    return parser


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a program whose output pipe closed


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so that every ``with`` block unwinds (temporaries deleted)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


REDELIVERY_DELAY_S = 0.05  # a SIGTERM lost in a finaliser is sent again after this long


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (a no-op elsewhere).

    Python swallows an exception raised in a finaliser (a ``__del__`` run by the garbage collector), so a SIGTERM
    that arrives while one runs would be lost and the run would go on to the end: the hook of such swallowed
    exceptions has SIGTERM sent again a moment later, from another thread, to be raised once the finaliser is done;
    if the block ends first, :class:`Terminated` is raised as it ends.
    """
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: no handler can be set there
        yield
        return
    previous_hook = sys.unraisablehook
    resend: list[threading.Timer] = []

    def redeliver(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Terminated):  # sent now, it would be raised (and lost) here again
            resend.append(threading.Timer(REDELIVERY_DELAY_S, os.kill, (os.getpid(), signal.SIGTERM)))
            resend[-1].start()
        else:
            previous_hook(unraisable)

    sys.unraisablehook = redeliver
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        lost = [timer for timer in resend if not timer.finished.is_set()]  # not sent again yet
        for timer in lost:
            timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    if lost:
        raise Terminated  # the block ended before a lost SIGTERM could be raised in it


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``insid3-med``; returns the exit code."""
    if "torch" not in sys.modules:  # read once, when torch's OpenMP runtime loads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    show_package_warnings_plainly()
    try:
        with terminate_on_sigterm():
            code = run_command(args)
            sys.stdout.flush()  # a reader that stopped early (`insid3-med info x | head`) shows here, not at exit
        return code
    except Terminated:  # sent while the command was ending: what it wrote is complete
        print("insid3-med: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # stop quietly, as cat does: nothing more can be said to that reader
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail
        return EXIT_BROKEN_PIPE


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; errors become a message on stderr and the exit code."""
    from insid3_med.backbones import WeightsFormatError, WeightsNotFoundError

    try:
        return int(args.handler(args))
    except (WeightsNotFoundError, WeightsFormatError) as error:
        print(f"insid3-med: error: {error}", file=sys.stderr)
        return EXIT_WEIGHTS
    except CommandError as error:
        print(f"insid3-med: error: {error}", file=sys.stderr)
        return error.code
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        print(f"insid3-med: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("insid3-med: interrupted; nothing partial was kept", file=sys.stderr)
        return 130
    except Terminated:
        print("insid3-med: terminated; nothing partial was kept", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
