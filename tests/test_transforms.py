"""Tests for covid_monai.transforms: HU lung mask, LungMaskd, RestrictToLungsd.

The synthetic chest is built here (not from covid_monai.phantom) in world millimetres, RAS+ (+x = patient right):
a body ellipse at +40 HU on a table in -1000 HU air, two lung ellipsoids at -850 HU with +40 HU vessels, a ground-glass
(-500 HU) lesion at the lateral edge of the left lung, a consolidation (0 HU) at the lateral edge of the right lung,
a consolidation inside the left lung and a small gas bubble in the upper abdomen.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from covid_monai.transforms import (
    LEFT_LUNG,
    RIGHT_LUNG,
    AddInfectionToLungsd,
    LungMaskd,
    NeighbourSlicesToChannelsd,
    RestrictToLungsd,
    ValidateCTd,
    lung_mask_from_hu,
)

LEFT_C, LEFT_R = np.array([-65.0, 0.0, 0.0]), np.array([45.0, 70.0, 90.0])
RIGHT_C, RIGHT_R = np.array([65.0, 0.0, 0.0]), np.array([50.0, 70.0, 95.0])
GGO_C, GGO_R = np.array([-110.0, 0.0, 10.0]), 14.0  # lateral edge of the left lung
CONS_C, CONS_R = np.array([112.0, 0.0, -10.0]), 10.0  # lateral edge of the right lung
INNER_C, INNER_R = np.array([-65.0, 20.0, 30.0]), 9.0  # inside the left lung
GAS_C, GAS_R = np.array([-40.0, 30.0, -105.0]), 8.0  # stomach bubble below the left lung


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2


def make_chest(
    spacing=(2.0, 2.0, 2.5),
    fov=(340.0, 280.0, 220.0),
    joined: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Synthetic chest CT in canonical RAS storage; returns (hu, affine, truth masks)."""
    shape = [int(round(f / s)) for f, s in zip(fov, spacing, strict=True)]
    origin = [-(n - 1) * s / 2.0 for n, s in zip(shape, spacing, strict=True)]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    x, y, z = (np.arange(n, dtype=np.float32) * s + o for n, s, o in zip(shape, spacing, origin, strict=True))
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = np.broadcast_to((x / 150.0) ** 2 + (y / 110.0) ** 2 < 1, shape)
    hu[body] = 40.0
    hu[:, (y[0, :, 0] > -130) & (y[0, :, 0] < -122), :] = 200.0  # table, 10 mm below the back
    left = _ellipsoid(x, y, z, LEFT_C, LEFT_R) <= 1
    right = _ellipsoid(x, y, z, RIGHT_C, RIGHT_R) <= 1
    lungs = left | right
    hu[lungs] = -850.0
    # vessels: +40 HU tubes (radius 2 mm) along z and along y, only inside the lungs
    for cx, cy in [(-60, -20), (-75, 25), (55, 10), (80, -25)]:
        tube = np.broadcast_to((x - cx) ** 2 + (y - cy) ** 2 <= 4.0, shape)
        hu[tube & lungs] = 40.0
    for cx, cz in [(-70, -30), (70, 40)]:
        tube = np.broadcast_to((x - cx) ** 2 + (z - cz) ** 2 <= 4.0, shape)
        hu[tube & lungs] = 40.0
    ggo = (_ellipsoid(x, y, z, GGO_C, [GGO_R] * 3) <= 1) & left
    cons = (_ellipsoid(x, y, z, CONS_C, [CONS_R] * 3) <= 1) & right
    inner = (_ellipsoid(x, y, z, INNER_C, [INNER_R] * 3) <= 1) & left
    hu[ggo] = -500.0
    hu[cons] = 0.0
    hu[inner] = 10.0
    if joined:  # an airway joining both lungs across the midline
        airway = np.broadcast_to((y - 0.0) ** 2 + (z - 40.0) ** 2 <= 36.0, shape) & (np.abs(x) < 60)
        hu[airway] = -1000.0
    gas = _ellipsoid(x, y, z, GAS_C, [GAS_R] * 3) <= 1
    hu[gas] = -1000.0
    hu += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    return (
        hu,
        affine,
        {"body": body, "left": left, "right": right, "ggo": ggo, "cons": cons, "inner": inner, "gas": gas},
    )


