"""``run_evaluation``: one task, one data set, one method -> a report folder (the face of ``insid3-med evaluate``).

The report folder holds ``episodes.jsonl`` (finished episodes; a rerun with the same configuration skips them),
``results.json``, ``results.md`` and the PNG plots (see :mod:`insid3_med.evaluation.report`).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from insid3_med.evaluation.baselines import RegistrationParams, sitk_threads
from insid3_med.evaluation.datasets import ImageDataset, open_image_dataset, open_volume_dataset
from insid3_med.evaluation.episodes import SLICE_KINDS, seed_everything
from insid3_med.evaluation.methods import METHODS, build_method
from insid3_med.evaluation.report import (
    PLOT_FILES,
    RESULTS_JSON,
    ReportExistsError,
    machine_description,
    now_iso,
    write_reports,
)
from insid3_med.evaluation.store import EpisodeStore, code_fingerprint, config_hash
from insid3_med.evaluation.tasks import TASKS, ImageTask, SliceTask, TransferTask, headline

DEFAULT_IMAGE_EPISODES = 600
DEFAULT_IMAGE_SIZE = 448


def run_evaluation(
    task: str,
    data_dir: str | Path,
    report_dir: str | Path,
    *,
    method: str = "ours",
    episodes: int | None = None,
    seed: int = 0,
    backbone_options: dict[str, Any] | None = None,
    image_size: int | None = None,
    model: Any = None,
    resume: bool = True,
    progress: bool = True,
    limit_cases: int | None = None,
    overwrite: bool = False,
    layout: str | None = None,
    dataset_name: str | None = None,
    slice_axis_rule: str | None = None,
    kinds: Sequence[str] = SLICE_KINDS,
    reference_mode: str = "volume",
    pairing: str = "subjects",
    shots: int = 1,
    engine_params: dict[str, Any] | None = None,
    registration: RegistrationParams | None = None,
    preset: str | None = None,
    threads: int | None = None,
    command: str | None = None,
    mode: str = "volume",
    propagation: Any = None,
) -> dict[str, Any]:
    """Run (or resume) an evaluation and write its reports; returns the results document (results.json).

    task: ``images`` | ``slices`` | ``transfer``. episodes: images: episodes (default 600); slices: number of
    cases, a seeded subset (default all); transfer: number of seeded (reference, target) pairs (default 50).
    method: ``copy`` | ``registration`` | ``ours``; the segmenter of ``ours`` comes from ``model`` (e.g.
    :class:`insid3_med.jobs.ModelOptions`, anything whose ``build()`` returns a ``OneShotSegmenter``) or from
    ``backbone_options`` (``load_backbone`` keywords: weights, device, precision, feature_block), ``image_size``
    and ``engine_params``. image_size: also the side s of the ``images`` task (default: the segmenter's, else
    448). limit_cases: keep only the first N cases of the set (sorted
    by name) before sampling. resume: reuse finished episodes of the same configuration in ``report_dir``;
    a folder holding another configuration (or any episodes when ``resume`` is False) raises
    :class:`ReportExistsError` unless ``overwrite`` (the earlier reports are then replaced once the new ones are
    complete). threads: torch and SimpleITK threads (default: SimpleITK 1, torch unchanged). kinds (slices):
    ``largest``, ``random`` (one structure per episode), ``each_largest`` (every structure drawn at once, each
    on its own slice of largest area, scored per structure), ``union_largest`` (every structure drawn on the one
    slice of largest union) and/or ``spacedN`` (one structure on N evenly spread slices). reference_mode
    (transfer): ``volume``, ``slice`` or ``each_largest``. pairing (transfer): ``subjects`` (reference and target
    of different subjects) or ``frames`` (two time frames of one subject, e.g. ACDC's end-diastole and end-systole,
    both ways). shots (images): references per episode. mode (ours,
    volumes): propagation mode, ``volume`` or
    ``published``; propagation (ours, volume mode): its :class:`~insid3_med.propagation.PropagationParams`
    (default: the defaults; recorded in the report's configuration, so a run with other settings is another
    evaluation).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    from insid3_med.volume import propagation_description

    propagation_description(mode, propagation)  # a bad mode, or settings for the published mode, fail before any work
    data_dir, report_dir = Path(data_dir), Path(report_dir)
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    seed_everything(seed)

    if task == "images":
        dataset: Any = open_image_dataset(data_dir, layout, dataset_name)
    else:
        dataset = open_volume_dataset(data_dir, layout, dataset_name, slice_axis_rule)
    if limit_cases is not None:
        _limit_cases(dataset, limit_cases)

    evaluator = build_method(method, model=model, backbone_options=backbone_options, image_size=image_size,
                             engine_params=engine_params, registration=registration, preset=preset,
                             mode=mode, chained=task != "images" and mode == "volume", propagation=propagation)
    if task == "images":
        size = image_size or getattr(getattr(evaluator, "segmenter", None), "image_size", None) or DEFAULT_IMAGE_SIZE
        runner: Any = ImageTask(dataset, size, shots)
        planned = runner.plan(DEFAULT_IMAGE_EPISODES if episodes is None else episodes, seed)
    elif task == "slices":
        runner = SliceTask(dataset, kinds)
        planned = runner.plan(episodes, seed)
    else:
        runner = TransferTask(dataset, reference_mode, pairing)
        planned = runner.plan(episodes, seed)

    description = dataset.describe()
    config = {
        "task": task,
        "dataset": {**description, "root": str(Path(description["root"]).resolve())},
        "method": evaluator.describe(),
        "seed": seed,
        "task_options": runner.options(),
        "code": code_fingerprint(),  # episodes of other code are not reused
    }
    key = config_hash(config)
    store = EpisodeStore(report_dir, key)
    replacing = _check_report_folder(report_dir, store, resume, overwrite)

    with sitk_threads(threads or 1):
        pending = [e for e in planned if e.episode_id not in store]
        bar = _progress_bar(len(planned), len(planned) - len(pending), f"{task} {dataset.name} {method}", progress)
        try:
            for episode in pending:
                store.add(episode.episode_id, runner.run(episode, evaluator))
                bar.update(1)
        finally:
            bar.close()

    results = [store.get(e.episode_id) for e in planned]
    summary = runner.summarise([r for r in results if r is not None])
    document = {
        "task": task,
        "dataset": config["dataset"],
        "config": {**config, "config_hash": key, "episodes_requested": episodes, "limit_cases": limit_cases},
        "machine": machine_description(),
        "date": now_iso(),
        "command": command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "summary": summary,
        "headline": headline(task, summary),
        "episode_ids": [e.episode_id for e in planned],
    }
    if replacing:
        store.compact()  # an earlier evaluation's records go only now that this one is complete
    written = write_reports(report_dir, document)
    if replacing:
        for name in PLOT_FILES:  # a plot of the earlier evaluation's task that this one does not draw
            if report_dir / name not in written:
                (report_dir / name).unlink(missing_ok=True)
    return document


