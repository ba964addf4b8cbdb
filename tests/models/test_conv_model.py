"""The Omniglot conv net batched over tasks: shapes, impls agree, exact second-order gradients."""

import pytest
import torch

from metarl import params as P
from metarl.algorithms import exact, imaml, maml
from metarl.inner import InnerConfig, adapt
from metarl.models import conv
from metarl.models.conv import ConvNet, batch_norm
from metarl.tasks.supervised import Examples, SupervisedBatch, accuracy, cross_entropy

F64 = torch.float64
# grouped over all tasks, grouped in chunks (uneven), grouped recomputed in backward (one task
# per chunk), per-task loop, vmap; fused batch norm
IMPLS = [dict(impl="grouped", task_chunk=None), dict(impl="grouped", task_chunk=2),
         dict(impl="grouped", task_chunk=1, recompute=True),
         dict(impl="loop"), dict(impl="vmap"), dict(impl="grouped", fused_bn=True),
         dict(impl="loop", fused_bn=True)]
IMPL_IDS = ["grouped", "grouped-chunked", "grouped-recompute", "loop", "vmap", "grouped-fused",
            "loop-fused"]


class SupportStatsBatch(SupervisedBatch):
    """Non-transductive batch norm: the query is normalised with support statistics."""

    def outer_loss(self, params, data):
        return self.loss(self.model.forward(params, data.x, stats_x=self.support.x), data.y)


def images(g, T, N, size, dtype=F64):
    return torch.rand(T, N, 1, size, size, generator=g, dtype=dtype)


def tiny(T=2, ways=3, shots=2, query=2, size=12, seed=0, stats="batch", **kw):
    """A tiny net (4 filters, a few hundred parameters) on random images, float64."""
    net = ConvNet(ways, filters=4, **kw)
    g = torch.Generator().manual_seed(seed)
    theta = net.init(g, dtype=F64)
    # away from the symmetric initial point (zero biases, unit scales)
    theta = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta.items()}
    ys = torch.arange(ways).repeat_interleave(shots).expand(T, -1)
    yq = torch.arange(ways).repeat_interleave(query).expand(T, -1)
    support = Examples(images(g, T, ways * shots, size), ys)
    query_set = Examples(images(g, T, ways * query, size), yq)
    cls = SupportStatsBatch if stats == "support" else SupervisedBatch
    return net, theta, cls(net, cross_entropy, accuracy, support, query_set)


def test_shapes_and_parameter_names():
    net = ConvNet(5)
    theta = net.init(torch.Generator().manual_seed(0))
    assert theta["conv0.w"].shape == (64, 1, 3, 3) and theta["conv3.w"].shape == (64, 64, 3, 3)
    assert theta["bn2.w"].shape == (64,) and theta["head.w"].shape == (64, 5)
    assert sorted(theta) == sorted([f"{p}{i}.{s}" for p in ("conv", "bn") for i in range(4)
                                    for s in "wb"] + ["head.w", "head.b"])
    assert net.out_size(28) == 2 and ConvNet(5, downsample="maxpool").out_size(28) == 1
    g = torch.Generator().manual_seed(1)
    th = P.expand(ConvNet(5, filters=8).init(g), 3)
    for ds in ("stride", "maxpool"):
        m = ConvNet(5, filters=8, downsample=ds)
        assert m(th, images(g, 3, 7, 28, torch.float32)).shape == (3, 7, 5)
        out = m(th, images(g, 3, 7, 28, torch.float32), stats_x=images(g, 3, 4, 28, torch.float32))
        assert out.shape == (3, 7, 5)


def test_initialisation_options():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    maml_init = ConvNet(5, filters=8).init(g())
    assert all(torch.equal(maml_init[f"bn{i}.w"], torch.ones(8)) for i in range(4))
    uniform = ConvNet(5, filters=8, bn_scale="uniform").init(g())
    scales = torch.stack([uniform[f"bn{i}.w"] for i in range(4)])
    assert ((scales > 0) & (scales < 1)).all() and scales.std() > 0.1  # U(0, 1)
    assert not torch.equal(uniform["bn0.w"], uniform["bn1.w"])
    half = ConvNet(5, filters=8, head_std=0.5).init(g())  # the same draws, the head scaled
    assert torch.equal(half["head.w"], 0.5 * maml_init["head.w"])
    assert all(torch.equal(half[k], maml_init[k]) for k in maml_init if k != "head.w")


