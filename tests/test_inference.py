"""Batch inference: geometry in every storage orientation, DICOM, outputs, summary, skip/overwrite, failures."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covid_monai.inference import check_output_folder, discover_cases, run_batch
from covid_monai.io import save_nifti_like
from covid_monai.phantom import make_phantom, save_nifti
from covid_monai.quantify import voxel_volume_ml
from tests.conftest import shared_data


def _write_case(folder: Path, name: str, orientation: str, seed: int = 11, shape=(64, 64, 16), **kw) -> Path:
    phantom = make_phantom(shape=shape, seed=seed, orientation=orientation, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.nii.gz"
    save_nifti(phantom.image, phantom.affine, path)
    return path


def _run(inputs, out, bundle, workers=1, **kw):
    """The batch run as users run it: one DataLoader worker (the command line's default)."""
    return run_batch(inputs, out, bundle, device="cpu", workers=workers, progress=False, **kw)


def itk_series_affine(series: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """The RAS affine and shape of a DICOM series as ITK (GDCM) reads it, independently of the pipeline."""
    import itk

    reader = itk.ImageSeriesReader[itk.Image[itk.SS, 3]].New()
    names = itk.GDCMSeriesFileNames.New()
    names.SetDirectory(str(series))
    reader.SetFileNames(names.GetFileNames(names.GetSeriesUIDs()[0]))
    reader.Update()
    image = reader.GetOutput()
    lps = np.eye(4)
    lps[:3, :3] = itk.array_from_matrix(image.GetDirection()) * np.asarray(image.GetSpacing())
    lps[:3, 3] = np.asarray(image.GetOrigin())
    shape = tuple(int(s) for s in image.GetLargestPossibleRegion().GetSize())
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, shape  # ITK works in LPS, NIfTI in RAS


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LAS", "RPI", "oblique"])
def test_mask_has_input_shape_and_affine(tmp_path, random_bundle, orientation):
    scan = _write_case(tmp_path / "in", f"scan_{orientation}", orientation, spacing=(5.1, 4.9, 7.5))
    results = _run([scan], tmp_path / "out", random_bundle, save_lungs=True, save_probabilities=True)
    assert [r.status for r in results] == ["ok"], results[0].error
    source = nib.load(str(scan))
    for kind, dtype in (("infection", np.uint8), ("lungs", np.uint8), ("probability", np.float32)):
        out = nib.load(str(tmp_path / "out" / f"scan_{orientation}_{kind}.nii.gz"))
        assert out.shape == source.shape
        np.testing.assert_allclose(out.affine, source.affine, atol=1e-5)
        np.testing.assert_allclose(out.get_qform(), source.get_qform(), atol=1e-5)
        np.testing.assert_allclose(out.get_sform(), source.get_sform(), atol=1e-5)
        assert int(out.header["qform_code"]) == int(source.header["qform_code"])
        assert int(out.header["sform_code"]) == int(source.header["sform_code"])
        assert out.get_data_dtype() == dtype
    mask = np.asarray(nib.load(str(tmp_path / "out" / f"scan_{orientation}_infection.nii.gz")).dataobj)
    assert set(np.unique(mask)) <= {0, 1}


def test_header_codes_and_sform_only_input_kept(tmp_path, random_bundle):
    phantom = make_phantom(shape=(64, 64, 16), seed=5, orientation="LPS")
    image = nib.Nifti1Image(phantom.image, None)
    image.set_sform(phantom.affine, code=2)  # aligned to another scan: sform only, qform unset
    image.set_qform(None, code=0)
    scan = tmp_path / "in" / "sform_only.nii.gz"

    scan.parent.mkdir()
    nib.save(image, scan)
    _run([scan], tmp_path / "out", random_bundle)
    out = nib.load(str(tmp_path / "out" / "sform_only_infection.nii.gz"))
    assert int(out.header["sform_code"]) == 2 and int(out.header["qform_code"]) == 0
    np.testing.assert_allclose(out.affine, phantom.affine, atol=1e-5)


def test_same_scan_in_two_orientations_gives_same_world_mask(tmp_path, random_bundle):
    orientations = ("RAS", "LPS", "RPI")
    scans = [_write_case(tmp_path / "in", o, o, seed=21, spacing=(4.2, 4.2, 6.0)) for o in orientations]
    _run(scans, tmp_path / "out", random_bundle, save_probabilities=True)
    probabilities, masks = [], []
    for o in orientations:
        for kind, store in (("probability", probabilities), ("infection", masks)):
            image = nib.as_closest_canonical(nib.load(str(tmp_path / "out" / f"{o}_{kind}.nii.gz")))
            store.append(np.asarray(image.dataobj))
    assert np.ptp(probabilities[0]) > 1e-3, "random weights should still give a varying map"
    for other in (1, 2):
        np.testing.assert_allclose(probabilities[other], probabilities[0], atol=1e-5)
        np.testing.assert_array_equal(masks[other], masks[0])


def test_real_dicom_series_geometry(tmp_path, random_bundle):
    series = shared_data("real_ct", "dicom_series")
    results = _run([series], tmp_path / "out", random_bundle, save_lungs=True)
    assert results[0].status == "ok", results[0].error
    assert results[0].case == "dicom_series"
    out = nib.load(str(tmp_path / "out" / "dicom_series_infection.nii.gz"))
    expected, shape = itk_series_affine(series)
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, expected, atol=1e-4)
    np.testing.assert_allclose(out.header.get_zooms(), [0.977, 0.977, 2.0], atol=1e-3)


@pytest.mark.parametrize("workers", [1, 2])
def test_dicom_series_between_nifti_cases_through_workers(tmp_path, random_bundle, workers):
    """The series read in a DataLoader worker between NIfTI cases keeps ITK's geometry, run after run.

    The scan's affine used to be recorded as a numpy view of the image's affine tensor; a worker moves every tensor
    it sends into shared memory and frees the old buffer, so the view was sent from freed memory (garbage in the
    direction matrix, "Could not decompose affine").
    """
    import shutil

    before, after = tmp_path / "in" / "before", tmp_path / "in" / "after"
    _write_case(before, "ph_before", "LPS", seed=4)
    shutil.copy(shared_data("real_ct", "abdomen_ct_3mm.nii.gz"), before / "abdomen.nii.gz")
    series = shutil.copytree(shared_data("real_ct", "dicom_series"), tmp_path / "in" / "series_a")
    _write_case(after, "ph_after", "RAS", seed=5)
    expected, shape = itk_series_affine(series)
    for run in range(3):
        out = tmp_path / f"out{run}"
        results = {r.case: r for r in _run([before, series, after], out, random_bundle, workers=workers)}
        assert {c: r.status for c, r in results.items()} == dict.fromkeys(
            ("ph_before", "abdomen", "series_a", "ph_after"), "ok"
        ), {c: r.error for c, r in results.items()}
        mask = nib.load(str(out / "series_a_infection.nii.gz"))
        assert mask.shape == shape
        np.testing.assert_allclose(mask.affine, expected, atol=1e-4)
        np.testing.assert_allclose(mask.header.get_sform(), expected, atol=1e-4)


def test_summary_matches_masks_and_rerun_skips(tmp_path, random_bundle, phantoms):
    out = tmp_path / "out"
    results = _run([phantoms / "images"], out, random_bundle, save_lungs=True)
    assert [r.status for r in results] == ["ok"] * 4
    rows = {row["case"]: row for row in json.loads((out / "summary.json").read_text())["cases"]}
    for case, row in rows.items():
        mask_image = nib.load(str(out / f"{case}_infection.nii.gz"))
        mask = np.asarray(mask_image.dataobj)
        lungs = np.asarray(nib.load(str(out / f"{case}_lungs.nii.gz")).dataobj)
        voxel = voxel_volume_ml(mask_image.affine)
        assert row["infection_ml"] == pytest.approx(mask.sum() * voxel, rel=1e-3, abs=1e-3)
        assert row["lung_ml"] == pytest.approx((lungs > 0).sum() * voxel, rel=1e-3)
        assert row["lung_left_ml"] == pytest.approx((lungs == 1).sum() * voxel, rel=1e-3)
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("case,input,status,error") and len(csv_lines) == 5
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_infection.nii.gz")}
    again = _run([phantoms / "images"], out, random_bundle, save_lungs=True)
    assert [r.status for r in again] == ["skipped"] * 4
    assert {r.case: r.infection_ml for r in again} == {c: r["infection_ml"] for c, r in rows.items()}
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*_infection.nii.gz")}
    redo = _run([phantoms / "images" / "phantom_000.nii.gz"], out, random_bundle, overwrite=True)
    assert [r.status for r in redo] == ["ok"]
    assert not list(out.glob(".*")), "temporary files left behind"


def test_previous_scan_is_written_while_the_network_runs_the_next(tmp_path, random_bundle, phantoms, monkeypatch):
    """The writer thread post-processes scan k while the network runs scan k+1; results stay in input order."""
    import threading

    from covid_monai.inference import BatchSegmenter

    events: list[str] = []
    writing = threading.Event()
    predict, write_one = BatchSegmenter.predict, BatchSegmenter._write_one

    def slow_predict(self, data):
        if data["name"] != "phantom_000":  # the network on scan k+1 waits (bounded) for scan k's writing to start
            events.append(f"overlap {data['name']}: {writing.wait(timeout=60)}")
        writing.clear()
        return predict(self, data)

    def observed_write(self, case, *args):
        writing.set()
        events.append(f"write {case.name}")
        return write_one(self, case, *args)

    monkeypatch.setattr(BatchSegmenter, "predict", slow_predict)
    monkeypatch.setattr(BatchSegmenter, "_write_one", observed_write)
    results = _run([phantoms / "images"], tmp_path / "out", random_bundle)
    names = [f"phantom_{i:03d}" for i in range(4)]
    assert [r.case for r in results] == names and [r.status for r in results] == ["ok"] * 4
    assert [e for e in events if e.startswith("overlap")] == [f"overlap {n}: True" for n in names[1:]]
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["cases"]
    assert [row["case"] for row in rows] == names


def test_bad_inputs_fail_alone_and_batch_goes_on(tmp_path, random_bundle):
    folder = tmp_path / "in"
    good = _write_case(folder, "good", "RAS")
    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "garbage.nii.gz").write_bytes(np.random.default_rng(0).bytes(5000))
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    results = {r.case: r for r in _run([folder, tmp_path / "missing.nii.gz"], tmp_path / "out", random_bundle)}
    assert results["good"].status == "ok"
    for name in ("empty", "garbage", "truncated", "missing"):
        assert results[name].status == "failed", name
        assert results[name].error and "\n" not in results[name].error
    assert (tmp_path / "out" / "good_infection.nii.gz").is_file()
    assert not (tmp_path / "out" / "empty_infection.nii.gz").exists()


