#!/usr/bin/env python
"""Start-up benchmark: how long ``covid-monai`` takes before it does any work.

Two measurements, each in fresh processes, repeated, medians reported:

- **help**: wall time of ``covid-monai --help`` (the command line must answer at once);
- **infer timeline**: ``covid-monai infer SCAN -o OUT --bundle B`` on one small scan, run through a small wrapper that
  does what the ``covid-monai`` program does (:func:`covid_monai.cli.console_main`) and records, from the moment the
  benchmark started the process: the interpreter ready, the imports the run needs
  (``covid_monai.inference``), the start and end of the model load (``BatchSegmenter``: bundle config, network,
  weights, freezing), the first scan starting to be read, and the exit. **Start-up** is the time to the first scan
  being read minus the model load: interpreter, imports, argument parsing, discovery and output checks.
  Timed twice per repeat, alternating: as users run it (``lean``: MONAI imported without the packages inference does
  not use, :mod:`covid_monai.lean_import`) and with ``COVID_MONAI_FULL_IMPORT=1`` (``whole``: MONAI imported whole).

A third run of the same command under ``python -X importtime`` lists the modules whose imports cost most
(cumulative), the evidence for what to import lazily.

The scan is a synthetic chest phantom (``covid_monai.phantom.make_phantom``, 256x256x32 by default) and the bundle
the template's with random weights (the weights' values do not change the start-up).

Example:
    .venv/bin/python benchmarks/bench_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_info, write_result  # noqa: E402 - benchmarks/ is on sys.path when run as a script
from bench_infer import find_ours, make_bundle, make_input  # noqa: E402

from covid_monai.lean_import import FULL_IMPORT_ENV

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_startup.json"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "covid_monai_bench_startup"

# Runs `covid-monai infer ...` in this process, marking when each step starts; prints the marks as JSON on the last
# line. argv: the benchmark's time.time() just before it started this process, then the covid-monai arguments.
TIMELINE_SCRIPT = """
import json, sys, time
started = float(sys.argv[1])
marks = {"interpreter_ready": time.time() - started}
from covid_monai.lean_import import import_monai_for_inference
import_monai_for_inference()  # what `covid-monai infer` does first (a no-op with COVID_MONAI_FULL_IMPORT=1)
import covid_monai.inference as inference
marks["imports_done"] = time.time() - started
from covid_monai import cli

init, getitem = inference.BatchSegmenter.__init__, inference._CaseDataset.__getitem__

def timed_init(self, *args, **kwargs):
    marks["model_load_start"] = time.time() - started
    init(self, *args, **kwargs)
    marks["model_load_end"] = time.time() - started

def timed_getitem(self, index):
    marks.setdefault("first_scan_read_start", time.time() - started)
    return getitem(self, index)

inference.BatchSegmenter.__init__, inference._CaseDataset.__getitem__ = timed_init, timed_getitem
code = cli.main(sys.argv[2:], lean_imports=True)
marks["exit"] = time.time() - started
marks["rc"] = code
print(json.dumps(marks))
"""

IMPORT_TIME_SCRIPT = "import sys; from covid_monai import cli; sys.exit(cli.console_main())"


def run_help(ours: list[str]) -> float:
    """Wall seconds of ``covid-monai --help`` in a fresh process."""
    start = time.perf_counter()
    subprocess.run([*ours, "--help"], check=True, capture_output=True)
    return time.perf_counter() - start


def _env(full_import: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FULL_IMPORT_ENV}
    return {**env, FULL_IMPORT_ENV: "1"} if full_import else env


def run_timeline(infer_args: list[str], full_import: bool = False) -> dict[str, float]:
    """The marks of one ``covid-monai infer`` run (seconds from the process start), plus the derived durations.

    ``full_import``: with ``COVID_MONAI_FULL_IMPORT=1`` (MONAI imported whole) instead of as users run it.
    """
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", TIMELINE_SCRIPT, repr(started), *infer_args], capture_output=True,
                          text=True, env=_env(full_import))
    if proc.returncode != 0:
        raise SystemExit(f"covid-monai infer failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    marks["model_load_s"] = marks["model_load_end"] - marks["model_load_start"]
    marks["startup_s"] = marks["first_scan_read_start"] - marks["model_load_s"]
    return {k: round(v, 3) for k, v in marks.items()}


def import_costs(infer_args: list[str], top: int = 20, full_import: bool = False) -> list[dict[str, Any]]:
    """The ``top`` modules by cumulative import time (``python -X importtime``) of one infer run."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORT_TIME_SCRIPT, *infer_args],
                          capture_output=True, text=True, env=_env(full_import))
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:"):].split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2  # the module name is indented two spaces per level
        rows.append({"module": name.strip(), "self_ms": int(self_us) / 1000,
                     "cumulative_ms": int(cumulative_us) / 1000, "depth": depth})
    total = sum(r["cumulative_ms"] for r in rows if r["depth"] == 0)
    top_level = sorted((r for r in rows if r["depth"] <= 1), key=lambda r: -r["cumulative_ms"])[:top]
    return [{"total_import_ms": round(total, 1)}, *top_level]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="runs of each measurement (default 5)")
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 32), metavar=("X", "Y", "Z"),
                   help="phantom shape (default 256 256 32)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"scratch folder (default {DEFAULT_WORK})")
    return p.parse_args(argv)


