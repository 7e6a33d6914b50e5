"""The demo's post-processing (threshold, smallest lesion kept) chosen on validation phantoms of its training part.

Trains the demo (:func:`covid_monai.demo.run_demo`), draws extra phantoms of :data:`covid_monai.demo.TRAINING_PART`
with another seed to choose on, then segments those, the demo's held-out phantoms and its disjoint part with every
combination of ``threshold`` and ``min_lesion_ml`` and writes the mean Dice of each to ``OUT/sweep.json``. The
choice is made on the validation phantoms alone; the other two columns only report what it would do.

Example:
    python benchmarks/demo_postprocessing.py --out runs/demo_pp --seed 0
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from _common import machine_info, write_result  # noqa: E402 - benchmarks/ is on sys.path when run as a script

from covid_monai.demo import TRAINING_PART, run_demo
from covid_monai.evaluate import evaluate_folders
from covid_monai.inference import run_batch
from covid_monai.phantom import write_phantoms

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_LESION_ML = (0.0, 0.05, 0.2)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the demo, sweep its post-processing, write ``OUT/sweep.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (validation phantoms: seed + 30000)")
    parser.add_argument("--n-validation", type=int, default=8, help="validation phantoms (default 8)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    demo = run_demo(args.out, device="cpu", seed=args.seed)
    demo_minutes = (time.perf_counter() - started) / 60
    write_phantoms(args.out / "data" / "validation", n=args.n_validation, seed=args.seed + 30_000, spec=TRAINING_PART)
    rows = []
    for threshold in THRESHOLDS:
        for min_ml in MIN_LESION_ML:
            row = {"threshold": threshold, "min_lesion_ml": min_ml}
            for part in ("validation", "test", "disjoint"):
                masks = args.out / "sweep" / f"{part}_{threshold}_{min_ml}"
                run_batch([args.out / "data" / part / "images"], masks, args.out / "bundle", device="cpu",
                          knobs={"threshold": threshold, "min_lesion_ml": min_ml}, progress=False)
                row[part] = evaluate_folders(masks, args.out / "data" / part / "labels", masks / "eval")[1]["mean"][
                    "dice"]
            rows.append(row)
            print(row, flush=True)
    chosen = max(rows, key=lambda r: r["validation"])
    result = {"demo": demo, "demo_minutes": demo_minutes, "rows": rows, "chosen_on_validation": chosen,
              "machine": machine_info()}
    return write_result(result, args.out / "sweep.json",
                        lambda r: print("chosen on validation:", r["chosen_on_validation"]))


if __name__ == "__main__":
    raise SystemExit(main())
