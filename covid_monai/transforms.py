"""Custom MONAI transforms for COVID-19 chest CT: only what MONAI itself lacks.

* :func:`lung_mask_from_hu` -- a classical, model-free left/right lung mask from Hounsfield units.
* :class:`LungMaskd` -- dictionary transform that adds that lung mask as a new key, with the image's meta data.
* :class:`RestrictToLungsd` -- remove predicted infection away from a (slightly dilated) lung mask.
* :class:`AddInfectionToLungsd` -- lungs include their lesions: infection next to a lung joins that lung's label.
* :class:`ValidateCTd` -- refuse what cannot be a CT volume (not 3D, NaN/Inf, constant, too large), flag non-HU data.
* :class:`NeighbourSlicesToChannelsd` -- 2.5D input: every axial slice gets its neighbours above and below as channels.
* :class:`InfectionProbabilityd`, :class:`InfectionClassesd` -- multi-class bundles (``labels: multiclass``): the
  infection probability ``1 - p_background`` and the class (1 ground glass, 2 consolidation) of infected voxels.

Small connected components of a prediction are not handled here: use MONAI's
``monai.transforms.RemoveSmallObjectsd`` (``min_size`` with ``by_measure=True`` reads the threshold in mm³ and takes
the voxel size from the MetaTensor affine, or from ``pixdim=`` for plain arrays). It needs ``scikit-image`` installed.

Coordinates: affines map voxel indices to NIfTI RAS+ world millimetres (what nibabel returns and what MONAI stores
in ``MetaTensor.affine``, also for ITK-read DICOM): +x points to the patient's Right, +y Anterior, +z Superior.
The patient's LEFT lung therefore lies towards world -x.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import CropForegroundd, MapTransform
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import convert_to_dst_type, ensure_tuple, ensure_tuple_rep
from nibabel.orientations import io_orientation
from scipy import ndimage

from covid_monai.parallel import map_in_threads, map_slabs

__all__ = [
    "LEFT_LUNG",
    "RIGHT_LUNG",
    "AboveOrAll",
    "AddInfectionToLungsd",
    "CropForegroundMMd",
    "InfectionClassesd",
    "InfectionProbabilityd",
    "LungMaskd",
    "NeighbourSlicesToChannelsd",
    "RestrictToLungsd",
    "ValidateCTd",
    "bounding_box",
    "infection_classes",
    "lung_mask_from_hu",
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


def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...]:
    """Spatial slices of the box holding every non-zero voxel of a channel-first mask (any channel), grown by
    ``margin`` voxels and clipped to the array: MONAI's ``generate_spatial_bounding_box`` as slices (an empty mask
    gives empty slices).

    Example:
        >>> bounding_box(np.pad(np.ones((1, 2, 2)), ((0, 0), (3, 3), (1, 5))), margin=1)
        (slice(2, 6, None), slice(0, 4, None))
    """
    start, end = generate_spatial_bounding_box(mask, margin=margin, allow_smaller=True)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, end, strict=True))


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis: the norms of the affine's columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


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


def _component_sizes(labels: np.ndarray, n: int) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Voxel count and bounding box of labels 1..n (cheap: each count runs on its bounding box only)."""
    boxes = ndimage.find_objects(labels, max_label=n)
    if n > 256:  # many (noise) components: one pass over the volume is cheaper than one per component
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)
    else:
        sizes = np.array([np.count_nonzero(labels[b] == i + 1) for i, b in enumerate(boxes)], dtype=np.int64)
    return sizes, boxes


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (all False when ``mask`` is empty)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return labels > 0
    sizes, _ = _component_sizes(labels, n)
    return labels == int(np.argmax(sizes)) + 1


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
    dilated = ndimage.distance_transform_edt(~padded, sampling=sampling) <= radius_mm
    if not dilated.all():
        dilated = ndimage.distance_transform_edt(dilated, sampling=sampling) > radius_mm
    return dilated[tuple(slice(p, p + n) for p, n in zip(pad, mask.shape, strict=True))]


def _world_axis_order(affine: np.ndarray) -> list[int]:
    """Axis permutation that brings an array into (left-right, posterior-anterior, inferior-superior) axis order.

    ``np.transpose(array, order)`` puts the array axis closest to world x first and the axial (world-z) axis last;
    the directions along the axes are not changed (left/right is decided later from the affine).
    """
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    return [int(np.flatnonzero(ornt[:, 0] == k)[0]) for k in range(3)]


def _profiles(mask: np.ndarray) -> list[np.ndarray]:
    """Voxel counts of a 3D boolean mask per index along each axis."""
    return [mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64) for axis in range(3)]


