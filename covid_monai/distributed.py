"""Scale out on PyTorch's distributed engine: ``torchrun`` starts the processes, each does a share of the work.

Training runs the bundle itself (``configs/multi_gpu_train.json``: DistributedDataParallel, DistributedSampler);
:func:`prepare_training` makes the bundle folder it runs in. Sharded batch inference is :func:`run_sharded_batch`.
The command line is ``covid-monai``'s (:mod:`covid_monai.cli`): ``infer --distributed`` and ``prepare-train``.

In sharded inference every process (rank) discovers the same sorted cases and segments ``cases[rank::world_size]`` with
:func:`covid_monai.inference.run_batch` (one model load per rank, atomic outputs, finished cases skipped), keeping
its own ``summary.shard<rank>.json``/``.csv``. Rank 0 prepares the output folder before the ranks start and, once
all are done, merges the shard summaries into the one ``summary.csv``/``summary.json`` a single-process run writes.
A case that fails is recorded as failed, as in a single-process run, and the other cases go on.

One node, two processes (the command the tests run)::

    torchrun --standalone --nproc_per_node=2 -m covid_monai infer /data/scans -o /data/masks \\
        --bundle demo_output/bundle --device cpu --lungs --distributed

Training (in a folder made by ``covid-monai prepare-train --data D --out B``)::

    torchrun --standalone --nproc_per_node=2 -m monai.bundle run \\
        --config_file "['configs/train.json','configs/multi_gpu_train.json']"

Several nodes: the same commands on every node with ``--nnodes N --nproc_per_node G --rdzv_backend c10d
--rdzv_endpoint HOST:PORT --rdzv_id JOB`` instead of ``--standalone`` (see ``docs/scaling.md``).
``python -m covid_monai.distributed infer ...`` and ``... prepare-train ...``, the commands of earlier versions,
still work: they are aliases of ``covid-monai infer --distributed ...`` and ``covid-monai prepare-train ...``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from covid_monai.bundle import create_bundle
from covid_monai.datalist import build_datalist, check_bundle_training_data, write_datalist
from covid_monai.errors import SharedRunError, one_line
from covid_monai.inference import check_output_folder, remove_stale_temporaries, run_batch
from covid_monai.summary import CaseResult, read_summary, write_summary

__all__ = [
    "DEFAULT_TIMEOUT",
    "SharedRunError",
    "backend_for",
    "cli_argv",
    "distributed_context",
    "merge_shard_summaries",
    "prepare_training",
    "rank_device",
    "run_sharded_batch",
]

logger = logging.getLogger("covid_monai.distributed")

DEFAULT_TIMEOUT = datetime.timedelta(hours=12)
"""How long a rank waits for the others at a synchronisation point (the fastest shard waits for the slowest)."""


def distributed_context() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment ``torchrun`` sets; ``(0, 1, 0)`` outside it.

    Example:
        >>> rank, world_size, local_rank = distributed_context()  # (1, 2, 1) in the second of two torchrun processes
    """
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of one rank: ``cuda:LOCAL_RANK`` for ``cuda``/``cuda:N`` (and ``auto`` with a GPU), else the CPU.

    ``torchrun`` starts one process per GPU of a node, so the GPU of a process is its local rank whatever index
    the command line named.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: the process's rank on its node.

    Returns:
        The device this rank runs on.

    Raises:
        ValueError: for an unknown name, or CUDA asked for where the node has no GPU ``local_rank``.

    Example:
        >>> rank_device("cpu", 3)
        device(type='cpu')
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device.split(":")[0] != "cuda":
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        raise ValueError(f"device cuda:{local_rank} (local rank {local_rank}) is not available on this node")
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """The process-group backend for a device: ``nccl`` on CUDA, ``gloo`` on the CPU.

    Example:
        >>> backend_for(torch.device("cpu"))
        'gloo'
    """
    return "nccl" if device.type == "cuda" else "gloo"


