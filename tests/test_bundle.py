"""Every bundle config runs on tiny phantoms through overrides, the way the Model Zoo tests its bundles."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from covid_monai.bundle import (
    TEMPLATE_BUNDLE,
    create_bundle,
    load_config,
    parse_overrides,
    read_knobs,
    validate_override_value,
)
from covid_monai.errors import UsageError
from covid_monai.handlers import averaged_weights
from covid_monai.inference import run_batch
from covid_monai.train import train_bundle
from tests.conftest import TINY_KNOBS

CONFIGS = TEMPLATE_BUNDLE / "configs"


def _bundle_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env,
            capture_output=True, encoding="utf-8", errors="replace", timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, phantoms) -> Path:
    """A tiny bundle trained for one epoch on the phantoms."""
    out = tmp_path_factory.mktemp("trained") / "bundle"
    train_bundle(phantoms, out, TINY_KNOBS, device="cpu", val_fraction=0.25)
    return out


def test_train_writes_best_and_latest_checkpoints(trained):
    best = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    latest = torch.load(trained / "models" / "latest.pt", map_location="cpu", weights_only=True)
    assert set(latest) == {"model", "optimizer", "lr_scheduler", "trainer", "weight_averaging"}
    assert latest["weight_averaging"] == {}  # ema_decay 0: nothing averaged
    assert latest["trainer"]["iteration"] == latest["trainer"]["epoch_length"]  # one epoch done
    assert set(best) == set(latest["model"])
    network = load_config(trained, ["inference.json"], {"device": "cpu"}).get_parsed_content("network_def")
    network.load_state_dict(best)  # the trained bundle's inference config rebuilds the trained network
    assert read_knobs(trained)["network_width"] == TINY_KNOBS["network_width"]


def test_deep_supervision_trains_and_infers(tmp_path, phantoms):
    """``deep_supervision``: MONAI's DeepSupervisionLoss on the heads in training; inference runs the main output."""
    out = tmp_path / "bundle"
    train_bundle(phantoms, out, {**TINY_KNOBS, "deep_supervision": 2}, device="cpu", val_fraction=0.25)
    parser = load_config(out, ["train.json"], {"device": "cpu"})
    assert type(parser.get_parsed_content("loss")).__name__ == "DeepSupervisionLoss"
    best = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert {k.split(".")[1] for k in best if k.startswith("aux_heads.")} == {"0", "1"}
    latest = torch.load(out / "models" / "latest.pt", map_location="cpu", weights_only=True)
    assert latest["trainer"]["iteration"] == latest["trainer"]["epoch_length"]  # the epoch ran, metrics included
    image = sorted((phantoms / "images").glob("*.nii.gz"))[0]
    (result,) = run_batch([image], tmp_path / "pred", out, device="cpu", workers=0, progress=False)
    assert result.status == "ok", result.error
    mask = nib.load(str(tmp_path / "pred" / image.name.replace(".nii.gz", "_infection.nii.gz")))
    assert mask.shape == nib.load(str(image)).shape


def test_neighbour_slices_train_and_infer(tmp_path, phantoms):
    """``context_slices: 1`` (2.5D): a 3-channel network trained on neighbour stacks segments whole scans."""
    out = tmp_path / "bundle"
    train_bundle(phantoms, out, {**TINY_KNOBS, "context_slices": 1}, device="cpu", val_fraction=0.25)
    best = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    first_convolution = next(v for v in best.values() if v.dim() == 4)
    assert first_convolution.shape[1] == 3
    parser = load_config(out, ["inference.json"], {"device": "cpu"})
    assert parser.get_parsed_content("network_def").load_state_dict(best)  # inference rebuilds the 3-channel network
    image = sorted((phantoms / "images").glob("*.nii.gz"))[0]
    (result,) = run_batch([image], tmp_path / "pred", out, device="cpu", workers=0, progress=False)
    assert result.status == "ok", result.error
    mask = nib.load(str(tmp_path / "pred" / image.name.replace(".nii.gz", "_infection.nii.gz")))
    assert mask.shape == nib.load(str(image)).shape
    np.testing.assert_allclose(mask.affine, nib.load(str(image)).affine)


