"""CPU runtimes for the trained network: OpenVINO as an option beside the frozen TorchScript default.

``covid-monai infer --runtime openvino`` (the bundle knob ``runtime``) converts the trained network with OpenVINO
(``openvino.convert_model`` straight from the PyTorch module, dynamic batch and in-plane size) and compiles it for the
CPU: bf16 where the CPU has AMX and ``amp`` is on, else fp32. On the 2-core development machine it runs
the network 1.6-4x faster than TorchScript + oneDNN with the same masks (``benchmarks/bench_runtime.py``), mostly
because it needs no profiling runs per new slice size. OpenVINO is an optional dependency: ``pip install
covid-monai[openvino]``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["RUNTIMES", "OpenVINONetwork", "check_runtime"]

RUNTIMES = ("torchscript", "openvino")
"""The values of the bundle knob ``runtime``."""

OPENVINO_PIN = "openvino==2026.4.1"
"""The OpenVINO release this project is tested with (``pip install covid-monai[openvino]`` installs it)."""


def check_runtime(runtime: str, device: torch.device) -> None:
    """Refuse an unknown ``runtime`` or one that does not run on ``device``, naming the choices.

    Raises:
        ValueError: ``runtime`` is not one of :data:`RUNTIMES`, or is ``openvino`` on a non-CPU device.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "openvino" and device.type != "cpu":
        raise ValueError(
            f"runtime 'openvino' runs on the CPU, not on {device}: use --device cpu or the default runtime"
        )


class OpenVINONetwork(torch.nn.Module):
    """A 2D network compiled by OpenVINO for the CPU, called like the PyTorch module (NCHW tensors in and out).

    ``precision`` is the precision OpenVINO runs it in (``bf16`` or ``f32``).

    Args:
        network: the eval-mode PyTorch network with its trained weights.
        amp: bf16 inference where the CPU runs it natively (else fp32).
        threads: CPU threads for OpenVINO (default PyTorch's, so one setting governs the pipeline).

    Raises:
        ImportError: OpenVINO is not installed (the message says how to install it).

    Example:
        >>> net = OpenVINONetwork(seed_unet(width=4).eval(), amp=True)  # doctest: +SKIP
        >>> net(torch.zeros(2, 1, 64, 64)).shape  # doctest: +SKIP
        torch.Size([2, 1, 64, 64])
    """

    def __init__(self, network: torch.nn.Module, amp: bool = True, threads: int | None = None) -> None:
        super().__init__()
        try:
            import openvino as ov
        except ImportError as exc:
            raise ImportError(
                f"runtime 'openvino' needs OpenVINO: pip install {OPENVINO_PIN} (or covid-monai[openvino])"
            ) from exc
        in_channels = next(p for p in network.parameters() if p.dim() == 4).shape[1]
        example = torch.zeros(1, in_channels, 64, 64)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracing notes about the input-size check, which is not needed here
            model = ov.convert_model(network.eval(), example_input=example,
                                     input=[ov.PartialShape([-1, in_channels, -1, -1])])
        config = {
            "INFERENCE_NUM_THREADS": str(threads or torch.get_num_threads()),
            "PERFORMANCE_HINT": "LATENCY",
        }
        if not amp:
            config["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = ov.Core().compile_model(model, "CPU", config)
        self.precision: str = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self._request: Any = compiled.create_infer_request()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of a ``(N, C, H, W)`` batch (H and W multiples of 16), as a float32 tensor on the CPU."""
        if inputs.shape[-1] % 16 or inputs.shape[-2] % 16:
            raise ValueError(f"the U-Net needs an in-plane size divisible by 16, got {tuple(inputs.shape[-2:])}")
        array = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
        result = self._request.infer({0: array})
        return torch.from_numpy(np.array(result[0], dtype=np.float32, copy=True))
