"""Pre-flight checks of a scan from its header alone, before any voxel is read.

What can be told from a NIfTI header or the DICOM slice headers is checked here, cheaply and in bounded memory:
empty or unreadable files, not-3D images, 4D series, volumes too large to process, singular, sheared or
contradictory geometry, DICOM series with missing slices. What needs the voxels (NaN, constant volumes, non-HU
intensities) is checked by :class:`covid_monai.transforms.ValidateCTd` in the bundle's pre-processing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["DEFAULT_MAX_VOXELS", "check_dicom_series", "check_nifti", "check_scan"]

DEFAULT_MAX_VOXELS = 400_000_000
"""Largest scan processed by default (e.g. 512×512×1500); 1024×1024×1000 is refused up front. Resampling and the
float32 copies of the pipeline take about 10 bytes per voxel at the peak."""

_GAP_FACTOR = 1.5
"""A step between neighbouring DICOM slices larger than this times the usual step is a missing slice."""


def check_scan(
    source: str | os.PathLike, kind: str, files: Sequence[str] | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
) -> list[str]:
    """Check one scan before loading it.

    Args:
        source: the NIfTI file or the DICOM folder.
        kind: ``"nifti"`` or ``"dicom"``.
        files: the DICOM files of the series (``None``: the folder's only series).
        max_voxels: largest volume accepted.

    Returns:
        Warnings (the scan can be processed, but the user should know).

    Raises:
        ValueError: naming the file and what is wrong when the scan cannot be processed.

    Example:
        >>> check_scan("scans/case_1.nii.gz", "nifti")
        []
    """
    if kind == "nifti":
        return check_nifti(source, max_voxels)
    if files is None:
        from covid_monai.io import list_dicom_series

        series = list_dicom_series(source)
        if not series:
            raise ValueError(f"{source}: no DICOM images in the folder")
        files = series[0][1]
    return check_dicom_series(source, files, max_voxels)


def check_nifti(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> list[str]:
    """Header checks of a NIfTI file: readable, 3D (or 4D with one volume), not too large, usable geometry.

    Args:
        path: the file.
        max_voxels: largest volume accepted.

    Returns:
        Warnings: sheared affine, missing or contradictory qform/sform.

    Raises:
        ValueError: empty or unreadable file, wrong dimensionality, too many voxels, singular affine.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        image = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise ValueError(f"{path}: not a readable NIfTI file ({' '.join(str(exc).split())[:160]})") from exc
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path}: not a NIfTI image (read as {type(image).__name__})")
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 3 or sum(s > 1 for s in shape[:3]) < 2:
        raise ValueError(f"{path}: not a 3D volume (shape {shape})")
    if len(shape) > 3 and math.prod(shape[3:]) > 1:
        raise ValueError(f"{path}: {math.prod(shape[3:])} volumes in one file (shape {shape}); give one 3D volume")
    voxels = math.prod(shape[:3])
    if voxels > max_voxels:
        raise ValueError(
            f"{path}: {'x'.join(map(str, shape[:3]))} = {voxels:,} voxels exceeds the limit of {max_voxels:,} "
            f"(about {voxels * 4 / 2**30:.1f} GiB per float32 copy)"
        )
    header = image.header
    warnings = []
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    if qform_code == 0 and sform_code == 0:
        warnings.append("no qform or sform in the header: position and orientation unknown, voxel sizes only")
    elif qform_code > 0 and sform_code > 0:
        qform, sform = header.get_qform(), header.get_sform()
        if not np.allclose(qform, sform, atol=1e-3):
            warnings.append(
                f"qform and sform disagree (by up to {np.abs(qform - sform).max():.3g} mm); the sform is used, "
                "as nibabel and 3D Slicer do"
            )
    affine = image.affine
    linear = affine[:3, :3]
    if not np.isfinite(affine).all() or abs(np.linalg.det(linear)) < 1e-9:
        raise ValueError(f"{path}: singular or non-finite affine, the voxel geometry is undefined")
    columns = linear / np.linalg.norm(linear, axis=0)
    if not np.allclose(columns.T @ columns, np.eye(3), atol=1e-4):
        warnings.append("sheared (non-orthogonal) voxel axes; resampled to a regular grid for the network")
    return warnings


def check_dicom_series(
    folder: str | os.PathLike, files: Sequence[str], max_voxels: int = DEFAULT_MAX_VOXELS
) -> list[str]:
    """Header checks of a DICOM series: enough slices, consistent size, no missing slice, not too large.

    Slice positions are projected on the slice normal (from Image Orientation Patient); a step more than 1.5 times
    the median step is a missing slice.

    Args:
        folder: the series folder (for messages).
        files: the series' files.
        max_voxels: largest volume accepted.

    Returns:
        Warnings (none at present; kept for symmetry with :func:`check_nifti`).

    Raises:
        ValueError: naming the folder and the problem (a gap, mixed slice sizes, too many voxels).
    """
    import itk

    positions, sizes = [], set()
    normal = None
    for name in files:
        io = itk.GDCMImageIO.New()
        io.SetFileName(str(name))
        io.ReadImageInformation()
        tags = io.GetMetaDataDictionary()
        sizes.add((int(io.GetDimensions(0)), int(io.GetDimensions(1))))
        if not tags.HasKey("0020|0032"):
            continue
        position = np.array([float(v) for v in str(tags["0020|0032"]).split("\\")[:3]])
        if normal is None and tags.HasKey("0020|0037"):
            cosines = np.array([float(v) for v in str(tags["0020|0037"]).split("\\")[:6]])
            normal = np.cross(cosines[:3], cosines[3:])
        positions.append(position)
    if len(sizes) > 1:
        raise ValueError(f"{folder}: slices of different sizes {sorted(sizes)} in one series")
    rows, cols = next(iter(sizes))
    voxels = rows * cols * len(files)
    if voxels > max_voxels:
        size = f"{rows}x{cols}x{len(files)}"
        raise ValueError(f"{folder}: {size} = {voxels:,} voxels exceeds the limit of {max_voxels:,}")
    if len(positions) >= 3 and normal is not None:
        along = np.sort(np.array(positions) @ normal)
        steps = np.diff(along)
        usual = float(np.median(steps))
        if usual <= 1e-6:
            raise ValueError(f"{folder}: several slices share one position; not a single 3D series")
        gaps = np.nonzero(steps > _GAP_FACTOR * usual)[0]
        if gaps.size:
            i = int(gaps[0])
            missing = int(round(steps[i] / usual)) - 1
            raise ValueError(
                f"{folder}: missing slice(s): gap of {steps[i]:.2f} mm between slice positions {along[i]:.2f} and "
                f"{along[i + 1]:.2f} where slices are {usual:.2f} mm apart (about {missing} slice(s) missing)"
            )
    return []
