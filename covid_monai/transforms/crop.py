"""Cropping to the body or the lungs: a foreground test that never selects nothing, margins in millimetres."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import CropForegroundd
from monai.utils import ensure_tuple_rep

from covid_monai.transforms.utils import voxel_spacing

__all__ = ["AboveOrAll", "CropForegroundMMd"]


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
        spacing = voxel_spacing(source, ndim)
        margins = ensure_tuple_rep(self.margin_mm, ndim)
        self.cropper.margin = [
            int(math.ceil(float(m) / max(float(s), 1e-6))) for m, s in zip(margins, spacing, strict=True)
        ]
        return super().__call__(data, lazy)
