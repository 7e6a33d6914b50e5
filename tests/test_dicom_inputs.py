"""What real DICOM folders hold: re-encoded series, localizers and other objects, damaged files, odd geometry, zips.

Every variant is built from the real 20-slice series in ``../shared/data`` (JPEG 2000 lossless as shipped) and
pydicom's offline test files, and runs through the default batch path (one DataLoader worker) next to a good case.
Each batch runs once per module; the tests read its results.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covid_monai.inference import SUMMARY_FIELDS, CaseResult, discover_cases
from covid_monai.io import extract_zip_members, list_dicom_folder
from tests.conftest import shared_data
from tests.test_inference import _run, _write_case, itk_series_affine

pydicom = pytest.importorskip("pydicom")

STUDY_UID = "1.2.826.0.1.3680043.8.498.7001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.7002"
SCOUT_UID = "1.2.826.0.1.3680043.8.498.7003"
BAD_SLICE = 7  # the slice that the damaged variants damage (position -780.5 mm)


def _series() -> list[Path]:
    return sorted(shared_data("real_ct", "dicom_series").iterdir())


def _copy_series(folder: Path, edit: Callable[[int, object], None] | None = None) -> Path:
    """The real series rewritten by pydicom (pixel data untouched), after ``edit(index, dataset)``."""
    folder.mkdir(parents=True)
    for i, path in enumerate(_series()):
        ds = pydicom.dcmread(path)
        if edit is not None:
            edit(i, ds)
        ds.save_as(folder / path.name)
    return folder


def _testdata(name: str) -> Path:
    path = pydicom.data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path)


# ----------------------------------------------------------------------------------------------- re-encoded series


def _uncompressed(folder: Path) -> Path:
    """The series decoded to Explicit VR Little Endian (pydicom, JPEG 2000 through Pillow), SOP UIDs filled in."""
    folder.mkdir(parents=True)
    for path in _series():
        ds = pydicom.dcmread(path)
        ds.decompress()
        ds.SOPClassUID = pydicom.uid.CTImageStorage  # empty in the shipped files; GDCM's writer needs it
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(folder / path.name)
    return folder


def _rle(source: Path, folder: Path) -> Path:
    """RLE Lossless, encoded by pydicom's own encoder."""
    folder.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(folder / path.name)
    return folder


def _itk_encoded(source: Path, folder: Path, compression: str) -> Path:
    """Each slice re-written by ITK's GDCM with ``compression`` (JPEG: lossless process 14; JPEG2000: lossless)."""
    import itk

    folder.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        reader_io = itk.GDCMImageIO.New()
        image = itk.imread(str(path), itk.SS, imageio=reader_io)
        writer_io = itk.GDCMImageIO.New()
        writer_io.SetMetaDataDictionary(reader_io.GetMetaDataDictionary())
        writer_io.KeepOriginalUIDOn()
        writer_io.SetCompressionType(getattr(itk.GDCMImageIOEnums, f"Compression_{compression}"))
        itk.imwrite(image, str(folder / path.name), imageio=writer_io, compression=True)
    return folder


ENCODINGS = {
    "original": pydicom.uid.JPEG2000Lossless,
    "explicit_le": pydicom.uid.ExplicitVRLittleEndian,
    "rle": pydicom.uid.RLELossless,
    "jpeg_lossless": pydicom.uid.JPEGLosslessSV1,
    "jpeg2000": pydicom.uid.JPEG2000Lossless,
}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, random_bundle) -> tuple[Path, dict[str, Path], dict[str, CaseResult]]:
    """The series as shipped and re-encoded four ways, segmented in one batch with probability maps."""
    root = tmp_path_factory.mktemp("encoded")
    folders = {"original": shutil.copytree(shared_data("real_ct", "dicom_series"), root / "in" / "original")}
    folders["explicit_le"] = _uncompressed(root / "in" / "explicit_le")
    folders["rle"] = _rle(folders["explicit_le"], root / "in" / "rle")
    folders["jpeg_lossless"] = _itk_encoded(folders["explicit_le"], root / "in" / "jpeg_lossless", "JPEG")
    folders["jpeg2000"] = _itk_encoded(folders["explicit_le"], root / "in" / "jpeg2000", "JPEG2000")
    results = _run(list(folders.values()), root / "out", random_bundle, save_probabilities=True)
    return root / "out", folders, {r.case: r for r in results}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_reencoded_series_gives_the_same_mask(encoded, encoding):
    """RLE, JPEG lossless and JPEG 2000 (and uncompressed) decode through ITK's GDCM to the original's voxels."""
    out, folders, results = encoded
    first = next(folders[encoding].iterdir())
    assert pydicom.dcmread(first, stop_before_pixels=True).file_meta.TransferSyntaxUID == ENCODINGS[encoding]
    assert results[encoding].status == "ok", results[encoding].error
    expected, shape = itk_series_affine(folders["original"])
    for kind in ("infection", "probability"):
        original = nib.load(str(out / f"original_{kind}.nii.gz"))
        image = nib.load(str(out / f"{encoding}_{kind}.nii.gz"))
        assert image.shape == shape
        np.testing.assert_allclose(image.affine, expected, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(original.dataobj))
    assert np.ptp(np.asarray(nib.load(str(out / "original_probability.nii.gz")).dataobj)) > 1e-3


