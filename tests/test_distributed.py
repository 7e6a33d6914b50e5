"""Distributed training and sharded inference, run for real: two CPU processes over gloo, started by torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from covid_monai.bundle import TEMPLATE_BUNDLE, load_config, read_knobs
from covid_monai.cli import main
from covid_monai.datalist import build_datalist, write_datalist
from covid_monai.distributed import backend_for, cli_argv, merge_shard_summaries, rank_device
from covid_monai.handlers import averaged_weights
from covid_monai.io import nifti_stem
from covid_monai.summary import CaseResult, read_summary, write_summary
from tests.conftest import TINY_KNOBS

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 1  # volumes per step and rank in the DDP training below
TRAIN_CONFIGS = "['configs/train.json','configs/multi_gpu_train.json']"
EVALUATE_CONFIGS = "['configs/inference.json','configs/evaluate.json','configs/multi_gpu_evaluate.json']"


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (as ``python -m torch.distributed.run``), checked."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    result = subprocess.run(command, cwd=cwd, env=env,
        capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def ddp_bundle(tmp_path_factory: pytest.TempPathFactory, phantoms: Path) -> tuple[Path, dict]:
    """A tiny bundle trained for one epoch by two processes (DDP over gloo), and its datalist."""
    folder = tmp_path_factory.mktemp("ddp")
    datalist = build_datalist(phantoms, val_fraction=0.5)  # 2 training, 2 validation cases
    datalist["training"] += datalist["validation"][:1]  # 3: the sampler must pad the split to 2 cases per rank
    write_datalist(datalist, folder / "datalist.json")
    knobs = {**TINY_KNOBS, "batch_size": BATCH, "ema_decay": 0.5}  # the average of the module inside DDP
    tokens = [token for key, value in knobs.items() for token in (f"--{key}", json.dumps(value))]
    assert main(["prepare-train", "--data", str(folder / "datalist.json"), "--out", str(folder / "bundle"),
                 *tokens]) == 0
    bundle = folder / "bundle"
    assert json.loads((bundle / "configs" / "datalist.json").read_text()) == datalist
    # the documented command, with the CPU forced so that it runs over gloo on a GPU machine too
    _torchrun("-m", "monai.bundle", "run", "--config_file", TRAIN_CONFIGS, "--device", "$torch.device('cpu')",
              cwd=bundle)
    return bundle, datalist


def test_ddp_training_one_checkpoint_and_split_epoch(ddp_bundle):
    bundle, datalist = ddp_bundle
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["latest.pt", "model.pt"]
    latest = torch.load(bundle / "models" / "latest.pt", map_location="cpu", weights_only=True)
    steps = math.ceil(len(datalist["training"]) / WORLD / BATCH)
    assert steps == 2  # 3 cases over 2 ranks; one process would take 3 steps
    assert latest["trainer"]["epoch_length"] == steps
    assert latest["trainer"]["iteration"] == steps and latest["trainer"]["max_epochs"] == 1
    best = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in best) and set(best) == set(latest["model"])
    assert int(latest["weight_averaging"]["n_averaged"]) == steps  # every rank averaged its (identical) weights
    averaged = averaged_weights(latest["weight_averaging"])
    assert all(torch.equal(best[k], averaged[k]) for k in best)  # validated and saved: the average
    network = load_config(bundle, ["inference.json"], {"device": "cpu"}).get_parsed_content("network_def")
    network.load_state_dict(best)  # the unwrapped network loads the DDP-trained weights as they are
    assert read_knobs(bundle)["network_width"] == TINY_KNOBS["network_width"]  # knobs baked in for inference
    # TensorBoard (trainer and validator) written by rank 0 only: every event file carries one process id
    events = [p.name for p in (bundle / "eval").glob("events.out.tfevents.*")]
    assert len(events) == 2 and len({name.split(".")[-2] for name in events}) == 1


def test_ddp_trains_a_mean_teacher(tmp_path, phantoms):
    datalist = build_datalist(phantoms, val_fraction=0.5)
    images = sorted(item["image"] for item in datalist["training"] + datalist["validation"])
    datalist["unlabelled"] = [{"image": image} for image in images[:2]]  # 2 labelled + 2 unlabelled: 2 steps a rank
    write_datalist(datalist, tmp_path / "datalist.json")
    knobs = {**TINY_KNOBS, "batch_size": 1, "ema_decay": 0.5, "consistency_weight": 1.0}
    tokens = [token for key, value in knobs.items() for token in (f"--{key}", json.dumps(value))]
    assert main(["prepare-train", "--data", str(tmp_path / "datalist.json"), "--out", str(tmp_path / "bundle"),
                 *tokens]) == 0
    bundle = tmp_path / "bundle"
    _torchrun("-m", "monai.bundle", "run", "--config_file", TRAIN_CONFIGS, "--device", "$torch.device('cpu')",
              cwd=bundle)
    latest = torch.load(bundle / "models" / "latest.pt", map_location="cpu", weights_only=True)
    assert latest["trainer"]["epoch_length"] == 2  # the unlabelled images are in the split training list (1 without)
    best = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    averaged = averaged_weights(latest["weight_averaging"])
    assert all(torch.equal(best[k], averaged[k]) for k in best)  # the teacher (the average) is what is kept


def test_ddp_evaluation_gathers_every_case(ddp_bundle):
    bundle, datalist = ddp_bundle
    _torchrun("-m", "monai.bundle", "run", "--config_file", EVALUATE_CONFIGS, "--device", "$torch.device('cpu')",
              cwd=bundle)
    header, *rows = (bundle / "eval" / "metrics.csv").read_text().splitlines()
    assert header.startswith("case,") and "dice" in header.split(",")
    cases = [row.split(",")[0] for row in rows]  # one table from rank 0, each case once, in case order
    assert cases == sorted(nifti_stem(item["image"]) for item in datalist["validation"])
    assert (bundle / "eval" / "metrics_summary.csv").is_file()
    assert len(list((bundle / "eval").glob("*_infection.nii.gz"))) == len(datalist["validation"])


def test_sharded_inference_each_case_once_one_summary(tmp_path, phantoms, random_bundle):
    """The documented command: the one command line's `infer --distributed`, any of its options, under torchrun."""
    out = tmp_path / "masks"
    result = _torchrun("-m", "covid_monai", "infer", str(phantoms / "images"), "-o", str(out), "--bundle",
                       str(random_bundle), "--device", "cpu", "--lungs", "--seg-nrrd", "--threshold", "0.6", "--quiet",
                       "--distributed", cwd=tmp_path)
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (phantoms / "images").glob("*.nii.gz"))
    assert len(cases) == 4
    assert sorted(p.name for p in out.glob("*_infection.nii.gz")) == [f"{c}_infection.nii.gz" for c in cases]
    assert sorted(p.name for p in out.glob("*_lungs.nii.gz")) == [f"{c}_lungs.nii.gz" for c in cases]
    assert sorted(p.name for p in out.glob("*.seg.nrrd")) == [f"{c}_infection.seg.nrrd" for c in cases]
    summary = json.loads((out / "summary.json").read_text())
    # the merge refuses a case found in two shards, so one row per case means each case was segmented once
    assert [row["case"] for row in summary["cases"]] == cases
    assert {row["status"] for row in summary["cases"]} == {"ok"} and summary["world_size"] == WORLD
    assert summary["knobs"] == {"threshold": 0.6}
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + len(cases)
    assert not list(out.glob("summary.shard*")) and not list(out.glob(".*.tmp*"))
    assert result.stdout.count("segmented") == 1  # rank 0 reports for all
    assert f"4 segmented, 0 skipped (done before), 0 failed by {WORLD} process(es)" in result.stdout


