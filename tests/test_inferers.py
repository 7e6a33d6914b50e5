"""The bundle's inferers: CPU bf16 autocast for training, test-time flips, and the ready inference network."""

from __future__ import annotations

import os
import platform

import pytest
import torch
from monai.inferers import SimpleInferer, SliceInferer

import covid_monai.inferers
from covid_monai.inferers import (
    AutocastInferer,
    FlipAveragingInferer,
    InferenceModeInferer,
    autocast_dtype,
    freeze_for_cpu_inference,
    load_inference_network,
    precision_name,
)
from covid_monai.networks import seed_unet


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Take this CPU for one with AMX, where bf16 is the fast precision (PyTorch runs bf16 on any x86 CPU)."""
    monkeypatch.setattr(covid_monai.inferers, "cpu_bf16_features", lambda: {"avx512_bf16": True, "amx_tile": True})


def test_autocast_dtype_per_device():
    assert autocast_dtype("cuda") == torch.float16
    assert autocast_dtype("cpu") in (torch.bfloat16, None)


@pytest.mark.parametrize(("avx512_bf16", "amx_tile", "vendor", "expected"), [
    (True, True, "GenuineIntel", torch.bfloat16),
    (False, True, "GenuineIntel", torch.bfloat16),
    (True, False, "GenuineIntel", None),  # Intel's AVX-512 BF16 without AMX: bf16 measured slower than fp32
    (True, False, "AuthenticAMD", torch.bfloat16),  # AMD's AVX-512 BF16 (Zen 4): bf16 measured 2x faster
    (False, False, "AuthenticAMD", None),  # AVX2 only
    (True, False, "", None),  # vendor unknown: fp32, the safe choice
    (False, False, "GenuineIntel", None),
])
def test_cpus_run_bf16_where_measured_faster(monkeypatch, avx512_bf16, amx_tile, vendor, expected):
    features = {"avx512_bf16": avx512_bf16, "amx_tile": amx_tile}
    monkeypatch.setattr(covid_monai.inferers, "cpu_bf16_features", lambda: features)
    monkeypatch.setattr(covid_monai.inferers, "cpu_vendor", lambda: vendor)
    assert autocast_dtype("cpu") == expected
    assert autocast_dtype("cuda") == torch.float16


@pytest.mark.skipif(not (os.path.exists("/proc/cpuinfo") and platform.machine() == "x86_64"),
                    reason="the CPU vendor is read from Linux's /proc/cpuinfo on x86")
def test_cpu_vendor_reads_this_machine():
    """The vendor is the x86 CPU's own id (CI's and the developers' machines are Linux on x86)."""
    assert covid_monai.inferers.cpu_vendor() in ("GenuineIntel", "AuthenticAMD", "HygonGenuine")


@pytest.mark.parametrize("bf16", [True, False])
def test_precision_name_says_what_the_network_runs_in(monkeypatch, bf16):
    """The training log names the precision, and why a CPU runs fp32 although ``amp`` is on."""
    monkeypatch.setattr(covid_monai.inferers, "cpu_bf16_features", lambda: {"avx512_bf16": True, "amx_tile": bf16})
    monkeypatch.setattr(covid_monai.inferers, "cpu_vendor", lambda: "GenuineIntel")
    no_bf16 = "fp32 (amp on, but bf16 runs slower than fp32 on this CPU: it has neither AMX nor AMD's AVX-512 BF16)"
    assert precision_name("cpu", amp=True) == ("bf16 autocast" if bf16 else no_bf16)
    assert precision_name("cpu", amp=False) == "fp32"
    assert precision_name("cuda", amp=True) == "fp16 autocast"
    assert precision_name("cuda:1", amp=False) == "fp32"


def test_autocast_inferer_trains_in_bf16_with_fp32_logits(bf16_cpu):
    torch.manual_seed(0)
    network = seed_unet(width=8, norm="batch").to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 32, 32)
    plain = SimpleInferer()(x, network)
    mixed = AutocastInferer()(x, network)
    assert mixed.dtype == torch.float32 and mixed.shape == plain.shape
    assert not torch.equal(mixed, plain)  # it really ran in reduced precision
    assert torch.allclose(mixed, plain, atol=0.1 * plain.abs().max().item())
    mixed.mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in network.parameters())


