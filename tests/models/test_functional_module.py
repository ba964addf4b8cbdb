"""FunctionalModule: any nn.Module with per-task weights; exact second-order meta-gradients."""

import copy

import pytest
import torch
from torch import nn

from metarl import params as P
from metarl.algorithms import exact, imaml, maml
from metarl.inner import InnerConfig
from metarl.models import FunctionalModule
from metarl.models.conv import ConvNet
from metarl.models.mlp import MLP
from metarl.models.module import TaskBatchNorm
from metarl.tasks.supervised import Examples, SupervisedBatch, accuracy, cross_entropy, mse

F64 = torch.float64


class ConvLN(nn.Module):
    """conv 3x3 stride 2 -> layer norm over (C, H, W) -> tanh -> linear; a shared buffer."""

    def __init__(self, ways: int = 3, filters: int = 3, size: int = 6) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(0.5))
        self.conv = nn.Conv2d(1, filters, 3, stride=2, padding=1)
        s = (size + 1) // 2
        self.norm = nn.LayerNorm([filters, s, s])
        self.head = nn.Linear(filters * s * s, ways)

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x - self.pixel_mean)))
        return self.head(h.flatten(1))


class ConvBN(nn.Module):
    """conv 3x3 stride 2 -> batch norm (training mode) -> tanh -> mean over space -> linear."""

    def __init__(self, ways: int = 3, filters: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, filters, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(filters, eps=1e-3)
        self.head = nn.Linear(filters, ways)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(2).mean(2))


class ConvNetModule(nn.Module):
    """metarl.models.conv.ConvNet (stride downsampling) written as an ordinary nn.Module."""

    def __init__(self, ways: int, filters: int = 4, blocks: int = 4) -> None:
        super().__init__()
        layers, c = [], 1
        for _ in range(blocks):
            layers += [nn.Conv2d(c, filters, 3, stride=2, padding=1),
                       nn.BatchNorm2d(filters, eps=1e-3), nn.ReLU()]
            c = filters
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(filters, ways)

    def forward(self, x):
        return self.head(self.body(x).flatten(2).mean(2))


def mlp_module(hidden=(8, 8), act=nn.Tanh):
    sizes = [1, *hidden, 1]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def perturbed(model, g, scale=0.1):
    """float64 parameters away from the symmetric initial point (unit scales, zero shifts)."""
    theta = model.init(g, dtype=F64)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta.items()}


