"""Every meta-gradient against an exact reference in float64."""

import pytest
import torch

from metarl import families
from metarl import params as P
from metarl.algorithms import exact, imaml, loop_meta_grad, maml, meta_grad, reptile
from metarl.inner import InnerConfig

F64 = torch.float64


def small_problem(n_tasks=3, seed=0, dtype=F64, hidden=(8, 8), activation="relu"):
    fam = families.make("sinusoid", hidden=hidden, activation=activation)
    g = torch.Generator().manual_seed(seed)
    theta = fam.init_params(g, "cpu", dtype)
    batch = fam.sample_batch(n_tasks, g, split="train", dtype=dtype)
    return fam, theta, batch


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_maml_equals_explicit_jacobian_and_finite_differences(k):
    _, theta, batch = small_problem()
    inner = InnerConfig(steps=k, lr=0.02)
    mg = maml.meta_grad(theta, batch, inner)
    ref = exact.maml(theta, batch, inner, [batch.support] * k, batch.query)
    assert exact.rel_error(mg.grad, ref) <= 1e-6
    fd = exact.central_diff(
        lambda th: exact.meta_objective(th, batch, inner, [batch.support] * k, batch.query), theta)
    assert exact.rel_error(fd, P.flatten(ref)) <= 1e-6


def test_maml_step_schedule_and_second_order_terms_matter():
    _, theta, batch = small_problem()
    inner = InnerConfig(steps=3, lr=(0.05, 0.02))
    mg = maml.meta_grad(theta, batch, inner)
    ref = exact.maml(theta, batch, inner, [batch.support] * 3, batch.query)
    assert exact.rel_error(mg.grad, ref) <= 1e-6
    fo = maml.meta_grad(theta, batch, inner, first_order=True)
    # FOMAML differs from MAML by the Hessian terms: a test that can fail
    assert exact.rel_error(fo.grad, ref) > 1e-3


def test_fomaml_is_gradient_at_adapted_parameters():
    _, theta, batch = small_problem()
    inner = InnerConfig(steps=3, lr=0.02)
    fo = maml.meta_grad(theta, batch, inner, first_order=True)
    # reference: adapt each task by hand, then the plain gradient of its query loss
    phi = P.expand(P.detach(theta), batch.n_tasks)
    for _ in range(3):
        phi = P.detach(phi, requires_grad=True)
        g = P.grads(batch.inner_loss(phi, batch.support).sum(), phi)
        phi = {k: phi[k] - 0.02 * g[k] for k in phi}
    phi = P.detach(phi, requires_grad=True)
    ref = P.task_mean(P.grads(batch.outer_loss(phi, batch.query).sum(), phi))
    assert exact.rel_error(fo.grad, ref) <= 1e-6


def test_reptile_direction():
    _, theta, batch = small_problem()
    inner = InnerConfig(steps=4, lr=0.02)
    rep = reptile.meta_grad(theta, batch, inner)
    phi = P.expand(P.detach(theta), batch.n_tasks)
    for _ in range(4):
        phi = P.detach(phi, requires_grad=True)
        g = P.grads(batch.inner_loss(phi, batch.support).sum(), phi)
        phi = {k: phi[k] - 0.02 * g[k] for k in phi}
    ref = {k: (theta[k] - phi[k].detach()).mean(0) / (4 * 0.02) for k in theta}
    assert exact.rel_error(rep.grad, ref) <= 1e-6
    # k = 1: the scaled Reptile direction is the mean inner gradient at theta
    rep1 = reptile.meta_grad(theta, batch, InnerConfig(steps=1, lr=0.02))
    th = P.expand(P.detach(theta), batch.n_tasks)
    th = P.detach(th, requires_grad=True)
    g0 = P.task_mean(P.grads(batch.inner_loss(th, batch.support).sum(), th))
    assert exact.rel_error(rep1.grad, g0) <= 1e-6


def test_imaml_cg_converges_to_dense_solve():
    _, theta, batch = small_problem()
    inner = InnerConfig(steps=5, lr=0.02)
    cfg = imaml.IMAMLConfig(lam=10.0, cg_iters=200)
    im = imaml.meta_grad(theta, batch, inner, cfg)
    ref = exact.imaml(im.phi, batch, batch.support, batch.query, lam=10.0)
    assert exact.rel_error(im.grad, ref) <= 1e-6
    assert im.extra["imaml/cg_indefinite"] == 0.0
    # few iterations are an approximation: the error must shrink with more CG steps
    errs = [exact.rel_error(imaml.meta_grad(theta, batch, inner,
                                            imaml.IMAMLConfig(lam=10.0, cg_iters=n)).grad, ref)
            for n in (1, 5, 20)]
    assert errs[0] > errs[1] > errs[2]


