"""Tests for covid_monai.quantify: volumes in mL, lesion counts, % of lung involved."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

import covid_monai.quantify
from covid_monai.quantify import count_components, quantify_case, voxel_volume_ml

SPACING = (0.8, 0.8, 2.5)


def _grid(shape, spacing):
    return [
        ((np.arange(n) - (n - 1) / 2.0) * s).reshape([-1 if i == ax else 1 for i in range(3)])
        for ax, (n, s) in enumerate(zip(shape, spacing, strict=True))
    ]


def _ellipsoid(shape, spacing, centre, radii) -> np.ndarray:
    x, y, z = _grid(shape, spacing)
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (z - centre[2]) / radii[2]
    ) ** 2 <= 1


def _ellipsoid_ml(radii) -> float:
    return 4.0 / 3.0 * math.pi * float(np.prod(radii)) / 1000.0


@pytest.fixture(scope="module")
def case():
    """Two lung ellipsoids (left at world -x, label 1) with two lesions in the left and one in the right lung."""
    shape = (300, 220, 90)
    affine = np.diag([*SPACING, 1.0])
    left_r, right_r = (40.0, 60.0, 90.0), (45.0, 60.0, 95.0)
    left = _ellipsoid(shape, SPACING, (-55.0, 0.0, 0.0), left_r)
    right = _ellipsoid(shape, SPACING, (55.0, 0.0, 0.0), right_r)
    lungs = np.zeros(shape, np.uint8)
    lungs[left] = 1
    lungs[right] = 2
    lesion_r = (15.0, 15.0, 20.0)
    lesions = [
        _ellipsoid(shape, SPACING, (-60.0, 10.0, 30.0), lesion_r),
        _ellipsoid(shape, SPACING, (-50.0, -20.0, -40.0), lesion_r),
        _ellipsoid(shape, SPACING, (60.0, 0.0, 0.0), lesion_r),
    ]
    infection = np.zeros(shape, np.uint8)
    for lesion in lesions:
        infection[lesion] = 1
    return infection, affine, lungs, {"left": left_r, "right": right_r, "lesion": lesion_r}


def test_volumes_and_percentages_match_analytic(case):
    infection, affine, lungs, radii = case
    q = quantify_case(infection, affine, lungs)
    assert q["voxel_ml"] == pytest.approx(0.8 * 0.8 * 2.5 / 1000.0)
    lesion_ml = _ellipsoid_ml(radii["lesion"])
    assert q["infection_ml"] == pytest.approx(3 * lesion_ml, rel=0.02)
    assert q["lesions"] == 3
    assert q["lung_left_ml"] == pytest.approx(_ellipsoid_ml(radii["left"]), rel=0.02)
    assert q["lung_right_ml"] == pytest.approx(_ellipsoid_ml(radii["right"]), rel=0.02)
    assert q["lung_ml"] == pytest.approx(q["lung_left_ml"] + q["lung_right_ml"])
    assert q["pct_left"] == pytest.approx(100.0 * 2 * lesion_ml / _ellipsoid_ml(radii["left"]), rel=0.03)
    assert q["pct_right"] == pytest.approx(100.0 * lesion_ml / _ellipsoid_ml(radii["right"]), rel=0.03)
    total_lung = _ellipsoid_ml(radii["left"]) + _ellipsoid_ml(radii["right"])
    assert q["pct_lungs"] == pytest.approx(100.0 * 3 * lesion_ml / total_lung, rel=0.03)
    assert 0.0 < q["pct_right"] < q["pct_lungs"] < q["pct_left"]


def test_storage_orientation_does_not_change_numbers(case):
    infection, affine, lungs, _ = case
    ref = quantify_case(infection, affine, lungs)
    # permuted and flipped storage with the matching affine (columns permuted, sign flipped)
    perm = (2, 0, 1)
    inf2 = np.flip(infection.transpose(perm), axis=1)
    lungs2 = np.flip(lungs.transpose(perm), axis=1)
    affine2 = np.eye(4)
    affine2[:3, :3] = affine[:3, :3][:, perm] * np.array([1.0, -1.0, 1.0])
    # plus a rotation (oblique): volumes depend on |det| only
    c, s = math.cos(0.3), math.sin(0.3)
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    got = quantify_case(inf2, rot @ affine2, lungs2[None])
    for key, value in ref.items():
        assert got[key] == pytest.approx(value), key


def test_lesions_use_26_connectivity():
    inf = np.zeros((12, 12, 12), np.uint8)
    inf[1:3, 1:3, 1:3] = 1
    inf[3, 3, 3] = 1  # touches the first cube by a corner only: same lesion (26-connectivity)
    inf[8:10, 8:10, 8:10] = 2  # any value > 0 is infection
    inf[5, 8, 1] = 1  # isolated voxel
    q = quantify_case(inf, np.eye(4))
    assert q["lesions"] == 3
    assert q["infection_ml"] == pytest.approx((8 + 1 + 8 + 1) / 1000.0)


def test_none_instead_of_nan():
    inf = np.zeros((6, 6, 6), np.uint8)
    q = quantify_case(inf, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert q["infection_ml"] == 0.0 and q["lesions"] == 0
    for key in ("lung_left_ml", "lung_right_ml", "lung_ml", "pct_left", "pct_right", "pct_lungs"):
        assert q[key] is None
    lungs = np.zeros_like(inf)
    lungs[:3] = 2  # only a right lung
    inf[0, 0, 0] = 1
    inf[5, 5, 5] = 1  # outside the lungs: in infection_ml, not in the percentages
    q = quantify_case(inf, np.diag([2.0, 2.0, 2.0, 1.0]), lungs)
    assert q["lung_left_ml"] == 0.0 and q["pct_left"] is None
    assert q["pct_right"] == pytest.approx(100.0 / 108.0)
    assert q["pct_lungs"] == pytest.approx(100.0 / 108.0)
    assert q["infection_ml"] == pytest.approx(2 * 0.008)
    q = quantify_case(inf, np.eye(4), np.zeros_like(inf))
    assert q["lung_ml"] == 0.0 and q["pct_lungs"] is None and q["pct_right"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in q.values())


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_lung_labels_of_any_dtype_count_the_same(dtype):
    """Left = 1, right = 2, any other positive value counts only in the total, values <= 0 are background."""
    rng = np.random.default_rng(3)
    values = rng.choice(np.array([0, 1, 2, 3, 7], dtype=np.int16), size=(9, 8, 7), p=[0.4, 0.2, 0.2, 0.1, 0.1])
    if dtype != np.uint8:
        values = np.where(rng.random(values.shape) < 0.1, -1, values)  # negative: background
    lungs = values.astype(dtype)
    if dtype == np.float32:
        lungs[rng.random(lungs.shape) < 0.05] = 0.5  # positive but neither 1 nor 2
    inf = (rng.random(lungs.shape) < 0.3).astype(np.uint8)
    q = quantify_case(inf, np.eye(4), lungs)
    left, right, lung = lungs == 1, lungs == 2, lungs > 0
    assert q["lung_left_ml"] == pytest.approx(left.sum() / 1000.0)
    assert q["lung_right_ml"] == pytest.approx(right.sum() / 1000.0)
    assert q["lung_ml"] == pytest.approx(lung.sum() / 1000.0)
    assert q["pct_left"] == pytest.approx(100.0 * (inf.astype(bool) & left).sum() / left.sum())
    assert q["pct_right"] == pytest.approx(100.0 * (inf.astype(bool) & right).sum() / right.sum())
    assert q["pct_lungs"] == pytest.approx(100.0 * (inf.astype(bool) & lung).sum() / lung.sum())
    # an infection map with negative background values: only values > 0 count, as for the 0/1 mask
    assert quantify_case(np.where(inf > 0, 0.7, -1.0).astype(np.float32), np.eye(4), lungs) == q


@pytest.mark.parametrize("density", [0.05, 0.2, 0.3, 0.5])
def test_slab_component_count_equals_whole_volume_labelling(density):
    """Components joined across slab faces (26-connectivity) give scipy's count for any slab size."""
    from scipy import ndimage

    mask = np.random.default_rng(int(density * 100)).random((30, 25, 40)) < density
    expected = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))[1]
    assert expected >= 1
    for slab in (1, 2, 3, 7, 64):
        assert count_components(mask, slab=slab) == expected
    assert count_components(np.zeros((4, 4, 9), np.uint8), slab=2) == 0
    # empty slabs, components inside one slab away from its faces, one crossing a face off the box corner
    sparse = np.zeros((20, 20, 30), np.uint8)
    sparse[2:4, 2:4, 2:4] = 1  # inside slab 0 (slab 10), not touching its faces
    sparse[15:18, 5:7, 8:10] = 1  # ends on slab 0's last plane...
    sparse[18, 7, 10:13] = 1  # ...continues diagonally into slab 1
    sparse[10, 10, 25] = 2  # slab 2; slab 1 otherwise empty of faces
    expected = ndimage.label(sparse, structure=np.ones((3, 3, 3), dtype=bool))[1]
    assert expected == 3
    assert [count_components(sparse, slab=k) for k in (1, 4, 10, 30)] == [expected] * 4
    with pytest.raises(ValueError, match="3D"):
        count_components(np.zeros((4, 4)))


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        quantify_case(np.zeros((4, 4, 4)), np.eye(4), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="3D"):
        quantify_case(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="affine"):
        voxel_volume_ml(np.eye(2))


def test_docstring_examples():
    assert doctest.testmod(covid_monai.quantify, raise_on_error=True).attempted >= 2
