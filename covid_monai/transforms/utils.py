"""Helpers the transforms share: the bounding box of a mask, the voxel size of a value, arrays from tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms.utils import generate_spatial_bounding_box

__all__ = ["bounding_box", "voxel_spacing"]


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



def voxel_spacing(value: Any, ndim: int) -> np.ndarray:
    """Voxel size (mm, float64) of the last ``ndim`` axes: from a MetaTensor's affine, 1 per axis for other values.

    Example:
        >>> voxel_spacing(MetaTensor(torch.zeros(1, 2, 2), affine=torch.diag(torch.tensor([0.5, 2.0, 1.0, 1.0]))), 2)
        array([0.5, 2. ])
    """
    if isinstance(value, MetaTensor):
        return np.asarray(affine_to_spacing(value.affine, r=ndim), dtype=np.float64)
    return np.ones(ndim, dtype=np.float64)


def _as_numpy(value: Any) -> np.ndarray:
    """A tensor's (or array-like's) values as a numpy array, without a copy where the data already lie on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
