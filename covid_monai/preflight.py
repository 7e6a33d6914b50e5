"""Pre-flight checks of a scan from its header alone, before any voxel is read.

What can be told from a NIfTI header or the DICOM slice headers is checked here, cheaply and in bounded memory:
empty or unreadable files, not-3D images, 4D series, volumes too large to process, singular, sheared or
contradictory geometry; for DICOM series: truncated files, missing slices, two slices at one position, uneven
spacing, gantry tilt, slices without a position. What needs the voxels (NaN, constant volumes, non-HU
intensities) is checked by :class:`covid_monai.transforms.ValidateCTd` in the bundle's pre-processing.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import nibabel as nib
import numpy as np

__all__ = ["DEFAULT_MAX_VOXELS", "check_dicom_series", "check_nifti", "check_scan"]

DEFAULT_MAX_VOXELS = 400_000_000
"""Largest scan processed by default (e.g. 512×512×1500); 1024×1024×1000 is refused up front. Resampling and the
float32 copies of the pipeline take about 10 bytes per voxel at the peak."""

_GAP_FACTOR = 1.5
"""A step between neighbouring DICOM slices larger than this times the usual step is a missing slice."""

_SAME_POSITION_MM = 0.01
"""Two DICOM slices closer than this along the slice normal are at the same position."""

_UNEVEN_WARN, _UNEVEN_FAIL = 0.01, 0.2
"""A slice farther than these fractions of a step from the even grid of its volume: a warning, an error."""

_TILT_PIXELS = 0.5
"""Slices shifted across the slice normal by more than this many pixels: gantry tilt (sheared grid), an error."""


def check_scan(
    source: str | os.PathLike,
    kind: str,
    files: Sequence[str] | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    unreadable: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """Check one scan before loading it.

    Args:
        source: the NIfTI file or the DICOM folder.
        kind: ``"nifti"`` or ``"dicom"``.
        files: the DICOM files of the series (found by :func:`covid_monai.io.list_dicom_folder`).
        max_voxels: largest volume accepted.
        unreadable: ``(file, reason)`` of unreadable files beside a DICOM series (named if slices are missing).

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
    if not files:
        raise ValueError(f"{source}: no DICOM files given for the series")
    return check_dicom_series(source, files, max_voxels, unreadable)


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
    folder: str | os.PathLike,
    files: Sequence[str],
    max_voxels: int = DEFAULT_MAX_VOXELS,
    unreadable: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """Header checks of a DICOM series: every file complete, one size, placeable slices on an even grid.

    Each file's header is read with pydicom (no pixel decoding) and its pixel data are checked to be all there
    (native data of the right length; compressed fragments up to their end marker). Slice positions are projected on
    the slice normal (from Image Orientation Patient); a step more than 1.5 times the median step is a missing slice;
    two slices at one position are an error; the slices must lie on the even grid ITK builds from the first and last
    slice (within 20 % of a step; over 1 % is a warning) and along the normal (no gantry tilt, within half a pixel).

    Args:
        folder: the series folder (for messages).
        files: the series' files.
        max_voxels: largest volume accepted.
        unreadable: ``(file, reason)`` of files in the folder that are not readable DICOM (named when slices are
            missing, as they may be the missing ones).

    Returns:
        Warnings: slightly uneven slice spacing.

    Raises:
        ValueError: naming the file or the folder and the problem (truncated file, a gap, two slices at one
            position, uneven spacing, gantry tilt, no slice position, mixed slice sizes, too many voxels).
    """
    slices = [_slice_header(Path(name)) for name in files]
    sizes = {(s.rows, s.columns) for s in slices}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: slices of different sizes {sorted(sizes)} in one series")
    rows, cols = next(iter(sizes))
    depth = sum(s.frames for s in slices)
    voxels = rows * cols * depth
    if voxels > max_voxels:
        raise ValueError(f"{folder}: {rows}x{cols}x{depth} = {voxels:,} voxels exceeds the limit of {max_voxels:,}")
    if len(slices) == 1 and slices[0].frames > 1:  # one multi-frame file: its geometry is per frame, read by ITK
        return []
    return _check_slice_grid(folder, list(files), slices, unreadable)


class _Slice(NamedTuple):
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: float
    rows: int
    columns: int
    frames: int
    tilt: str


