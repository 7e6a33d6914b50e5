"""Inferers of the bundle: mixed precision on CPUs, and test-time flips.

Mixed precision: on CUDA, MONAI's engines do automatic mixed precision themselves (``amp=True``: fp16 with a
gradient scaler). On CPUs with AMX tiles, and on AMD CPUs with AVX-512 BF16 (Zen 4 and later), bf16 autocast with
channels-last tensors runs the U-Net about 2-3x faster than fp32, for training as well as inference;
:class:`AutocastInferer` brings that to the training pipeline. On Intel CPUs with AVX-512 BF16 but no AMX it is slower
than fp32, so they run fp32 (:func:`cpu_bf16_supported`).

Inference (``inference.json``): :func:`load_inference_network` gives the trained network ready to run (weights-only
checkpoint, eval mode, frozen on CPUs) and :class:`InferenceModeInferer` runs it in the device's precision.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer

from covid_monai._private_api import cpu_bf16_features
from covid_monai.errors import one_line
from covid_monai.networks import read_state_dict

logger = logging.getLogger(__name__)

__all__ = [
    "AutocastInferer",
    "FlipAveragingInferer",
    "InferenceModeInferer",
    "autocast_dtype",
    "cpu_bf16_supported",
    "cpu_vendor",
    "freeze_for_cpu_inference",
    "load_inference_network",
    "precision_name",
]


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor id as Linux reports it (``GenuineIntel``, ``AuthenticAMD``), or ``""`` where unknown.

    Example:
        >>> cpu_vendor() in ("GenuineIntel", "AuthenticAMD", "")
        True
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def cpu_bf16_supported() -> bool:
    """Whether bf16 runs faster than fp32 on this CPU: with AMX tiles, or AVX-512 BF16 on an AMD CPU.

    Measured with ``benchmarks/bench_precision.py`` (``docs/experiments.md``): on a 2-core AMD EPYC with AVX-512 BF16
    (Zen 4, no AMX) bf16 was 2.0x faster per training step and 2.1x per inference call (2026-12-07); on a 2-core
    Intel Xeon with AVX-512 BF16 but no AMX it was slower, 0.87x and 0.76x (2026-12-04); with AMX, 2-3x faster.
    """
    features = cpu_bf16_features()
    return features["amx_tile"] or (features["avx512_bf16"] and cpu_vendor() == "AuthenticAMD")


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed precision a device runs fast: fp16 on CUDA, bf16 where :func:`cpu_bf16_supported`, else ``None``.

    Example:
        >>> autocast_dtype("cuda")
        torch.float16
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_bf16_supported():
        return torch.bfloat16
    return None


def precision_name(device: torch.device | str, amp: bool) -> str:
    """In words, the precision the network runs in with the bundle's ``amp`` knob on ``device``.

    Example:
        >>> precision_name("cuda", amp=True)
        'fp16 autocast'
    """
    dtype = autocast_dtype(device) if amp else None
    if dtype is not None:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype)) + " autocast"
    if amp and torch.device(device).type == "cpu":
        return "fp32 (amp on, but bf16 runs slower than fp32 on this CPU: it has neither AMX nor AMD's AVX-512 BF16)"
    return "fp32"


def freeze_for_cpu_inference(
    network: torch.nn.Module, dtype: torch.dtype | None, example_size: tuple[int, int] = (64, 64)
) -> torch.nn.Module:
    """A TorchScript-frozen copy of a 2D network for CPU inference: batch norm folded into the convolutions.

    The network is traced once on a small example under the given autocast ``dtype`` (so bf16 casts are part of
    the frozen graph) and frozen; the U-Net has no size-dependent branches, so the trace serves every input size.
    TorchScript's oneDNN graph fuser is switched on (a process-wide setting that only affects TorchScript
    graphs): after two profiling runs per input shape it fuses convolution, bias and ReLU into oneDNN partitions.
    On 2 cores with AMX, a 16x320x256 batch of the default U-Net takes 0.77 s traced, 0.57 s fused in bf16
    (2.2 -> 2.1 s in fp32), with identical outputs; eager mode is slower still. Falls back to ``network`` (with a
    warning in the log) if tracing fails.

    Args:
        network: the eval-mode network (channels-last for speed).
        dtype: autocast dtype to bake in (``torch.bfloat16``) or ``None`` for fp32.
        example_size: in-plane size of the tracing example (multiples of 16 for the U-Net).
    """
    in_channels = next(p for p in network.parameters() if p.dim() == 4).shape[1]
    example = torch.zeros(1, in_channels, *example_size).contiguous(memory_format=torch.channels_last)
    torch.jit.enable_onednn_fusion(True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=False):
                return torch.jit.freeze(torch.jit.trace(network.eval(), example, check_trace=False))
    except Exception as exc:  # noqa: BLE001 - an eager network still works, only slower
        logger.warning("running the network in eager mode: tracing it failed (%s)", exc)
        return network


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` that runs the network under CPU bf16 autocast with channels-last inputs.

    Used as the training inferer: the loss is computed in fp32 on the returned logits, the weights and the
    optimiser stay fp32. It does nothing special on CUDA (there the engine's own ``amp`` applies) or on CPUs
    without native bf16, so a config can switch it on unconditionally.

    Args:
        enabled: turn mixed precision on (e.g. the bundle's ``amp`` knob).
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``network(inputs)``; on a bf16-capable CPU under bf16 autocast, returning fp32 logits (a list of
        them for a deeply supervised network in training mode)."""
        if not self.enabled or inputs.device.type != "cpu" or autocast_dtype(inputs.device) is None:
            return super().__call__(inputs, network, *args, **kwargs)
        if inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = super().__call__(inputs, network, *args, **kwargs)
        if isinstance(outputs, list | tuple):  # a deeply supervised network in training mode
            return [output.float() for output in outputs]
        return outputs.float()


