"""The seed U-Net built from MONAI's BasicUNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covid_monai.networks import load_initial_weights, seed_unet, unet_features


def test_seed_architecture():
    net = seed_unet()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    three = [c for c in convs if c.kernel_size == (3, 3)]
    assert len(three) == 18  # two 3x3 convs on each of the 5 encoder and 4 decoder levels
    assert sorted({c.out_channels for c in three}) == [32, 64, 128, 256, 512]
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 1
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 4 and all(u.kernel_size == (2, 2) and u.stride == (2, 2) for u in ups)
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4
    assert any(isinstance(m, nn.ReLU) for m in net.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_width_norm_and_shapes():
    net = seed_unet(in_channels=3, width=8, norm="batch").eval()
    assert unet_features(8) == (8, 16, 32, 64, 128, 8)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 64, 96)).shape == (2, 1, 64, 96)
        with pytest.raises(ValueError, match="divisible by 16"):  # the pipelines pad to 16; a clear error otherwise
            net(torch.zeros(1, 3, 50, 70))
    with pytest.raises(ValueError):
        unet_features(0)


def test_deep_supervision_heads_in_training_only():
    torch.manual_seed(0)
    net = seed_unet(width=8, norm="batch", deep_supervision=3)
    x = torch.randn(2, 1, 64, 96)
    outputs = net.train()(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 1, 64, 96), (2, 1, 32, 48), (2, 1, 16, 24), (2, 1, 8, 12)]
    # every head is trained: a loss on the auxiliary outputs alone reaches its head's weights
    sum(o.mean() for o in outputs[1:]).backward()
    assert all(head.weight.grad is not None and head.weight.grad.abs().sum() > 0 for head in net.aux_heads)
    # eval mode: exactly the plain U-Net with the same weights (the heads are not run)
    plain = seed_unet(width=8, norm="batch").eval()
    missing = plain.load_state_dict(net.state_dict(), strict=False)
    assert not missing.missing_keys and all(k.startswith("aux_heads.") for k in missing.unexpected_keys)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="1 to 3"):
        seed_unet(width=8, deep_supervision=4)


def test_initial_weights_from_a_model_or_a_training_state(tmp_path):
    torch.manual_seed(1)
    source = seed_unet(width=4, deep_supervision=2)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "latest.pt")
    for name in ("model.pt", "latest.pt"):
        torch.manual_seed(2)
        target = load_initial_weights(seed_unet(width=4, deep_supervision=2), tmp_path / name)
        for key, value in source.state_dict().items():
            torch.testing.assert_close(target.state_dict()[key], value)
    untouched = seed_unet(width=4)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    load_initial_weights(untouched, "")
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())


def test_initial_weights_binary_to_three_classes_keeps_fresh_output_layers(tmp_path):
    torch.manual_seed(1)
    binary = seed_unet(width=4, deep_supervision=2)
    torch.save(binary.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(2)
    three = seed_unet(width=4, out_channels=3, deep_supervision=2)
    fresh = {k: v.clone() for k, v in three.state_dict().items() if k.startswith(("final_conv", "aux_heads"))}
    load_initial_weights(three, tmp_path / "model.pt")
    for key, value in three.state_dict().items():
        expected = fresh[key] if key in fresh else binary.state_dict()[key]
        torch.testing.assert_close(value, expected)


def test_initial_weights_refuse_other_architectures(tmp_path):
    torch.save(seed_unet(width=4).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="model.pt"):
        load_initial_weights(seed_unet(width=8), tmp_path / "model.pt")  # encoder shapes differ
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: cannot initialise"):
        load_initial_weights(seed_unet(width=4), tmp_path / "junk.pt")