_SLICE_TAGS = [
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "SamplesPerPixel", "NumberOfFrames", "GantryDetectorTilt",
]

_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
"""JPEG Extended (Process 2 and 4), lossy: with more than 8 bits stored, ITK's GDCM cannot decode it (and says so
only on the console, returning wrong voxels)."""


def _numbers(ds: Any, keyword: str, count: int) -> np.ndarray | None:
    """A multi-valued decimal header field as floats, ``None`` when absent or malformed."""
    value = ds.get(keyword)
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        return None
    return numbers if numbers is not None and numbers.size == count and np.isfinite(numbers).all() else None


def _slice_header(path: Path) -> _Slice:
    """What the checks need from one file's header; raises naming the file when it is damaged or truncated."""
    import pydicom

    from covid_monai.io import quiet_pydicom

    try:
        size = path.stat().st_size
        with open(path, "rb") as fp, quiet_pydicom():
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_SLICE_TAGS, force=True)
            problem = _pixel_data_problem(fp, size, ds)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise ValueError(f"{path}: not a readable DICOM file ({' '.join(str(exc).split())[:120]})") from exc
    if problem:
        raise ValueError(f"{path}: {problem}")
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if syntax == _JPEG_EXTENDED and int(ds.get("BitsStored") or 8) > 8:
        raise ValueError(
            f"{path}: 12-bit lossy JPEG (JPEG Extended), which ITK's DICOM reader cannot decode; convert the series "
            "to another transfer syntax first (e.g. dcmdjpeg or gdcmconv --raw)"
        )
    spacing = _numbers(ds, "PixelSpacing", 2)
    return _Slice(
        position=_numbers(ds, "ImagePositionPatient", 3),
        orientation=_numbers(ds, "ImageOrientationPatient", 6),
        pixel_spacing=float(spacing.min()) if spacing is not None and spacing.min() > 0 else 1.0,
        rows=int(ds.get("Rows") or 0),
        columns=int(ds.get("Columns") or 0),
        frames=max(1, int(ds.get("NumberOfFrames") or 1)),
        tilt=str(ds.get("GantryDetectorTilt") or "").strip(),
    )