def test_bad_inputs_are_clear_errors():
    net = ConvNet(5, filters=4)
    theta = net.init(torch.Generator().manual_seed(0))
    th = P.expand(theta, 2)
    x = torch.rand(2, 3, 1, 28, 28)
    with pytest.raises(ValueError, match=r"expected \[T, N, C, H, W\]"):
        net(th, x[0])
    with pytest.raises(ValueError, match=r"pass per-task parameters"):
        net(theta, x)
    with pytest.raises(ValueError, match=r"3 channels, the net was built for in_channels=1"):
        net(th, torch.rand(2, 3, 3, 28, 28))
    with pytest.raises(ValueError, match=r"too small"):
        ConvNet(5, downsample="maxpool")(th, torch.rand(2, 3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"stats_x has shape \(2, 4, 1, 14, 14\)"):
        net(th, x, stats_x=torch.rand(2, 4, 1, 14, 14))
    with pytest.raises(ValueError, match=r"unknown impl 'cuda'"):
        ConvNet(5, impl="cuda")
    with pytest.raises(ValueError, match=r"unknown downsample"):
        ConvNet(5, downsample="avgpool")
    with pytest.raises(ValueError, match=r"unknown bn_scale 'zero'"):
        ConvNet(5, bn_scale="zero")
    with pytest.raises(ValueError, match=r"head_std must be > 0"):
        ConvNet(5, head_std=0.0)


def test_automatic_task_chunks_and_recompute():
    cpu, cuda, f32 = torch.device("cpu"), torch.device("cuda"), torch.float32
    pool, stride = ConvNet(5, downsample="maxpool"), ConvNet(5)
    # max-pool: the first block is 28x28. 75 query images: 15 MB per task -> one task per
    # chunk, recomputed in backward; 5 support images: 1 MB per task -> 8 tasks, kept
    assert pool.chunk_size(32, 75, (28, 28), cpu, f32) == 1
    assert pool.chunk_size(32, 5, (28, 28), cpu, f32) == 8
    assert pool.recomputes(75, (28, 28), cpu, f32) and not pool.recomputes(5, (28, 28), cpu, f32)
    # stride 2: the first block is 14x14, a quarter of that
    assert stride.chunk_size(32, 75, (28, 28), cpu, f32) == 2
    assert stride.chunk_size(32, 5, (28, 28), cpu, f32) == 32
    assert not stride.recomputes(75, (28, 28), cpu, f32)
    # CUDA: all tasks at once, never recomputed; explicit settings win
    assert pool.chunk_size(32, 75, (28, 28), cuda, f32) == 32
    assert not pool.recomputes(75, (28, 28), cuda, f32)
    assert ConvNet(5, task_chunk=4).chunk_size(32, 75, (28, 28), cpu, f32) == 4
    assert ConvNet(5, task_chunk=64).chunk_size(32, 5, (28, 28), cpu, f32) == 32
    assert ConvNet(5, recompute=True).recomputes(5, (28, 28), cuda, f32)
    assert not ConvNet(5, downsample="maxpool", recompute=False).recomputes(75, (28, 28), cpu, f32)


@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
@pytest.mark.parametrize("stats", ["batch", "support"])
@pytest.mark.parametrize("data", ["uniform", "binary"])
def test_impls_agree_on_outputs_and_gradients(downsample, stats, data):
    """Binary images (Omniglot's ink) make constant patches, hence ties in the max-pool
    windows; some batch-norm scales are negative (the grouped path pools by their sign)."""
    g = torch.Generator().manual_seed(0)
    T, size = 3, 16
    theta = ConvNet(4, filters=6).init(g, dtype=F64)
    theta = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta.items()}
    for i in (0, 2):
        theta[f"bn{i}.w"][::2] *= -1
    x, sx = images(g, T, 5, size), images(g, T, 4, size)
    if data == "binary":
        x, sx = (x < 0.3).to(F64), (sx < 0.3).to(F64)
    y = torch.randint(0, 4, (T, 5), generator=g)
    results = []
    for kw in IMPLS:
        net = ConvNet(4, filters=6, downsample=downsample, **kw)
        th = P.detach(P.expand(theta, T), requires_grad=True)
        out = net(th, x, stats_x=sx if stats == "support" else None)
        gr = P.grads(cross_entropy(out, y).sum(), th, create_graph=True)
        # a second-order quantity: gradient of |grad|^2
        gg = P.grads(P.task_dot(gr, gr).sum(), th)
        results.append((out.detach(), P.flatten_tasks(gr).detach(), P.flatten_tasks(gg)))
    for res in results[1:]:
        for a, b in zip(res, results[0]):
            assert exact.rel_error(a, b) <= 1e-12


