"""Convert 2D CT slices (jpg/png/bmp/tif) and their masks to single-slice NIfTI volumes, so 2D slice sets run
through the same 3D pipeline as whole scans.

Axis convention: a W x H picture becomes a volume of shape ``(W, H, 1)``: voxel ``(i, j, 0)`` is the pixel at
column ``i``, row ``j`` (``volume[:, :, 0] == picture.T``), for images and masks alike. The affine is
``diag(-sx, -sy, sz)`` (``--spacing sx sy sz``, default 1 1 1; origin 0): columns run toward the patient's left and
rows toward the back, as in a DICOM axial slice shown the radiological way (patient's right on the viewer's left,
front at the top). So a viewer such as 3D Slicer shows the slice as the picture shows it, and after
``Orientationd("RAS")`` a slice lies like an axial slice of a real scan.

- Images: grayscale is kept (8-bit as uint8, 16-bit as is); RGB/RGBA/palette pictures are converted to grayscale
  (ITU-R 601 luma).
- Masks: paired with images by file stem (``12.jpg`` <-> ``12.png``); grayscale, then binarised: values > 127 become 1
  (0/255 masks); a mask whose values are all 0 or 1 is kept as is. A mask must have its image's size.
  With ``--labels multiclass`` mask values are class indices and kept (palette indices for palette pictures):
  0 background, 1 ground glass, 2 consolidation; any other value is an error naming the file.
- Images without a mask are converted and listed (a warning line and the datalist's ``test`` list); masks without an
  image are reported.
- ``OUT/datalist.json``: ``training`` = every image with a mask (``{"image", "label"}``, paths relative to OUT),
  ``validation`` = [] (``covid-monai train`` holds out a fifth), ``test`` = images without a mask (``{"image"}``).
- Outputs are written atomically; existing ones are skipped unless ``--overwrite``; OUT may not lie in an input folder.

Example:
    python scripts/convert_slices.py --images ../shared/data/covid_semiseg/train/images \\
        --masks ../shared/data/covid_semiseg/train/masks --out data/semiseg_nifti
    covid-monai train --data data/semiseg_nifti/datalist.json --out my_bundle
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a file: make the `scripts` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covid_monai.io import check_output_folder, save_nifti_like  # noqa: E402
from scripts.datasets import (  # noqa: E402
    DatasetError,
    atomic_write_json,
    setup_logging,
)

log = logging.getLogger("covid_monai.scripts")

PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def natural_key(path: Path) -> list[Any]:
    """Sort key of a file by the numbers in its stem by value (``slice_2`` before ``slice_10``), case-insensitive."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.stem)]


