"""Between the scan's own voxel grid and the network's grid, fast: separable resampling on the way in and back.

Inference resamples a scan to the network's spacing, reorients it and crops it to the body and lungs; the mask is
thresholded and post-processed on that small grid and only then mapped back to the scan's grid, once. Every step
on the way in (``Orientationd``, ``Spacingd`` with the scan's own directions, crops, ``Resized``) keeps each
network axis parallel to one scan axis, so the voxel-to-voxel map between the two grids is a signed permutation
with scaling plus a shift. Along such a map, nearest-neighbour (or linear) resampling separates into one gather
per axis: on a 512×512×300 scan this takes a fraction of a second and no more memory than the output, where a
general ``Invertd`` builds a full sampling grid (3.5 s and ~2 GB per map on 2 cores). Any other map (it cannot
happen with the bundle's transforms) falls back to MONAI's ``SpatialResample``.

Voxels of the scan that fall outside the network's grid (cropped away) get 0. On the way in,
:class:`SeparableSpacingd` lets MONAI's ``Spacingd`` decide the grid and carries the resampling out the same way,
slab by slab. Slabs run on as many threads as PyTorch uses (numpy's gathers release the GIL).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import AFFINE_TOL
from monai.transforms import MapTransform, Spacingd, SpatialResample
from monai.utils import ensure_tuple_rep, get_equivalent_dtype
from scipy import ndimage

from covid_monai._private_api import PendingResampling, pending_resampling, spacing_resample, with_operations
from covid_monai.parallel import map_slabs
from covid_monai.transforms import bounding_box

__all__ = [
    "MaskFromSourceProbabilityd",
    "RecordSourceGridd",
    "SeparableSpacingd",
    "ToSourceGridd",
    "resample_in_slabs",
    "resample_separable",
    "to_source_grid",
]


def _axis_map(matrix: np.ndarray, tol: float = 1e-6) -> list[int] | None:
    """For a 3x3 target-to-source voxel matrix, the source axis of each target axis, or None if not separable."""
    scale = np.abs(matrix).max()
    if not np.isfinite(matrix).all() or scale == 0:
        return None
    nonzero = np.abs(matrix) > tol * scale
    if not (nonzero.sum(axis=0) == 1).all() or not (nonzero.sum(axis=1) == 1).all():
        return None
    return [int(np.flatnonzero(nonzero[:, j])[0]) for j in range(3)]


def resample_separable(
    array: np.ndarray,
    target_to_source: np.ndarray,
    shape: Sequence[int],
    mode: str = "nearest",
    padding: str = "zeros",
) -> np.ndarray | None:
    """Resample a channel-first ``(C, X, Y, Z)`` array onto a grid of ``shape`` through an axis-aligned voxel map.

    Args:
        array: the values on the source grid.
        target_to_source: 4x4 matrix taking target voxel indices to (fractional) source voxel indices.
        shape: spatial shape of the target grid.
        mode: ``nearest`` (labels, masks) or ``linear`` (probabilities, images).
        padding: ``zeros`` (target voxels outside the source get 0) or ``border`` (they get the nearest edge value).

    Returns:
        ``(C, *shape)`` array of ``array``'s dtype, or ``None`` when the map is not a signed permutation with
        scaling (the caller must resample another way).

    Example:
        >>> m = np.diag([0.5, 0.5, 1.0, 1.0])  # the target has twice the in-plane resolution
        >>> resample_separable(np.arange(4.0).reshape(1, 2, 2, 1), m, (4, 4, 1))[0, :, :, 0]
        array([[0., 0., 1., 1.],
               [0., 0., 1., 1.],
               [2., 2., 3., 3.],
               [2., 2., 3., 3.]])
    """
    if mode not in ("nearest", "linear"):
        raise ValueError(f"mode must be 'nearest' or 'linear', got {mode!r}")
    if padding not in ("zeros", "border"):
        raise ValueError(f"padding must be 'zeros' or 'border', got {padding!r}")
    matrix = np.asarray(target_to_source, dtype=np.float64)
    source_axes = _axis_map(matrix[:3, :3])
    if source_axes is None:
        return None
    # bring the source axes into target order, then gather along one axis at a time, the most shrinking axis
    # first (a slab of the target touches a slab of the source: the temporaries stay slab-sized)
    out = np.transpose(array, [0] + [a + 1 for a in source_axes])
    for j in sorted(range(len(shape)), key=lambda j: shape[j] / max(out.shape[j + 1], 1)):
        i = source_axes[j]
        coords = matrix[i, j] * np.arange(shape[j], dtype=np.float64) + matrix[i, 3]
        out = _gather(out, j + 1, coords, mode, padding)
    return np.ascontiguousarray(out)


def _gather(array: np.ndarray, axis: int, coords: np.ndarray, mode: str, padding: str = "zeros") -> np.ndarray:
    """Values of ``array`` at fractional positions ``coords`` along ``axis`` (0 or the edge value outside)."""
    n = array.shape[axis]
    shape = [1] * array.ndim
    shape[axis] = len(coords)
    if mode == "nearest":
        index = np.floor(coords + 0.5).astype(np.int64)
        inside = (index >= 0) & (index < n)
        out = np.take(array, np.clip(index, 0, n - 1), axis=axis)
        if padding == "zeros" and not inside.all():
            out *= inside.reshape(shape).astype(out.dtype)
        return out
    low = np.floor(coords).astype(np.int64)
    weight = (coords - low).astype(np.float32)
    # positions beyond the last sample by up to half a voxel keep the edge value (no dark rim from padding)
    inside = (coords > -0.5) & (coords < n - 0.5)
    a = np.take(array, np.clip(low, 0, n - 1), axis=axis).astype(np.float32, copy=False)
    b = np.take(array, np.clip(low + 1, 0, n - 1), axis=axis).astype(np.float32, copy=False)
    b -= a
    b *= weight.reshape(shape)
    a += b
    if padding == "zeros" and not inside.all():
        a *= inside.reshape(shape).astype(np.float32)
    return a.astype(array.dtype, copy=False)


def _shifted(target_to_source: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """The voxel map of the sub-grid of the target that starts at voxel ``start``."""
    shift = np.eye(4)
    shift[:3, 3] = start
    return np.asarray(target_to_source, dtype=np.float64) @ shift


def _on_grid(values: np.ndarray, affine: np.ndarray, like: MetaTensor) -> MetaTensor:
    """``values`` as a MetaTensor on the grid ``affine``, carrying ``like``'s other meta data (a copy)."""
    meta = {k: deepcopy(v) for k, v in like.meta.items() if k not in ("affine", "spatial_shape")}
    meta["spatial_shape"] = np.asarray(values.shape[1:])
    return MetaTensor(torch.from_numpy(values), affine=torch.as_tensor(affine), meta=meta)


