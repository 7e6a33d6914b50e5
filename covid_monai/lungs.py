"""The HU lung mask: a classical, model-free left/right lung mask of a CT in Hounsfield units.

:func:`lung_mask_from_hu` reads as the list of the method's steps; each step is one function below:

1. :func:`body_mask` -- the patient's body, on a coarse in-plane grid (its mid-sagittal plane, the inside test);
2. :func:`enclosed_air` -- air enclosed by tissue in its axial slice, labelled in 3D (the lung candidates);
3. :func:`find_lungs` -- the candidates that are big enough, aerated parenchyma rather than gas, inside the body;
4. :func:`body_midline`, :func:`split_joined_lungs`, :func:`assign_sides` -- lungs joined through the trachea are
   cut at the narrowest sagittal plane near the body's centre, and every piece gets the side its centroid lies on;
5. :func:`close_and_fill` -- each side's lung is closed with a ball and its holes filled, so that vessels and
   lesions inside the lung or in a dent of its border become lung.

Coordinates: affines map voxel indices to NIfTI RAS+ world millimetres (what nibabel returns and what MONAI stores
in ``MetaTensor.affine``, also for ITK-read DICOM): +x points to the patient's Right, +y Anterior, +z Superior.
The patient's LEFT lung therefore lies towards world -x. Every step works on the volume transposed to
(left-right, posterior-anterior, inferior-superior) axis order (:func:`world_axis_order`), the axial axis last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from monai.data.utils import affine_to_spacing
from monai.transforms.utils import get_largest_connected_component_mask
from nibabel.orientations import io_orientation
from scipy import ndimage

from covid_monai.distance import within_distance
from covid_monai.parallel import map_in_threads, map_slabs

__all__ = [
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "LungPiece",
    "assign_sides",
    "body_mask",
    "body_midline",
    "close_and_fill",
    "enclosed_air",
    "find_lungs",
    "lung_mask_from_hu",
    "split_joined_lungs",
    "world_axis_order",
]

LEFT_LUNG = 1
"""Label of the patient's left lung (as in the COVID-19-CT-Seg lung masks)."""
RIGHT_LUNG = 2
"""Label of the patient's right lung."""

# A connected air component that has at least this fraction of its voxels on each side of the body's
# mid-sagittal plane is taken to be both lungs joined (through the trachea / main bronchi or a thin junction line).
_JOINED_SIDE_FRACTION = 0.2
# The split plane of joined lungs is searched within this fraction of the body width around the body centre.
_SPLIT_SEARCH_FRACTION = 0.12
# A further lung-like air component smaller than this fraction of the largest lung is not taken as lung.
_MIN_SECOND_FRACTION = 0.1
# Voxel size (mm) of the coarse grid used for the morphological closing.
_COARSE_MM = 2.0
# In-plane voxel size (mm) of the grid on which the body outline is found (mid-sagittal plane, inside-body test).
_BODY_MM = 4.0
# Air enclosed in the body (voxels below ``lung_threshold``) is pure gas below _GAS_HU (bowel and stomach gas,
# trachea: about -1000 HU) and aerated lung parenchyma with its vessels and partial volume in
# _GAS_HU..._PARENCHYMA_MAX_HU; a lung has more voxels in the latter range than in the former.
_GAS_HU = -950.0
_PARENCHYMA_MAX_HU = -600.0
# A candidate that touches the first or last slice continues beyond the scan (e.g. lung bases at the top of an
# abdominal CT): it needs only this fraction of ``min_lung_ml``.
_CUT_MIN_FRACTION = 0.25

Box = tuple[slice, ...]
"""A bounding box: one slice per axis of the working volume."""


class LungPiece(NamedTuple):
    """A lung, or a piece of one: its bounding box in the working volume and its voxels inside that box."""

    box: Box
    mask: np.ndarray


