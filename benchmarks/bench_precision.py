#!/usr/bin/env python
"""Precision benchmark: the bundle's U-Net in fp32 and in bf16 autocast on this CPU, side by side.

The evidence for which CPUs run bf16 (:func:`covid_monai.inferers.cpu_bf16_supported`). Two workloads, each timed
in fp32 and in bf16 autocast, alternating, ``--repeats`` rounds of ``--calls`` calls each, medians per call:

- **training step**: the demo's network (width 16, 3 input channels for one neighbouring slice each side) on 16
  patches of 128x128: forward, loss, backward, Adam step;
- **inference call**: the template's network (width 32, one channel), eval mode, 2 slices of 352x320 under
  ``torch.inference_mode`` (the CPU slice batch of ``covid-monai infer``), eager (not frozen).

Channels-last tensors as in the pipeline. The ratio ``fp32 / bf16`` above 1 means bf16 is faster.

Example:
    .venv/bin/python benchmarks/bench_precision.py --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import machine_info, write_result  # noqa: E402 - benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_precision.json"


def _training_step(dtype: Any) -> Callable[[], None]:
    import torch

    from covid_monai.networks import seed_unet

    torch.manual_seed(0)
    network = seed_unet(in_channels=3, width=16).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    x = torch.randn(16, 3, 128, 128).to(memory_format=torch.channels_last)
    y = (torch.rand(16, 1, 128, 128) > 0.8).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(network(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def _inference_call(dtype: Any) -> Callable[[], None]:
    import torch

    from covid_monai.networks import seed_unet

    torch.manual_seed(0)
    network = seed_unet(width=32).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 352, 320).to(memory_format=torch.channels_last)

    def call() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            network(x)

    return call


def time_calls(fn: Callable[[], None], calls: int) -> float:
    """Median seconds of one call of ``fn`` over ``calls`` calls, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of each precision (default 3)")
    p.add_argument("--calls", type=int, default=5, help="timed calls per round (default 5)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def print_table(result: dict[str, Any]) -> None:
    """Per workload: fp32 and bf16 medians and their ratio."""
    print(f"\nCPU bf16 features: {result['machine']['cpu_bf16']}; bf16 chosen: {result['bf16_chosen']}")
    print(f"{'workload':<16} {'fp32 s':>8} {'bf16 s':>8} {'fp32/bf16':>10}")
    for name, row in result["summary"].items():
        print(f"{name:<16} {row['fp32_s']:>8.3f} {row['bf16_s']:>8.3f} {row['fp32_over_bf16']:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from covid_monai.inferers import autocast_dtype

    workloads = {"training_step": _training_step, "inference_call": _inference_call}
    runs: dict[str, dict[str, list[float]]] = {name: {"fp32": [], "bf16": []} for name in workloads}
    for _ in range(args.repeats):  # alternate, so drift of a noisy machine hits both alike
        for name, make in workloads.items():
            for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                runs[name][precision].append(round(time_calls(make(dtype), args.calls), 4))
    summary = {}
    for name, times in runs.items():
        fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        summary[name] = {"fp32_s": round(fp32, 4), "bf16_s": round(bf16, 4), "fp32_over_bf16": round(fp32 / bf16, 3)}
    result = {
        "benchmark": "bench_precision",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {"repeats": args.repeats, "calls": args.calls},
        "bf16_chosen": autocast_dtype("cpu") is not None,
        "runs_s": runs,
        "summary": summary,
        "notes": ["Median seconds per call; fp32_over_bf16 > 1: bf16 is faster on this CPU."],
    }
    return write_result(result, args.out, print_table)


if __name__ == "__main__":
    sys.exit(main())
