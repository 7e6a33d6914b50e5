"""Tests for covid_monai.transforms: LungMaskd, RestrictToLungsd, AddInfectionToLungsd, ValidateCTd and
NeighbourSlicesToChannelsd (the synthetic chest of tests/test_lungs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from covid_monai.transforms import (
    LEFT_LUNG,
    RIGHT_LUNG,
    AddInfectionToLungsd,
    LungMaskd,
    NeighbourSlicesToChannelsd,
    RestrictToLungsd,
    ValidateCTd,
)
from tests.test_lungs import dice, reorient, world_x_centroid


def test_lung_maskd_metatensor(chest, chest_mask):
    hu, affine, _ = chest
    stored, stored_affine = reorient(hu, affine, "LPS")
    image = MetaTensor(torch.from_numpy(stored)[None], affine=torch.as_tensor(stored_affine))
    out = LungMaskd("image")({"image": image})
    lungs = out["lungs"]
    assert isinstance(lungs, MetaTensor)
    assert lungs.shape == image.shape and lungs.dtype == torch.uint8
    assert torch.allclose(lungs.affine, image.affine)
    assert out["image"] is image
    x_left = world_x_centroid(lungs[0].numpy() == LEFT_LUNG, stored_affine)
    assert x_left < -40.0
    ornt = ornt_transform(axcodes2ornt(("L", "P", "S")), axcodes2ornt("RAS"))
    back = apply_orientation(lungs[0].numpy(), ornt)
    assert dice(back > 0, chest_mask > 0) > 0.995
    with pytest.raises(ValueError, match="affine"):  # a plain array does not say where its voxels are
        LungMaskd("image")({"image": stored[None]})


def test_restrict_to_lungs_margin_in_mm():
    lungs = np.zeros((1, 40, 40, 10), dtype=np.uint8)
    lungs[0, 10:20, 10:30, :] = 1
    pred = np.ones((1, 40, 40, 10), dtype=np.float32)
    affine = torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0]))
    out = RestrictToLungsd("pred", margin_mm=3.0, mode="voxels")(
        {
            "pred": MetaTensor(torch.from_numpy(pred), affine=affine),
            "lungs": MetaTensor(torch.from_numpy(lungs), affine=affine),
        }
    )["pred"]
    assert isinstance(out, MetaTensor)
    kept = out[0].numpy() > 0
    # axis 0 spacing 2 mm: 3 mm margin = 1 voxel; axis 1 spacing 1 mm: 3 voxels
    assert kept[9:21, 20, 5].all() and not kept[8, 20, 5] and not kept[21, 20, 5]
    assert kept[15, 7:33, 5].all() and not kept[15, 6, 5] and not kept[15, 33, 5]
    assert not kept[0].any()
    # no margin: exactly the lung
    exact = RestrictToLungsd("pred", margin_mm=0.0, pixdim=(2.0, 1.0, 1.0), mode="voxels")(
        {"pred": pred, "lungs": lungs}
    )["pred"]
    assert np.array_equal(exact > 0, lungs > 0)


def test_restrict_to_lungs_keeps_whole_components_that_touch_the_lungs():
    lungs = np.zeros((1, 40, 40, 10), dtype=np.uint8)
    lungs[0, 10:20, 10:30, :] = 1
    pred = np.zeros((1, 40, 40, 10), dtype=np.float32)
    pred[0, 15:30, 12:16, 3:6] = 1  # a consolidation reaching 10 voxels beyond the lung edge
    pred[0, 30:36, 32:38, 2:4] = 1  # a false positive in the body wall, 10 mm from the lung
    out = RestrictToLungsd("pred", margin_mm=3.0, pixdim=(1.0, 1.0, 1.0))({"pred": pred, "lungs": lungs})["pred"]
    assert out[0, 15:30, 12:16, 3:6].all(), "the touching component must stay whole"
    assert not out[0, 30:36, 32:38, 2:4].any(), "the component away from the lungs must go"
    voxels = RestrictToLungsd("pred", margin_mm=3.0, pixdim=(1.0, 1.0, 1.0), mode="voxels")(
        {"pred": pred, "lungs": lungs}
    )["pred"]
    assert voxels[0, 15:30, 12:16, 3:6].sum() < out[0, 15:30, 12:16, 3:6].sum()


def test_restrict_to_lungs_in_slabs_is_exact():
    """Distance transforms in overlapping slabs of the last axis give exactly the whole-volume result: margin and
    reach are the voxels within those distances (mm, anisotropic) of the lungs, brute-force checked."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    lungs = ndimage.gaussian_filter(rng.random((36, 30, 60)), 3) > 0.52
    lungs[:, :, 40:] = False  # lungs end: the reach fades out along the last axis
    pred = (ndimage.gaussian_filter(rng.random((1, 36, 30, 60)), 2) > 0.53).astype(np.float32)
    spacing = (1.5, 1.2, 2.0)
    outs = [RestrictToLungsd("pred", margin_mm=3.0, max_distance_mm=12.0, pixdim=spacing, slab=slab)(
        {"pred": pred, "lungs": lungs[None].astype(np.uint8)})["pred"] for slab in (1, 7, 1000)]
    assert 0 < outs[0].sum() < pred.sum()
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    transform = RestrictToLungsd("pred", pixdim=spacing, slab=5)
    near = transform._near_lungs(lungs, np.asarray(spacing), [3.0, 12.0])
    distance = ndimage.distance_transform_edt(~lungs, sampling=spacing)
    for mask, limit in zip(near, (3.0, 12.0), strict=True):
        np.testing.assert_array_equal(mask, distance <= limit)