def _row(case: str, status: str = "ok") -> CaseResult:
    return CaseResult(case, f"/scans/{case}.nii.gz", status, infection_ml=1.5, lung_ml=3000.0)


def test_merge_orders_by_case_and_removes_shards(tmp_path):
    write_summary(tmp_path, [_row("c"), _row("a")], {}, "summary.shard0")
    write_summary(tmp_path, [_row("b", "failed")], {}, "summary.shard1")
    merged = merge_shard_summaries(tmp_path, {"world_size": 2}, world_size=2)
    assert [r.case for r in merged] == ["a", "b", "c"] == [r.case for r in read_summary(tmp_path)]
    assert json.loads((tmp_path / "summary.json").read_text())["counts"] == {"ok": 2, "skipped": 0, "failed": 1}
    assert not list(tmp_path.glob("summary.shard*"))


def test_merge_refuses_duplicates_and_missing_shards(tmp_path):
    write_summary(tmp_path, [_row("a")], {}, "summary.shard0")
    with pytest.raises(RuntimeError, match="shard1"):
        merge_shard_summaries(tmp_path, {}, world_size=2)
    write_summary(tmp_path, [_row("a")], {}, "summary.shard1")
    with pytest.raises(RuntimeError, match="case a is in both"):
        merge_shard_summaries(tmp_path, {}, world_size=2)
    assert len(list(tmp_path.glob("summary.shard*.json"))) == 2  # nothing removed after a failed merge


