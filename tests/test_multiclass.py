"""Multi-class bundles (``labels: multiclass``): 0/1/2 labels, a 3-class softmax network, 1 ground glass and
2 consolidation in the written masks, per-class metrics; binary bundles unchanged."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from covid_monai.bundle import create_bundle, load_config, run_workflow
from covid_monai.datalist import DataCheckError
from covid_monai.distributed import prepare_training
from covid_monai.evaluate import CLASS_METRICS, METRICS, compute_case_metrics, evaluate_folders, format_table
from covid_monai.grid import MaskFromSourceProbabilityd
from covid_monai.inference import BatchSegmenter, run_batch
from covid_monai.networks import is_multiclass
from covid_monai.preview import SLICER_COLOR_TABLES, slicer_color_tables
from covid_monai.train import train_bundle
from covid_monai.transforms import InfectionClassesd, InfectionProbabilityd, infection_classes
from tests.conftest import TINY_KNOBS

MULTICLASS = {**TINY_KNOBS, "labels": "multiclass"}
CONSOLIDATION_HU = -300.0  # infection voxels denser than this are labelled consolidation in the test data


@pytest.fixture(scope="module")
def multiclass_phantoms(tmp_path_factory, phantoms) -> Path:
    """The shared phantoms with 0/1/2 labels: infection above -300 HU is consolidation (2), the rest ground glass."""
    out = tmp_path_factory.mktemp("multiclass_phantoms")
    shutil.copytree(phantoms / "images", out / "images")
    (out / "labels").mkdir()
    for label_path in sorted((phantoms / "labels").glob("*.nii.gz")):
        label = nib.load(str(label_path))
        image = np.asanyarray(nib.load(str(phantoms / "images" / label_path.name)).dataobj)
        infection = np.asanyarray(label.dataobj) > 0
        classes = np.where(infection, np.where(image > CONSOLIDATION_HU, 2, 1), 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(classes, label.affine, label.header), str(out / "labels" / label_path.name))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, multiclass_phantoms) -> Path:
    out = tmp_path_factory.mktemp("multiclass") / "bundle"
    train_bundle(multiclass_phantoms, out, MULTICLASS, device="cpu", val_fraction=0.25)
    return out


def test_phantom_labels_hold_both_classes(multiclass_phantoms):
    values = set()
    for path in (multiclass_phantoms / "labels").glob("*.nii.gz"):
        values |= set(np.unique(np.asanyarray(nib.load(str(path)).dataobj)).tolist())
    assert values == {0, 1, 2}


def test_labels_knob_is_checked():
    assert is_multiclass("binary") is False and is_multiclass("multiclass", "dicece") is True
    with pytest.raises(ValueError, match="labels must be one of binary, multiclass"):
        is_multiclass("multi")
    with pytest.raises(ValueError, match="'bce' has no multi-class form"):
        is_multiclass("multiclass", "bce")
    assert is_multiclass("binary", "bce") is False


def test_infection_then_class_rule():
    # voxels: background, infection with more ground glass, infection with more consolidation, below threshold
    p = torch.tensor([[0.9, 0.3, 0.2, 0.55], [0.05, 0.4, 0.3, 0.4], [0.05, 0.3, 0.5, 0.05]])
    assert infection_classes(p).tolist() == [[0.0, 1.0, 2.0, 0.0]]
    assert infection_classes(p, threshold=0.4).tolist() == [[0.0, 1.0, 2.0, 1.0]]
    assert InfectionClassesd("pred")({"pred": p.numpy()})["pred"].tolist() == [[0.0, 1.0, 2.0, 0.0]]
    d = InfectionProbabilityd("pred")({"pred": p})
    torch.testing.assert_close(d["pred"], 1 - p[:1])
    torch.testing.assert_close(d["class_probability"], p[1:])


def test_classes_decided_on_the_scan_grid():
    """The network grid has half the scan's resolution: class borders fall between network voxels."""
    network_affine = torch.diag(torch.tensor([2.0, 2.0, 1.0, 1.0]))
    x = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 4, 2)
    ggo = (0.5 + (3.25 - x) / 8)[None]  # ground glass fades along x, consolidation grows: they cross at x = 3.25
    infection = torch.full((1, 8, 4, 2), 0.9)
    data = {
        "pred": MetaTensor((infection > 0.5).to(torch.uint8), affine=network_affine),
        "probability": MetaTensor(infection, affine=network_affine),
        "class_probability": MetaTensor(torch.cat([ggo, 1 - ggo]) * 0.9, affine=network_affine),
        "source_grid": {"affine": np.diag([1.0, 1.0, 1.0, 1.0]), "shape": (15, 7, 2)},
    }
    out = MaskFromSourceProbabilityd("pred", class_key="class_probability")(data)["pred"]
    assert tuple(out.shape) == (1, 15, 7, 2) and out.dtype == torch.uint8
    np.testing.assert_allclose(out.affine.numpy(), np.eye(4))
    # scan voxel i lies at network x = i / 2: ground glass up to voxel 6 (x = 3), consolidation from voxel 7 (x = 3.5)
    assert out[0, :, 0, 0].tolist() == [1] * 7 + [2] * 8
    binary = MaskFromSourceProbabilityd("pred")(data)["pred"]
    assert torch.equal(binary, (out > 0).to(torch.uint8))  # the same region, labelled 1