def _is_parenchyma(values: np.ndarray) -> bool:
    """True when air voxels (HU) look like lung parenchyma: more in -950...-600 HU than below -950 HU (gas)."""
    gas = np.count_nonzero(values < _GAS_HU)
    parenchyma = np.count_nonzero(values <= _PARENCHYMA_MAX_HU) - gas
    return parenchyma > gas


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
    abdominal CT); a scan without aerated lung gives an empty (or nearly empty) mask. The method:

    1. body = the largest 6-connected 3D component above ``body_threshold``, holes filled slice by slice (axial),
       found on a grid of about 4 mm in-plane (every n-th voxel; all slices). It gives the body's mid-sagittal plane
       and the inside-the-body test of step 3;
    2. enclosed air = voxels below ``lung_threshold`` that are holes of the tissue (``>= lung_threshold``) in their
       axial slice, i.e. not connected in-plane to the slice border through voxels below ``lung_threshold``. Air
       outside the patient, the gap to the table and the table pad / mattress (foam, about -400 HU, which is above
       ``body_threshold`` but touches the outside air) are therefore never candidates, whatever their shape;
    3. candidates = 6-connected 3D components of the enclosed air, largest first. A candidate is a lung when:

       * it has at least ``min_lung_ml`` (a candidate that touches the first or last slice, i.e. is cut by the scan
         like lung bases at the top of an abdominal CT, needs only 25 % of it), and, unless it is the first lung
         found, at least 10 % of the voxels of the largest lung;
       * it is aerated parenchyma rather than gas: it has more voxels in -950...-600 HU (lung parenchyma with its
         vessels and partial volume) than below -950 HU (bowel and stomach gas, trachea, air: about -1000 HU). Gas
         pockets have most of their voxels near -1000 HU and the rest spread over the partial-volume rim, whereas lung
         parenchyma has almost none below -950 HU (emphysema with more than about half of the lung below -950 HU
         would be missed);
       * its centroid lies inside the body of step 1 (air enclosed in the table or in other objects is not lung).

       Every lung found is kept (a lung cut into pieces by the scan or the diaphragm dome stays complete). If the
       largest one has at least 20 % of its voxels on each side of the body's mid-sagittal plane, the lungs are joined
       (trachea, main bronchi, anterior junction line): it is split at the sagittal plane with the smallest
       cross-section within 12 % of the body width around the body centre, and the two halves are taken apart;
    4. left/right is decided per component (or half) by the side of the body's mid-sagittal plane its centroid lies
       on, in world space: the plane is the left-right centroid of the body over the slices that hold lungs, and the
       patient's left is world -x (RAS+). So a single lung, e.g. one lung base, gets its own side;
    5. each side's lung is closed with a ball of radius ``closing_mm`` and its holes are filled slice by slice, so
       vessels, ground glass (-700...-300 HU) and consolidation (~0 HU) inside the lung or in a dent of its border
       become part of it. The closing runs on a ~2 mm grid (max-pooled, distance transforms) and adds only the coarse
       voxels that held no lung voxel, so the fine lung border elsewhere is unchanged; voxels that a closing adds
       never take voxels of the other lung.

    Any storage orientation works (the axial axis and the left-right axis are read from the affine with
    ``nibabel.orientations.io_orientation``), and so does a volume with few slices (a lung that reaches the first or
    last slice is taken to continue beyond it, so the closing does not erode it there).

    Limitations (it is a heuristic): the trachea and main bronchi stay part of the lungs where joined to them; the
    closing also fills concavities of the mediastinal surface (hilum) narrower than about ``2 * closing_mm``; a
    consolidation at the pleura is restored up to a rim of a few mm where it meets the chest wall (keep a margin, as
    :class:`RestrictToLungsd` does) and only partly when it is wider than about ``2 * closing_mm``; a lung (or the
    part of a lung in the scan) with more voxels below -950 HU than in -950...-600 HU is taken for gas, and an
    enclosed gas/stool mixture of lung size with mostly -950...-600 HU voxels would be taken for lung.

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

    order = _world_axis_order(affine)
    work = np.transpose(image, order)  # (lr, ap, si): axial axis last
    spacing = _spacing(affine)[order]
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    # +1 when the left-right array index grows towards world +x (patient right), -1 when towards the patient's left
    x_sign = 1.0 if affine[0, order[0]] >= 0 else -1.0

    # 1. body, on a coarse in-plane grid (every ``steps``-th voxel)
    steps = [max(1, int(round(_BODY_MM / s))) if s > 0 else 1 for s in spacing[:2]]
    body = _largest_component(work[:: steps[0], :: steps[1], :] > body_threshold)
    if not body.any():
        return out
    body = _fill_holes_axial(body)

    # 2. air enclosed by tissue in its axial slice
    tissue = work >= lung_threshold
    air = _fill_holes_axial(tissue)
    air &= ~tissue
    del tissue
    labels, n = ndimage.label(air)
    del air
    if n == 0:
        return out
    sizes, boxes = _component_sizes(labels, n)

    # 3. lung candidates, largest first: list of (bounding box, boolean mask within the box)
    min_voxels = max(min_lung_ml / voxel_ml if voxel_ml > 0 else 0.0, 1.0)
    lungs: list[tuple[tuple[slice, ...], np.ndarray]] = []
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
            lungs.append((box, comp))
            largest = max(largest, size)
    del labels
    if not lungs:
        return out

    # mid-sagittal plane (fine left-right index) and width of the body, over the slices that hold lungs
    z_lo = min(b[2].start for b, _ in lungs)
    z_hi = max(b[2].stop for b, _ in lungs)
    lr_profile = body[:, :, z_lo:z_hi].sum(axis=(1, 2), dtype=np.int64)
    lr_index = np.arange(body.shape[0]) * steps[0]
    body_centre = float((lr_profile * lr_index).sum() / lr_profile.sum())
    body_extent = lr_index[lr_profile > 0]
    body_width = float(body_extent[-1] - body_extent[0] + steps[0])

    # joined lungs: split the largest at the narrowest sagittal plane near the body centre
    box, comp = lungs[0]
    idx = np.arange(box[0].start, box[0].stop)
    profile = comp.sum(axis=(1, 2), dtype=np.int64)
    low_side = profile[idx < body_centre].sum() / profile.sum()
    if min(low_side, 1.0 - low_side) >= _JOINED_SIDE_FRACTION:
        half = max(1, int(round(_SPLIT_SEARCH_FRACTION * body_width)))
        window_idx = np.flatnonzero((idx >= body_centre - half) & (idx <= body_centre + half))
        if window_idx.size == 0:  # degenerate: split at the centre
            plane = int(np.searchsorted(idx, body_centre))
        else:
            costs = profile[window_idx] + 1e-6 * np.abs(idx[window_idx] - body_centre)
            plane = int(window_idx[np.argmin(costs)])
        parts = []
        for part in (slice(0, plane), slice(plane, comp.shape[0])):
            sub = np.zeros_like(comp)
            sub[part] = comp[part]
            if sub.any():
                parts.append((box, sub))
        lungs[:1] = parts

    # 4. left / right: the side of the mid-sagittal plane (in world x) that each piece's centroid lies on
    sides: dict[int, list[tuple[tuple[slice, ...], np.ndarray]]] = {LEFT_LUNG: [], RIGHT_LUNG: []}
    for box, mask in lungs:
        lr = _profiles(mask)[0]
        centroid = float((np.arange(lr.size) * lr).sum() / lr.sum()) + box[0].start
        sides[LEFT_LUNG if (centroid - body_centre) * x_sign < 0 else RIGHT_LUNG].append((box, mask))

    # 5. per side: closing on a coarse grid + slice-wise hole filling; each lung's own voxels are written first so
    # that what the closing adds to one lung never takes voxels of the other
    out_work = np.transpose(out, order)  # a view: writing into it writes into ``out``
    factors = [max(1, int(round(_COARSE_MM / s))) if s > 0 else 1 for s in spacing]
    merged = []
    for name, pieces in sides.items():
        if not pieces:
            continue
        box = tuple(slice(min(p[0][a].start for p in pieces), max(p[0][a].stop for p in pieces)) for a in range(3))
        mask = np.zeros([b.stop - b.start for b in box], dtype=bool)
        for b, m in pieces:
            mask[tuple(slice(s.start - u.start, s.stop - u.start) for s, u in zip(b, box, strict=True))] |= m
        merged.append((name, box, mask))

    def close_and_fill(side: tuple[int, tuple[slice, ...], np.ndarray]) -> tuple[int, tuple[slice, ...], np.ndarray]:
        name, box, mask = side
        margin = [
            int(math.ceil(closing_mm / s)) + 2 * f + 1 if s > 0 else 0 for s, f in zip(spacing, factors, strict=True)
        ]
        crop = tuple(
            slice(max(b.start - m, 0), min(b.stop + m, dim)) for b, m, dim in zip(box, margin, work.shape, strict=True)
        )
        fine = np.zeros([c.stop - c.start for c in crop], dtype=bool)
        inner = tuple(slice(b.start - c.start, b.stop - c.start) for b, c in zip(box, crop, strict=True))
        fine[inner] = mask
        if closing_mm > 0:
            coarse = _block_max(fine, factors)
            closed = _closing_edt(coarse, closing_mm, [s * f for s, f in zip(spacing, factors, strict=True)])
            fine |= _block_up(closed & ~coarse, factors, fine.shape)
        return name, crop, _fill_holes_axial(fine)

    filled = map_in_threads(close_and_fill, merged)  # the two sides side by side
    for name, box, mask in merged:
        out_work[box][mask] = name
    for name, crop, fine in filled:
        target = out_work[crop]
        target[fine & (target == 0)] = name
    return out


