"""Datalists and the checks that run before training."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from covid_monai.datalist import DataCheckError, build_datalist, check_training_data, pair_images_labels


def _save(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)


def _dataset(root, n=5):
    for i in range(n):
        image = np.full((8, 8, 4), -800, dtype=np.int16)
        label = np.zeros((8, 8, 4), dtype=np.uint8)
        label[2:4, 2:4, 1] = 1
        _save(root / "images" / f"case{i}.nii.gz", image)
        _save(root / "labels" / f"case{i}.nii.gz", label)
    return root


def test_pair_and_split_is_seeded_and_disjoint(tmp_path):
    root = _dataset(tmp_path, n=10)
    assert len(pair_images_labels(root)) == 10
    a, b = build_datalist(root, 0.2, seed=1), build_datalist(root, 0.2, seed=1)
    assert a == b and len(a["validation"]) == 2 and len(a["training"]) == 8
    names = {i["image"] for i in a["training"]} | {i["image"] for i in a["validation"]}
    assert len(names) == 10
    assert build_datalist(root, 0.2, seed=2) != a


def test_missing_pairs_are_all_listed(tmp_path):
    root = _dataset(tmp_path, n=3)
    (root / "labels" / "case1.nii.gz").unlink()
    _save(root / "labels" / "orphan.nii.gz", np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(DataCheckError) as err:
        pair_images_labels(root)
    assert "case1.nii.gz: no label" in str(err.value) and "orphan.nii.gz: no image" in str(err.value)


def test_datalist_json_relative_paths(tmp_path):
    root = _dataset(tmp_path, n=3)
    items = [{"image": f"images/case{i}.nii.gz", "label": f"labels/case{i}.nii.gz"} for i in range(3)]
    (root / "list.json").write_text(json.dumps({"training": items[:2], "validation": items[2:]}))
    lists = build_datalist(root / "list.json")
    assert lists["validation"][0]["image"] == str((root / "images" / "case2.nii.gz").resolve())


def test_check_reports_every_problem_with_case_names(tmp_path):
    root = _dataset(tmp_path, n=4)
    _save(root / "labels" / "case0.nii.gz", np.zeros((8, 8, 5), np.uint8))  # shape mismatch
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    label = np.zeros((8, 8, 4), np.uint8)
    _save(root / "labels" / "case1.nii.gz", label, shifted)  # affine mismatch
    label255 = np.zeros((8, 8, 4), np.uint8)
    label255[1, 1, 1] = 255
    _save(root / "labels" / "case2.nii.gz", label255)  # values outside {0, 1}
    (root / "images" / "case3.nii.gz").write_bytes(b"\x1f\x8b broken")  # unreadable
    with pytest.raises(DataCheckError) as err:
        check_training_data(build_datalist(root, 0.25))
    message = str(err.value)
    assert "case0.nii.gz: shape" in message
    assert "case1.nii.gz: affine differs" in message
    assert "case2.nii.gz: label values [255]" in message
    assert "case3.nii.gz: cannot be read" in message
    assert len(message.splitlines()) == 4


def test_check_refuses_training_set_without_infection(tmp_path):
    root = _dataset(tmp_path, n=3)
    for path in (root / "labels").glob("*.nii.gz"):
        _save(path, np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(DataCheckError, match="no case has any infection"):
        check_training_data(build_datalist(root, 0.34))


def test_float_binary_labels_may_be_soft_targets_within_0_and_1(tmp_path):
    """A teacher's probability map (float, 0..1) is a valid binary training target; 255 or -0.1 are not."""
    root = _dataset(tmp_path, n=3)
    soft = np.random.default_rng(0).uniform(0, 1, (8, 8, 4)).astype(np.float32)
    _save(root / "labels" / "case0.nii.gz", soft)
    check_training_data(build_datalist(root, 0.34), soft_labels=True)
    soft[0, 0, 0] = 1.5
    _save(root / "labels" / "case0.nii.gz", soft)
    with pytest.raises(DataCheckError) as err:
        check_training_data(build_datalist(root, 0.34), soft_labels=True)
    assert "case0.nii.gz: label values [1.5]" in str(err.value)
    with pytest.raises(DataCheckError, match=r"case0.nii.gz: label values \[0\.0"):  # without soft labels: 0 or 1
        check_training_data(build_datalist(root, 0.34))
    soft[0, 0, 0] = 0.5
    _save(root / "labels" / "case0.nii.gz", soft)
    with pytest.raises(DataCheckError, match="case0.nii.gz: label values"):  # multi-class labels are never soft
        check_training_data(build_datalist(root, 0.34), label_values=(0, 1, 2))