def test_restrict_to_lungs_matches_a_whole_volume_reference():
    """Distances only around the prediction outside the lungs give the result of the plain definition: 26-connected
    components touching the lungs dilated by the margin, cut at the reach (full-volume distance transform)."""
    from scipy import ndimage

    rng = np.random.default_rng(11)
    spacing = (1.2, 0.9, 2.5)
    lungs = ndimage.gaussian_filter(rng.random((48, 40, 30)), 3) > 0.52
    distance = ndimage.distance_transform_edt(~lungs, sampling=spacing)
    preds = {
        "scattered": ndimage.gaussian_filter(rng.random((48, 40, 30)), 1.5) > 0.56,
        "inside the lungs only": lungs & (rng.random(lungs.shape) > 0.7),
        "far from the lungs only": (distance > 20.0) & (rng.random(lungs.shape) > 0.9),
    }
    for name, pred in preds.items():
        labels, _ = ndimage.label(pred, structure=np.ones((3, 3, 3)))
        touching = np.unique(labels[pred & (distance <= 3.0)])
        expected = np.isin(labels, touching[touching > 0]) & (distance <= 15.0)
        out = RestrictToLungsd("pred", margin_mm=3.0, max_distance_mm=15.0, pixdim=spacing, slab=8)(
            {"pred": pred[None].astype(np.float32), "lungs": lungs[None].astype(np.uint8)})["pred"]
        np.testing.assert_array_equal(out[0] > 0, expected, err_msg=name)
    assert preds["far from the lungs only"].any()


def test_restrict_to_lungs_empty_mask():
    pred = torch.ones((1, 8, 8, 4))
    lungs = torch.zeros((1, 8, 8, 4), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="empty"):
        kept = RestrictToLungsd("pred")({"pred": pred, "lungs": lungs})["pred"]
    assert torch.equal(kept, pred)
    zeroed = RestrictToLungsd("pred", empty_lungs="zero")({"pred": pred, "lungs": lungs})["pred"]
    assert not zeroed.any()
    with pytest.raises(ValueError, match="shape"):
        RestrictToLungsd("pred")({"pred": pred, "lungs": lungs[:, :4]})


def test_add_infection_to_lungs_joins_the_touching_lung():
    lungs = np.zeros((1, 30, 20, 6), dtype=np.uint8)
    lungs[0, 2:12, 2:18, :] = RIGHT_LUNG
    lungs[0, 18:28, 2:18, :] = LEFT_LUNG
    pred = np.zeros_like(lungs)
    pred[0, 8:15, 5:9, 2:4] = 1  # consolidation bulging out of the right lung, cut from the threshold mask
    out = AddInfectionToLungsd("lungs", infection_key="pred")({"lungs": MetaTensor(lungs), "pred": pred})["lungs"]
    out = np.asarray(out)
    assert (out[0, 12:15, 5:9, 2:4] == RIGHT_LUNG).all()
    assert (out[0, 18:28] == lungs[0, 18:28]).all()  # the other lung untouched
    assert out.sum() - lungs.sum() == RIGHT_LUNG * (3 * 4 * 2)