def test_multiclass_config_trains_a_3_class_softmax_network_with_deep_supervision(tmp_path):
    bundle = create_bundle(tmp_path / "b", {**MULTICLASS, "deep_supervision": 2, "loss_name": "dicefocal"})
    (bundle / "configs" / "datalist.json").write_text('{"training": [], "validation": []}')
    parser = load_config(bundle, ["train.json"], {"device": "cpu"})
    loss = parser.get_parsed_content("loss")
    assert type(loss).__name__ == "DeepSupervisionLoss"
    assert loss.loss.dice.softmax and loss.loss.to_onehot_y and not loss.loss.dice.sigmoid
    network = parser.get_parsed_content("network_def").train()
    outputs = network(torch.randn(2, 1, 48, 48))
    assert [tuple(o.shape[:2]) for o in outputs] == [(2, 3)] * 3
    label = torch.randint(0, 3, (2, 1, 48, 48)).float()
    value = loss(outputs, label)
    value.backward()
    assert torch.isfinite(value)
    assert list(parser.get_parsed_content("validate#key_metric")) == ["val_mean_dice"]
    assert parser.get_parsed_content("validate#key_metric")["val_mean_dice"].metric_fn.include_background is False
    with pytest.raises(RuntimeError, match="is_multiclass"):  # MONAI wraps the ValueError naming the loss
        load_config(bundle, ["train.json"], {"device": "cpu", "loss_name": "bce"}).get_parsed_content("loss")


def test_binary_bundle_config_is_unchanged(tmp_path):
    bundle = create_bundle(tmp_path / "b")
    (bundle / "configs" / "datalist.json").write_text('{"training": [], "validation": []}')
    parser = load_config(bundle, ["train.json"], {"device": "cpu"})
    loss = parser.get_parsed_content("loss")
    assert loss.dice.sigmoid and not loss.dice.softmax and not loss.dice.to_onehot_y
    assert parser.get_parsed_content("network_def").final_conv.out_channels == 1
    assert [type(t).__name__ for t in parser.get_parsed_content("train#postprocessing").transforms] == [
        "Lambdad", "Activationsd", "AsDiscreted"
    ]
    assert list(parser.get_parsed_content("validate#metrics")) == ["val_mean_dice", "val_mean_iou", "val_accuracy"]
    inference = load_config(bundle, ["inference.json"], {"device": "cpu"})
    steps = inference.get_parsed_content("postprocessing").transforms
    assert "InfectionProbabilityd" not in [type(t).__name__ for t in steps]
    assert next(t for t in steps if isinstance(t, MaskFromSourceProbabilityd)).class_key is None
    assert slicer_color_tables() == SLICER_COLOR_TABLES