def lung_mask_from_hu(
    image: np.ndarray,
    affine: np.ndarray,
    body_threshold: float = -500.0,
    lung_threshold: float = -320.0,
    min_lung_ml: float = 20.0,
    closing_mm: float = 15.0,
) -> np.ndarray:
    """Left/right lung mask of a CT in Hounsfield units, by thresholds and morphology (no model).

    Works on chest CT and on scans that contain only part of the lungs (e.g. the lung bases at the top of an
    abdominal CT); a scan without aerated lung gives an empty (or nearly empty) mask. The method, one function each:

    1. :func:`body_mask`: the largest body component above ``body_threshold``, holes filled;
    2. :func:`enclosed_air`: voxels below ``lung_threshold`` that are holes of the tissue in their axial slice (air
       outside the patient, the table and its pad are never candidates), as 6-connected 3D components;
    3. :func:`find_lungs`: the components of lung size (``min_lung_ml``; a quarter of it for one cut by the first or
       last slice) that are aerated parenchyma rather than gas and whose centroid lies inside the body;
    4. :func:`body_midline`, :func:`split_joined_lungs`, :func:`assign_sides`: joined lungs are split at the
       narrowest sagittal plane near the body centre; each piece is the left or the right lung by the side of the
       body's mid-sagittal plane its centroid lies on, in world space (the patient's left is world -x);
    5. :func:`close_and_fill`: each side's lung is closed with a ball of radius ``closing_mm`` and its holes are
       filled slice by slice, so vessels, ground glass and consolidation inside the lung or in a dent of its border
       become part of it; what a closing adds never takes voxels of the other lung.

    Any storage orientation works (the axial axis and the left-right axis are read from the affine with
    ``nibabel.orientations.io_orientation``), and so does a volume with few slices (a lung that reaches the first or
    last slice is taken to continue beyond it, so the closing does not erode it there).

    Limitations (it is a heuristic): the trachea and main bronchi stay part of the lungs where joined to them; the
    closing also fills concavities of the mediastinal surface (hilum) narrower than about ``2 * closing_mm``; a
    consolidation at the pleura is restored up to a rim of a few mm where it meets the chest wall (keep a margin, as
    :class:`~covid_monai.transforms.RestrictToLungsd` does) and only partly when it is wider than about
    ``2 * closing_mm``; a lung (or the part of a lung in the scan) with more voxels below -950 HU than in
    -950...-600 HU is taken for gas, and an enclosed gas/stool mixture of lung size with mostly -950...-600 HU voxels
    would be taken for lung.

    Args:
        image: 3D CT volume in HU, in storage order (the array as stored in the file).
        affine: 4x4 voxel-to-world (RAS+, mm) affine of ``image``.
        body_threshold: HU above which a voxel is body tissue (for the body outline of step 1).
        lung_threshold: HU below which a voxel enclosed by tissue is lung air.
        min_lung_ml: smallest air component (mL) that may be a lung (25 % of it for one cut by the first/last slice).
        closing_mm: radius (mm) of the closing that pulls lesions at the lung border into the mask; 0 disables it.

    Returns:
        uint8 array of ``image.shape``: 0 background, 1 (:data:`LEFT_LUNG`) the patient's left lung,
        2 (:data:`RIGHT_LUNG`) the right lung. All zeros when nothing lung-like is found.

    Example:
        >>> import nibabel as nib
        >>> img = nib.load("case.nii.gz")  # doctest: +SKIP
        >>> lungs = lung_mask_from_hu(img.get_fdata(), img.affine)  # doctest: +SKIP
        >>> nib.save(nib.Nifti1Image(lungs, img.affine), "case_lungs.nii.gz")  # doctest: +SKIP
    """
    image = np.asarray(image)
    affine = np.asarray(affine, dtype=np.float64)
    if image.ndim != 3:
        raise ValueError(f"lung_mask_from_hu expects a 3D volume, got shape {image.shape}.")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}.")
    out = np.zeros(image.shape, dtype=np.uint8)
    if image.size == 0:
        return out
    order = world_axis_order(affine)
    work = np.transpose(image, order)  # (lr, ap, si): axial axis last
    spacing = affine_to_spacing(affine, suppress_zeros=False)[order]

    body, steps = body_mask(work, spacing, body_threshold)
    if not body.any():
        return out
    labels, n = enclosed_air(work, lung_threshold)
    if n == 0:
        return out
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    min_voxels = max(min_lung_ml / voxel_ml if voxel_ml > 0 else 0.0, 1.0)
    lungs = find_lungs(work, labels, n, body, steps, min_voxels)
    del labels
    if not lungs:
        return out
    centre, width = body_midline(body, lungs, steps[0])
    lungs = split_joined_lungs(lungs, centre, width)
    # +1 when the left-right array index grows towards world +x (patient right), -1 when towards the patient's left
    x_sign = 1.0 if affine[0, order[0]] >= 0 else -1.0
    sides = assign_sides(lungs, centre, x_sign)
    close_and_fill(np.transpose(out, order), sides, spacing, closing_mm)  # a view: writes into ``out``
    return out