# --------------------------------------------------------------------------- what else real folders hold, one batch


def _localizer_folder(folder: Path) -> Path:
    """The series with study and series UIDs, a two-image localizer series, SEG, SC, RTSTRUCT and DICOMDIR files."""

    def uids(_i: int, ds) -> None:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID

    _copy_series(folder, uids)
    for k, cosines in enumerate(([1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1])):  # frontal and lateral scout
        ds = pydicom.dcmread(_series()[0])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SCOUT_UID
        ds.SeriesDescription, ds.SeriesNumber = "Topogram", 1
        ds.SOPInstanceUID = f"{SCOUT_UID}.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = cosines
        ds.ImagePositionPatient = [-250.0, 0.0, -500.0]
        ds.save_as(folder / f"scout_{k + 1}.dcm")
    for name, target in (("liver_1frame.dcm", "seg.dcm"), ("SC_rgb_rle.dcm", "dose_report.dcm"),
                         ("rtstruct.dcm", "rtstruct.dcm"), ("DICOMDIR", "DICOMDIR")):
        shutil.copy(_testdata(name), folder / target)
    return folder


def _truncate(folder: Path, keep: int | None = None) -> Path:
    """The series with slice ``BAD_SLICE`` cut to ``keep`` bytes (default: half of it)."""
    folder.mkdir(parents=True)
    for i, path in enumerate(_series()):
        data = path.read_bytes()
        (folder / path.name).write_bytes(data[: keep or len(data) // 2] if i == BAD_SLICE else data)
    return folder


def _replace_by_junk(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, path in enumerate(_series()):
        if i == BAD_SLICE:
            (folder / path.name).write_bytes(np.random.default_rng(0).bytes(5000))
        else:
            shutil.copy(path, folder / path.name)
    return folder


def _with_extras(folder: Path) -> Path:
    shutil.copytree(shared_data("real_ct", "dicom_series"), folder)
    (folder / "notes.txt").write_text("exported by the PACS\n")
    (folder / "IM_EMPTY").write_bytes(b"")
    return folder


def _two_instances_at_one_position(folder: Path) -> Path:
    shutil.copytree(shared_data("real_ct", "dicom_series"), folder)
    ds = pydicom.dcmread(_series()[BAD_SLICE])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.7004"
    ds.save_as(folder / "second_reconstruction.dcm")
    return folder


def _copied_instance(folder: Path) -> Path:
    shutil.copytree(shared_data("real_ct", "dicom_series"), folder)
    shutil.copy(_series()[BAD_SLICE], folder / "copy of slice 8.dcm")
    return folder


def _moved(dz: Callable[[int], float], dy: Callable[[int], float] = lambda _i: 0.0, tilt: float = 0.0):
    def edit(i: int, ds) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + dy(i), z + dz(i)]
        ds.GantryDetectorTilt = tilt

    return edit


def _no_position(i: int, ds) -> None:
    if i == BAD_SLICE:
        del ds.ImagePositionPatient


VARIANTS: dict[str, Callable[[Path], Path]] = {
    "good": lambda f: shutil.copytree(shared_data("real_ct", "dicom_series"), f),
    "localizer": _localizer_folder,
    "truncated": _truncate,
    "truncated_header": lambda f: _truncate(f, keep=1000),
    "not_dicom": _replace_by_junk,
    "extra_files": _with_extras,
    "same_position": _two_instances_at_one_position,
    "copied_instance": _copied_instance,
    "uneven": lambda f: _copy_series(f, _moved(lambda i: -1.0 if i >= 10 else 0.0)),  # 2 mm steps and one of 3 mm
    "slightly_uneven": lambda f: _copy_series(f, _moved(lambda i: 0.06 * (-1) ** i)),  # +-0.06 mm jitter
    "gantry_tilt": lambda f: _copy_series(f, _moved(lambda i: 0.0, lambda i: -2.0 * i * np.tan(np.radians(15)), 15)),
    "no_position": lambda f: _copy_series(f, _no_position),
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory, random_bundle) -> tuple[Path, dict[str, Path], dict[str, CaseResult]]:
    """Every variant folder in one batch run (default mode), with the untouched series as the good case."""
    root = tmp_path_factory.mktemp("variants")
    folders = {name: make(root / "in" / name) for name, make in VARIANTS.items()}
    results = _run(list(folders.values()), root / "out", random_bundle)
    return root / "out", folders, {r.case: r for r in results}


def _bad_slice_name() -> str:
    return _series()[BAD_SLICE].name


def _assert_series_geometry(out: Path, case: str, series: Path) -> None:
    mask = nib.load(str(out / f"{case}_infection.nii.gz"))
    expected, shape = itk_series_affine(series)
    assert mask.shape == shape == (512, 512, 20)
    np.testing.assert_allclose(mask.affine, expected, atol=1e-4)


def test_untouched_series_beside_the_variants_succeeds(variants):
    out, folders, results = variants
    assert results["good"].status == "ok", results["good"].error
    _assert_series_geometry(out, "good", folders["good"])


def test_localizer_is_skipped_and_other_objects_ignored(variants):
    """A scout series: ``skipped`` with the reason in warnings; SEG, SC, RTSTRUCT and DICOMDIR are ignored."""
    out, folders, results = variants
    ct, scout = results["localizer"], results["localizer_Topogram"]
    assert ct.status == "ok", ct.error
    assert ct.warnings == ""  # the ignored objects are normal companions, nothing to warn about
    _assert_series_geometry(out, "localizer", folders["good"])
    assert scout.status == "skipped" and scout.error == ""
    assert "localizer" in scout.warnings and "not a CT volume" in scout.warnings
    assert not (out / "localizer_Topogram_infection.nii.gz").exists()
    assert {r.case for r in results.values() if r.input == str(folders["localizer"])} == {ct.case, scout.case}
    listing = list_dicom_folder(folders["localizer"])
    assert sorted(Path(f).name for f, _what in listing.ignored) == ["DICOMDIR", "dose_report.dcm", "rtstruct.dcm",
                                                                     "seg.dcm"]
    assert not listing.unreadable


def test_dicom_facts_in_the_summary(variants):
    out, _folders, results = variants
    ct, scout = results["localizer"], results["localizer_Topogram"]
    assert (ct.study_uid, ct.series_uid, ct.series_description, ct.slice_thickness) == (
        STUDY_UID, SERIES_UID, "CT Body 3.0", 3.0)
    assert (scout.study_uid, scout.series_uid, scout.series_description) == (STUDY_UID, SCOUT_UID, "Topogram")
    good = results["good"]  # the shipped files have empty UIDs: empty columns, not invented ones
    assert (good.study_uid, good.series_uid, good.series_description, good.slice_thickness) == (
        "", "", "CT Body 3.0", 3.0)
    assert SUMMARY_FIELDS[SUMMARY_FIELDS.index("spacing") + 1:][:4] == (
        "study_uid", "series_uid", "series_description", "slice_thickness")
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("spacing") + 1:header.index("spacing") + 5] == [
        "study_uid", "series_uid", "series_description", "slice_thickness"]
    document = json.loads((out / "summary.json").read_text())
    assert document["counts"] == {"ok": sum(r.status == "ok" for r in results.values()), "skipped": 1,
                                  "failed": sum(r.status == "failed" for r in results.values())}
    row = next(r for r in document["cases"] if r["case"] == "localizer")
    assert row["study_uid"] == STUDY_UID and row["slice_thickness"] == 3.0
    assert not any("Patient" in key or "patient" in key for key in row)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("truncated", "truncated DICOM file: its compressed pixel data stop at byte"),
        ("truncated_header", "truncated DICOM file: it ends at byte 1,000, inside its header"),
        ("not_dicom", "(not a DICOM file)"),
    ],
)
def test_damaged_slice_is_named(variants, variant, message):
    """A truncated or non-DICOM file among the slices: the error names that file (not just 'missing slice')."""
    _out, _folders, results = variants
    result = results[variant]
    assert result.status == "failed"
    assert _bad_slice_name() in result.error and message in result.error, result.error
    assert "\n" not in result.error


