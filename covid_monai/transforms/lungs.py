"""The lung mask as a transform: :func:`covid_monai.lungs.lung_mask_from_hu` on a loaded scan."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple, ensure_tuple_rep

from covid_monai.lungs import lung_mask_from_hu

__all__ = ["LungMaskd"]


class LungMaskd(MapTransform):
    """Add a left/right lung mask computed from the HU image (:func:`~covid_monai.lungs.lung_mask_from_hu`) as a new
    key.

    Place it on the HU image (after loading, channel-first, before any intensity normalisation). The mask has the
    image's shape (including the channel dimension), its affine and its meta data (a copy), dtype uint8, labels
    0 background / 1 left lung / 2 right lung.

    Args:
        keys: image key(s); each image is a channel-first ``(1, X, Y, Z)`` MetaTensor (its affine places the voxels).
        output_keys: key(s) to write the masks to, one per image key. Default ``"lungs"``.
        body_threshold: see :func:`~covid_monai.lungs.lung_mask_from_hu`.
        lung_threshold: see :func:`~covid_monai.lungs.lung_mask_from_hu`.
        min_lung_ml: see :func:`~covid_monai.lungs.lung_mask_from_hu`.
        closing_mm: see :func:`~covid_monai.lungs.lung_mask_from_hu`.
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
            if not isinstance(image, MetaTensor):
                raise ValueError(f"LungMaskd needs a MetaTensor '{key}' (its affine), got {type(image).__name__}.")
            if image.ndim != 4 or image.shape[0] != 1:
                raise ValueError(
                    f"LungMaskd expects a channel-first (1, X, Y, Z) image '{key}', got {tuple(image.shape)}."
                )
            affine = np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64)
            mask = lung_mask_from_hu(image.detach().cpu().numpy()[0], affine, **self.kwargs)[None]
            out = MetaTensor(
                torch.from_numpy(mask), meta=deepcopy(image.meta), applied_operations=deepcopy(image.applied_operations)
            )
            out.affine = image.affine.clone()
            d[out_key] = out
        return d