def _limit_cases(dataset: Any, limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit_cases must be >= 1, got {limit}")
    dataset.cases = dataset.cases[:limit]
    if isinstance(dataset, ImageDataset):
        dataset.pools = {name: [i for i in pool if i < limit] for name, pool in dataset.pools.items()}
        for image_class in dataset.classes:
            if len(dataset.pools.get(image_class.name, [])) < 2:
                raise ValueError(f"limit_cases={limit} leaves class {image_class.name!r} fewer than 2 images")


def _check_report_folder(report_dir: Path, store: EpisodeStore, resume: bool, overwrite: bool) -> bool:
    """Refuse to mix evaluations in one folder unless ``overwrite``. With it, the earlier reports stay in place until
    the new ones replace them (an interrupted rerun loses nothing); without ``resume`` every episode runs again.
    Returns whether the folder's earlier evaluation is being replaced."""
    foreign = bool(store.other_configs) or (not resume and len(store) > 0)
    orphan = (report_dir / RESULTS_JSON).exists() and len(store) == 0 and not store.other_configs
    if not (foreign or orphan):
        return False
    if not overwrite:
        reason = ("holds an evaluation with another configuration" if store.other_configs
                  else "holds finished episodes and resume is off" if len(store)
                  else "holds a results.json without its episodes")
        raise ReportExistsError(f"{report_dir}: {reason}; choose another folder or overwrite it (--force)")
    if not resume:
        store.forget()
    return True


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, done: int, description: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=description, unit="episode", dynamic_ncols=True)