def classification(net, T=2, ways=3, shots=2, query=2, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = FunctionalModule(net)
    theta = perturbed(model, g)
    ys = torch.arange(ways).repeat_interleave(shots).expand(T, -1)
    yq = torch.arange(ways).repeat_interleave(query).expand(T, -1)
    xs = torch.rand(T, ways * shots, 1, size, size, generator=g, dtype=F64)
    xq = torch.rand(T, ways * query, 1, size, size, generator=g, dtype=F64)
    return model, theta, SupervisedBatch(model, cross_entropy, accuracy, Examples(xs, ys),
                                         Examples(xq, yq))


def regression(net, T=3, shots=5, query=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = FunctionalModule(net)
    theta = perturbed(model, g, scale=0.3)
    x = torch.rand(T, shots + query, 1, generator=g, dtype=F64) * 10 - 5
    amp = torch.rand(T, 1, 1, generator=g, dtype=F64) * 4.9 + 0.1
    y = amp * torch.sin(x + torch.rand(T, 1, 1, generator=g, dtype=F64) * 3)
    return model, theta, SupervisedBatch(model, mse, mse, Examples(x[:, :shots], y[:, :shots]),
                                         Examples(x[:, shots:], y[:, shots:]))


PROBLEMS = {
    "conv-layernorm": lambda: classification(ConvLN()),
    "conv-batchnorm": lambda: classification(ConvBN()),
    "mlp": lambda: regression(mlp_module()),
}


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("k", [1, 2])
def test_maml_second_order_equals_explicit_jacobian_and_finite_differences(name, k):
    model, theta, batch = PROBLEMS[name]()
    assert 50 < P.n_params(theta) < 300  # tiny: explicit Hessians
    inner = InnerConfig(steps=k, lr=0.1)
    mg = maml.meta_grad(theta, batch, inner)
    ref = exact.maml(theta, batch, inner, [batch.support] * k, batch.query)
    assert exact.rel_error(mg.grad, ref) <= 1e-6
    d = torch.randn(8, P.n_params(theta), generator=torch.Generator().manual_seed(1), dtype=F64)
    fd = exact.central_diff(
        lambda th: exact.meta_objective(th, batch, inner, [batch.support] * k, batch.query),
        theta, eps=1e-6, directions=d)
    assert exact.rel_error(d @ P.flatten(mg.grad), fd) <= 1e-6
    fo = maml.meta_grad(theta, batch, inner, first_order=True)
    assert exact.rel_error(fo.grad, ref) > 1e-2  # the second-order terms matter


@pytest.mark.parametrize("name", ["conv-layernorm", "mlp"])
def test_imaml_cg_converges_to_dense_solve(name):
    model, theta, batch = PROBLEMS[name]()
    inner = InnerConfig(steps=5, lr=0.05)
    lam = 50.0
    im = imaml.meta_grad(theta, batch, inner, imaml.IMAMLConfig(lam=lam, cg_iters=100))
    H = exact.hessians(lambda p: batch.inner_loss(p, batch.support), im.phi)
    eig = torch.linalg.eigvalsh(torch.eye(H.shape[-1], dtype=F64) + H / lam)
    assert eig[:, 0].min() > 0.1  # strongly convex proximal problem: CG applies
    assert im.extra["imaml/cg_indefinite"] == 0.0
    ref = exact.imaml(im.phi, batch, batch.support, batch.query, lam=lam)
    assert exact.rel_error(im.grad, ref) <= 1e-6


def to_mlp_params(theta):
    """nn.Sequential(Linear, act, Linear, ...) parameters -> MLP's (weights transposed)."""
    n = len(theta) // 2
    out = {f"l{i}.w": theta[f"{2 * i}.weight"].transpose(-1, -2) for i in range(n)}
    return out | {f"l{i}.b": theta[f"{2 * i}.bias"] for i in range(n)}


def test_sequential_equals_builtin_mlp_outputs_and_meta_gradients():
    model, theta, batch = regression(mlp_module((8, 8), nn.ReLU))
    mlp = MLP(1, 1, (8, 8), "relu")
    mlp_batch = SupervisedBatch(mlp, mse, mse, batch.support, batch.query)
    th_mlp = to_mlp_params(theta)
    T = batch.n_tasks
    out = model(P.expand(theta, T), batch.query.x)
    assert out.shape == (T, 5, 1)
    assert torch.allclose(out, mlp(P.expand(th_mlp, T), batch.query.x), rtol=0, atol=1e-12)
    inner = InnerConfig(steps=2, lr=0.1)
    a = maml.meta_grad(theta, batch, inner)
    b = maml.meta_grad(th_mlp, mlp_batch, inner)
    assert exact.rel_error(to_mlp_params(a.grad), b.grad) <= 1e-12
    assert exact.rel_error(a.outer_loss, b.outer_loss) <= 1e-12
    assert exact.rel_error(b.grad, maml.meta_grad(th_mlp, mlp_batch, InnerConfig(
        steps=1, lr=0.1)).grad) > 1e-3  # k matters: the comparison can tell steps apart


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_vmap_equals_loop_and_module_per_task(name):
    model, theta, batch = PROBLEMS[name]()
    T = batch.n_tasks
    g = torch.Generator().manual_seed(2)
    th_T = {k: (v + 0.1 * torch.randn(T, *v.shape, generator=g, dtype=F64)).requires_grad_(True)
            for k, v in theta.items()}  # a different theta per task
    loop = FunctionalModule(model.module, impl="loop")
    results = []
    for m in (model, loop):
        out = m(th_T, batch.support.x)
        gr = P.grads(batch.loss(out, batch.support.y).sum(), th_T, create_graph=True)
        gg = P.grads(P.task_dot(gr, gr).sum(), th_T)  # second order: gradient of |grad|^2
        results.append((out.detach(), P.flatten_tasks(gr).detach(), P.flatten_tasks(gg)))
    for a, b in zip(*results):
        assert exact.rel_error(a, b) <= 1e-12
    # the module itself, task by task, with that task's weights loaded
    for t in range(T):
        net = copy.deepcopy(model.module).double()
        net.load_state_dict({k: v[t] for k, v in th_T.items()}, strict=False)
        with torch.no_grad():
            assert torch.allclose(results[0][0][t], net(batch.support.x[t]), rtol=0, atol=1e-12)
    # task t's output depends on task t's data only
    x2 = batch.support.x.clone()
    x2[1] = torch.rand(x2[1].shape, generator=g, dtype=F64)
    out2 = model(P.detach(th_T), x2)
    assert torch.equal(out2[0], results[0][0][0])
    assert not torch.allclose(out2[1], results[0][0][1])


def test_batch_norm_is_per_task_transductive_like_the_builtin_convnet():
    net = ConvNetModule(3)
    model = FunctionalModule(net)
    assert isinstance(model.module.body[1], TaskBatchNorm)
    assert isinstance(net.body[1], nn.BatchNorm2d)  # the user's module is not changed
    assert "body.1.running_mean" not in model.names
    conv = ConvNet(3, filters=4)
    g = torch.Generator().manual_seed(0)
    th_c = perturbed(conv, g)
    theta = {"head.weight": th_c["head.w"].T, "head.bias": th_c["head.b"]}
    for i in range(4):
        theta |= {f"body.{3 * i}.weight": th_c[f"conv{i}.w"],
                  f"body.{3 * i}.bias": th_c[f"conv{i}.b"],
                  f"body.{3 * i + 1}.weight": th_c[f"bn{i}.w"],
                  f"body.{3 * i + 1}.bias": th_c[f"bn{i}.b"]}
    T, ways = 2, 3
    x = torch.rand(T, 6, 1, 12, 12, generator=g, dtype=F64)
    xq = torch.rand(T, 6, 1, 12, 12, generator=g, dtype=F64)
    y = torch.arange(ways).repeat(2).expand(T, -1)
    out = model(P.expand(theta, T), x)
    assert torch.allclose(out, conv(P.expand(th_c, T), x), rtol=0, atol=1e-12)
    # transductive: another image of the same task changes an image's logits
    x3 = x.clone()
    x3[0, 5] = torch.rand(x3[0, 5].shape, generator=g, dtype=F64)
    assert not torch.allclose(model(P.expand(theta, T), x3)[0, 0], out[0, 0])
    inner = InnerConfig(steps=2, lr=0.4)
    a = maml.meta_grad(theta, SupervisedBatch(model, cross_entropy, accuracy, Examples(x, y),
                                              Examples(xq, y)), inner)
    b = maml.meta_grad(th_c, SupervisedBatch(conv, cross_entropy, accuracy, Examples(x, y),
                                             Examples(xq, y)), inner)
    assert exact.rel_error(a.grad["head.weight"], b.grad["head.w"].T) <= 1e-10
    assert exact.rel_error(a.grad["body.4.weight"], b.grad["bn1.w"]) <= 1e-10
    assert exact.rel_error(a.grad["body.9.weight"], b.grad["conv3.w"]) <= 1e-10
    # running statistics neither read nor updated
    assert torch.equal(net.body[1].running_mean, torch.zeros(4))
    assert int(net.body[1].num_batches_tracked) == 0


def test_batch_norm_1d_without_affine_normalises_each_task():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, affine=False))
    model = FunctionalModule(net)
    assert model.names == ["0.weight", "0.bias"]
    theta = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x = torch.randn(4, 6, 2, dtype=F64) * torch.arange(1, 5, dtype=F64).view(4, 1, 1)
    out = model(P.expand(theta, 4), x)  # [T, N, 3]: per task, per feature mean 0 and var 1
    assert torch.allclose(out.mean(1), torch.zeros(4, 3, dtype=F64), atol=1e-12)
    h_var = (x @ theta["0.weight"].T + theta["0.bias"]).var(1, unbiased=False)  # [T, 3]
    assert torch.allclose(out.var(1, unbiased=False), h_var / (h_var + 1e-5), atol=1e-12)