def resample_in_slabs(
    array: np.ndarray,
    target_to_source: np.ndarray,
    shape: Sequence[int],
    mode: str = "nearest",
    padding: str = "zeros",
    slab: int = 32,
) -> np.ndarray | None:
    """:func:`resample_separable` filling the target ``slab`` slices of its last axis at a time.

    The temporaries are those of one slab per thread (slabs run side by side,
    :func:`~covid_monai.parallel.map_slabs`), so the memory beyond the source and the output does not grow with
    the number of slices.

    Args:
        array, target_to_source, shape, mode, padding: as for :func:`resample_separable`.
        slab: target slices per step.

    Returns:
        ``(C, *shape)`` array, or ``None`` when the map is not separable.
    """
    matrix = np.asarray(target_to_source, dtype=np.float64)
    if _axis_map(matrix[:3, :3]) is None:
        return None
    out = np.empty((array.shape[0], *shape), dtype=array.dtype)

    def fill_slab(part: slice) -> None:  # writes only its own slices of ``out``
        start = [0] * (len(shape) - 1) + [part.start]
        out[..., part] = resample_separable(
            array, _shifted(matrix, start), (*shape[:-1], part.stop - part.start), mode, padding
        )

    map_slabs(fill_slab, shape[-1], slab)
    return out


