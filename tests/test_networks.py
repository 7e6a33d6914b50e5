"""The seed U-Net built from MONAI's BasicUNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covid_monai.networks import seed_unet, unet_features


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
