"""The optional OpenVINO runtime: same outputs as PyTorch, the same masks through the pipeline, clear refusals."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from covid_monai.inference import run_batch
from covid_monai.inferers import load_inference_network
from covid_monai.networks import seed_unet
from covid_monai.runtimes import RUNTIMES, OpenVINONetwork, check_runtime

pytest.importorskip("openvino", reason="OpenVINO is the optional runtime (requirements-dev.txt installs it)")


@pytest.fixture(scope="module")
def trained_like_network() -> torch.nn.Module:
    """A small U-Net with non-trivial weights and batch-norm statistics (so folding and conversion matter)."""
    torch.manual_seed(1)
    network = seed_unet(in_channels=1, out_channels=1, width=8)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return network.eval()


def test_openvino_fp32_matches_pytorch_on_several_sizes(trained_like_network):
    compiled = OpenVINONetwork(trained_like_network, amp=False)
    assert compiled.precision == "f32"
    for shape in [(1, 1, 64, 64), (3, 1, 96, 160), (2, 1, 208, 176)]:  # one compiled model, any batch and size
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = trained_like_network(x)
        out = compiled(x)
        assert out.shape == expected.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)


def test_openvino_refuses_a_size_the_unet_cannot_take(trained_like_network):
    with pytest.raises(ValueError, match="divisible by 16"):
        OpenVINONetwork(trained_like_network, amp=False)(torch.zeros(1, 1, 72, 64))


def test_pipeline_with_openvino_writes_the_masks_torchscript_writes(tmp_path, random_bundle, phantoms):
    images = phantoms / "images"
    torchscript = run_batch([images], tmp_path / "ts", random_bundle, knobs={"amp": False}, device="cpu",
                            save_probabilities=True, progress=False)
    openvino = run_batch([images], tmp_path / "ov", random_bundle, knobs={"amp": False, "runtime": "openvino"},
                         device="cpu", save_probabilities=True, progress=False)
    assert [r.status for r in openvino] == ["ok"] * 4
    for a, b in zip(torchscript, openvino, strict=True):
        p_ts = np.asarray(nib.load(str(tmp_path / "ts" / f"{a.case}_probability.nii.gz")).dataobj)
        p_ov = np.asarray(nib.load(str(tmp_path / "ov" / f"{b.case}_probability.nii.gz")).dataobj)
        assert np.abs(p_ts - p_ov).max() < 1e-3, a.case
        assert b.infection_ml == pytest.approx(a.infection_ml, rel=0.01, abs=0.05)


def test_unknown_runtime_and_openvino_on_a_gpu_are_refused(tmp_path, random_bundle):
    with pytest.raises(ValueError, match="choose one of torchscript, openvino"):
        check_runtime("tensorrt", torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on the CPU"):
        check_runtime("openvino", torch.device("cuda:0"))
    with pytest.raises(ValueError, match="runtime 'onnx'"):
        load_inference_network(seed_unet(width=4), random_bundle / "models" / "model.pt", "cpu", runtime="onnx")


def test_missing_openvino_says_how_to_install_it(trained_like_network, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ImportError, match=r"pip install openvino==[\d.]+ \(or covid-monai\[openvino\]\)"):
        OpenVINONetwork(trained_like_network)


def test_command_line_offers_exactly_the_runtimes():
    from covid_monai.cli import build_parser

    parser = build_parser()
    for runtime in RUNTIMES:
        args = parser.parse_args(["infer", "scan.nii.gz", "-o", "out", "--bundle", "b", "--runtime", runtime])
        assert args.runtime == runtime
    with pytest.raises(SystemExit):
        parser.parse_args(["infer", "scan.nii.gz", "-o", "out", "--bundle", "b", "--runtime", "tensorrt"])
