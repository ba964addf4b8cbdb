"""The gradient outer optimizers: an annealed learning rate (Reptile's meta-step) that a
resumed run continues, and checkpoints written before the step count was kept."""

import pytest
import torch

from metarl.algorithms.base import MetaGrad
from metarl.config import OuterConfig, TrainConfig
from metarl.families import make
from metarl.outer import GradientOuter
from metarl.train import make_outer
from metarl.types import ConfigError

F64 = torch.float64
GRAD = {"w": torch.tensor([1.0, -2.0], dtype=F64)}


def constant(theta, batch):
    return MetaGrad(grad=GRAD)


def steps(outer, theta, n):
    moves = []
    for _ in range(n):
        before = theta["w"].clone()
        outer.step(theta, None, constant)
        moves.append((before - theta["w"]) / GRAD["w"])  # the learning rate used, per coord
    return torch.stack(moves)


def test_sgd_learning_rate_anneals_linearly_to_lr_final():
    theta = {"w": torch.zeros(2, dtype=F64, requires_grad=True)}
    outer = GradientOuter(theta, "sgd", 1.0, lr_final=0.0, iterations=4)
    lr = steps(outer, theta, 4)
    torch.testing.assert_close(lr, torch.tensor([[1.0], [0.75], [0.5], [0.25]],
                                                dtype=F64).expand(4, 2), rtol=1e-15, atol=1e-15)
    constant_lr = GradientOuter(theta, "sgd", 0.5)
    assert torch.allclose(steps(constant_lr, theta, 3), torch.full((3, 2), 0.5, dtype=F64))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_resumed_optimizer_continues_the_schedule(kind):
    def fresh():
        return {"w": torch.zeros(2, dtype=F64, requires_grad=True)}

    a = fresh()
    whole = GradientOuter(a, kind, 0.1, lr_final=0.02, iterations=6)
    steps(whole, a, 6)
    b = fresh()
    first = GradientOuter(b, kind, 0.1, lr_final=0.02, iterations=6)
    steps(first, b, 3)
    state = first.state_dict()
    b = {"w": b["w"].detach().clone().requires_grad_(True)}
    second = GradientOuter(b, kind, 0.1, lr_final=0.02, iterations=6)
    second.load_state_dict(state)
    assert second.t == 3
    steps(second, b, 3)
    torch.testing.assert_close(b["w"], a["w"], rtol=0, atol=0)


def test_state_written_before_the_step_count_loads():
    theta = {"w": torch.zeros(2, dtype=F64, requires_grad=True)}
    legacy = torch.optim.Adam(list(theta.values()), lr=1e-3)
    theta["w"].grad = GRAD["w"].clone()
    legacy.step()
    outer = GradientOuter(theta, "adam", 1e-3)
    outer.load_state_dict(legacy.state_dict())
    assert outer.t == 0 and outer.opt.state_dict()["state"][0]["step"] == 1


def test_training_settings_reach_the_optimizer():
    cfg = TrainConfig(algo="reptile", iterations=50,
                      outer=OuterConfig(optimizer="sgd", lr=0.5, lr_final=0.0))
    fam = make("sinusoid", hidden=[4])
    theta = fam.init_params(torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    outer = make_outer(cfg, {k: v.requires_grad_(True) for k, v in theta.items()}, fam)
    assert isinstance(outer, GradientOuter)
    assert (outer.lr_at(0), outer.lr_at(25), outer.lr_at(50)) == (0.5, 0.25, 0.0)
    with pytest.raises(ConfigError, match="outer-lr-final must be >= 0"):
        cfg.replace({"outer": {"lr_final": -1.0}})
    with pytest.raises(ConfigError, match="TRPO's step is set by max_kl"):
        cfg.replace({"outer": {"optimizer": "trpo", "lr_final": 0.0}})
