"""Tests of the synthetic chest-CT phantom: HU content, labels, geometry in storage orientations, files."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from covid_monai.phantom import (
    HU_CLIP,
    LESION_HU,
    ORIENTATIONS,
    TISSUE,
    WRITE_ORIENTATIONS,
    make_phantom,
    save_nifti,
    write_phantoms,
)

SMALL = (48, 48, 16)
MEDIUM = (96, 96, 32)


@pytest.fixture(scope="module")
def demo_phantom():
    """A demo-sized phantom (the size the demo trains on)."""
    return make_phantom((128, 128, 48), seed=2)


@pytest.fixture(scope="module")
def by_orientation():
    """The same seed stored in every orientation (plus a permuted one), medium size."""
    out = {o: make_phantom(MEDIUM, seed=11, orientation=o) for o in ORIENTATIONS}
    # PIL stores canonical axes (x, y, z) as (y, z, x): give the stored shape that holds the same canonical grid
    out["PIL"] = make_phantom((MEDIUM[1], MEDIUM[2], MEDIUM[0]), seed=11, orientation="PIL")
    return out


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    return (affine[:3, :3] @ idx.mean(0)) + affine[:3, 3]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_arrays_dtypes_and_labels(orientation):
    ph = make_phantom(SMALL, seed=4, orientation=orientation)
    assert ph.image.shape == ph.infection.shape == ph.lungs.shape == ph.tissue.shape == SMALL
    assert ph.image.dtype == np.int16 and ph.infection.dtype == np.uint8 and ph.lungs.dtype == np.uint8
    assert ph.affine.shape == (4, 4) and ph.affine.dtype == np.float64
    assert set(np.unique(ph.infection)) <= {0, 1}
    assert set(np.unique(ph.lungs)) == {0, 1, 2}
    assert HU_CLIP[0] <= ph.image.min() and ph.image.max() <= HU_CLIP[1]
    # voxel size along each stored axis = length of the affine's columns
    np.testing.assert_allclose(np.linalg.norm(ph.affine[:3, :3], axis=0), ph.spacing, rtol=1e-9)


def test_hu_of_tissues(demo_phantom):
    ph = demo_phantom
    median = {name: float(np.median(ph.image[ph.tissue == label])) for name, label in TISSUE.items()}
    assert -1010 <= median["air"] <= -985
    assert -130 <= median["fat"] <= -75
    assert 0 <= median["soft"] <= 80
    assert median["bone"] >= 400
    assert np.percentile(ph.image[ph.tissue == TISSUE["bone"]], 95) <= 1000
    assert -900 <= median["lung"] <= -790
    assert median["airway"] <= -850
    # the lung mask, sampled as a whole (vessels and lesions included), is still mostly air-like
    assert np.median(ph.image[ph.lungs > 0]) < -750
    # the body (outside the lungs) is tissue, the outside is air
    body = (ph.tissue != TISSUE["air"]) & (ph.tissue != TISSUE["table"]) & (ph.lungs == 0)
    assert np.median(ph.image[body & (ph.tissue != TISSUE["airway"])]) > -150
    # noise is present: air is not constant
    assert 8 < ph.image[ph.tissue == TISSUE["air"]].std() < 30


def test_lesions_inside_lungs_with_stated_hu(demo_phantom):
    ph = demo_phantom
    assert 1 <= len(ph.lesions) <= 5
    infected = ph.infection > 0
    assert infected.sum() >= 300
    assert not (infected & (ph.lungs == 0)).any(), "infection outside the lungs"
    assert (ph.tissue[infected] == TISSUE["lesion"]).all()
    lung_only = (ph.lungs > 0) & ~infected & (ph.tissue == TISSUE["lung"])
    assert ph.image[infected].mean() > ph.image[lung_only].mean() + 200
    highest = max(les.hu for les in ph.lesions)
    for les in ph.lesions:
        lo, hi = LESION_HU[les.kind]
        assert lo <= les.hu <= hi
        i, j, k = np.rint(les.center_voxel).astype(int)
        assert ph.infection[i, j, k] == 1 and ph.lungs[i, j, k] == les.side
        core = np.median(ph.image[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2])
        # the core shows the lesion HU (or a brighter overlapping lesion), never the lung's
        assert les.hu - 60 <= core <= highest + 60


@pytest.mark.parametrize("seed", range(6))
def test_every_case_has_a_sizeable_lesion(seed):
    ph = make_phantom((128, 128, 48), seed=seed, orientation=WRITE_ORIENTATIONS[seed % 4])
    assert ph.infection.sum() >= 300
    assert not ((ph.infection > 0) & (ph.lungs == 0)).any()


def test_vessels_thin_lesions_blobby(demo_phantom):
    ph = demo_phantom
    vessels = ph.tissue == TISSUE["vessel"]
    assert vessels.sum() > 100
    assert vessels.sum() < 0.1 * (ph.lungs > 0).sum()
    assert np.median(ph.image[vessels]) > -400
    cube = np.ones((3, 3, 3), bool)
    kept_vessels = ndimage.binary_erosion(vessels, cube).sum() / vessels.sum()
    infected = ph.infection > 0
    kept_lesions = ndimage.binary_erosion(infected, cube).sum() / infected.sum()
    assert kept_vessels < 0.1 and kept_lesions > 0.3


@pytest.mark.parametrize("orientation", [*ORIENTATIONS, "PIL"])
def test_left_lung_on_world_minus_x(by_orientation, orientation):
    """RAS world x grows towards the patient's right (NIfTI, MONAI, Slicer): the left lung lies at lower x."""
    ph = by_orientation[orientation]
    left = _world_centroid(ph.lungs == 1, ph.affine)
    right = _world_centroid(ph.lungs == 2, ph.affine)
    spine = _world_centroid(ph.tissue == TISSUE["bone"], ph.affine)
    assert left[0] < right[0] - 50
    # the heart takes room from the left lung
    assert (ph.lungs == 1).sum() < (ph.lungs == 2).sum()
    # table below the patient's back: posterior is world -y
    table = _world_centroid(ph.tissue == TISSUE["table"], ph.affine)
    assert table[1] < min(left[1], right[1], spine[1])
    # the air of the trachea is superior to the lung centroids: superior is world +z
    trachea = _world_centroid(ph.tissue == TISSUE["airway"], ph.affine)
    assert trachea[2] > max(left[2], right[2])


