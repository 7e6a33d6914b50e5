#!/usr/bin/env python
"""Where does inference time go? Stage timers (and cProfile) around one in-process ``run_batch`` on one scan.

The bundle's transforms, the inferer and the writer are wrapped with timers in this process only (class-level
``__call__`` wrappers, no change to the package), then ``covid_monai.inference.run_batch`` segments the scan as the
command line does. Stages:

- ``read``: LoadImaged (also timing covid_monai.io.LoadScand), EnsureChannelFirstd, ValidateCTd (decode the NIfTI
  into a float tensor);
- ``resample``: Orientationd, SeparableSpacingd (Spacingd in older bundles), Resized;
- ``lung_mask``: LungMaskd (HU-threshold lung mask at the network's resolution);
- ``intensity_crop``: ScaleIntensityRanged, CropForegroundd, NormalizeIntensityd, EnsureTyped;
- ``network``: SliceInferer (every slice through the 2D U-Net);
- ``postprocess``: Activationsd, AsDiscreted, RestrictToLungsd, AddInfectionToLungsd, RemoveSmallObjectsd,
  CastToTyped (on the network's grid);
- ``invert``: ToSourceGridd, MaskFromSourceProbabilityd (lung labels and the thresholded probability back on the
  scan's grid; Invertd in older bundles);
- ``write``: SaveLikeSourced (gzip NIfTI, atomic);
- ``quantify``: quantify_case (volumes, lesion count);
- ``other``: the rest (model load, config parsing, DataLoader, summary).

For each stage the peak RSS of the process after it (``VmHWM``) shows which stage sets the memory peak.

Example:
    .venv/bin/python benchmarks/profile_infer.py                      # 512x512x300 phantom, CPU
    .venv/bin/python benchmarks/profile_infer.py --shape 256 256 100 --no-cprofile
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info  # noqa: E402
from bench_infer import make_bundle, make_input  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "profile_infer.json"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "covid_monai_bench"

STAGES = {
    "read": ["LoadImaged", "EnsureChannelFirstd", "ValidateCTd", "RecordSourceGridd"],
    "resample": ["Orientationd", "Spacingd", "SeparableSpacingd", "Resized"],
    "lung_mask": ["LungMaskd"],
    "intensity_crop": ["ScaleIntensityRanged", "CropForegroundd", "NormalizeIntensityd", "EnsureTyped"],
    "network": ["SliceInferer"],
    "postprocess": ["Activationsd", "AsDiscreted", "RestrictToLungsd", "AddInfectionToLungsd", "RemoveSmallObjectsd",
                    "CastToTyped"],
    "invert": ["Invertd", "ToSourceGridd", "MaskFromSourceProbabilityd"],
    "write": ["SaveLikeSourced"],
}

TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
PER_CLASS: dict[str, float] = defaultdict(float)
RSS_AFTER: dict[str, float] = {}
TIMELINE: list[dict[str, Any]] = []


def vm_hwm_mb() -> float:
    """Peak RSS of this process so far (``VmHWM``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    return float("nan")


def rss_mb() -> float:
    """Current RSS of this process (``VmRSS``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    return float("nan")


def timed(function: Any, stage: str, label: str) -> Any:
    """``function`` wrapped to add its wall time to ``stage`` (and ``label``) and record the peak RSS after it."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            TIMES[stage] += elapsed
            CALLS[stage] += 1
            PER_CLASS[label] += elapsed
            RSS_AFTER[stage] = vm_hwm_mb()
            TIMELINE.append({"step": label, "stage": stage, "seconds": round(elapsed, 3),
                             "peak_rss_mb_after": RSS_AFTER[stage], "rss_mb_after": rss_mb()})

    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    return wrapper


def install_timers() -> None:
    """Wrap the bundle's transform classes, the slice inferer and the writers (this process only)."""
    import monai.inferers
    import monai.transforms

    import covid_monai.grid
    import covid_monai.inference
    import covid_monai.io
    import covid_monai.saving
    import covid_monai.transforms

    for stage, names in STAGES.items():
        for name in names:
            modules = (
                covid_monai.transforms, covid_monai.grid, covid_monai.io, covid_monai.saving, monai.transforms,
                monai.inferers,
            )
            cls = next(getattr(m, name) for m in modules if hasattr(m, name))
            cls.__call__ = timed(cls.__call__, stage, name)
    covid_monai.inference.quantify_case = timed(covid_monai.inference.quantify_case, "quantify", "quantify_case")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0), metavar=("SX", "SY", "SZ"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="set the bundle knob amp to true / false (default: the bundle template's value)")
    p.add_argument("--no-cprofile", dest="cprofile", action="store_false", help="stage timers only")
    p.add_argument("--top", type=int, default=25, help="functions listed from cProfile (default 25)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    args = p.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in args.shape)
    scan = make_input(work, shape, tuple(float(s) for s in args.spacing), args.seed)
    bundle = make_bundle(work, args.amp)


    from covid_monai.inference import run_batch

    install_timers()
    profiler = cProfile.Profile() if args.cprofile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    results = run_batch([scan], work / "out_profile", bundle, device=args.device, workers=0, progress=False,
                        overwrite=True)
    if profiler:
        profiler.disable()
    total = time.perf_counter() - start
    if results[0].status != "ok":
        raise SystemExit(f"inference failed: {results[0].error}")

    stages = {}
    for stage in [*STAGES, "write", "quantify"]:
        stages[stage] = {
            "seconds": round(TIMES.get(stage, 0.0), 2),
            "pct": round(100.0 * TIMES.get(stage, 0.0) / total, 1),
            "calls": CALLS.get(stage, 0),
            "peak_rss_mb_after": RSS_AFTER.get(stage),
        }
    other = total - sum(TIMES.values())
    stages["other"] = {"seconds": round(other, 2), "pct": round(100.0 * other / total, 1)}
    top: list[dict[str, Any]] = []
    text = ""
    if profiler:
        buffer = io.StringIO()
        ps = pstats.Stats(profiler, stream=buffer).sort_stats("tottime")
        ps.print_stats(args.top)
        text = buffer.getvalue()
        profiler.dump_stats(str(work / "profile_infer.prof"))
        for (filename, line, name), (_, ncalls, tottime, cumtime, _) in sorted(
            ps.stats.items(), key=lambda kv: kv[1][2], reverse=True  # type: ignore[attr-defined]
        )[: args.top]:
            top.append({"function": f"{Path(filename).name}:{line}({name})", "calls": ncalls,
                        "tottime_s": round(tottime, 2), "cumtime_s": round(cumtime, 2)})
    doc = {
        "benchmark": "profile_infer",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "input": {"shape": list(shape), "spacing": list(args.spacing), "path": str(scan)},
        "device": args.device,
        "cprofile": bool(args.cprofile),
        "total_s": round(total, 2),
        "peak_rss_mb": vm_hwm_mb(),
        "stages": stages,
        "timeline": TIMELINE,
        "per_transform_s": {k: round(v, 2) for k, v in sorted(PER_CLASS.items(), key=lambda kv: -kv[1])},
        "top_functions_by_tottime": top,
        "result": results[0].row(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"total {total:.1f} s, peak RSS {doc['peak_rss_mb']:.0f} MB (this process)")
    print(f"{'stage':<16} {'s':>8} {'%':>6} {'peak RSS MB after':>18}")
    for stage, row in stages.items():
        rss = row.get("peak_rss_mb_after")
        print(f"{stage:<16} {row['seconds']:>8.1f} {row['pct']:>6.1f} {rss if rss is not None else '':>18}")
    print(f"\n{'step (in call order)':<22} {'s':>7} {'RSS MB':>8} {'peak RSS MB':>12}")
    for row in TIMELINE:
        print(f"{row['step']:<22} {row['seconds']:>7.2f} {row['rss_mb_after']:>8.0f} {row['peak_rss_mb_after']:>12.0f}")
    if text:
        print("\n".join(text.splitlines()[: args.top + 12]))
    print(f"results -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