class SeparableSpacingd(Spacingd):
    """MONAI's ``Spacingd``, carried out by separable gathers, slab by slab, when its resampling is axis-aligned.

    ``Spacingd`` decides the output grid (affine, shape) and records the operation as usual, lazily; when the map
    from the output voxels to the input voxels keeps every axis parallel to one input axis (after ``Orientationd``,
    and with ``pixdim`` ``-1`` or any spacing on an unrotated scan) a bilinear float32 resampling is done with
    :func:`resample_in_slabs` (``border`` padding, the default; the same values to float rounding). Any other case
    (nearest, whose ties torch rounds to even, other paddings or dtypes, oblique maps, and a grid within
    ``AFFINE_TOL`` of the scan's, which eager ``Spacingd`` keeps as it is) goes through MONAI's own resampling. No
    full sampling grid is built: the memory beyond input and output is one slab's per thread.

    Args:
        slab: output slices per step.
        Others: as for ``monai.transforms.Spacingd`` (``lazy`` is not supported: the transform always resamples).
    """

    def __init__(self, *args: Any, slab: int = 32, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slab = max(int(slab), 1)

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, Any]:
        """Resample each key to the grid ``Spacingd`` chooses."""
        d = super().__call__(data, lazy=True)
        for key, mode, padding, align, dtype, scale_extent in self.key_iterator(
            d, self.mode, self.padding_mode, self.align_corners, self.dtype, self.scale_extent
        ):
            pending = pending_resampling(d[key])
            if pending is None:
                continue
            resampled = self._separable(d[key], pending, str(mode), str(padding), dtype)
            if resampled is None:  # MONAI's own resampling (and its shortcut for a near-identical grid)
                resampled = spacing_resample(
                    self, data[key], mode=mode, padding_mode=padding, align_corners=align, dtype=dtype,
                    scale_extent=scale_extent,
                )
            d[key] = resampled
        return d

    def _separable(
        self, image: MetaTensor, pending: PendingResampling, mode: str, padding: str, dtype: Any
    ) -> MetaTensor | None:
        """The pending resampling done by separable gathers, or ``None`` where MONAI must do it."""
        source_affine = np.asarray(image.affine, dtype=np.float64)
        target_affine, shape = pending.affine, pending.shape
        matrix = np.linalg.solve(source_affine, target_affine)
        float32 = get_equivalent_dtype(dtype, torch.Tensor) == torch.float32
        near_identity = shape == tuple(image.shape[1:]) and (  # eager Spacingd keeps such a scan as it is
            np.allclose(source_affine, target_affine, atol=AFFINE_TOL)
            or np.allclose(matrix, np.eye(4), atol=AFFINE_TOL)
        )
        if len(pending.operations) != 1 or mode != "bilinear" or padding != "border" or not float32 or near_identity:
            return None
        array = image.detach().cpu().numpy().astype(np.float32, copy=False)
        out = resample_in_slabs(array, matrix, shape, "linear", padding, self.slab)
        if out is None:
            return None
        return with_operations(_on_grid(out, target_affine, image), image, pending.operations)


class RecordSourceGridd(MapTransform):
    """Remember the scan's voxel grid (affine and spatial shape) under ``name`` before any resampling.

    Args:
        keys: the image key (one), a channel-first MetaTensor.
        name: the key that receives ``{"affine": 4x4 float64, "shape": (X, Y, Z)}``.
    """

    def __init__(self, keys: KeysCollection, name: str = "source_grid") -> None:
        super().__init__(keys)
        self.name = name

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the grid of the first key's image to the data."""
        d = dict(data)
        key = self.first_key(d)
        image = d[key]
        if not isinstance(image, MetaTensor):
            raise ValueError(f"RecordSourceGridd needs a MetaTensor '{key}' (its affine), got {type(image).__name__}.")
        # a copy, never a view of the affine tensor: a DataLoader worker moves every tensor it sends into shared
        # memory (``share_memory_`` frees the old buffer), so a view would be pickled from freed memory
        d[self.name] = {
            "affine": image.affine.detach().cpu().numpy().astype(np.float64, copy=True),
            "shape": tuple(int(s) for s in image.shape[1:]),
        }
        return d


