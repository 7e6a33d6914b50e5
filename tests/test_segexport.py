"""3D Slicer .seg.nrrd and DICOM-SEG writers: headers, geometry and codes read back with pynrrd, pydicom, highdicom."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest

from covid_monai.segexport import BINARY_SEGMENTS, MULTICLASS_SEGMENTS, write_dicom_seg, write_seg_nrrd
from tests.conftest import shared_data

HU_THRESHOLD = 0.0  # test masks: the series' voxels above 0 HU


def _oblique_affine() -> np.ndarray:
    c, s = math.cos(0.3), math.sin(0.3)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([0.7, -0.8, 2.5])
    affine = np.eye(4)
    affine[:3, :3] = rotation[:, [1, 0, 2]]  # permuted and flipped storage too
    affine[:3, 3] = [-120.5, 33.0, -410.0]
    return affine


def test_seg_nrrd_header_geometry_and_voxels(tmp_path):
    mask = np.zeros((9, 7, 5), np.uint8)
    mask[2:5, 1:4, 3] = 1
    mask[8, 6, 4] = 1
    affine = _oblique_affine()
    path = tmp_path / "case_infection.seg.nrrd"
    write_seg_nrrd(mask, affine, path)
    data, header = nrrd.read(str(path))
    assert np.array_equal(data, mask) and data.dtype == np.uint8
    assert header["space"] == "left-posterior-superior" and header["encoding"] == "gzip"
    assert header["kinds"] == ["domain"] * 3
    # voxel (i, j, k) -> LPS world: origin + sum(index * direction_i); the same point as the RAS affine
    ijk = np.array([3, 5, 2])
    lps = header["space origin"] + ijk @ header["space directions"]
    ras = affine[:3, :3] @ ijk + affine[:3, 3]
    assert np.allclose(lps * [-1, -1, 1], ras)
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segment0_ID"] == header["Segment0_Name"] == "infection"
    assert header["Segment0_LabelValue"] == "1" and header["Segment0_Layer"] == "0"
    assert header["Segment0_Extent"] == "2 8 1 6 3 4"
    assert [round(float(c) * 255) for c in header["Segment0_Color"].split()] == list(BINARY_SEGMENTS[0].color)
    assert "SCT^47351003^Infiltrate~SCT^840539006^COVID-19" in header["Segment0_Tags"]
    assert "Segment1_ID" not in header
    # the raw header as Slicer reads it: custom fields with ':='
    text = path.read_bytes().split(b"\n\n", 1)[0].decode("ascii")
    assert "Segment0_Name:=infection" in text and "space: left-posterior-superior" in text


def test_seg_nrrd_multiclass_segments_and_an_empty_one(tmp_path):
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[1, 1, 1] = 1
    write_seg_nrrd(mask, np.eye(4), tmp_path / "m.seg.nrrd", MULTICLASS_SEGMENTS)
    _, header = nrrd.read(str(tmp_path / "m.seg.nrrd"))
    assert (header["Segment0_Name"], header["Segment0_LabelValue"]) == ("ground_glass", "1")
    assert (header["Segment1_Name"], header["Segment1_LabelValue"]) == ("consolidation", "2")
    assert header["Segment0_Extent"] == "1 1 1 1 1 1" and header["Segment1_Extent"] == "0 -1 0 -1 0 -1"
    assert "SCT^9656002^Consolidation" in header["Segment1_Tags"]
    assert header["Segment0_Layer"] == header["Segment1_Layer"] == "0"


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """The real DICOM series with the study, series and SOP identity its anonymisation emptied filled back in."""
    from pydicom.uid import generate_uid

    source = shared_data("real_ct", "dicom_series")
    out = tmp_path_factory.mktemp("series_with_ids")
    study, series_uid = generate_uid(entropy_srcs=["study"]), generate_uid(entropy_srcs=["series"])
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(out / path.name)
    return out


def _load(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The series as the pipeline reads it (covid_monai.io.LoadScand, channel first): voxels and RAS affine."""
    from monai.transforms import Compose, EnsureChannelFirstd

    from covid_monai.io import LoadScand

    load = Compose([LoadScand(keys="image", image_only=False), EnsureChannelFirstd(keys="image")])
    data = load({"image": str(folder)})
    return np.asarray(data["image"][0]), np.asarray(data["image"].affine, dtype=np.float64)


def _source_hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_dicom_seg_references_the_series_and_matches_the_source_pixels(tmp_path, series):
    import highdicom as hd

    volume, affine = _load(series)
    mask = (volume > HU_THRESHOLD).astype(np.uint8)
    files = sorted(series.iterdir())
    path = tmp_path / "case_infection.seg.dcm"
    write_dicom_seg(mask, affine, [str(f) for f in files], path, algorithm=("covid-monai", "9.9.9"),
                    parameters={"bundle": "demo"})
    seg = hd.seg.segread(str(path))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(
        sources)
    # every frame against the source slice's own pixels, read without the pipeline
    frames = seg.get_pixels_by_source_instance(list(sources), segment_numbers=[1])
    for source, frame in zip(sources.values(), frames, strict=True):
        assert np.array_equal(frame[..., 0] > 0, _source_hu(source) > HU_THRESHOLD), source.name
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "infection" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == ("SCT", "47351003", "Infiltrate")
    assert kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "840539006"  # COVID-19
    assert segment.AnatomicRegionSequence[0].CodeValue == "39607008"  # lung
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("covid-monai", "9.9.9")
    assert "demo" in algorithm.AlgorithmParameters
    assert seg.SoftwareVersions == "9.9.9" and seg.Manufacturer == "covid-monai"


