"""Lobe masks made by lungmask or TotalSegmentator: found per case, read, checked against the scan's geometry.

A case's lobes are one label file in lungmask's labels (:data:`~covid_monai.quantify.LOBE_LABELS`: 1 left upper,
2 left lower, 3 right upper, 4 right middle, 5 right lower), ``DIR/<case>.nii.gz`` or ``DIR/<case>_lobes.nii.gz``,
or TotalSegmentator's five binary files ``DIR/<case>/lung_*_lobe_*.nii.gz``. A mask stored in another axis order or
direction than the scan is reordered when its voxel grid is the scan's; any other grid is refused with a reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from covid_monai.io import NIFTI_SUFFIXES
from covid_monai.quantify import LOBE_LABELS

__all__ = ["TOTALSEGMENTATOR_LOBES", "find_lobe_files", "read_lobes"]

TOTALSEGMENTATOR_LOBES = {
    "lung_upper_lobe_left": LOBE_LABELS["lul"],
    "lung_lower_lobe_left": LOBE_LABELS["lll"],
    "lung_upper_lobe_right": LOBE_LABELS["rul"],
    "lung_middle_lobe_right": LOBE_LABELS["rml"],
    "lung_lower_lobe_right": LOBE_LABELS["rll"],
}
"""TotalSegmentator's lobe file names (without ``.nii.gz``) and the lungmask label each becomes."""

GRID_TOLERANCE_MM = 0.01
"""Largest difference (mm) between the lobe mask's affine and the scan's for the two grids to count as one."""


def _nifti(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def find_lobe_files(lobes_dir: str | os.PathLike, case: str) -> dict[int, Path] | Path | None:
    """The lobe mask of ``case`` in ``lobes_dir``.

    Args:
        lobes_dir: the folder given with ``--lobes``.
        case: the case name (the output stem).

    Returns:
        The label file (``<case>.nii.gz``, else ``<case>_lobes.nii.gz``), else ``{label: file}`` for
        TotalSegmentator's five files in ``<case>/`` (all five must be there), else ``None``.

    Raises:
        FileNotFoundError: ``<case>/`` holds some of TotalSegmentator's lobe files but not all five.

    Example:
        >>> find_lobe_files("lobes/", "case_01")  # lobes/case_01.nii.gz, or lobes/case_01/lung_*_lobe_*.nii.gz
    """
    folder = Path(lobes_dir)
    for stem in (case, f"{case}_lobes"):
        found = _nifti(folder, stem)
        if found is not None:
            return found
    files = {label: _nifti(folder / case, name) for name, label in TOTALSEGMENTATOR_LOBES.items()}
    present = {label: path for label, path in files.items() if path is not None}
    if not present:
        return None
    if len(present) < len(files):
        missing = [name for name, label in TOTALSEGMENTATOR_LOBES.items() if label not in present]
        raise FileNotFoundError(f"{folder / case}: TotalSegmentator lobe files missing: {', '.join(missing)}")
    return present


def _on_grid(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The voxels of a mask file on the scan's grid (reordered if only its storage order differs)."""
    image = nib.load(str(path))
    if len(image.shape) < 3 or any(int(s) != 1 for s in image.shape[3:]):
        raise ValueError(f"{path}: a lobe mask must be 3D, got shape {image.shape}")
    transform = ornt_transform(io_orientation(image.affine), io_orientation(affine))
    moved = inv_ornt_aff(transform, image.shape[:3])
    reordered = tuple(int(image.shape[int(axis)]) for axis in transform[:, 0].argsort())
    new_affine = image.affine @ moved
    if reordered != tuple(shape) or not np.allclose(new_affine, affine, rtol=0.0, atol=GRID_TOLERANCE_MM):
        raise ValueError(
            f"{path}: lobe mask grid (shape {tuple(image.shape[:3])}, affine origin "
            f"{np.round(image.affine[:3, 3], 2).tolist()}) is not the scan's (shape {tuple(shape)}, origin "
            f"{np.round(np.asarray(affine)[:3, 3], 2).tolist()})"
        )
    data = np.asanyarray(image.dataobj)
    data = data.reshape(data.shape[:3])
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise ValueError(f"{path}: lobe mask holds non-integer values")
    return apply_orientation(data, transform)


def read_lobes(
    lobes_dir: str | os.PathLike, case: str, shape: tuple[int, ...], affine: np.ndarray
) -> tuple[np.ndarray | None, list[str]]:
    """The lobe labels of ``case`` on the scan's grid, or ``None`` and why.

    Args:
        lobes_dir: the folder given with ``--lobes``.
        case: the case name.
        shape: the scan's (and its masks') shape.
        affine: the scan's voxel-to-world affine (RAS, mm).

    Returns:
        ``(labels, notes)``: uint8 labels (:data:`~covid_monai.quantify.LOBE_LABELS`) or ``None`` when there is no
        usable mask, and one line per problem for the summary's warnings (no mask, another grid, bad labels).

    Example:
        >>> lobes, notes = read_lobes("lobes/", "case_01", mask.shape, affine)
    """
    try:
        found = find_lobe_files(lobes_dir, case)
        if found is None:
            return None, [f"no lobe mask for {case} in {lobes_dir}: no lobe columns"]
        if isinstance(found, Path):
            data = _on_grid(found, shape, affine)
            if data.size and (data.min() < 0 or data.max() > max(LOBE_LABELS.values())):
                raise ValueError(f"{found}: lobe labels must be 0-5 (lungmask's), found {data.min()}..{data.max()}")
            labels = np.ascontiguousarray(data, dtype=np.uint8)
        else:
            labels = np.zeros(shape, dtype=np.uint8)
            for label, path in found.items():
                labels[_on_grid(path, shape, affine) > 0] = label
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        return None, [f"lobe mask not used: {exc}"]
    return labels, []
