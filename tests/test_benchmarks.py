"""Smoke tests of benchmarks/: each script runs on tiny settings and prints (and writes) its figures."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from insid3_med.propagation import PropagationParams

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
STANDIN = SHARED / "weights" / "dinov2-small-standin"


@pytest.fixture(scope="module")
def bench():
    """Import a benchmark script by name (their folder on sys.path, as when run as scripts)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_flop_count_matches_a_hand_count(bench) -> None:
    common = bench("common")
    from insid3_med.backbones import BACKBONES

    spec = BACKBONES["dinov3_vits16"]
    # ViT-S/16 at 512 px: 1024 patches + 5 tokens; ALGORITHM.md quotes 63 GFLOP for the 12 blocks.
    assert common.backbone_flops(spec, 512, 12) / 1e9 == pytest.approx(63, rel=0.03)
    tokens, width = 1024 + 5, 384
    per_block = 2 * tokens * 12 * width * width + 4 * tokens * tokens * width
    embed = 2 * 1024 * width * 3 * 16 * 16
    assert common.backbone_flops(spec, 512, 3, batch=2) == 2 * (embed + 3 * per_block)
    assert common.yardstick_side(spec, 512, 2) % 64 == 0


def test_stage_benchmark_prints_every_stage_and_the_matmul_fraction(bench, tmp_path, capsys) -> None:
    stages = bench("bench_stages")
    out = tmp_path / "stages.json"
    result = stages.main(["--model", "dinov3_vits16", "--size", "64", "--repeats", "1", "--slices", "2",
                          "--batch", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    for name in stages.STAGES:
        assert f"\n{name} " in printed
    assert "everything but the backbone" in printed and "of a" in printed and "slices/s" in printed
    saved = json.loads(out.read_text())
    assert set(saved["stage_seconds"]) == set(stages.STAGES)
    assert saved["stage_seconds"]["encode"] > 0 and saved["episode_seconds"] >= saved["stage_seconds"]["encode"]
    assert 0 <= saved["non_backbone_fraction"] < 1
    assert saved["backbone_gflops"] > 0 and saved["matmul_gflops"] > 0
    assert math.isclose(saved["backbone_fraction_best_over_best"], saved["backbone_gflops"] / saved["matmul_gflops"])
    assert saved["backbone_fraction_of_matmul"] == saved["backbone_fraction_of_matmul_per_repeat"][0] > 0
    assert saved["slices_per_second"] > 0 and saved["peak_rss_mib"] > 0
    assert result["size"] == 64 and result["grid"] == [4, 4]


def test_backbone_benchmark_compares_variants_with_fp32(bench, capsys) -> None:
    backbone = bench("bench_backbone")
    result = backbone.main(["--model", "dinov3_vits16", "--size", "32", "--batch", "1", "--repeats", "1"])
    printed = capsys.readouterr().out
    names = [row["variant"] for row in result["variants"]]
    assert names[0] == "fp32" and "bf16 (library)" in names and "bf16 autocast" in names
    for name in names:
        assert name in printed
    by_name = {row["variant"]: row for row in result["variants"]}
    assert by_name["fp32"]["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert all(row["cosine_mean"] > 0.99 and row["seconds"] > 0 for row in result["variants"])


def test_synthetic_ct_has_one_labelled_slice(bench) -> None:
    volume_bench = bench("bench_volume")
    volume, labels = volume_bench.synthetic_ct(10, 48)
    assert volume.shape == (10, 48, 48) and volume.array.dtype == np.int16 and volume.modality == "CT"
    labelled = np.flatnonzero(labels.reshape(10, -1).any(axis=1))
    assert labelled.tolist() == [5]
    assert volume.array.min() >= -1024 and volume.array.max() > 500  # air and bone


def test_volume_benchmark_on_a_small_ct_reports_memory_and_parts(bench, tmp_path, capsys) -> None:
    volume_bench = bench("bench_volume")
    out = tmp_path / "ct.json"
    result = volume_bench.main(["ct", "--slices", "6", "--side", "64", "--model", "dinov3_vits16", "--size", "32",
                                "--set", "crop_ensemble=1.25,1.5", "--profile", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "slices/s" in printed and "peak" in printed and "ms/slice" in printed
    saved = json.loads(out.read_text())
    assert saved["slices_in_volume"] == 6 and saved["slices_processed"] >= 1
    assert saved["peak_rss_mib"] >= saved["rss_after_model_mib"] > 0
    assert any(row["part"].startswith("backbones.encode ") for row in saved["parts"])
    assert result["propagate_seconds"] > 0
    assert "crop_ensemble=(1.25, 1.5)" in saved["options"]["params"]


@pytest.mark.slow
def test_volume_benchmark_subprocess_runs_compare_memory(bench, capsys) -> None:
    volume_bench = bench("bench_volume")
    results = volume_bench.main(["ct", "--slices", "4", "8", "--side", "48", "--model", "dinov3_vits16",
                                 "--size", "32", "--threads", "1"])
    assert [r["slices_in_volume"] for r in results] == [4, 8]
    assert "memory growth 4 -> 8 slices" in capsys.readouterr().out


@pytest.mark.skipif(not (SHARED / "data" / "acdc").is_dir() or not STANDIN.is_dir(),
                    reason="needs ../shared/data/acdc and the stand-in weights in ../shared/weights")
def test_volume_benchmark_on_acdc(bench, capsys) -> None:
    volume_bench = bench("bench_volume")
    result = volume_bench.main(["acdc", "--size", "56"])
    assert result["slices_in_volume"] == 10 and result["labelled_voxels_out"] > 0
    assert "ACDC patient001_frame01" in capsys.readouterr().out


@pytest.mark.skipif(not (SHARED / "data" / "ph2").is_dir() or not STANDIN.is_dir(),
                    reason="needs ../shared/data/ph2 and the stand-in weights in ../shared/weights")
def test_precision_benchmark_compares_bf16_with_fp32(bench, capsys) -> None:
    precision = bench("bench_precision")
    result = precision.main(["--datasets", "ph2", "--episodes", "2", "--size", "56"])
    row = result["datasets"][0]
    assert row["episodes"] == 2 and 0.0 <= row["pooled_iou_vs_fp32"]["bf16"] <= 1.0
    assert row["identical_masks"]["bf16-blocked"] <= 2
    assert set(row["miou"]) == {"fp32", "bf16", "bf16-blocked"}
    assert "pooled IoU" in capsys.readouterr().out


def test_clustering_benchmark_runs(bench, capsys, monkeypatch) -> None:
    clustering = bench("bench_clustering")
    monkeypatch.setattr(sys, "argv", ["bench_clustering.py", "--sizes", "64", "--repeats", "1", "--threads", "1"])
    clustering.main()
    printed = capsys.readouterr().out
    assert "ours64=same" in printed


# -- the speed paths of insid3_med/backbones.py give the results of the plain paths ------------------------------


def test_bf16_backbone_with_bf16_weights_equals_autocast_of_fp32_weights(bench) -> None:
    common = bench("bench_backbone").common
    from insid3_med.backbones import BACKBONES, Backbone

    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    plain = common.random_dinov3("dinov3_vits16")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(images, num_blocks=4).float()
    backbone = Backbone(common.random_dinov3("dinov3_vits16"), BACKBONES["dinov3_vits16"], location="random",
                        device=torch.device("cpu"), precision="bf16", feature_block=4)
    assert backbone.network.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert backbone.network.blocks[0].norm1.weight.dtype == torch.float32
    assert torch.equal(backbone.encode(images), expected)
    with pytest.raises(AttributeError):
        backbone.precision = "fp32"  # type: ignore[misc]


@pytest.mark.skipif(not STANDIN.is_dir(), reason="needs the stand-in weights in ../shared/weights")
def test_hugging_face_models_use_the_own_attention_with_identical_results() -> None:
    from transformers import AutoModel

    from insid3_med.backbones import HF_ATTENTION, load_backbone

    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    backbone = load_backbone(STANDIN, device="cpu")
    assert backbone.network.model.config._attn_implementation == HF_ATTENTION
    reference = AutoModel.from_pretrained(str(STANDIN), attn_implementation="sdpa").eval()
    with torch.inference_mode():
        hidden = reference(pixel_values=images, output_hidden_states=True).hidden_states[backbone.feature_block]
        expected = reference.layernorm(hidden)[:, 1:].transpose(1, 2).reshape(1, -1, 4, 4)
    assert torch.equal(backbone.encode(images), expected)


@pytest.mark.skipif(not (SHARED / "data" / "hippocampus").is_dir() or not STANDIN.is_dir(),
                    reason="needs ../shared/data/hippocampus and the stand-in weights in ../shared/weights")
def test_ablation_runs_the_harness_per_variant_and_compares_with_the_defaults(bench, tmp_path, capsys) -> None:
    ablation = bench("ablate_propagation")
    rows = ablation.main(["--sets", "hippocampus", "--volumes", "1", "--variants", "no_gate",
                          "--output", str(tmp_path), "--json", str(tmp_path / "rows.json"),
                          "--markdown", str(tmp_path / "table.md")])
    printed = capsys.readouterr().out
    assert [row["variant"] for row in rows] == ["default", "no_gate"]  # the defaults always run first
    assert "\ndefault " in printed and "\nno_gate " in printed
    assert rows[0]["dice_vs_default"] == 0 and rows[1]["dice_vs_default"] == rows[1]["dice"] - rows[0]["dice"]
    assert all(row["episodes"] == 2 and 0 < row["dice"] <= 1 for row in rows)  # anterior and posterior
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    # each variant is an ordinary harness report, its settings in the recorded configuration
    configs = [json.loads((tmp_path / f"hippocampus_{name}" / "results.json").read_text())["config"]
               for name in ("default", "no_gate")]
    assert configs[0]["method"]["propagation"]["gate_sigma"] == PropagationParams().gate_sigma
    assert configs[1]["method"]["propagation"]["gate_sigma"] is None
    assert configs[0]["config_hash"] != configs[1]["config_hash"]
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| variant | settings | hippocampus (2 episodes): Dice") and len(table) == 4
    assert table[3].startswith(f"| no_gate | `gate_sigma=none` | {rows[1]['dice']:.3f} (")
    capsys.readouterr()
    assert ablation.main(["--from-json", str(tmp_path / "rows.json")]) == rows  # tabulates, runs nothing
    assert capsys.readouterr().out.splitlines() == table


@pytest.mark.skipif(not (SHARED / "data" / "acdc").is_dir() or not STANDIN.is_dir(),
                    reason="needs ../shared/data/acdc and the stand-in weights")
def test_stop_signals_records_every_step_and_leaves_the_method_unchanged(bench, tmp_path, capsys) -> None:
    import insid3_med.propagation as propagation

    signals = bench("stop_signals")
    chain, label_slice = propagation._propagate_chain, propagation.label_slice
    assert signals.main(["--set", "acdc", "--volumes", "1", "--json", str(tmp_path / "signals.json")]) == 0
    assert (propagation._propagate_chain, propagation.label_slice) == (chain, label_slice)  # restored
    printed = capsys.readouterr().out
    figures = json.loads((tmp_path / "signals.json").read_text())
    assert figures["inside_steps"] > 5 and len(figures["exit_steps"]) == figures["exits"]
    assert sum(figures["exit_sides"].values()) == figures["exits"]
    for name in signals.SIGNALS:
        assert name in printed
        entry = figures["signals"][name]
        assert -1 <= entry["inside_min"] <= entry["inside_percentiles"]["5"] <= entry["inside_percentiles"]["50"] <= 1

    # recording changes nothing: the same masks with and without the recorder
    from insid3_med.evaluation.datasets import open_volume_dataset
    from insid3_med.evaluation.methods import build_method

    dataset = open_volume_dataset(SHARED / "data" / "acdc")
    case, structure = dataset.cases[0], dataset.structures[2]
    volume = dataset.load_image(case, structure)
    labels = dataset.load_labels(case, volume)
    axis = dataset.slice_axis(volume)
    truth = structure.binary(labels)
    index = int(np.argmax(np.moveaxis(truth, axis, 0).sum(axis=(1, 2))))
    given = np.zeros_like(truth)
    np.moveaxis(given, axis, 0)[index] = np.moveaxis(truth, axis, 0)[index]
    method = build_method("ours", backbone_options={"weights": str(STANDIN), "device": "cpu"})
    plain = method.propagate(volume, given, axis)
    with signals.StepRecorder() as recorder:
        recorded = method.propagate(volume, given, axis)
    assert recorder.steps and np.array_equal(plain, recorded)


@pytest.mark.skipif(not (SHARED / "data" / "hippocampus").is_dir() or not STANDIN.is_dir(),
                    reason="needs ../shared/data/hippocampus and the stand-in weights")
def test_walk_variants_refine_one_chain_per_episode_as_the_pipeline_does_and_reuse_it(bench, tmp_path, capsys,
                                                                                      monkeypatch) -> None:
    variants = bench("walk_variants")
    arguments = ["--set", "hippocampus", "--volumes", "1", "--cache", str(tmp_path / "cache"),
                 "--json", str(tmp_path / "walk.json")]
    assert variants.main(arguments) == 0
    printed = capsys.readouterr().out
    figures = json.loads((tmp_path / "walk.json").read_text())
    rows = {row["variant"]: row for row in figures["variants"]}
    assert list(rows) == list(variants.VARIANTS) and figures["episodes"] == 2
    assert rows["default"]["dice_vs_default"] == 0 and all(f"  {name} " in printed for name in rows)
    errors = figures["default_errors"]
    assert errors["true_positive"] > 0 and 0 <= errors["fp_on_another_structure"] <= (
        errors["fp_inside_its_slices"] + errors["fp_beyond_the_structure"])
    assert figures["default_if_empty_slices_perfect"] >= rows["default"]["dice"]

    # the offline default is the pipeline's own walk: the first episode's Dice, straight from propagate
    from insid3_med.evaluation.datasets import open_volume_dataset
    from insid3_med.evaluation.methods import build_method
    from insid3_med.evaluation.metrics import dice

    dataset = open_volume_dataset(SHARED / "data" / "hippocampus")
    case = dataset.cases[variants.select_cases(len(dataset.cases), 1, 0)[0]]
    structure = dataset.structures[0]
    volume = dataset.load_image(case, structure)
    truth = structure.binary(dataset.load_labels(case, volume))
    axis = dataset.slice_axis(volume)
    index = int(np.argmax(np.moveaxis(truth, axis, 0).sum(axis=(1, 2))))
    given = np.zeros(truth.shape, dtype=np.int64)
    np.moveaxis(given, axis, 0)[index] = np.moveaxis(truth, axis, 0)[index]
    method = build_method("ours", backbone_options={"weights": str(STANDIN), "device": "cpu"})
    pipeline = dice(method.propagate(volume, given, axis) != 0, truth)
    chain = np.load(tmp_path / "cache" / f"{case.name}_0.npz")["chain"]
    stack = variants.SliceStack(volume, axis, variants.intensity_mapping(volume))
    assert dice(variants.refine(chain, stack, [index], {}, 1) != 0, truth) == pytest.approx(pipeline, abs=1e-6)

    # a second run walks the cached chains only
    class NoChain:
        def propagate(self, *args: object, **kwargs: object) -> np.ndarray:
            raise AssertionError("the chain ran again")

    monkeypatch.setattr(variants, "build_method", lambda *args, **kwargs: NoChain())
    assert variants.main(arguments) == 0
    assert json.loads((tmp_path / "walk.json").read_text()) == figures


def test_transfer_benchmark_times_both_ways_and_finds_the_same_labels(bench, tmp_path, capsys) -> None:
    if not (SHARED / "data" / "hippocampus" / "images").is_dir() or not STANDIN.is_dir():
        pytest.skip("the hippocampus set or the stand-in weights are not in ../shared")
    transfer = bench("bench_transfer")
    out = tmp_path / "transfer.json"
    result = transfer.main(["--targets", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert result["targets"] == 1 and all(row["same_labels"] for row in result["rows"])
    assert "1 targets:" in printed and "chaining it once" in printed
    assert json.loads(out.read_text())["ratio"] == result["ratio"] > 0


def test_registration_benchmark_times_each_grid_and_checks_the_registration(bench, tmp_path, capsys) -> None:
    if not (SHARED / "data" / "acdc" / "images").is_dir():
        pytest.skip("the ACDC set is not in ../shared")
    registration = bench("bench_registration")
    out = tmp_path / "registration.json"
    result = registration.main(["--patients", "1", "--voxels", "65536", "16384", "--json", str(out)])
    printed = capsys.readouterr().out
    assert result["patients"] == 1 and set(result["total_s"]) == {"65536", "16384"}
    assert result["speedup"]["65536"] == 1.0 and "1 pairs:" in printed
    row = result["rows"][0]
    assert row["65536_dice"] > row["dice_unregistered"] - 0.05  # a coarse grid still carries the ventricle
    assert json.loads(out.read_text())["total_s"] == result["total_s"]