def test_extra_unreadable_files_are_warned_about(variants):
    out, folders, results = variants
    result = results["extra_files"]
    assert result.status == "ok", result.error
    assert "ignored 2 unreadable file(s)" in result.warnings
    assert "notes.txt (not a DICOM file)" in result.warnings and "IM_EMPTY (empty file (0 bytes))" in result.warnings
    _assert_series_geometry(out, "extra_files", folders["good"])


def test_two_instances_at_one_position_is_an_error(variants):
    result = variants[2]["same_position"]
    assert result.status == "failed"
    assert "second_reconstruction.dcm: at the same position as " + _bad_slice_name() in result.error
    assert "two acquisitions mixed in one series" in result.error


def test_copy_of_an_instance_is_left_out(variants):
    out, folders, results = variants
    result = results["copied_instance"]
    assert result.status == "ok", result.error
    assert "copy of slice 8.dcm" in result.warnings and _bad_slice_name() in result.warnings
    _assert_series_geometry(out, "copied_instance", folders["good"])


def test_uneven_spacing_is_an_error(variants):
    result = variants[2]["uneven"]
    assert result.status == "failed"
    assert "uneven slice spacing (steps of 2.00 to 3.00 mm)" in result.error, result.error


def test_slightly_uneven_spacing_warns_and_keeps_itk_geometry(variants):
    out, folders, results = variants
    result = results["slightly_uneven"]
    assert result.status == "ok", result.error
    assert "slightly uneven slice spacing" in result.warnings
    mask = nib.load(str(out / "slightly_uneven_infection.nii.gz"))
    expected, shape = itk_series_affine(folders["slightly_uneven"])
    assert mask.shape == shape
    np.testing.assert_allclose(mask.affine, expected, atol=1e-4)


