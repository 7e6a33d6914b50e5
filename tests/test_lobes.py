"""Lobe masks: found per case (lungmask's label file or TotalSegmentator's five files), checked for the scan's grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from covid_monai.lobes import TOTALSEGMENTATOR_LOBES, find_lobe_files, read_lobes

SHAPE = (6, 5, 4)
AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1.0]])  # LPS storage


def _labels() -> np.ndarray:
    return (np.arange(np.prod(SHAPE)) % 6).reshape(SHAPE).astype(np.uint8)


def _save(array, path, affine=AFFINE, dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), affine), str(path))


def test_finds_label_file_then_suffixed_then_totalsegmentator_folder(tmp_path):
    assert find_lobe_files(tmp_path, "c1") is None
    for name in TOTALSEGMENTATOR_LOBES:
        _save(np.zeros(SHAPE), tmp_path / "c1" / f"{name}.nii.gz")
    assert sorted(find_lobe_files(tmp_path, "c1")) == [1, 2, 3, 4, 5]
    _save(_labels(), tmp_path / "c1_lobes.nii.gz")
    assert find_lobe_files(tmp_path, "c1") == tmp_path / "c1_lobes.nii.gz"
    _save(_labels(), tmp_path / "c1.nii")
    assert find_lobe_files(tmp_path, "c1") == tmp_path / "c1.nii"
    (tmp_path / "c2").mkdir()
    _save(np.zeros(SHAPE), tmp_path / "c2" / "lung_upper_lobe_left.nii.gz")
    with pytest.raises(FileNotFoundError, match="lung_middle_lobe_right"):
        find_lobe_files(tmp_path, "c2")
    lobes, notes = read_lobes(tmp_path, "c2", SHAPE, AFFINE)
    assert lobes is None and "missing" in notes[0]


def test_label_file_read_on_the_scans_grid_even_in_another_storage_order(tmp_path):
    labels = _labels()
    _save(labels, tmp_path / "a.nii.gz")
    lobes, notes = read_lobes(tmp_path, "a", SHAPE, AFFINE)
    assert notes == [] and lobes.dtype == np.uint8 and np.array_equal(lobes, labels)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(labels, AFFINE))  # RAS storage: flipped x and y
    assert not np.array_equal(np.asarray(canonical.dataobj), labels)
    nib.save(canonical, str(tmp_path / "b.nii.gz"))
    lobes, notes = read_lobes(tmp_path, "b", SHAPE, AFFINE)
    assert notes == [] and np.array_equal(lobes, labels)
    _save(labels, tmp_path / "f.nii.gz", dtype=np.float32)  # integral floats are fine
    assert np.array_equal(read_lobes(tmp_path, "f", SHAPE, AFFINE)[0], labels)


def test_totalsegmentator_files_become_lungmask_labels(tmp_path):
    labels = _labels()
    for name, label in TOTALSEGMENTATOR_LOBES.items():
        _save(labels == label, tmp_path / "case" / f"{name}.nii.gz")
    lobes, notes = read_lobes(tmp_path, "case", SHAPE, AFFINE)
    assert notes == [] and np.array_equal(lobes, labels)
    assert TOTALSEGMENTATOR_LOBES == {"lung_upper_lobe_left": 1, "lung_lower_lobe_left": 2, "lung_upper_lobe_right": 3,
                                      "lung_middle_lobe_right": 4, "lung_lower_lobe_right": 5}


@pytest.mark.parametrize(
    ("array", "affine", "message"),
    [
        (np.zeros((6, 5, 3)), AFFINE, "not the scan's"),
        (np.zeros(SHAPE), AFFINE + np.diag([0, 0, 0.1, 0]), "not the scan's"),  # 2.6 mm slices instead of 2.5
        (np.zeros(SHAPE), AFFINE + np.pad(np.full((3, 1), 0.5), ((0, 1), (3, 0))), "not the scan's"),  # shifted
        (np.full(SHAPE, 7), AFFINE, "0-5"),
        (np.full(SHAPE, 1.5), AFFINE, "non-integer"),
    ],
)
def test_other_grids_or_bad_labels_give_a_warning_not_a_failure(tmp_path, array, affine, message):
    _save(array, tmp_path / "x.nii.gz", affine, dtype=np.float32)
    lobes, notes = read_lobes(tmp_path, "x", SHAPE, AFFINE)
    assert lobes is None and len(notes) == 1 and message in notes[0] and "lobe mask not used" in notes[0]


def test_missing_or_unreadable_mask(tmp_path):
    lobes, notes = read_lobes(tmp_path, "nothing", SHAPE, AFFINE)
    assert lobes is None and "no lobe mask for nothing" in notes[0]
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti file")
    lobes, notes = read_lobes(tmp_path, "bad", SHAPE, AFFINE)
    assert lobes is None and "lobe mask not used" in notes[0]