def test_output_inside_input_refused(tmp_path, random_bundle, phantoms):
    with pytest.raises(ValueError, match="inside the input folder"):
        check_output_folder(phantoms / "images" / "masks", [phantoms / "images"])
    check_output_folder(phantoms / "images" / "masks", [phantoms / "images"], force=True)
    check_output_folder(tmp_path / "elsewhere", [phantoms / "images"])


def test_discovery_names_are_unique_and_safe(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        _write_case(folder, "scan", "RAS", shape=(32, 32, 8))
    _write_case(tmp_path, "..weird name!", "RAS", shape=(32, 32, 8))
    cases, failures = discover_cases([a, b, tmp_path / "..weird name!.nii.gz", a / "scan.nii.gz"])
    assert [c.name for c in cases] == ["scan", "scan_2", "weird_name"]
    assert not failures


def test_save_nifti_like_refuses_wrong_shape(tmp_path):
    scan = _write_case(tmp_path, "ref", "RAS", shape=(32, 32, 8))
    with pytest.raises(ValueError, match="does not match"):
        save_nifti_like(np.zeros((32, 32, 7)), tmp_path / "bad.nii.gz", np.eye(4), reference=scan)
    assert not (tmp_path / "bad.nii.gz").exists()


def _two_series_folder(folder: Path) -> Path:
    """The real DICOM slices split into two series (new series UIDs and descriptions), in one folder."""
    pydicom = pytest.importorskip("pydicom")
    source = sorted(shared_data("real_ct", "dicom_series").iterdir())
    folder.mkdir(parents=True)
    for i, path in enumerate(source):
        ds = pydicom.dcmread(path)
        first = i < len(source) // 2
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1" if first else "1.2.826.0.1.3680043.8.498.2"
        ds.SeriesDescription = "lung" if first else "soft"
        ds.SeriesNumber = 1 if first else 2
        ds.save_as(folder / path.name)
    return folder


def test_folder_with_two_dicom_series_gives_two_cases(tmp_path, random_bundle):
    folder = _two_series_folder(tmp_path / "study")
    cases, _ = discover_cases([folder])
    assert sorted(c.name for c in cases) == ["study_lung", "study_soft"]
    results = _run([folder], tmp_path / "out", random_bundle)
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    for name in ("study_lung", "study_soft"):
        assert nib.load(str(tmp_path / "out" / f"{name}_infection.nii.gz")).shape == (512, 512, 10)


def test_eight_bit_data_is_flagged_not_failed(tmp_path, random_bundle):
    phantom = make_phantom(shape=(48, 48, 12), seed=2)
    windowed = np.clip((phantom.image + 1250.0) / 1500.0 * 255.0, 0, 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(windowed, phantom.affine), tmp_path / "in" / "eight_bit.nii.gz")
    results = _run([tmp_path / "in"], tmp_path / "out", random_bundle)
    assert results[0].status == "ok"
    assert "do not look like Hounsfield units" in results[0].warnings
    row = json.loads((tmp_path / "out" / "summary.json").read_text())["cases"][0]
    assert "Hounsfield" in row["warnings"]


def test_mixed_folder_as_a_new_user_runs_it(tmp_path, random_bundle):
    """Phantoms in several orientations, the real DICOM series and NIfTI CT, a corrupt and an empty file."""
    import shutil

    scans = tmp_path / "scans"
    for orientation in ("RAS", "LPS", "RPI"):
        _write_case(scans / "phantoms", f"ph_{orientation}", orientation, seed=8)
    shutil.copytree(shared_data("real_ct", "dicom_series"), scans / "dicom_series")
    shutil.copy(shared_data("real_ct", "abdomen_ct_3mm.nii.gz"), scans / "abdomen.nii.gz")
    (scans / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(200))
    (scans / "zero.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    first = {r.case: r for r in _run([scans], out, random_bundle, save_lungs=True, save_preview=True)}
    good = {"ph_RAS", "ph_LPS", "ph_RPI", "dicom_series", "abdomen"}
    assert {c for c, r in first.items() if r.status == "ok"} == good
    assert {c for c, r in first.items() if r.status == "failed"} == {"corrupt", "zero"}
    for case in ("ph_RAS", "ph_LPS", "ph_RPI", "abdomen"):
        source = next(scans.rglob(f"{case}.nii.gz"))
        mask = nib.load(str(out / f"{case}_infection.nii.gz"))
        assert mask.shape == nib.load(str(source)).shape
        np.testing.assert_allclose(mask.affine, nib.load(str(source)).affine, atol=1e-5)
        assert (out / f"{case}_preview.png").is_file()
        row = first[case]
        voxel = voxel_volume_ml(mask.affine)
        assert row.infection_ml == pytest.approx(np.asarray(mask.dataobj).sum() * voxel, rel=1e-3, abs=1e-3)
    assert (out / "labels.ctbl").is_file() and (out / "lungs.ctbl").is_file()
    second = {r.case: r.status for r in _run([scans], out, random_bundle, save_lungs=True, save_preview=True)}
    assert second == {**{c: "skipped" for c in first if first[c].status == "ok"}, "corrupt": "failed", "zero": "failed"}
    assert not any(p.name.startswith(".") for p in out.iterdir())
    assert sorted(p.name for p in scans.rglob("*") if "_infection" in p.name) == []  # nothing written to the inputs