def list_pictures(folder: str | Path) -> dict[str, Path]:
    """``{stem: file}`` for the pictures in a folder (not recursive), in natural order (``2`` before ``10``).

    Raises:
        DatasetError: the folder is missing, or two files share a stem (``1.jpg`` and ``1.png``).

    Example:
        >>> list(list_pictures("../shared/data/covid_semiseg/train/images"))[:3]
        ['0', '1', '2']
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=natural_key):
        if path.suffix.lower() not in PICTURE_SUFFIXES or path.name.startswith(".") or not path.is_file():
            continue
        if path.stem in found:
            raise DatasetError(f"{path}: same name as {found[path.stem].name}; cannot pair by file stem")
        found[path.stem] = path
    return found


def read_gray(path: str | Path) -> np.ndarray:
    """A picture as a 2D grayscale array ``(rows, columns)``; colour pictures are converted to luma.

    Raises:
        DatasetError: unreadable file, naming it.

    Example:
        >>> read_gray("../shared/data/covid_semiseg/train/images/0.jpg").shape
        (369, 273)
    """
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                picture = picture.convert("L")
            array = np.asarray(picture)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot be read as an image ({exc})") from exc
    if array.ndim != 2:
        raise DatasetError(f"{path}: expected a 2D picture, got shape {array.shape}")
    return array


def binarise(mask: np.ndarray) -> np.ndarray:
    """0/1 uint8 labels from a mask picture: > 127 -> 1, or kept when every value is already 0 or 1.

    Example:
        >>> binarise(np.array([[0, 255], [128, 127]])).tolist()
        [[0, 1], [1, 0]]
        >>> binarise(np.array([[0, 1]])).tolist()
        [[0, 1]]
    """
    if mask.size and mask.max() <= 1 and mask.min() >= 0:
        return mask.astype(np.uint8)
    return (mask > 127).astype(np.uint8)


def read_class_labels(path: str | Path, classes: int = 2) -> np.ndarray:
    """A label picture whose values are class indices (0 background, 1..``classes``), as a uint8 array.

    Palette pictures give their palette indices (the COVID-SemiSeg multi-class masks are palette PNGs: 0 background,
    1 ground glass, 2 consolidation), grayscale pictures their values; no colour is converted to luma.

    Raises:
        DatasetError: unreadable file, not 2D, or a value outside ``0..classes``, naming the file.

    Example:
        >>> read_class_labels("../shared/data/covid_semiseg/train/masks_multiclass/0.png").max()
        2
    """
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                raise DatasetError(f"{path}: a {picture.mode} picture, expected class indices (palette or grayscale)")
            array = np.asarray(picture)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot be read as an image ({exc})") from exc
    if array.ndim != 2:
        raise DatasetError(f"{path}: expected a 2D picture, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > classes):
        raise DatasetError(f"{path}: values {sorted(np.unique(array).tolist())[:8]} outside the classes 0..{classes}")
    return array.astype(np.uint8)


def slice_affine(spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The affine of a converted slice: ``diag(-sx, -sy, sz, 1)`` (see the module docstring).

    Example:
        >>> slice_affine((0.7, 0.7, 5.0)).diagonal().tolist()
        [-0.7, -0.7, 5.0, 1.0]
    """
    sx, sy, sz = (float(s) for s in spacing)
    return np.diag([-sx, -sy, sz, 1.0])


def to_volume(picture: np.ndarray) -> np.ndarray:
    """``(rows, columns)`` picture -> ``(columns, rows, 1)`` volume: voxel ``(i, j, 0)`` = pixel at column i, row j."""
    return np.ascontiguousarray(picture.T[:, :, None])


