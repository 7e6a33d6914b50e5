"""Demo recipes compared on three sets of phantoms: held-out, validation and the disjoint part, over several seeds.

Each recipe is a set of bundle knobs applied over the demo's own (:data:`covid_monai.demo.DEMO_KNOBS`). For every
recipe and seed it trains the demo (:func:`covid_monai.demo.run_demo`, scored on its held-out phantoms and on the
disjoint part), then segments further phantoms of :data:`covid_monai.demo.TRAINING_PART` drawn with the seed 30000
(the same validation phantoms for every recipe and seed) and writes ``OUT/<recipe>_seed<seed>/result.json``. A run
whose ``result.json`` exists is read back instead of trained again, so an interrupted comparison resumes. All results
go to one JSON file, with the mean of each recipe over the seeds.

Example:
    python benchmarks/demo_recipes.py --out runs/demo_recipes --seeds 0 1 \\
        --recipe base '{"context_slices": 0}' --recipe context1 '{"context_slices": 1}' \\
        --result benchmarks/results/demo_recipes_context_slices.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import machine_info, write_result  # noqa: E402 - benchmarks/ is on sys.path when run as a script

from covid_monai.demo import TRAINING_PART, run_demo, segment_and_score
from covid_monai.io import atomic_write_text
from covid_monai.phantom import write_phantoms

VALIDATION_SEED = 30_000
SCORES = ("test", "disjoint", "validation")


def run_recipe(out: Path, knobs: dict[str, Any], seed: int, n_train: int, n_eval: int) -> dict[str, Any]:
    """Train and score one recipe with one seed in ``out``, or read back its earlier ``result.json``."""
    done = out / "result.json"
    if done.exists():
        earlier = json.loads(done.read_text())
        asked = {"knobs": knobs, "seed": seed, "n_train": n_train, "n_eval": n_eval}
        settings = {key: earlier.get(key) for key in asked}
        if settings != asked:
            raise SystemExit(f"{done}: an earlier run with other settings ({settings}, not {asked}); use another --out")
        return earlier
    started = time.perf_counter()
    means = run_demo(out, n_train=n_train, n_test=n_eval, n_disjoint=n_eval, device="cpu", seed=seed, knobs=knobs)
    minutes = (time.perf_counter() - started) / 60
    validation = out / "data" / "validation"
    write_phantoms(validation, n=n_eval, seed=VALIDATION_SEED, spec=TRAINING_PART)
    rows, summary, _ = segment_and_score(out / "bundle", validation, out / "validation", device="cpu")
    result = {
        "knobs": knobs,
        "seed": seed,
        "n_train": n_train,
        "n_eval": n_eval,
        "demo_minutes": minutes,
        "test": means["dice"],
        "disjoint": means["disjoint_dice"],
        "validation": float(summary["mean"]["dice"]),
        "validation_cases": {row["case"]: float(row["dice"]) for row in rows},
    }
    atomic_write_text(done, json.dumps(result, indent=1) + "\n")
    return result


def print_table(result: dict[str, Any]) -> None:
    """Print each recipe's mean Dice over the seeds on the three sets."""
    print(f"\n{'recipe':<24}" + "".join(f"{name:>12}" for name in SCORES) + f"{'minutes':>10}")
    for name, mean in result["means"].items():
        print(f"{name:<24}" + "".join(f"{mean[s]:>12.3f}" for s in SCORES) + f"{mean['demo_minutes']:>10.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run every recipe with every seed and write the comparison to ``--result``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder, one subfolder per recipe and seed")
    parser.add_argument(
        "--recipe",
        nargs=2,
        action="append",
        metavar=("NAME", "KNOBS_JSON"),
        required=True,
        help="a recipe: its name and its bundle knobs as JSON (repeat for several)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the demo (default 0 1)")
    parser.add_argument("--n-train", type=int, default=12, help="training phantoms (default 12)")
    parser.add_argument("--n-eval", type=int, default=16, help="phantoms in each scored set (default 16)")
    parser.add_argument("--result", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, knobs_json in args.recipe:
        knobs = json.loads(knobs_json)
        for seed in args.seeds:
            run = run_recipe(args.out / f"{name}_seed{seed}", knobs, seed, args.n_train, args.n_eval)
            print(name, {k: run[k] for k in ("seed", *SCORES, "demo_minutes")}, flush=True)
            runs.setdefault(name, []).append(run)
    means = {
        name: {key: statistics.fmean(run[key] for run in done) for key in (*SCORES, "demo_minutes")}
        for name, done in runs.items()
    }
    result = {
        "seeds": args.seeds,
        "n_train": args.n_train,
        "n_eval": args.n_eval,
        "validation_seed": VALIDATION_SEED,
        "means": means,
        "runs": runs,
        "machine": machine_info(),
    }
    return write_result(result, args.result, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
