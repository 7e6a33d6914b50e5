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


# --- clinical read-out: lesion types, lung zones, lobes and the CT severity score ---------------------------------


def _world_z(shape, affine):
    """World z (RAS, +z superior) of every voxel centre, by brute force."""
    ijk = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4])[2].reshape(shape)


def _expected_zones(infection, lungs, affine):
    """% infected of each lung third, counted independently of quantify (whole-volume numpy)."""
    z, infected = _world_z(lungs.shape, affine), infection > 0
    expected = {}
    for side, label in (("left", 1), ("right", 2)):
        inside = lungs == label
        low, high = z[inside].min(), z[inside].max()
        first, second = low + (high - low) / 3, low + 2 * (high - low) / 3
        zones = {"lower": z < first, "middle": (z >= first) & (z < second), "upper": z >= second}
        for zone, where in zones.items():
            expected[f"pct_zone_{side}_{zone}"] = 100.0 * (inside & where & infected).sum() / (inside & where).sum()
    return expected


def test_lesion_types_split_by_hu_or_taken_from_the_model():
    from covid_monai.quantify import HU_CONSOLIDATION, lesion_types

    rng = np.random.default_rng(5)
    hu = rng.uniform(-1000, 100, size=(20, 18, 40)).astype(np.float32)
    infection = (rng.random(hu.shape) < 0.3).astype(np.uint8)
    affine = np.diag([0.7, 0.8, 1.5, 1.0])
    q = quantify_case(infection, affine, image=hu[None])
    dense = int(((infection > 0) & (hu >= HU_CONSOLIDATION)).sum())
    assert q["class_source"] == "hu"
    assert q["consolidation_ml"] == pytest.approx(dense * voxel_volume_ml(affine))
    assert q["ggo_ml"] == pytest.approx((infection.sum() - dense) * voxel_volume_ml(affine))
    assert q["ggo_ml"] + q["consolidation_ml"] == pytest.approx(q["infection_ml"], rel=1e-12)
    assert HU_CONSOLIDATION == -300.0
    # the threshold itself is consolidation, just below it ground glass
    edge = np.ones((1, 1, 2), np.uint8)
    assert lesion_types(edge, np.eye(4), np.array([[[-300.0, -300.01]]]))["consolidation_ml"] == pytest.approx(0.001)
    # a multi-class mask: the model's classes, the HU are not used
    classes = infection * rng.integers(1, 3, size=hu.shape).astype(np.uint8)
    q = quantify_case(classes, affine, image=hu, multiclass=True)
    assert q["class_source"] == "model"
    assert q["ggo_ml"] == pytest.approx((classes == 1).sum() * voxel_volume_ml(affine))
    assert q["consolidation_ml"] == pytest.approx((classes == 2).sum() * voxel_volume_ml(affine))
    assert q["ggo_ml"] + q["consolidation_ml"] == pytest.approx(q["infection_ml"], rel=1e-12)
    # neither classes nor HU: no split
    q = quantify_case(infection, affine)
    assert q["ggo_ml"] is None and q["consolidation_ml"] is None and q["class_source"] is None
    with pytest.raises(ValueError, match="multi-class"):
        quantify_case(np.full((2, 2, 2), 3, np.uint8), np.eye(4), multiclass=True)
    with pytest.raises(ValueError, match="image shape"):
        quantify_case(infection, affine, image=hu[:-1])


def test_zones_are_thirds_of_each_lung_in_world_z(case):
    infection, affine, lungs, _ = case
    q = quantify_case(infection, affine, lungs)
    expected = _expected_zones(infection, lungs, affine)
    for key, value in expected.items():
        assert q[key] == pytest.approx(value), key
    # the left lung's lesions sit above (z=+30 mm) and below (z=-40 mm) its centre, the right one's at its centre
    assert q["pct_zone_left_upper"] > 0 and q["pct_zone_left_lower"] > 0 and q["pct_zone_left_middle"] > 0
    assert q["pct_zone_right_middle"] > 0 and q["pct_zone_right_upper"] == 0 == q["pct_zone_right_lower"]
    # the same scan stored permuted, flipped and tilted (oblique): zones follow world z, not storage axes
    perm = (2, 0, 1)
    inf2, lungs2 = np.flip(infection.transpose(perm), axis=1), np.flip(lungs.transpose(perm), axis=1)
    affine2 = np.eye(4)
    affine2[:3, :3] = affine[:3, :3][:, perm] * np.array([1.0, -1.0, 1.0])
    affine2[:3, 3] = [-120.0, 80.0, -400.0]
    c, s = math.cos(0.4), math.sin(0.4)
    tilt = np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1.0]])  # about x: head-foot mixes with y
    got = quantify_case(inf2, tilt @ affine2, lungs2)
    for key, value in _expected_zones(inf2, lungs2, tilt @ affine2).items():
        assert got[key] == pytest.approx(value), key
    assert got["pct_zone_left_upper"] != pytest.approx(q["pct_zone_left_upper"])  # tilted: other thirds