def test_imaml_damping_and_proximal_solution():
    # tanh: a smooth inner loss, so the proximal problem has a stationary point
    _, theta, batch = small_problem(activation="tanh")
    inner = InnerConfig(steps=500, lr=0.05)
    cfg = imaml.IMAMLConfig(lam=10.0, cg_iters=200, cg_damping=0.1)
    im = imaml.meta_grad(theta, batch, inner, cfg)
    ref = exact.imaml(im.phi, batch, batch.support, batch.query, lam=10.0, damping=0.1)
    assert exact.rel_error(im.grad, ref) <= 1e-6
    # with many inner steps phi* is stationary for L_in + lam/2 |phi - theta|^2
    phi = P.detach(im.phi, requires_grad=True)
    th = P.expand(theta, batch.n_tasks)
    g = P.grads(batch.inner_loss(phi, batch.support).sum(), phi)
    resid = P.add(g, P.sub(phi, th), 10.0)
    assert float(P.flatten_tasks(resid).detach().norm()) < 1e-6


def test_imaml_flags_indefinite_systems():
    _, theta, batch = small_problem(seed=0)
    inner = InnerConfig(steps=5, lr=0.01)
    im = imaml.meta_grad(theta, batch, inner, imaml.IMAMLConfig(lam=0.1, cg_iters=50))
    H = exact.hessians(lambda p: batch.inner_loss(p, batch.support), im.phi)
    indefinite = torch.linalg.eigvalsh(torch.eye(H.shape[-1], dtype=F64) + H / 0.1)[:, 0] < 0
    assert indefinite.any()
    assert im.extra["imaml/cg_indefinite"] > 0


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "imaml"])
def test_batched_equals_per_task_loop_float32(algo):
    _, theta, batch = small_problem(n_tasks=25, dtype=torch.float32, hidden=(40, 40))
    inner = InnerConfig(steps=3, lr=0.01)
    cfg = imaml.IMAMLConfig(lam=10.0, cg_iters=5)
    a = meta_grad(algo, theta, batch, inner, cfg).grad
    b = loop_meta_grad(algo, theta, batch, inner, cfg).grad
    assert exact.rel_error(a, b) <= 1e-5


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "imaml"])
def test_task_chunks_give_the_same_meta_gradient(algo):
    _, theta, batch = small_problem(n_tasks=7)
    inner = InnerConfig(steps=2, lr=0.02)
    cfg = imaml.IMAMLConfig(lam=10.0, cg_iters=5)
    whole = meta_grad(algo, theta, batch, inner, cfg)
    parts = meta_grad(algo, theta, batch, inner, cfg, chunk=3)  # 3 + 3 + 1: unequal chunks
    assert exact.rel_error(parts.grad, whole.grad) <= 1e-12
    torch.testing.assert_close(parts.outer_loss, whole.outer_loss)
    for a, b in zip(parts.inner_losses, whole.inner_losses, strict=True):
        torch.testing.assert_close(a, b)
    assert parts.metrics().keys() == whole.metrics().keys()
    for k in whole.extra:
        assert parts.extra[k] == pytest.approx(whole.extra[k], rel=1e-6)