def test_lesions_prefer_posterior_positions():
    posterior = []
    for seed in range(8):
        ph = make_phantom(SMALL, seed=seed, orientation=WRITE_ORIENTATIONS[seed % 4])
        lungs = _world_centroid(ph.lungs > 0, ph.affine)
        posterior += [les.center_world[1] < lungs[1] for les in ph.lesions]
    assert np.mean(posterior) >= 0.7


@pytest.mark.parametrize("orientation", ["LPS", "LAS", "RPI", "PIL"])
def test_same_world_content_in_every_orientation(by_orientation, orientation):
    ras, ph = by_orientation["RAS"], by_orientation[orientation]
    assert nib.aff2axcodes(ph.affine) == tuple(orientation)
    for name in ("image", "infection", "lungs", "tissue"):
        canonical = nib.as_closest_canonical(nib.Nifti1Image(getattr(ph, name), ph.affine))
        np.testing.assert_allclose(canonical.affine, ras.affine, atol=1e-6)
        np.testing.assert_array_equal(np.asanyarray(canonical.dataobj), getattr(ras, name))
    for a, b in zip(ph.lesions, ras.lesions, strict=True):
        np.testing.assert_allclose(a.center_world, b.center_world, atol=1e-6)


def test_oblique_rotates_only_the_affine(by_orientation):
    ras, obl = by_orientation["RAS"], by_orientation["oblique"]
    np.testing.assert_array_equal(obl.image, ras.image)
    np.testing.assert_array_equal(obl.lungs, ras.lungs)
    assert obl.spacing == ras.spacing
    directions = obl.affine[:3, :3] / np.linalg.norm(obl.affine[:3, :3], axis=0)
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-9)
    angle_z = np.degrees(np.arctan2(directions[1, 0], directions[0, 0]))
    assert 5 <= abs(angle_z) <= 15
    tilt = np.degrees(np.arccos(directions[2, 2]))
    assert 1 <= tilt <= 5
    # rotated about the volume centre: the centre stays in place
    centre = np.array([*((np.array(MEDIUM) - 1) / 2), 1.0])
    np.testing.assert_allclose(obl.affine @ centre, ras.affine @ centre, atol=1e-6)
    assert nib.aff2axcodes(obl.affine) == ("R", "A", "S")


