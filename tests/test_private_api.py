"""The dependencies' private API that covid_monai/_private_api.py relies on still behaves as relied on.

A failure here after an upgrade of torch or MONAI names what changed; fix covid_monai/_private_api.py (the only place
that touches these internals), check it again, and update ``CHECKED_VERSIONS``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.data.nvimgcodec_pydicom_plugin import is_nvimgcodec_available
from monai.networks.nets import BasicUNet
from monai.networks.nets.basic_unet import UpCat
from monai.transforms import LoadImage, Spacing, Spacingd

from covid_monai._private_api import (
    CHECKED_VERSIONS,
    NVIMGCODEC_LOGGER,
    NVIMGCODEC_MISSING_LOG,
    NVIMGCODEC_MISSING_WARNING,
    cpu_bf16_features,
    pending_resampling,
    quiet_missing_gpu_dicom_decoder,
    skip_upcat_padding,
    spacing_resample,
    with_operations,
)


@pytest.mark.parametrize("package", sorted(CHECKED_VERSIONS))
def test_pinned_versions_are_the_checked_ones(package):
    installed = importlib.metadata.version(package).split("+")[0]
    assert installed == CHECKED_VERSIONS[package], (
        f"{package} {installed} is installed, covid_monai/_private_api.py was checked against "
        f"{CHECKED_VERSIONS[package]}: run tests/test_private_api.py, fix what fails, then update CHECKED_VERSIONS"
    )


def test_torch_cpu_bf16_probes_exist_and_answer_booleans():
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        assert callable(getattr(torch.cpu, name, None)), f"torch.cpu.{name} is gone (used by cpu_bf16_features)"
    features = cpu_bf16_features()
    assert set(features) == {"avx512_bf16", "amx_tile"} and all(isinstance(v, bool) for v in features.values())


def test_upcat_is_pad_is_the_switch_of_its_size_matching_pad():
    assert "self.is_pad" in inspect.getsource(UpCat.forward), "UpCat.forward no longer reads is_pad"
    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4)).eval()
    x = torch.randn(1, 1, 32, 48)
    with torch.no_grad():
        padded = net(x)
        blocks = [m for m in skip_upcat_padding(net).modules() if isinstance(m, UpCat)]
        assert len(blocks) == 4 and not any(m.is_pad for m in blocks)
        np.testing.assert_array_equal(net(x).numpy(), padded.numpy())  # a no-op on sizes divisible by 16
        with pytest.raises(RuntimeError):  # and no longer pads: other sizes fail in the concatenation
            net(torch.randn(1, 1, 30, 48))


def _scan() -> MetaTensor:
    affine = [[0.7, 0, 0, -90.0], [0, -0.8, 0, 40.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]]
    return MetaTensor(torch.rand(1, 20, 18, 9), affine=torch.tensor(affine, dtype=torch.float64))


def test_lazy_spacing_leaves_one_pending_operation_with_the_eager_grid():
    transform = Spacingd("image", pixdim=(1.5, 1.5, 2.0), mode="bilinear")
    assert isinstance(transform.spacing_transform, Spacing), "Spacingd.spacing_transform is not a Spacing any more"
    eager = transform({"image": _scan()})["image"]
    assert pending_resampling(eager) is None and pending_resampling(torch.zeros(1)) is None
    lazy = transform({"image": _scan()}, lazy=True)["image"]
    pending = pending_resampling(lazy)
    assert pending is not None and len(pending.operations) == 1
    np.testing.assert_allclose(pending.affine, eager.affine.numpy(), atol=1e-6)
    assert pending.shape == tuple(eager.shape[1:])
    assert pending.operations[0]["class"] == "SpatialResample"


def test_spacing_resample_and_with_operations_give_monai_s_result_and_history():
    transform = Spacingd("image", pixdim=(1.5, 1.5, 2.0), mode="bilinear")
    scan = _scan()
    eager = transform({"image": scan})["image"]
    now = spacing_resample(
        transform, scan, mode=transform.mode[0], padding_mode=transform.padding_mode[0],
        align_corners=transform.align_corners[0], dtype=transform.dtype[0], scale_extent=transform.scale_extent[0],
    )
    np.testing.assert_array_equal(now.numpy(), eager.numpy())
    lazy = transform({"image": scan}, lazy=True)["image"]
    pending = pending_resampling(lazy)
    result = MetaTensor(eager.as_tensor().clone(), affine=torch.as_tensor(pending.affine))
    with_operations(result, lazy, pending.operations)
    assert [op["class"] for op in result.applied_operations] == [op["class"] for op in eager.applied_operations]
    back = transform.inverse({"image": result})["image"]  # MONAI inverts it as its own
    assert tuple(back.shape) == tuple(scan.shape)
    np.testing.assert_allclose(back.affine.numpy(), scan.affine.numpy(), atol=1e-5)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _what_building_says(build) -> tuple[list[str], list[str]]:
    """The nvImageCodec log lines and warnings while ``build()`` runs."""
    records = _Records()
    plugin_logger = logging.getLogger(NVIMGCODEC_LOGGER)
    plugin_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build()
    finally:
        plugin_logger.removeHandler(records)
    logged = [m for m in records.messages if m.startswith(NVIMGCODEC_MISSING_LOG)]
    warned = [str(w.message) for w in caught if str(w.message).startswith(NVIMGCODEC_MISSING_WARNING)]
    return logged, warned


@pytest.mark.skipif(is_nvimgcodec_available(), reason="nvImageCodec with a GPU is here: MONAI says nothing to silence")
def test_monai_load_image_reports_a_missing_nvimgcodec_and_the_load_transform_silences_it():
    from covid_monai.io import LoadScand

    logged, warned = _what_building_says(LoadImage)
    assert logged and warned, (
        "MONAI's LoadImage no longer logs / warns that nvImageCodec is missing in the words "
        "covid_monai/_private_api.py expects: update NVIMGCODEC_* there (or drop quiet_missing_gpu_dicom_decoder)"
    )

    def quiet_load_image() -> None:
        with quiet_missing_gpu_dicom_decoder():
            LoadImage()

    assert _what_building_says(quiet_load_image) == ([], [])
    assert _what_building_says(lambda: LoadScand(keys="image")) == ([], [])
    # and only within: afterwards MONAI speaks again
    assert all(_what_building_says(LoadImage))
