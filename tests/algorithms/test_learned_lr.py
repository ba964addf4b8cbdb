"""Learned inner rates (one per inner step and parameter tensor, ``--inner-learn-lr``): the
steps they take, and MAML's meta-gradient with respect to the model and the rates against
finite differences in float64, supervised and RL."""

import json
import math

import pytest
import torch

from metarl import config as C
from metarl import families
from metarl.algorithms import exact, maml
from metarl.inner import LR_KEY, InnerConfig, adapt, split_lr, with_learned_lr
from metarl.types import ConfigError

F64 = torch.float64


def sinusoid_problem(k, seed=0):
    fam = families.make("sinusoid", hidden=(8, 8))
    g = torch.Generator().manual_seed(seed)
    inner = InnerConfig(steps=k, lr=0.02, learn_lr=True)
    theta = with_learned_lr(fam.init_params(g, "cpu", F64), inner)
    for i, key in enumerate(sorted(k for k in theta if k.startswith(LR_KEY))):
        theta[key] = theta[key] + 0.1 * torch.arange(k, dtype=F64) - 0.05 * i  # distinct rates
    return theta, fam.sample_batch(3, g, split="train", dtype=F64), inner


@pytest.mark.parametrize("k", [1, 3])
def test_maml_gradient_wrt_model_and_rates_equals_finite_differences(k):
    theta, batch, inner = sinusoid_problem(k)
    mg = maml.meta_grad(theta, batch, inner)
    assert set(mg.grad) == set(theta)
    fd = exact.central_diff(
        lambda th: exact.meta_objective(th, batch, inner, [batch.support] * k, batch.query), theta)
    assert exact.rel_error(mg.grad, fd) <= 1e-6
    _, rates = split_lr(mg.grad)
    assert min(float(v.abs().min()) for v in rates.values()) > 0  # every rate is learned


def test_rates_at_their_start_give_maml_with_the_fixed_rates():
    """Learned rates equal to the configured ones: the model's gradient is MAML's."""
    fam = families.make("sinusoid", hidden=(8,))
    g = torch.Generator().manual_seed(1)
    theta = fam.init_params(g, "cpu", F64)
    batch = fam.sample_batch(2, g, split="train", dtype=F64)
    fixed = InnerConfig(steps=2, lr=(0.03, 0.01))
    learned = InnerConfig(steps=2, lr=(0.03, 0.01), learn_lr=True)
    mg = maml.meta_grad(with_learned_lr(theta, learned), batch, learned)
    ref = maml.meta_grad(theta, batch, fixed)
    model, _ = split_lr(mg.grad)
    assert exact.rel_error(model, ref.grad) <= 1e-12


def test_rl_rates_gradient_equals_finite_differences_on_fixed_trajectories():
    fam = families.make("navigation2d", rollouts=4, hidden=[8, 8], horizon=10)
    g = torch.Generator().manual_seed(0)
    inner = InnerConfig(steps=2, lr=0.1, learn_lr=True)
    theta = with_learned_lr(fam.init_params(g, torch.device("cpu"), F64), inner)
    batch = exact.Recorder(fam.sample_batch(3, g, dtype=F64))
    mg = maml.meta_grad(theta, batch, inner)
    fd = exact.central_diff(
        lambda th: exact.meta_objective(th, batch.replay(), inner, batch.inner, batch.outer), theta)
    assert exact.rel_error(mg.grad, fd) <= 1e-6


class Quadratic:
    """``L_t(w, b) = |w - m_t|^2 / 2 + b^2 / 2`` per task (fixed data)."""

    n_tasks = 2
    m = torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=F64)

    def inner_data(self, params):
        assert not any(k.startswith(LR_KEY) for k in params)  # the model never sees the rates
        return None

    outer_data = inner_data

    def inner_loss(self, params, data):
        assert not any(k.startswith(LR_KEY) for k in params)
        return 0.5 * ((params["w"] - self.m) ** 2).sum(1) + 0.5 * params["b"] ** 2

    outer_loss = metric = inner_loss


