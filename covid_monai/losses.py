"""The training loss the bundle's ``loss_name`` knob names, built alone (the config does not build the others)."""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceFocalLoss, DiceLoss

__all__ = ["LOSS_NAMES", "segmentation_loss"]

LOSS_NAMES = ("bce", "dice", "dicece", "dicefocal")
"""The values of the ``loss_name`` knob."""


def segmentation_loss(
    name: str,
    multiclass: bool = False,
    batch: bool = True,
    deep_supervision: int = 0,
    background: bool = True,
) -> torch.nn.Module:
    """The loss ``name`` on the network's logits.

    The Dice terms use a smoothing of 1 (an empty slice with an empty prediction scores 0 loss) and sigmoid for a
    binary network, softmax with one-hot labels for a multi-class one.

    Args:
        name: ``bce`` (binary cross-entropy, binary networks only), ``dice``, ``dicece`` (Dice + cross-entropy) or
            ``dicefocal`` (Dice + focal, gamma 2).
        multiclass: a 3-class softmax network (labels 0/1/2) instead of one sigmoid channel.
        batch: Dice over the whole batch (``True``) or per image and averaged (the ``dice_per_image`` knob negated).
        deep_supervision: the network's extra outputs; when non-zero the loss is MONAI's ``DeepSupervisionLoss``
            over them (weights halving with each coarser output).
        background: for a multi-class network, whether the background channel takes part in the Dice term (and,
            for ``dicefocal``, in the focal term; the cross-entropy of ``dicece`` always sees every class).
            ``False`` averages the Dice over ground glass and consolidation only, so the near-perfect background
            Dice no longer dilutes them. A binary network has no background channel: ignored there.

    Returns:
        The loss module.

    Raises:
        ValueError: an unknown name, or ``bce`` for a multi-class network.

    Example:
        >>> segmentation_loss("dicece")
        DiceCELoss(...)
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"loss_name {name!r} is not one of {', '.join(LOSS_NAMES)}")
    if name == "bce":
        if multiclass:
            raise ValueError("loss_name 'bce' has no multi-class form")
        loss: torch.nn.Module = torch.nn.BCEWithLogitsLoss()
    else:
        dice = {
            "sigmoid": not multiclass,
            "softmax": multiclass,
            "to_onehot_y": multiclass,
            "smooth_nr": 1.0,
            "smooth_dr": 1.0,
            "batch": batch,
            "include_background": background or not multiclass,
        }
        if name == "dice":
            loss = DiceLoss(**dice)
        elif name == "dicece":
            loss = DiceCELoss(**dice)
        else:
            loss = DiceFocalLoss(**dice, gamma=2.0)
    return DeepSupervisionLoss(loss, weight_mode="exp") if deep_supervision else loss
