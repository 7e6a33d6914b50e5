"""Tests of the synthetic chest-CT phantom: HU content, labels, lesion kinds, things that are not infection, scanner
variety, the parameter space, geometry in storage orientations, files."""

from __future__ import annotations

import dataclasses
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from covid_monai.phantom import (
    DEFAULT_SPEC,
    HU_CLIP,
    LESION_KINDS,
    MULTICLASS,
    ORIENTATIONS,
    TISSUE,
    WRITE_ORIENTATIONS,
    PhantomSpec,
    make_phantom,
    save_nifti,
    write_phantoms,
)
from covid_monai.transforms import lung_mask_from_hu

SMALL = (48, 48, 16)
MEDIUM = (96, 96, 32)
DEMO = (128, 128, 48)

# one plain scanner and no confounders: for tests of HU levels
CLEAN = dataclasses.replace(
    DEFAULT_SPEC,
    noise_hu=(20.0, 20.0),
    kernel=(0.0, 0.0),
    hu_offset=(0.0, 0.0),
    hu_gain=(1.0, 1.0),
    motion=0.0,
    streaks=0.0,
    emphysema=0.0,
    atelectasis=0.0,
    fissures=0.0,
)


@pytest.fixture(scope="module")
def demo_phantom():
    """A demo-sized phantom (the size the demo trains on) from a plain scanner."""
    return make_phantom(DEMO, seed=2, spec=CLEAN)


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
    assert ph.multiclass.shape == SMALL and ph.multiclass.dtype == np.uint8
    assert set(np.unique(ph.multiclass)) <= {0, 1, 2}
    np.testing.assert_array_equal(ph.multiclass > 0, ph.infection > 0)
    assert set(np.unique(ph.lungs)) == {0, 1, 2}
    assert HU_CLIP[0] <= ph.image.min() and ph.image.max() <= HU_CLIP[1]
    # voxel size along each stored axis = length of the affine's columns
    np.testing.assert_allclose(np.linalg.norm(ph.affine[:3, :3], axis=0), ph.spacing, rtol=1e-9)


def test_hu_of_tissues(demo_phantom):
    ph = demo_phantom
    median = {name: float(np.median(ph.image[ph.tissue == v])) for name, v in TISSUE.items() if (ph.tissue == v).any()}
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


def _core_hu_range(kind: str, spec: PhantomSpec = DEFAULT_SPEC) -> tuple[float, float]:
    if kind == "band":
        return spec.band_hu
    if kind in ("consolidation", "nodule"):
        return min(spec.ggo_hu[0], spec.consolidation_hu[0]), max(spec.ggo_hu[1], spec.consolidation_hu[1])
    return spec.ggo_hu


def test_lesions_inside_lungs_with_stated_hu(demo_phantom):
    ph = demo_phantom
    assert DEFAULT_SPEC.lesions[0] <= len(ph.lesions) <= DEFAULT_SPEC.lesions[1]
    infected = ph.infection > 0
    assert infected.sum() >= 300
    assert not (infected & (ph.lungs == 0)).any(), "infection outside the lungs"
    assert (ph.tissue[infected] == TISSUE["lesion"]).all()
    lung_only = (ph.lungs > 0) & ~infected & (ph.tissue == TISSUE["lung"])
    assert ph.image[infected].mean() > ph.image[lung_only].mean() + 150
    for les in ph.lesions:
        lo, hi = _core_hu_range(les.kind)
        assert les.kind in LESION_KINDS and lo <= les.hu <= hi
    first = ph.lesions[0]  # the first lesion is a sizeable one: its centre voxel is labelled, in its lung
    i, j, k = np.rint(first.center_voxel).astype(int)
    assert ph.infection[i, j, k] == 1 and ph.lungs[i, j, k] == first.side
    assert first.kind in ("ground_glass", "crazy_paving", "consolidation", "reversed_halo", "lobar")


@pytest.mark.parametrize("seed", range(6))
def test_every_case_has_a_sizeable_lesion(seed):
    ph = make_phantom(DEMO, seed=seed, orientation=WRITE_ORIENTATIONS[seed % 4])
    assert ph.infection.sum() >= 300
    assert not ((ph.infection > 0) & (ph.lungs == 0)).any()