def test_batch_norm_in_eval_mode_uses_shared_running_statistics():
    net = ConvBN()
    net.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    net.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 1.5]))
    net.bn.eval()
    model, theta, batch = classification(net)
    assert isinstance(model.module.bn, nn.BatchNorm2d)  # not replaced: running statistics
    th_T = P.expand(theta, batch.n_tasks)
    out = model(th_T, batch.support.x)
    ref = copy.deepcopy(net).double()
    ref.load_state_dict(theta, strict=False)
    with torch.no_grad():
        for t in range(batch.n_tasks):
            assert torch.allclose(out[t], ref(batch.support.x[t]), rtol=0, atol=1e-12)
            # an image's logits do not depend on the other images of its task
            assert torch.allclose(out[t, :1], ref(batch.support.x[t, :1]), rtol=0, atol=1e-12)
    mg = maml.meta_grad(theta, batch, InnerConfig(steps=1, lr=0.1))
    ref_g = exact.maml(theta, batch, InnerConfig(steps=1, lr=0.1), [batch.support], batch.query)
    assert exact.rel_error(mg.grad, ref_g) <= 1e-6
    assert torch.equal(net.bn.running_mean, torch.tensor([0.1, -0.2, 0.3, 0.0]))  # not updated


def test_init_is_the_modules_own_and_reproducible_from_the_generator():
    net = ConvLN()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = FunctionalModule(net)
    rng = torch.get_rng_state()
    a = model.init(torch.Generator().manual_seed(3), dtype=F64)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not used
    b = model.init(torch.Generator().manual_seed(3))
    c = model.init(torch.Generator().manual_seed(4), dtype=F64)
    assert list(a) == model.names == [n for n, _ in net.named_parameters()]
    assert all(torch.equal(a[k].float(), b[k]) and b[k].dtype == torch.float32 for k in a)
    assert not torch.equal(a["conv.weight"], c["conv.weight"])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(a["conv.weight"], net.conv.weight.double())  # drawn, not copied
    # the module's own initialisation: nn.Linear and nn.Conv2d draw from U(-1/sqrt(fan_in), ...)
    for name, fan_in in (("head.weight", 27), ("head.bias", 27), ("conv.weight", 9)):
        bound = fan_in ** -0.5
        assert a[name].abs().max() <= bound and a[name].abs().max() > 0.8 * bound
    assert torch.equal(a["norm.weight"], torch.ones(3, 3, 3, dtype=F64))
    assert torch.equal(a["norm.bias"], torch.zeros(3, 3, 3, dtype=F64))
    # a parent's reset_parameters runs after its children's, as in construction
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def reset_parameters(self):
            nn.init.zeros_(self.lin.weight)

        def forward(self, x):
            return self.lin(x)

    assert torch.equal(FunctionalModule(Parent()).init(torch.Generator())["lin.weight"],
                       torch.zeros(3, 3))
    # batch norm (replaced for batch statistics) resets to scale 1, shift 0
    bn = FunctionalModule(ConvBN()).init(torch.Generator().manual_seed(0))
    assert torch.equal(bn["bn.weight"], torch.ones(4))
    assert torch.equal(bn["bn.bias"], torch.zeros(4))