class ToSourceGridd(MapTransform):
    """Map channel-first MetaTensors from the network's grid back to the grid recorded by :class:`RecordSourceGridd`.

    Args:
        keys: maps to bring back (masks, lung labels, probabilities), each a MetaTensor with its grid's affine.
        mode: ``nearest`` or ``linear``, one for all keys or one per key.
        grid_key: where :class:`RecordSourceGridd` put the scan's grid.
        allow_missing_keys: skip keys that are absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str | Sequence[str] = "nearest",
        grid_key: str = "source_grid",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.grid_key = grid_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each key's map by its resampling onto the scan's grid (affine and shape of the scan)."""
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = to_source_grid(d[key], d[self.grid_key], mode)
        return d


def to_source_grid(value: MetaTensor, grid: Mapping[str, Any], mode: str = "nearest") -> MetaTensor:
    """Resample a channel-first MetaTensor onto the grid recorded by :class:`RecordSourceGridd`.

    Args:
        value: the map on its own grid (its affine says where).
        grid: ``{"affine": 4x4, "shape": (X, Y, Z)}`` of the scan.
        mode: ``nearest`` or ``linear``.

    Returns:
        A MetaTensor with the scan's affine and shape and ``value``'s dtype and other meta data.
    """
    target_affine = np.asarray(grid["affine"], dtype=np.float64)
    shape = tuple(grid["shape"])
    source_affine = np.asarray(value.affine.detach().cpu().numpy(), dtype=np.float64)
    array = value.detach().cpu().numpy()
    out = resample_separable(array, np.linalg.solve(source_affine, target_affine), shape, mode)
    if out is None:
        resampled = SpatialResample(mode="nearest" if mode == "nearest" else "bilinear", padding_mode="zeros")(
            value, dst_affine=torch.as_tensor(target_affine), spatial_size=shape
        )
        out = resampled.detach().cpu().numpy().astype(array.dtype, copy=False)
    return _on_grid(out, target_affine, value)


