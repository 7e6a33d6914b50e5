"""Train a bundle: make the bundle folder, write and check its datalist, run ``train.json``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from covid_monai.bundle import create_bundle, load_config, resolve_device, run_workflow
from covid_monai.datalist import build_datalist, check_training_data, write_datalist
from covid_monai.handlers import atomic_torch_save, averaged_weights, check_resume_checkpoint

__all__ = ["train_bundle"]

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
            validation key metric — and ``models/latest.pt``, the full training state of the last epoch).
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
    check_training_data(datalist, label_values=(0, 1, 2) if knobs.get("labels") == "multiclass" else (0, 1))
    create_bundle(out, knobs)
    write_datalist(datalist, datalist_path)
    torch_device = resolve_device(device)
    logger.info(
        "training on %d volumes, validating on %d, device %s",
        len(datalist["training"]),
        len(datalist["validation"]),
        torch_device,
    )
    parser = load_config(
        out,
        ["train.json"],
        {"device": f"$torch.device('{torch_device}')", "resume": resume, "dataset_dir": str(out)},
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
    return out
