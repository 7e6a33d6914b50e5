"""Network factory used by the bundle configs.

The default is the seed study's 2D U-Net, rebuilt from MONAI's :class:`~monai.networks.nets.BasicUNet`:
two 3×3 convolutions with ReLU per level, 2×2 max-pooling, 32-64-128-256-512 features, 2×2 transposed
convolutions for up-sampling, skip concatenation and a final 1×1 convolution. The network returns logits;
the sigmoid is applied by the loss (``sigmoid=True``) and by the post-processing transforms. A multi-class bundle
(knob ``labels: multiclass``) has three output channels (background, ground glass, consolidation) and a softmax in
their place (:func:`is_multiclass` checks the knob and the loss).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import BasicUNet

from covid_monai._private_api import skip_upcat_padding

__all__ = [
    "LABEL_SCHEMES",
    "DeepSupervisedUNet",
    "is_multiclass",
    "load_initial_weights",
    "read_state_dict",
    "seed_unet",
    "unet_features",
]

LABEL_SCHEMES = ("binary", "multiclass")
"""Values of the bundle knob ``labels``: 0/1 infection masks, or 0/1/2 masks (1 ground glass, 2 consolidation)."""

_MULTICLASS_LOSSES = ("dice", "dicece", "dicefocal")


def is_multiclass(labels: str, loss_name: str | None = None) -> bool:
    """Check the bundle knob ``labels`` (and the loss it trains with) and say whether it is multi-class.

    Args:
        labels: ``"binary"`` (0 background, 1 infection; one sigmoid output) or ``"multiclass"`` (0 background,
            1 ground glass, 2 consolidation; three softmax outputs).
        loss_name: the training loss (``loss_name`` knob), when there is one: a multi-class bundle needs a loss with
            a softmax form (``dice``, ``dicece``, ``dicefocal``); BCE has none.

    Returns:
        ``True`` for ``"multiclass"``, ``False`` for ``"binary"``.

    Raises:
        ValueError: an unknown ``labels`` value, or a loss without a multi-class form.

    Example:
        >>> is_multiclass("multiclass", "dicefocal")
        True
    """
    if labels not in LABEL_SCHEMES:
        raise ValueError(f"labels must be one of {', '.join(LABEL_SCHEMES)}, got {labels!r}")
    multiclass = labels == "multiclass"
    if multiclass and loss_name is not None and loss_name not in _MULTICLASS_LOSSES:
        raise ValueError(
            f"loss_name {loss_name!r} has no multi-class form (labels: multiclass needs one of "
            f"{', '.join(_MULTICLASS_LOSSES)}: softmax over the classes with one-hot targets)"
        )
    return multiclass


def unet_features(width: int = 32) -> tuple[int, int, int, int, int, int]:
    """Feature sizes of the five U-Net levels plus the last up-sampling, doubling from ``width``.

    Args:
        width: features of the first level (the seed uses 32).

    Returns:
        ``(w, 2w, 4w, 8w, 16w, w)`` as expected by ``BasicUNet(features=...)``.

    Example:
        >>> unet_features(16)
        (16, 32, 64, 128, 256, 16)
    """
    if width < 1:
        raise ValueError(f"U-Net width must be a positive integer, got {width}")
    return (width, 2 * width, 4 * width, 8 * width, 16 * width, width)


class DeepSupervisedUNet(BasicUNet):
    """``BasicUNet`` with auxiliary 1x1-convolution heads on its coarser decoder levels, for deep supervision.

    In training mode the forward pass returns ``[logits, aux_1, ..., aux_n]``: the full-resolution logits, then
    logits of the decoder levels at 1/2, 1/4, ... of the input size (MONAI's ``DeepSupervisionLoss`` takes that list
    and resizes the label to each). In eval mode it returns the full-resolution logits only, exactly as
    ``BasicUNet`` (the heads are not run), so inference, tracing and evaluation are unchanged.

    Args:
        levels: auxiliary heads, 1 to 3 (decoder outputs at 1/2, 1/4 and 1/8 of the input size).
        Others: as for ``monai.networks.nets.BasicUNet`` (2D; ``features`` has six entries).
    """

    def __init__(self, *args: Any, levels: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 1 <= levels <= 3:
            raise ValueError(f"deep supervision needs 1 to 3 auxiliary levels, got {levels}")
        out_channels = self.final_conv.out_channels
        # decoder blocks whose outputs are supervised: 1/2, 1/4 and 1/8 of the input size
        self._supervised = [self.upcat_2, self.upcat_3, self.upcat_4][:levels]
        self.aux_heads = torch.nn.ModuleList(
            torch.nn.Conv2d(block.convs.conv_0.conv.out_channels, out_channels, kernel_size=1)
            for block in self._supervised
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:  # type: ignore[override]
        """Logits ``(B, C, H, W)``; in training mode the list ``[logits, 1/2-size logits, ...]``."""
        if not self.training:
            return super().forward(x)
        # BasicUNet's own forward pass; the supervised decoder outputs are caught by hooks that live for this call
        decoded: dict[int, torch.Tensor] = {}
        hooks = [
            block.register_forward_hook(lambda _block, _inputs, output, i=i: decoded.__setitem__(i, output))
            for i, block in enumerate(self._supervised)
        ]
        try:
            logits = super().forward(x)
        finally:
            for hook in hooks:
                hook.remove()
        return [logits, *(head(decoded[i]) for i, head in enumerate(self.aux_heads))]


def seed_unet(
    in_channels: int = 1,
    out_channels: int = 1,
    width: int = 32,
    norm: str | tuple | None = None,
    dropout: float = 0.0,
    deep_supervision: int = 0,
) -> BasicUNet:
    """The seed study's 2D U-Net as a MONAI ``BasicUNet``.

    Args:
        in_channels: input channels (1 for a single CT slice; 2k+1 for a 2.5D stack of neighbours).
        out_channels: output channels (1: infection logit; 3: background, ground glass and consolidation logits).
        width: features of the first level; deeper levels double it (seed: 32 → 32-64-128-256-512).
        norm: normalisation after each convolution: ``None`` as in the seed, or a MONAI norm name such as
            ``"batch"`` or ``"instance"`` (faster, steadier convergence on small data).
        dropout: dropout ratio in every convolution block.
        deep_supervision: auxiliary output heads on the decoder (0: none; 1-3: a :class:`DeepSupervisedUNet`
            whose training-mode output is a list for MONAI's ``DeepSupervisionLoss``; eval mode is unchanged).

    Returns:
        A 2D network mapping ``(B, in_channels, H, W)`` to logits ``(B, out_channels, H, W)``;
        ``H`` and ``W`` must be multiples of 16 (four 2×2 poolings).

    Example:
        >>> import torch
        >>> seed_unet(width=8)(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """
    extra = {"levels": int(deep_supervision)} if deep_supervision else {}
    network = (DeepSupervisedUNet if deep_supervision else BasicUNet)(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        features=unet_features(width),
        act=("relu", {"inplace": True}),
        norm=norm,  # type: ignore[arg-type]  # None: no normalisation (ADN skips it)
        bias=True,
        dropout=dropout,
        upsample="deconv",
        **extra,
    )
    # Every pipeline feeds sizes divisible by 16, so the decoder's size-matching pad is a no-op copy that also
    # drops the channels-last layout (30 % of the CPU inference time); skip it and check the input size instead.
    skip_upcat_padding(network)
    network.register_forward_pre_hook(_check_divisible_by_16)
    return network


def _check_divisible_by_16(module: torch.nn.Module, args: tuple[torch.Tensor]) -> None:
    """Forward pre-hook (TorchScript-compatible): refuse inputs whose height or width is not a multiple of 16."""
    x = args[0]
    if x.shape[-1] % 16 != 0 or x.shape[-2] % 16 != 0:
        raise ValueError(
            "the U-Net needs height and width divisible by 16 (four 2x2 poolings), got " + str(list(x.shape[2:]))
        )


_OUTPUT_LAYERS = ("final_conv.", "aux_heads.")
"""Parameter names of the output layers: the only ones that may differ in shape from the initial weights."""


def read_state_dict(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> Any:
    """What a weights-only checkpoint holds for the network: the file itself (``model.pt``), or the ``model`` entry
    of a training state (``latest.pt``). Read with ``torch.load(..., weights_only=True)``: no code in the file runs.

    Example:
        >>> state = read_state_dict("bundle/models/model.pt")  # doctest: +SKIP
    """
    state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    return state


def load_initial_weights(network: torch.nn.Module, path: str | os.PathLike | None) -> torch.nn.Module:
    """Start training from another bundle's weights (pre-training, then fine-tuning): ``model.pt`` or ``latest.pt``.

    The checkpoint is loaded with ``weights_only=True``; a ``latest.pt`` training state gives its ``model`` entry.
    Every layer must match the network exactly, except the output layers (``final_conv``, ``aux_heads``): when
    their shape differs (a binary pre-training starting a 3-class network) they keep their fresh initialisation.

    Args:
        network: the network to initialise (the plain module, not a DDP wrapper).
        path: the checkpoint; empty or ``None`` leaves the network as it is.

    Returns:
        ``network`` (initialised in place).

    Raises:
        ValueError: naming the file, when it cannot be read or a layer other than the output layers differs.

    Example:
        >>> load_initial_weights(seed_unet(width=8), "")  # no path: unchanged
        BasicUNet(...)
    """
    if not path:
        return network
    try:
        state = read_state_dict(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot initialise the network from it ({' '.join(str(exc).split())[:300]})") from exc
    own = network.state_dict()
    fresh = [k for k, v in state.items() if k.startswith(_OUTPUT_LAYERS) and k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in fresh}
    try:
        network.load_state_dict(state, strict=not fresh)
    except RuntimeError as exc:
        raise ValueError(f"{path}: cannot initialise the network from it ({' '.join(str(exc).split())[:300]})") from exc
    missing = sorted(set(own) - set(state) - set(fresh))
    if missing:
        raise ValueError(f"{path}: no weights for {', '.join(missing[:5])}")
    if fresh:
        logging.getLogger(__name__).info("%s: output layers %s start fresh (other shape)", path, ", ".join(fresh))
    return network
