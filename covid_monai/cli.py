"""The ``covid-monai`` command line: phantom, train, prepare-train, infer, report, evaluate, demo.

Each subcommand parses its arguments and calls the module that does the work. Exit codes: 0 success, 1 some
case failed (infer) or the job failed, 2 usage error. The one parser also serves ``torchrun``: ``infer
--distributed`` splits the cases across the processes it started (:mod:`covid_monai.distributed`) and
``prepare-train`` makes a bundle folder for multi-process training (``docs/scaling.md``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covid_monai import __version__
from covid_monai.errors import SharedRunError, UsageError

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write synthetic chest CT phantoms with infection and lung masks")
    p.add_argument("out", type=Path, help="output folder (images/, labels/, lungs/)")
    p.add_argument("--n", type=int, default=4, help="number of phantoms (default 4)")
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 48), metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the bundle on labelled volumes",
        description="Train on DIR/images + DIR/labels (or a datalist JSON) and write a trained bundle folder. "
        "Other --key value pairs set bundle settings, e.g. --epochs 50 --network_width 16 --pixdim '[1.5,1.5,-1]'.",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with images/ and labels/, or a datalist JSON")
    p.add_argument("--out", type=Path, required=True, help="the trained bundle folder to write")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share when splitting (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/models/latest.pt")


def _add_prepare_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-train",
        help="make a bundle folder to train with torchrun (no training)",
        description="Write a bundle folder with the knobs in its configs and a checked configs/datalist.json, "
        "ready for torchrun ... -m monai.bundle run with configs/multi_gpu_train.json (see docs/scaling.md). "
        "Other --key value pairs set bundle settings, e.g. --epochs 100 --val_interval 5.",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with images/ and labels/, or a datalist JSON")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to write")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share when splitting (default 0.2)")
    p.add_argument("--seed", type=int, default=0)


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="segment scans: NIfTI files, folders, DICOM series",
        description="Segment every scan found in the inputs (NIfTI files, folders searched recursively, DICOM "
        "series folders) with one model load. Writes OUTDIR/<case>_infection.nii.gz in each input's geometry and "
        "OUTDIR/summary.csv|json. Exit code 0 if all cases succeeded, 1 if any failed, 2 for usage errors.",
    )
    p.add_argument("inputs", nargs="*", type=Path, help="NIfTI files, folders, DICOM series folders")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--bundle", type=Path, required=True, help="trained bundle folder (configs/, models/model.pt)")
    p.add_argument("--list", type=Path, help="text file with one input path per line")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers reading the next scans (default 1)")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>_probability.nii.gz")
    p.add_argument("--lungs", action="store_true", help="also write <case>_lungs.nii.gz (1 left, 2 right)")
    p.add_argument("--preview", action="store_true", help="also write <case>_preview.png (slices with overlay)")
    p.add_argument("--lobes", type=Path, metavar="DIR",
                   help="lobe masks per case (DIR/<case>.nii.gz, DIR/<case>_lobes.nii.gz in lungmask's labels, or "
                   "TotalSegmentator's DIR/<case>/lung_*_lobe_*.nii.gz): %% per lobe and the CT severity score")
    p.add_argument("--seg-nrrd", action="store_true", help="also write <case>_infection.seg.nrrd (3D Slicer)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="also write <case>_infection.seg.dcm (DICOM Segmentation) for DICOM inputs")
    p.add_argument("--report", action="store_true", help="write OUTDIR/report.html for the batch (implies --preview)")
    p.add_argument("--runtime", choices=("torchscript", "openvino"),
                   help="CPU runtime of the network (default: the bundle's, torchscript; openvino needs "
                   "pip install covid-monai[openvino])")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the bundle's, 0.5)")
    p.add_argument("--min-lesion-ml", type=float, help="remove infection components smaller than this (mL)")
    p.add_argument("--no-postprocess", action="store_true", help="keep the raw thresholded mask (no lung limit)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    p.add_argument("--force", action="store_true", help="allow an output folder inside an input folder")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no progress log lines (warnings, errors and the final counts still print)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="under torchrun: split the cases across the processes (rank r on cuda:LOCAL_RANK), one merged summary "
        "(see docs/scaling.md)",
    )


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild OUTDIR/report.html from OUTDIR/summary.json (no re-run)")
    p.add_argument("outdir", type=Path, help="an output folder of covid-monai infer")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="compare predicted masks with reference labels")
    p.add_argument("--pred", type=Path, required=True, help="folder of <case>_infection.nii.gz")
    p.add_argument("--labels", type=Path, required=True, help="folder of <case>.nii.gz reference labels")
    p.add_argument("--out", type=Path, help="where to write metrics.csv and metrics_summary.csv (default: --pred)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="phantoms → short training → batch inference → masks, metrics and a report")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    p.add_argument("--n-train", type=int, default=12, help="training phantoms (default 12)")
    p.add_argument("--n-test", type=int, default=16, help="held-out phantoms of the training part (default 16)")
    p.add_argument(
        "--n-disjoint", type=int, default=16, help="phantoms of the part it never trains on (default 16; 0 skips)"
    )
    p.add_argument("--epochs", type=int, help="training epochs (default: the demo's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``covid-monai``."""
    parser = argparse.ArgumentParser(
        prog="covid-monai", description="COVID-19 lung infection segmentation on chest CT (MONAI)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_phantom, _add_train, _add_prepare_train, _add_infer, _add_report, _add_evaluate, _add_demo):
        add(sub)
    return parser


def _cmd_phantom(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from covid_monai.phantom import write_phantoms

    cases = write_phantoms(args.out, n=args.n, shape=tuple(args.shape), seed=args.seed)
    print(f"wrote {len(cases)} phantoms to {args.out} (images/, labels/, lungs/)")
    return EXIT_OK


def _cmd_train(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from covid_monai.train import train_bundle

    out = train_bundle(args.data, args.out, extra, args.device, args.val_fraction, args.seed, args.resume)
    print(f"trained bundle: {out} (weights {out / 'models' / 'model.pt'})")
    return EXIT_OK


def _cmd_prepare_train(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from covid_monai.distributed import prepare_training

    bundle = prepare_training(args.data, args.out, extra, args.val_fraction, args.seed)
    print(f"bundle ready: {bundle}; train it from that folder with\n  torchrun --standalone --nproc_per_node=N "
          f"-m monai.bundle run --config_file \"['configs/train.json','configs/multi_gpu_train.json']\"")
    return EXIT_OK


def _cmd_infer(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from covid_monai.inference import run_batch

    inputs = list(args.inputs)
    if args.list:
        try:
            lines = args.list.read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"{args.list}: cannot read the list ({exc.strerror})") from exc
        inputs += [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not inputs:
        raise UsageError("no inputs: give NIfTI files, folders or DICOM folders, or --list FILE")
    knobs = dict(extra)
    if args.threshold is not None:
        knobs["threshold"] = args.threshold
    if args.runtime is not None:
        knobs["runtime"] = args.runtime
    if args.min_lesion_ml is not None:
        knobs["min_lesion_ml"] = args.min_lesion_ml
    if args.no_postprocess:
        knobs.update(restrict_to_lungs=False, min_lesion_ml=0.0)
    if args.lobes is not None and not args.lobes.is_dir():
        raise UsageError(f"--lobes {args.lobes}: no such folder")
    options = dict(knobs=knobs, device=args.device, workers=args.workers, save_probabilities=args.save_probabilities,
                   save_lungs=args.lungs, save_preview=args.preview or args.report, lobes=args.lobes,
                   save_seg_nrrd=args.seg_nrrd, save_dicom_seg=args.dicom_seg, overwrite=args.overwrite,
                   force=args.force, progress=not args.quiet, debug=args.debug)
    by = ""
    if args.distributed:
        from covid_monai.distributed import distributed_context, run_sharded_batch

        results = run_sharded_batch(inputs, args.output, args.bundle, **options)
        rank, world, _ = distributed_context()
        if rank != 0:  # every rank has the merged results: rank 0 alone reports them and gives the exit code
            return EXIT_OK
        by = f" by {world} process(es)"
    else:
        results = run_batch(inputs, args.output, args.bundle, **options)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    print(f"{counts['ok']} segmented, {counts['skipped']} skipped (done before), {counts['failed']} failed{by} "
          f"-> {args.output / 'summary.csv'}")
    if args.report:  # one report per run, from the (merged) summary
        from covid_monai.report import write_report

        print(f"report: {write_report(args.output)}")
    for r in results:
        if r.status == "failed":
            print(f"  FAILED {r.input}: {r.error}")
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def _cmd_report(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from covid_monai.report import write_report

    if not (args.outdir / "summary.json").is_file():
        raise UsageError(f"{args.outdir}: no summary.json (an output folder of covid-monai infer)")
    print(f"report: {write_report(args.outdir)}")
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from covid_monai.evaluate import evaluate_folders, format_table

    out = args.out or args.pred
    rows, summary = evaluate_folders(args.pred, args.labels, out)
    print(format_table(rows, summary))
    print(f"-> {out / 'metrics.csv'}, {out / 'metrics_summary.csv'}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    from covid_monai.demo import run_demo

    run_demo(args.out, n_train=args.n_train, n_test=args.n_test, epochs=args.epochs, device=args.device,
             seed=args.seed, knobs=extra, n_disjoint=args.n_disjoint)
    return EXIT_OK


COMMANDS = {
    "phantom": _cmd_phantom,
    "train": _cmd_train,
    "prepare-train": _cmd_prepare_train,
    "infer": _cmd_infer,
    "report": _cmd_report,
    "evaluate": _cmd_evaluate,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None, lean_imports: bool = False) -> int:
    """Run ``covid-monai`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    With ``lean_imports`` (the ``covid-monai`` program, :func:`console_main`) ``infer`` imports MONAI without the
    optional packages inference never uses (:mod:`covid_monai.lean_import`), when nothing has imported MONAI yet.

    With ``infer --distributed`` (under ``torchrun``) log lines name their rank, rank 0 prints the counts and gives
    the exit code of the batch (the other ranks return 0), and a run that fails as a whole returns 1 on every rank
    with one error line from rank 0.

    Example:
        >>> main(["infer", "scans/", "-o", "masks/", "--bundle", "demo_output/bundle", "--device", "cpu"])
        0
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if lean_imports and args.command == "infer":
        from covid_monai.lean_import import import_monai_for_inference

        import_monai_for_inference()
    debug = getattr(args, "debug", False)
    rank = os.environ.get("RANK", "0") if getattr(args, "distributed", False) else None
    where = "" if rank is None else f" rank{rank}"
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format=f"%(asctime)s{where} %(name)s %(levelname)s: %(message)s",
    )
    try:
        if unknown and args.command not in ("train", "prepare-train", "demo", "infer"):
            raise UsageError(f"unrecognised arguments: {' '.join(unknown)}")
        from covid_monai.bundle import parse_overrides

        extra = parse_overrides(unknown)
        started = time.perf_counter()
        code = COMMANDS[args.command](args, extra)
        logging.getLogger("covid_monai").info("%s finished in %.1f s", args.command, time.perf_counter() - started)
        return code
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"covid-monai {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line; the traceback with --debug
        if debug:
            traceback.print_exc()
        if isinstance(exc, SharedRunError) and rank not in (None, "0"):
            return EXIT_FAILED  # every rank has the same error: rank 0 prints it
        from covid_monai.datalist import DataCheckError
        from covid_monai.errors import one_line

        message = str(exc) if isinstance(exc, DataCheckError) else one_line(exc, limit=1000)
        where = "" if rank is None else f" (rank {rank})"
        print(f"covid-monai {args.command}{where}: error: {message}", file=sys.stderr)
        return EXIT_FAILED


def console_main() -> int:
    """The ``covid-monai`` program (and ``python -m covid_monai``): :func:`main` on ``sys.argv`` with lean imports.

    Only a process of its own imports MONAI lean: :func:`main` called in-process imports it whole (the default).
    """
    return main(lean_imports=True)


if __name__ == "__main__":
    sys.exit(console_main())