def test_init_copy_takes_the_modules_current_values():
    net = mlp_module()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    theta = FunctionalModule(net, init="copy").init(g, dtype=F64)
    assert torch.equal(g.get_state(), state)  # the generator is not advanced
    assert all(torch.equal(theta[k], p.detach().double()) for k, p in net.named_parameters())
    theta["0.weight"].add_(1.0)  # a copy, not a view of the module's tensors
    assert not torch.equal(theta["0.weight"], net[0].weight.double())


def test_buffers_and_frozen_parameters_are_shared_not_meta_learned():
    net = ConvLN()
    net.conv.bias.requires_grad_(False)  # frozen: shared like a buffer
    model = FunctionalModule(net)
    assert "pixel_mean" not in model.names and "conv.bias" not in model.names
    theta = model.init(torch.Generator().manual_seed(0), dtype=F64)
    assert "conv.bias" not in theta
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 4, 1, 6, 6, generator=g, dtype=F64)
    th_T = P.detach(P.expand(theta, 2), requires_grad=True)
    out = model(th_T, x)  # float32 buffer and frozen bias cast to the params' float64
    assert out.dtype == F64
    P.grads(out.sum(), th_T)  # every meta-learned parameter is used
    ref = copy.deepcopy(net).double()
    ref.load_state_dict(theta, strict=False)
    with torch.no_grad():
        assert torch.allclose(out[1], ref(x[1]), rtol=0, atol=1e-12)
    # the buffer's value at construction is what every task sees
    net2 = copy.deepcopy(net)
    net2.pixel_mean.fill_(0.0)
    out2 = FunctionalModule(net2)(th_T, x)
    assert not torch.allclose(out2, out)
    net.pixel_mean.fill_(0.0)  # later changes to the user's module do not reach the copy
    assert torch.equal(model(th_T, x), out)