def world_axis_order(affine: np.ndarray) -> list[int]:
    """Axis permutation that brings an array into (left-right, posterior-anterior, inferior-superior) axis order.

    Every step works on this order, so that the axial (world-z) axis is the last one and the left-right axis the
    first, whatever the storage orientation. ``np.transpose(array, order)`` puts the array axis closest to world x
    first and the axial axis last; the directions along the axes are not changed (left/right is decided from the
    affine's sign in :func:`lung_mask_from_hu`).

    Args:
        affine: 4x4 voxel-to-world affine.

    Returns:
        The array axis along world x, y and z.

    Example:
        >>> world_axis_order(np.array([[0, 0, 2, 0], [1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]]))
        [2, 0, 1]
    """
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    return [int(np.flatnonzero(ornt[:, 0] == k)[0]) for k in range(3)]


def body_mask(work: np.ndarray, spacing: Sequence[float], body_threshold: float) -> tuple[np.ndarray, list[int]]:
    """Step 1, the body: the largest 6-connected component above ``body_threshold``, holes filled per axial slice.

    It gives the body's mid-sagittal plane (:func:`body_midline`) and the inside-the-body test of
    :func:`find_lungs`, neither of which needs the fine resolution, so it is found on a grid of about 4 mm in-plane
    (every ``steps``-th voxel, all slices). The largest component leaves the table and other objects out; filling
    its holes brings in the lungs and the other air inside the patient.

    Args:
        work: the CT in HU, (left-right, posterior-anterior, inferior-superior) axis order.
        spacing: voxel size (mm) along those axes.
        body_threshold: HU above which a voxel is body tissue.

    Returns:
        The coarse boolean body mask and the in-plane steps ``[step_lr, step_ap]`` of its grid.
    """
    steps = [max(1, int(round(_BODY_MM / s))) if s > 0 else 1 for s in spacing[:2]]
    tissue = work[:: steps[0], :: steps[1], :] > body_threshold
    body = get_largest_connected_component_mask(tissue, connectivity=1)
    if not body.any():
        return body, steps
    return _fill_holes_axial(body), steps


def enclosed_air(work: np.ndarray, lung_threshold: float) -> tuple[np.ndarray, int]:
    """Step 2, the lung candidates: air enclosed by tissue in its axial slice, as 6-connected 3D components.

    Air is a voxel below ``lung_threshold``; it is enclosed when it is a hole of the tissue (``>= lung_threshold``)
    in its axial slice, i.e. not connected in-plane to the slice border through air. Air outside the patient, the
    gap to the table and the table pad / mattress (foam, about -400 HU, which is above the body threshold but touches
    the outside air) are therefore never candidates, whatever their shape.

    Args:
        work: the CT in HU, axial axis last.
        lung_threshold: HU below which a voxel is air.

    Returns:
        The labels of the enclosed air components (``scipy.ndimage.label``, 6-connectivity) and their number.
    """
    tissue = work >= lung_threshold
    air = _fill_holes_axial(tissue)
    air &= ~tissue
    del tissue
    return ndimage.label(air)


