"""Tests for covid_monai.lungs: the HU lung mask, the whole method and each of its steps.

The synthetic chest is built here (not from covid_monai.phantom) in world millimetres, RAS+ (+x = patient right):
a body ellipse at +40 HU on a table in -1000 HU air, two lung ellipsoids at -850 HU with +40 HU vessels, a ground-glass
(-500 HU) lesion at the lateral edge of the left lung, a consolidation (0 HU) at the lateral edge of the right lung,
a consolidation inside the left lung and a small gas bubble in the upper abdomen.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from monai.data.utils import affine_to_spacing
from monai.transforms.utils import get_largest_connected_component_mask
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from covid_monai.lungs import (
    LEFT_LUNG,
    RIGHT_LUNG,
    _fill_holes_axial,
    assign_sides,
    body_mask,
    body_midline,
    close_and_fill,
    enclosed_air,
    find_lungs,
    lung_mask_from_hu,
    split_joined_lungs,
    world_axis_order,
)
from covid_monai.transforms import RestrictToLungsd

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



# ----------------------------------------------------------------------------------------------------------------------
# The steps, one by one (lung_mask_from_hu is their composition)

SPACING = np.array([2.0, 2.0, 2.5])  # make_chest's default, canonical RAS storage: the working axis order


def _candidates(hu: np.ndarray, min_ml: float = 20.0):
    """Steps 1-3 on a canonical chest: (body, steps, lungs)."""
    body, steps = body_mask(hu, SPACING, -500.0)
    labels, n = enclosed_air(hu, -320.0)
    return body, steps, find_lungs(hu, labels, n, body, steps, min_ml / (SPACING.prod() / 1000.0))


def _paint(shape, pieces) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for box, mask in pieces:
        out[box] |= mask
    return out


@pytest.mark.parametrize("codes", ["LPS", "PSR", "ILA"])
def test_world_axis_order_puts_left_right_first_and_axial_last(chest, codes):
    hu, affine, _ = chest
    stored, stored_affine = reorient(hu, affine, codes)
    order = world_axis_order(stored_affine)
    assert np.transpose(stored, order).shape == hu.shape
    for world_axis, array_axis in enumerate(order):
        assert int(np.argmax(np.abs(stored_affine[:3, array_axis]))) == world_axis


def test_body_mask_is_the_body_on_a_4_mm_grid_without_the_table(chest):
    hu, _, truth = chest
    body, steps = body_mask(hu, SPACING, -500.0)
    assert steps == [2, 2] and body.shape == hu[::2, ::2, :].shape and body.dtype == bool
    assert dice(body, truth["body"][::2, ::2, :]) > 0.99
    table = np.zeros(hu.shape, dtype=bool)
    table[:, np.abs(hu[hu.shape[0] // 2, :, 0] - 200.0) < 100.0, :] = True  # the +200 HU table rows
    assert table.any() and not body[table[::2, ::2, :]].any()
    assert body[(truth["left"] | truth["right"] | truth["gas"])[::2, ::2, :]].all()  # holes filled: lungs inside
    nothing, _ = body_mask(np.full((8, 8, 3), -1000.0), SPACING, -500.0)
    assert not nothing.any()


def test_body_mask_keeps_the_largest_component_as_scipy_finds_it():
    """MONAI's get_largest_connected_component_mask (6-connectivity) picks what the largest ndimage.label gives."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        mask = rng.random((14, 12, 7)) < rng.uniform(0.2, 0.4)
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:]
        if n < 2 or np.count_nonzero(sizes == sizes.max()) > 1:  # a tie: either component is the largest
            continue
        expected = labels == int(np.argmax(sizes)) + 1
        np.testing.assert_array_equal(get_largest_connected_component_mask(mask, connectivity=1), expected)
        checked += 1
    assert checked > 20


def test_affine_to_spacing_is_the_norm_of_each_column():
    """MONAI's affine_to_spacing (zeros kept) gives exactly the column norms the spacing was computed as before."""
    rng = np.random.default_rng(1)
    for k in range(20):
        affine = np.eye(4)
        affine[:3] = rng.normal(scale=2.0, size=(3, 4))
        if k % 5 == 0:
            affine[:3, k % 3] = 0.0  # a degenerate axis stays 0 (the lung mask then uses a step of 1)
        expected = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        np.testing.assert_array_equal(affine_to_spacing(affine, suppress_zeros=False), expected)


def test_enclosed_air_is_lungs_and_gas_never_outside_air(chest):
    hu, _, truth = chest
    labels, n = enclosed_air(hu, -320.0)
    assert n >= 3 and labels.shape == hu.shape
    assert not labels[~truth["body"]].any()  # outside air, the table gap
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):  # nothing touches a slice border
        assert not edge.any()
    air = (truth["left"] | truth["right"]) & (hu < -320.0)
    assert np.count_nonzero(labels[air]) / np.count_nonzero(air) > 0.99
    assert (labels[truth["gas"] & (hu < -320.0)] > 0).all()
    assert not labels[hu >= -320.0].any()


