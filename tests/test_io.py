"""Atomic writes and checkpoint handlers: a failure never leaves a partial file under the final name."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from covid_monai.handlers import LatestCheckpointSaver, ResumeCheckpointLoader, atomic_torch_save
from covid_monai.io import atomic_path, atomic_write_text, check_output_folder, nifti_stem, save_nifti_like


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "summary.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_atomic_files_get_normal_permissions(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o044 == 0o044  # group/other may read, as with open()


def test_save_nifti_like_without_reference_sets_both_forms(tmp_path):
    affine = np.array([[-0.8, 0, 0, 100], [0, -0.8, 0, 120], [0, 0, 2.5, -300], [0, 0, 0, 1]])
    save_nifti_like(np.ones((4, 5, 6)), tmp_path / "m.nii.gz", affine)
    image = nib.load(str(tmp_path / "m.nii.gz"))
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.get_qform(), affine)
    np.testing.assert_allclose(image.get_sform(), affine)
    assert nifti_stem(tmp_path / "m.nii.gz") == "m" and nifti_stem("x.NII") == "x"


def test_save_nifti_like_reference_file_image_or_header_give_the_same_file(tmp_path):
    """A reference as a file name, a loaded image or its header: the same header, qform and sform codes kept."""
    affine = np.array([[0, 0, -2.5, 10], [0.7, 0, 0, -5], [0, -0.7, 0, 3], [0, 0, 0, 1.0]])
    source = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), affine)
    source.set_qform(affine, code=1)
    source.set_sform(affine, code=2)
    source.header["cal_max"] = 1500
    nib.save(source, str(tmp_path / "scan.nii.gz"))
    loaded = nib.load(str(tmp_path / "scan.nii.gz"))
    mask = np.arange(120).reshape(6, 5, 4) % 3
    written = []
    for name, reference in (("file", tmp_path / "scan.nii.gz"), ("image", loaded), ("header", loaded.header)):
        save_nifti_like(mask, tmp_path / f"{name}.nii.gz", reference=reference)
        written.append(nib.load(str(tmp_path / f"{name}.nii.gz")))
    for image in written:
        assert image.header.binaryblock == written[0].header.binaryblock
        assert (int(image.header["qform_code"]), int(image.header["sform_code"])) == (1, 2)
        assert image.get_data_dtype() == np.uint8 and float(image.header["cal_max"]) == 0.0
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), mask)
    with pytest.raises(ValueError, match="does not match the input"):
        save_nifti_like(mask[:, :, :2], tmp_path / "bad.nii.gz", reference=loaded)
    with pytest.raises(ValueError, match="no reference and no affine"):
        save_nifti_like(mask, tmp_path / "bad.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.nii.gz", "header.nii.gz", "image.nii.gz", "scan.nii.gz"]


def test_check_output_folder_refuses_an_input_folder(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes(b"")
    for out, inputs in ((scans, [scans]), (scans / "masks", [scans]), (scans, [scans / "a.nii.gz"])):
        with pytest.raises(ValueError, match="inside the input folder .*; choose another or pass --force"):
            check_output_folder(out, inputs)
        check_output_folder(out, inputs, force=True)
    check_output_folder(scans / "masks", [scans / "a.nii.gz"])  # beside a file is not in an input folder
    check_output_folder(tmp_path / "elsewhere", [scans])

    class Refused(RuntimeError):
        pass

    with pytest.raises(Refused, match="choose another output folder$"):
        check_output_folder(scans / "x", [scans], error=Refused, hint="choose another output folder")


def _engine(max_epochs: int) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = max_epochs
    return engine


def test_latest_checkpoint_saver_writes_full_state_each_epoch(tmp_path):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = _engine(3)
    LatestCheckpointSaver(tmp_path / "latest.pt", {"model": net, "optimizer": opt}).attach(engine)
    engine.run([0, 1], max_epochs=3)
    saved = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert set(saved) == {"model", "optimizer", "trainer"} and saved["trainer"]["iteration"] == 3 * 2


def test_resume_loader_errors_name_the_file(tmp_path):
    net = torch.nn.Linear(2, 1)
    with pytest.raises(FileNotFoundError, match="missing.pt: cannot resume"):
        ResumeCheckpointLoader(tmp_path / "missing.pt", {"model": net}).attach(_engine(2))
    atomic_torch_save({"model": net.state_dict()}, tmp_path / "no_trainer.pt")
    with pytest.raises(ValueError, match="lacks trainer"):
        ResumeCheckpointLoader(tmp_path / "no_trainer.pt", {"model": net}).attach(_engine(2))


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="unreadable or unsafe"):
        ResumeCheckpointLoader(tmp_path / "evil.pt", {"model": torch.nn.Linear(2, 1)}).attach(_engine(2))


def test_load_scan_matches_load_imaged(tmp_path):
    """LoadScand gives LoadImaged's values, dtype, affine and meta data, C-ordered, for scaled and 4D NIfTI."""
    from monai.transforms import LoadImaged

    from covid_monai.io import LoadScand, c_order_float32

    rng = np.random.default_rng(0)
    affine = np.diag([-0.7, -0.7, 2.0, 1.0])
    scaled = nib.Nifti1Image(rng.integers(-1024, 2000, (33, 20, 37)).astype(np.int16), affine)
    scaled.header.set_slope_inter(0.5, -10.0)
    for name, image in (("scaled", scaled), ("4d", nib.Nifti1Image(rng.random((8, 9, 40, 1)), affine))):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(image, str(path))
        ours = LoadScand("image", image_only=False)({"image": str(path)})["image"]
        monai = LoadImaged("image", image_only=False)({"image": str(path)})["image"]
        assert ours.dtype == monai.dtype == torch.float32 and ours.is_contiguous()
        torch.testing.assert_close(ours.as_tensor(), monai.as_tensor())
        torch.testing.assert_close(ours.affine, monai.affine)
        assert set(ours.meta) == set(monai.meta)
    fortran = np.asfortranarray(rng.random((5, 6, 40)))
    np.testing.assert_array_equal(c_order_float32(fortran), fortran.astype(np.float32))
    assert c_order_float32(fortran).flags.c_contiguous


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_streamed_read_equals_nibabel(tmp_path, suffix):
    """Streaming the voxels slab by slab gives nibabel's scaled values for big- and little-endian, 3D and 4D files
    (chunk sizes that do and do not divide the slices); a truncated file is an error naming it."""
    from covid_monai.io import read_nifti_float32

    rng = np.random.default_rng(1)
    raw = rng.integers(-1024, 3000, (17, 11, 23)).astype(np.int16)
    cases = {
        "little_scaled": (raw, (0.25, -100.0)),
        "big_endian": (raw.astype(">i2"), (1.0, 0.0)),
        "float_4d": (rng.random((6, 7, 9, 1)).astype(np.float32), (1.0, 0.0)),
        "int16_5_slices_of_2d": (raw[:, :, :1], (2.0, 5.0)),
    }
    for name, (array, (slope, inter)) in cases.items():
        image = nib.Nifti1Image(array, np.diag([0.7, 0.7, 1.5, 1.0]))
        image.header.set_slope_inter(slope, inter)
        path = tmp_path / f"{name}{suffix}"
        nib.save(image, str(path))
        expected = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
        for chunk in (1, 4, 64):
            ours = read_nifti_float32(nib.load(str(path)), chunk=chunk)
            assert ours.dtype == np.float32 and ours.flags.c_contiguous and ours.shape == expected.shape
            np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    path = tmp_path / f"cut{suffix}"
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(path))
    data = path.read_bytes()
    if suffix == ".nii":
        path.write_bytes(data[: len(data) // 2])
    else:
        import gzip

        path.write_bytes(gzip.compress(gzip.decompress(data)[: 352 + raw.nbytes // 2]))
    with pytest.raises(OSError, match=f"cut{suffix}.*ends before"):
        read_nifti_float32(nib.load(str(path)))


def test_atomic_write_text_is_utf8_under_an_ascii_locale(tmp_path):
    """summary.csv holds input paths; a non-ASCII path under the C locale must not stop the batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "summary.csv"
    text = "'s\\u00e9rie \\u00fc\\n'"  # escaped: the command line itself stays ASCII
    code = f"from covid_monai.io import atomic_write_text; atomic_write_text({str(target)!r}, {text})"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], env=env,
        capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert target.read_bytes() == "série ü\n".encode()
