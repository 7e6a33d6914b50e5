"""Weight averaging (EMA) handler: the average it keeps, its checkpoint state, and its off switch."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from covid_monai.handlers import WeightAveraging, averaged_weights


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 1, 1))


def _train(net: torch.nn.Module, averaging: WeightAveraging, steps: int) -> list[dict[str, torch.Tensor]]:
    """Run ``steps`` SGD steps in an ignite engine; return the network's floating-point state after each one."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    history = []

    def step(engine, batch):
        optimizer.zero_grad()
        net(batch).square().mean().backward()
        optimizer.step()
        history.append({k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()})

    engine = Engine(step)
    averaging.attach(engine)
    engine.run([torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(steps)])
    return history


def test_average_follows_the_ema_recursion():
    net = _net()
    averaging = WeightAveraging(net, decay=0.9)
    history = _train(net, averaging, steps=4)
    expected = history[0]  # the first step copies, later ones blend
    for state in history[1:]:
        expected = {k: 0.9 * expected[k] + 0.1 * state[k] for k in expected}
    averaged = averaging.module.state_dict()
    for name, value in expected.items():  # batch-norm running statistics are averaged too
        torch.testing.assert_close(averaged[name], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(averaged["0.weight"], net.state_dict()["0.weight"])  # the trained network is its own


def test_state_round_trip_and_plain_weights():
    net = _net()
    averaging = WeightAveraging(net, decay=0.5)
    _train(net, averaging, steps=3)
    restored = WeightAveraging(_net(), decay=0.5)
    restored.load_state_dict(averaging.state_dict())
    assert int(restored.averaged.n_averaged) == 3  # a resumed run continues the same average
    plain = _net()
    plain.load_state_dict(averaged_weights(averaging.state_dict()))  # model.pt loads into the plain network
    for name, value in averaging.module.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name


def test_off_is_the_network_itself():
    net = _net()
    averaging = WeightAveraging(net, decay=0)
    engine = Engine(lambda e, b: None)
    averaging.attach(engine)
    assert averaging.module is net and not engine._event_handlers  # nothing attached, nothing copied
    assert averaging.state_dict() == {} and averaged_weights({}) is None
    with pytest.raises(ValueError, match="weight averaging is off"):
        averaging.load_state_dict(WeightAveraging(_net(), decay=0.9).averaged.state_dict())
    with pytest.raises(ValueError, match="holds no averaged weights"):
        WeightAveraging(_net(), decay=0.9).load_state_dict({})
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            WeightAveraging(net, decay=bad)
