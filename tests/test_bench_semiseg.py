"""scripts/bench_semiseg.py on six of the real COVID-SemiSeg slices with a tiny network: the protocol, not accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scripts import bench_semiseg
from tests.conftest import shared_data

pytestmark = pytest.mark.slow

TINY = ["--network_width", "4", "--slice_size", "[64, 64]", "--patch_size", "[64, 64]", "--num_samples", "1",
        "--batch_size", "2", "--amp", "false"]


@pytest.fixture(scope="module")
def six_slices(tmp_path_factory) -> Path:
    train = shared_data("covid_semiseg", "train")
    out = tmp_path_factory.mktemp("semiseg6")
    for sub, suffix in (("images", ".jpg"), ("masks", ".png")):
        (out / sub).mkdir()
        for name in ("0", "1", "2", "3", "4", "5"):
            shutil.copy(train / sub / f"{name}{suffix}", out / sub / f"{name}{suffix}")
    return out


def test_cross_validation_final_bundle_resume_and_reuse(six_slices, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(six_slices), "--out", str(out), "--folds", "3", "--epochs", "2", "--checkpoint", "last"]
    assert bench_semiseg.main(args + TINY) == 0
    result = json.loads((out / "results.json").read_text())
    assert [f["fold"] for f in result["folds"]] == [0, 1, 2] and all(f["n"] == 2 for f in result["folds"])
    assert sorted(r["case"] for r in result["per_image"]) == ["0", "1", "2", "3", "4", "5"]  # each slice tested once
    for metric in ("dice", "sensitivity", "specificity", "infnet_dice", "mask_dice"):
        assert 0.0 <= result["mean"][metric] <= 1.0
    assert result["knobs"]["slice_size"] == [64, 64] and result["knobs"]["val_interval"] == 3
    assert (out / "bundle" / "models" / "model.pt").is_file()  # the final model on all slices
    # the last-epoch recipe trains on all 4 training slices of a fold
    assert len(json.loads((out / "fold0" / "datalist.json").read_text())["training"]) == 4

    # resuming a finished run only re-reads the scores: same numbers, no retraining
    weights = (out / "fold1" / "bundle" / "models" / "model.pt").stat().st_mtime_ns
    assert bench_semiseg.main(args + TINY + ["--resume", "--no-final"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["mean"] == result["mean"]
    assert (out / "fold1" / "bundle" / "models" / "model.pt").stat().st_mtime_ns == weights

    # inference-only knobs scored on the same trained folds: test-time flips change the maps, not the models
    assert result["knobs"]["tta_flips"] == [[0], [1]]  # the recipe's
    flips = tmp_path / "no_flips"
    tta = ["--data", str(six_slices), "--out", str(flips), "--folds", "3", "--reuse-models", str(out),
           "--tta_flips", "[]"]
    assert bench_semiseg.main(tta) == 0
    flipped = json.loads((flips / "results.json").read_text())
    assert flipped["knobs"]["tta_flips"] == [] and flipped["reused_models"] == str(out)
    assert flipped["mean"]["infnet_dice"] != result["mean"]["infnet_dice"]
    assert not (flips / "bundle").exists()


def test_image_metrics_against_hand_counts():
    label = np.zeros((4, 4), bool)
    label[:2] = True  # 8 voxels
    probability = np.zeros((4, 4))
    probability[:1] = 0.9  # 4 true positives, 4 false negatives
    probability[3, 0] = 0.6  # 1 false positive
    scores = bench_semiseg.image_metrics(probability, label)
    assert scores["dice"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 4))
    assert scores["sensitivity"] == pytest.approx(0.5)
    assert scores["specificity"] == pytest.approx(7 / 8)
