"""A small evaluation of the one-shot method itself (the DINOv2 stand-in backbone) through the harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from insid3_med.evaluation.report import compare_reports
from insid3_med.evaluation.run import run_evaluation

ROOT = Path(__file__).parents[1] / ".." / "shared"
DATA = ROOT / "data"
WEIGHTS = ROOT / "weights" / "dinov2-small-standin"


@pytest.fixture(scope="module")
def options() -> dict:
    if not WEIGHTS.is_dir():
        pytest.skip(f"stand-in weights {WEIGHTS} are absent (a fresh machine without ../shared/weights)")
    if not DATA.is_dir():
        pytest.skip(f"shared test data {DATA} is absent (a fresh machine without ../shared/data)")
    return {"backbone_options": {"weights": str(WEIGHTS), "device": "cpu"}, "image_size": 224, "progress": False}


@pytest.mark.slow
def test_ours_slices_and_transfer_on_hippocampus(tmp_path: Path, options: dict) -> None:
    ours = run_evaluation("slices", DATA / "hippocampus", tmp_path / "ours", method="ours", episodes=1,
                          kinds=["largest"], **options)
    config = ours["config"]["method"]
    assert config["method"] == "ours" and len(config["weights_sha256"]) == 64 and config["image_size"] == 224
    assert config["propagation"]["mode"] == "volume" and "stop_ratio" in config["propagation"]
    overall = ours["summary"]["overall"]["largest"]
    assert overall["episodes"] == 2 and overall["predicted_empty"] == 0
    # the labelled slice is kept and some of the structure is found beyond it
    assert overall["dice"]["mean"] > overall["dice_unlabelled"]["mean"] > 0.05
    assert (tmp_path / "ours" / "dice_by_distance.png").is_file()
    copy = run_evaluation("slices", DATA / "hippocampus", tmp_path / "copy", method="copy", episodes=1,
                          kinds=["largest"], progress=False)
    assert copy["episode_ids"] == ours["episode_ids"]  # the same episodes for every method
    table = compare_reports([tmp_path / "ours", tmp_path / "copy"], tmp_path / "cmp", methods=["ours", "copy"])
    assert "| slices | hippocampus | all | Dice (largest slice) |" in table
    assert (tmp_path / "cmp" / "comparison_dice_by_distance.png").is_file()

    transfer = run_evaluation("transfer", DATA / "hippocampus", tmp_path / "transfer", method="ours", episodes=1,
                              reference_mode="slice", **options)
    scores = json.loads((tmp_path / "transfer" / "results.json").read_text())["summary"]["overall"]
    assert transfer["summary"]["episodes"] == 1 and scores["episodes"] == 2 and scores["dice"]["mean"] > 0.05


@pytest.mark.slow
def test_ours_images_on_chest_xrays(tmp_path: Path, options: dict) -> None:
    document = run_evaluation("images", DATA / "cxr", tmp_path / "report", method="ours", episodes=3, **options)
    summary = document["summary"]
    assert summary["episodes"] == 3 and set(summary["classes"]) == {"right lung", "left lung", "cardiomediastinum"}
    # lungs on chest X-rays are an easy target even for the small stand-in backbone
    assert summary["classes"]["right lung"]["iou"] > 30 and summary["fbiou"] > 50
