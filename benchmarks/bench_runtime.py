#!/usr/bin/env python
"""CPU runtime comparison: the frozen TorchScript network (oneDNN, bf16 where the CPU has it) against ONNX Runtime
and OpenVINO, on the same slices, inside the same pipeline.

For each runtime the bundle's whole inference runs over the demo's held-out phantoms (``BatchSegmenter`` with its
``network`` swapped for the runtime; pre- and post-processing unchanged), so the masks are scored against the
phantoms' labels (``covid_monai.evaluate``) and the time spent in the network calls is measured on exactly the
slices the pipeline feeds it. The runtimes take turns, scan by scan set by set, ``--repeats`` times; medians.

- ``torchscript``: what ``covid-monai infer`` runs (``covid_monai.inferers.load_inference_network``: batch norm
  folded, traced, frozen, oneDNN fusion, channels-last; bf16 autocast baked in when ``amp`` and the CPU has
  AMX);
- ``onnxruntime``: the eval-mode network exported to ONNX (opset 17, dynamic batch and in-plane size), CPU
  execution provider, graph optimisations on, fp32 (ONNX Runtime has no bf16 CPU kernels for these operators);
- ``openvino``: what ``covid-monai infer --runtime openvino`` runs (``covid_monai.runtimes.OpenVINONetwork``: the
  PyTorch network converted by OpenVINO, compiled for the CPU, bf16 when ``amp`` and the CPU has it).

OpenVINO is the project's optional extra (``pip install covid-monai[openvino]``); ONNX Runtime is not a project
dependency (``pip install onnx onnxscript onnxruntime`` into the environment that runs this script). A runtime that
cannot be imported is skipped and recorded as such. Besides the Dice against the labels (when ``DATA/labels``
exists), each runtime's masks are compared with TorchScript's (``agreement``, Dice between the two masks).

Example:
    .venv/bin/python benchmarks/bench_runtime.py --bundle demo_output/bundle --data demo_output/data/test
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import machine_info, write_result  # noqa: E402 - benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_runtime.json"


class TimedNetwork(torch.nn.Module):
    """Wraps a callable ``f(tensor) -> tensor`` as the pipeline's network and adds up the seconds spent in it."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.run = run
        self.seconds = 0.0
        self.calls = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.run(inputs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def eager_network(bundle: Path) -> torch.nn.Module:
    """The bundle's network with its trained weights, eval mode, fp32 (the export source)."""
    from covid_monai.bundle import load_config
    from covid_monai.networks import load_initial_weights

    parser = load_config(bundle, ["inference.json"], {"device": "$torch.device('cpu')"})
    return load_initial_weights(parser.get_parsed_content("network_def"), bundle / "models" / "model.pt").eval()


def export_onnx(network: torch.nn.Module, path: Path) -> Path:
    """Export to ONNX with a dynamic batch and in-plane size (``torch.onnx.export``)."""
    in_channels = next(p for p in network.parameters() if p.dim() == 4).shape[1]
    example = torch.zeros(2, in_channels, 128, 128)
    batch, height, width = (torch.export.Dim(n, min=1, max=4096) for n in ("batch", "height", "width"))
    torch.onnx.export(network, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_shapes={"x": {0: batch, 2: 16 * height, 3: 16 * width}}, opset_version=17, dynamo=True)
    return path


def onnxruntime_runner(onnx_path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime CPU session as ``f(tensor) -> tensor`` (threads: PyTorch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run(inputs: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {"image": inputs.float().contiguous().numpy()})
        return torch.from_numpy(out)

    return run


def mask_agreement(folder: Path, reference: Path) -> float:
    """Mean Dice between the masks in ``folder`` and the same cases' masks in ``reference`` (1.0 when identical)."""
    import nibabel as nib

    from covid_monai.evaluate import compute_case_metrics

    scores = [compute_case_metrics(np.asarray(nib.load(str(folder / path.name)).dataobj),
                                   np.asarray(nib.load(str(path)).dataobj))["dice"]
              for path in sorted(reference.glob("*_infection.nii.gz"))]
    return float(np.mean(scores))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="a trained bundle (e.g. demo_output/bundle)")
    p.add_argument("--data", type=Path, required=True, help="phantoms with images/ and labels/ (demo_output/data/test)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the phantoms per runtime (default 3)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "covid_monai_bench_runtime")
    return p.parse_args(argv)


def print_table(result: dict[str, Any]) -> None:
    """One row per runtime: network seconds (median pass), speed-up over TorchScript, Dice."""
    print(f"\n{'runtime':<13} {'network s':>10} {'x torchscript':>14} {'Dice':>7} {'agreement':>10} {'precision':>10}")
    for name, row in result["summary"].items():
        dice = f"{row['dice_mean']:.4f}" if "dice_mean" in row else "-"
        print(f"{name:<13} {row['network_s_median']:>10.2f} {row['speedup_over_torchscript']:>14.2f} {dice:>7} "
              f"{row['agreement_with_torchscript']:>10.4f} {row['precision']:>10}")
    print(result["verdict"])


def main(argv: list[str] | None = None) -> int:
    from covid_monai.errors import one_line
    from covid_monai.evaluate import evaluate_folders
    from covid_monai.inference import BatchSegmenter, discover_cases
    from covid_monai.inferers import autocast_dtype

    args = parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    segmenter = BatchSegmenter(args.bundle, device="cpu", num_workers=0)
    amp = bool(segmenter.parser.get_parsed_content("amp"))
    networks: dict[str, TimedNetwork] = {"torchscript": TimedNetwork(segmenter.network)}
    skipped: dict[str, str] = {}
    try:
        onnx_path = export_onnx(eager_network(args.bundle), work / "network.onnx")
        networks["onnxruntime"] = TimedNetwork(onnxruntime_runner(onnx_path))
    except Exception as exc:  # noqa: BLE001 - recorded: the comparison goes on without it
        skipped["onnxruntime"] = one_line(exc)
    precision = {"torchscript": "bf16" if amp and autocast_dtype("cpu") is not None else "fp32",
                 "onnxruntime": "fp32"}
    try:  # what `covid-monai infer --runtime openvino` builds from the bundle's inference.json
        openvino = BatchSegmenter(args.bundle, device="cpu", overrides={"runtime": "openvino"}, num_workers=0).network
        networks["openvino"], precision["openvino"] = TimedNetwork(openvino), openvino.precision
    except ImportError as exc:
        skipped["openvino"] = one_line(exc)
    cases, _ = discover_cases([args.data / "images"])
    passes: dict[str, list[float]] = {name: [] for name in networks}
    dice: dict[str, float] = {}
    agreement: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name, network in networks.items():
            network.seconds, network.calls = 0.0, 0
            segmenter.network = network
            out = work / name
            results = segmenter.run(cases, out, overwrite=True, progress=False)
            failed = [r for r in results if r.status != "ok"]
            if failed:
                raise SystemExit(f"{name}: {failed[0].case} failed: {failed[0].error}")
            passes[name].append(round(network.seconds, 3))
            print(f"[{repeat + 1}/{args.repeats}] {name}: network {network.seconds:.2f} s in {network.calls} calls",
                  flush=True)
            if repeat == 0:
                agreement[name] = mask_agreement(out, work / "torchscript")
                if (args.data / "labels").is_dir():
                    _, summary = evaluate_folders(out, args.data / "labels", out)
                    dice[name] = float(summary["mean"]["dice"])
    base = statistics.median(passes["torchscript"])
    summary = {}
    for name, seconds in passes.items():
        row: dict[str, Any] = {"network_s_median": statistics.median(seconds), "network_s_passes": seconds,
                               "speedup_over_torchscript": round(base / statistics.median(seconds), 3),
                               "agreement_with_torchscript": round(agreement[name], 4), "precision": precision[name]}
        if dice:
            row["dice_mean"] = round(dice[name], 4)
            row["dice_minus_torchscript"] = round(dice[name] - dice["torchscript"], 4)
        summary[name] = row
    same = {n: abs(s.get("dice_minus_torchscript", 1 - s["agreement_with_torchscript"])) <= 0.005
            for n, s in summary.items()}
    adopt = [n for n, s in summary.items() if n != "torchscript" and s["speedup_over_torchscript"] >= 1.3 and same[n]]
    verdict = (f"{', '.join(adopt)}: >= 1.3x faster than TorchScript with the same Dice (within 0.005)" if adopt else
               "no runtime is >= 1.3x faster than TorchScript with the same Dice")
    result = {
        "benchmark": "bench_runtime",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": _versions(),
        "settings": {"bundle": str(args.bundle.resolve()), "data": str(args.data.resolve()), "cases": len(cases),
                     "repeats": args.repeats, "amp": amp, "skipped": skipped},
        "summary": summary,
        "verdict": verdict,
        "notes": [
            "network_s: seconds inside the network calls of one pass over the phantoms (the pipeline's slices, "
            "slice_batch_size at a time); pre- and post-processing are the same for every runtime and not counted.",
            "Dice: mean over the phantoms of the written masks against the labels (first pass); agreement: mean "
            "Dice between the runtime's masks and TorchScript's.",
        ],
    }
    return write_result(result, args.out, print_table)


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    versions: dict[str, str | None] = {}
    for package in ("torch", "onnx", "onnxruntime", "openvino"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


if __name__ == "__main__":
    sys.exit(main())
