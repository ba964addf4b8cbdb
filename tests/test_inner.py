"""The inner loop's proximal (iMAML) steps (monotone, one candidate per step, per task) and
its Adam (per-task moments, as Reptile's protocol)."""

import pytest
import torch

from metarl import params as P
from metarl.inner import InnerConfig, adapt
from metarl.types import ConfigError

F64 = torch.float64


class Quadratics:
    """Task t: ``L_t(w) = c_t / 2 * |w - m_t|^2`` on ``w [T, 2]`` (a fixed data set)."""

    def __init__(self, c, m):
        self.c, self.m = torch.tensor(c, dtype=F64), torch.tensor(m, dtype=F64)
        self.n_tasks = len(c)

    def inner_data(self, params):
        return None

    outer_data = inner_data

    def inner_loss(self, params, data):
        return 0.5 * self.c * ((params["w"] - self.m) ** 2).sum(1)  # [T]

    outer_loss = metric = inner_loss


def objective(batch, w, theta, lam):
    return batch.inner_loss({"w": w}, None) + 0.5 * lam * ((w - theta) ** 2).sum(1)  # [T]


def test_proximal_steps_are_plain_gradient_steps_while_they_descend():
    batch = Quadratics([0.5, 1.0], [[1.0, -1.0], [2.0, 0.5]])
    theta = {"w": torch.zeros(2, 2, dtype=F64)}
    lam, alpha, k = 0.5, 0.3, 6
    ad = adapt(theta, batch, InnerConfig(steps=k, lr=alpha), create_graph=False,
               prox=(lam, theta))
    w = theta["w"].clone()
    for _ in range(k):  # alpha * (c + lam) < 1: every step descends
        grad = batch.c[:, None] * (w - batch.m) + lam * (w - theta["w"])
        w = w - alpha * grad
    torch.testing.assert_close(ad.phi["w"], w, rtol=1e-14, atol=1e-14)


def test_a_task_whose_step_would_not_descend_stays_and_halves_its_step():
    # task 1's curvature c + lam = 5.5 makes lr 1 overshoot (a step descends iff a * 5.5 < 2):
    # it stays at steps 0 (a = 1) and 1 (a = 1/2), then descends with a = 1/4 from step 2 on
    batch = Quadratics([0.1, 5.0], [[1.0, 1.0], [1.0, -1.0]])
    theta = {"w": torch.zeros(2, 2, dtype=F64)}
    lam, k = 0.5, 5
    phis = [theta["w"]]
    for steps in range(1, k + 1):
        ad = adapt(theta, batch, InnerConfig(steps=steps, lr=1.0), create_graph=False,
                   prox=(lam, theta))
        phis.append(ad.phi["w"])
    F = torch.stack([objective(batch, w, theta["w"], lam) for w in phis])  # [k + 1, T]
    assert torch.all(F[1:] <= F[:-1])  # monotone for both tasks
    assert torch.equal(phis[1][1], theta["w"][1]) and torch.equal(phis[2][1], theta["w"][1])
    w = theta["w"][1].clone()
    for _ in range(k - 2):
        w = w - 0.25 * (batch.c[1] * (w - batch.m[1]) + lam * (w - theta["w"][1]))
    torch.testing.assert_close(phis[-1][1], w, rtol=1e-14, atol=1e-14)
    assert float(F[-1, 1]) < float(F[0, 1])  # it got somewhere
    # task 0 (0.6 < 2) took every step at the full rate, unaffected by task 1
    w0 = theta["w"][0].clone()
    for _ in range(k):
        w0 = w0 - 1.0 * (batch.c[0] * (w0 - batch.m[0]) + lam * (w0 - theta["w"][0]))
    torch.testing.assert_close(phis[-1][0], w0, rtol=1e-14, atol=1e-14)


def test_non_finite_candidates_are_never_taken():
    class Exploding(Quadratics):
        def inner_loss(self, params, data):
            loss = super().inner_loss(params, data)
            far = params["w"].abs().amax(1) > 10  # [T]
            return torch.where(far, torch.full_like(loss, float("nan")), loss)

    batch = Exploding([1.0, 1.0], [[100.0, 0.0], [1.0, 0.0]])
    theta = {"w": torch.zeros(2, 2, dtype=F64)}
    ad = adapt(theta, batch, InnerConfig(steps=8, lr=0.5), create_graph=False,
               prox=(0.1, theta))
    assert torch.isfinite(ad.phi["w"]).all()
    assert float(P.flatten(ad.phi).abs().max()) <= 10