def test_autocast_inferer_disabled_is_plain():
    network = seed_unet(width=8).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(AutocastInferer(enabled=False)(x, network), SimpleInferer()(x, network))


def test_flip_averaging_is_the_mean_over_flips():
    def asymmetric(x: torch.Tensor) -> torch.Tensor:  # not flip-equivariant: a ramp added along X
        return x + torch.arange(x.shape[2], dtype=x.dtype).reshape(1, 1, -1, 1, 1)

    x = torch.randn(1, 1, 6, 5, 3)
    tta = FlipAveragingInferer(SimpleInferer(), spatial_axes=[[0], [1]])
    flip_x = torch.flip(asymmetric(torch.flip(x, [2])), [2])
    flip_y = torch.flip(asymmetric(torch.flip(x, [3])), [3])
    torch.testing.assert_close(tta(x, asymmetric), (asymmetric(x) + flip_x + flip_y) / 3)
    assert torch.equal(FlipAveragingInferer(SimpleInferer())(x, asymmetric), asymmetric(x))


def test_flip_averaging_around_slice_inferer_keeps_shape():
    network = seed_unet(width=8).eval()
    volume = torch.randn(1, 1, 32, 48, 4)
    inferer = FlipAveragingInferer(SliceInferer(roi_size=(-1, -1), spatial_dim=2), spatial_axes=[[0], [1], [0, 1]])
    with torch.no_grad():
        out = inferer(volume, network)
    assert out.shape == (1, 1, 32, 48, 4) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_frozen_network_matches_eager_at_any_size(dtype):
    torch.manual_seed(0)
    network = seed_unet(in_channels=3, width=8, norm="batch")
    network(torch.randn(4, 3, 32, 32))  # give batch norm non-trivial running statistics
    network = network.eval().to(memory_format=torch.channels_last)
    frozen = freeze_for_cpu_inference(network, dtype)
    assert isinstance(frozen, torch.jit.ScriptModule)
    for shape in [(2, 3, 64, 48), (1, 3, 96, 32)]:  # other sizes than the tracing example
        x = torch.randn(shape)
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            expected, got = network(x).float(), frozen(x).float()
        tolerance = 1e-4 if dtype is None else 0.05 * expected.abs().max().item()
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("amp", [False, True])
def test_inference_network_is_the_trained_network_frozen_in_its_precision(tmp_path, amp, bf16_cpu):
    """model.pt or latest.pt's ``model`` entry, loaded weights-only into an eval-mode frozen graph whose output,
    run by InferenceModeInferer, is the eager trained network's under the same autocast."""
    torch.manual_seed(0)
    trained = seed_unet(width=8, norm="batch")
    trained(torch.randn(4, 1, 32, 32))  # non-trivial batch-norm statistics
    torch.save({"model": trained.state_dict(), "optimizer": {}}, tmp_path / "latest.pt")
    network = load_inference_network(seed_unet(width=8, norm="batch"), tmp_path / "latest.pt", "cpu", amp=amp)
    assert isinstance(network, torch.jit.ScriptModule)  # frozen: batch norm folded in with its eval statistics
    x = torch.randn(2, 1, 32, 32)
    dtype = autocast_dtype("cpu") if amp else None
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        expected = trained.eval().to(memory_format=torch.channels_last)(x).float()
    got = InferenceModeInferer(SimpleInferer(), amp=amp)(x, network)
    assert got.is_inference()
    tolerance = 1e-4 if dtype is None else 0.05 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=0)


def test_inference_network_refuses_missing_and_code_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained weights"):
        load_inference_network(seed_unet(width=4), tmp_path / "model.pt")
    torch.save({"model": {"weights": object()}}, tmp_path / "model.pt")  # only loadable by running pickled code
    with pytest.raises(ValueError, match="model.pt: not a loadable weights-only checkpoint"):
        load_inference_network(seed_unet(width=4), tmp_path / "model.pt")
    torch.save([torch.zeros(1)], tmp_path / "model.pt")
    with pytest.raises(ValueError, match="holds list, not a state dict"):
        load_inference_network(seed_unet(width=4), tmp_path / "model.pt")


def test_inference_mode_inferer_without_amp_is_the_plain_inferer():
    network = seed_unet(width=8).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        expected = SimpleInferer()(x, network)
    assert torch.equal(InferenceModeInferer(SimpleInferer(), amp=False)(x, network), expected)
