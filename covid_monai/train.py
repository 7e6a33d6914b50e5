"""Train a bundle: make the bundle folder, write and check its datalist, run ``train.json``, plot its curves."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from covid_monai.bundle import create_bundle, load_config, resolve_device, run_workflow
from covid_monai.datalist import build_datalist, check_bundle_training_data, write_datalist
from covid_monai.handlers import atomic_torch_save, averaged_weights, check_resume_checkpoint
from covid_monai.inferers import precision_name

__all__ = ["read_training_curves", "train_bundle", "write_training_curves"]

logger = logging.getLogger("covid_monai.train")


def train_bundle(
    data: str | os.PathLike,
    out: str | os.PathLike,
    knobs: Mapping[str, Any] | None = None,
    device: str = "auto",
    val_fraction: float = 0.2,
    seed: int = 0,
    resume: bool = False,
) -> Path:
    """Train the bundle's network on labelled volumes and leave a trained bundle folder.

    Args:
        data: a folder with ``images/`` and ``labels/`` (NIfTI, same names), or a Decathlon-style datalist JSON.
        out: the bundle folder to write (configs, ``configs/datalist.json``, ``models/model.pt`` — best by the
            validation key metric — ``models/latest.pt``, the full training state of the last epoch, and
            ``eval/training_curves.png``, the loss and each validation metric per epoch).
        knobs: top-level bundle settings (``epochs``, ``network_width``, ``pixdim``, ``hu_window``...), written
            into the bundle's configs so inference rebuilds the same pipeline.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        val_fraction: share of cases held out for validation when ``data`` has no validation list.
        seed: seed of the split and of training (``monai.utils.set_determinism``).
        resume: continue from ``models/latest.pt`` (the epoch, optimizer and scheduler included).

    Returns:
        The bundle folder.

    Raises:
        covid_monai.datalist.DataCheckError: listing every problem found in the data, before training starts.

    Example:
        >>> train_bundle("phantoms/", "my_bundle/", {"epochs": 5, "network_width": 16}, device="cpu")
    """
    out = Path(out)
    knobs = dict(knobs or {})
    knobs.setdefault("seed", seed)
    datalist_path = out / "configs" / "datalist.json"
    if resume:
        check_resume_checkpoint(out / "models" / "latest.pt", ("model", "optimizer", "lr_scheduler"))
        if not datalist_path.is_file():
            raise FileNotFoundError(f"{out}: cannot resume, {datalist_path} does not exist")
        import json

        datalist = json.loads(datalist_path.read_text())
    else:
        datalist = build_datalist(data, val_fraction=val_fraction, seed=seed)
    check_bundle_training_data(datalist, knobs)
    create_bundle(out, knobs)
    write_datalist(datalist, datalist_path)
    torch_device = resolve_device(device)
    parser = load_config(
        out,
        ["train.json"],
        {"device": f"$torch.device('{torch_device}')", "resume": resume, "dataset_dir": str(out)},
    )
    logger.info(
        "training on %d volumes, validating on %d, device %s, %s",
        len(datalist["training"]),
        len(datalist["validation"]),
        torch_device,
        precision_name(torch_device, bool(parser.get_parsed_content("amp"))),
    )
    run_workflow(parser)
    best, latest = out / "models" / "model.pt", out / "models" / "latest.pt"
    if not best.is_file() and latest.is_file():
        logger.warning(
            "no validation ran (epochs < val_interval): %s takes the last epoch's weights (averaged with ema_decay)",
            best,
        )
        state = torch.load(latest, map_location="cpu", weights_only=True)
        atomic_torch_save(averaged_weights(state.get("weight_averaging", {})) or state["model"], best)
    curves = write_training_curves(out)
    if curves is not None:
        logger.info("training curves: %s", curves)
    return out


def read_training_curves(bundle_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """Per-epoch training loss and validation metrics from the TensorBoard events training wrote to ``eval/``.

    The loss is logged per iteration (``train_loss``): each epoch's value is the mean over its iterations, the epoch
    length coming from ``models/latest.pt``. The other scalars (``val_mean_dice``, ``val_mean_iou``, ...,
    ``train_mean_dice``) are logged once per epoch. A resumed training appends event files; TensorBoard's reader
    drops the steps a killed run logged past the checkpoint it resumed from.

    Args:
        bundle_dir: a bundle folder after :func:`train_bundle`.

    Returns:
        ``{"loss": {epoch: value}, "<metric>": {epoch: value}, ...}``; empty when there are no events.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bundle = Path(bundle_dir)
    events = bundle / "eval"
    if not any(events.glob("events.out.tfevents.*")):
        return {}
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    quiet = logging.getLogger("tensorboard")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its reader logs every file switch at INFO
    try:
        accumulator.Reload()
    finally:
        quiet.setLevel(level)
    curves: dict[str, dict[int, float]] = {}
    latest = bundle / "models" / "latest.pt"
    epoch_length = 0
    if latest.is_file():
        trainer = torch.load(latest, map_location="cpu", weights_only=True).get("trainer", {})
        epoch_length = int(trainer.get("epoch_length") or 0)
    for tag in accumulator.Tags().get("scalars", []):
        scalars = accumulator.Scalars(tag)
        if tag == "train_loss":
            if epoch_length < 1:
                continue
            per_epoch: dict[int, list[float]] = {}
            for event in scalars:
                per_epoch.setdefault((int(event.step) - 1) // epoch_length + 1, []).append(float(event.value))
            curves["loss"] = {epoch: sum(v) / len(v) for epoch, v in sorted(per_epoch.items())}
        else:
            curves[tag] = {int(event.step): float(event.value) for event in scalars}
    return curves


def write_training_curves(bundle_dir: str | os.PathLike) -> Path | None:
    """Plot :func:`read_training_curves` into ``eval/training_curves.png``: the loss, and each metric, per epoch.

    Args:
        bundle_dir: a bundle folder after training.

    Returns:
        The PNG's path, or ``None`` when training logged nothing to plot.

    Example:
        >>> write_training_curves("my_bundle")  # my_bundle/eval/training_curves.png
    """
    from matplotlib.figure import Figure

    from covid_monai.io import atomic_path

    curves = read_training_curves(bundle_dir)
    if not curves:
        logger.warning("%s: no training events in eval/, no training curves", bundle_dir)
        return None
    figure = Figure(figsize=(10, 4), dpi=100)
    loss_axes, metric_axes = figure.subplots(1, 2)
    for axes, names, title in ((loss_axes, ["loss"], "training loss"),
                               (metric_axes, sorted(k for k in curves if k != "loss"), "metrics")):
        for name in names:
            if curves.get(name):
                epochs = sorted(curves[name])
                style = "--" if name.startswith("train_") else "-"
                axes.plot(epochs, [curves[name][e] for e in epochs], style, marker="o", markersize=3, label=name)
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(bundle_dir) / "eval" / "training_curves.png"
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
