#!/usr/bin/env python
"""Training throughput benchmark: the bundle's train pipeline against the network's pure forward+backward step.

For every configuration (cache_rate 1.0 and 0.0, DataLoader num_workers 0 and 2 by default) a fresh process loads
``train.json`` through :func:`covid_monai.bundle.load_config` with overrides (phantom datalist, epochs, cache_rate,
num_workers, device), builds ``train#trainer`` (a MONAI ``SupervisedTrainer``, i.e. an ignite engine) and attaches
timing handlers to its events:

- **data wait** = ``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED`` (the DataLoader's ``next()``: loading,
  pre-processing and augmentation, or waiting for a worker);
- **compute** = ``ITERATION_STARTED`` -> ``ITERATION_COMPLETED`` (to device, forward, loss, backward, optimiser step,
  post-processing, metric and stats handlers);
- **step** = ``GET_BATCH_STARTED`` -> ``ITERATION_COMPLETED`` (both of the above); the first ``--warmup``
  iterations are skipped. Epoch-level work (checkpoint saving, LR scheduler) is reported apart.

The **pure** step runs the same network (``network``), loss (``loss``) and optimiser (``optimizer``) from the same
config on random tensors of the same batch (``batch_size * num_samples`` slices of ``patch_size``), nothing else.
Throughput is slices per second (one training sample is one axial slice); the data-loading overhead is
``(step - pure) / step`` in %.

Example:
    .venv/bin/python benchmarks/bench_train.py                 # about 6 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_train.py --epochs 5 --n-train 8 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_info, write_result  # noqa: E402 - benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_train.json"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "covid_monai_bench_train"


def peak_rss_mb() -> float | None:
    """Peak RSS of this process since it started (``VmHWM``, Linux), in MB; DataLoader workers not included."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


def stats(values: list[float]) -> dict[str, float | None]:
    """Mean and median (seconds, rounded); ``None`` for an empty list."""
    if not values:
        return {"mean": None, "median": None}
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4)}


# ----------------------------------------------------------------------------------------------------------------------
# data and bundle


def prepare(work: Path, n_train: int, n_val: int, shape: tuple[int, int, int], seed: int) -> Path:
    """Phantoms and a bundle whose ``configs/datalist.json`` lists them (absolute paths); reused when present."""
    from covid_monai.bundle import create_bundle
    from covid_monai.phantom import write_phantoms

    data = work / f"phantoms_{'x'.join(map(str, shape))}_n{n_train + n_val}_seed{seed}"
    names = [f"phantom_{i:03d}" for i in range(n_train + n_val)]
    if not all((data / "labels" / f"{n}.nii.gz").is_file() for n in names):
        print(f"writing {len(names)} phantoms {shape} -> {data}", flush=True)
        write_phantoms(data, n_train + n_val, shape=shape, seed=seed)
    items = [{"image": str(data / "images" / f"{n}.nii.gz"), "label": str(data / "labels" / f"{n}.nii.gz")}
             for n in names]
    bundle = create_bundle(work / "bundle")
    datalist = {"training": items[:n_train], "validation": items[n_train:]}
    (bundle / "configs" / "datalist.json").write_text(json.dumps(datalist, indent=2) + "\n")
    return bundle


def overrides(args: argparse.Namespace, cache_rate: float, num_workers: int) -> dict[str, Any]:
    """Config overrides for one measured configuration (validation never runs: val_interval > epochs)."""
    return {
        "device": f"$torch.device('{args.device}')",
        "dataset_dir": str(args.work),
        "output_dir": str(args.work / "eval"),
        "epochs": args.epochs,
        "val_interval": args.epochs + 1,
        "cache_rate": cache_rate,
        "num_workers": num_workers,
        "seed": args.seed,
        "amp": bool(args.amp),
    }


# ----------------------------------------------------------------------------------------------------------------------
# one configuration (runs in its own process)


