"""Post-processing of a predicted infection mask against the lung mask.

* :class:`RestrictToLungsd` -- remove predicted infection away from a (slightly dilated) lung mask.
* :class:`AddInfectionToLungsd` -- lungs include their lesions: infection next to a lung joins that lung's label.

Small connected components of a prediction are not handled here: use MONAI's
``monai.transforms.RemoveSmallObjectsd`` (``min_size`` with ``by_measure=True`` reads the threshold in mm³ and takes
the voxel size from the MetaTensor affine, or from ``pixdim=`` for plain arrays). It needs ``scikit-image`` installed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type, ensure_tuple_rep
from scipy import ndimage

from covid_monai.distance import nearest_label, within_distance
from covid_monai.parallel import map_slabs
from covid_monai.transforms.utils import _as_numpy, bounding_box, voxel_spacing

__all__ = ["AddInfectionToLungsd", "RestrictToLungsd"]


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
        lung_key: key of the lung mask ``(1, X, Y, Z)`` (any value > 0 is lung), e.g. from
            :class:`~covid_monai.transforms.LungMaskd`.
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
                return voxel_spacing(value, ndim)
        if self.pixdim is not None:
            return np.asarray(ensure_tuple_rep(self.pixdim, ndim), dtype=np.float64)
        return np.ones(ndim, dtype=np.float64)

    def _near_lungs(
        self, lungs: np.ndarray, spacing: np.ndarray, limits_mm: Sequence[float], where: np.ndarray | None = None
    ) -> list[np.ndarray]:
        """For each limit, the voxels at most that far (mm, Euclidean) from the lung mask.

        The distance transform runs on the lungs' bounding box padded by the largest limit, in slabs of the last
        axis that overlap by that limit: exact for every distance up to the limit, with memory bounded by one slab
        whatever the number of slices. Slabs run one after the other, each transform on every thread
        (:mod:`covid_monai.distance`).
        With ``where`` (the voxels whose distance matters: the prediction outside the lungs) it runs only on the
        part of that box within the largest limit of ``where``: the result is exact on ``where`` and on the lungs
        (always within every limit), which is all a prediction needs, and costs nothing when the prediction lies
        inside the lungs.
        """
        reach = max(limits_mm)
        margin = [int(math.ceil(reach / s)) + 1 for s in spacing]
        near = [lungs.copy() for _ in limits_mm]
        if where is not None and not where.any():
            return near
        box = bounding_box(lungs[None], margin=margin)
        if where is not None:  # a lung voxel within the reach of a voxel of ``where`` is inside its padded box
            around = bounding_box(where[None], margin=margin)
            box = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box, around, strict=True))
            if any(part.start >= part.stop for part in box):
                return near
        start, end = box[-1].start, box[-1].stop
        step = max(self.slab, 2 * margin[-1])

        def fill_slab(part: slice) -> None:  # writes only its own slices of ``near``
            low, high = max(start, part.start - margin[-1]), min(end, part.stop + margin[-1])
            window = (*box[:-1], slice(low, high))
            inside = within_distance(lungs[window], spacing, limits_mm)
            for out, limit in zip(near, inside, strict=True):
                out[(*box[:-1], part)] = limit[..., part.start - low : part.stop - low]

        map_slabs(fill_slab, end, step, start=start, threads=1)  # edt holds the GIL: threads would only take turns
        return near

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        lungs_value = d[self.lung_key]
        lungs = _as_numpy(lungs_value)
        if lungs.ndim == 4:
            lungs = lungs[0]
        lungs = lungs > 0
        near: list[np.ndarray] | None = None
        outside = np.zeros(lungs.shape, dtype=bool)  # predicted voxels outside the lungs, over every key
        for key in self.key_iterator(d):
            array = _as_numpy(d[key])
            if array.shape[1:] == lungs.shape:
                outside |= (array > 0).any(0)
        outside &= ~lungs
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
                    near = self._near_lungs(lungs, self._spacing(lungs_value, pred, lungs.ndim), limits, outside)
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
    its voxels outside the mask to the nearest lung (Euclidean distance in mm, within the bounding box of those
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
                    grow = outside[box]
                    lung_box[grow] = nearest_label(lung_box, voxel_spacing(lungs_value, lungs.ndim))[grow]
            d[key], *_ = convert_to_dst_type(lungs[None], lungs_value, dtype=np.uint8)
        return d