def test_gantry_tilt_is_an_error(variants):
    result = variants[2]["gantry_tilt"]
    assert result.status == "failed"
    assert "gantry tilt: the slices are stacked 15.0 degrees off their normal" in result.error, result.error


def test_missing_image_position_is_a_clean_error(variants):
    result = variants[2]["no_position"]
    assert result.status == "failed"
    assert result.error.endswith(f"{_bad_slice_name()}: no Image Position (Patient) (0020,0032), so the slice cannot "
                                 "be placed in the volume"), result.error


# ------------------------------------------------------------------------------ zip files, spaces, non-ASCII names


def _zip_series(path: Path, prefix: str = "export/CT 3mm/") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in _series():
            archive.write(file, prefix + file.name)
        archive.writestr(prefix + "README.TXT", "made by the tests\n")
        archive.writestr("__MACOSX/._" + _series()[0].name, b"\x00\x05\x16\x07")
    return path


@pytest.fixture(scope="module")
def named(tmp_path_factory, random_bundle) -> tuple[Path, Path, dict[str, CaseResult]]:
    """A zip file of the series, and the series and a NIfTI scan under paths with spaces and non-ASCII names."""
    root = tmp_path_factory.mktemp("named")
    inputs = root / "scans with spaces"
    _zip_series(inputs / "patient 1 série.zip")
    shutil.copytree(shared_data("real_ct", "dicom_series"), inputs / "Ünïcode dir" / "séries 2")
    _write_case(inputs / "Ünïcode dir", "poumon gauche é", "LPS", seed=6)
    before = sorted(p.relative_to(inputs) for p in inputs.rglob("*"))
    results = _run([inputs], root / "out", random_bundle)
    assert sorted(p.relative_to(inputs) for p in inputs.rglob("*")) == before  # nothing extracted or written there
    return inputs, root / "out", {r.case: r for r in results}


def test_zip_of_a_series_is_one_case_in_the_series_geometry(named):
    inputs, out, results = named
    result = results["patient_1_s_rie"]
    assert result.status == "ok", result.error
    assert result.input == str(inputs / "patient 1 série.zip")
    assert "README.TXT (not a DICOM file)" in result.warnings and "__MACOSX" not in result.warnings
    _assert_series_geometry(out, "patient_1_s_rie", shared_data("real_ct", "dicom_series"))
    assert result.series_description == "CT Body 3.0"


def test_paths_with_spaces_and_non_ascii_names(named):
    inputs, out, results = named
    assert {c: r.status for c, r in results.items()} == dict.fromkeys(
        ("patient_1_s_rie", "s_ries_2", "poumon_gauche"), "ok"), {c: r.error for c, r in results.items()}
    _assert_series_geometry(out, "s_ries_2", shared_data("real_ct", "dicom_series"))
    source = inputs / "Ünïcode dir" / "poumon gauche é.nii.gz"
    mask = nib.load(str(out / "poumon_gauche_infection.nii.gz"))
    np.testing.assert_allclose(mask.affine, nib.load(str(source)).affine, atol=1e-5)