def reorient(array: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store a canonical RAS array in the orientation ``codes`` (e.g. "LPS", "SAR"); the world stays the same."""
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    out = np.ascontiguousarray(apply_orientation(array, ornt))
    return out, affine @ inv_ornt_aff(ornt, array.shape)


def world_x_centroid(mask: np.ndarray, affine: np.ndarray) -> float:
    ijk = np.argwhere(mask).mean(axis=0)
    return float(affine[0, :3] @ ijk + affine[0, 3])


@pytest.fixture(scope="module")
def chest():
    return make_chest()


@pytest.fixture(scope="module")
def chest_mask(chest):
    hu, affine, _ = chest
    return lung_mask_from_hu(hu, affine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_labels_volumes_and_lesions(chest, chest_mask):
    hu, affine, truth = chest
    mask = chest_mask
    assert mask.dtype == np.uint8 and mask.shape == hu.shape
    assert set(np.unique(mask).tolist()) == {0, LEFT_LUNG, RIGHT_LUNG}
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    left_ml = 4.0 / 3.0 * math.pi * LEFT_R.prod() / 1000.0
    right_ml = 4.0 / 3.0 * math.pi * RIGHT_R.prod() / 1000.0
    assert np.count_nonzero(mask == LEFT_LUNG) * voxel_ml == pytest.approx(left_ml, rel=0.03)
    assert np.count_nonzero(mask == RIGHT_LUNG) * voxel_ml == pytest.approx(right_ml, rel=0.03)
    # left lung (label 1) is the one at world -x (RAS: patient left), and it is the true left lung
    assert dice(mask == LEFT_LUNG, truth["left"]) > 0.97
    assert dice(mask == RIGHT_LUNG, truth["right"]) > 0.97
    # lesions at the pleura and inside, and the vessels, are part of the lung they are in
    assert np.all(mask[truth["ggo"]] == LEFT_LUNG)
    assert np.all(mask[truth["inner"]] == LEFT_LUNG)
    # consolidation (0 HU) at the pleura: the closing restores most of it; the rim that touches the chest wall is
    # within the 3 mm margin that RestrictToLungsd keeps
    assert np.mean(mask[truth["cons"]] == RIGHT_LUNG) > 0.7
    kept = RestrictToLungsd("pred", margin_mm=3.0, pixdim=np.diag(affine)[:3])(
        {"pred": truth["cons"][None].astype(np.float32), "lungs": mask[None]}
    )["pred"]
    assert kept.sum() / truth["cons"].sum() > 0.97
    # air outside the body, the table gap and the stomach bubble are not lung
    assert not mask[truth["gas"]].any()
    assert not mask[~truth["body"]].any()


def test_without_closing_edge_consolidation_is_missed(chest):
    """The closing is what pulls the 0 HU lesion at the pleura into the mask (the test can tell the difference)."""
    hu, affine, truth = chest
    mask = lung_mask_from_hu(hu, affine, closing_mm=0)
    assert np.mean(mask[truth["cons"]] == RIGHT_LUNG) < 0.1
    assert np.all(mask[truth["inner"]] == LEFT_LUNG)  # slice-wise hole filling still works


@pytest.mark.parametrize("codes", ["LPS", "PSR", "ILA"])
def test_any_storage_orientation(chest, chest_mask, codes):
    hu, affine, truth = chest
    stored, stored_affine = reorient(hu, affine, codes)
    mask = lung_mask_from_hu(stored, stored_affine)
    assert mask.shape == stored.shape
    x_left = world_x_centroid(mask == LEFT_LUNG, stored_affine)
    x_right = world_x_centroid(mask == RIGHT_LUNG, stored_affine)
    assert x_left < -40.0 and x_right > 40.0
    ggo, _ = reorient(truth["ggo"], affine, codes)
    assert np.all(mask[ggo] == LEFT_LUNG)
    # map the mask back to canonical storage and compare with the canonical result
    ornt = ornt_transform(axcodes2ornt(tuple(codes)), axcodes2ornt("RAS"))
    back = apply_orientation(mask, ornt)
    for label in (LEFT_LUNG, RIGHT_LUNG):
        assert dice(back == label, chest_mask == label) > 0.995


def test_oblique_affine_left_right(chest):
    hu, affine, _ = chest
    angle = math.radians(12.0)
    rot = np.eye(4)
    rot[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    oblique = rot @ affine
    mask = lung_mask_from_hu(hu, oblique)
    assert world_x_centroid(mask == LEFT_LUNG, oblique) < world_x_centroid(mask == RIGHT_LUNG, oblique)
    # mirrored world (x -> -x) swaps the labels
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine
    swapped = lung_mask_from_hu(hu, mirror)
    assert np.count_nonzero(swapped == RIGHT_LUNG) == pytest.approx(np.count_nonzero(mask == LEFT_LUNG), rel=0.01)
    assert world_x_centroid(swapped == LEFT_LUNG, mirror) < world_x_centroid(swapped == RIGHT_LUNG, mirror)


def test_joined_lungs_are_split():
    hu, affine, truth = make_chest(joined=True, seed=1)
    mask = lung_mask_from_hu(hu, affine)
    assert dice(mask == LEFT_LUNG, truth["left"]) > 0.95
    assert dice(mask == RIGHT_LUNG, truth["right"]) > 0.95
    x_index = np.argwhere(mask == LEFT_LUNG)[:, 0].max()
    assert x_index < np.argwhere(mask == RIGHT_LUNG)[:, 0].min()


def test_single_lung_is_labelled_by_its_side(chest):
    hu, affine, truth = chest
    consolidated = hu.copy()
    consolidated[truth["left"]] = 30.0  # the whole left lung consolidated: only the right lung is air
    x, y, z = (np.arange(n) * affine[i, i] + affine[i, 3] for i, n in enumerate(hu.shape))
    gastric = (x[:, None, None] + 60) ** 2 + (y[None, :, None] - 20) ** 2 + (z[None, None, :] + 110) ** 2 <= 22.0**2
    consolidated[gastric] = -1000.0  # ~ 24 mL of gastric gas (> min_lung_ml): too small for a lung next to the right
    mask = lung_mask_from_hu(consolidated, affine)
    assert not (mask == LEFT_LUNG).any()
    assert dice(mask == RIGHT_LUNG, truth["right"]) > 0.97
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine  # the same array in a mirrored world: now it is the left lung
    assert set(np.unique(lung_mask_from_hu(consolidated, mirror)).tolist()) == {0, LEFT_LUNG}


def test_many_small_air_pockets_are_ignored(chest, chest_mask):
    """Hundreds of isolated air voxels in the soft tissue (noise, bowel gas) do not change the lungs."""
    hu, affine, truth = chest
    noisy = hu.copy()
    rng = np.random.default_rng(3)
    tissue = np.argwhere(truth["body"] & ~(truth["left"] | truth["right"]))
    picks = tissue[rng.choice(len(tissue), size=600, replace=False)]
    noisy[tuple(picks.T)] = -1000.0
    mask = lung_mask_from_hu(noisy, affine)
    for label in (LEFT_LUNG, RIGHT_LUNG):
        assert dice(mask == label, chest_mask == label) > 0.999


def test_few_slices():
    hu, affine, truth = make_chest(spacing=(1.5, 1.5, 5.0), fov=(340.0, 280.0, 15.0), seed=2)
    assert hu.shape[2] == 3
    mask = lung_mask_from_hu(hu, affine)
    assert dice(mask == LEFT_LUNG, truth["left"]) > 0.97
    assert dice(mask == RIGHT_LUNG, truth["right"]) > 0.97
    # the lungs continue beyond the first/last slice: the closing still fills the pleural consolidation there
    assert truth["cons"].any() and np.mean(mask[truth["cons"]] == RIGHT_LUNG) > 0.7
    one = lung_mask_from_hu(hu[:, :, 1:2], affine)
    assert dice(one == LEFT_LUNG, truth["left"][:, :, 1:2]) > 0.97


def test_nothing_lung_like_gives_zeros():
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    assert not lung_mask_from_hu(np.full((20, 20, 10), -1000.0), affine).any()  # only air
    assert not lung_mask_from_hu(np.full((20, 20, 10), 40.0), affine).any()  # only tissue
    x, y = np.ogrid[:60, :60]
    hu = np.where((x - 30) ** 2 + (y - 30) ** 2 < 25**2, 40.0, -1000.0)[:, :, None].repeat(4, axis=2)
    hu[28:31, 28:31] = -900.0  # a tiny air pocket (bowel gas size) is below min_lung_ml
    assert not lung_mask_from_hu(hu, affine).any()
    with pytest.raises(ValueError, match="3D"):
        lung_mask_from_hu(np.zeros((4, 4)), affine)


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
    # numpy input with a meta dict
    out2 = LungMaskd("image", output_keys="lung")({"image": stored[None], "image_meta_dict": {"affine": stored_affine}})
    assert isinstance(out2["lung"], np.ndarray) and np.array_equal(out2["lung"], lungs.numpy())
    with pytest.raises(ValueError, match="affine"):
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
