"""End to end: phantoms → short training → batch inference on held-out phantoms → Dice well above chance, and the
speed optimisations (bf16 autocast, lung crop) keep that Dice."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covid_monai.demo import run_demo
from covid_monai.evaluate import evaluate_folders
from covid_monai.inference import run_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    out = tmp_path_factory.mktemp("demo")
    means = run_demo(out, n_train=8, n_test=2, epochs=25, device="cpu", seed=7, knobs={"val_interval": 5})
    return out, means


def test_short_training_beats_chance_on_held_out_phantoms(demo, capsys):
    out, means = demo
    chance = []  # chance level: calling the whole lung infected
    for label_path in sorted((out / "data" / "test" / "labels").glob("*.nii.gz")):
        label = np.asarray(nib.load(str(label_path)).dataobj) > 0
        lungs = np.asarray(nib.load(str(out / "data" / "test" / "lungs" / label_path.name)).dataobj) > 0
        chance.append(2 * (label & lungs).sum() / (label.sum() + lungs.sum()))
    assert means["dice"] > 0.5
    assert means["dice"] > 4 * max(chance)
    assert (out / "bundle" / "models" / "model.pt").is_file()
    for image_path in sorted((out / "data" / "test" / "images").glob("*.nii.gz")):
        mask = nib.load(str(out / "masks" / image_path.name.replace(".nii.gz", "_infection.nii.gz")))
        np.testing.assert_allclose(mask.affine, nib.load(str(image_path)).affine, atol=1e-5)
    assert (out / "metrics.csv").read_text().count("\n") == 3


def _dice(out: Path, bundle: Path, images: Path, labels: Path, knobs: dict) -> float:
    run_batch([images], out, bundle, knobs=knobs, device="cpu", workers=0, progress=False)
    _, summary = evaluate_folders(out, labels)
    return summary["mean"]["dice"]


def test_speed_optimisations_keep_dice(demo, tmp_path):
    out, _ = demo
    images, labels, bundle = out / "data" / "test" / "images", out / "data" / "test" / "labels", out / "bundle"
    plain = _dice(tmp_path / "plain", bundle, images, labels, {"amp": False, "crop_to_lungs": False})
    autocast = _dice(tmp_path / "amp", bundle, images, labels, {"amp": True, "crop_to_lungs": False})
    cropped = _dice(tmp_path / "crop", bundle, images, labels, {"amp": False, "crop_to_lungs": True})
    both = _dice(tmp_path / "both", bundle, images, labels, {})
    assert abs(autocast - plain) <= 0.005
    # cropping changes the U-Net's view of the slice border; it may change Dice either way, it must not lose it
    assert cropped >= plain - 0.005 and both >= plain - 0.005