def measure_pipeline(args: argparse.Namespace, bundle: Path, cache_rate: float, num_workers: int) -> dict[str, Any]:
    """Run the bundle's trainer for ``args.epochs`` epochs and time every iteration through ignite events."""
    import torch
    from ignite.engine import Events

    from covid_monai.bundle import load_config, run_workflow

    parser = load_config(bundle, ["train.json"], overrides(args, cache_rate, num_workers))
    batch_slices = int(parser["batch_size"]) * int(parser["num_samples"])
    start = time.perf_counter()
    trainer = parser.get_parsed_content("train#trainer")  # builds (and fills) the caches of both datasets
    setup_s = time.perf_counter() - start

    marks: dict[str, float] = {}
    rows: list[dict[str, float]] = []
    epoch_marks: list[float] = []

    def mark(name: str):
        def handler(engine: Any) -> None:
            marks[name] = time.perf_counter()
            if name == "done":
                rows.append({
                    "epoch": engine.state.epoch,
                    "data": marks["batch_done"] - marks["batch_start"],
                    "compute": marks["done"] - marks["iter_start"],
                    "step": marks["done"] - marks["batch_start"],
                    "slices": int(engine.state.batch["image"].shape[0]) if isinstance(engine.state.batch, dict)
                    else batch_slices,
                })
        return handler

    trainer.add_event_handler(Events.GET_BATCH_STARTED, mark("batch_start"))
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, mark("batch_done"))
    trainer.add_event_handler(Events.ITERATION_STARTED, mark("iter_start"))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, mark("done"))  # attached last: runs after the others
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epoch_marks.append(time.perf_counter()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epoch_marks.append(time.perf_counter()))

    start = time.perf_counter()
    run_workflow(parser)  # initialize (seed) and run
    run_s = time.perf_counter() - start
    measured = rows[args.warmup:]
    if not measured:
        raise SystemExit(f"only {len(rows)} iterations ran: raise --epochs or --n-train above --warmup")
    step = [r["step"] for r in measured]
    data = [r["data"] for r in measured]
    compute = [r["compute"] for r in measured]
    slices = sum(r["slices"] for r in measured)
    epoch_total = sum(epoch_marks[i + 1] - epoch_marks[i] for i in range(0, len(epoch_marks) - 1, 2))
    return {
        "cache_rate": cache_rate,
        "num_workers": num_workers,
        "setup_s": round(setup_s, 2),
        "run_s": round(run_s, 2),
        "iterations": len(rows),
        "iterations_measured": len(measured),
        "slices_per_iteration": batch_slices,
        "step_s": stats(step),
        "data_wait_s": stats(data),
        "compute_s": stats(compute),
        "slices_per_s": round(slices / sum(step), 3),
        "data_wait_pct": round(100.0 * sum(data) / sum(step), 1),
        "epoch_overhead_s": round(max(epoch_total - sum(r["step"] for r in rows), 0.0) / max(args.epochs, 1), 3),
        "peak_rss_mb_main_process": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def measure_pure(args: argparse.Namespace, bundle: Path) -> dict[str, Any]:
    """Forward + loss + backward + optimiser step of the config's network on random tensors of the same batch."""
    import torch

    from covid_monai.bundle import load_config

    parser = load_config(bundle, ["train.json"], overrides(args, 1.0, 0))
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    network = parser.get_parsed_content("network")
    loss_fn = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    batch = int(parser["batch_size"]) * int(parser["num_samples"])
    height, width = (int(s) for s in parser["patch_size"])
    channels = int(parser.get_parsed_content("in_channels"))
    x = torch.randn(batch, channels, height, width, device=device)
    y = (torch.rand(batch, 1, height, width, device=device) > 0.9).float()
    network.train()
    amp = bool(args.amp) and device.type == "cuda"

    def steps(inputs: torch.Tensor, labels: torch.Tensor, n: int) -> list[float]:
        times = []
        for _ in range(args.warmup + n):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                loss = loss_fn(network(inputs), labels)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return times[args.warmup:]

    measured = steps(x, y, args.pure_iterations)
    result: dict[str, Any] = {
        "batch_slices": batch,
        "patch_size": [height, width],
        "iterations_measured": len(measured),
        "step_s": stats(measured),
        "slices_per_s": round(batch * len(measured) / sum(measured), 3),
        "torch_threads": torch.get_num_threads(),
    }
    if args.meta_iterations > 0:  # the pipeline feeds MetaTensors: the same step with MetaTensor inputs and labels
        from monai.data import MetaTensor

        meta = steps(MetaTensor(x), MetaTensor(y), args.meta_iterations)
        result["metatensor_inputs"] = {
            "iterations_measured": len(meta),
            "step_s": stats(meta),
            "slices_per_s": round(batch * len(meta) / sum(meta), 3),
        }
    return result


# ----------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs per configuration (default 3)")
    p.add_argument("--n-train", type=int, default=4, help="training phantoms (default 4: 2 iterations per epoch)")
    p.add_argument("--n-val", type=int, default=1, help="validation phantoms (built and cached, never run)")
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 64), metavar=("X", "Y", "Z"),
                   help="phantom shape (default 256 256 64; ~350x350 in-plane after resampling to 1 mm)")
    p.add_argument("--cache-rates", type=float, nargs="+", default=(1.0, 0.0), help="default 1.0 0.0")
    p.add_argument("--workers", type=int, nargs="+", default=(0, 2), help="DataLoader num_workers (default 0 2)")
    p.add_argument("--warmup", type=int, default=1, help="iterations skipped before measuring (default 1)")
    p.add_argument("--pure-iterations", type=int, default=4, help="measured pure steps (default 4)")
    p.add_argument("--meta-iterations", type=int, default=2,
                   help="measured pure steps with MetaTensor inputs, as the pipeline feeds them (default 2; 0: skip)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--amp", action="store_true", help="bundle knob amp=true (autocast on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"scratch folder (default {DEFAULT_WORK})")
    p.add_argument("--one", nargs=2, metavar=("CACHE_RATE", "NUM_WORKERS"), help=argparse.SUPPRESS)
    p.add_argument("--pure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    return args


def child(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh process (``--one`` or ``--pure``) and return its JSON."""
    result = args.work / f"result_{'_'.join(extra).replace('.', 'p').replace('-', '')}.json"
    result.unlink(missing_ok=True)
    forwarded = ["--epochs", str(args.epochs), "--warmup", str(args.warmup), "--pure-iterations",
                 str(args.pure_iterations), "--meta-iterations", str(args.meta_iterations), "--device", args.device,
                 "--seed", str(args.seed), "--work", str(args.work)]
    if args.amp:
        forwarded.append("--amp")
    cmd = [sys.executable, str(Path(__file__).resolve()), *forwarded, *extra, "--result", str(result)]
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"measurement {' '.join(extra)} failed (exit code {proc.returncode})")
    return json.loads(result.read_text())


def print_table(doc: dict[str, Any]) -> None:
    pure = doc["pure"]
    print()
    print(f"{doc['machine']['cpu_model']}, {doc['machine']['cpus_usable']} cores, device {doc['settings']['device']}, "
          f"batch {pure['batch_slices']} slices of {pure['patch_size']}, {doc['settings']['n_train']} volumes "
          f"{doc['settings']['shape']}, {doc['settings']['epochs']} epochs")
    print(f"{'pipeline':<22} {'step s':>7} {'data s':>7} {'compute s':>9} {'slices/s':>9} {'data wait %':>11} "
          f"{'overhead %':>10} {'setup s':>8}")
    for row in doc["pipelines"]:
        name = f"cache {row['cache_rate']:g}, workers {row['num_workers']}"
        print(f"{name:<22} {row['step_s']['mean']:>7.2f} {row['data_wait_s']['mean']:>7.2f} "
              f"{row['compute_s']['mean']:>9.2f} {row['slices_per_s']:>9.2f} {row['data_wait_pct']:>11.1f} "
              f"{row['overhead_pct']:>10.1f} {row['setup_s']:>8.1f}")
    print(f"{'pure forward+backward':<22} {pure['step_s']['mean']:>7.2f} {'':>7} {'':>9} {pure['slices_per_s']:>9.2f}")
    if "metatensor_inputs" in pure:
        meta = pure["metatensor_inputs"]
        print(f"{'  same, MetaTensor in':<22} {meta['step_s']['mean']:>7.2f} {'':>7} {'':>9} "
              f"{meta['slices_per_s']:>9.2f}")
    for name, target in doc["targets"].items():
        print(f"target {name}: {target['measured']} (want {target['want']}) -> {'met' if target['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bundle = args.work / "bundle"
    if args.one or args.pure:  # child process: one measurement
        if args.pure:
            result = measure_pure(args, bundle)
        else:
            result = measure_pipeline(args, bundle, float(args.one[0]), int(args.one[1]))
        args.result.write_text(json.dumps(result, indent=2) + "\n")
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in args.shape)
    prepare(args.work, args.n_train, args.n_val, shape, args.seed)
    pipelines = []
    for cache_rate in args.cache_rates:
        for workers in args.workers:
            print(f"pipeline cache_rate {cache_rate:g}, num_workers {workers} ...", flush=True)
            row = child(args, ["--one", str(cache_rate), str(workers)])
            print(f"  {row['slices_per_s']:.2f} slices/s, step {row['step_s']['mean']:.2f} s, data wait "
                  f"{row['data_wait_pct']:.1f} %", flush=True)
            pipelines.append(row)
    print("pure forward+backward ...", flush=True)
    pure = child(args, ["--pure"])
    pure_step = pure["step_s"]["mean"]
    for row in pipelines:
        step = row["step_s"]["mean"]
        row["overhead_pct"] = round(100.0 * (step - pure_step) / step, 1)
        row["compute_beyond_pure_pct"] = round(100.0 * (row["compute_s"]["mean"] - pure_step) / step, 1)
        row["throughput_vs_pure"] = round(row["slices_per_s"] / pure["slices_per_s"], 3)

    import torch

    from covid_monai.bundle import read_knobs

    cached = [r for r in pipelines if r["cache_rate"] >= 1.0]
    best_cached = min(cached, key=lambda r: r["overhead_pct"]) if cached else None
    targets = {}
    if best_cached is not None:
        targets["data_overhead_cached"] = {
            "want": "< 10 %",
            "measured": f"{best_cached['overhead_pct']:.1f} % (cache 1.0, num_workers {best_cached['num_workers']})",
            "met": best_cached["overhead_pct"] < 10.0,
        }
    doc = {
        "benchmark": "bench_train",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            **machine_info(),
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available()
            else None,
        },
        "settings": {
            "device": args.device,
            "amp": bool(args.amp),
            "epochs": args.epochs,
            "n_train": args.n_train,
            "n_val": args.n_val,
            "shape": list(shape),
            "warmup_iterations": args.warmup,
            "bundle_knobs": read_knobs(args.work / "bundle", "train.json"),
            "train_json_sha256": hashlib.sha256((args.work / "bundle/configs/train.json").read_bytes()).hexdigest(),
            "bundle_defaults": "train.json defaults: batch_size 2 volumes x num_samples 8 slices, patch 224x224, "
                               "network_width 32, batch norm, DiceCE loss, Adam",
        },
        "pipelines": pipelines,
        "pure": pure,
        "targets": targets,
        "notes": [
            "step = GET_BATCH_STARTED -> ITERATION_COMPLETED; data = GET_BATCH_STARTED -> GET_BATCH_COMPLETED; "
            "compute = ITERATION_STARTED -> ITERATION_COMPLETED (includes post-processing, metric, stats handlers).",
            "overhead_pct = (step - pure step) / step = data_wait_pct + compute_beyond_pure_pct, where "
            "compute_beyond_pure_pct = (compute - pure step) / step: the trainer's own work around the same "
            "forward/backward (MetaTensor inputs, post-processing, metric and stats handlers).",
            "epoch_overhead_s: per epoch, outside iterations (checkpoint save, LR scheduler, DataLoader restart).",
            "Machines are noisy: compare ratios from the same run.",
        ],
    }
    return write_result(doc, args.out, print_table)


if __name__ == "__main__":
    sys.exit(main())