def test_zone_boundaries_and_missing_lungs():
    from covid_monai.quantify import zone_involvement

    lungs = np.zeros((2, 3, 9), np.uint8)
    lungs[0] = 1
    inf = np.zeros_like(lungs)
    inf[0, :, 8] = 1  # the left lung's top slice; z from 0 to 8 mm: thirds cut at 2.67 and 5.33 mm
    q = zone_involvement(inf, lungs, np.eye(4))
    assert q["pct_zone_left_upper"] == pytest.approx(100.0 / 3)  # slices 6, 7, 8
    assert q["pct_zone_left_middle"] == 0.0 and q["pct_zone_left_lower"] == 0.0
    assert all(q[f"pct_zone_right_{z}"] is None for z in ("upper", "middle", "lower"))  # no right lung
    flipped = np.diag([1.0, 1.0, -1.0, 1.0])  # +k runs towards the feet: slice 8 is now the lowest
    assert zone_involvement(inf, lungs, flipped)["pct_zone_left_lower"] == pytest.approx(100.0 / 3)
    assert all(v is None for v in zone_involvement(inf, None, np.eye(4)).values())


def test_lobe_percentages_and_ct_severity_score():
    from covid_monai.quantify import LOBE_LABELS, lobe_involvement, lobe_score

    # five lobes of 200 voxels each; infected counts put each lobe on one side of a score boundary
    lobes = np.repeat(np.arange(1, 6, dtype=np.uint8), 200).reshape(5, 20, 10)
    infection = np.zeros_like(lobes)
    infected = {"lul": 0, "lll": 9, "rul": 10, "rml": 51, "rll": 151}  # 0 %, 4.5 %, 5 %, 25.5 %, 75.5 %
    for name, count in infected.items():
        infection[LOBE_LABELS[name] - 1].flat[:count] = 1
    infection[0, 0, 0] = 0
    q = quantify_case(infection, np.eye(4), None, lobes=lobes[None])
    for name, count in infected.items():
        assert q[f"pct_lobe_{name}"] == pytest.approx(100.0 * count / 200), name
    assert q["ct_severity_score"] == 0 + 1 + 2 + 3 + 5
    assert [lobe_score(p) for p in (None, 0, 1e-9, 4.99, 5, 25, 25.01, 49.99, 50, 75, 75.01, 100)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # a lobe the mask does not hold: no percentage, scores 0; the others count as before
    lobes[lobes == LOBE_LABELS["rml"]] = 0
    q = lobe_involvement(infection, lobes)
    assert q["pct_lobe_rml"] is None and q["ct_severity_score"] == 0 + 1 + 2 + 5
    # infection outside every lobe counts nowhere; no lobes, no lobe numbers
    assert lobe_involvement(np.ones((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.uint8))["ct_severity_score"] == 0
    assert all(quantify_case(infection, np.eye(4))[k] is None for k in ("pct_lobe_lul", "ct_severity_score"))
    with pytest.raises(ValueError, match="0-5"):
        lobe_involvement(infection, np.full(infection.shape, 6, np.uint8))
    with pytest.raises(ValueError, match="unsigned"):
        lobe_involvement(infection, lobes.astype(np.float32))


def _pan_score(pct: float) -> int:
    """The CT severity score of one lobe, written out once more for the tests (Pan et al., Radiology 2020)."""
    for score, upper, inclusive in ((0, 0.0, True), (1, 5.0, False), (2, 25.0, True), (3, 50.0, False),
                                    (4, 75.0, True)):
        if pct < upper or (inclusive and pct == upper):
            return score
    return 5


def _lobes_from_lungs(lungs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Lobe labels for a test: the left lung cut in two and the right lung in three along world z."""
    z = _world_z(lungs.shape, affine)
    lobes = np.zeros(lungs.shape, np.uint8)
    for label, names in ((1, (2, 1)), (2, (5, 4, 3))):  # lower to upper: LLL, LUL / RLL, RML, RUL
        inside = lungs == label
        edges = np.quantile(z[inside], np.linspace(0, 1, len(names) + 1)[1:-1])
        lobes[inside] = np.asarray(names, np.uint8)[np.searchsorted(edges, z[inside])]
    return lobes


def test_read_out_matches_counts_from_the_written_masks(tmp_path, random_bundle, phantoms):
    """Through the batch runner (an intensity 'network' gives partial masks): every read-out number is recounted
    from the files it wrote, the input's HU and the lobe masks given with --lobes."""
    import nibabel as nib
    import torch

    from covid_monai.inference import BatchSegmenter, discover_cases
    from covid_monai.lobes import TOTALSEGMENTATOR_LOBES

    images = sorted((phantoms / "images").glob("*.nii.gz"))[:3]
    lobes_dir = tmp_path / "lobes"
    lobes_dir.mkdir()
    expected_lobes = {}
    for k, image in enumerate(images):
        reference = nib.load(str(phantoms / "lungs" / image.name))
        case = image.name.removesuffix(".nii.gz")
        lobes = _lobes_from_lungs(np.asarray(reference.dataobj), reference.affine)
        if k == 0:  # lungmask's single label file, in the scan's own storage
            nib.save(nib.Nifti1Image(lobes, reference.affine), str(lobes_dir / f"{case}_lobes.nii.gz"))
            expected_lobes[case] = lobes
        elif k == 1:  # TotalSegmentator's five files, stored in RAS order (another storage order, same grid)
            (lobes_dir / case).mkdir()
            for name, label in TOTALSEGMENTATOR_LOBES.items():
                binary = nib.as_closest_canonical(nib.Nifti1Image((lobes == label).astype(np.uint8), reference.affine))
                nib.save(binary, str(lobes_dir / case / f"{name}.nii.gz"))
            expected_lobes[case] = lobes
        else:  # another grid: refused with a warning
            moved = reference.affine.copy()
            moved[:3, 3] += 5.0
            nib.save(nib.Nifti1Image(lobes, moved), str(lobes_dir / f"{case}.nii.gz"))
    segmenter = BatchSegmenter(random_bundle, "cpu", None, 0, save_lungs=True, lobes_dir=lobes_dir)
    segmenter.inferer = lambda x, network: (x[:, :1] - torch.quantile(x[:, :1].flatten()[::5], 0.9)) * 4.0
    cases, _ = discover_cases(images)
    results = {r.case: r for r in segmenter.run(cases, tmp_path / "out", progress=False)}
    partial = 0
    for image in images:
        case = image.name.removesuffix(".nii.gz")
        row = results[case]
        assert row.status == "ok", row.error
        written = nib.load(str(tmp_path / "out" / f"{case}_infection.nii.gz"))
        infection, affine = np.asarray(written.dataobj) > 0, written.affine
        lungs = np.asarray(nib.load(str(tmp_path / "out" / f"{case}_lungs.nii.gz")).dataobj)
        hu = np.asarray(nib.load(str(image)).dataobj, dtype=np.float32)
        ml = voxel_volume_ml(affine)
        assert 0 < infection.sum() < (lungs > 0).sum()
        assert row.class_source == "hu"
        assert row.ggo_ml == pytest.approx((infection & (hu < -300)).sum() * ml, abs=2e-4)
        assert row.consolidation_ml == pytest.approx((infection & (hu >= -300)).sum() * ml, abs=2e-4)
        assert row.ggo_ml + row.consolidation_ml == pytest.approx(row.infection_ml, abs=1e-9)
        for key, value in _expected_zones(infection, lungs, affine).items():
            assert getattr(row, key) == pytest.approx(value, abs=1e-4), (case, key)
            partial += 0 < value < 100
        if case not in expected_lobes:
            assert "lobe mask not used" in row.warnings and "not the scan's" in row.warnings
            assert row.ct_severity_score is None and row.pct_lobe_rml is None
            continue
        score = 0
        for name, label in (("lul", 1), ("lll", 2), ("rul", 3), ("rml", 4), ("rll", 5)):
            lobe = expected_lobes[case] == label
            pct = 100.0 * (infection & lobe).sum() / lobe.sum()
            assert getattr(row, f"pct_lobe_{name}") == pytest.approx(pct, abs=1e-4), (case, name)
            score += _pan_score(pct)
            partial += 0 < pct < 100
        assert row.ct_severity_score == score
    assert partial >= 4  # the masks are partial: the percentages are not all 0 or 100
