"""Slice stacks: 2.5D input, each axial slice with its neighbours as channels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

__all__ = ["NeighbourSlicesToChannelsd"]


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