@pytest.mark.parametrize("mode", ["volume", "window"])
def test_intensity_normalization_in_training_and_inference(tmp_path, phantoms, mode):
    """Training and inference normalise alike; with ``window`` a voxel's value does not depend on the rest of the
    scan (more lesion elsewhere leaves it unchanged), with ``volume`` (z-score per volume) it does."""
    bundle = create_bundle(tmp_path / "bundle", {**TINY_KNOBS, "intensity_normalization": mode})
    image = sorted((phantoms / "images").glob("*.nii.gz"))[0]
    original = nib.load(str(image))
    hu = np.asarray(original.dataobj).copy()
    hu[24:40, 24:40, 8:] = -300  # a large 'lesion' inside the body, away from the first slices
    more_lesion = tmp_path / "more_lesion.nii.gz"
    nib.save(nib.Nifti1Image(hu, original.affine, original.header), str(more_lesion))
    from monai.transforms import Compose

    train = Compose(load_config(bundle, ["train.json"], {"device": "cpu"}).get_parsed_content("volume_transforms"))
    infer = load_config(bundle, ["inference.json"], {"device": "cpu", "crop_to_lungs": False})
    infer = infer.get_parsed_content("preprocessing")
    label = str(phantoms / "labels" / image.name)
    for path in (image, more_lesion):
        trained_on = train({"image": str(path), "label": label})["image"]
        inferred_on = infer({"image": str(path)})["image"]
        np.testing.assert_allclose(trained_on.numpy(), inferred_on.numpy(), atol=1e-4)  # two resamplers
        if mode == "window":
            # the HU window [-1250, 250] to [-1, 1]: the scan's air (-1024 HU) maps back exactly
            assert float(inferred_on.min()) * 750 - 500 == pytest.approx(max(float(hu.min()), -1250), abs=0.1)
            assert float(inferred_on.max()) <= 1.0 + 1e-6
        else:
            assert abs(float(inferred_on.mean())) < 1e-3 and float(inferred_on.std()) == pytest.approx(1.0, abs=0.01)
    first = [infer({"image": str(path)})["image"][..., :2].numpy() for path in (image, more_lesion)]
    if mode == "window":
        np.testing.assert_allclose(first[0], first[1], atol=1e-6)
    else:
        assert np.abs(first[0] - first[1]).max() > 0.01


def test_unknown_intensity_normalization_is_refused(tmp_path):
    from covid_monai.transforms import intensity_normalization

    with pytest.raises(ValueError, match="intensity_normalization must be one of volume, window"):
        intensity_normalization("image", "percentile", [-1250, 250])
    with pytest.raises(ValueError, match="high > low"):
        intensity_normalization("image", "window", [250, -1250])


def test_weight_averaging_validates_saves_and_resumes_the_average(tmp_path, phantoms):
    """``ema_decay``: the network validated and saved as model.pt is the moving average, and resume keeps it."""
    out = tmp_path / "bundle"
    knobs = {**TINY_KNOBS, "ema_decay": 0.9}
    train_bundle(phantoms, out, knobs, device="cpu", val_fraction=0.25)
    latest = torch.load(out / "models" / "latest.pt", map_location="cpu", weights_only=True)
    steps = latest["trainer"]["iteration"]
    assert int(latest["weight_averaging"]["n_averaged"]) == steps > 1
    averaged = averaged_weights(latest["weight_averaging"])
    best = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(best) == set(latest["model"])
    assert all(torch.equal(best[k], averaged[k]) for k in best)  # the last epoch validated = the average
    assert not all(torch.equal(best[k], latest["model"][k]) for k in best)  # ...not the trained weights
    train_bundle(phantoms, out, {**knobs, "epochs": 2}, device="cpu", resume=True)
    resumed = torch.load(out / "models" / "latest.pt", map_location="cpu", weights_only=True)
    assert int(resumed["weight_averaging"]["n_averaged"]) == 2 * steps  # the same average continued
    evaluation = load_config(out, ["inference.json", "evaluate.json"], {"device": "cpu"})
    # evaluate.json scores inference.json's network, model.pt loaded (the average), not a fresh training state
    assert evaluation.get_parsed_content("evaluator").network is evaluation.get_parsed_content("network")
    assert Path(evaluation.get_parsed_content("ckpt_path")) == out.resolve() / "models" / "model.pt"
    image = sorted((phantoms / "images").glob("*.nii.gz"))[0]
    (result,) = run_batch([image], tmp_path / "pred", out, device="cpu", workers=0, progress=False)
    assert result.status == "ok", result.error