def test_damaged_zip_members_are_named(tmp_path, random_bundle):
    """A truncated slice inside a zip file: the error names the member, not a temporary file."""
    path = tmp_path / "in" / "broken.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        for i, file in enumerate(_series()):
            data = file.read_bytes()
            archive.writestr("slices/" + file.name, data[: len(data) // 2] if i == BAD_SLICE else data)
    (tmp_path / "in" / "not_a.zip").write_bytes(b"PK\x03\x04 but nothing more")
    results = {r.case: r for r in _run([path, tmp_path / "in" / "not_a.zip"], tmp_path / "out", random_bundle)}
    assert results["broken"].status == "failed"
    assert results["broken"].error.startswith(f"{path}/slices/{_bad_slice_name()}: truncated DICOM file")
    assert "covid_monai_series_" not in results["broken"].error
    assert results["not_a"].status == "failed" and "not a readable zip file" in results["not_a"].error


def test_zip_extraction_cannot_leave_its_folder(tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("../../outside.dcm", "/etc/absolute.dcm", "a/../../up.dcm", "C:\\windows\\x.dcm"):
            archive.writestr(name, b"data")
    dest = tmp_path / "dest" / "inner"
    dest.mkdir(parents=True)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    written = extract_zip_members(path, names, dest)
    assert [p.parent for p in written] == [dest] * 4
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in written)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(["evil.zip", *(p.name for p in written)])
    with pytest.raises(ValueError, match="unpacks to .* more than the limit"):
        extract_zip_members(path, names, dest, max_bytes=10)


# ------------------------------------------------------------------------------------------------ the mixed folder


def test_mixed_folder_succeeds_every_time_with_exact_geometry(tmp_path, random_bundle):
    """Two phantoms, the real NIfTI CT and the real DICOM series in one folder, default mode, three runs."""
    scans = tmp_path / "scans"
    _write_case(scans, "phantom_a", "RAS", seed=3)
    _write_case(scans, "phantom_b", "LPS", seed=4)
    shutil.copy(shared_data("real_ct", "abdomen_ct_3mm.nii.gz"), scans / "abdomen.nii.gz")
    series = shutil.copytree(shared_data("real_ct", "dicom_series"), scans / "dicom_series")
    expected, shape = itk_series_affine(series)
    for run in range(3):
        out = tmp_path / f"out{run}"
        results = {r.case: r for r in _run([scans], out, random_bundle)}
        assert {c: r.status for c, r in results.items()} == dict.fromkeys(
            ("phantom_a", "phantom_b", "abdomen", "dicom_series"), "ok"), {c: r.error for c, r in results.items()}
        for case in ("phantom_a", "phantom_b", "abdomen"):
            source = nib.load(str(scans / f"{case}.nii.gz"))
            mask = nib.load(str(out / f"{case}_infection.nii.gz"))
            assert mask.shape == source.shape
            np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
            assert results[case].series_description == "" and results[case].slice_thickness is None
        mask = nib.load(str(out / "dicom_series_infection.nii.gz"))
        assert mask.shape == shape
        np.testing.assert_allclose(mask.affine, expected, atol=1e-4)
        np.testing.assert_allclose(mask.header.get_sform(), expected, atol=1e-4)
        assert results["dicom_series"].series_description == "CT Body 3.0"


def test_discovery_names_a_series_and_its_localizer(tmp_path):
    folder = _localizer_folder(tmp_path / "study")
    cases, decided = discover_cases([folder])
    assert [(c.name, len(c.files or [])) for c in cases] == [("study", 20)]
    assert [(r.case, r.status) for r in decided] == [("study_Topogram", "skipped")]
    assert os.path.samefile(cases[0].source, folder)


def test_twelve_bit_lossy_jpeg_is_refused_by_name(tmp_path):
    """ITK's GDCM cannot decode 12-bit JPEG Extended (it only prints so and returns wrong voxels): a clear error."""
    from covid_monai.preflight import check_scan

    folder = tmp_path / "jpeg12"
    folder.mkdir()
    ds = pydicom.dcmread(_testdata("JPGExtended.dcm"))  # 12-bit JPEG Extended, filed as a CT slice here
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ds.save_as(folder / "IM0001")
    (series,) = list_dicom_folder(folder).volumes
    with pytest.raises(ValueError, match=r"IM0001: 12-bit lossy JPEG \(JPEG Extended\), which ITK's DICOM reader"):
        check_scan(folder, "dicom", series.files)
