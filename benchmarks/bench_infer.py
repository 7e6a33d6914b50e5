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
    """Median / min / max wall time, slices per second at the median, max peak RSS, median CPU time."""
    walls = [r["wall_s"] for r in runs]
    median = statistics.median(walls)
    return {
        "runs": len(runs),
        "wall_s_median": round(median, 3),
        "wall_s_min": round(min(walls), 3),
        "wall_s_max": round(max(walls), 3),
        "slices_per_s": round(slices / median, 3) if median > 0 else None,
        "cpu_s_median": round(statistics.median(r["user_s"] + r["sys_s"] for r in runs), 3),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def print_table(result: dict[str, Any]) -> None:
    """The short table: one row per tool, then the ratios and the targets."""
    summary = result["summary"]
    ours = summary["ours"]["wall_s_median"]
    print()
    print(f"input {result['input']['shape']} @ {result['input']['spacing']} mm, device {result['settings']['device']}"
          f" (bundle amp={result['settings']['amp_knob']}), {result['machine']['cpu_model']}, "
          f"{result['machine']['cpus_usable']} cores, torch threads {result['machine']['torch_threads']}")
    print(f"{'tool':<12} {'wall s (median)':>16} {'min..max':>16} {'slices/s':>9} {'CPU s':>8} {'peak RSS MB':>12} "
          f"{'x ours':>7}")
    for name in ("floor", "ours", "lungmask"):
        if name not in summary:
            continue
        s = summary[name]
        print(f"{name:<12} {s['wall_s_median']:>16.1f} {s['wall_s_min']:>7.1f}..{s['wall_s_max']:<8.1f} "
              f"{s['slices_per_s']:>9.2f} {s['cpu_s_median']:>8.1f} {s['peak_rss_mb']:>12.0f} "
              f"{s['wall_s_median'] / ours:>7.2f}")
    for name, target in result["targets"].items():
        verdict = "met" if target["met"] else "NOT met"
        print(f"target {name}: {target['measured']} (want {target['want']}) -> {verdict}")


# ----------------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each tool (default 2)")
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"),
                   help="phantom shape (default 512 512 300)")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0), metavar=("SX", "SY", "SZ"),
                   help="phantom voxel size in mm (default 0.7 0.7 1.0)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--device", default="cpu", help="covid-monai --device: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="set the bundle knob amp to true / false (default: the bundle template's value)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                   help=f"scratch folder for the phantom, bundle and outputs (default {DEFAULT_WORK})")
    p.add_argument("--skip-peer", action="store_true", help="do not run lungmask")
    p.add_argument("--skip-floor", action="store_true", help="do not measure the read+write floor")
    p.add_argument("--peer-python", help="Python with lungmask installed (default $LUNGMASK_PYTHON, else this one)")
    p.add_argument("--covid-monai", dest="covid_monai",
                   help="the covid-monai command line (default: beside this Python, on PATH, or python -m covid_monai)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
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
    scan = make_input(work, shape, spacing, args.seed)
    bundle = make_bundle(work, args.amp)
    outputs = {
        "floor": work / "floor_mask.nii.gz",
        "ours": work / "out_ours",
        "lungmask": work / "lungmask_mask.nii.gz",
    }
    commands: dict[str, list[str]] = {
        "floor": [sys.executable, "-c", FLOOR_SCRIPT, str(scan), str(outputs["floor"])],
        "ours": [*ours_cli, "infer", str(scan), "-o", str(outputs["ours"]), "--bundle", str(bundle),
                 "--device", args.device, "--quiet", "--overwrite"],
    }
    peer_info: dict[str, Any] = {}
    if not args.skip_peer:
        peer_python = find_peer_python(args.peer_python)
        model_path = work / "lungmask_r231_random.pth"
        subprocess.run([peer_python, "-c", PEER_MODEL_SCRIPT, str(model_path)], check=True)
        peer_info = json.loads(subprocess.run([peer_python, "-c", PEER_INFO_SCRIPT], check=True, capture_output=True,
                                              text=True).stdout.strip().splitlines()[-1])
        peer_info["python"] = peer_python
        commands["lungmask"] = [peer_python, "-m", "lungmask", str(scan), str(outputs["lungmask"]),
                                "--modelpath", str(model_path), "--noprogress"]
        if not args.device.startswith("cuda"):
            peer_info["note"] = "no --cpu flag: on a machine without GPU lungmask runs on the CPU with batch size 20"
    order = [name for name in ("floor", "ours", "lungmask") if name in commands and not
             (name == "floor" and args.skip_floor)]

    with open(scan, "rb") as f:  # warm the page cache so the first timed run does not pay the disk read alone
        while f.read(1 << 24):
            pass
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for name in order:
            print(f"[{repeat + 1}/{args.repeats}] {name} ...", end=" ", flush=True)
            load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
            run = run_timed(commands[name], work / "logs" / f"{name}_{repeat}.log")
            run.update(tool=name, repeat=repeat, load_avg_1m_before=load)
            runs.append(run)
            print(f"{run['wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
            if run["rc"] != 0:
                log = work / "logs" / f"{name}_{repeat}.log"
                raise SystemExit(f"{name} failed with exit code {run['rc']}; log {log}:\n{tail(log)}")

    mask_of = {
        "floor": outputs["floor"],
        "ours": outputs["ours"] / f"{scan.name[: -len('.nii.gz')]}_infection.nii.gz",
        "lungmask": outputs["lungmask"],
    }
    checks = {name: check_mask(mask_of[name], shape) for name in order}
    for name, check in checks.items():
        if not check["shape_ok"]:
            raise SystemExit(f"{name}: output mask has shape {check['shape']}, the input {list(shape)}")

    slices = shape[2]
    summary = {name: summarise([r for r in runs if r["tool"] == name], slices) for name in order}
    ours = summary["ours"]["wall_s_median"]
    ratios: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    on_gpu = args.device.startswith("cuda")
    if "lungmask" in summary:
        pairs = [
            round(p["wall_s"] / o["wall_s"], 3)
            for o, p in zip([r for r in runs if r["tool"] == "ours"], [r for r in runs if r["tool"] == "lungmask"],
                            strict=True)
        ]
        ratios["lungmask_over_ours"] = round(summary["lungmask"]["wall_s_median"] / ours, 3)
        ratios["lungmask_over_ours_per_repeat"] = pairs
        ratios["lungmask_over_ours_cpu_time"] = round(
            summary["lungmask"]["cpu_s_median"] / summary["ours"]["cpu_s_median"], 3)
        ratios["peak_rss_ours_over_lungmask"] = round(
            summary["ours"]["peak_rss_mb"] / summary["lungmask"]["peak_rss_mb"], 3)
        if not on_gpu:
            targets["speed_vs_lungmask"] = {"want": ">= 10x", "measured": f"{ratios['lungmask_over_ours']:.2f}x",
                                            "met": ratios["lungmask_over_ours"] >= 10}
    if "floor" in summary:
        ratios["ours_over_floor"] = round(ours / summary["floor"]["wall_s_median"], 3)
        limit = 2 if on_gpu else 5
        targets["vs_read_write_floor"] = {"want": f"<= {limit}x", "measured": f"{ratios['ours_over_floor']:.2f}x",
                                          "met": ratios["ours_over_floor"] <= limit}
    targets["peak_rss"] = {"want": "< 3 GB", "measured": f"{summary['ours']['peak_rss_mb'] / 1024:.2f} GB",
                           "met": summary["ours"]["peak_rss_mb"] < 3 * 1024}

    from covid_monai.bundle import read_knobs

    knobs = read_knobs(bundle)
    result = {
        "benchmark": "bench_infer",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "peer": peer_info,
        "input": {
            "path": str(scan),
            "shape": list(shape),
            "spacing": list(spacing),
            "dtype": "int16",
            "slices": slices,
            "size_mb": round(scan.stat().st_size / 1024**2, 1),
            "seed": args.seed,
        },
        "settings": {
            "repeats": args.repeats,
            "device": args.device,
            "amp_knob": knobs.get("amp"),
            "order": order,
            "weights": "random (torch.manual_seed(0)) for both networks",
            "bundle_knobs": knobs,
            "inference_json_sha256": file_sha256(bundle / "configs" / "inference.json"),
            "covid_monai_sha256": tree_sha256(REPO / "covid_monai"),
        },
        "commands": {name: cmd if name != "floor" else [cmd[0], "-c", "<FLOOR_SCRIPT>", *cmd[3:]]
                     for name, cmd in commands.items()},
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
        "targets": targets,
        "outputs": checks,
        "notes": [
            "cpu_s: user + system CPU time of the run; under contention from other jobs it varies less than wall "
            "time, so lungmask_over_ours_cpu_time is a cross-check of the wall-time ratio.",
            "load_avg_1m_before: the machine's 1-minute load average when the run started (other jobs add noise).",
            "peak_rss_mb: ru_maxrss of the child process tree's largest single process (os.wait4).",
            "Random weights: the networks' outputs are meaningless; their post-processing cost depends on the mask "
            "(see outputs.*.foreground_fraction).",
            "Machines are noisy: compare ratios from the same run, not absolute times across runs.",
        ],
    }
    return write_result(result, args.out, print_table)


if __name__ == "__main__":
    sys.exit(main())