@pytest.mark.parametrize("kw", IMPLS, ids=IMPL_IDS)
def test_batch_norm_statistics_are_per_task(kw):
    g = torch.Generator().manual_seed(0)
    net = ConvNet(5, filters=8, **kw)
    th = P.expand(net.init(g, dtype=F64), 3)
    x = images(g, 3, 6, 28)
    out = net(th, x)
    x2 = x.clone()
    x2[1] = torch.rand(x2[1].shape, generator=g, dtype=F64)  # another task's images
    assert torch.equal(net(th, x2)[0], out[0]) and torch.equal(net(th, x2)[2], out[2])
    assert not torch.allclose(net(th, x2)[1], out[1])
    # transductive: a task's other images change an image's logits (batch statistics) ...
    x3 = x.clone()
    x3[0, 5] = torch.rand(x3[0, 5].shape, generator=g, dtype=F64)
    assert not torch.allclose(net(th, x3)[0, 0], out[0, 0])
    # ... with support statistics they do not, and the support set does
    s = images(g, 3, 4, 28)
    a, b = net(th, x, stats_x=s), net(th, x3, stats_x=s)
    assert torch.allclose(a[:, :5], b[:, :5], rtol=0, atol=1e-12)
    s2 = s.clone()
    s2[0, 0] = 1 - s2[0, 0]
    assert not torch.allclose(net(th, x, stats_x=s2)[0, 0], a[0, 0])