def _pixel_data_problem(fp: BinaryIO, size: int, ds: Any) -> str:
    """Why the pixel data element at the file position (where pydicom stopped) is not complete; '' when it is."""
    if fp.tell() > size:
        return f"truncated DICOM file: it ends at byte {size:,}, inside its header"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99":
        return ""  # deflated: pydicom inflated the data set into memory; ITK checks it while reading
    implicit, little = ds.original_encoding
    endian = ">" if little is False else "<"
    start = fp.tell()
    head = fp.read(8)
    if len(head) < 8:
        return f"truncated DICOM file: it ends at byte {size:,}, before its pixel data"
    group, _element = struct.unpack(endian + "HH", head[:4])
    if group != 0x7FE0:
        return "no pixel data"
    offset = start + 8
    if implicit:
        (length,) = struct.unpack(endian + "L", head[4:8])
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        (length,) = struct.unpack(endian + "L", fp.read(4))
        offset += 4
    else:
        (length,) = struct.unpack(endian + "H", head[6:8])
    if length != 0xFFFFFFFF:
        bits = int(ds.get("BitsAllocated") or 0)
        values = int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * int(ds.get("SamplesPerPixel") or 1)
        expected = (values * max(1, int(ds.get("NumberOfFrames") or 1)) * bits + 7) // 8
        if offset + length > size:
            return f"truncated DICOM file: its pixel data end after {size - offset:,} of {length:,} bytes"
        if length < expected:
            return f"pixel data of {length:,} bytes, short of the {expected:,} bytes its header describes"
        return ""
    position = offset  # encapsulated (compressed): items (FFFE,E000) of stated length, then (FFFE,E0DD)
    while True:
        fp.seek(position)
        item = fp.read(8)
        if len(item) < 8:
            return f"truncated DICOM file: its compressed pixel data stop at byte {size:,}, before their end"
        tag_group, tag_element, length = struct.unpack("<HHL", item)
        if (tag_group, tag_element) == (0xFFFE, 0xE0DD):
            return ""
        if (tag_group, tag_element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            return f"damaged compressed pixel data (no fragment at byte {position:,})"
        position += 8 + length
        if position > size:
            return f"truncated DICOM file: its compressed pixel data stop at byte {size:,}, before their end"


def _check_slice_grid(
    folder: str | os.PathLike, files: list[str], slices: list[_Slice], unreadable: Sequence[tuple[str, str]]
) -> list[str]:
    """Positions and orientations of single-frame slices: placeable, one per position, no gap, even, no tilt."""
    for name, s in zip(files, slices, strict=True):
        for value, tag in ((s.position, "Image Position (Patient) (0020,0032)"),
                           (s.orientation, "Image Orientation (Patient) (0020,0037)")):
            if value is None:
                raise ValueError(f"{name}: no {tag}, so the slice cannot be placed in the volume")
        if not np.allclose(s.orientation, slices[0].orientation, atol=1e-3):
            raise ValueError(f"{name}: its Image Orientation (Patient) differs from that of {Path(files[0]).name}")
    if len(slices) < 2:
        return []
    cosines = slices[0].orientation
    normal = np.cross(cosines[:3], cosines[3:])
    normal /= np.linalg.norm(normal)
    positions = np.array([s.position for s in slices])
    order = np.argsort(positions @ normal, kind="stable")
    positions, names = positions[order], [files[i] for i in order]
    along = positions @ normal
    steps = np.diff(along)
    same = np.nonzero(steps < _SAME_POSITION_MM)[0]
    if same.size:
        i = int(same[0])
        raise ValueError(
            f"{names[i + 1]}: at the same position as {Path(names[i]).name} ({along[i]:.2f} mm along the slice "
            f"normal; {same.size} such pair(s) in {folder}): two acquisitions mixed in one series, keep one"
        )
    usual = float(np.median(steps))
    gaps = np.nonzero(steps > _GAP_FACTOR * usual)[0]
    if gaps.size:
        i = int(gaps[0])
        missing = int(round(steps[i] / usual)) - 1
        suspects = ", ".join(f"{Path(n).name} ({why})" for n, why in unreadable[:3])
        suspects = f"; unreadable file(s) in the folder: {suspects}" if suspects else ""
        raise ValueError(
            f"{folder}: missing slice(s): gap of {steps[i]:.2f} mm between slice positions {along[i]:.2f} and "
            f"{along[i + 1]:.2f} where slices are {usual:.2f} mm apart (about {missing} slice(s) missing){suspects}"
        )
    return _check_even_grid(folder, positions, normal, slices[0])


def _check_even_grid(folder: str | os.PathLike, positions: np.ndarray, normal: np.ndarray, first: _Slice) -> list[str]:
    """Compare sorted slice positions with the grid ITK reads them onto: first slice, even steps to the last."""
    span = positions[-1] - positions[0]
    step = float(np.linalg.norm(span)) / (len(positions) - 1)
    grid = positions[0] + np.arange(len(positions))[:, None] * step * normal
    offsets = positions - grid
    along = offsets @ normal
    across = float(np.linalg.norm(offsets - along[:, None] * normal, axis=1).max())
    if across > _TILT_PIXELS * first.pixel_spacing:
        angle = float(np.degrees(np.arccos(np.clip(abs(span @ normal) / np.linalg.norm(span), 0.0, 1.0))))
        tag = f", Gantry/Detector Tilt {first.tilt}" if first.tilt not in ("", "0", "0.0") else ""
        raise ValueError(
            f"{folder}: gantry tilt: the slices are stacked {angle:.1f} degrees off their normal{tag}, up to "
            f"{across:.1f} mm off a regular volume; resample the series onto a regular grid first (not supported)"
        )
    worst = float(np.abs(along).max())
    steps = np.diff(positions @ normal)
    spread = f"steps of {steps.min():.2f} to {steps.max():.2f} mm"
    if worst > _UNEVEN_FAIL * step:
        raise ValueError(
            f"{folder}: uneven slice spacing ({spread}): on an even {step:.2f} mm grid a slice would lie "
            f"{worst:.2f} mm ({worst / step:.0%} of a step) from its position; split or resample the series"
        )
    if worst > _UNEVEN_WARN * step:
        return [
            f"slightly uneven slice spacing ({spread}): the mask is on an even {step:.3f} mm grid, each slice within "
            f"{worst:.2f} mm ({worst / step:.0%} of a step) of its position"
        ]
    return []