class FlipAveragingInferer(Inferer):
    """Test-time augmentation: average the logits of the input and of its in-plane flips.

    The network sees each flipped input, its output is flipped back and the logits are averaged: a cheap ensemble
    that smooths a model's left-right and front-back biases.

    Args:
        inferer: the inferer that runs the network (e.g. a ``SliceInferer`` over axial slices).
        spatial_axes: flips to add, each a list of spatial axes (0 = X, 1 = Y of a ``(B, C, X, Y, Z)`` volume);
            an empty list runs the plain inferer only.

    Example:
        >>> from monai.inferers import SimpleInferer
        >>> tta = FlipAveragingInferer(SimpleInferer(), spatial_axes=[[0], [1]])  # 3 passes
    """

    def __init__(self, inferer: Inferer, spatial_axes: list[list[int]] | None = None) -> None:
        super().__init__()
        self.inferer = inferer
        self.spatial_axes = [list(axes) for axes in (spatial_axes or [])]

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The mean of ``inferer`` outputs over the identity and the configured flips."""
        total = self.inferer(inputs, network, *args, **kwargs).float()
        for axes in self.spatial_axes:
            dims = [a + 2 for a in axes]
            flipped = self.inferer(torch.flip(inputs, dims), network, *args, **kwargs).float()
            total += torch.flip(flipped, dims)
        return total / (1 + len(self.spatial_axes))


def load_inference_network(
    network: torch.nn.Module,
    checkpoint: str | os.PathLike,
    device: torch.device | str = "cpu",
    amp: bool = True,
    runtime: str = "torchscript",
) -> torch.nn.Module:
    """The bundle's network ready to segment: trained weights, eval mode, on ``device``, frozen on CPUs.

    The checkpoint is read with ``torch.load(..., weights_only=True)`` (no code in the file runs); a training
    state (``latest.pt``) gives its ``model`` entry. On a CPU the network is made channels-last and frozen by
    :func:`freeze_for_cpu_inference` (batch norm folded into the convolutions, the precision of ``amp`` baked in),
    which runs oneDNN convolutions faster; on CUDA it stays an eager module (the inferer's autocast applies).
    With ``runtime="openvino"`` (CPU only) it is compiled by OpenVINO instead
    (:class:`covid_monai.runtimes.OpenVINONetwork`). Run it through :class:`InferenceModeInferer` with the same ``amp``.

    Args:
        network: the untrained network (the bundle's ``network_def``).
        checkpoint: ``models/model.pt``.
        device: where it runs.
        amp: mixed precision where the device runs it fast (:func:`autocast_dtype`).
        runtime: ``torchscript`` (default) or ``openvino`` (:data:`covid_monai.runtimes.RUNTIMES`).

    Returns:
        The network (a TorchScript module on CPUs, an OpenVINO-compiled one with ``runtime="openvino"``).

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint``.
        ValueError: the file is not a weights-only checkpoint of a state dict; an unknown runtime, or OpenVINO
            asked for a GPU.
        ImportError: ``runtime="openvino"`` without OpenVINO installed.

    Example:
        >>> net = load_inference_network(seed_unet(width=4), "bundle/models/model.pt", "cpu")  # doctest: +SKIP
    """
    from covid_monai.runtimes import OpenVINONetwork, check_runtime

    path, device = Path(checkpoint), torch.device(device)
    check_runtime(runtime, device)
    if not path.is_file():
        raise FileNotFoundError(f"no trained weights at {path}")
    try:
        state = read_state_dict(path, device)
    except Exception as exc:
        raise ValueError(f"{path}: not a loadable weights-only checkpoint ({one_line(exc)})") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: checkpoint holds {type(state).__name__}, not a state dict")
    network = network.to(device)
    network.load_state_dict(dict(state))
    network.eval()
    if device.type != "cpu":
        return network
    if runtime == "openvino":
        return OpenVINONetwork(network, amp=amp and autocast_dtype(device) is not None)
    network = network.to(memory_format=torch.channels_last)  # oneDNN convolutions are faster on NHWC tensors
    return freeze_for_cpu_inference(network, autocast_dtype(device) if amp else None)


class InferenceModeInferer(Inferer):
    """Run an inferer under ``torch.inference_mode`` and the device's mixed precision (:func:`autocast_dtype`).

    The precision half of :func:`load_inference_network`: with ``amp`` the inner inferer runs under fp16 autocast on
    CUDA and bf16 autocast on CPUs with native bf16 (where the frozen network has the casts built in), else fp32.

    Args:
        inferer: the inferer that runs the network (e.g. :class:`FlipAveragingInferer` over a ``SliceInferer``).
        amp: mixed precision on (the bundle's ``amp`` knob).

    Example:
        >>> from monai.inferers import SimpleInferer
        >>> inferer = InferenceModeInferer(SimpleInferer(), amp=True)
    """

    def __init__(self, inferer: Inferer, amp: bool = True) -> None:
        super().__init__()
        self.inferer = inferer
        self.amp = amp

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        """The inner inferer's output for ``inputs``, computed without autograd, in the device's precision."""
        dtype = autocast_dtype(inputs.device) if self.amp else None
        with torch.inference_mode(), torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype is not None):
            return self.inferer(inputs, network, *args, **kwargs)