def test_resume_continues_to_configured_epochs(tmp_path, phantoms):
    out = tmp_path / "bundle"
    train_bundle(phantoms, out, TINY_KNOBS, device="cpu", val_fraction=0.25)
    first = torch.load(out / "models" / "latest.pt", map_location="cpu", weights_only=True)
    # resuming a finished run trains nothing more: a silent fresh start would change the weights
    train_bundle(phantoms, out, TINY_KNOBS, device="cpu", resume=True)
    same = torch.load(out / "models" / "latest.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(first["model"][k], same["model"][k]) for k in first["model"])
    train_bundle(phantoms, out, {**TINY_KNOBS, "epochs": 2}, device="cpu", resume=True)
    second = torch.load(out / "models" / "latest.pt", map_location="cpu", weights_only=True)["trainer"]
    assert first["trainer"]["iteration"] == first["trainer"]["epoch_length"]
    assert second["iteration"] == 2 * first["trainer"]["iteration"]  # exactly one more epoch
    assert second["max_epochs"] == 2


def test_resume_refuses_corrupt_checkpoint(tmp_path, phantoms):
    out = tmp_path / "bundle"
    train_bundle(phantoms, out, TINY_KNOBS, device="cpu", val_fraction=0.25)
    (out / "models" / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="latest.pt: cannot resume"):
        train_bundle(phantoms, out, {**TINY_KNOBS, "epochs": 2}, device="cpu", resume=True)


@pytest.fixture(scope="module")
def infecting_bundle(tmp_path_factory, random_bundle, phantoms) -> Path:
    """The random bundle with its output bias shifted so that about half of each scan is called infected."""
    bundle = tmp_path_factory.mktemp("infecting") / "bundle"
    shutil.copytree(random_bundle, bundle)
    network = load_config(bundle, ["inference.json"], {"device": "cpu"}).get_parsed_content("network_def").eval()
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    image = np.asarray(nib.load(str(sorted((phantoms / "images").glob("*.nii.gz"))[0])).dataobj, np.float32)
    axial = torch.as_tensor((image - image.mean()) / image.std())[None, None, :64, :64, image.shape[2] // 2]
    with torch.no_grad():
        median = float(network(axial).median())
    bias = next(k for k in state if k.startswith("final_conv") and state[k].dim() == 1)
    state[bias] = state[bias] - median
    torch.save(state, bundle / "models" / "model.pt")
    return bundle


def test_composed_bundle_evaluation_scores_the_masks_infer_writes(infecting_bundle, phantoms, tmp_path):
    """``monai.bundle run`` of inference.json + evaluate.json segments the validation list exactly as
    ``covid-monai infer`` does (the same files, voxel for voxel and header for header) and its metrics.csv holds
    the numbers ``covid-monai evaluate`` gives those masks."""
    from covid_monai.datalist import build_datalist, write_datalist
    from covid_monai.evaluate import METRICS, evaluate_folders

    datalist = build_datalist(phantoms, val_fraction=0.75)  # 3 of the 4 phantoms (RAS, LPS, LAS, RPI) validate
    write_datalist(datalist, tmp_path / "datalist.json")
    out = tmp_path / "eval"
    _bundle_cli(
        "run",
        "--config_file", "['configs/inference.json','configs/evaluate.json']",
        "--dataset_dir", str(phantoms),
        "--data_list_file_path", str(tmp_path / "datalist.json"),
        "--output_dir", str(out),
        "--device", "cpu",
        cwd=infecting_bundle,
    )
    cases = [Path(item["image"]) for item in datalist["validation"]]
    assert len(cases) == 3
    results = run_batch(cases, tmp_path / "infer", infecting_bundle, device="cpu", workers=0, progress=False)
    assert [r.status for r in results] == ["ok"] * 3
    infected = 0
    for case in cases:
        name = case.name.replace(".nii.gz", "_infection.nii.gz")
        ours, infer = nib.load(str(out / name)), nib.load(str(tmp_path / "infer" / name))
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(infer.dataobj))
        assert ours.header.binaryblock == infer.header.binaryblock  # the same geometry, codes and data type
        infected += int(np.count_nonzero(np.asanyarray(ours.dataobj)))
    assert infected > 1000  # masks with something in them: a comparison of empty masks would prove nothing
    (labels := tmp_path / "labels").mkdir()
    for item in datalist["validation"]:
        shutil.copy(item["label"], labels)
    scored, _ = evaluate_folders(tmp_path / "infer", labels)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", *METRICS]
    assert [r["case"] for r in rows] == [r["case"] for r in scored]
    for row, expected in zip(rows, scored, strict=True):
        for metric in METRICS:
            assert float(row[metric]) == pytest.approx(expected[metric], abs=2e-6, nan_ok=True), metric
    summary = {r["statistic"]: r for r in csv.DictReader(open(out / "metrics_summary.csv", newline=""))}
    assert float(summary["mean"]["dice"]) == pytest.approx(np.mean([r["dice"] for r in scored]), abs=2e-6)


def test_verify_net_in_out_and_torchscript_export(trained, tmp_path):
    _bundle_cli(
        "verify_net_in_out", "network_def",
        "--meta_file", "configs/metadata.json",
        "--config_file", "configs/inference.json",
        "--device", "cpu",
        "--n", "4",
        cwd=trained,
    )
    exported = tmp_path / "model.ts"
    _bundle_cli(
        "ckpt_export", "network_def",
        "--filepath", str(exported),
        "--ckpt_file", "models/model.pt",
        "--meta_file", "configs/metadata.json",
        "--config_file", "configs/inference.json",
        cwd=trained,
    )
    scripted = torch.jit.load(str(exported))
    assert scripted(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_create_bundle_rejects_unknown_knobs_and_code(tmp_path):
    with pytest.raises(ValueError, match="netwrok_width"):
        create_bundle(tmp_path / "b", {"netwrok_width": 8})
    with pytest.raises(ValueError, match="code or references"):
        create_bundle(tmp_path / "c", {"epochs": "$__import__('os').system('true')"})
    with pytest.raises(ValueError):
        validate_override_value("pixdim", [1, "@network"])


def test_parse_overrides_json_values_and_strings():
    assert parse_overrides(["--epochs", "3", "--pixdim=[1.5, 1.5, -1]", "--network-norm", "batch"]) == {
        "epochs": 3,
        "pixdim": [1.5, 1.5, -1],
        "network_norm": "batch",
    }


@pytest.mark.parametrize("tokens", [["--epochs"], ["epochs", "3"], ["--loss_name", "$print(1)"], ["--x", "@network"]])
def test_parse_overrides_refuses_bad_tokens_and_code(tokens):
    with pytest.raises(UsageError):
        parse_overrides(tokens)


def test_knobs_shared_by_train_and_inference_agree():
    train, infer = read_knobs(TEMPLATE_BUNDLE, "train.json"), read_knobs(TEMPLATE_BUNDLE, "inference.json")
    shared = (set(train) & set(infer)) - {"dataset_dir", "amp"}  # data location and precision differ by purpose
    assert {"pixdim", "hu_window", "intensity_normalization", "network_width", "network_norm", "context_slices",
            "threshold"} <= shared
    assert {k: train[k] for k in shared} == {k: infer[k] for k in shared}


@pytest.mark.parametrize(
    ("override", "loss", "metric"),
    [("seed_bce_accuracy.json", "BCEWithLogitsLoss", "val_accuracy"), ("seed_bce_iou.json", "BCEWithLogitsLoss",
     "val_mean_iou"), ("seed_dice_dice.json", "DiceLoss", "val_mean_dice")],
)
def test_seed_model_configs(tmp_path, override, loss, metric):
    bundle = create_bundle(tmp_path / "b")
    (bundle / "configs" / "datalist.json").write_text('{"training": [], "validation": []}')
    parser = load_config(bundle, ["train.json", override], {"device": "cpu"})
    assert type(parser.get_parsed_content("loss")).__name__ == loss
    assert list(parser.get_parsed_content("validate#key_metric")) == [metric]
    network = parser.get_parsed_content("network_def")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in network.modules())


def test_zoo_style_run_trains_from_dataset_dir_with_device_string(tmp_path):
    """``monai.bundle run ... --dataset_dir D --device cpu`` with no datalist: ``D/images`` + ``D/labels``, a fifth
    validating (seeded), as Model Zoo bundles glob their data; the multi-GPU configs take the string too."""
    from covid_monai.datalist import DataCheckError, bundle_datalist
    from covid_monai.phantom import write_phantoms

    bundle = create_bundle(tmp_path / "bundle", TINY_KNOBS)
    data = tmp_path / "data"
    write_phantoms(data, n=3, shape=(48, 48, 12), seed=5)
    assert not (bundle / "configs" / "datalist.json").exists()
    parser = load_config(bundle, ["train.json"], {"dataset_dir": str(data)})
    train, val = parser.get_parsed_content("train_datalist"), parser.get_parsed_content("val_datalist")
    assert (len(train), len(val)) == (2, 1) and not {d["image"] for d in train} & {d["image"] for d in val}
    assert all(Path(d["label"]).parent == data / "labels" for d in train + val)
    with pytest.raises(DataCheckError, match=r"(?s)no datalist file .* no training data in .*nothing/images: folder"):
        bundle_datalist(bundle / "configs" / "datalist.json", tmp_path / "nothing", "training")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    for launcher, configs, models in (
        ([], "configs/train.json", bundle / "models"),
        (["torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m"],  # the multi-GPU configs, gloo
         "['configs/train.json','configs/multi_gpu_train.json']", tmp_path / "ddp_models"),
    ):
        command = [sys.executable, "-m", *launcher, "monai.bundle", "run", "--config_file", configs, "--dataset_dir",
                   str(data), "--device", "cpu", "--epochs", "1", "--ckpt_dir", str(models)]
        result = subprocess.run(command, cwd=bundle, env=env,
            capture_output=True, encoding="utf-8", errors="replace", timeout=1500)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert (models / "latest.pt").is_file() and (models / "model.pt").is_file()