def prepare_training(
    data: str | os.PathLike,
    out: str | os.PathLike,
    knobs: Mapping[str, Any] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """Make a bundle folder ready for multi-process training: configs with the knobs, a checked datalist.

    The same folder ``covid_monai.train.train_bundle`` trains in, without training: the knobs are written into
    its configs (so its ``inference.json`` rebuilds the trained pipeline) and ``configs/datalist.json`` is
    checked first. Then ``torchrun ... -m monai.bundle run --config_file "['configs/train.json',
    'configs/multi_gpu_train.json']"`` in that folder trains it.

    Args:
        data: ``images/``+``labels/`` folder, or a Decathlon-style datalist JSON.
        out: the bundle folder to write.
        knobs: top-level bundle settings (``epochs``, ``batch_size``, ``network_width``...).
        val_fraction: share of cases held out for validation when ``data`` has no validation list.
        seed: seed of the split and of training.

    Returns:
        The bundle folder.

    Raises:
        covid_monai.datalist.DataCheckError: listing every problem found in the data.

    Example:
        >>> prepare_training("/data/covid19_ct", "my_bundle", {"epochs": 100, "val_interval": 5})
    """
    datalist = build_datalist(data, val_fraction=val_fraction, seed=seed)
    check_bundle_training_data(datalist, knobs)
    bundle = create_bundle(out, {"seed": seed, **(knobs or {})})
    write_datalist(datalist, bundle / "configs" / "datalist.json")
    return bundle


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("summary.shard*.json"), key=lambda p: p.name)


def merge_shard_summaries(
    out_dir: str | os.PathLike,
    meta: Mapping[str, Any],
    world_size: int | None = None,
    include_summary: bool = False,
) -> list[CaseResult]:
    """Merge ``summary.shard<rank>.json`` files into ``summary.csv``/``summary.json`` and remove them.

    Args:
        out_dir: the output folder of a sharded run.
        meta: run information for ``summary.json`` (bundle, device, knobs...).
        world_size: expect exactly the shards ``0 .. world_size - 1`` (all must be there); ``None`` merges the shard
            files found (an interrupted run's leftovers).
        include_summary: start from the rows of the existing ``summary.json`` (shard rows replace them by case).

    Returns:
        The merged rows, ordered by case name, each case once.

    Raises:
        RuntimeError: a shard summary is missing or unreadable, or a case is in two shards; nothing is removed.

    Example:
        >>> rows = merge_shard_summaries("masks/", {"bundle": "demo_output/bundle"}, world_size=2)
    """
    out = Path(out_dir)
    if world_size is None:
        files = _shard_files(out)
    else:
        files = [out / f"summary.shard{rank}.json" for rank in range(world_size)]
    rows: dict[str, CaseResult] = {r.case: r for r in read_summary(out)} if include_summary else {}
    owner: dict[str, str] = {}
    for path in files:
        try:
            json.loads(path.read_text())["cases"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"{path}: shard summary missing or unreadable; the shard files are kept") from exc
        shard = read_summary(out, path.name.removesuffix(".json"))
        for row in shard:
            if row.case in owner:
                raise RuntimeError(f"case {row.case} is in both {owner[row.case]} and {path.name}")
            owner[row.case] = path.name
            rows[row.case] = row
    merged = [rows[case] for case in sorted(rows)]
    write_summary(out, merged, meta)
    for path in files:
        path.unlink(missing_ok=True)
        path.with_suffix(".csv").unlink(missing_ok=True)
    return merged


def _prepare_output(out: Path, inputs: Sequence[str | os.PathLike], force: bool, meta: Mapping[str, Any]) -> None:
    """Rank 0, before any rank writes: check the folder, drop a killed run's temporaries, fold its shard summaries."""
    check_output_folder(out, inputs, force)
    out.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(out)
    if removed:
        logger.info("removed %d temporary file(s) of an interrupted run", len(removed))
    if _shard_files(out):  # an interrupted sharded run: keep its numbers for the cases it finished
        merge_shard_summaries(out, meta, include_summary=True)