def test_support_statistics_match_a_direct_computation():
    """Each layer normalises the query with the support's mean and biased variance."""
    g = torch.Generator().manual_seed(0)
    net = ConvNet(3, filters=5, eps=1e-3)
    theta = net.init(g, dtype=F64)
    theta = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta.items()}
    T, x, s = 2, images(g, 2, 4, 16), images(g, 2, 3, 16)
    out = net(P.expand(theta, T), x, stats_x=s)
    for t in range(T):
        hq, hs = x[t], s[t]
        for i in range(4):
            w, bias = theta[f"conv{i}.w"], theta[f"conv{i}.b"]
            hq = torch.nn.functional.conv2d(hq, w, bias, stride=2, padding=1)
            hs = torch.nn.functional.conv2d(hs, w, bias, stride=2, padding=1)
            mean = hs.mean((0, 2, 3), keepdim=True)
            var = hs.var((0, 2, 3), keepdim=True, unbiased=False)
            gam, bet = theta[f"bn{i}.w"].view(1, -1, 1, 1), theta[f"bn{i}.b"].view(1, -1, 1, 1)
            hq = torch.relu((hq - mean) / torch.sqrt(var + 1e-3) * gam + bet)
            hs = torch.relu((hs - mean) / torch.sqrt(var + 1e-3) * gam + bet)
        ref = hq.mean((2, 3)) @ theta["head.w"] + theta["head.b"]
        assert torch.allclose(out[t], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("stats", ["batch", "support"])
@pytest.mark.parametrize("k", [1, 2])
def test_maml_second_order_equals_explicit_jacobian_and_finite_differences(kw, stats, k):
    net, theta, batch = tiny(stats=stats, **kw)
    assert 300 < P.n_params(theta) < 600
    inner = InnerConfig(steps=k, lr=0.1)
    mg = maml.meta_grad(theta, batch, inner)
    ref = exact.maml(theta, batch, inner, [batch.support] * k, batch.query)
    assert exact.rel_error(mg.grad, ref) <= 1e-6
    # central differences along random directions (the tiny net is very curved: small eps)
    d = torch.randn(8, P.n_params(theta), generator=torch.Generator().manual_seed(1), dtype=F64)
    fd = exact.central_diff(
        lambda th: exact.meta_objective(th, batch, inner, [batch.support] * k, batch.query),
        theta, eps=1e-7, directions=d)
    assert exact.rel_error(d @ P.flatten(mg.grad), fd) <= 1e-6
    # the second-order terms matter: a test that can fail
    fo = maml.meta_grad(theta, batch, inner, first_order=True)
    assert exact.rel_error(fo.grad, ref) > 1e-2


@pytest.mark.parametrize("stats", ["batch", "support"])
def test_imaml_cg_converges_to_dense_solve(stats):
    net, theta, batch = tiny(stats=stats)
    inner = InnerConfig(steps=5, lr=0.05)
    lam = 100.0  # the tiny net's inner Hessian has eigenvalues near -50: lam must exceed them
    im = imaml.meta_grad(theta, batch, inner, imaml.IMAMLConfig(lam=lam, cg_iters=100))
    H = exact.hessians(lambda p: batch.inner_loss(p, batch.support), im.phi)
    eig = torch.linalg.eigvalsh(torch.eye(H.shape[-1], dtype=F64) + H / lam)
    assert eig[:, 0].min() > 0.1  # lam makes the proximal problem strongly convex
    assert im.extra["imaml/cg_indefinite"] == 0.0
    ref = exact.imaml(im.phi, batch, batch.support, batch.query, lam=lam)
    assert exact.rel_error(im.grad, ref) <= 1e-6


def per_task_meta_grads(net, theta, support, query, k, dtype):
    """MAML meta-gradient of every task separately, ``[T, P]`` in float64.

    theta is a [T, ...] leaf (not an expand), so one backward gives each task's own
    meta-gradient instead of their mean.
    """
    T = support.x.shape[0]
    th = {n: v.to(dtype).unsqueeze(0).repeat(T, *([1] * v.dim())).requires_grad_(True)
          for n, v in theta.items()}
    batch = SupervisedBatch(net, cross_entropy, accuracy, Examples(support.x.to(dtype), support.y),
                            Examples(query.x.to(dtype), query.y))
    phi = adapt(th, batch, InnerConfig(steps=k, lr=0.4), create_graph=True).phi
    loss = batch.outer_loss(phi, batch.query).sum()
    return P.flatten_tasks(P.grads(loss, th)).to(F64)


@pytest.mark.parametrize("k", [1, 3])
def test_float32_meta_gradient_as_accurate_as_the_loop(k):
    """float32 vs float64 MAML meta-gradients on a reduced Omniglot-shaped workload.

    The median over tasks is compared, not the meta-batch total: a ReLU input
    within round-off of 0 may land on the other side of the kink in any float32
    implementation, a jump that dominates the total of the task it hits (see the
    module docstring of metarl.models.conv); which task depends on rounding order.
    """
    g = torch.Generator().manual_seed(0)
    T, ways, size = 6, 5, 28
    net = ConvNet(ways, filters=16)
    theta = P.to(P.to(net.init(g, dtype=F64), dtype=torch.float32), dtype=F64)
    ink = (torch.rand(T, 4 * ways, 1, size, size, generator=g, dtype=F64) < 0.15).to(F64)
    ys = torch.arange(ways).expand(T, -1)
    yq = torch.arange(ways).repeat(3).expand(T, -1)
    support, query = Examples(ink[:, :ways], ys), Examples(ink[:, ways:], yq)
    ref = per_task_meta_grads(ConvNet(ways, filters=16, impl="loop"), theta, support, query, k, F64)

    def median_error(**kw):
        g32 = per_task_meta_grads(ConvNet(ways, filters=16, **kw), theta, support, query, k,
                                  torch.float32)
        return float(((g32 - ref).norm(dim=1) / ref.norm(dim=1)).median())

    loop = median_error(impl="loop")
    assert loop < 1e-4
    assert median_error(impl="grouped", task_chunk=T) <= 3 * loop
    assert median_error(impl="grouped", task_chunk=4) <= 3 * loop
    assert median_error(impl="grouped", fused_bn=True) <= 3 * loop


def test_plain_batch_norm_is_exact_to_third_order():
    """Third directional derivative of batch norm = finite difference of the second.

    (The fused ``F.batch_norm`` fails this: PyTorch issue #186256; hence not the default.)
    """
    g = torch.Generator().manual_seed(0)
    x, v, w = (torch.randn(6, 3, 4, 4, generator=g, dtype=F64) for _ in range(3))
    gamma = torch.rand(3, generator=g, dtype=F64) + 0.5
    beta = torch.randn(3, generator=g, dtype=F64)

    def derivs(t0, m):
        t = torch.tensor(t0, dtype=F64, requires_grad=True)
        f = (batch_norm(x + t * v, gamma, beta, 1e-3, m) * w).sum()
        out = []
        for _ in range(3):
            (f,) = torch.autograd.grad(f, t, create_graph=True)
            out.append(f)
        return out

    for m in (None, 4):
        h = 1e-5
        fd = float((derivs(h, m)[1] - derivs(-h, m)[1]).detach()) / (2 * h)
        assert abs(float(derivs(0.0, m)[2].detach()) - fd) <= 1e-6 * abs(fd)


@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
@pytest.mark.parametrize("stats", ["batch", "support"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("large", [False, True])
def test_grouped_fused_ops_are_exact_to_third_order(downsample, stats, recompute, large,
                                                    monkeypatch):
    """Third derivatives of the grouped path (fused first block, fused batch norm / pooling /
    ReLU, recomputation) equal those of the plain-op loop, with negative batch-norm scales
    and the first block computed a few images at a time; ``large`` takes the path of large
    batches (channels-last convolutions, int64 pooling indices) instead of that of small
    ones (NCHW convolutions, pooling indices as int16)."""
    monkeypatch.setattr(conv, "BLOCK_BYTES", 1)  # one image per block
    monkeypatch.setattr(conv, "RECOMPUTE_BYTES", 0 if large else 2**40)
    g = torch.Generator().manual_seed(0)
    T, size = 3, 16
    theta = ConvNet(3, filters=4).init(g, dtype=F64)
    theta = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta.items()}
    for i in range(4):
        theta[f"bn{i}.w"][1::2] *= -1
    x, sx = images(g, T, 4, size), images(g, T, 3, size)
    y = torch.randint(0, 3, (T, 4), generator=g)
    results = []
    for kw in (dict(impl="loop"), dict(impl="grouped", task_chunk=2, recompute=recompute)):
        net = ConvNet(3, filters=4, downsample=downsample, **kw)
        th = P.detach(P.expand(theta, T), requires_grad=True)
        out = net(th, x, stats_x=sx if stats == "support" else None)
        g1 = P.grads(cross_entropy(out, y).sum(), th, create_graph=True)
        g2 = P.grads(P.task_dot(g1, g1).sum(), th, create_graph=True)
        g3 = P.grads(P.task_dot(g2, g2).sum(), th)
        results.append([P.flatten_tasks(t).detach() for t in (g1, g2, g3)])
    for a, b in zip(*results):
        assert exact.rel_error(b, a) <= 1e-12


def test_recompute_keeps_only_the_inputs_and_gives_the_same_meta_gradient():
    """With recompute the forward of a chunk saves nothing but its inputs (parameters and
    images); the meta-gradient is the same as keeping the graph, to round-off in float64."""
    g = torch.Generator().manual_seed(0)
    T, ways = 3, 3
    theta = ConvNet(ways, filters=8).init(g, dtype=F64)
    x = images(g, T, 3 * ways, 28)
    saved = {}
    for rc in (False, True):
        net = ConvNet(ways, filters=8, downsample="maxpool", recompute=rc)
        th = P.detach(P.expand(theta, T), requires_grad=True)
        nbytes = []

        def pack(t, nbytes=nbytes):
            nbytes.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(th, x)
        saved[rc] = sum(nbytes)
    inputs = x.untyped_storage().nbytes() + sum(v.numel() * 8 for v in theta.values())
    assert saved[True] <= 1.01 * inputs < 0.2 * saved[False]

    ys = torch.arange(ways).expand(T, -1)
    yq = torch.arange(ways).repeat_interleave(2).expand(T, -1)
    support, query = Examples(images(g, T, ways, 28), ys), Examples(x[:, :2 * ways], yq)
    grads = []
    for kw in (dict(impl="loop"), dict(recompute=False), dict(recompute=True),
               dict(recompute=True, task_chunk=2)):
        net = ConvNet(ways, filters=8, downsample="maxpool", **kw)
        batch = SupervisedBatch(net, cross_entropy, accuracy, support, query)
        grads.append(P.flatten(maml.meta_grad(theta, batch, InnerConfig(steps=2, lr=0.4)).grad))
    for gr in grads[1:]:
        assert exact.rel_error(gr, grads[0]) <= 1e-10