def test_chunk_chooser_keeps_the_fastest_chunk():
    """--task-chunk auto: candidates T, then powers of two below it; the fastest is kept for
    every later call, smaller chunks stop being tried once one is 1.5x the fastest, and the
    meta-gradient returned is the batch's."""
    import time

    from metarl.algorithms import ChunkChooser

    assert ChunkChooser.candidates(32) == [32, 16, 8, 4, 2, 1]
    assert ChunkChooser.candidates(25) == [25, 16, 8, 4, 2, 1]
    assert ChunkChooser.candidates(1) == [1]
    _, theta, batch = small_problem(n_tasks=7)
    inner = InnerConfig(steps=2, lr=0.02)

    class Timed(ChunkChooser):
        """Chunk c takes delay[c] seconds more (the warm-up on one task none)."""

        def __init__(self, delay):
            super().__init__()
            self.delay, self.calls = delay, []

        def run(self, algo, theta, batch, inner, imaml_cfg, chunk):
            self.calls.append((batch.n_tasks, chunk))
            if batch.n_tasks > 1:
                time.sleep(self.delay[chunk])
            return super().run(algo, theta, batch, inner, imaml_cfg, chunk)

    chooser = Timed({7: 0.25, 4: 0.2, 2: 0.1, 1: 0.2})  # two tasks a chunk is the fastest
    mg = chooser.meta_grad("maml", theta, batch, inner)
    assert chooser.chunk == 2 and set(chooser.seconds) == {7, 4, 2, 1}
    assert chooser.calls[0] == (1, 1)  # the untimed warm-up on one task
    assert exact.rel_error(mg.grad, meta_grad("maml", theta, batch, inner).grad) <= 1e-12
    chooser.calls.clear()
    chooser.meta_grad("maml", theta, batch, inner)
    assert chooser.calls == [(7, 2)]  # chosen once, then kept
    early = Timed({7: 0.1, 4: 0.3, 2: 0.0, 1: 0.0})  # 4 takes 3x 7: 2 and 1 are not tried
    early.meta_grad("maml", theta, batch, inner)
    assert early.chunk == 7 and set(early.seconds) == {7, 4}


def test_bad_loss_shape_is_a_clear_error():
    _, theta, batch = small_problem()

    class Mean:
        n_tasks = batch.n_tasks

        def inner_data(self, p):
            return batch.support

        outer_data = inner_data

        def inner_loss(self, p, d):
            return batch.inner_loss(p, d).mean()

        outer_loss = inner_loss

    with pytest.raises(ValueError, match=r"inner_loss returned shape \(\), expected \(3,\)"):
        maml.meta_grad(theta, Mean(), InnerConfig(steps=1, lr=0.01))


def test_recorder_replays_sampled_data():
    _, theta, batch = small_problem()

    class Sampling:
        """A batch whose data depend on a counter, like resampled trajectories."""

        n_tasks = batch.n_tasks
        calls = 0

        def inner_data(self, p):
            Sampling.calls += 1
            return batch.support.__class__(batch.support.x + 0.1 * Sampling.calls, batch.support.y)

        def outer_data(self, p):
            return batch.query

        inner_loss = outer_loss = lambda self, p, d: batch.inner_loss(p, d)

    rec = exact.Recorder(Sampling())
    inner = InnerConfig(steps=3, lr=0.02)
    mg = maml.meta_grad(theta, rec, inner)
    assert len(rec.inner) == 3 and not torch.equal(rec.inner[0].x, rec.inner[1].x)
    ref = exact.maml(theta, rec, inner, rec.inner, rec.outer)
    assert exact.rel_error(mg.grad, ref) <= 1e-6
    again = maml.meta_grad(theta, rec.replay(), inner)
    assert exact.rel_error(again.grad, mg.grad) == 0.0


@pytest.mark.slow
def test_sinusoid_maml_short_run_learns_to_adapt():
    """A short version of the full run: 5000 MAML iterations must already adapt in one step."""
    from metarl.evaluate import adaptation_values
    from metarl.outer import GradientOuter

    fam = families.make("sinusoid")
    g = torch.Generator().manual_seed(0)
    theta = P.clone_leaf(fam.init_params(g, torch.device("cpu"), torch.float32))
    outer = GradientOuter(theta, "adam", 1e-3)
    inner = InnerConfig(steps=1, lr=0.01)
    for _ in range(5000):
        outer.step(theta, fam.sample_batch(25, g), lambda th, b: maml.meta_grad(th, b, inner))
    v = adaptation_values(theta, fam, n_tasks=600, steps=1, lr=0.01, seed=0,
                          device=torch.device("cpu"), dtype=torch.float32, shots=5).mean(0)
    assert v[1] < 0.6 * v[0] and v[1] < 1.5, v


def test_memory_meter_sees_the_unrolled_graph():
    """The CPU meter counts live tensor bytes: MAML's grow with k, FOMAML's do not."""
    from metarl.memory import peak_memory

    _, theta, batch = small_problem(n_tasks=25, dtype=torch.float32, hidden=(40, 40))

    def peak(algo, k):
        with peak_memory("cpu") as p:
            meta_grad(algo, theta, batch, InnerConfig(steps=k, lr=0.01))
        return p.mb

    m5, m20 = peak("maml", 5), peak("maml", 20)
    f5, f20 = peak("fomaml", 5), peak("fomaml", 20)
    assert m20 > 2.5 * m5 > 0
    assert abs(f20 - f5) <= 0.05 * f5
