"""Input validation: refuse what cannot be a CT volume before any work is spent on it."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from covid_monai.preflight import DEFAULT_MAX_VOXELS

__all__ = ["ValidateCTd"]


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
        max_voxels: int = DEFAULT_MAX_VOXELS,
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