def test_deterministic_and_seed_dependent():
    a = make_phantom(SMALL, seed=5, orientation="LPS")
    b = make_phantom(SMALL, seed=5, orientation="LPS")
    c = make_phantom(SMALL, seed=6, orientation="LPS")
    for name in ("image", "infection", "lungs", "tissue", "affine"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.lesions == b.lesions
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.infection, c.infection)
    assert not np.allclose(a.affine, c.affine)


def test_spacing_anisotropic_fov_and_origin():
    for seed in range(10):
        ph = make_phantom(SMALL, seed=seed)
        sx, sy, sz = ph.spacing
        assert sx == sy
        assert 1.5 <= sz <= 5.0 and abs(sz - sx) >= 0.3
        assert 300 <= SMALL[0] * sx <= 380
        assert np.abs(ph.affine[:3, 3]).max() >= 10  # a scanner-like origin, not the array corner at 0
    ph = make_phantom(SMALL, spacing=(7.0, 7.5, 4.0), origin=(1.0, -2.0, 3.0), orientation="LPS")
    assert ph.spacing == (7.0, 7.5, 4.0)
    np.testing.assert_allclose(ph.affine[:3, 3], (1.0, -2.0, 3.0))
    np.testing.assert_allclose(np.abs(np.diag(ph.affine)[:3]), (7.0, 7.5, 4.0))
    # a permuted storage keeps the spacing with its stored axis
    pil = make_phantom((48, 16, 40), spacing=(6.0, 3.0, 7.0), orientation="PIL")
    np.testing.assert_allclose(np.linalg.norm(pil.affine[:3, :3], axis=0), (6.0, 3.0, 7.0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="orientation"):
        make_phantom(SMALL, orientation="XYZ")
    with pytest.raises(ValueError, match="orientation"):
        make_phantom(SMALL, orientation="RRS")
    with pytest.raises(ValueError, match="too small"):
        make_phantom((8, 8, 2))
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(SMALL, spacing=(1.0, 0.0, 1.0))


def test_write_phantoms(tmp_path):
    names = write_phantoms(tmp_path, 5, shape=SMALL, seed=20)
    assert names == [f"phantom_{i:03d}" for i in range(5)]
    expected_codes = [tuple(WRITE_ORIENTATIONS[i % 4]) for i in range(5)]
    for i, name in enumerate(names):
        ph = make_phantom(SMALL, seed=20 + i, orientation=WRITE_ORIENTATIONS[i % 4])
        for folder, dtype, array in (
            ("images", np.int16, ph.image),
            ("labels", np.uint8, ph.infection),
            ("lungs", np.uint8, ph.lungs),
        ):
            img = nib.load(tmp_path / folder / f"{name}.nii.gz")
            assert img.get_data_dtype() == dtype
            data = np.asanyarray(img.dataobj)
            assert data.dtype == dtype
            np.testing.assert_array_equal(data, array)
            qform, qcode = img.get_qform(coded=True)
            sform, scode = img.get_sform(coded=True)
            assert qcode == 1 and scode == 1
            np.testing.assert_allclose(qform, ph.affine, atol=1e-4)
            np.testing.assert_allclose(sform, ph.affine, atol=1e-4)
            assert nib.aff2axcodes(img.affine) == expected_codes[i]
            np.testing.assert_allclose(img.header.get_zooms(), ph.spacing, rtol=1e-5)
    for folder in ("images", "labels", "lungs"):
        assert sorted(os.listdir(tmp_path / folder)) == [f"{n}.nii.gz" for n in names]  # no temp files left


def test_write_phantoms_orientations_argument(tmp_path):
    names = write_phantoms(tmp_path, 2, shape=SMALL, orientations=["RPI"])
    for name in names:
        assert nib.aff2axcodes(nib.load(tmp_path / "images" / f"{name}.nii.gz").affine) == ("R", "P", "I")
    with pytest.raises(ValueError, match="orientation"):
        write_phantoms(tmp_path / "bad", 1, shape=SMALL, orientations=["bogus"])


def test_save_nifti_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "mask.nii.gz"
    first = np.arange(64, dtype=np.uint8).reshape(4, 4, 4)
    save_nifti(first, np.eye(4), target)

    def broken(self, file_map, *args, **kwargs):
        file_map["image"].fileobj.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", broken)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), target)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["mask.nii.gz"]  # no temp file left behind
    np.testing.assert_array_equal(np.asanyarray(nib.load(target).dataobj), first)  # target untouched
    assert oct(os.stat(target).st_mode & 0o777) == "0o644"