# ------------------------------------------------------------------------- inner Adam

def adam_reference(batch, w, k, alpha, b1, b2, eps=1e-8):
    """Adam written out per task from its definition (Kingma and Ba, algorithm 1)."""
    out = []
    for t in range(batch.n_tasks):
        x, m, v = w[t].clone(), torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)
        for i in range(1, k + 1):
            g = batch.c[t] * (x - batch.m[t])
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            x = x - alpha * (m / (1 - b1 ** i)) / ((v / (1 - b2 ** i)).sqrt() + eps)
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_inner_adam_is_adam_per_task_with_its_own_moments(b1):
    batch = Quadratics([0.5, 4.0, 0.01], [[1.0, -1.0], [2.0, 0.5], [-3.0, 3.0]])
    w0 = torch.tensor([[0.0, 0.0], [1.0, -2.0], [0.5, 0.5]], dtype=F64)
    cfg = InnerConfig(steps=4, lr=0.1, optimizer="adam", adam_beta1=b1, adam_beta2=0.99)
    ad = adapt({"w": w0}, batch, cfg, create_graph=False)
    ref = adam_reference(batch, w0, 4, 0.1, b1, 0.99)
    torch.testing.assert_close(ad.phi["w"], ref, rtol=1e-13, atol=1e-13)
    # the first step of bias-corrected Adam moves every coordinate by about lr, whatever
    # the task's scale: what sgd would not do (its steps scale with c)
    one = adapt({"w": w0}, batch, cfg.with_steps(1, 0.1), create_graph=False)
    torch.testing.assert_close((one.phi["w"] - w0).abs(), torch.full_like(w0, 0.1), rtol=1e-6,
                               atol=0.0)
    # continuing step by step from the returned moments is the same adaptation
    phi, state = {"w": w0}, None
    for _ in range(4):
        step = adapt(phi, batch, cfg.with_steps(1, 0.1), create_graph=False, state=state)
        phi, state = step.phi, step.state
    assert state is not None and state.t == 4
    torch.testing.assert_close(phi["w"], ad.phi["w"], rtol=0, atol=0)
    # ...and restarting the moments is not
    restarted = adapt(adapt({"w": w0}, batch, cfg.with_steps(2, 0.1), create_graph=False).phi,
                      batch, cfg.with_steps(2, 0.1), create_graph=False)
    assert not torch.allclose(restarted.phi["w"], ad.phi["w"])


def test_inner_adam_refuses_second_order_and_proximal_use():
    batch = Quadratics([0.5], [[1.0, -1.0]])
    theta = {"w": torch.zeros(1, 2, dtype=F64, requires_grad=True)}
    cfg = InnerConfig(steps=1, lr=0.1, optimizer="adam")
    with pytest.raises(ConfigError, match="first order"):
        adapt(theta, batch, cfg, create_graph=True)
    with pytest.raises(ConfigError, match="first order"):
        adapt(theta, batch, cfg, create_graph=False, prox=(1.0, theta))


@pytest.mark.parametrize("kw, match", [
    (dict(optimizer="rmsprop"), "unknown inner optimizer 'rmsprop'"),
    (dict(optimizer="adam", adam_beta1=1.0), "inner-adam-beta1 must be in"),
    (dict(optimizer="adam", adam_beta2=-0.1), "inner-adam-beta2 must be in"),
])
def test_bad_inner_optimizer_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        InnerConfig(**kw)


def test_proximal_steps_taken_one_call_at_a_time_are_the_same_adaptation():
    # evaluation scores between steps, so it adapts one step per call: the halvings must
    # carry over, or a task whose first step overshoots is refused that step forever
    batch = Quadratics([0.1, 5.0], [[1.0, 1.0], [1.0, -1.0]])
    theta = {"w": torch.zeros(2, 2, dtype=F64)}
    cfg = InnerConfig(steps=5, lr=1.0)
    whole = adapt(theta, batch, cfg, create_graph=False, prox=(0.5, theta))
    phi, state = theta, None
    for _ in range(5):
        ad = adapt(phi, batch, cfg.with_steps(1, 1.0), create_graph=False, prox=(0.5, theta),
                   state=state)
        phi, state = ad.phi, ad.state
    torch.testing.assert_close(phi["w"], whole.phi["w"], rtol=0, atol=0)
    assert not torch.equal(phi["w"][1], theta["w"][1])  # task 1 moved once its step halved
    assert state is not None and state.halvings is not None
    assert state.halvings.tolist() == [0.0, 2.0]
