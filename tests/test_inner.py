"""The inner loop's proximal (iMAML) steps: monotone, one candidate per step, per task."""

import torch

from metarl import params as P
from metarl.inner import InnerConfig, adapt

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
