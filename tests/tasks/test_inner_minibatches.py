"""Reptile's inner minibatches: each inner step adapts on its own minibatch of the support
set (MinibatchPlan), and every meta-gradient through them is still exact."""

import pytest
import torch

from metarl import families
from metarl import params as P
from metarl.algorithms import exact, maml, meta_grad, reptile
from metarl.inner import InnerConfig, adapt
from metarl.tasks.supervised import MinibatchPlan, SupervisedBatch

F64 = torch.float64


def planned(size=4, n_tasks=3, seed=5):
    """A sinusoid batch (10 support points per task) whose inner steps take ``size`` of them."""
    fam = families.make("sinusoid", hidden=(8, 8))
    g = torch.Generator().manual_seed(0)
    theta = fam.init_params(g, "cpu", F64)
    b = fam.sample_batch(n_tasks, g, split="train", dtype=F64)
    plan = MinibatchPlan(n_tasks, b.support.x.shape[1], size, seed)
    return theta, b, SupervisedBatch(b.model, b.loss, b._metric, b.support, b.query, plan=plan)


def test_plan_covers_every_example_once_per_epoch_and_is_a_function_of_the_step():
    plan = MinibatchPlan(n_tasks=4, n_examples=10, size=4, seed=3)
    stream = torch.cat([plan.rows(j) for j in range(5)], 1)  # 20 positions: two epochs
    assert stream.shape == (4, 20)
    for t in range(4):
        for epoch in (stream[t, :10], stream[t, 10:]):
            assert sorted(epoch.tolist()) == list(range(10))
    assert not torch.equal(stream[:, :10], stream[:, 10:])  # reshuffled every epoch
    assert not torch.equal(stream[0, :10], stream[1, :10])  # and per task
    again = MinibatchPlan(4, 10, 4, seed=3)
    assert torch.equal(again.rows(3), plan.rows(3))  # no state: step 3 first, same rows
    assert not torch.equal(MinibatchPlan(4, 10, 4, seed=4).rows(0), plan.rows(0))
    with pytest.raises(ValueError, match="at least one example"):
        MinibatchPlan(4, 10, 0, seed=3)


def test_inner_steps_adapt_on_their_minibatches_and_a_chunk_keeps_its_tasks_rows():
    _, b, pb = planned()
    for j in (0, 1, 2):
        d = pb.inner_data_at(None, j)
        rows = pb.plan.rows(j)
        assert d.x.shape[:2] == (3, 4)
        for t in range(3):
            assert torch.equal(d.x[t], b.support.x[t, rows[t]])
            assert torch.equal(d.y[t], b.support.y[t, rows[t]])
    chunk = pb.select(slice(1, 3))
    assert torch.equal(chunk.inner_data_at(None, 2).x, pb.inner_data_at(None, 2).x[1:3])
    # a plan as large as the support set is no plan
    whole = SupervisedBatch(b.model, b.loss, b._metric, b.support, b.query,
                            plan=MinibatchPlan(3, 10, 10, 0))
    assert whole.plan is None and whole.inner_data_at(None, 4) is b.support


@pytest.mark.parametrize("k", [1, 3])
def test_maml_through_minibatches_equals_explicit_jacobian_and_finite_differences(k):
    theta, b, pb = planned()
    inner = InnerConfig(steps=k, lr=0.05)
    mg = maml.meta_grad(theta, pb, inner)
    data = [pb.inner_data_at(None, j) for j in range(k)]
    ref = exact.maml(theta, b, inner, data, b.query)
    assert exact.rel_error(mg.grad, ref) <= 1e-6
    fd = exact.central_diff(lambda th: exact.meta_objective(th, b, inner, data, b.query), theta)
    assert exact.rel_error(fd, P.flatten(ref)) <= 1e-6
    # a test that can fail: the whole support set every step is another gradient
    whole = exact.maml(theta, b, inner, [b.support] * k, b.query)
    assert exact.rel_error(whole, ref) > 1e-3
    # task chunks take the same minibatches
    assert exact.rel_error(meta_grad("maml", theta, pb, inner, chunk=1).grad, ref) <= 1e-10


def test_reptile_direction_through_minibatches():
    theta, b, pb = planned(size=3)
    inner = InnerConfig(steps=4, lr=0.05)
    rep = reptile.meta_grad(theta, pb, inner)
    phi = P.expand(P.detach(theta), 3)
    for j in range(4):  # by hand: step j on its rows of every task's support set
        rows = pb.plan.rows(j)
        x = torch.stack([b.support.x[t, rows[t]] for t in range(3)])
        y = torch.stack([b.support.y[t, rows[t]] for t in range(3)])
        phi = P.detach(phi, requires_grad=True)
        g = P.grads(b.loss(b.model.forward(phi, x), y).sum(), phi)
        phi = {key: phi[key] - 0.05 * g[key] for key in phi}
    ref = {key: (theta[key] - phi[key].detach()).mean(0) / (4 * 0.05) for key in theta}
    assert exact.rel_error(rep.grad, ref) <= 1e-6
    # an adaptation continued over two calls takes steps 2 and 3 next, not 0 and 1 again
    first = adapt(P.expand(theta, 3), pb, inner.with_steps(2, 0.05), create_graph=False)
    rest = adapt(first.phi, pb, inner.with_steps(2, 0.05), create_graph=False,
                 state=first.state)
    assert exact.rel_error(P.task_mean(P.sub(P.expand(theta, 3), rest.phi)),
                           P.scale(rep.grad, 4 * 0.05)) <= 1e-6
