#!/usr/bin/env python
"""The lung crop's cost in Dice and its gain in time, by in-plane margin, on the end-to-end test's model.

``crop_to_lungs`` sends only the lung box (+ ``lung_crop_margin_mm``) through the network. It changes the U-Net's
view of the slice border, so a phantom's Dice moves either way; this measures by how much on enough phantoms to
average that out. The model is the end-to-end test's: :func:`covid_monai.demo.run_demo` with the demo's 12 training
phantoms, seed 0, 60 epochs, which also writes ``--n`` held-out phantoms and ``--n`` of the disjoint part to score.
Every variant runs the bundle's own inference pipeline in fp32, so only the crop differs:

- ``whole slice``: no lung crop (the body box only);
- ``margin M mm``: the lung box + M mm in-plane (+30 mm along z, the default), for each ``--margins`` M.

Per variant: the mean Dice over all phantoms (and per part), its difference from the whole slice, every phantom's
Dice, and the seconds of one ``run_batch`` call per part (model load included).

Example:
    .venv/bin/python benchmarks/bench_lung_crop.py --work runs/lung_crop
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine_info, write_result  # noqa: E402 - benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_lung_crop.json"
PARTS = {"held_out": "test", "disjoint": "disjoint"}
"""Scored parts and their folders under ``run_demo``'s ``data/``."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="scratch folder: phantoms, the trained model, masks")
    p.add_argument("--n", type=int, default=8, help="phantoms of each part (default 8)")
    p.add_argument("--margins", type=float, nargs="+", default=[20, 40, 60, 80],
                   help="in-plane lung-box margins in mm (default 20 40 60 80)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def print_table(result: dict[str, Any]) -> None:
    """Per variant: mean Dice over all phantoms, per part, the change against the whole slice and the seconds."""
    print(f"\n{'variant':<16} {'Dice':>7} {'held-out':>9} {'disjoint':>9} {'change':>8} {'seconds':>8}")
    for name, row in result["variants"].items():
        print(f"{name:<16} {row['dice']:>7.4f} {row['parts']['held_out']:>9.4f} {row['parts']['disjoint']:>9.4f} "
              f"{row['change']:>+8.4f} {row['seconds']:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from covid_monai.demo import run_demo
    from covid_monai.evaluate import evaluate_folders
    from covid_monai.inference import run_batch

    demo = args.work / "demo"
    run_demo(demo, n_test=args.n, n_disjoint=args.n, epochs=60, device="cpu", seed=0, knobs={"val_interval": 10})
    bundle, folders = demo / "bundle", {part: demo / "data" / folder for part, folder in PARTS.items()}
    variants = {"whole slice": {"amp": False, "crop_to_lungs": False}}
    for margin in args.margins:
        variants[f"margin {margin:g} mm"] = {"amp": False, "lung_crop_margin_mm": [margin, margin, 30]}
    rows: dict[str, Any] = {}
    for name, knobs in variants.items():
        per_part, seconds = {}, 0.0
        for part, folder in folders.items():
            masks = args.work / "masks" / name.replace(" ", "_") / part
            start = time.perf_counter()
            run_batch([folder / "images"], masks, bundle, knobs=knobs, device="cpu", workers=0, progress=False)
            seconds += time.perf_counter() - start
            per_part[part] = [round(float(r["dice"]), 4) for r in evaluate_folders(masks, folder / "labels")[0]]
        every = [d for part in per_part.values() for d in part]
        rows[name] = {"dice": round(statistics.fmean(every), 4),
                      "parts": {part: round(statistics.fmean(d), 4) for part, d in per_part.items()},
                      "per_phantom": per_part, "seconds": round(seconds, 1)}
        print(name, rows[name]["dice"], flush=True)
    for row in rows.values():
        row["change"] = round(row["dice"] - rows["whole slice"]["dice"], 4)
    result = {
        "benchmark": "bench_lung_crop",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {"n_per_part": args.n, "margins_mm": args.margins, "bundle": str(bundle),
                     "model": "end-to-end test's: the demo's 12 training phantoms, seed 0, 60 epochs"},
        "variants": rows,
    }
    return write_result(result, args.out, print_table)


if __name__ == "__main__":
    sys.exit(main())