def _affine_of(data: Mapping[Hashable, Any], key: Hashable, meta_key_postfix: str = "meta_dict") -> np.ndarray:
    """The affine of ``data[key]``: from the MetaTensor, or from ``data[f"{key}_{meta_key_postfix}"]["affine"]``."""
    value = data[key]
    if isinstance(value, MetaTensor):
        return np.asarray(value.affine.detach().cpu().numpy(), dtype=np.float64)
    meta = data.get(f"{key}_{meta_key_postfix}")
    if isinstance(meta, Mapping) and "affine" in meta:
        aff = meta["affine"]
        return np.asarray(aff.detach().cpu().numpy() if isinstance(aff, torch.Tensor) else aff, dtype=np.float64)
    raise ValueError(f"no affine for key '{key}': expected a MetaTensor or a '{key}_{meta_key_postfix}' dict.")


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class LungMaskd(MapTransform):
    """Add a left/right lung mask computed from the HU image (:func:`lung_mask_from_hu`) as a new key.

    Place it on the HU image (after loading, channel-first, before any intensity normalisation). The mask has the
    image's shape (including the channel dimension), its affine and its meta data (a copy), dtype uint8, labels
    0 background / 1 left lung / 2 right lung.

    Args:
        keys: image key(s); each image is channel-first ``(1, X, Y, Z)``, a MetaTensor (or an array with an affine
            in ``data[f"{key}_meta_dict"]["affine"]``).
        output_keys: key(s) to write the masks to, one per image key. Default ``"lungs"``.
        body_threshold: see :func:`lung_mask_from_hu`.
        lung_threshold: see :func:`lung_mask_from_hu`.
        min_lung_ml: see :func:`lung_mask_from_hu`.
        closing_mm: see :func:`lung_mask_from_hu`.
        allow_missing_keys: don't raise when a key is missing.

    Example:
        >>> from monai.transforms import Compose, LoadImaged, EnsureChannelFirstd
        >>> pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), LungMaskd("image")])  # doctest: +SKIP
        >>> pre({"image": "case.nii.gz"})["lungs"].shape  # doctest: +SKIP
        torch.Size([1, 512, 512, 300])
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: KeysCollection = "lungs",
        body_threshold: float = -500.0,
        lung_threshold: float = -320.0,
        min_lung_ml: float = 20.0,
        closing_mm: float = 15.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        output_keys = ensure_tuple(output_keys)
        if len(output_keys) == 1 and len(self.keys) > 1:
            raise ValueError("LungMaskd with several image keys needs one output key per image key.")
        self.output_keys = ensure_tuple_rep(output_keys, len(self.keys))
        self.kwargs = {
            "body_threshold": body_threshold,
            "lung_threshold": lung_threshold,
            "min_lung_ml": min_lung_ml,
            "closing_mm": closing_mm,
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            image = d[key]
            array = _as_numpy(image)
            if array.ndim != 4 or array.shape[0] != 1:
                raise ValueError(f"LungMaskd expects a channel-first (1, X, Y, Z) image '{key}', got {array.shape}.")
            mask = lung_mask_from_hu(array[0], _affine_of(d, key), **self.kwargs)[None]
            if isinstance(image, MetaTensor):
                out = MetaTensor(
                    torch.from_numpy(mask),
                    meta=deepcopy(image.meta),
                    applied_operations=deepcopy(image.applied_operations),
                )
                out.affine = image.affine.clone()
                d[out_key] = out
            else:
                d[out_key], *_ = convert_to_dst_type(mask, image, dtype=np.uint8)
                meta = d.get(f"{key}_meta_dict")
                if isinstance(meta, Mapping):
                    d[f"{out_key}_meta_dict"] = deepcopy(dict(meta))
        return d


class RestrictToLungsd(MapTransform):
    """Remove predicted infection outside a lung mask that is first dilated by ``margin_mm``.

    With ``mode="components"`` (default) each 3D connected component of the prediction (26-connectivity) is kept
    when it touches the dilated lung mask (up to ``max_distance_mm`` from the lungs) and removed otherwise: a
    consolidation at the chest wall, which an HU-threshold lung mask cuts because it is as dense as the wall, stays
    complete, while false positives in the body wall, the heart or the bowel go. ``mode="voxels"`` zeroes every
    voxel outside the dilated mask. Distances are Euclidean in mm, using the voxel size of the lung mask
    (MetaTensor affine), else of the prediction, else ``pixdim``.

    Args:
        keys: prediction key(s), channel-first ``(C, X, Y, Z)`` arrays or tensors.
        lung_key: key of the lung mask ``(1, X, Y, Z)`` (any value > 0 is lung), e.g. written by :class:`LungMaskd`.
        margin_mm: dilation of the lung mask in mm before masking (0: no dilation).
        mode: ``"components"`` (keep whole components that touch the lungs) or ``"voxels"``.
        max_distance_mm: in ``"components"`` mode, voxels of a touching component farther than this from the lung
            mask are still removed (a false positive in the liver that touches a lung base does not survive whole).
        pixdim: voxel size (mm) when neither the lung mask nor the prediction is a MetaTensor.
        empty_lungs: what to do when the lung mask is empty: ``"keep"`` the prediction unchanged (and warn; an
            empty mask is far more often a failed lung mask than a scan without lungs) or ``"zero"`` it.
        allow_missing_keys: don't raise when a key is missing.
        slab: slices of the last axis per distance transform (at least twice the reach in voxels), which bounds
            its memory.

    Example:
        >>> post = RestrictToLungsd("pred", lung_key="lungs", margin_mm=3.0)
        >>> out = post({"pred": pred, "lungs": lungs})  # doctest: +SKIP
    """

    def __init__(
        self,
        keys: KeysCollection,
        lung_key: str = "lungs",
        margin_mm: float = 3.0,
        mode: str = "components",
        max_distance_mm: float = 30.0,
        pixdim: Sequence[float] | None = None,
        empty_lungs: str = "keep",
        allow_missing_keys: bool = False,
        slab: int = 96,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slab = max(int(slab), 1)
        if mode not in ("components", "voxels"):
            raise ValueError(f"mode must be 'components' or 'voxels', got {mode!r}.")
        self.mode = mode
        self.max_distance_mm = float(max_distance_mm)
        if empty_lungs not in ("keep", "zero"):
            raise ValueError(f"empty_lungs must be 'keep' or 'zero', got {empty_lungs!r}.")
        if margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {margin_mm}.")
        self.lung_key = lung_key
        self.margin_mm = float(margin_mm)
        self.pixdim = None if pixdim is None else [float(p) for p in pixdim]
        self.empty_lungs = empty_lungs

    def _spacing(self, lungs: Any, pred: Any, ndim: int) -> np.ndarray:
        for value in (lungs, pred):
            if isinstance(value, MetaTensor):
                return np.asarray(affine_to_spacing(value.affine, r=ndim), dtype=np.float64)
        if self.pixdim is not None:
            return np.asarray(ensure_tuple_rep(self.pixdim, ndim), dtype=np.float64)
        return np.ones(ndim, dtype=np.float64)

    def _near_lungs(self, lungs: np.ndarray, spacing: np.ndarray, limits_mm: Sequence[float]) -> list[np.ndarray]:
        """For each limit, the voxels at most that far (mm, Euclidean) from the lung mask.

        The distance transform runs on the lungs' bounding box padded by the largest limit, in slabs of the last
        axis that overlap by that limit: exact for every distance up to the limit, with memory bounded by one slab
        per thread whatever the number of slices (slabs run side by side, :func:`~covid_monai.parallel.map_slabs`).
        """
        reach = max(limits_mm)
        margin = [int(math.ceil(reach / s)) + 1 for s in spacing]
        box = bounding_box(lungs[None], margin=margin)
        start, end = box[-1].start, box[-1].stop
        near = [np.zeros(lungs.shape, dtype=bool) for _ in limits_mm]
        step = max(self.slab, 2 * margin[-1])

        def fill_slab(part: slice) -> None:  # writes only its own slices of ``near``
            low, high = max(start, part.start - margin[-1]), min(end, part.stop + margin[-1])
            window = (*box[:-1], slice(low, high))
            if not lungs[window].any():
                return
            distance = ndimage.distance_transform_edt(~lungs[window], sampling=spacing)
            core = distance[..., part.start - low : part.stop - low]
            for out, limit in zip(near, limits_mm, strict=True):
                out[(*box[:-1], part)] = core <= limit

        map_slabs(fill_slab, end, step, start=start)
        return near

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        lungs_value = d[self.lung_key]
        lungs = _as_numpy(lungs_value)
        if lungs.ndim == 4:
            lungs = lungs[0]
        lungs = lungs > 0
        near: list[np.ndarray] | None = None
        for key in self.key_iterator(d):
            pred = d[key]
            array = _as_numpy(pred)
            if array.shape[1:] != lungs.shape:
                raise ValueError(
                    f"RestrictToLungsd: '{key}' has spatial shape {array.shape[1:]}, "
                    f"lung mask '{self.lung_key}' has {lungs.shape}."
                )
            if not lungs.any():
                if self.empty_lungs == "keep":
                    warnings.warn(
                        f"RestrictToLungsd: lung mask '{self.lung_key}' is empty; '{key}' left unchanged.", stacklevel=2
                    )
                    continue
                keep = np.zeros((1, *lungs.shape), dtype=bool)
            else:
                if near is None:  # one distance transform serves the margin and the reach
                    limits = [self.margin_mm] if self.mode == "voxels" else [self.margin_mm, self.max_distance_mm]
                    near = self._near_lungs(lungs, self._spacing(lungs_value, pred, lungs.ndim), limits)
                allowed = near[0]
                if self.mode == "voxels":
                    keep = allowed[None]
                else:  # whole touching components, but not beyond max_distance_mm from the lungs
                    keep = _components_touching(array > 0, allowed) & near[1][None]
            if isinstance(pred, torch.Tensor):
                d[key] = pred * torch.as_tensor(keep, device=pred.device).to(pred.dtype)
            else:
                d[key] = array * keep.astype(array.dtype)
        return d


def _components_touching(pred: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per channel, the 26-connected components of ``pred`` that have at least one voxel in ``region``.

    Components are labelled on the bounding box of the channel's prediction only.
    """
    keep = np.zeros(pred.shape, dtype=bool)
    structure = np.ones((3,) * region.ndim, dtype=bool)
    for c in range(pred.shape[0]):
        if not pred[c].any():
            continue
        box = bounding_box(pred[c : c + 1])
        labels, n = ndimage.label(pred[c][box], structure=structure)
        if n:
            touching = np.zeros(n + 1, dtype=bool)  # a look-up table by label: one gather, not a search per voxel
            touching[labels[region[box]]] = True
            touching[0] = False
            keep[c][box] = touching[labels]
    return keep