def _medians(timelines: list[dict[str, float]]) -> dict[str, float]:
    keys = [key for key in timelines[0] if key != "rc"]
    return {f"{key}_median": round(statistics.median(t[key] for t in timelines), 3) for key in keys}


def print_table(result: dict[str, Any]) -> None:
    """Medians of the start-up steps, lean and whole MONAI import side by side, and the target."""
    s = result["summary"]
    print(f"\ncovid-monai --help: {s['help_s_median']:.2f} s (median of {result['settings']['repeats']})")
    print(f"  {'step (s from process start)':<28} {'lean':>7} {'whole':>7}")
    for key in ("interpreter_ready", "imports_done", "model_load_s", "first_scan_read_start", "startup_s", "exit"):
        print(f"  {key:<28} {s['lean'][key + '_median']:>7.2f} {s['whole'][key + '_median']:>7.2f}")
    for name, target in result["targets"].items():
        print(f"target {name}: {target['measured']} (want {target['want']}) -> {'met' if target['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shape = tuple(args.shape)
    scan = make_input(work, shape, (1.0, 1.0, 2.5), 0)
    bundle = make_bundle(work)
    ours = find_ours(None)
    infer_args = ["infer", str(scan), "-o", str(work / "out"), "--bundle", str(bundle), "--device", "cpu", "--quiet",
                  "--overwrite"]
    helps: list[float] = []
    timelines: dict[str, list[dict[str, float]]] = {"lean": [], "whole": []}
    for _ in range(args.repeats):  # alternate, so drift of a noisy machine hits all alike
        helps.append(round(run_help(ours), 3))
        timelines["lean"].append(run_timeline(infer_args))
        timelines["whole"].append(run_timeline(infer_args, full_import=True))
    summary: dict[str, Any] = {"help_s_median": round(statistics.median(helps), 3),
                               **{variant: _medians(runs) for variant, runs in timelines.items()}}
    lean, whole = summary["lean"]["startup_s_median"], summary["whole"]["startup_s_median"]
    summary["lean_saves_s"] = round(whole - lean, 3)
    targets = {
        "startup": {"want": "<= 1.0 s plus the model load", "measured": f"{lean:.2f} s (whole MONAI import: "
                    f"{whole:.2f} s)", "met": lean <= 1.0},
        "help": {"want": "well under 1 s", "measured": f"{summary['help_s_median']:.2f} s",
                 "met": summary["help_s_median"] < 0.5},
    }
    result = {
        "benchmark": "bench_startup",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "input": {"shape": list(shape), "spacing": [1.0, 1.0, 2.5], "path": str(scan)},
        "settings": {"repeats": args.repeats, "command": [*ours, *infer_args]},
        "help_runs_s": helps,
        "timelines": timelines,
        "summary": summary,
        "targets": targets,
        "imports": {"lean": import_costs(infer_args), "whole": import_costs(infer_args, full_import=True)},
        "notes": [
            "Marks are seconds since the benchmark started the process (time.time() on both sides).",
            "startup_s = first_scan_read_start - model_load_s: everything before the first scan is read except "
            "the model load (bundle config, network, weights, freezing).",
            "lean: as `covid-monai infer` runs (MONAI imported without Ignite, scipy.signal and matplotlib, "
            "covid_monai.lean_import); whole: the same with COVID_MONAI_FULL_IMPORT=1. Alternated per repeat.",
            "imports: the first row is the total of the top-level imports; then the top modules by cumulative "
            "import time (depth 0 = imported by the run, 1 = by those).",
        ],
    }
    return write_result(result, args.out, print_table)


if __name__ == "__main__":
    sys.exit(main())