def convert(
    images: str | Path,
    out: str | Path,
    masks: str | Path | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    overwrite: bool = False,
    labels: str = "binary",
) -> dict[str, Any]:
    """Convert a folder of slice pictures (and masks) to NIfTI volumes plus ``datalist.json``.

    Args:
        images: folder of pictures.
        out: output folder (``images/``, ``labels/``, ``datalist.json``).
        masks: folder of mask pictures named like the images (any picture suffix), or ``None``.
        spacing: pixel spacing x, y and slice thickness, mm.
        overwrite: redo existing outputs.
        labels: ``binary`` (masks binarised, see :func:`binarise`) or ``multiclass`` (class indices kept: 0
            background, 1 ground glass, 2 consolidation; see :func:`read_class_labels`).

    Returns:
        ``{"pairs": [...], "unlabelled": [...], "orphan_masks": [...], "failed": {name: reason}}``.

    Raises:
        DatasetError: a missing input folder, duplicate stems, an output folder inside an input folder.

    Example:
        >>> convert("slices/images", "slices_nifti", masks="slices/masks", spacing=(0.7, 0.7, 5.0))["pairs"][:2]
        ['0', '1']
    """
    out = Path(out)
    if any(s <= 0 for s in spacing):
        raise DatasetError(f"--spacing {' '.join(map(str, spacing))}: spacings must be positive")
    if labels not in ("binary", "multiclass"):
        raise DatasetError(f"labels {labels!r}: expected 'binary' or 'multiclass'")
    inputs = [p for p in (images, masks) if p is not None]
    check_output_folder(out, inputs, error=DatasetError, hint="choose another output folder")
    pictures = list_pictures(images)
    mask_files = list_pictures(masks) if masks is not None else {}
    if not pictures:
        raise DatasetError(f"{images}: no pictures ({', '.join(PICTURE_SUFFIXES)})")
    affine = slice_affine(spacing)
    pairs: list[str] = []
    unlabelled: list[str] = []
    failed: dict[str, str] = {}
    for name, path in pictures.items():
        image_out = out / "images" / f"{name}.nii.gz"
        label_out = out / "labels" / f"{name}.nii.gz"
        mask_path = mask_files.get(name)
        todo = [image_out] + ([label_out] if mask_path else [])
        if not overwrite and all(p.is_file() for p in todo):
            (pairs if mask_path else unlabelled).append(name)
            continue
        try:
            picture = read_gray(path)
            if mask_path is None:
                mask = None
            elif labels == "multiclass":
                mask = read_class_labels(mask_path)
            else:
                mask = binarise(read_gray(mask_path))
            if mask is not None and mask.shape != picture.shape:
                raise DatasetError(
                    f"{mask_path}: {mask.shape[1]}x{mask.shape[0]} pixels, its image {path.name} is "
                    f"{picture.shape[1]}x{picture.shape[0]}"
                )
        except DatasetError as exc:
            failed[name] = str(exc)
            log.error("%s", exc)
            continue
        volume = to_volume(picture)
        save_nifti_like(volume, image_out, affine, dtype=volume.dtype)
        if mask is not None:
            save_nifti_like(to_volume(mask), label_out, affine, dtype=mask.dtype)
            pairs.append(name)
        else:
            unlabelled.append(name)
    orphans = sorted(set(mask_files) - set(pictures), key=lambda s: natural_key(Path(s)))
    if masks is not None and unlabelled:
        log.warning("%d image(s) without a mask in %s: %s", len(unlabelled), masks, ", ".join(unlabelled))
    for name in orphans:
        log.warning("%s: mask without an image in %s", mask_files[name], images)
    datalist = {
        "training": [{"image": f"images/{n}.nii.gz", "label": f"labels/{n}.nii.gz"} for n in pairs],
        "validation": [],
        "test": [{"image": f"images/{n}.nii.gz"} for n in unlabelled],
    }
    atomic_write_json(out / "datalist.json", datalist)
    log.info(
        "%s: %d image/mask pairs, %d images without a mask, %d failed", out, len(pairs), len(unlabelled), len(failed)
    )
    return {"pairs": pairs, "unlabelled": unlabelled, "orphan_masks": orphans, "failed": failed}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns 0 when every picture was converted, 1 otherwise (2 for usage errors)."""
    parser = argparse.ArgumentParser(
        description="Convert 2D slice pictures (and masks) to single-slice NIfTI volumes and a datalist.",
        epilog="Volumes have shape (W, H, 1), voxel (i, j, 0) = pixel at column i, row j; affine diag(-sx, -sy, sz).",
    )
    parser.add_argument("--images", required=True, type=Path, help="folder of pictures (jpg, png, bmp, tif)")
    parser.add_argument("--masks", type=Path, help="folder of masks named like the images (0/255 or 0/1)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--spacing", nargs=3, type=float, default=[1.0, 1.0, 1.0], metavar=("X", "Y", "Z"), help="mm (default 1 1 1)"
    )
    parser.add_argument("--overwrite", action="store_true", help="redo existing outputs")
    parser.add_argument("--labels", choices=("binary", "multiclass"), default="binary",
                        help="binary: masks binarised (0/255 or 0/1); multiclass: class indices kept (palette or grey "
                             "values 0 background, 1 ground glass, 2 consolidation)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        result = convert(args.images, args.out, args.masks, args.spacing, args.overwrite, args.labels)
    except DatasetError as exc:
        log.error("%s", exc)
        return 1
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
