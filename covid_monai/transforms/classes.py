"""Multi-class bundles (``labels: multiclass``): the infection probability ``1 - p_background`` and the class
(1 ground glass, 2 consolidation) of infected voxels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

__all__ = ["InfectionClassesd", "InfectionProbabilityd", "infection_classes"]


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