def test_tied_weights_appear_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    net = Tied()
    model = FunctionalModule(net, init="copy")
    assert model.names == ["a.weight", "a.bias", "b.bias"]
    theta = model.init(torch.Generator(), dtype=F64)
    x = torch.randn(2, 3, 4, dtype=F64)
    th_T = P.expand(theta, 2)
    w, a, b = theta["a.weight"], theta["a.bias"], theta["b.bias"]
    assert torch.allclose(model(th_T, x), torch.tanh(x @ w.T + a) @ w.T + b, rtol=0, atol=1e-12)


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x), x


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x + 0.1 * torch.randn_like(x))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_bad_modules_are_clear_errors():
    with pytest.raises(TypeError, match=r"expects a torch.nn.Module instance, got function"):
        FunctionalModule(lambda x: x)
    with pytest.raises(TypeError, match=r"got the class Linear: construct it first"):
        FunctionalModule(nn.Linear)
    with pytest.raises(TypeError, match=r"got MLP: it is already a metarl model"):
        FunctionalModule(MLP(1, 1))
    with pytest.raises(ValueError, match=r"ReLU has no trainable parameters"):
        FunctionalModule(nn.ReLU())
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"Linear has no trainable parameters"):
        FunctionalModule(frozen)
    with pytest.raises(ValueError, match=r"'1' \(Dropout\) is dropout in training mode \(p=0.5\)"):
        FunctionalModule(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    FunctionalModule(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5).eval()))  # eval: fine
    with pytest.raises(ValueError, match=r"uninitialised lazy parameter 'weight'.*run the module "
                                         r"once"):
        FunctionalModule(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"instance norm updating running statistics"):
        FunctionalModule(nn.Sequential(nn.Conv2d(1, 2, 3),
                                       nn.InstanceNorm2d(2, track_running_stats=True)))
    with pytest.raises(ValueError, match=r"init='reset' cannot redraw \['scale'\].*init='copy'"):
        FunctionalModule(Scaled())
    assert FunctionalModule(Scaled(), init="copy").names == ["scale", "lin.weight", "lin.bias"]
    with pytest.raises(ValueError, match=r"unknown init 'xavier'"):
        FunctionalModule(nn.Linear(2, 2), init="xavier")
    with pytest.raises(ValueError, match=r"unknown impl 'grouped': use 'vmap' or 'loop'"):
        FunctionalModule(nn.Linear(2, 2), impl="grouped")


def test_bad_calls_are_clear_errors():
    model = FunctionalModule(nn.Linear(2, 3))
    theta = model.init(torch.Generator().manual_seed(0))
    th = P.expand(theta, 4)
    x = torch.randn(4, 5, 2)
    with pytest.raises(ValueError, match=r"x has shape \(2,\), expected \[T, N, \*in\]"):
        model(th, x[0, 0])
    with pytest.raises(ValueError, match=r"missing \['bias'\], unexpected \['b'\]"):
        model({"weight": th["weight"], "b": th["bias"]}, x)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 2\), expected \[T=4, 3, 2\]: "
                                         r"pass per-task parameters"):
        model(theta, x)
    with pytest.raises(ValueError, match=r"weight has shape \(4, 3, 2\), expected \[T=2, 3, 2\]"):
        model(th, x[:2])
    for impl in ("vmap", "loop"):
        with pytest.raises(TypeError, match=r"Pair.forward returned tuple, expected one Tensor"):
            FunctionalModule(Pair(), impl=impl)(P.expand(FunctionalModule(Pair()).init(
                torch.Generator()), 4), x)
    noisy = FunctionalModule(Noisy())
    with pytest.raises(ValueError, match=r"Noisy.forward calls a random operation"):
        noisy(P.expand(noisy.init(torch.Generator()), 4), x)
    pooled = FunctionalModule(nn.Sequential(nn.Linear(2, 3), nn.Flatten(0)))
    with pytest.raises(ValueError, match=r"maps x \(4, 5, 2\) to \(4, 15\), expected "
                                         r"\[T=4, N=5, \*out\]"):
        pooled(P.expand(pooled.init(torch.Generator()), 4), x)


def test_custom_module_example_runs_and_learns():
    from examples.custom_module import main

    r = main(iterations=400)
    assert r.after < r.before  # adapting to a new task's support set helps ...
    assert r.after < r.untrained_after - 0.5  # ... and meta-training made it help more
