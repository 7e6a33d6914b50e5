"""End to end: phantoms → short training → batch inference on held-out phantoms → Dice well above chance."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from covid_monai.demo import run_demo

pytestmark = pytest.mark.slow


def test_short_training_beats_chance_on_held_out_phantoms(tmp_path, capsys):
    means = run_demo(tmp_path, n_train=8, n_test=2, epochs=25, device="cpu", seed=7, knobs={"val_interval": 5})
    report = capsys.readouterr().out
    assert "held-out phantom Dice" in report
    # chance level: calling the whole lung infected
    chance = []
    for label_path in sorted((tmp_path / "data" / "test" / "labels").glob("*.nii.gz")):
        label = np.asarray(nib.load(str(label_path)).dataobj) > 0
        lungs = np.asarray(nib.load(str(tmp_path / "data" / "test" / "lungs" / label_path.name)).dataobj) > 0
        chance.append(2 * (label & lungs).sum() / (label.sum() + lungs.sum()))
    assert means["dice"] > 0.5
    assert means["dice"] > 4 * max(chance)
    # the run left a complete trained bundle and Slicer-ready masks with the scans' geometry
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()
    for image_path in sorted((tmp_path / "data" / "test" / "images").glob("*.nii.gz")):
        mask = nib.load(str(tmp_path / "masks" / image_path.name.replace(".nii.gz", "_infection.nii.gz")))
        np.testing.assert_allclose(mask.affine, nib.load(str(image_path)).affine, atol=1e-5)
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3
