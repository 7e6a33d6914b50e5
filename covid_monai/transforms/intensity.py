"""Intensity normalisation of CT for the network: per volume, or fixed from the HU window (the bundle knob
``intensity_normalization``)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.config import KeysCollection
from monai.transforms import NormalizeIntensityd

__all__ = ["INTENSITY_NORMALIZATIONS", "intensity_normalization"]

INTENSITY_NORMALIZATIONS: tuple[str, ...] = ("volume", "window")
"""``volume``: zero mean and unit variance over each (cropped) volume; ``window``: the HU window mapped linearly to
[-1, 1], the same for every scan."""


def intensity_normalization(keys: KeysCollection, mode: str, hu_window: Sequence[float]) -> NormalizeIntensityd:
    """MONAI's ``NormalizeIntensityd`` set up for one of :data:`INTENSITY_NORMALIZATIONS`.

    ``volume`` z-scores each volume by its own statistics, which absorbs scanner calibration and 8-bit windowing but
    makes a voxel's value depend on how much of the scan is lung, body or lesion. ``window`` keeps HU absolute:
    ``(hu - centre) / half_width`` of the (already clipped) HU window, so -1 and +1 are the window's ends on every scan.

    Args:
        keys: the image key(s).
        mode: ``"volume"`` or ``"window"``.
        hu_window: ``[low, high]`` HU the image was clipped to.

    Returns:
        The transform.

    Raises:
        ValueError: an unknown ``mode``, or a window whose high end is not above its low end.

    Example:
        >>> import torch
        >>> t = intensity_normalization("image", "window", [-1250, 250])
        >>> float(t({"image": torch.tensor([-1250.0, -500.0, 250.0])})["image"][1])
        0.0
    """
    if mode not in INTENSITY_NORMALIZATIONS:
        raise ValueError(f"intensity_normalization must be one of {', '.join(INTENSITY_NORMALIZATIONS)}, got {mode!r}")
    if mode == "volume":
        return NormalizeIntensityd(keys=keys)
    low, high = (float(v) for v in hu_window)
    if not high > low:
        raise ValueError(f"hu_window must be [low, high] with high > low, got {list(hu_window)}")
    return NormalizeIntensityd(keys=keys, subtrahend=(low + high) / 2, divisor=(high - low) / 2)
