"""Ignite handlers the bundle configs use where MONAI has none."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from covid_monai.io import atomic_path

__all__ = ["LatestCheckpointSaver", "ResumeCheckpointLoader", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash at any moment leaves either the previous complete file or the new complete file, never a torn one.

    Args:
        obj: what to save (typically a dict of state dicts).
        path: destination file.

    Example:
        >>> atomic_torch_save({"model": {}}, "/tmp/latest.pt")
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class LatestCheckpointSaver:
    """Save the full training state to one fixed file at the end of every epoch, atomically.

    The file holds ``{name: obj.state_dict()}`` for every object in ``save_dict`` (model, optimizer,
    scheduler) plus ``"trainer"``, the engine the handler is attached to (its epoch and iteration counters), so
    :class:`ResumeCheckpointLoader` restores it and training resumes at the next epoch.

    Args:
        save_path: the checkpoint file, e.g. ``models/latest.pt``.
        save_dict: objects with ``state_dict()``.
        interval: save every ``interval`` epochs (the last epoch is always saved).

    Example:
        >>> LatestCheckpointSaver("models/latest.pt", {"model": net, "optimizer": opt}).attach(trainer)
    """

    def __init__(self, save_path: str | os.PathLike, save_dict: Mapping[str, Any], interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"checkpoint interval must be >= 1, got {interval}")
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.interval = interval

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine``'s epoch-completed event; the engine's state is saved too."""
        self.save_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Save when the epoch is a multiple of the interval or the last one."""
        epoch = engine.state.epoch
        if epoch % self.interval and epoch != engine.state.max_epochs:
            return
        atomic_torch_save({name: obj.state_dict() for name, obj in self.save_dict.items()}, self.save_path)


class ResumeCheckpointLoader:
    """Resume training from a :class:`LatestCheckpointSaver` file: model, optimizer, scheduler and epoch.

    Wraps MONAI's ``CheckpointLoader`` (which loads with ``weights_only=True``) and adds the engine it is attached
    to, so the trainer's epoch counter is restored and ``max_epochs`` is still the configured one. A missing,
    corrupt or mismatched checkpoint raises an error naming the file: a resume never silently starts afresh.

    Args:
        load_path: the checkpoint written by :class:`LatestCheckpointSaver`.
        load_dict: the objects to restore (``model``, ``optimizer``, ``lr_scheduler``).
        map_location: device to map the tensors to.

    Example:
        >>> ResumeCheckpointLoader("models/latest.pt", {"model": net, "optimizer": opt}).attach(trainer)
    """

    def __init__(
        self, load_path: str | os.PathLike, load_dict: Mapping[str, Any], map_location: Any = None
    ) -> None:
        self.load_path = Path(load_path)
        self.load_dict = dict(load_dict)
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        """Check the file and load it when ``engine`` starts."""
        from monai.handlers import CheckpointLoader

        if not self.load_path.is_file():
            raise FileNotFoundError(f"{self.load_path}: cannot resume, the checkpoint does not exist")
        try:
            saved = torch.load(self.load_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = " ".join(str(exc).split())[:200]
            raise ValueError(f"{self.load_path}: cannot resume, unreadable or unsafe checkpoint ({reason})") from exc
        wanted = set(self.load_dict) | {"trainer"}
        missing = sorted(wanted - set(saved) if isinstance(saved, Mapping) else wanted)
        if missing:
            raise ValueError(f"{self.load_path}: cannot resume, the checkpoint lacks {', '.join(missing)}")
        loader = CheckpointLoader(
            str(self.load_path), {**self.load_dict, "trainer": engine}, strict=True, map_location=self.map_location
        )
        loader.attach(engine)
