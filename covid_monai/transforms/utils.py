"""Helpers the transforms share: the bounding box of a mask, arrays from tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms.utils import generate_spatial_bounding_box

__all__ = ["bounding_box"]


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



def _as_numpy(value: Any) -> np.ndarray:
    """A tensor's (or array-like's) values as a numpy array, without a copy where the data already lie on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