def test_train_infer_writes_ground_glass_and_consolidation(trained, multiclass_phantoms, tmp_path):
    best = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert next(v for k, v in best.items() if k.startswith("final_conv") and v.dim() == 4).shape[0] == 3
    images = sorted((multiclass_phantoms / "images").glob("*.nii.gz"))[:2]
    results = run_batch(images, tmp_path / "pred", trained, device="cpu", save_probabilities=True, progress=False)
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    for image in images:
        source = nib.load(str(image))
        mask = nib.load(str(tmp_path / "pred" / image.name.replace(".nii.gz", "_infection.nii.gz")))
        assert mask.shape == source.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asanyarray(mask.dataobj)).tolist()) <= {0, 1, 2}
        probability = nib.load(str(tmp_path / "pred" / image.name.replace(".nii.gz", "_probability.nii.gz")))
        assert probability.shape == source.shape  # one channel: the infection probability 1 - p(background)
        values = np.asanyarray(probability.dataobj)
        assert values.min() >= 0.0 and values.max() <= 1.0
    table = (tmp_path / "pred" / "labels.ctbl").read_text()
    assert "1 ground_glass" in table and "2 consolidation" in table and "infection" not in table.split("\n", 1)[1]
    assert (tmp_path / "pred" / "lungs.ctbl").read_text() == SLICER_COLOR_TABLES["lungs.ctbl"]


@pytest.mark.parametrize(("bias", "label"), [([0.0, 3.0, 2.0], 1), ([0.0, 2.0, 3.0], 2)])
def test_the_larger_foreground_class_is_written(trained, multiclass_phantoms, tmp_path, bias, label):
    """A network whose output is its bias: every lung voxel infected, with the class of the larger bias."""
    bundle = tmp_path / "bundle"
    shutil.copytree(trained, bundle)
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    for key in state:
        if key.startswith("final_conv"):
            state[key] = torch.tensor(bias) if state[key].dim() == 1 else torch.zeros_like(state[key])
    torch.save(state, bundle / "models" / "model.pt")
    assert BatchSegmenter(bundle, device="cpu").multiclass
    image = sorted((multiclass_phantoms / "images").glob("*.nii.gz"))[0]
    (result,) = run_batch([image], tmp_path / "pred", bundle, device="cpu", progress=False)
    assert result.status == "ok", result.error
    mask = np.asanyarray(nib.load(str(tmp_path / "pred" / image.name.replace(".nii.gz", "_infection.nii.gz"))).dataobj)
    assert set(np.unique(mask).tolist()) == {0, label}
    assert (mask > 0).sum() > 1000  # the lungs and what touches them


def test_bundle_evaluation_reports_each_class(trained, multiclass_phantoms, tmp_path):
    """inference.json + evaluate.json on the validation case: covid-monai infer's mask, and per-class metrics.csv
    columns with the numbers covid-monai evaluate gives that mask."""
    out = tmp_path / "eval"
    parser = load_config(trained, ["inference.json", "evaluate.json"], {"device": "cpu", "output_dir": str(out)})
    run_workflow(parser)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", *METRICS, *CLASS_METRICS]
    assert len(rows) == 1 and rows[0]["case"].startswith("phantom_")
    name = f"{rows[0]['case']}_infection.nii.gz"
    (result,) = run_batch([multiclass_phantoms / "images" / f"{rows[0]['case']}.nii.gz"], tmp_path / "infer", trained,
                          device="cpu", workers=0, progress=False)
    assert result.status == "ok", result.error
    saved = np.asanyarray(nib.load(str(out / name)).dataobj)
    np.testing.assert_array_equal(saved, np.asanyarray(nib.load(str(tmp_path / "infer" / name)).dataobj))
    assert set(np.unique(saved).tolist()) <= {0, 1, 2}
    (label_dir := tmp_path / "labels").mkdir()
    shutil.copy(multiclass_phantoms / "labels" / f"{rows[0]['case']}.nii.gz", label_dir)
    (scored,), _ = evaluate_folders(tmp_path / "infer", label_dir)  # multi-class: infer's labels.ctbl says so
    assert set(CLASS_METRICS) <= set(scored)
    for metric in ("dice", *CLASS_METRICS):
        assert float(rows[0][metric]) == pytest.approx(scored[metric], abs=2e-6)
    summary = {r["statistic"]: r for r in csv.DictReader(open(out / "metrics_summary.csv", newline=""))}
    assert set(CLASS_METRICS) <= set(summary["mean"])


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(np.asarray(array, np.uint8), np.eye(4) if affine is None else affine), str(path))


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((10, 10, 10), np.uint8)
    label[0:4, 0:4, 0:4] = 1  # 64 ground glass
    label[5:9, 5:9, 5:9] = 2  # 64 consolidation
    pred = np.zeros_like(label)
    pred[0:4, 0:4, 0:3] = 1  # 48 ground glass, all right
    pred[0:4, 0:4, 3] = 2  # 16 of the ground glass called consolidation
    pred[5:9, 5:9, 5:9] = 2  # the consolidation found
    pred[5:9, 5:9, 9] = 1  # 16 false-positive ground glass
    return pred, label