def test_interrupted_run_leftovers_fold_into_summary(tmp_path):
    write_summary(tmp_path, [_row("a", "failed"), _row("z")], {})
    write_summary(tmp_path, [_row("a")], {}, "summary.shard3")  # a 4-rank run killed after rank 3 did case a
    merged = merge_shard_summaries(tmp_path, {}, include_summary=True)
    assert [(r.case, r.status) for r in merged] == [("a", "ok"), ("z", "ok")]


def test_device_and_backend_per_rank():
    assert rank_device("cpu", 1) == torch.device("cpu") and backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    if not torch.cuda.is_available():
        assert rank_device("auto", 1) == torch.device("cpu")
        with pytest.raises(ValueError, match="not available"):
            rank_device("cuda", 0)
    with pytest.raises(ValueError, match="unknown device"):
        rank_device("tpu", 0)


def test_multi_gpu_train_addresses_no_handler_by_position():
    """multi_gpu_train.json only sets is_rank0: the logging and saving handlers of train.json turn themselves off on
    the other ranks, and the checkpoints hold the bare network (not the DDP wrapper) in both files."""
    overrides = json.loads((TEMPLATE_BUNDLE / "configs" / "multi_gpu_train.json").read_text())
    assert not [key for key in overrides if "#handlers#" in key]
    assert "is_rank0" in overrides
    base = ConfigParser()
    base.read_config(str(TEMPLATE_BUNDLE / "configs" / "train.json"))
    rank0_only = {"covid_monai.handlers.LatestCheckpointSaver", "StatsHandler", "TensorBoardStatsHandler",
                  "CheckpointSaver"}
    for section in ("train", "validate"):
        for handler in base[section]["handlers"]:
            if isinstance(handler, dict) and handler["_target_"] in rank0_only:
                assert handler["_disabled_"] == "$not @is_rank0", handler
    checkpoints = [h for h in base["train"]["handlers"] if isinstance(h, dict) and "Checkpoint" in h["_target_"]]
    assert len(checkpoints) == 2
    assert all(h.get("load_dict", h.get("save_dict"))["model"] == "@network_def" for h in checkpoints)


def test_multi_gpu_evaluate_replaces_the_handlers_by_name():
    """multi_gpu_evaluate.json gives its own handler list (nothing addressed by position) over evaluate.json's."""
    overrides = json.loads((TEMPLATE_BUNDLE / "configs" / "multi_gpu_evaluate.json").read_text())
    assert not [key for key in overrides if "#handlers#" in key]
    assert [h["_target_"] for h in overrides["handlers"]] == ["StatsHandler", "covid_monai.handlers.CaseMetricsSaver"]
    base = ConfigParser()
    base.read_config([str(TEMPLATE_BUNDLE / "configs" / name) for name in ("inference.json", "evaluate.json")])
    assert base["evaluator"]["val_handlers"] == "@handlers"


def test_cli_argv_of_the_old_entry_point():
    assert cli_argv(["infer", "scans", "-o", "out"]) == ["infer", "--distributed", "scans", "-o", "out"]
    assert cli_argv(["prepare-train", "--data", "d", "--out", "b"]) == ["prepare-train", "--data", "d", "--out", "b"]
    assert cli_argv(["--help"]) == ["--help"] and cli_argv([]) == []


def test_old_entry_point_is_an_alias_of_infer_distributed(tmp_path, random_bundle, phantoms):
    """`python -m covid_monai.distributed infer` (earlier versions' command) still runs sharded, by the one parser."""
    out = tmp_path / "out"
    result = _torchrun("-m", "covid_monai.distributed", "infer", str(phantoms / "images"), "-o", str(out), "--bundle",
                       str(random_bundle), "--device", "cpu", "--quiet", "--workers", "0", cwd=tmp_path)
    rows = json.loads((out / "summary.json").read_text())["cases"]
    assert sorted(r["case"] for r in rows) == [f"phantom_{i:03d}" for i in range(4)]
    assert all(r["status"] == "ok" for r in rows)
    assert not list(out.glob("summary.shard*"))
    assert f"4 segmented, 0 skipped (done before), 0 failed by {WORLD} process(es)" in result.stdout