def test_find_lungs_takes_both_lungs_largest_first_and_leaves_gas(chest):
    hu, _, truth = chest
    _, _, lungs = _candidates(hu)
    assert len(lungs) == 2
    sizes = [np.count_nonzero(mask) for _, mask in lungs]
    assert sizes == sorted(sizes, reverse=True)
    for box, mask in lungs:
        assert mask.shape == tuple(b.stop - b.start for b in box) and mask.dtype == bool
    found = _paint(hu.shape, lungs)
    assert not found[truth["gas"]].any()
    assert dice(found, (truth["left"] | truth["right"]) & (hu < -320.0)) > 0.99
    assert _candidates(hu, min_ml=1e6)[2] == []  # nothing of lung size


def test_body_midline_is_the_body_centre(chest):
    hu, _, _ = chest
    body, steps, lungs = _candidates(hu)
    centre, width = body_midline(body, lungs, steps[0])
    assert centre == pytest.approx((hu.shape[0] - 1) / 2.0, abs=1.0)  # the body ellipse is centred on x = 0
    assert width == pytest.approx(300.0 / SPACING[0], abs=2 * steps[0])  # 300 mm wide


def test_split_joined_lungs_cuts_only_joined_lungs_near_the_centre(chest):
    hu, _, _ = chest
    body, steps, lungs = _candidates(hu)
    centre, width = body_midline(body, lungs, steps[0])
    assert split_joined_lungs(lungs, centre, width) is lungs  # apart already
    joined, _, _ = make_chest(joined=True, seed=1)
    body, steps, lungs = _candidates(joined)
    centre, width = body_midline(body, lungs, steps[0])
    halves = split_joined_lungs(lungs, centre, width)
    assert len(halves) == len(lungs) + 1 and halves[2:] == lungs[1:]
    (box, whole), (box_a, a), (box_b, b) = lungs[0], halves[0], halves[1]
    assert box_a == box_b == box and not (a & b).any()
    np.testing.assert_array_equal(a | b, whole)
    last_a, first_b = np.flatnonzero(a.any(axis=(1, 2)))[-1], np.flatnonzero(b.any(axis=(1, 2)))[0]
    plane = box[0].start + first_b
    assert last_a < first_b and abs(plane - centre) <= 0.12 * width + 1


def test_assign_sides_by_the_side_of_the_midline_in_world_x(chest):
    hu, affine, truth = chest
    body, steps, lungs = _candidates(hu)
    centre, _ = body_midline(body, lungs, steps[0])
    sides = assign_sides(lungs, centre, 1.0)
    assert [len(sides[LEFT_LUNG]), len(sides[RIGHT_LUNG])] == [1, 1]
    assert dice(_paint(hu.shape, sides[LEFT_LUNG]), truth["left"] & (hu < -320.0)) > 0.99
    mirrored = assign_sides(lungs, centre, -1.0)  # the index runs towards the patient's left: the labels swap
    assert mirrored[LEFT_LUNG] == sides[RIGHT_LUNG] and mirrored[RIGHT_LUNG] == sides[LEFT_LUNG]


def test_close_and_fill_keeps_every_lung_voxel_and_adds_lesions(chest):
    hu, _, truth = chest
    body, steps, lungs = _candidates(hu)
    sides = assign_sides(lungs, body_midline(body, lungs, steps[0])[0], 1.0)
    filled = np.zeros(hu.shape, dtype=np.uint8)
    close_and_fill(filled, sides, SPACING, 0.0)
    for name, pieces in sides.items():  # no closing: each lung's own voxels with its holes filled slice by slice
        np.testing.assert_array_equal(filled == name, _fill_holes_axial(_paint(hu.shape, pieces)))
    closed = np.zeros(hu.shape, dtype=np.uint8)
    close_and_fill(closed, sides, SPACING, 15.0)
    for name, pieces in sides.items():
        assert (closed[_paint(hu.shape, pieces)] == name).all()  # the closing of the other lung takes none
        assert (closed[filled == name] == name).all()  # the closing only adds
    assert np.mean(closed[truth["cons"]] == RIGHT_LUNG) > 0.7 > np.mean(filled[truth["cons"]] == RIGHT_LUNG)


@pytest.mark.parametrize("codes", ["RAS", "PSR"])
def test_lung_mask_from_hu_is_the_list_of_its_steps(chest, codes):
    hu, affine, _ = chest
    stored, stored_affine = reorient(hu, affine, codes)
    order = world_axis_order(stored_affine)
    work = np.transpose(stored, order)
    spacing = np.linalg.norm(stored_affine[:3, :3], axis=0)[order]
    body, steps = body_mask(work, spacing, -500.0)
    labels, n = enclosed_air(work, -320.0)
    lungs = find_lungs(work, labels, n, body, steps, 20.0 / (abs(np.linalg.det(stored_affine[:3, :3])) / 1000.0))
    centre, width = body_midline(body, lungs, steps[0])
    sides = assign_sides(split_joined_lungs(lungs, centre, width), centre, np.sign(stored_affine[0, order[0]]))
    out = np.zeros(stored.shape, dtype=np.uint8)
    close_and_fill(np.transpose(out, order), sides, spacing, 15.0)
    np.testing.assert_array_equal(lung_mask_from_hu(stored, stored_affine), out)