def find_lungs(
    work: np.ndarray, labels: np.ndarray, n: int, body: np.ndarray, steps: Sequence[int], min_voxels: float
) -> list[LungPiece]:
    """Step 3, the lungs among the enclosed air components, taken largest first.

    A component is a lung when:

    * it has at least ``min_voxels`` (a component that touches the first or last slice, i.e. is cut by the scan like
      lung bases at the top of an abdominal CT, needs only 25 % of it), and, unless it is the first lung found, at
      least 10 % of the voxels of the largest lung: smaller air pockets are bowel gas or noise;
    * it is aerated parenchyma rather than gas (:func:`_is_parenchyma`): gas pockets have most of their voxels near
      -1000 HU, lung parenchyma has almost none below -950 HU;
    * its centroid lies inside the body of step 1 (air enclosed in the table or in other objects is not lung).

    Every lung found is kept, so a lung cut into pieces by the scan or the diaphragm dome stays complete.

    Args:
        work: the CT in HU, axial axis last.
        labels: the enclosed air components of :func:`enclosed_air`.
        n: their number.
        body: the coarse body mask of :func:`body_mask`.
        steps: the in-plane steps of the body's grid.
        min_voxels: the smallest lung, in voxels (``min_lung_ml`` over the voxel volume).

    Returns:
        The lungs, largest first.
    """
    sizes, boxes = _component_sizes(labels, n)
    lungs: list[LungPiece] = []
    largest = 0  # voxels of the largest lung found
    for i in np.argsort(sizes, kind="stable")[::-1]:
        size, box = int(sizes[i]), boxes[i]
        if size < _CUT_MIN_FRACTION * min_voxels or size < _MIN_SECOND_FRACTION * largest:
            break
        cut = box[2].start == 0 or box[2].stop == work.shape[2]
        if size < (_CUT_MIN_FRACTION if cut else 1.0) * min_voxels:
            continue
        comp = labels[box] == i + 1
        if not _is_parenchyma(work[box][comp]):
            continue
        centre = [
            int(round((np.arange(c.size) * c).sum() / c.sum())) + b.start
            for c, b in zip(_profiles(comp), box, strict=True)
        ]
        coarse_centre = tuple(
            min(int(round(c / f)), d - 1) for c, f, d in zip(centre, [*steps, 1], body.shape, strict=True)
        )
        if body[coarse_centre]:
            lungs.append(LungPiece(box, comp))
            largest = max(largest, size)
    return lungs


def body_midline(body: np.ndarray, lungs: Sequence[LungPiece], step: int) -> tuple[float, float]:
    """The body's mid-sagittal plane and width, over the slices that hold lungs (fine left-right indices).

    The plane is the left-right centroid of the body, which separates the lungs even when the patient lies off the
    centre of the scan; it is taken over the lungs' slices only, so the shoulders or the pelvis do not shift it.

    Args:
        body: the coarse body mask of :func:`body_mask`.
        lungs: the lungs of :func:`find_lungs`.
        step: the left-right step of the body grid.

    Returns:
        ``(centre, width)``: the plane's left-right index and the body's width, in fine voxels.
    """
    z_lo = min(b[2].start for b, _ in lungs)
    z_hi = max(b[2].stop for b, _ in lungs)
    lr_profile = body[:, :, z_lo:z_hi].sum(axis=(1, 2), dtype=np.int64)
    lr_index = np.arange(body.shape[0]) * step
    centre = float((lr_profile * lr_index).sum() / lr_profile.sum())
    extent = lr_index[lr_profile > 0]
    return centre, float(extent[-1] - extent[0] + step)


def split_joined_lungs(lungs: list[LungPiece], centre: float, width: float) -> list[LungPiece]:
    """Split the largest lung in two when it is both lungs joined, at the narrowest sagittal plane near the centre.

    The lungs touch through the trachea and main bronchi or a thin anterior junction line. The largest lung is
    taken to be both when at least 20 % of its voxels lie on each side of the mid-sagittal plane; it is cut at the
    sagittal plane with the smallest cross-section within 12 % of the body width around ``centre`` (the junction),
    and the two halves replace it.

    Args:
        lungs: the lungs, largest first.
        centre: left-right index of the body's mid-sagittal plane (:func:`body_midline`).
        width: the body's width in voxels.

    Returns:
        The lungs, the largest replaced by its halves when it was split.
    """
    box, comp = lungs[0]
    idx = np.arange(box[0].start, box[0].stop)
    profile = comp.sum(axis=(1, 2), dtype=np.int64)
    low_side = profile[idx < centre].sum() / profile.sum()
    if min(low_side, 1.0 - low_side) < _JOINED_SIDE_FRACTION:
        return lungs
    half = max(1, int(round(_SPLIT_SEARCH_FRACTION * width)))
    window_idx = np.flatnonzero((idx >= centre - half) & (idx <= centre + half))
    if window_idx.size == 0:  # degenerate: split at the centre
        plane = int(np.searchsorted(idx, centre))
    else:
        costs = profile[window_idx] + 1e-6 * np.abs(idx[window_idx] - centre)
        plane = int(window_idx[np.argmin(costs)])
    parts = []
    for part in (slice(0, plane), slice(plane, comp.shape[0])):
        sub = np.zeros_like(comp)
        sub[part] = comp[part]
        if sub.any():
            parts.append(LungPiece(box, sub))
    return parts + lungs[1:]


