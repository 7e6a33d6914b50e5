#!/usr/bin/env python
"""End-to-end inference benchmark: ``covid-monai infer`` against lungmask and the read+write floor, same scan.

What runs, each as a fresh child process timed for wall time, CPU time and peak RSS (``os.wait4``):

- **floor**: a Python process that imports nibabel, reads the input NIfTI into memory and writes a uint8 mask of the
  same size (a body threshold, so it compresses like a real mask) as gzip NIfTI: the least any tool must do;
- **ours**: ``covid-monai infer FILE -o OUT --bundle B --device D --quiet --overwrite`` with the bundle's default
  network and knobs and random weights (timing does not depend on the weights' values);
- **lungmask**: ``python -m lungmask FILE OUT.nii.gz --modelpath R231.pth --noprogress`` (its default R231
  architecture, random weights saved in the state-dict format its ``--modelpath`` loader reads), from a separate
  Python environment (``--peer-python``).

Runs alternate (floor, ours, lungmask, floor, ours, lungmask, ...) so that drift of a noisy machine hits every tool
alike; the summary gives medians, and ratios are computed from the medians and pair by pair.

The input is a synthetic chest CT phantom (``covid_monai.phantom.make_phantom``), default 512x512x300 voxels of
0.7x0.7x1.0 mm, int16 HU, gzip NIfTI, cached in the work folder.

Example:
    .venv/bin/python benchmarks/bench_infer.py --repeats 2 --peer-python /tmp/peer-venv/bin/python
    .venv/bin/python benchmarks/bench_infer.py --device cuda --amp --skip-peer   # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import machine_info as common_machine_info  # noqa: E402 - benchmarks/ is on sys.path when run as a script
from _common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_infer.json"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "covid_monai_bench"

# Run in a fresh interpreter by the floor measurement: read the scan, write a same-size uint8 mask (gzip NIfTI).
FLOOR_SCRIPT = """
import sys
import nibabel as nib
import numpy as np
image = nib.load(sys.argv[1])
data = np.asarray(image.dataobj)
mask = (data > -500).astype(np.uint8)
out = nib.Nifti1Image(mask, image.affine, header=image.header)
out.set_data_dtype(np.uint8)
out.header.set_slope_inter(1.0, 0.0)
nib.save(out, sys.argv[2])
"""

# Run in the peer's Python: save randomly initialised R231 weights the way lungmask's --modelpath loader expects
# (lungmask.mask.get_model: torch.load of a plain state dict, n_classes from the last tensor, UNet(depth=5, ...)).
PEER_MODEL_SCRIPT = """
import sys
import torch
from lungmask.resunet import UNet
torch.manual_seed(0)
model = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
torch.save(model.state_dict(), sys.argv[1])
"""

GPU_INFO_SCRIPT = """
import json, sys, torch
props = torch.cuda.get_device_properties(torch.device(sys.argv[1]).index or 0)
print(json.dumps({"name": props.name, "memory_gb": round(props.total_memory / 1024**3, 1),
                  "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                  "bf16_supported": torch.cuda.is_bf16_supported()}))
"""

PEER_INFO_SCRIPT = """
import importlib.metadata, json, torch
print(json.dumps({"lungmask": importlib.metadata.version("lungmask"), "torch": torch.__version__,
                  "torch_threads": torch.get_num_threads()}))
"""


# ----------------------------------------------------------------------------------------------------------------------
# helpers


# Run in a fresh, small interpreter that starts the measured command and reports its resource usage. A child forked
# straight from this (large) benchmark process would inherit this process's RSS in its ru_maxrss on Linux (the
# pre-exec memory counts), so the measured command is a grandchild forked from this launcher, whose RSS is tiny.
LAUNCHER_SCRIPT = """
import json, os, subprocess, sys, time
result, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(log, "wb") as sink:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
proc.returncode = os.waitstatus_to_exitcode(status)
with open(result, "w") as f:
    json.dump({"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
               "maxrss_kb": usage.ru_maxrss, "rc": proc.returncode}, f)
"""


def run_timed(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process; return wall time, user/system CPU time, peak RSS and the exit code.

    A small launcher interpreter starts the command and reads its resource usage with ``os.wait4``, so each run is
    measured on its own and its peak RSS does not include this benchmark process. The peak RSS is that of the
    command's largest single process (``ru_maxrss``: the command or a descendant it waited for), in MB.

    Args:
        cmd: the command and its arguments.
        log: file receiving the command's stdout and stderr.

    Returns:
        ``{"wall_s", "user_s", "sys_s", "peak_rss_mb", "rc"}``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".rusage.json")
    result.unlink(missing_ok=True)
    launcher = subprocess.run([sys.executable, "-S", "-c", LAUNCHER_SCRIPT, str(result), str(log), *cmd])
    if not result.is_file():
        raise SystemExit(f"launcher failed (exit code {launcher.returncode}) running {cmd[0]}")
    usage = json.loads(result.read_text())
    return {
        "wall_s": round(usage["wall_s"], 3),
        "user_s": round(usage["user_s"], 3),
        "sys_s": round(usage["sys_s"], 3),
        "peak_rss_mb": round(usage["maxrss_kb"] / 1024.0, 1),
        "rc": usage["rc"],
    }


def tail(path: Path, n: int = 15) -> str:
    """The last ``n`` lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def machine_info(device: str) -> dict[str, Any]:
    """The shared machine facts (``_common.machine_info``) plus the GPU when ``device`` is CUDA."""
    import torch

    info = common_machine_info()
    if device.startswith("cuda") and torch.cuda.is_available():  # asked in a child: no CUDA context kept here
        probe = subprocess.run([sys.executable, "-c", GPU_INFO_SCRIPT, device], capture_output=True, text=True)
        info["gpu"] = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else probe.stderr
    return info


def make_input(work: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> Path:
    """The phantom scan (int16 HU, gzip NIfTI) in ``work``, generated once and reused while its shape matches."""
    import nibabel as nib

    from covid_monai.phantom import make_phantom, save_nifti

    path = work / f"phantom_{'x'.join(map(str, shape))}_{'x'.join(f'{s:g}' for s in spacing)}_seed{seed}.nii.gz"
    if path.is_file():
        try:
            if tuple(nib.load(str(path)).shape) == shape:
                return path
        except Exception:  # noqa: BLE001 - unreadable leftover: regenerate
            pass
    print(f"making phantom {shape} at {spacing} mm -> {path}", flush=True)
    phantom = make_phantom(shape, spacing=spacing, seed=seed)
    save_nifti(phantom.image, phantom.affine, path)
    return path


def make_bundle(work: Path, amp: bool | None = None) -> Path:
    """A bundle: the template's knobs (``amp`` set unless None) and random weights in ``models/model.pt``."""
    import torch

    from covid_monai.bundle import create_bundle, load_config

    name = "bundle" if amp is None else f"bundle_amp_{'on' if amp else 'off'}"
    bundle = create_bundle(work / name, None if amp is None else {"amp": bool(amp)})
    torch.manual_seed(0)
    network = load_config(bundle, ["inference.json"], {"device": "cpu"}).get_parsed_content("network_def")
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def find_peer_python(given: str | None) -> str:
    """The Python with lungmask: ``--peer-python``, else ``$LUNGMASK_PYTHON``, else this interpreter if it has it."""
    for candidate in (given, os.environ.get("LUNGMASK_PYTHON")):
        if candidate:
            return candidate
    probe = subprocess.run([sys.executable, "-c", "import lungmask"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable
    raise SystemExit(
        "lungmask not found: pass --peer-python PATH (a Python with lungmask installed, see benchmarks/README.md) "
        "or --skip-peer"
    )


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (identifies the exact bundle config a result was measured with)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_sha256(folder: Path) -> str:
    """SHA-256 over the ``*.py`` files of a folder, names and contents (identifies the package code measured)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def find_ours(given: str | None) -> list[str]:
    """The covid-monai command: ``--covid-monai``, else the script beside this Python or on PATH, else ``-m``."""
    if given:
        return shlex.split(given)
    for candidate in (Path(sys.executable).with_name("covid-monai"), shutil.which("covid-monai")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    probe = subprocess.run([sys.executable, "-c", "import covid_monai.cli"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "covid_monai"]
    raise SystemExit("covid-monai not found: install the project (pip install --no-deps -e .) or pass --covid-monai")


def check_mask(path: Path, shape: tuple[int, ...]) -> dict[str, Any]:
    """Shape, dtype and foreground fraction of an output mask (checked outside the timed runs)."""
    import nibabel as nib
    import numpy as np

    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    return {
        "shape": list(data.shape),
        "dtype": str(data.dtype),
        "shape_ok": tuple(data.shape) == tuple(shape),
        "foreground_fraction": round(float(np.count_nonzero(data)) / max(data.size, 1), 4),
        "labels": sorted(int(v) for v in np.unique(data)),
    }


def summarise(runs: list[dict[str, Any]], slices: int) -> dict[str, Any]:
    """Median / min / max wall time, slices per second at the median, max peak RSS, median CPU time.

    ``slices`` is the number of slices one run processes (the batch's, for a batch).
    """
    walls = [r["wall_s"] for r in runs]
    median = statistics.median(walls)
    summary = {
        "runs": len(runs),
        "wall_s_median": round(median, 3),
        "wall_s_min": round(min(walls), 3),
        "wall_s_max": round(max(walls), 3),
        "slices_per_s": round(slices / median, 3) if median > 0 else None,
        "cpu_s_median": round(statistics.median(r["user_s"] + r["sys_s"] for r in runs), 3),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }
    steady = [r["steady_state_s_per_scan"] for r in runs if r.get("steady_state_s_per_scan") is not None]
    if steady:
        summary["steady_state_s_per_scan_median"] = round(statistics.median(steady), 3)
    return summary


def steady_state_per_scan(out_dir: Path) -> float | None:
    """Median seconds per scan after the first, from a batch run's ``summary.json`` (``None`` for one scan).

    ``covid-monai infer`` records for each case the time since the previous case finished; from the second case on
    that is the steady state of the batch (the next scan read while the network works), without start-up and model
    load, which the first case carries.
    """
    document = json.loads((out_dir / "summary.json").read_text())
    seconds = [row["seconds"] for row in document["cases"][1:] if row.get("seconds") is not None]
    return round(statistics.median(seconds), 3) if seconds else None


def run_tool(name: str, commands: list[list[str]], log_dir: Path, repeat: int) -> dict[str, Any]:
    """Run one tool's commands in sequence (one per scan, or one for the batch), each timed on its own.

    Returns one run: wall, user and system times summed over the commands, the largest peak RSS, the exit code of
    the first command that failed (else 0) and each command's wall time.
    """
    parts = []
    for index, cmd in enumerate(commands):
        parts.append(run_timed(cmd, log_dir / f"{name}_{repeat}_{index}.log"))
        if parts[-1]["rc"] != 0:
            break
    return {
        "wall_s": round(sum(p["wall_s"] for p in parts), 3),
        "user_s": round(sum(p["user_s"] for p in parts), 3),
        "sys_s": round(sum(p["sys_s"] for p in parts), 3),
        "peak_rss_mb": max(p["peak_rss_mb"] for p in parts),
        "rc": next((p["rc"] for p in parts if p["rc"] != 0), 0),
        "wall_s_per_command": [p["wall_s"] for p in parts],
        "failed_log": str(log_dir / f"{name}_{repeat}_{len(parts) - 1}.log") if parts[-1]["rc"] != 0 else None,
    }


def speed_targets(slices: int, batch: int) -> dict[str, float]:
    """The CPU targets for a scan size and batch: minimum lungmask / ours and maximum ours / floor (issues 5, 19)."""
    if batch > 1:
        return {"lungmask_over_ours": 15.0, "ours_over_floor": 8.0}
    return {"lungmask_over_ours": 12.0 if slices >= 300 else 10.0, "ours_over_floor": 5.0}


def print_table(result: dict[str, Any]) -> None:
    """The short table: one row per tool, then the ratios and the targets."""
    summary = result["summary"]
    ours = summary["ours"]["wall_s_median"]
    batch = result["input"]["batch"]
    print()
    print(f"input {batch} x {result['input']['shape']} @ {result['input']['spacing']} mm, device "
          f"{result['settings']['device']} (bundle amp={result['settings']['amp_knob']}), "
          f"{result['machine']['cpu_model']}, {result['machine']['cpus_usable']} cores, torch threads "
          f"{result['machine']['torch_threads']}")
    print(f"{'tool':<13} {'wall s (median)':>16} {'min..max':>16} {'per scan s':>10} {'steady s':>9} {'slices/s':>9} "
          f"{'CPU s':>8} {'peak RSS MB':>12} {'x ours':>7}")
    for name in TOOLS:
        if name not in summary:
            continue
        s = summary[name]
        steady = s.get("steady_state_s_per_scan_median")
        print(f"{name:<13} {s['wall_s_median']:>16.1f} {s['wall_s_min']:>7.1f}..{s['wall_s_max']:<8.1f} "
              f"{s['wall_s_median'] / batch:>10.2f} {'' if steady is None else f'{steady:.2f}':>9} "
              f"{s['slices_per_s']:>9.2f} {s['cpu_s_median']:>8.1f} {s['peak_rss_mb']:>12.0f} "
              f"{s['wall_s_median'] / ours:>7.2f}")
    for name, target in result["targets"].items():
        verdict = "met" if target["met"] else "NOT met"
        print(f"target {name}: {target['measured']} (want {target['want']}) -> {verdict}")


# ----------------------------------------------------------------------------------------------------------------------
# main

TOOLS = ("floor", "ours", "ours_openvino", "ours_trained", "lungmask")
"""The tools in the order each repeat runs them."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each tool (default 2)")
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"),
                   help="phantom shape (default 512 512 300)")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0), metavar=("SX", "SY", "SZ"),
                   help="phantom voxel size in mm (default 0.7 0.7 1.0)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0; a batch uses seed, seed+1, ...)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="N scans: one covid-monai call for all N against N lungmask calls and N floors (default 1)")
    p.add_argument("--trained-bundle", type=Path, metavar="DIR",
                   help="also time this trained bundle as is (e.g. demo_output/bundle) as the tool ours_trained")
    p.add_argument("--openvino", action="store_true",
                   help="also time the same bundle with --runtime openvino, as the tool ours_openvino")
    p.add_argument("--device", default="cpu", help="covid-monai --device: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="set the bundle knob amp to true / false (default: the bundle template's value)")
    p.add_argument("--out", type=Path,
                   help=f"result JSON (default {DEFAULT_OUT}, or bench_infer_<Z>slices_batch<N>.json beside it)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                   help=f"scratch folder for the phantom, bundle and outputs (default {DEFAULT_WORK})")
    p.add_argument("--skip-peer", action="store_true", help="do not run lungmask")
    p.add_argument("--skip-floor", action="store_true", help="do not measure the read+write floor")
    p.add_argument("--peer-python", help="Python with lungmask installed (default $LUNGMASK_PYTHON, else this one)")
    p.add_argument("--covid-monai", dest="covid_monai",
                   help="the covid-monai command line (default: beside this Python, on PATH, or python -m covid_monai)")
    return p.parse_args(argv)


def default_out(shape: tuple[int, int, int], batch: int) -> Path:
    """``results/bench_infer.json`` for one 512x512x300 scan (the reference case), else a name with size and batch."""
    if batch == 1 and tuple(shape) == (512, 512, 300):
        return DEFAULT_OUT
    return DEFAULT_OUT.with_name(f"bench_infer_{shape[2]}slices_batch{batch}.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.batch < 1:
        raise SystemExit("--batch must be >= 1")
    if args.trained_bundle is not None and not (args.trained_bundle / "models" / "model.pt").is_file():
        raise SystemExit(f"--trained-bundle {args.trained_bundle}: no trained weights at models/model.pt")
    shape = tuple(int(s) for s in args.shape)
    spacing = tuple(float(s) for s in args.spacing)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ours_cli = find_ours(args.covid_monai)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")

    machine = machine_info(args.device)
    scans = [make_input(work, shape, spacing, args.seed + i) for i in range(args.batch)]
    bundle = make_bundle(work, args.amp)
    out_dirs = {"ours": work / "out_ours"}
    floor_masks = [work / f"floor_mask_{i}.nii.gz" for i in range(args.batch)]
    peer_masks = [work / f"lungmask_mask_{i}.nii.gz" for i in range(args.batch)]
    commands: dict[str, list[list[str]]] = {
        "floor": [[sys.executable, "-c", FLOOR_SCRIPT, str(scan), str(mask)]
                  for scan, mask in zip(scans, floor_masks, strict=True)],
        "ours": [[*ours_cli, "infer", *map(str, scans), "-o", str(out_dirs["ours"]), "--bundle", str(bundle),
                  "--device", args.device, "--quiet", "--overwrite"]],
    }
    if args.openvino:
        out_dirs["ours_openvino"] = work / "out_ours_openvino"
        commands["ours_openvino"] = [[*ours_cli, "infer", *map(str, scans), "-o", str(out_dirs["ours_openvino"]),
                                      "--bundle", str(bundle), "--device", args.device, "--quiet", "--overwrite",
                                      "--runtime", "openvino"]]
    if args.trained_bundle is not None:
        out_dirs["ours_trained"] = work / "out_ours_trained"
        commands["ours_trained"] = [[*ours_cli, "infer", *map(str, scans), "-o", str(out_dirs["ours_trained"]),
                                     "--bundle", str(args.trained_bundle.resolve()), "--device", args.device,
                                     "--quiet", "--overwrite"]]
    peer_info: dict[str, Any] = {}
    if not args.skip_peer:
        peer_python = find_peer_python(args.peer_python)
        model_path = work / "lungmask_r231_random.pth"
        subprocess.run([peer_python, "-c", PEER_MODEL_SCRIPT, str(model_path)], check=True)
        peer_info = json.loads(subprocess.run([peer_python, "-c", PEER_INFO_SCRIPT], check=True, capture_output=True,
                                              text=True).stdout.strip().splitlines()[-1])
        peer_info["python"] = peer_python
        commands["lungmask"] = [[peer_python, "-m", "lungmask", str(scan), str(mask), "--modelpath", str(model_path),
                                 "--noprogress"] for scan, mask in zip(scans, peer_masks, strict=True)]
        if not args.device.startswith("cuda"):
            peer_info["note"] = "no --cpu flag: on a machine without GPU lungmask runs on the CPU with batch size 20"
    order = [name for name in TOOLS if name in commands and not (name == "floor" and args.skip_floor)]

    for scan in scans:  # warm the page cache so the first timed run does not pay the disk read alone
        with open(scan, "rb") as f:
            while f.read(1 << 24):
                pass
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for name in order:
            print(f"[{repeat + 1}/{args.repeats}] {name} ...", end=" ", flush=True)
            load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
            run = run_tool(name, commands[name], work / "logs", repeat)
            run.update(tool=name, repeat=repeat, load_avg_1m_before=load)
            if run["rc"] != 0:
                raise SystemExit(f"{name} failed with exit code {run['rc']}; log {run['failed_log']}:\n"
                                 f"{tail(Path(run['failed_log']))}")
            if name in out_dirs and args.batch > 1:
                run["steady_state_s_per_scan"] = steady_state_per_scan(out_dirs[name])
            runs.append(run)
            print(f"{run['wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)

    masks_of = {
        "floor": floor_masks,
        "lungmask": peer_masks,
        **{name: [folder / f"{scan.name[: -len('.nii.gz')]}_infection.nii.gz" for scan in scans]
           for name, folder in out_dirs.items()},
    }
    checks = {name: [check_mask(mask, shape) for mask in masks_of[name]] for name in order}
    for name, scan_checks in checks.items():
        for check in scan_checks:
            if not check["shape_ok"]:
                raise SystemExit(f"{name}: output mask has shape {check['shape']}, the input {list(shape)}")

    slices = shape[2] * args.batch
    summary = {name: summarise([r for r in runs if r["tool"] == name], slices) for name in order}
    on_gpu = args.device.startswith("cuda")
    want = speed_targets(shape[2], args.batch)
    ratios: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for tool in [t for t in ("ours", "ours_openvino", "ours_trained") if t in summary]:
        ours = summary[tool]["wall_s_median"]
        suffix = tool[len("ours"):]
        if "lungmask" in summary:
            pairs = [round(p["wall_s"] / o["wall_s"], 3) for o, p in zip(
                [r for r in runs if r["tool"] == tool], [r for r in runs if r["tool"] == "lungmask"], strict=True)]
            ratio = round(summary["lungmask"]["wall_s_median"] / ours, 3)
            ratios[f"lungmask_over_{tool}"] = ratio
            ratios[f"lungmask_over_{tool}_per_repeat"] = pairs
            ratios[f"lungmask_over_{tool}_cpu_time"] = round(
                summary["lungmask"]["cpu_s_median"] / summary[tool]["cpu_s_median"], 3)
            ratios[f"peak_rss_{tool}_over_lungmask"] = round(
                summary[tool]["peak_rss_mb"] / summary["lungmask"]["peak_rss_mb"], 3)
            if not on_gpu:
                floor_want = want["lungmask_over_ours"]
                targets[f"speed_vs_lungmask{suffix}"] = {"want": f">= {floor_want:g}x", "measured": f"{ratio:.2f}x",
                                                         "met": ratio >= floor_want}
        if "floor" in summary:
            ratio = round(ours / summary["floor"]["wall_s_median"], 3)
            ratios[f"{tool}_over_floor"] = ratio
            limit = 2.0 if on_gpu else want["ours_over_floor"]
            targets[f"vs_read_write_floor{suffix}"] = {"want": f"<= {limit:g}x", "measured": f"{ratio:.2f}x",
                                                       "met": ratio <= limit}
        targets[f"peak_rss{suffix}"] = {"want": "< 3 GB", "measured": f"{summary[tool]['peak_rss_mb'] / 1024:.2f} GB",
                                        "met": summary[tool]["peak_rss_mb"] < 3 * 1024}

    from covid_monai.bundle import read_knobs

    knobs = read_knobs(bundle)
    weights = "random (torch.manual_seed(0)) for both networks (ours, lungmask)"
    if args.openvino:
        weights += "; ours_openvino: the same random weights, --runtime openvino"
    if args.trained_bundle is not None:
        weights += f"; ours_trained: the trained bundle {args.trained_bundle.resolve()} as is"
    result = {
        "benchmark": "bench_infer",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "peer": peer_info,
        "input": {
            "paths": [str(scan) for scan in scans],
            "batch": args.batch,
            "shape": list(shape),
            "spacing": list(spacing),
            "dtype": "int16",
            "slices": shape[2],
            "size_mb": round(sum(scan.stat().st_size for scan in scans) / 1024**2 / args.batch, 1),
            "seeds": [args.seed + i for i in range(args.batch)],
        },
        "settings": {
            "repeats": args.repeats,
            "device": args.device,
            "amp_knob": knobs.get("amp"),
            "order": order,
            "weights": weights,
            "bundle_knobs": knobs,
            "trained_bundle_knobs": read_knobs(args.trained_bundle) if args.trained_bundle is not None else None,
            "inference_json_sha256": file_sha256(bundle / "configs" / "inference.json"),
            "covid_monai_sha256": tree_sha256(REPO / "covid_monai"),
        },
        "commands": {name: [cmd if name != "floor" else [cmd[0], "-c", "<FLOOR_SCRIPT>", *cmd[3:]] for cmd in cmds]
                     for name, cmds in commands.items()},
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
        "targets": targets,
        "outputs": checks,
        "notes": [
            "wall_s of floor and lungmask: the sum over their N calls (one per scan); ours: one call for all N scans.",
            "steady_state_s_per_scan: the median time per scan from the second scan of the batch on (summary.json's "
            "seconds), i.e. without start-up and model load.",
            "cpu_s: user + system CPU time of the run; under contention from other jobs it varies less than wall "
            "time, so lungmask_over_ours_cpu_time is a cross-check of the wall-time ratio.",
            "load_avg_1m_before: the machine's 1-minute load average when the run started (other jobs add noise).",
            "peak_rss_mb: ru_maxrss of the child process tree's largest single process (os.wait4).",
            "Random weights: the networks' outputs are meaningless and call much of the body infection, which makes "
            "post-processing more expensive than on a real model; ours_trained times a trained model "
            "(see outputs.*.foreground_fraction).",
            "Machines are noisy: compare ratios from the same run, not absolute times across runs.",
        ],
    }
    return write_result(result, args.out or default_out(shape, args.batch), print_table)


if __name__ == "__main__":
    sys.exit(main())