class MaskFromSourceProbabilityd(MapTransform):
    """The final mask on the scan's grid: the probability, mapped back linearly, thresholded there, inside the region
    of the mask post-processed on the network grid (dilated by one network voxel).

    Thresholding a smoothly interpolated probability keeps lesion borders at the scan's resolution (mapping a mask
    thresholded on the coarser or offset network grid loses up to 0.007 Dice on the demo phantoms), while every
    decision of the post-processing (components outside the lungs, small lesions) made on the network grid holds.

    The scan's grid is filled ``slab`` slices at a time and the probability is interpolated only inside the box of
    the kept region in each slab (slabs side by side on PyTorch's thread count), so the memory beyond the uint8 output
    stays that of one slab per thread whatever the number of slices. The probability key stays on the network grid
    (:func:`to_source_grid` maps it back when it is saved).

    Multi-class bundles: with ``class_key`` (the foreground class probabilities, channel ``c`` for label ``c + 1``,
    e.g. from :class:`covid_monai.transforms.InfectionProbabilityd`) each voxel of the mask gets the label of the
    class whose probability, mapped back linearly, is the largest there (1 ground glass, 2 consolidation; the lower
    label on a tie), so class borders too keep the scan's resolution.

    Args:
        keys: post-processed masks on the network grid (``(1, X, Y, Z)``, > 0 is foreground).
        probability_key: the probability map on the network grid (the infection probability).
        threshold: probability threshold (the bundle's ``threshold``).
        grid_key: where :class:`RecordSourceGridd` put the scan's grid.
        slab: slices of the scan's last axis filled at a time.
        class_key: foreground class probabilities on the network grid (``(K, X, Y, Z)``); ``None``: a 0/1 mask.
    """

    def __init__(
        self,
        keys: KeysCollection,
        probability_key: str = "probability",
        threshold: float = 0.5,
        grid_key: str = "source_grid",
        allow_missing_keys: bool = False,
        slab: int = 32,
        class_key: str | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.probability_key = probability_key
        self.threshold = float(threshold)
        self.grid_key = grid_key
        self.slab = max(int(slab), 1)
        self.class_key = class_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each mask by ``probability >= threshold`` within its dilated region, on the scan's grid (labelled
        by the largest class probability when ``class_key`` is set)."""
        d = dict(data)
        grid = d[self.grid_key]
        target_affine = np.asarray(grid["affine"], dtype=np.float64)
        probability = d[self.probability_key]
        classes = d[self.class_key] if self.class_key is not None else None
        for key in self.key_iterator(d):
            mask = d[key]
            region = MetaTensor(torch.from_numpy(_dilate_by_one(mask.detach().cpu().numpy() > 0).astype(np.uint8)),
                                meta=mask.meta)  # the meta holds the affine
            out = self._threshold_in_slabs(probability, region, target_affine, tuple(grid["shape"]), classes)
            d[key] = _on_grid(out, target_affine, mask)
        return d

    def _threshold_in_slabs(
        self,
        probability: MetaTensor,
        region: MetaTensor,
        target_affine: np.ndarray,
        shape: tuple[int, ...],
        classes: MetaTensor | None = None,
    ) -> np.ndarray:
        """``(C, *shape)`` uint8: probability above the threshold where the region maps, one slab at a time; with
        ``classes``, the label ``1 + argmax`` of the class probabilities there instead of 1."""
        to_probability = np.linalg.solve(np.asarray(probability.affine, dtype=np.float64), target_affine)
        to_region = np.linalg.solve(np.asarray(region.affine, dtype=np.float64), target_affine)
        to_classes = None if classes is None else np.linalg.solve(np.asarray(classes.affine, np.float64), target_affine)
        if (
            _axis_map(to_probability[:3, :3]) is None
            or _axis_map(to_region[:3, :3]) is None
            or (to_classes is not None and _axis_map(to_classes[:3, :3]) is None)
        ):
            grid = {"affine": target_affine, "shape": shape}
            above = to_source_grid(probability, grid, "linear").numpy()
            inside = to_source_grid(region, grid, "nearest").numpy()
            out = ((above >= self.threshold) & (inside > 0)).astype(np.uint8)
            if classes is not None:
                out *= _largest_class(to_source_grid(classes, grid, "linear").numpy())
            return out
        values = probability.detach().cpu().numpy()
        kept = region.detach().cpu().numpy()
        class_values = None if classes is None else classes.detach().cpu().numpy()
        out = np.zeros((max(values.shape[0], kept.shape[0]), *shape), dtype=np.uint8)

        def fill_slab(part: slice) -> None:  # writes only its own slices of ``out``
            start = [0] * (len(shape) - 1) + [part.start]
            inside = resample_separable(
                kept, _shifted(to_region, start), (*shape[:-1], part.stop - part.start), "nearest"
            )
            if not inside.any():
                return
            box = bounding_box(inside)
            corner = [a + b.start for a, b in zip(start, box, strict=True)]
            size = [b.stop - b.start for b in box]
            above = resample_separable(values, _shifted(to_probability, corner), size, "linear") >= self.threshold
            target = (slice(None), *box[:-1], slice(part.start + box[-1].start, part.start + box[-1].stop))
            out[target] = above & (inside[(slice(None), *box)] > 0)
            if class_values is not None and to_classes is not None:
                scores = resample_separable(class_values, _shifted(to_classes, corner), size, "linear")
                out[target] *= _largest_class(scores)

        map_slabs(fill_slab, shape[-1], self.slab)
        return out


def _largest_class(class_probability: np.ndarray) -> np.ndarray:
    """``(1, ...)`` uint8 label ``1 + argmax`` over the channels of ``(K, ...)`` foreground class probabilities."""
    return (1 + np.argmax(class_probability, axis=0)[None]).astype(np.uint8)


def _dilate_by_one(mask: np.ndarray) -> np.ndarray:
    """Per channel, the mask grown by one voxel (26-neighbourhood), computed on its bounding box only."""
    out = np.zeros_like(mask)
    structure = np.ones((3, 3, 3), dtype=bool)
    for c in range(mask.shape[0]):
        if mask[c].any():
            box = bounding_box(mask[c : c + 1], margin=1)
            out[c][box] = ndimage.binary_dilation(mask[c][box], structure=structure)
    return out
