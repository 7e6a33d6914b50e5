"""Tests for covid_monai.evaluate: MONAI metrics per case, empty-case conventions, folders, CSVs, HD95 in mm."""

from __future__ import annotations

import csv
import doctest
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, list_data_collate
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import HausdorffDistanceMetric
from scipy import ndimage
from scipy.spatial.distance import cdist

import covid_monai.evaluate
from covid_monai.evaluate import (
    METRICS,
    SpacingHausdorffDistanceMetric,
    compute_case_metrics,
    evaluate_folders,
    format_table,
)


def _cubes(shape=(10, 10, 10)) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(shape, np.uint8)
    label[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred = np.zeros(shape, np.uint8)
    pred[3:7, 2:6, 2:6] = 1  # shifted by one voxel along axis 0: 48 shared voxels
    return pred, label


def _hd95_brute_force(pred: np.ndarray, label: np.ndarray, spacing) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the surface voxels, by brute force."""

    def surface(m):
        m = m.astype(bool)
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing, dtype=float)

    d = cdist(surface(pred), surface(label))
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def _single_voxels(offset: int, shape=(12, 8, 8)) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(shape, np.uint8)
    label[2, 4, 4] = 1
    pred = np.zeros(shape, np.uint8)
    pred[2 + offset, 4, 4] = 1
    return pred, label


def test_hand_computed_overlap_metrics():
    pred, label = _cubes()
    m = compute_case_metrics(pred, label, spacing=1.0)
    tp, fp, fn = 48, 16, 16
    tn = 1000 - tp - fp - fn
    assert m["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # 0.75
    assert m["iou"] == pytest.approx(tp / (tp + fp + fn))  # 0.6
    assert m["accuracy"] == pytest.approx((tp + tn) / 1000)
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert list(m) == list(METRICS)
    assert all(isinstance(v, float) for v in m.values())
    # labels with other positive values are binarised
    assert compute_case_metrics(pred * 2, label * 3)["dice"] == pytest.approx(0.75)


def test_hd95_in_mm_and_scales_with_spacing():
    pred, label = _single_voxels(4)
    assert compute_case_metrics(pred, label, spacing=(1.0, 1.0, 1.0))["hd95"] == pytest.approx(4.0)
    assert compute_case_metrics(pred, label, spacing=(2.0, 1.0, 1.0))["hd95"] == pytest.approx(8.0)
    assert compute_case_metrics(pred, label, spacing=(1.0, 3.0, 3.0))["hd95"] == pytest.approx(4.0)
    pred, label = _cubes((12, 12, 12))
    pred[3:5, 3:5, 6:9] = 1  # a bump, so that the surface distances are not all equal
    base = compute_case_metrics(pred, label, spacing=1.0)["hd95"]
    assert base > 0
    assert compute_case_metrics(pred, label, spacing=2.5)["hd95"] == pytest.approx(2.5 * base, rel=1e-5)
    for spacing in [(1.0, 1.0, 1.0), (0.7, 0.7, 5.0), (3.0, 1.0, 0.5)]:
        got = compute_case_metrics(pred, label, spacing=spacing)["hd95"]
        assert got == pytest.approx(_hd95_brute_force(pred, label, spacing), rel=1e-4), spacing


def test_empty_cases():
    empty = np.zeros((8, 8, 8), np.uint8)
    some = empty.copy()
    some[2:4, 2:4, 2:4] = 1
    both = compute_case_metrics(empty, empty)
    assert both["dice"] == 1.0 and both["iou"] == 1.0 and both["hd95"] == 0.0
    assert both["accuracy"] == 1.0 and both["specificity"] == 1.0 and math.isnan(both["sensitivity"])
    fp_only = compute_case_metrics(some, empty)
    assert fp_only["dice"] == 0.0 and fp_only["iou"] == 0.0 and math.isnan(fp_only["hd95"])
    assert math.isnan(fp_only["sensitivity"]) and fp_only["specificity"] == pytest.approx(1 - 8 / 512)
    missed = compute_case_metrics(empty, some)
    assert missed["dice"] == 0.0 and missed["iou"] == 0.0 and math.isnan(missed["hd95"])
    assert missed["sensitivity"] == 0.0 and missed["specificity"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        compute_case_metrics(empty, empty[:4])


def _save(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array, np.uint8), affine), str(path))


@pytest.fixture
def folders(tmp_path):
    preds, labels = tmp_path / "preds", tmp_path / "labels"
    preds.mkdir()
    labels.mkdir()
    affine_a = np.diag([2.0, 1.0, 1.0, 1.0])
    affine_b = np.array([[0, 0, 1.5, -10], [-0.8, 0, 0, 20], [0, 0.8, 0, 5], [0, 0, 0, 1.0]])
    pred_a, label_a = _single_voxels(3)
    pred_b, label_b = _cubes()
    _save(labels / "case_a.nii.gz", label_a * 2, affine_a)  # label values > 1 are binarised
    _save(preds / "case_a_infection.nii.gz", pred_a, affine_a)
    _save(labels / "case_b.nii", label_b, affine_b)
    _save(preds / "case_b_infection.nii", pred_b, affine_b)
    _save(labels / "case_c.nii.gz", np.zeros((6, 6, 6)), np.eye(4))
    _save(preds / "case_c_infection.nii.gz", np.zeros((6, 6, 6)), np.eye(4))
    _save(preds / "unlabelled_infection.nii.gz", np.zeros((6, 6, 6)), np.eye(4))  # ignored
    return preds, labels, {"a": (pred_a, label_a, (2.0, 1.0, 1.0)), "b": (pred_b, label_b, (0.8, 0.8, 1.5))}


def test_evaluate_folders_rows_summary_and_csv(folders, tmp_path):
    preds, labels, cases = folders
    out = tmp_path / "out"
    rows, summary = evaluate_folders(preds, labels, out)
    assert [r["case"] for r in rows] == ["case_a", "case_b", "case_c"]
    assert rows[0]["hd95"] == pytest.approx(6.0)  # 3 voxels along axis 0 at 2 mm
    pred_b, label_b, spacing_b = cases["b"]
    assert rows[1] == {"case": "case_b", **compute_case_metrics(pred_b, label_b, spacing_b)}
    assert rows[2]["dice"] == 1.0 and rows[2]["hd95"] == 0.0  # both empty
    assert summary["mean"]["dice"] == pytest.approx(np.mean([0.0, 0.75, 1.0]))
    assert summary["std"]["dice"] == pytest.approx(np.std([0.0, 0.75, 1.0], ddof=1))
    assert summary["median"]["dice"] == pytest.approx(0.75)
    assert summary["min"]["hd95"] == 0.0 and summary["max"]["hd95"] == pytest.approx(6.0)
    assert summary["n"]["sensitivity"] == 2  # undefined for the empty label of case_c
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == ["case_a", "case_b", "case_c"]
    assert list(table[0]) == ["case", *METRICS]
    assert float(table[1]["dice"]) == pytest.approx(0.75, abs=1e-6)
    assert table[2]["sensitivity"] == "nan"
    with open(out / "metrics_summary.csv", newline="") as f:
        stats = {r["statistic"]: r for r in csv.DictReader(f)}
    assert list(stats) == ["mean", "std", "median", "min", "max", "n"]
    assert float(stats["mean"]["iou"]) == pytest.approx(summary["mean"]["iou"], abs=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics_summary.csv"]  # no temp files left
    text = format_table(rows, summary)
    assert "case_b" in text and "0.7500" in text and "mean" in text
    assert len(text.splitlines()) == 1 + 3 + 1 + 6
    # without out_dir nothing is written
    before = sorted(p for p in tmp_path.rglob("*"))
    rows2, _ = evaluate_folders(preds, labels)
    assert [r["dice"] for r in rows2] == [r["dice"] for r in rows]
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_geometry_mismatch_names_the_file(folders):
    preds, labels, _ = folders
    pred = preds / "case_a_infection.nii.gz"
    _save(pred, _single_voxels(3)[0], np.diag([2.0, 1.0, 1.001, 1.0]))
    with pytest.raises(ValueError, match=r"case_a_infection\.nii\.gz: affine differs"):
        evaluate_folders(preds, labels)
    _save(pred, np.zeros((12, 8, 9)), np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"case_a_infection\.nii\.gz: shape \(12, 8, 9\)"):
        evaluate_folders(preds, labels)
    # an affine difference below the tolerance is accepted
    _save(pred, _single_voxels(3)[0], np.diag([2.0, 1.0, 1.0 + 1e-6, 1.0]))
    rows, _ = evaluate_folders(preds, labels)
    assert rows[0]["hd95"] == pytest.approx(6.0)


def test_missing_predictions_are_listed(folders):
    preds, labels, _ = folders
    (preds / "case_a_infection.nii.gz").unlink()
    (preds / "case_c_infection.nii.gz").unlink()
    with pytest.raises(ValueError, match="2 of 3.*case_a, case_c"):
        evaluate_folders(preds, labels)
    with pytest.raises(ValueError, match="no .nii"):
        evaluate_folders(preds, preds / "nowhere")


def _meta(array: np.ndarray, spacing) -> MetaTensor:
    return MetaTensor(
        torch.as_tensor(array[None], dtype=torch.float32), affine=torch.diag(torch.tensor([*spacing, 1.0]))
    )


def test_spacing_hausdorff_through_ignite_handler():
    pred, label = _single_voxels(4)
    batch = [
        {"pred": _meta(pred, (2.0, 1.0, 1.0)), "label": _meta(label, (2.0, 1.0, 1.0))},  # 8 mm
        {"pred": _meta(pred, (0.5, 1.0, 1.0)), "label": _meta(label, (0.5, 1.0, 1.0))},  # 2 mm
    ]
    engine = Engine(lambda e, b: b)
    handler = IgniteMetricHandler(
        metric_fn=SpacingHausdorffDistanceMetric(include_background=True, percentile=95),
        output_transform=from_engine(["pred", "label"]),
        save_details=True,
    )
    handler.attach(engine, "hd95")
    engine.run([batch], max_epochs=1)
    assert engine.state.metrics["hd95"] == pytest.approx(5.0)
    assert engine.state.metric_details["hd95"].flatten().tolist() == pytest.approx([8.0, 2.0])
    # the plain MONAI metric reports voxels here
    plain = HausdorffDistanceMetric(include_background=True, percentile=95)
    plain([b["pred"] for b in batch], [b["label"] for b in batch])
    assert plain.aggregate().item() == pytest.approx(4.0)


def test_spacing_hausdorff_batch_first_and_explicit_spacing():
    pred, label = _single_voxels(4)
    collated = list_data_collate(
        [
            {"pred": _meta(pred, (2.0, 1.0, 1.0)), "label": _meta(label, (2.0, 1.0, 1.0))},
            {"pred": _meta(pred, (3.0, 1.0, 1.0)), "label": _meta(label, (3.0, 1.0, 1.0))},
        ]
    )
    metric = SpacingHausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    assert metric(collated["pred"], collated["label"]).flatten().tolist() == pytest.approx([8.0, 12.0])
    # an explicit spacing wins over the affine
    assert metric(collated["pred"], collated["label"], spacing=1.0).flatten().tolist() == pytest.approx([4.0, 4.0])
    # plain tensors: unit spacing, like the parent class
    assert metric(collated["pred"].as_tensor(), collated["label"].as_tensor()).flatten().tolist() == pytest.approx(
        [4.0, 4.0]
    )


def test_docstring_examples():
    assert doctest.testmod(covid_monai.evaluate, raise_on_error=True).attempted >= 3