class AddInfectionToLungsd(MapTransform):
    """Give infection voxels outside a lung mask the label of the nearest lung.

    Lung masks include their lesions (as in COVID-19-CT-Seg), but an HU-threshold mask misses consolidation as dense
    as soft tissue. After :class:`RestrictToLungsd` every infection component touches a lung; this transform adds
    its voxels outside the mask to the nearest lung (Euclidean distance in voxels, within the bounding box of those
    voxels plus a margin), so that lung volumes and the percentage of lung involved count consolidated lung too,
    and a component that touches both lungs is shared between them.

    Args:
        keys: lung mask key(s), ``(1, X, Y, Z)`` labels (0 background, 1 left, 2 right).
        infection_key: key of the binary infection mask, same shape.
        allow_missing_keys: don't raise when a key is missing.

    Example:
        >>> AddInfectionToLungsd("lungs", infection_key="pred")({"lungs": lungs, "pred": pred})  # doctest: +SKIP
    """

    def __init__(self, keys: KeysCollection, infection_key: str = "pred", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.infection_key = infection_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        infection = _as_numpy(d[self.infection_key])[0] > 0
        for key in self.key_iterator(d):
            lungs_value = d[key]
            lungs = _as_numpy(lungs_value)[0].astype(np.uint8)
            outside = infection & (lungs == 0)
            if outside.any() and lungs.any():
                lungs = lungs.copy()
                box = bounding_box(outside[None], margin=8)
                lung_box = lungs[box]
                if lung_box.any():
                    nearest = ndimage.distance_transform_edt(
                        lung_box == 0, return_distances=False, return_indices=True
                    )
                    labels = lung_box[tuple(nearest)]
                    grow = outside[box]
                    lung_box[grow] = labels[grow]
            d[key], *_ = convert_to_dst_type(lungs[None], lungs_value, dtype=np.uint8)
        return d


class ValidateCTd(MapTransform):
    """Check a loaded, channel-first scan before any work is spent on it.

    Raises a ``ValueError`` naming the file and the problem for: a channel count other than 1 (a 4D series with
    several volumes), fewer than 3 spatial dimensions (a 2D image), more than ``max_voxels`` voxels, non-finite
    voxels (NaN, Inf), a constant volume, and a singular affine. Intensities that do not look like Hounsfield units
    (no air below ``-500`` or a range under 200) are allowed through with a warning appended to
    ``data["warnings"]``, which the batch runner writes to the summary.

    Args:
        keys: image key(s), channel-first MetaTensors as produced by ``LoadImaged`` + ``EnsureChannelFirstd``.
        expect_hu: whether the pipeline expects CT in Hounsfield units (the non-HU warning).
        max_voxels: largest accepted volume (voxels); larger ones are refused up front rather than exhausting memory.
        allow_missing_keys: don't raise when a key is missing.

    Example:
        >>> ValidateCTd("image", expect_hu=True)(data)  # doctest: +SKIP
    """

    def __init__(
        self,
        keys: KeysCollection,
        expect_hu: bool = True,
        max_voxels: int = 400_000_000,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.expect_hu = expect_hu
        self.max_voxels = int(max_voxels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        notes = list(d.get("warnings", []))
        for key in self.key_iterator(d):
            image = d[key]
            meta = getattr(image, "meta", {}) or {}
            name = str(meta.get("filename_or_obj", key))
            shape = tuple(int(s) for s in image.shape)
            spatial = shape[1:]
            if len(spatial) != 3 or sum(s > 1 for s in spatial) < 2:
                raise ValueError(f"{name}: not a 3D volume (shape {shape[1:] if shape[0] == 1 else shape})")
            if shape[0] != 1:
                raise ValueError(f"{name}: {shape[0]} volumes in one file (a 4D series); give one 3D volume")
            if math.prod(spatial) > self.max_voxels:
                raise ValueError(
                    f"{name}: {'x'.join(map(str, spatial))} voxels is larger than the limit of {self.max_voxels:,}"
                )
            affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
            if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
                raise ValueError(f"{name}: singular or non-finite affine, the voxel geometry is undefined")
            tensor = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            low, high = float(tensor.min()), float(tensor.max())  # NaN propagates; no full-size temporary
            if not (math.isfinite(low) and math.isfinite(high)):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(f"{name}: {bad} voxels are NaN or infinite")
            if low == high:
                raise ValueError(f"{name}: every voxel has the same value ({low:g}); the volume is empty")
            if self.expect_hu and (low > -500 or high - low < 200):
                notes.append(f"intensities {low:g}..{high:g} do not look like Hounsfield units")
        if notes:
            d["warnings"] = notes
        return d


class AboveOrAll:
    """A ``select_fn`` for ``CropForegroundd``: voxels above ``threshold``, or every voxel when there are none.

    MONAI's ``CropForegroundd`` crops to an empty box when nothing is selected; with this function a scan without
    body or without lungs is processed whole instead of failing. Picklable, so it works in DataLoader workers.

    Args:
        threshold: voxels strictly above it are foreground.

    Example:
        >>> CropForegroundd(keys="image", source_key="lungs", select_fn=AboveOrAll(0))  # doctest: +SKIP
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Boolean foreground mask of ``x``."""
        selected = x > self.threshold
        if not selected.any():
            selected = selected | True
        return selected


class CropForegroundMMd(CropForegroundd):
    """MONAI's ``CropForegroundd`` with the margin in millimetres, converted with each case's own voxel size.

    A margin in voxels means 2 mm on 1 mm slices and 10 mm on 5 mm slices; infection that bulges out of an
    HU-threshold lung mask (dense consolidation at the bases and the chest wall) needs the same room in millimetres
    whatever the slice spacing. Invertible like ``CropForegroundd``.

    Args:
        keys: keys to crop.
        source_key: key whose foreground (``select_fn``) defines the box; its MetaTensor affine gives the spacing.
        margin_mm: margin added on each side of the box, per spatial axis (mm).
        kwargs: the other arguments of ``CropForegroundd`` (``select_fn``, ``k_divisible``, ``allow_smaller``...).

    Example:
        >>> CropForegroundMMd(["image", "lungs"], "lungs", margin_mm=(20, 20, 30), select_fn=AboveOrAll(0))
    """

    def __init__(self, keys: KeysCollection, source_key: str, margin_mm: Sequence[float] | float, **kwargs: Any):
        super().__init__(keys, source_key, margin=0, **kwargs)
        self.margin_mm = margin_mm

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        """Set the voxel margin from the source's spacing, then crop as ``CropForegroundd``."""
        source = data[self.source_key]
        ndim = len(source.shape) - 1
        spacing = affine_to_spacing(source.affine, r=ndim) if isinstance(source, MetaTensor) else np.ones(ndim)
        margins = ensure_tuple_rep(self.margin_mm, ndim)
        self.cropper.margin = [
            int(math.ceil(float(m) / max(float(s), 1e-6))) for m, s in zip(margins, spacing, strict=True)
        ]
        return super().__call__(data, lazy)


class NeighbourSlicesToChannelsd(MapTransform):
    """2.5D input: a one-channel volume ``(1, H, W, D)`` becomes ``(2k+1, H, W, D)``, slice ``z`` of channel ``j``
    being slice ``z + j - k`` of the input, so each axial slice carries its ``k`` neighbours below and above.

    A 2D network run slice by slice (MONAI's ``SliceInferer``, or a ``[H, W, 1]`` training crop squeezed to 2D) then
    sees ``2k+1`` adjacent slices while predicting the middle one; the label keeps one channel. Beyond the first and
    last slice the edge slice is repeated (a single-slice volume gives ``2k+1`` copies of itself). The slice axis is
    the last one (axial after ``Orientationd`` to RAS); spacing and affine are unchanged.

    Args:
        keys: the image key(s).
        context: ``k``, neighbours on each side (0 leaves the data as it is).
        allow_missing_keys: skip absent keys.

    Example:
        >>> NeighbourSlicesToChannelsd("image", context=1)({"image": torch.zeros(1, 64, 64, 10)})["image"].shape
        torch.Size([3, 64, 64, 10])
    """

    def __init__(self, keys: KeysCollection, context: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(context) != context or context < 0:
            raise ValueError(f"context slices must be a whole number >= 0, got {context}")
        self.context = int(context)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.context:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim != 4 or image.shape[0] != 1:
                raise ValueError(
                    f"NeighbourSlicesToChannelsd: '{key}' must be one channel of a 3D volume (1, H, W, D), "
                    f"got shape {tuple(image.shape)}"
                )
            depth = image.shape[-1]
            offsets = range(-self.context, self.context + 1)
            slices = [np.clip(np.arange(depth) + offset, 0, depth - 1) for offset in offsets]
            tensor = torch.as_tensor(image)
            stacked = torch.cat([tensor[..., torch.as_tensor(index)] for index in slices], dim=0)
            d[key] = convert_to_dst_type(stacked, image)[0]  # a MetaTensor keeps the image's meta data
        return d


def infection_classes(probability: torch.Tensor | np.ndarray, threshold: float = 0.5) -> torch.Tensor | np.ndarray:
    """The multi-class rule: infection where ``1 - p_background >= threshold``, each infected voxel the foreground
    class with the larger probability (1 ground glass, 2 consolidation; ground glass on a tie).

    Args:
        probability: channel-first class probabilities ``(C, ...)`` (a softmax), channel 0 the background.
        threshold: the infection threshold (the bundle's ``threshold``).

    Returns:
        ``(1, ...)`` labels 0..C-1, of ``probability``'s type and dtype.

    Example:
        >>> p = torch.tensor([[0.8, 0.4, 0.2], [0.1, 0.4, 0.3], [0.1, 0.2, 0.5]])  # 3 classes, 3 voxels
        >>> infection_classes(p)
        tensor([[0., 1., 2.]])
    """
    p = torch.as_tensor(probability)
    if p.ndim < 2 or p.shape[0] < 2:
        raise ValueError(f"class probabilities must be channel-first with >= 2 channels, got {tuple(p.shape)}")
    infected = (1 - p[:1]) >= threshold
    labels = (1 + torch.argmax(p[1:], dim=0, keepdim=True)) * infected
    return convert_to_dst_type(labels, probability, dtype=probability.dtype)[0]


class InfectionClassesd(MapTransform):
    """Class labels from softmax class probabilities by :func:`infection_classes` (the multi-class ``AsDiscreted``).

    A multi-class bundle's network gives background, ground-glass and consolidation probabilities; thresholding
    the infection probability ``1 - p_background`` with the bundle's ``threshold`` (as a binary bundle thresholds its
    sigmoid) and then choosing between the two foreground classes gives the same masks as multi-class inference
    (:class:`covid_monai.grid.MaskFromSourceProbabilityd` decides the same on the scan's grid), so validation and
    evaluation score what ``covid-monai infer`` writes.

    Args:
        keys: probability maps ``(C, ...)``, replaced by ``(1, ...)`` labels.
        threshold: the infection threshold.
        allow_missing_keys: skip absent keys.

    Example:
        >>> InfectionClassesd("pred", threshold=0.5)({"pred": torch.tensor([[0.8], [0.1], [0.1]])})["pred"]
        tensor([[0.]])
    """

    def __init__(self, keys: KeysCollection, threshold: float = 0.5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = infection_classes(d[key], self.threshold)
        return d


class InfectionProbabilityd(MapTransform):
    """Softmax class probabilities ``(C, ...)`` -> the infection probability ``1 - p_background`` ``(1, ...)``, the
    foreground classes' probabilities ``(C-1, ...)`` kept under ``class_key``.

    In multi-class inference the infection region is decided on the infection probability exactly as a binary
    bundle decides it on its sigmoid (threshold, lung restriction, small lesions), and the class of each infected
    voxel later, on the scan's grid, from ``class_key`` (:class:`covid_monai.grid.MaskFromSourceProbabilityd`).

    Args:
        keys: the class probabilities (channel 0 the background), replaced by the infection probability.
        class_key: where the foreground class probabilities go (channel ``c`` is label ``c + 1``).
        allow_missing_keys: skip absent keys.

    Example:
        >>> d = InfectionProbabilityd("pred")({"pred": torch.tensor([[0.7], [0.2], [0.1]])})
        >>> d["pred"].shape, d["class_probability"].shape
        (torch.Size([1, 1]), torch.Size([2, 1]))
    """

    def __init__(
        self, keys: KeysCollection, class_key: str = "class_probability", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("InfectionProbabilityd takes one key (one class_key to write)")
        self.class_key = class_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            probability = d[key]
            if probability.shape[0] < 2:
                raise ValueError(f"InfectionProbabilityd: '{key}' needs >= 2 class channels, got {probability.shape}")
            d[self.class_key] = probability[1:]
            d[key] = 1 - probability[:1]
        return d
