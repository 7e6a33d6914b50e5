"""The bad-input matrix: each bad scan fails alone with one clear line (or passes with a warning); the batch goes on.

Every row runs through the real batch runner next to a good scan, so "the batch goes on" is checked each time.
"""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from covid_monai.cli import main
from covid_monai.inference import run_batch
from covid_monai.phantom import make_phantom
from tests.conftest import shared_data


def _phantom_image(shape=(48, 48, 12), spacing=None, seed=4) -> tuple[np.ndarray, np.ndarray]:
    phantom = make_phantom(shape=shape, seed=seed, spacing=spacing)
    return phantom.image, phantom.affine


def _nifti_bytes(array, affine) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, affine).to_bytes())


def _write_bad(kind: str, folder: Path) -> Path:
    image, affine = _phantom_image()
    path = folder / f"{kind}.nii.gz"
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = _nifti_bytes(image, affine)
        path.write_bytes(data[: len(data) // 3])
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(1).bytes(20_000))
    elif kind == "png_renamed":
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(buffer, format="PNG")
        path = folder / "png_renamed.nii"
        path.write_bytes(buffer.getvalue())
    elif kind == "image_2d":
        nib.save(nib.Nifti1Image(image[:, :, 5], affine), path)
    elif kind == "four_volumes":
        nib.save(nib.Nifti1Image(np.stack([image] * 3, axis=-1), affine), path)
    elif kind in ("nan", "inf"):
        bad = image.astype(np.float32)
        bad[10:12, 10:12, 3] = np.nan if kind == "nan" else np.inf
        nib.save(nib.Nifti1Image(bad, affine), path)
    elif kind == "constant":
        nib.save(nib.Nifti1Image(np.full(image.shape, -1000, np.int16), affine), path)
    elif kind == "singular_affine":
        singular = affine.copy()
        singular[:3, 2] = 0.0
        img = nib.Nifti1Image(image, None)
        img.set_sform(singular, code=1)  # a qform cannot even hold a singular matrix
        img.set_qform(None, code=0)
        nib.save(img, path)
    elif kind == "huge":
        header = nib.Nifti1Header()
        header.set_data_shape((1024, 1024, 1000))
        header.set_data_dtype(np.int16)
        path = folder / "huge.nii"
        with open(path, "wb") as f:  # a sparse 2 GB file: the right size, next to no disk
            f.write(header.binaryblock + b"\x00" * 4)
            f.seek(352 + 1024 * 1024 * 1000 * 2 - 1)
            f.write(b"\x00")
    elif kind == "dicom_no_images":
        path = folder / "dicom_no_images"
        path.mkdir()
        (path / "README.txt").write_text("not a DICOM file")
        (path / "IM0001").write_bytes(b"\x00" * 300)
    elif kind == "dicom_missing_slice":
        path = folder / "dicom_missing_slice"
        files = sorted(shared_data("real_ct", "dicom_series").iterdir())
        path.mkdir()
        for i, f in enumerate(files):
            if i != 9:
                shutil.copy(f, path / f.name)
    return path


FAILS = {
    "zero_bytes": "empty file",
    "truncated": "",
    "random_bytes": "not a readable NIfTI",
    "png_renamed": "not a readable NIfTI",
    "image_2d": "not a 3D volume",
    "four_volumes": "3 volumes in one file",
    "nan": "NaN or infinite",
    "inf": "NaN or infinite",
    "constant": "same value",
    "singular_affine": "singular",
    "huge": "exceeds the limit",
    "dicom_no_images": "no NIfTI file or DICOM series",
    "dicom_missing_slice": "missing slice",
}


@pytest.mark.parametrize("kind", sorted(FAILS))
def test_bad_scan_fails_alone_with_one_clear_line(tmp_path, random_bundle, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = _write_bad(kind, folder)
    good_image, good_affine = _phantom_image(seed=9)
    nib.save(nib.Nifti1Image(good_image, good_affine), tmp_path / "good.nii.gz")
    results = {r.input: r for r in run_batch([bad, tmp_path / "good.nii.gz"], tmp_path / "out", random_bundle,
                                             device="cpu", workers=0, progress=False)}
    failed = results[str(bad)]
    assert failed.status == "failed"
    assert FAILS[kind] in failed.error and failed.error and "\n" not in failed.error
    assert results[str(tmp_path / "good.nii.gz")].status == "ok"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(bad.name.split(".")[0] + "_")]


def _geometry_ok(result_dir: Path, source: Path) -> None:
    mask = nib.load(str(result_dir / source.name.replace(".nii.gz", "_infection.nii.gz")))
    reference = nib.load(str(source))
    assert mask.shape == reference.shape[:3]
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "warning"),
    [
        ("one_slice", ""),
        ("two_slices", ""),
        ("ten_mm_slices", ""),
        ("four_d_single_volume", ""),
        ("sheared", "sheared"),
        ("no_qform_sform", "no qform or sform"),
        ("contradictory_forms", "qform and sform disagree"),
        ("eight_bit", "Hounsfield"),
    ],
)
def test_unusual_but_valid_scans_are_segmented(tmp_path, random_bundle, kind, warning):
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / f"{kind}.nii.gz"
    shape = {"one_slice": (48, 48, 1), "two_slices": (48, 48, 2)}.get(kind, (48, 48, 12))
    spacing = (7.0, 7.0, 10.0) if kind == "ten_mm_slices" else None
    image, affine = _phantom_image(shape=(48, 48, 12) if shape[2] < 4 else shape, spacing=spacing)
    image = image[:, :, 5 : 5 + shape[2]] if shape[2] < 4 else image
    if kind == "four_d_single_volume":
        nib.save(nib.Nifti1Image(image[..., None], affine), path)
    elif kind == "sheared":
        sheared = affine.copy()
        sheared[0, 1] += 0.6 * affine[1, 1]
        nib.save(nib.Nifti1Image(image, sheared), path)
    elif kind == "no_qform_sform":
        img = nib.Nifti1Image(image, affine)
        img.set_qform(None, code=0)
        img.set_sform(None, code=0)
        nib.save(img, path)
    elif kind == "contradictory_forms":
        img = nib.Nifti1Image(image, affine)
        moved = affine.copy()
        moved[:3, 3] += 25.0
        img.set_qform(moved, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, path)
    elif kind == "eight_bit":
        nib.save(nib.Nifti1Image(np.clip((image + 1250) / 1500 * 255, 0, 255).astype(np.uint8), affine), path)
    else:
        nib.save(nib.Nifti1Image(image, affine), path)
    [result] = run_batch([path], tmp_path / "out", random_bundle, device="cpu", workers=0, progress=False)
    assert result.status == "ok", result.error
    assert warning in result.warnings
    if not warning:
        assert result.warnings == ""
    _geometry_ok(tmp_path / "out", path)


def test_traceback_only_with_debug(tmp_path, random_bundle, capsys):
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
    args = ["infer", str(tmp_path / "bad.nii.gz"), "-o", str(tmp_path / "out"), "--bundle", str(random_bundle),
            "--device", "cpu", "--quiet"]
    assert main(args) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert main([*args, "--overwrite", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