def test_vessels_and_bronchi_thin_lesions_blobby(demo_phantom):
    ph = demo_phantom
    cube = np.ones((3, 3, 3), bool)
    lungs = (ph.lungs > 0).sum()
    for name in ("vessel", "bronchus"):
        tubes = ph.tissue == TISSUE[name]
        assert 0.002 * lungs < tubes.sum() < 0.15 * lungs, name
        assert ndimage.binary_erosion(tubes, cube).sum() / tubes.sum() < 0.2, name
        assert not (tubes & (ph.infection > 0)).any()
    assert np.median(ph.image[ph.tissue == TISSUE["vessel"]]) > -450
    assert np.median(ph.image[ph.tissue == TISSUE["bronchus"]]) < -300  # the air of the lumen
    infected = ph.infection > 0
    assert ndimage.binary_erosion(infected, cube).sum() / infected.sum() > 0.2
    # many small vessels: dozens of separate dense spots (vessel cross-sections) in a mid-lung slice
    k = int(np.argmax((ph.lungs > 0).sum((0, 1))))
    spots = (ph.image[:, :, k] > -650) & (ph.lungs[:, :, k] > 0) & (ph.infection[:, :, k] == 0)
    assert ndimage.label(spots)[1] >= 20


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
    for name in ("image", "infection", "multiclass", "lungs", "tissue"):
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
    for name in ("image", "infection", "multiclass", "lungs", "tissue", "affine"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.lesions == b.lesions and a.scanner == b.scanner
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.infection, c.infection)
    assert not np.allclose(a.affine, c.affine)


def test_spacing_anisotropic_fov_and_origin():
    for seed in range(10):
        ph = make_phantom(SMALL, seed=seed)
        sx, sy, sz = ph.spacing
        assert sx == sy
        assert 1.5 <= sz <= 5.0 and abs(sz - sx) >= 0.3
        assert 300 <= SMALL[0] * sx <= 460
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
    with pytest.raises(ValueError, match="lesion kinds"):
        PhantomSpec(kinds=("ground_glass", "smooth_blob"))
    with pytest.raises(ValueError, match="lesions"):
        PhantomSpec(lesions=(0, 3))


def test_write_phantoms(tmp_path):
    names = write_phantoms(tmp_path, 5, shape=SMALL, seed=20)
    assert names == [f"phantom_{i:03d}" for i in range(5)]
    expected_codes = [tuple(WRITE_ORIENTATIONS[i % 4]) for i in range(5)]
    for i, name in enumerate(names):
        ph = make_phantom(SMALL, seed=20 + i, orientation=WRITE_ORIENTATIONS[i % 4])
        for folder, dtype, array in (
            ("images", np.int16, ph.image),
            ("labels", np.uint8, ph.infection),
            ("labels_multiclass", np.uint8, ph.multiclass),
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
    for folder in ("images", "labels", "labels_multiclass", "lungs"):
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

    def broken(image, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), target)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["mask.nii.gz"]  # no temp file left behind
    np.testing.assert_array_equal(np.asanyarray(nib.load(target).dataobj), first)  # target untouched
    assert oct(os.stat(target).st_mode & 0o777) == "0o644"


# ----------------------------------------------------------------------------------------------------------------------
# Lesion kinds, things that are not infection, scanners, the parameter space


def _only(kind: str, **kw) -> PhantomSpec:
    return dataclasses.replace(CLEAN, kinds=(kind,), lesions=(1, 1), **kw)


@pytest.fixture(scope="module")
def by_kind():
    """One phantom per lesion kind, a single lesion each, at a finer grid than the demo's."""
    return {kind: make_phantom((160, 160, 48), seed=7, spec=_only(kind)) for kind in LESION_KINDS}


