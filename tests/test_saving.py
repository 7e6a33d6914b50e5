"""The bundle's writer: maps saved like their source scan, named after the case, atomically."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from covid_monai.saving import SaveLikeSourced, case_name


def _scan(tmp_path, shape=(6, 5, 4)):
    affine = np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    image = nib.Nifti1Image(np.zeros(shape, np.int16), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)  # codes an output must keep
    path = tmp_path / "scan_7.nii.gz"
    nib.save(image, str(path))
    return path, affine


def test_mask_saved_with_the_source_header_named_after_the_file(tmp_path):
    source, affine = _scan(tmp_path)
    mask = np.random.default_rng(0).integers(0, 3, (1, 6, 5, 4)).astype(np.uint8)
    data = {"pred": MetaTensor(torch.as_tensor(mask), affine=torch.as_tensor(affine), meta={
        "filename_or_obj": str(source)})}
    out = SaveLikeSourced("pred", output_dir=tmp_path / "out", output_postfix="infection")(data)
    assert out["pred"] is data["pred"]
    saved = nib.load(str(tmp_path / "out" / "scan_7_infection.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), mask[0])
    assert saved.get_data_dtype() == np.uint8
    assert (int(saved.header["qform_code"]), int(saved.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(saved.affine, affine)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_probability_of_a_dicom_case_named_by_the_batch_runner(tmp_path):
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    probability = torch.rand(1, 4, 4, 3)
    data = {
        "probability": MetaTensor(probability, affine=torch.as_tensor(affine), meta={"filename_or_obj": str(tmp_path)}),
        "name": "patient_1_series_2",
    }
    SaveLikeSourced("probability", tmp_path / "out", output_postfix="probability", output_dtype="float32")(data)
    saved = nib.load(str(tmp_path / "out" / "patient_1_series_2_probability.nii.gz"))  # no NIfTI source: the affine
    assert saved.get_data_dtype() == np.float32
    np.testing.assert_allclose(saved.affine, affine)
    np.testing.assert_allclose(np.asanyarray(saved.dataobj), probability[0].numpy())


def test_missing_keys_and_unnamed_cases():
    saver = SaveLikeSourced("lungs", "unused", allow_missing_keys=True)
    assert saver({"pred": 1}) == {"pred": 1}  # nothing to save, nothing written
    with pytest.raises(ValueError, match="cannot name the output"):
        case_name({"pred": MetaTensor(torch.zeros(1, 2, 2, 2))}, "pred")
    with pytest.raises(ValueError, match="output_ext"):
        SaveLikeSourced("pred", "out", output_ext=".nrrd")