def _share(value: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank (also a synchronisation point)."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_sharded_batch(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    bundle_dir: str | os.PathLike,
    knobs: Mapping[str, Any] | None = None,
    device: str = "auto",
    workers: int = 1,
    save_probabilities: bool = False,
    save_lungs: bool = False,
    save_preview: bool = False,
    lobes: str | os.PathLike | None = None,
    save_seg_nrrd: bool = False,
    save_dicom_seg: bool = False,
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
    debug: bool = False,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> list[CaseResult]:
    """:func:`covid_monai.inference.run_batch` split across the processes ``torchrun`` started; one merged summary.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment and joins (or starts) the default process
    group: ``nccl`` on CUDA (rank ``r`` on ``cuda:LOCAL_RANK``), ``gloo`` on the CPU. Rank 0 checks the output
    folder and removes a killed run's temporary files; then every rank segments its shard (``cases[rank::world]``,
    outputs written atomically, finished cases skipped unless ``overwrite``); then rank 0 merges the shard
    summaries into ``summary.csv``/``summary.json`` (rows by case name, each case once) and removes them. A group
    this function started is destroyed before it returns. Outside ``torchrun`` (one process) it is ``run_batch``.

    Args:
        inputs: NIfTI files, folders (searched recursively), DICOM series folders; the same on every rank.
        out_dir: output folder, shared by all ranks (on several nodes: a shared file system).
        bundle_dir: trained bundle folder.
        knobs: bundle config overrides.
        device: ``auto``, ``cpu`` or ``cuda`` (each rank takes ``cuda:LOCAL_RANK``).
        workers: DataLoader workers per rank.
        save_probabilities: also write probability maps.
        save_lungs: also write lung masks.
        save_preview: also write preview PNGs.
        lobes: folder of lobe masks per case (the lobe columns and the CT severity score).
        save_seg_nrrd: also write 3D Slicer segmentations (``.seg.nrrd``).
        save_dicom_seg: also write DICOM Segmentations (``.seg.dcm``) for DICOM inputs.
        overwrite: redo finished cases.
        force: allow an output folder inside an input folder.
        progress: show rank 0's progress bar (its shard).
        debug: keep tracebacks of failures.
        timeout: longest wait at a synchronisation point (the last shard to finish sets the pace).

    Returns:
        Every case's result (all shards, ordered by case name), on every rank.

    Raises:
        SharedRunError: raised on every rank when a rank failed as a whole (e.g. no weights in the bundle, an
            output folder inside an input folder), naming the rank; finished cases stay, so a re-run resumes.

    Example:
        >>> # torchrun --standalone --nproc_per_node=2 my_script.py, where my_script.py calls:
        >>> results = run_sharded_batch(["scans/"], "masks/", "demo_output/bundle", device="cpu")
    """
    rank, world, local_rank = distributed_context()
    options = dict(knobs=knobs, workers=workers, save_probabilities=save_probabilities, save_lungs=save_lungs,
                   save_preview=save_preview, lobes=lobes, save_seg_nrrd=save_seg_nrrd, save_dicom_seg=save_dicom_seg,
                   overwrite=overwrite, force=force, debug=debug)
    if world == 1 and not dist.is_initialized():
        return run_batch(inputs, out_dir, bundle_dir, device=device, progress=progress, **options)
    torch_device = rank_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    started_group = not dist.is_initialized()
    if started_group:
        dist.init_process_group(backend=backend_for(torch_device), timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    meta = {"bundle": str(Path(bundle_dir).resolve()), "device": torch_device.type, "world_size": world,
            "knobs": dict(knobs or {})}
    try:
        error: tuple[str, str] | None = None
        if rank == 0:
            try:
                _prepare_output(out, inputs, force, meta)
            except Exception as exc:
                _share((type(exc).__name__, one_line(exc)))
                raise
        error = _share(None)
        if error is not None:
            raise SharedRunError(f"rank 0 could not prepare {out}: {error[0]}: {error[1]}")

        failure = ""
        try:
            run_batch(inputs, out, bundle_dir, device=str(torch_device), progress=progress and rank == 0,
                      shard=(rank, world), **options)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below, so none waits forever
            failure = f"rank {rank}: {one_line(exc)}"
        failures: list[str] = [""] * world
        dist.all_gather_object(failures, failure)
        failed = [f for f in failures if f]
        if failed:
            raise SharedRunError("; ".join(failed) + " (finished cases are kept; a re-run resumes)")

        merged: list[CaseResult] | str = []
        if rank == 0:
            try:
                merged = merge_shard_summaries(out, meta, world)
            except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised everywhere
                merged = one_line(exc)
        merged = _share(merged)
        if isinstance(merged, str):
            raise SharedRunError(f"merging the shard summaries failed: {merged}")
        return merged
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()


def cli_argv(argv: Sequence[str]) -> list[str]:
    """The ``covid-monai`` arguments that ``python -m covid_monai.distributed ARGS`` stands for.

    The module has no command line of its own: ``infer ...`` is ``infer --distributed ...`` and anything else
    (``prepare-train ...``, ``--help``) goes to the one parser as it is.

    Args:
        argv: the arguments after ``python -m covid_monai.distributed``.

    Returns:
        The arguments for :func:`covid_monai.cli.main`.

    Example:
        >>> cli_argv(["infer", "scans/", "-o", "masks/", "--bundle", "b"])
        ['infer', '--distributed', 'scans/', '-o', 'masks/', '--bundle', 'b']
    """
    argv = list(argv)
    return ["infer", "--distributed", *argv[1:]] if argv[:1] == ["infer"] else argv


if __name__ == "__main__":  # the alias of earlier versions: an entry point, so it may call the command line
    from covid_monai.cli import main

    sys.exit(main(cli_argv(sys.argv[1:]), lean_imports=True))
