"""Crashes and disk trouble: kill -9 in the middle of a batch or a training run loses nothing; full disks leave no
partial files; a fuzzed NIfTI either gives a mask with its geometry or a clean error."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covid_monai.cli import main
from covid_monai.inference import run_batch
from covid_monai.phantom import write_phantoms
from covid_monai.train import train_bundle
from tests.conftest import TINY_KNOBS

REPO = Path(__file__).resolve().parents[1]


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "covid_monai", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            pytest.fail("the process ended before the point where it was to be killed")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the process")
        time.sleep(0.02)


def test_kill_9_during_batch_leaves_only_complete_outputs_and_rerun_finishes(tmp_path, random_bundle):
    scans = tmp_path / "scans"
    write_phantoms(scans, n=8, shape=(64, 64, 16), seed=40)
    out = tmp_path / "out"
    args = ["infer", str(scans / "images"), "-o", str(out), "--bundle", str(random_bundle), "--device", "cpu",
            "--quiet", "--workers", "0", "--lungs"]
    process = _spawn(args)
    _wait_for(lambda: len(list(out.glob("*_infection.nii.gz"))) >= 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    survivors = sorted(out.glob("*_infection.nii.gz"))
    assert 2 <= len(survivors) < 8, "the kill must land in the middle of the batch"
    for path in survivors:  # every output under a final name is complete and loadable
        assert np.asarray(nib.load(str(path)).dataobj).shape == (64, 64, 16)
    json.loads((out / "summary.json").read_text())  # the summary is never torn
    results = run_batch([scans / "images"], out, random_bundle, device="cpu", workers=0, progress=False,
                        save_lungs=True)
    statuses = [r.status for r in results]
    assert statuses.count("skipped") >= len(survivors) - 1 and statuses.count("failed") == 0
    assert len(list(out.glob("*_infection.nii.gz"))) == 8
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files of the killed run remain"


def test_kill_9_during_training_then_resume_reaches_configured_epochs(tmp_path, phantoms):
    out = tmp_path / "bundle"
    epochs = 6
    knobs = {**TINY_KNOBS, "epochs": epochs, "val_interval": 2}
    overrides = [arg for key, value in knobs.items() for arg in (f"--{key}", json.dumps(value))]
    process = _spawn(["train", "--data", str(phantoms), "--out", str(out), "--device", "cpu",
                      "--val-fraction", "0.25", *overrides])
    latest = out / "models" / "latest.pt"
    _wait_for(latest.is_file, process, timeout=300)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(latest, map_location="cpu", weights_only=True)["trainer"]
    done_epochs = saved["iteration"] // saved["epoch_length"]
    assert 1 <= done_epochs < epochs, "the kill must land before the end of training"
    train_bundle(phantoms, out, knobs, device="cpu", resume=True)
    final = torch.load(latest, map_location="cpu", weights_only=True)["trainer"]
    assert final["iteration"] == epochs * final["epoch_length"]
    assert not [p for p in (out / "models").iterdir() if p.name.startswith(".")]


def test_full_disk_fails_the_case_and_leaves_no_partial_file(tmp_path, random_bundle, phantoms, monkeypatch):
    import covid_monai.io as io_module

    real_save = nib.save

    def save_then_fail(image, filename):
        real_save(image, filename)  # the temporary file is written, then the disk "fills up"
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_module.nib, "save", save_then_fail)
    out = tmp_path / "out"
    [result] = run_batch([phantoms / "images" / "phantom_000.nii.gz"], out, random_bundle, device="cpu", workers=0,
                         progress=False)
    assert result.status == "failed" and "No space left on device" in result.error
    assert sorted(p.name for p in out.iterdir()) == ["labels.ctbl", "lungs.ctbl", "summary.csv", "summary.json"]


def test_unwritable_output_folder_is_a_clear_error(tmp_path, random_bundle, phantoms, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    code = main(["infer", str(phantoms / "images" / "phantom_000.nii.gz"), "-o", str(blocker), "--bundle",
                 str(random_bundle), "--device", "cpu", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "out" in err and "Traceback" not in err
    assert blocker.read_text().startswith("a file")


_DTYPES = st.sampled_from([np.int16, np.uint8, np.int32, np.float32, np.float64])


@st.composite
def _nifti(draw):
    ndim = draw(st.sampled_from([2, 3, 3, 3, 4]))
    shape = [draw(st.integers(1, 24)) for _ in range(min(ndim, 3))]
    if ndim == 4:
        shape.append(draw(st.sampled_from([1, 1, 2])))
    dtype = draw(_DTYPES)
    low, high = (-1100, 1500) if np.dtype(dtype).kind != "u" else (0, 255)
    array = draw(st.integers(0, 2**31 - 1).map(
        lambda seed: np.random.default_rng(seed).uniform(low, high, size=shape).astype(dtype)))
    if draw(st.booleans()) and np.dtype(dtype).kind == "f":
        array.flat[0] = draw(st.sampled_from([np.nan, np.inf, 0.0]))
    spacing = [draw(st.floats(0.2, 12.0)) for _ in range(3)]
    linear = np.diag(spacing) * np.array([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    linear = linear[:, draw(st.permutations([0, 1, 2]))]
    angle = draw(st.floats(-0.5, 0.5))
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ linear
    affine[0, 1] += draw(st.sampled_from([0.0, 0.0, 0.3]))  # sometimes sheared
    affine[:3, 3] = [draw(st.floats(-500, 500)) for _ in range(3)]
    image = nib.Nifti1Image(array, affine)
    if draw(st.booleans()):
        image.header.set_slope_inter(draw(st.floats(0.5, 2.0)), draw(st.floats(-1024, 0)))
    return image


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=_nifti())
def test_fuzzed_nifti_gives_mask_with_geometry_or_clean_error(tmp_path_factory, random_bundle, image):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "scan.nii.gz"
    nib.save(image, path)
    [result] = run_batch([path], folder / "out", random_bundle, device="cpu", workers=0, progress=False)
    if result.status == "ok":
        mask = nib.load(str(folder / "out" / "scan_infection.nii.gz"))
        source = nib.load(str(path))
        assert mask.shape == source.shape[:3]
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    else:
        assert result.status == "failed" and result.error and "\n" not in result.error


def test_checkpoint_that_runs_code_is_refused(tmp_path, random_bundle):
    import shutil

    from covid_monai.inference import BatchSegmenter

    marker = tmp_path / "owned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bundle = tmp_path / "bundle"
    shutil.copytree(random_bundle, bundle)
    torch.save({"model": Exploit()}, bundle / "models" / "model.pt")
    with pytest.raises(ValueError, match="not a loadable weights-only checkpoint"):
        BatchSegmenter(bundle, device="cpu")
    assert not marker.exists(), "the pickle's code ran"