def test_each_tensor_and_step_takes_its_own_rate_and_later_steps_the_last():
    batch = Quadratic()
    theta = {"w": torch.zeros(2, 2, dtype=F64), "b": torch.ones(2, dtype=F64)}
    params = {**theta, LR_KEY + "w": torch.log(torch.tensor([[0.5, 0.25]] * 2, dtype=F64)),
              LR_KEY + "b": torch.log(torch.tensor([[0.1, 0.2]] * 2, dtype=F64))}
    ad = adapt(params, batch, InnerConfig(steps=3, lr=0.9), create_graph=False)
    assert set(ad.phi) == {"w", "b"}  # the rates travel in the state, not in phi
    w, b = theta["w"].clone(), theta["b"].clone()
    for aw, ab in [(0.5, 0.1), (0.25, 0.2), (0.25, 0.2)]:  # cfg.lr 0.9 is not used
        w, b = w - aw * (w - batch.m), b - ab * b
    torch.testing.assert_close(ad.phi["w"], w, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ad.phi["b"], b, rtol=1e-14, atol=1e-14)
    # one step per call, carrying the state, is the same adaptation (as evaluation adapts)
    phi, state = params, None
    for _ in range(3):
        step = adapt(phi, batch, InnerConfig(steps=1, lr=0.9), create_graph=False, state=state)
        phi, state = step.phi, step.state
    assert state.taken == 3
    torch.testing.assert_close(phi["w"], w, rtol=1e-14, atol=1e-14)


def test_learned_rates_are_refused_where_they_do_not_apply():
    with pytest.raises(ConfigError, match="--inner-learn-lr .* use --algo maml"):
        C.TrainConfig(algo="fomaml", inner=InnerConfig(learn_lr=True))
    with pytest.raises(ConfigError, match="needs --inner-steps >= 1"):
        C.TrainConfig(inner=InnerConfig(steps=0, learn_lr=True))
    batch = Quadratic()
    params = {"w": torch.zeros(2, 2, dtype=F64), "b": torch.ones(2, dtype=F64),
              LR_KEY + "w": torch.zeros(2, 1, dtype=F64),
              LR_KEY + "b": torch.zeros(2, 1, dtype=F64)}
    with pytest.raises(ConfigError, match="learned inner rates scale plain gradient steps"):
        adapt(params, batch, InnerConfig(steps=1), create_graph=False,
              prox=(1.0, {k: params[k] for k in ("w", "b")}))


def test_rates_start_at_the_configured_ones():
    theta = {"w": torch.zeros(3), "b": torch.zeros(1)}
    out = with_learned_lr(theta, InnerConfig(steps=3, lr=(0.1, 0.05)))
    for key in ("w", "b"):
        torch.testing.assert_close(out[LR_KEY + key],
                                   torch.tensor([math.log(0.1), math.log(0.05), math.log(0.05)]))


def test_cli_trains_evaluates_and_resumes_with_learned_rates(tmp_path):
    """metarl train --inner-learn-lr: the checkpoint holds the rates, training moved them,
    evaluate adapts with them (and says so), --resume continues; a run trained without them
    cannot be resumed with them."""
    from metarl import checkpoint
    from tests.cli_run import one_line_error, run

    out = tmp_path / "run"
    base = ("train", "--family", "sinusoid", "--inner-steps", 2, "--inner-lr", 0.02,
            "--meta-batch", 4, "--device", "cpu", "--family-opt", "hidden=[8]")
    r = run(*base, "--iterations", 3, "--inner-learn-lr", "--out", out)
    assert r.exit_code == 0, r.output
    theta = checkpoint.load(out).theta
    rates = {k: v for k, v in theta.items() if k.startswith(LR_KEY)}
    assert set(rates) == {LR_KEY + k for k in theta if not k.startswith(LR_KEY)}
    assert all(v.shape == (2,) for v in rates.values())
    start = torch.full((2,), math.log(0.02))
    assert any(not torch.allclose(v, start) for v in rates.values())  # the outer step moved them
    r = run("evaluate", out, "--tasks", 5, "--steps", 3, "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e.json").read_text())["settings"]["lr"] == "learned"
    one_line_error(run("evaluate", out, "--tasks", 5, "--lr", 0.1),
                   "learned its inner rates", "drop --lr")
    r = run(*base, "--iterations", 4, "--inner-learn-lr", "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert checkpoint.load(out).iteration == 4
    plain = tmp_path / "plain"
    assert run(*base, "--iterations", 1, "--out", plain).exit_code == 0
    one_line_error(run(*base, "--iterations", 2, "--inner-learn-lr", "--out", plain, "--resume"),
                   "does not fit these settings")