@pytest.mark.parametrize("kind", list(LESION_KINDS))
def test_each_lesion_kind(by_kind, kind):
    ph = by_kind[kind]
    [les] = ph.lesions
    assert les.kind == kind
    infected = ph.infection > 0
    lungs = ph.lungs > 0
    assert infected.any() and not (infected & ~lungs).any()
    ggo = ph.multiclass == MULTICLASS["ground_glass"]
    cons = ph.multiclass == MULTICLASS["consolidation"]
    lung_hu = np.median(ph.image[lungs & ~infected & (ph.tissue == TISSUE["lung"])])
    assert np.median(ph.image[infected]) > lung_hu + 50  # denser than the lung around it
    cube = np.ones((3, 3, 3), bool)
    if kind in ("ground_glass", "crazy_paving"):
        assert ggo.sum() > 0.95 * infected.sum() and infected.sum() > 100
        assert CLEAN.ggo_hu[0] - 150 < np.median(ph.image[infected]) < CLEAN.ggo_hu[1] + 100
    if kind == "crazy_paving":  # septal lines over the ground glass: a wide spread of HU inside the lesion
        core = ndimage.binary_erosion(infected, cube)
        assert np.percentile(ph.image[core], 95) - np.percentile(ph.image[core], 5) > 120
    if kind == "consolidation":
        assert cons.sum() > 50
        assert np.median(ph.image[cons]) > CLEAN.consolidation_hu[0] - 200
    if kind == "reversed_halo":  # a consolidation rim around a ground-glass centre
        assert cons.any() and ggo.any()
        i, j, k = np.rint(les.center_voxel).astype(int)
        assert ph.multiclass[i, j, k] == MULTICLASS["ground_glass"]
        assert np.median(ph.image[cons]) > np.median(ph.image[ggo]) + 150
    if kind == "nodule":
        voxel_mm3 = float(np.prod(ph.spacing))
        assert infected.sum() * voxel_mm3 <= 4 / 3 * np.pi * (les.radius_mm + 6) ** 3 * 2.5  # small
    if kind == "band":  # thin: an erosion removes most of it
        assert ndimage.binary_erosion(infected, cube).sum() < 0.3 * infected.sum()
    if kind == "lobar":  # a large share of one lung
        side = ph.lungs == les.side
        assert (infected & side).sum() > 0.08 * side.sum()


def test_lesion_sizes_from_nodules_to_lobes():
    spec = dataclasses.replace(CLEAN, lesions=(1, 1))
    volumes = {}
    for kind in ("nodule", "lobar"):
        vols = []
        for seed in range(3):
            ph = make_phantom(DEMO, seed=seed, spec=dataclasses.replace(spec, kinds=(kind,)))
            vols.append(ph.infection.sum() * np.prod(ph.spacing) * (300 / 47) / ph.spacing[2])  # nominal mm3
        volumes[kind] = np.median(vols)
    assert volumes["lobar"] > 50 * volumes["nodule"]


def test_distribution_bilateral_multifocal_posterior():
    both, counts, touching = [], [], 0
    for seed in range(8):
        ph = make_phantom(SMALL, seed=seed)
        counts.append(len(ph.lesions))
        if len(ph.lesions) > 1:
            both.append({les.side for les in ph.lesions} == {1, 2})
        # a lesion reaching the lung's edge: infected voxels next to non-lung voxels
        edge = ndimage.binary_dilation(ph.lungs == 0) & (ph.infection > 0)
        touching += bool(edge.any())
    assert np.mean(both) >= 0.8 and max(counts) >= 4
    assert touching >= 4


def test_not_infection_is_labelled_zero():
    spec = dataclasses.replace(CLEAN, atelectasis=1.0, emphysema=1.0, fissures=1.0)
    ph = make_phantom(DEMO, seed=3, spec=spec)
    lung = (ph.lungs > 0) & (ph.tissue == TISSUE["lung"])
    for name in ("atelectasis", "emphysema", "vessel", "bronchus"):
        where = ph.tissue == TISSUE[name]
        assert where.sum() > 20, name
        assert not (where & (ph.infection > 0)).any(), name
        assert (ph.lungs[where] > 0).all(), name
    assert np.median(ph.image[ph.tissue == TISSUE["atelectasis"]]) > np.median(ph.image[lung]) + 150
    assert np.median(ph.image[ph.tissue == TISSUE["emphysema"]]) < -930
    # atelectasis is dependent and basal: behind and below the lungs' centre
    atel = _world_centroid(ph.tissue == TISSUE["atelectasis"], ph.affine)
    centre = _world_centroid(ph.lungs > 0, ph.affine)
    assert atel[1] < centre[1] and atel[2] < centre[2]
    # the HU lung mask still finds these lungs
    mask = lung_mask_from_hu(ph.image, ph.affine) > 0
    assert 2 * (mask & (ph.lungs > 0)).sum() / (mask.sum() + (ph.lungs > 0).sum()) > 0.9