def assign_sides(lungs: Sequence[LungPiece], centre: float, x_sign: float) -> dict[int, list[LungPiece]]:
    """Step 4, left or right: the side of the mid-sagittal plane, in world x, that each piece's centroid lies on.

    Deciding per piece, rather than by rank or size, gives a single lung (e.g. one lung base in the scan) its own
    side. The patient's left is world -x (RAS+); ``x_sign`` says which way the left-right array index runs.

    Args:
        lungs: the lungs or their pieces.
        centre: left-right index of the body's mid-sagittal plane.
        x_sign: +1 when the left-right index grows towards world +x (the patient's right), -1 otherwise.

    Returns:
        The pieces of each lung, ``{LEFT_LUNG: [...], RIGHT_LUNG: [...]}``.
    """
    sides: dict[int, list[LungPiece]] = {LEFT_LUNG: [], RIGHT_LUNG: []}
    for box, mask in lungs:
        lr = _profiles(mask)[0]
        centroid = float((np.arange(lr.size) * lr).sum() / lr.sum()) + box[0].start
        sides[LEFT_LUNG if (centroid - centre) * x_sign < 0 else RIGHT_LUNG].append(LungPiece(box, mask))
    return sides


def close_and_fill(
    out: np.ndarray, sides: dict[int, list[LungPiece]], spacing: Sequence[float], closing_mm: float
) -> None:
    """Step 5: write each lung into ``out``, closed with a ball of ``closing_mm`` and its holes filled per slice.

    The closing and the filling make vessels, ground glass (-700...-300 HU) and consolidation (~0 HU) inside the lung
    or in a dent of its border part of it. The closing runs on a ~2 mm grid (max-pooled, two distance transforms) and
    adds only the coarse voxels that held no lung voxel, so the fine lung border elsewhere is unchanged. Each lung's
    own voxels are written first, so what the closing adds to one lung never takes voxels of the other. The two
    sides are closed side by side (:func:`~covid_monai.parallel.map_in_threads`).

    Args:
        out: the uint8 output in working axis order (a view of the result), all zeros.
        sides: the pieces of each lung (:func:`assign_sides`).
        spacing: voxel size (mm) along the working axes.
        closing_mm: radius of the closing ball (0: holes are only filled).
    """
    factors = [max(1, int(round(_COARSE_MM / s))) if s > 0 else 1 for s in spacing]
    merged = [(name, *_merge_pieces(pieces)) for name, pieces in sides.items() if pieces]

    def close_one(side: tuple[int, Box, np.ndarray]) -> tuple[int, Box, np.ndarray]:
        name, box, mask = side
        margin = [
            int(math.ceil(closing_mm / s)) + 2 * f + 1 if s > 0 else 0 for s, f in zip(spacing, factors, strict=True)
        ]
        crop = tuple(
            slice(max(b.start - m, 0), min(b.stop + m, dim)) for b, m, dim in zip(box, margin, out.shape, strict=True)
        )
        fine = np.zeros([c.stop - c.start for c in crop], dtype=bool)
        inner = tuple(slice(b.start - c.start, b.stop - c.start) for b, c in zip(box, crop, strict=True))
        fine[inner] = mask
        if closing_mm > 0:
            coarse = _block_max(fine, factors)
            closed = _closing_edt(coarse, closing_mm, [s * f for s, f in zip(spacing, factors, strict=True)])
            fine |= _block_up(closed & ~coarse, factors, fine.shape)
        return name, crop, _fill_holes_axial(fine)

    filled = map_in_threads(close_one, merged)  # the two sides side by side
    for name, box, mask in merged:
        out[box][mask] = name
    for name, crop, fine in filled:
        target = out[crop]
        target[fine & (target == 0)] = name


def _merge_pieces(pieces: Sequence[LungPiece]) -> tuple[Box, np.ndarray]:
    """One box and mask holding every piece of a lung."""
    box = tuple(slice(min(p.box[a].start for p in pieces), max(p.box[a].stop for p in pieces)) for a in range(3))
    mask = np.zeros([b.stop - b.start for b in box], dtype=bool)
    for b, m in pieces:
        mask[tuple(slice(s.start - u.start, s.stop - u.start) for s, u in zip(b, box, strict=True))] |= m
    return box, mask


