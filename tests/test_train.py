"""Training curves: eval/training_curves.png from the TensorBoard events of training (loss, metrics per epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from covid_monai.train import read_training_curves, train_bundle, write_training_curves
from tests.conftest import TINY_KNOBS


def test_curves_are_per_epoch_means_of_the_logged_loss_and_the_logged_metrics(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    torch.save({"trainer": {"epoch_length": 3, "max_epochs": 4, "iteration": 12}}, bundle / "models" / "latest.pt")
    losses = [1.0, 0.8, 0.6, 0.5, 0.5, 0.2, 0.3, 0.3, 0.3, 0.1, 0.2, 0.0]
    with SummaryWriter(str(bundle / "eval")) as trainer_writer, SummaryWriter(str(bundle / "eval")) as val_writer:
        for step, loss in enumerate(losses, start=1):
            trainer_writer.add_scalar("train_loss", loss, step)
        for epoch in (2, 4):
            val_writer.add_scalar("val_mean_dice", 0.2 * epoch, epoch)
            val_writer.add_scalar("val_accuracy", 0.9, epoch)
    curves = read_training_curves(bundle)
    assert curves["loss"] == pytest.approx({1: 0.8, 2: 0.4, 3: 0.3, 4: 0.1})
    assert curves["val_mean_dice"] == pytest.approx({2: 0.4, 4: 0.8})
    assert set(curves) == {"loss", "val_mean_dice", "val_accuracy"}
    path = write_training_curves(bundle)
    assert path == bundle / "eval" / "training_curves.png"
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (1000, 400)
        assert np.asarray(picture.convert("L")).std() > 5
    assert read_training_curves(tmp_path / "none") == {} and write_training_curves(tmp_path / "none") is None


def test_train_writes_training_curves(tmp_path, phantoms):
    bundle = train_bundle(phantoms, tmp_path / "bundle", {**TINY_KNOBS, "epochs": 2}, device="cpu")
    assert (bundle / "eval" / "training_curves.png").is_file()
    curves = read_training_curves(bundle)
    assert sorted(curves["loss"]) == [1, 2] and all(np.isfinite(v) for v in curves["loss"].values())
    for metric in ("val_mean_dice", "val_mean_iou", "val_accuracy"):
        assert sorted(curves[metric]) == [1, 2], metric