def test_dicom_seg_multiclass_and_storage_independent(tmp_path, series):
    import highdicom as hd

    volume, affine = _load(series)
    mask = np.where(volume > 100, 2, np.where(volume > HU_THRESHOLD, 1, 0)).astype(np.uint8)
    files = [str(f) for f in sorted(series.iterdir())]
    # the same mask stored reversed along every axis (and its affine to match): the same frames come out
    flipped = nib.orientations.inv_ornt_aff(np.array([[0, -1], [1, -1], [2, -1.0]]), mask.shape)
    write_dicom_seg(mask[::-1, ::-1, ::-1], affine @ flipped, files[::-1], tmp_path / "m.seg.dcm", MULTICLASS_SEGMENTS)
    seg = hd.seg.segread(str(tmp_path / "m.seg.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["ground_glass", "consolidation"]
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == ["1217294009", "9656002"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    frames = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], combine_segments=True)
    for source, frame in zip(files, frames, strict=True):
        hu = _source_hu(Path(source))
        assert np.array_equal(frame, np.where(hu > 100, 2, np.where(hu > HU_THRESHOLD, 1, 0)))


def test_dicom_seg_refuses_what_it_cannot_reference_or_place(tmp_path, series):
    volume, affine = _load(series)
    mask = (volume > HU_THRESHOLD).astype(np.uint8)
    anonymised = sorted(shared_data("real_ct", "dicom_series").iterdir())
    with pytest.raises(ValueError, match="StudyInstanceUID, SeriesInstanceUID"):
        write_dicom_seg(mask, affine, anonymised, tmp_path / "a.seg.dcm")
    files = sorted(series.iterdir())
    with pytest.raises(ValueError, match="not a slice of the mask's voxel grid"):  # shifted by half a voxel
        write_dicom_seg(mask, affine + np.pad([[0.5]] * 3, ((0, 1), (3, 0))), files, tmp_path / "b.seg.dcm")
    with pytest.raises(ValueError, match="outside the mask's voxel grid"):
        write_dicom_seg(mask[:, :, :10], affine, files, tmp_path / "c.seg.dcm")
    with pytest.raises(ValueError, match="no segment description"):
        write_dicom_seg(mask * 3, affine, files, tmp_path / "d.seg.dcm")
    assert not any(tmp_path.iterdir())  # nothing left behind, not even temporary files


def test_batch_writes_both_for_dicom_and_warns_for_nifti(tmp_path, random_bundle, series):
    from covid_monai.inference import run_batch

    nifti = shared_data("real_ct", "abdomen_ct_3mm.nii.gz")
    results = run_batch([series, nifti], tmp_path / "out", random_bundle, device="cpu", workers=1, progress=False,
                        save_seg_nrrd=True, save_dicom_seg=True)
    rows = {r.case: r for r in results}
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    out = tmp_path / "out"
    dicom_case, nifti_case = series.name, "abdomen_ct_3mm"
    assert (out / f"{dicom_case}_infection.seg.dcm").is_file()
    assert not (out / f"{nifti_case}_infection.seg.dcm").exists()
    assert "no DICOM-SEG: the input is not a DICOM series" in rows[nifti_case].warnings
    for case in (dicom_case, nifti_case):  # the .seg.nrrd holds the written mask, on its grid
        written = nib.load(str(out / f"{case}_infection.nii.gz"))
        data, header = nrrd.read(str(out / f"{case}_infection.seg.nrrd"))
        assert np.array_equal(data, np.asarray(written.dataobj))
        lps = np.diag([-1.0, -1.0, 1.0]) @ written.affine[:3, :3]
        assert np.allclose(header["space directions"], lps.T, atol=1e-4)
    seg = pydicom.dcmread(out / f"{dicom_case}_infection.seg.dcm")
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "covid-monai"
    # a re-run skips both; an anonymised series gets a warning (once) instead of a DICOM-SEG
    again = run_batch([series, nifti], out, random_bundle, device="cpu", progress=False, save_seg_nrrd=True,
                      save_dicom_seg=True)
    assert [r.status for r in again] == ["skipped", "skipped"]
    anonymised = run_batch([shared_data("real_ct", "dicom_series")], tmp_path / "anon", random_bundle, device="cpu",
                           progress=False, save_dicom_seg=True)
    assert anonymised[0].status == "ok" and "no DICOM-SEG:" in anonymised[0].warnings
    again = run_batch([shared_data("real_ct", "dicom_series")], tmp_path / "anon", random_bundle, device="cpu",
                      progress=False, save_dicom_seg=True)
    assert again[0].status == "skipped"