def _axial_structure() -> np.ndarray:
    """3D structuring element connecting voxels in the same axial slice only (axial axis last)."""
    st = np.zeros((3, 3, 3), dtype=bool)
    st[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return st


def _fill_holes_axial(mask: np.ndarray, slab: int = 32) -> np.ndarray:
    """Fill holes slice by slice (axial axis last): background not connected in-plane to the slice border.

    Slices are independent, so slabs of ``slab`` slices are filled side by side (:func:`map_slabs`).
    """
    out = np.empty(mask.shape, dtype=bool)

    def fill_slab(part: slice) -> None:  # writes only its own slices of ``out``
        background, n = ndimage.label(~mask[..., part], structure=_axial_structure())
        if n == 0:
            out[..., part] = mask[..., part]
            return
        border = np.concatenate(
            [background[0].ravel(), background[-1].ravel(), background[:, 0].ravel(), background[:, -1].ravel()]
        )
        outside = np.zeros(n + 1, dtype=bool)
        outside[np.unique(border)] = True
        outside[0] = False  # label 0 is the mask itself
        out[..., part] = ~outside[background]

    map_slabs(fill_slab, mask.shape[-1], slab)
    return out


def _component_sizes(labels: np.ndarray, n: int) -> tuple[np.ndarray, list[Box]]:
    """Voxel count and bounding box of labels 1..n (cheap: each count runs on its bounding box only)."""
    boxes = ndimage.find_objects(labels, max_label=n)
    if n > 256:  # many (noise) components: one pass over the volume is cheaper than one per component
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)
    else:
        sizes = np.array([np.count_nonzero(labels[b] == i + 1) for i, b in enumerate(boxes)], dtype=np.int64)
    return sizes, boxes


def _block_max(mask: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Down-sample a boolean volume by integer factors: a coarse voxel is set if any fine voxel in its block is."""
    pad = [(0, (-s) % f) for s, f in zip(mask.shape, factors, strict=True)]
    m = np.pad(mask, pad)
    shape = []
    for s, f in zip(m.shape, factors, strict=True):
        shape += [s // f, f]
    return m.reshape(shape).any(axis=(1, 3, 5))


def _block_up(mask: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Up-sample a coarse boolean volume by repetition and crop it to ``shape``."""
    up = mask
    for ax, f in enumerate(factors):
        if f > 1:
            up = np.repeat(up, f, axis=ax)
    return up[: shape[0], : shape[1], : shape[2]]


def _closing_edt(mask: np.ndarray, radius_mm: float, sampling: Sequence[float]) -> np.ndarray:
    """Binary closing with a ball of ``radius_mm`` (Euclidean, anisotropic voxels) via two distance transforms."""
    if radius_mm <= 0 or not mask.any():
        return mask
    # edge padding: a mask that touches the array border continues beyond it (no erosion from the border),
    # one that does not is surrounded by background
    pad = [int(math.ceil(radius_mm / s)) + 1 for s in sampling]
    padded = np.pad(mask, [(p, p) for p in pad], mode="edge")
    (dilated,) = within_distance(padded, sampling, [radius_mm])
    if not dilated.all():
        dilated = ~within_distance(~dilated, sampling, [radius_mm])[0]
    return dilated[tuple(slice(p, p + n) for p, n in zip(pad, mask.shape, strict=True))]


def _profiles(mask: np.ndarray) -> list[np.ndarray]:
    """Voxel counts of a 3D boolean mask per index along each axis."""
    return [mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64) for axis in range(3)]


def _is_parenchyma(values: np.ndarray) -> bool:
    """True when air voxels (HU) look like lung parenchyma: more in -950...-600 HU than below -950 HU (gas).

    Gas pockets (bowel, stomach, trachea) have most of their voxels near -1000 HU and the rest spread over the
    partial-volume rim, whereas lung parenchyma with its vessels has almost none below -950 HU (emphysema with more
    than about half of the lung below -950 HU would be missed).
    """
    gas = np.count_nonzero(values < _GAS_HU)
    parenchyma = np.count_nonzero(values <= _PARENCHYMA_MAX_HU) - gas
    return parenchyma > gas