def test_add_infection_shares_a_component_touching_both_lungs():
    lungs = np.zeros((1, 30, 10, 4), dtype=np.uint8)
    lungs[0, 0:10] = RIGHT_LUNG
    lungs[0, 20:30] = LEFT_LUNG
    pred = np.zeros_like(lungs)
    pred[0, 8:22, 4:6, 1:3] = 1  # one blob bridging the mediastinum
    out = np.asarray(AddInfectionToLungsd("lungs", infection_key="pred")({"lungs": lungs, "pred": pred})["lungs"])
    assert (out[0, 10:15, 4:6, 1:3] == RIGHT_LUNG).all() and (out[0, 15:20, 4:6, 1:3] == LEFT_LUNG).all()


def _scan(array, affine=None, name="scan.nii.gz"):
    return {"image": MetaTensor(torch.as_tensor(array), affine=torch.eye(4) if affine is None else affine,
                                meta={"filename_or_obj": name})}


@pytest.mark.parametrize(
    ("array", "affine", "message"),
    [
        (np.zeros((1, 8, 8)), None, "not a 3D volume"),
        (np.zeros((3, 8, 8, 4)), None, "3 volumes in one file"),
        (np.full((1, 8, 8, 4), np.nan), None, "NaN or infinite"),
        (np.full((1, 8, 8, 4), -1000.0), None, "same value"),
        (np.linspace(-1000, 400, 256).reshape(1, 8, 8, 4), torch.diag(torch.tensor([1.0, 1.0, 0.0, 1.0])), "singular"),
    ],
)
def test_validate_ct_refuses_with_file_name(array, affine, message):
    with pytest.raises(ValueError, match=message) as err:
        ValidateCTd("image")(_scan(array.astype(np.float32), affine))
    assert str(err.value).startswith("scan.nii.gz: ")


def test_validate_ct_limits_and_warnings():
    ct = np.linspace(-1000, 400, 8 * 8 * 4, dtype=np.float32).reshape(1, 8, 8, 4)
    assert "warnings" not in ValidateCTd("image")(_scan(ct))
    with pytest.raises(ValueError, match="larger than the limit"):
        ValidateCTd("image", max_voxels=100)(_scan(ct))
    eight_bit = np.linspace(0, 255, 8 * 8 * 4, dtype=np.float32).reshape(1, 8, 8, 4)
    out = ValidateCTd("image")(_scan(eight_bit))
    assert "do not look like Hounsfield units" in out["warnings"][0]
    assert "warnings" not in ValidateCTd("image", expect_hu=False)(_scan(eight_bit))
    one_slice = np.linspace(-1000, 400, 64, dtype=np.float32).reshape(1, 8, 8, 1)
    assert ValidateCTd("image")(_scan(one_slice))["image"].shape == (1, 8, 8, 1)


@pytest.mark.parametrize("context", [1, 2])
def test_neighbour_slices_become_channels(context):
    """Channel j of slice z is input slice z + j - k, the edge slice repeated past the ends; meta data kept."""
    rng = np.random.default_rng(context)
    volume = MetaTensor(torch.as_tensor(rng.normal(size=(1, 6, 5, 7)), dtype=torch.float32),
                        affine=torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0], dtype=torch.float64)))
    volume.meta["filename_or_obj"] = "case.nii.gz"
    stacked = NeighbourSlicesToChannelsd("image", context=context)({"image": volume})["image"]
    assert isinstance(stacked, MetaTensor) and stacked.shape == (2 * context + 1, 6, 5, 7)
    assert torch.equal(stacked.affine, volume.affine) and stacked.meta["filename_or_obj"] == "case.nii.gz"
    for j in range(2 * context + 1):
        for z in range(7):
            source = min(max(z + j - context, 0), 6)
            assert torch.equal(stacked[j, :, :, z], volume[0, :, :, source]), (j, z)
    assert torch.equal(stacked[context], volume[0])  # the middle channel is the slice itself
    single = NeighbourSlicesToChannelsd("image", context=context)({"image": np.ones((1, 4, 4, 1), np.float32)})
    assert single["image"].shape == (2 * context + 1, 4, 4, 1)  # a lone slice: copies of itself


def test_neighbour_slices_refuse_bad_input():
    assert NeighbourSlicesToChannelsd("image", context=0)({"image": np.ones((2, 3))})["image"].shape == (2, 3)
    with pytest.raises(ValueError, match=r"one channel of a 3D volume .*\(3, 4, 4, 2\)"):
        NeighbourSlicesToChannelsd("image", context=1)({"image": np.ones((3, 4, 4, 2), np.float32)})
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="whole number"):
            NeighbourSlicesToChannelsd("image", context=bad)
