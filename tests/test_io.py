"""Atomic writes and checkpoint handlers: a failure never leaves a partial file under the final name."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from covid_monai.handlers import LatestCheckpointSaver, ResumeCheckpointLoader, atomic_torch_save
from covid_monai.io import atomic_path, atomic_write_text, nifti_stem, save_nifti_like


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
