"""Every use of a dependency's private or internal API, in one place.

Each function wraps one such use; ``tests/test_private_api.py`` checks that the pinned versions still behave as
relied on here (and names the versions they were checked against), so an upgrade that changes one fails there, loudly,
rather than somewhere in a pipeline:

* PyTorch: ``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported`` (:func:`cpu_bf16_features`);
* MONAI ``UpCat.is_pad``, the decoder's size-matching pad (:func:`skip_upcat_padding`);
* MONAI lazy resampling: a MetaTensor's pending operations and ``Spacingd.spacing_transform``
  (:func:`pending_resampling`, :func:`with_operations`, :func:`spacing_resample`);
* MONAI's nvImageCodec DICOM reader: the logger and warning it speaks through where nvImageCodec is missing
  (:func:`quiet_missing_gpu_dicom_decoder`).

One more reliance on how a dependency behaves lives in its own module, because it must run before MONAI is imported:
:mod:`covid_monai.lean_import` imports MONAI with some optional packages hidden (checked by
``tests/test_lean_import.py``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.data import MetaTensor
from monai.networks.nets.basic_unet import UpCat
from monai.transforms import Spacingd

__all__ = [
    "CHECKED_VERSIONS",
    "PendingResampling",
    "cpu_bf16_features",
    "pending_resampling",
    "quiet_missing_gpu_dicom_decoder",
    "skip_upcat_padding",
    "spacing_resample",
    "with_operations",
]

CHECKED_VERSIONS = {"torch": "2.13.0", "monai": "1.6.1"}
"""The releases whose internals this module was checked against (``requirements.txt`` pins them)."""


def cpu_bf16_features() -> dict[str, bool]:
    """Whether this CPU has AVX-512 BF16 and AMX tiles (native bf16 arithmetic), from PyTorch's private probes.

    Example:
        >>> sorted(cpu_bf16_features())
        ['amx_tile', 'avx512_bf16']
    """
    return {
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx_tile": bool(torch.cpu._is_amx_tile_supported()),
    }


def skip_upcat_padding(network: torch.nn.Module) -> torch.nn.Module:
    """Switch off the size-matching pad of every MONAI ``UpCat`` decoder block in ``network`` (in place).

    With inputs whose size divides by the poolings the pad is a no-op copy that also drops the channels-last layout
    (30 % of the CPU inference time); the caller must then check the input size itself.

    Returns:
        ``network``.
    """
    for module in network.modules():
        if isinstance(module, UpCat):
            module.is_pad = False
    return network


class PendingResampling(NamedTuple):
    """A lazily applied MONAI resampling not yet carried out on a MetaTensor."""

    operations: list[Mapping[str, Any]]
    """The pending operations, as MONAI recorded them."""
    affine: np.ndarray
    """The voxel-to-world affine of the output grid (float64)."""
    shape: tuple[int, ...]
    """The output's spatial shape."""


def pending_resampling(image: Any) -> PendingResampling | None:
    """The resampling a lazy MONAI transform left pending on ``image``, or ``None`` when there is none.

    Example:
        >>> pending = pending_resampling(Spacingd("image", (2, 2, 2))({"image": image}, lazy=True)["image"])
    """
    if not (isinstance(image, MetaTensor) and image.has_pending_operations):
        return None
    return PendingResampling(
        list(image.pending_operations),
        np.asarray(image.peek_pending_affine(), dtype=np.float64),
        tuple(int(s) for s in image.peek_pending_shape()),
    )


def with_operations(result: MetaTensor, image: MetaTensor, operations: Sequence[Mapping[str, Any]]) -> MetaTensor:
    """``result`` with the applied operations of ``image`` and then ``operations`` (the pending ones it carried out),
    so that MONAI's inverse transforms see the same history as after MONAI's own resampling.

    Returns:
        ``result``.
    """
    result.applied_operations = [*image.applied_operations]
    for operation in operations:
        result.push_applied_operation(operation)
    return result


def spacing_resample(transform: Spacingd, data_array: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Resample one array now, eagerly, with the ``Spacing`` inside a ``Spacingd`` (its per-key arguments given).

    Args:
        transform: the dictionary transform.
        data_array: the image before the transform.
        kwargs: ``mode``, ``padding_mode``, ``align_corners``, ``dtype``, ``scale_extent`` for this key.
    """
    return transform.spacing_transform(data_array=data_array, lazy=False, **kwargs)


NVIMGCODEC_LOGGER = "monai.data.nvimgcodec_pydicom_plugin"
"""The logger of MONAI's nvImageCodec pydicom plugin."""
NVIMGCODEC_MISSING_LOG = "nvImageCodec is not available"
"""The start of what that logger says when nvImageCodec (GPU DICOM decoding) is not installed or has no GPU."""
NVIMGCODEC_MISSING_WARNING = "NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register"
"""The start of the warning ``NvImgCodecPydicomReader`` then gives."""


class _StartsWith(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def quiet_missing_gpu_dicom_decoder() -> Iterator[None]:
    """Within: no log line and no warning that nvImageCodec is missing, where it is missing.

    MONAI's ``LoadImage`` builds every default reader, ``NvImgCodecPydicomReader`` among them, and that reader says
    twice that it has no nvImageCodec each time it is built, although it is then never chosen (it accepts no file
    without nvImageCodec). Where nvImageCodec with a GPU is available nothing is silenced.
    """
    from monai.data.nvimgcodec_pydicom_plugin import is_nvimgcodec_available

    if is_nvimgcodec_available():
        yield
        return
    plugin_logger = logging.getLogger(NVIMGCODEC_LOGGER)
    muted = _StartsWith(NVIMGCODEC_MISSING_LOG)
    plugin_logger.addFilter(muted)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NVIMGCODEC_MISSING_WARNING)
            yield
    finally:
        plugin_logger.removeFilter(muted)
