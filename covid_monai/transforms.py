"""Custom MONAI transforms for COVID-19 chest CT: only what MONAI itself lacks.

* :func:`lung_mask_from_hu` -- a classical, model-free left/right lung mask from Hounsfield units.
* :class:`LungMaskd` -- dictionary transform that adds that lung mask as a new key, with the image's meta data.
* :class:`RestrictToLungsd` -- zero a prediction outside a (slightly dilated) lung mask.

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
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, ensure_tuple, ensure_tuple_rep
from nibabel.orientations import io_orientation
from scipy import ndimage

__all__ = ["LEFT_LUNG", "RIGHT_LUNG", "lung_mask_from_hu", "LungMaskd", "RestrictToLungsd"]

LEFT_LUNG = 1
"""Label of the patient's left lung (as in the COVID-19-CT-Seg lung masks)."""
RIGHT_LUNG = 2
"""Label of the patient's right lung."""

# A connected air component that has at least this fraction of its voxels on each side of the body's
# mid-sagittal plane is taken to be both lungs joined (through the trachea / main bronchi or a thin junction line).
_JOINED_SIDE_FRACTION = 0.2
# The split plane of joined lungs is searched within this fraction of the body width around the body centre.
_SPLIT_SEARCH_FRACTION = 0.12
# A second air component smaller than this fraction of the largest is not a lung (e.g. gastric gas when one lung is
# not aerated at all).
_MIN_SECOND_FRACTION = 0.1
# Voxel size (mm) of the coarse grid used for the morphological closing.
_COARSE_MM = 2.0


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis: the norms of the affine's columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _axial_structure() -> np.ndarray:
    """3D structuring element connecting voxels in the same axial slice only (axial axis last)."""
    st = np.zeros((3, 3, 3), dtype=bool)
    st[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return st


def _fill_holes_axial(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (axial axis last): background not connected in-plane to the slice border."""
    background, n = ndimage.label(~mask, structure=_axial_structure())
    if n == 0:
        return mask
    border = np.concatenate(
        [background[0].ravel(), background[-1].ravel(), background[:, 0].ravel(), background[:, -1].ravel()]
    )
    outside = np.zeros(n + 1, dtype=bool)
    outside[np.unique(border)] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[background]


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


def lung_mask_from_hu(
    image: np.ndarray,
    affine: np.ndarray,
    body_threshold: float = -500.0,
    lung_threshold: float = -320.0,
    min_lung_ml: float = 20.0,
    closing_mm: float = 15.0,
) -> np.ndarray:
    """Left/right lung mask of a chest CT in Hounsfield units, by thresholds and morphology (no model).

    The method:

    1. body = the largest 6-connected 3D component above ``body_threshold``, holes filled slice by slice (axial);
    2. lung candidates = air below ``lung_threshold`` inside the filled body. These are the body's in-plane holes, so
       air outside the patient, the gap to the table and anything touching the in-plane volume border are excluded;
    3. candidates smaller than ``min_lung_ml`` are dropped (bowel gas, small airways) and the two largest are kept
       (the second only if it has at least 10 % of the voxels of the largest). If the largest one has at least 20 %
       of its voxels on each side of the body's mid-sagittal plane, the lungs are joined (trachea, main bronchi,
       anterior junction line): it is split at the sagittal plane with the smallest cross-section near the body
       centre, and the two halves are the lungs;
    4. each lung is closed with a ball of radius ``closing_mm`` and its holes are filled slice by slice, so vessels,
       ground glass (-700...-300 HU) and consolidation (~0 HU) inside the lung or in a dent of its border become
       part of it. The closing runs on a ~2 mm grid (max-pooled, distance transforms) and adds only the coarse voxels
       that held no lung voxel, so the fine lung border elsewhere is unchanged;
    5. left/right is decided in world space: the lung whose centroid has the smaller world x (RAS+, patient left is
       -x) is the left lung. A single lung is labelled by the side of the body centroid it lies on.

    Any storage orientation works (the axial axis and the left-right axis are read from the affine with
    ``nibabel.orientations.io_orientation``), and so does a volume with few slices (a lung that reaches the first or
    last slice is taken to continue beyond it, so the closing does not erode it there).

    Limitations (it is a heuristic): the trachea and main bronchi stay part of the lungs where joined to them; the
    closing also fills concavities of the mediastinal surface (hilum) narrower than about ``2 * closing_mm``; a
    consolidation at the pleura is restored up to a rim of a few mm where it meets the chest wall (keep a margin, as
    :class:`RestrictToLungsd` does) and only partly when it is wider than about ``2 * closing_mm``; air enclosed
    between the body and a table that touches it is a candidate like any other (it is usually smaller than a lung).

    Args:
        image: 3D CT volume in HU, in storage order (the array as stored in the file).
        affine: 4x4 voxel-to-world (RAS+, mm) affine of ``image``.
        body_threshold: HU above which a voxel is body tissue.
        lung_threshold: HU below which a voxel inside the body is lung air.
        min_lung_ml: smallest air component (mL) that may be a lung.
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
    inverse = np.argsort(order)
    work = np.transpose(image, order)  # (lr, ap, si): axial axis last
    spacing = _spacing(affine)[order]
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0

    # 1. body
    body = _largest_component(work > body_threshold)
    if not body.any():
        return out
    body = _fill_holes_axial(body)
    lr_profile = body.sum(axis=(1, 2), dtype=np.int64)
    lr_index = np.arange(work.shape[0])
    body_centre = float((lr_profile * lr_index).sum() / lr_profile.sum())
    body_extent = np.flatnonzero(lr_profile)
    body_width = float(body_extent[-1] - body_extent[0] + 1)

    # 2. air inside the body (= holes of the body outline, never touching the in-plane border)
    air = body
    air &= work < lung_threshold
    labels, n = ndimage.label(air)
    del air, body
    if n == 0:
        return out
    sizes, boxes = _component_sizes(labels, n)
    min_voxels = min_lung_ml / voxel_ml if voxel_ml > 0 else 0.0
    candidates = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] >= max(min_voxels, 1)]
    if not candidates:
        return out

    # 3. one or two lungs: list of (bounding box, boolean mask within the box)
    first = candidates[0]
    box = boxes[first]
    comp = labels[box] == first + 1
    idx = np.arange(box[0].start, box[0].stop)
    profile = comp.sum(axis=(1, 2), dtype=np.int64)
    low_side = profile[idx < body_centre].sum() / profile.sum()
    lungs: list[tuple[tuple[slice, ...], np.ndarray]] = []
    if min(low_side, 1.0 - low_side) >= _JOINED_SIDE_FRACTION:
        half = max(1, int(round(_SPLIT_SEARCH_FRACTION * body_width)))
        window = (idx >= body_centre - half) & (idx <= body_centre + half)
        window_idx = np.flatnonzero(window)
        if window_idx.size == 0:  # degenerate: split at the centre
            plane = int(np.searchsorted(idx, body_centre))
        else:
            costs = profile[window_idx] + 1e-6 * np.abs(idx[window_idx] - body_centre)
            plane = int(window_idx[np.argmin(costs)])
        for part in (slice(0, plane), slice(plane, comp.shape[0])):
            sub = np.zeros_like(comp)
            sub[part] = comp[part]
            if sub.any():
                lungs.append((box, sub))
    else:
        lungs.append((box, comp))
        if len(candidates) > 1 and sizes[candidates[1]] >= _MIN_SECOND_FRACTION * sizes[first]:
            second = candidates[1]
            lungs.append((boxes[second], labels[boxes[second]] == second + 1))
    del labels

    # 5. left / right in world coordinates
    def world_x(box: tuple[slice, ...], centroid: Sequence[float]) -> float:
        ijk_work = np.array([c + b.start for c, b in zip(centroid, box, strict=True)], dtype=np.float64)
        ijk = ijk_work[inverse]
        return float(affine[0, :3] @ ijk + affine[0, 3])

    xs = [world_x(b, ndimage.center_of_mass(m)) for b, m in lungs]
    if len(lungs) == 2:
        names = [LEFT_LUNG, RIGHT_LUNG] if xs[0] < xs[1] else [RIGHT_LUNG, LEFT_LUNG]
    else:
        centre = [body_centre, (work.shape[1] - 1) / 2.0, (work.shape[2] - 1) / 2.0]
        body_x = world_x((slice(0, None),) * 3, centre)
        names = [LEFT_LUNG if xs[0] < body_x else RIGHT_LUNG]

    # 4. closing on a coarse grid + slice-wise hole filling, per lung; each lung's own voxels are written first so
    # that what the closing adds to one lung never takes voxels of the other
    out_work = np.transpose(out, order)  # a view: writing into it writes into ``out``
    factors = [max(1, int(round(_COARSE_MM / s))) if s > 0 else 1 for s in spacing]
    filled = []
    for box, mask in lungs:
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
        filled.append((crop, _fill_holes_axial(fine)))
    for (box, mask), name in zip(lungs, names, strict=True):
        out_work[box][mask] = name
    for (crop, fine), name in zip(filled, names, strict=True):
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
    whole when it touches the dilated lung mask and removed otherwise: a consolidation at the chest wall, which an
    HU-threshold lung mask cuts because it is as dense as the wall, stays complete, while false positives in the
    body wall, the heart or the bowel go. ``mode="voxels"`` zeroes every voxel outside the dilated mask. The
    dilation is Euclidean in mm, using the voxel size of the lung mask (MetaTensor affine), else of the prediction,
    else ``pixdim``.

    Args:
        keys: prediction key(s), channel-first ``(C, X, Y, Z)`` arrays or tensors.
        lung_key: key of the lung mask ``(1, X, Y, Z)`` (any value > 0 is lung), e.g. written by :class:`LungMaskd`.
        margin_mm: dilation of the lung mask in mm before masking (0: no dilation).
        mode: ``"components"`` (keep whole components that touch the lungs) or ``"voxels"``.
        pixdim: voxel size (mm) when neither the lung mask nor the prediction is a MetaTensor.
        empty_lungs: what to do when the lung mask is empty: ``"keep"`` the prediction unchanged (and warn; an
            empty mask is far more often a failed lung mask than a scan without lungs) or ``"zero"`` it.
        allow_missing_keys: don't raise when a key is missing.

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
        pixdim: Sequence[float] | None = None,
        empty_lungs: str = "keep",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in ("components", "voxels"):
            raise ValueError(f"mode must be 'components' or 'voxels', got {mode!r}.")
        self.mode = mode
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

    def _allowed(self, lungs: np.ndarray, spacing: np.ndarray) -> np.ndarray:
        """The lung mask dilated by ``margin_mm`` (distance transform on the padded bounding box only)."""
        if self.margin_mm == 0:
            return lungs
        box = ndimage.find_objects(lungs.astype(np.uint8))[0]
        margin = [int(math.ceil(self.margin_mm / s)) + 1 for s in spacing]
        crop = tuple(
            slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(box, margin, lungs.shape, strict=True)
        )
        allowed = np.zeros_like(lungs)
        allowed[crop] = ndimage.distance_transform_edt(~lungs[crop], sampling=spacing) <= self.margin_mm
        return allowed

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        lungs_value = d[self.lung_key]
        lungs = _as_numpy(lungs_value)
        if lungs.ndim == 4:
            lungs = lungs[0]
        lungs = lungs > 0
        allowed: np.ndarray | None = None
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
                allowed = lungs
            elif allowed is None:
                allowed = self._allowed(lungs, self._spacing(lungs_value, pred, lungs.ndim))
            keep = allowed[None] if self.mode == "voxels" else _components_touching(array > 0, allowed)
            if isinstance(pred, torch.Tensor):
                d[key] = pred * torch.as_tensor(keep, device=pred.device).to(pred.dtype)
            else:
                d[key] = array * keep.astype(array.dtype)
        return d


def _components_touching(pred: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per channel, the 26-connected components of ``pred`` that have at least one voxel in ``region``."""
    keep = np.zeros(pred.shape, dtype=bool)
    structure = np.ones((3,) * region.ndim, dtype=bool)
    for c in range(pred.shape[0]):
        labels, n = ndimage.label(pred[c], structure=structure)
        if n:
            touching = np.unique(labels[region & (labels > 0)])
            keep[c] = np.isin(labels, touching[touching > 0])
    return keep