def test_per_class_dice_by_hand():
    pred, label = _hand_case()
    m = compute_case_metrics(pred, label, classes={"ggo": 1, "consolidation": 2})
    assert list(m) == [*METRICS, *CLASS_METRICS]
    assert m["dice_ggo"] == pytest.approx(2 * 48 / (64 + 64))  # pred ggo 48 + 16 = 64, label 64, overlap 48
    assert m["dice_consolidation"] == pytest.approx(2 * 64 / (80 + 64))  # pred 16 + 64 = 80
    assert m["dice"] == pytest.approx(2 * 128 / (144 + 128))  # the union: 128 found of 128, 16 false positives
    binary = compute_case_metrics(pred, label)
    assert list(binary) == list(METRICS) and binary["dice"] == m["dice"]
    empty = compute_case_metrics(pred * (pred == 1), label * (label == 1), classes={"ggo": 1, "consolidation": 2})
    assert empty["dice_consolidation"] == 1.0  # no consolidation in either: 1, as for an empty binary case


def test_evaluate_folders_per_class_and_auto_detection(tmp_path):
    preds, labels = tmp_path / "preds", tmp_path / "labels"
    preds.mkdir()
    labels.mkdir()
    pred, label = _hand_case()
    _save(preds / "a_infection.nii.gz", pred)
    _save(labels / "a.nii.gz", label)
    binary_rows, _ = evaluate_folders(preds, labels)  # no labels.ctbl: binary, as before
    assert list(binary_rows[0]) == ["case", *METRICS]
    (preds / "labels.ctbl").write_text(slicer_color_tables(multiclass=True)["labels.ctbl"])
    out = tmp_path / "out"
    rows, summary = evaluate_folders(preds, labels, out)
    assert rows[0]["dice_ggo"] == pytest.approx(0.75) and rows[0]["dice_consolidation"] == pytest.approx(128 / 144)
    assert rows[0]["dice"] == binary_rows[0]["dice"]
    assert summary["mean"]["dice_ggo"] == pytest.approx(0.75) and summary["n"]["dice_consolidation"] == 1
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == "case," + ",".join([*METRICS, *CLASS_METRICS])
    assert "dice_consolidation" in (out / "metrics_summary.csv").read_text().splitlines()[0]
    assert "dice_ggo" in format_table(rows, summary).splitlines()[0]
    forced, _ = evaluate_folders(preds, labels, multiclass=False)
    assert list(forced[0]) == ["case", *METRICS]


def test_multiclass_metadata_describes_the_network(trained):
    from monai.bundle import verify_net_in_out

    configs = trained / "configs"
    verify_net_in_out(
        net_id="network_def", meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
        device="cpu", n=4, bundle_root=str(trained),
    )
    assert "2 consolidation" in (configs / "metadata.json").read_text()


def test_prepare_training_checks_labels_against_the_labels_knob(multiclass_phantoms, tmp_path):
    bundle = prepare_training(multiclass_phantoms, tmp_path / "multiclass", {"labels": "multiclass"})
    assert load_config(bundle, ("train.json",))["labels"] == "multiclass"
    assert (bundle / "configs" / "datalist.json").is_file()
    with pytest.raises(DataCheckError, match="label values"):
        prepare_training(multiclass_phantoms, tmp_path / "binary", {"labels": "binary"})
    assert not (tmp_path / "binary").exists()  # nothing written for data that fails the check