def test_thick_slices_average_the_anatomy():
    """Thick slices blur across z (partial volume at the diaphragm and the vessels); thin ones do not."""
    spread = {}
    for mm in (0.6, 5.0):
        ph = make_phantom(DEMO, seed=4, spec=dataclasses.replace(CLEAN, slice_thickness_mm=(mm, mm), noise_hu=(0, 0)))
        lung = (ph.lungs > 0) & (ph.infection == 0)
        hu = ph.image[lung].astype(float)
        spread[mm] = ((hu > -700) & (hu < -200)).mean()  # intermediate, GGO-like densities that are not infection
    assert spread[5.0] > spread[0.6]


def test_scanner_noise_kernel_and_calibration():
    def air(spec):  # 1 mm pixels, so that the kernels' correlation length (about a mm) shows
        ph = make_phantom((128, 128, 12), spacing=(1.0, 1.0, 3.0), seed=1, spec=spec)
        outside = ph.tissue == TISSUE["air"]
        outside[:, :, [0, -1]] = False
        corner = ph.image[:16, :16, 4:-4].astype(float)
        return ph, float(np.median(ph.image[outside])), corner

    base = dict(motion=0.0, streaks=0.0, hu_gain=(1.0, 1.0))
    ph, median, corner = air(dataclasses.replace(CLEAN, noise_hu=(30, 30), hu_offset=(25, 25), **base))
    assert ph.scanner.noise_hu == 30 and 20 < corner.std() < 40
    assert -1000 + 15 <= median <= -1000 + 35  # the calibration offset moves every HU

    def neighbour_correlation(c):
        return np.corrcoef(c[:-1].ravel(), c[1:].ravel())[0, 1]

    _, _, smooth = air(dataclasses.replace(CLEAN, noise_hu=(30, 30), kernel=(-1, -1), **base))
    _, _, sharp = air(dataclasses.replace(CLEAN, noise_hu=(30, 30), kernel=(1, 1), **base))
    # correlated noise from smooth kernels, anti-correlated (edge-enhanced) from sharp ones
    assert neighbour_correlation(smooth) > 0.3 and neighbour_correlation(sharp) < 0.0


def test_scanner_draws_cover_the_spec():
    scanners = [make_phantom(SMALL, seed=s).scanner for s in range(40)]
    for name, (lo, hi) in (
        ("noise_hu", DEFAULT_SPEC.noise_hu),
        ("kernel", DEFAULT_SPEC.kernel),
        ("slice_thickness_mm", DEFAULT_SPEC.slice_thickness_mm),
        ("hu_offset", DEFAULT_SPEC.hu_offset),
    ):
        values = [getattr(sc, name) for sc in scanners]
        assert lo <= min(values) and max(values) <= hi, name
        assert max(values) - min(values) > 0.6 * (hi - lo), name
    assert any(sc.motion_mm > 0 for sc in scanners) and any(sc.streaks for sc in scanners)


def test_spec_restricts_kinds_and_keeps_other_draws():
    spec = dataclasses.replace(DEFAULT_SPEC, kinds=("nodule", "band"), lesions=(3, 3))
    for seed in range(4):
        ph = make_phantom(SMALL, seed=seed, spec=spec)
        assert len(ph.lesions) == 3 and {les.kind for les in ph.lesions} <= {"nodule", "band"}
    # the anatomy does not depend on the lesions: same lungs for another spec
    a = make_phantom(SMALL, seed=1)
    b = make_phantom(SMALL, seed=1, spec=spec)
    np.testing.assert_array_equal(a.lungs, b.lungs)


def test_hu_lung_mask_finds_the_lungs_of_small_phantoms(tmp_path):
    """The other modules' tests segment tiny phantoms (conftest): the HU lung mask must find their lungs."""
    for seed in range(3, 7):
        ph = make_phantom((64, 64, 16), seed=seed, orientation=WRITE_ORIENTATIONS[seed % 4])
        mask = lung_mask_from_hu(ph.image, ph.affine)
        lungs = ph.lungs > 0
        assert 2 * ((mask > 0) & lungs).sum() / ((mask > 0).sum() + lungs.sum()) > 0.9
        # left is left: the mask's labels agree with the phantom's
        assert ((mask == 1) & (ph.lungs == 1)).sum() > 0.8 * (ph.lungs == 1).sum()
