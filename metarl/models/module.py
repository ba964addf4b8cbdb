"""Any ``torch.nn.Module`` as a metarl model: per-task weights, ``functional_call`` under ``vmap``.

``FunctionalModule(net)`` turns a user's network into a :class:`~metarl.models.base.Model`:
``forward(params, x)`` runs ``torch.func.functional_call(net, params_t, x_t)`` for every
task t at once under ``torch.func.vmap``, so task t's weights see task t's inputs only,
and ``init(generator)`` gives the meta-parameters. The algorithms differentiate the
vmapped forward with plain ``torch.autograd.grad`` (never ``torch.func.grad`` inside
``vmap``, which gave wrong second-order gradients through batch norm, DESIGN section 3):
MAML's second-order meta-gradient through it is exact (tests compare it in float64 with
the explicit Jacobian and with finite differences).

Speed (sinusoid MAML, meta-batch 25, K = 10, k = 5 inner steps, 1-40-40-1 ReLU net, float32,
one thread of a loaded 2-core CPU, torch 2.13): one meta-gradient (forward and backward)
through ``FunctionalModule(nn.Sequential(...))`` took about 2x the time of the built-in
:class:`~metarl.models.mlp.MLP` (``baddbmm``) with the same weights (median of paired
timings 1.9-2.0x; single pairs 1.0-2.8x). The forward alone is about 5x: on layers this
small, the Python cost of ``functional_call`` (swapping the module's tensors) and of
``vmap`` (flattening the parameter dicts) dominates. On CPU a conv net under ``vmap`` can
also be slower than a loop over tasks (DESIGN section 3: 2.3x on Omniglot's conv-4);
``impl="loop"`` is offered to measure against. The built-in ``MLP`` and ``ConvNet`` stay
the fast paths; use this for architectures they do not cover.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metarl.types import Params

Init = Literal["reset", "copy"]
Impl = Literal["vmap", "loop"]
INITS = ("reset", "copy")
IMPLS = ("vmap", "loop")

_BatchNorm = nn.modules.batchnorm._BatchNorm  # pyright: ignore[reportPrivateUsage]
_InstanceNorm = nn.modules.instancenorm._InstanceNorm  # pyright: ignore[reportPrivateUsage]
_DropoutNd = nn.modules.dropout._DropoutNd  # pyright: ignore[reportPrivateUsage]


class TaskBatchNorm(nn.Module):
    """Batch norm with the statistics of the batch it is given, never running statistics.

    Replaces a batch-norm layer that would use batch statistics (training mode, or
    ``track_running_stats=False``) inside :class:`FunctionalModule`'s copy of the network.
    Under ``vmap`` "the batch" is one task's inputs, so the statistics are per task and per
    channel: transductive batch norm, as the built-in ConvNet does (MAML's Omniglot set-up;
    query inputs are normalised with query statistics). Plain tensor ops with the two-pass
    variance ``mean((x - mean)^2)`` (biased, as batch norm normalises), exact to every order
    of derivative; the fused ``F.batch_norm`` is wrong from the third derivative on (PyTorch
    issue #186256, see :mod:`metarl.models.conv`). Parameters keep the layer's names
    (``weight``, ``bias``); the running buffers are dropped (never read, never updated).
    """

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"TaskBatchNorm replaces a batch-norm layer, got {type(bn).__name__}")
        self.weight = bn.weight  # [C] or None (affine=False)
        self.bias = bn.bias
        self.eps = float(bn.eps)
        self.kind = type(bn).__name__
        check = type(bn)._check_input_dim  # pyright: ignore[reportPrivateUsage]
        # BatchNorm{1,2,3}d's, called with this module as self: it reads only the input's dim
        self._check_dim: Callable[[Any, Tensor], None] = check

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, C, *]`` normalised over N and the trailing dimensions, per channel."""
        self._check_dim(self, x)
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)  # [1, C, 1...]
        d = x - mean
        var = (d * d).mean(dims, keepdim=True)  # two-pass: no E[x^2] - E[x]^2 cancellation
        shape = [1, -1] + [1] * (x.dim() - 2)
        inv = torch.rsqrt(var + self.eps)
        if self.weight is None or self.bias is None:  # affine=False
            return d * inv
        return torch.addcmul(self.bias.view(shape), d, self.weight.view(shape) * inv)

    def reset_parameters(self) -> None:
        """Batch norm's own initialisation: scale 1, shift 0."""
        if self.weight is not None and self.bias is not None:
            with torch.no_grad():
                self.weight.fill_(1.0)
                self.bias.zero_()

    def extra_repr(self) -> str:
        return f"{self.kind}, eps={self.eps}, per-task batch statistics"


class FunctionalModule:
    """A ``torch.nn.Module`` with per-task weights ``[T, ...]`` on inputs ``[T, N, *in]``.

    The module's ``forward`` sees ONE task's inputs ``[N, *in]`` (a normal batch) and
    must return one tensor ``[N, *out]``; :meth:`forward` runs it for all T tasks under
    ``torch.func.vmap`` and returns ``[T, N, *out]``. A drop-in model for
    :class:`~metarl.tasks.supervised.SupervisedBatch`, like ``MLP`` and ``ConvNet``.

    What is meta-learned and what is shared:

    - Params are the module's trainable parameters, keyed by their ``named_parameters()``
      names (``"0.weight"``, ``"head.bias"``); tied parameters appear once. So
      ``net.load_state_dict(theta, strict=False)`` loads meta-parameters back into ``net``.
    - Buffers (normalisation constants, masks, running statistics in eval mode) are NOT
      meta-learned: they are shared by every task (broadcast, not stacked) and keep the
      values they had when the FunctionalModule was built. So do parameters with
      ``requires_grad=False`` (a frozen backbone). Floating ones are cast to the params'
      dtype and moved to the inputs' device. The forward must not update them in place.

    The module is deep-copied at construction (structure, buffers, train/eval modes);
    later changes to ``module`` do not reach the copy. In that copy:

    - Batch norm that would use batch statistics (a layer in training mode, or with
      ``track_running_stats=False``) becomes :class:`TaskBatchNorm`: per-task batch
      statistics, transductive (each task's batch x is normalised with its own
      statistics), running statistics never read nor updated. (In place they would have
      to be updated under ``vmap`` from T tasks at once, which PyTorch refuses.) A
      batch-norm layer in eval mode (``layer.eval()``) normalises with its running
      statistics instead: shared buffers, never updated.
    - Dropout in training mode (``p > 0``) is refused: it would make the loss on fixed
      data random, while iMAML's Hessian-vector products and the gradient checks
      re-evaluate it and need the same value each time.

    Args:
        module: the network, an ``nn.Module`` instance with at least one trainable
            parameter (lazy modules must have run once so that their shapes are known).
        init: how :meth:`init` makes meta-parameters. ``"reset"`` (default): the module's
            own initialisation, reproducible from the generator: one seed is drawn from
            the generator, and under ``torch.random.fork_rng`` (the global RNG is left as
            it was) a float64 CPU copy re-runs ``reset_parameters()`` (or
            ``_reset_parameters()``, as ``nn.MultiheadAttention`` names it) of every
            submodule, children before parents (as construction order does). Every
            trainable parameter must be owned by a module with such a method; else a
            ``ValueError`` names it. ``"copy"``: the module's current values, whatever the
            generator (a pretrained network; the generator is not advanced).
        impl: ``"vmap"`` (default): all tasks in one vmapped call. ``"loop"``: one
            ``functional_call`` per task, stacked: the reference, and possibly faster for
            convolutions on CPU (see the module docstring).

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` instance (a class, a function, a
            metarl model).
        ValueError: no trainable parameters, uninitialised lazy parameters, dropout or
            running-statistics instance norm in training mode, a parameter ``init="reset"``
            cannot redraw, an unknown ``init`` or ``impl``.

    Example::

        net = nn.Sequential(nn.Linear(1, 40), nn.LayerNorm(40), nn.ReLU(), nn.Linear(40, 1))
        model = FunctionalModule(net)
        theta = P.clone_leaf(model.init(torch.Generator().manual_seed(0)))
        batch = SupervisedBatch(model, mse, mse, support, query)  # x [T, N, 1]
        mg = maml.meta_grad(theta, batch, InnerConfig(steps=1, lr=0.01))

    References: Finn et al. 2017 (MAML), section 2.2: the model only needs to be
    differentiable in its parameters.
    """

    def __init__(self, module: nn.Module, *, init: Init = "reset", impl: Impl = "vmap") -> None:
        _check_is_module(module)
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}: use 'reset' (the module's own "
                             "initialisation, drawn from the generator) or 'copy' (its "
                             "current values)")
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}: use 'vmap' or 'loop'")
        _check_modes(module)
        self.init_scheme: Init = init
        self.impl: Impl = impl
        self.module = _with_task_batch_norm(copy.deepcopy(module))
        self.names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        """The Params keys: the module's trainable parameter names, in its order."""
        if not self.names:
            raise ValueError(f"{type(module).__name__} has no trainable parameters to "
                             "meta-learn: give it parameters (or set requires_grad=True on "
                             "frozen ones)")
        self.shapes = {n: tuple(self.module.get_parameter(n).shape) for n in self.names}
        """Name -> shape of one task's parameter (no task dimension)."""
        self._shared = {**{n: p.detach() for n, p in self.module.named_parameters()
                           if not p.requires_grad},
                        **{n: b.detach() for n, b in self.module.named_buffers()}}
        self._shared_cache: dict[tuple[torch.device, torch.dtype], Params] = {}
        self._tied = any(len(list(f(remove_duplicate=False))) != len(list(f()))
                         for f in (self.module.named_parameters, self.module.named_buffers))
        if init == "reset":
            _check_resettable(self.module, self.names)

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Params:
        """Fresh meta-parameters (no task dimension), keyed like ``module.named_parameters()``.

        ``init="reset"``: the module's own initialisation, drawn in float64 on the CPU
        from a seed taken from ``generator`` (the same generator state gives the same
        parameters on every device and dtype; the global RNG is untouched).
        ``init="copy"``: the module's values at construction.
        """
        if self.init_scheme == "copy":
            return {n: self.module.get_parameter(n).detach().to(device=device, dtype=dtype,
                                                                 copy=True)
                    for n in self.names}
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        fresh = copy.deepcopy(self.module).to(device="cpu", dtype=torch.float64)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for mod in _post_order(fresh):
                reset = _reset_method(mod)
                if reset is not None:
                    reset()
        return {n: fresh.get_parameter(n).detach().to(device=device, dtype=dtype)
                for n in self.names}

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """Every task's outputs under that task's weights.

        Args:
            params: per-task parameters, keys :attr:`names`, leaves ``[T, *shape]``.
            x: inputs ``[T, N, *in]``; the module sees ``x[t]`` (``[N, *in]``).

        Returns:
            ``[T, N, *out]``: ``module(x[t])`` with task t's parameters, stacked.

        Raises:
            ValueError: x without a task dimension, params with missing or unexpected
                keys, leaves that are not ``[T, *shape]``, a random op in the forward.
            TypeError: the module returned something other than one tensor.
        """
        T = self._check(params, x)
        shared = self._shared_for(params, x)
        try:
            if self.impl == "vmap":
                out: Any = vmap(lambda p, xt: self._call(p, xt, shared))(params, x)
            else:
                per_task = {k: v.unbind(0) for k, v in params.items()}
                outs = [self._call({k: v[t] for k, v in per_task.items()}, xt, shared)
                        for t, xt in enumerate(x.unbind(0))]
                out = (torch.stack(outs) if all(isinstance(o, Tensor) for o in outs)
                       else outs[0])
        except RuntimeError as e:
            if "random operation" in str(e):
                raise ValueError(
                    f"{type(self.module).__name__}.forward calls a random operation (dropout, "
                    "noise): the loss on fixed data must be a deterministic function of the "
                    "parameters; remove it or disable it in the module's eval mode") from e
            raise
        if not isinstance(out, Tensor):
            raise TypeError(f"{type(self.module).__name__}.forward returned "
                            f"{type(out).__name__}, expected one Tensor [N, *out]: return only "
                            "the prediction (e.g. the logits)")
        if out.dim() < 2 or out.shape[:2] != x.shape[:2]:
            raise ValueError(f"the module maps x {tuple(x.shape)} to {tuple(out.shape)}, "
                             f"expected [T={T}, N={x.shape[1]}, *out]: its forward must keep "
                             "the batch dimension of its input")
        return out

    __call__ = forward

    def _call(self, p: Params, xt: Tensor, shared: Params) -> Any:
        # keys checked by _check, shared complete by construction: strict=False saves time;
        # tie_weights only where the module has tied tensors (it walks the module every call)
        return functional_call(self.module, (p, shared), (xt,), tie_weights=self._tied)

    def _shared_for(self, params: Params, x: Tensor) -> Params:
        """Buffers and frozen parameters on x's device, floating ones in the params' dtype."""
        dtype = params[self.names[0]].dtype
        key = (x.device, dtype)
        if key not in self._shared_cache:
            self._shared_cache[key] = {
                n: v.to(device=x.device, dtype=dtype) if v.is_floating_point()
                else v.to(device=x.device) for n, v in self._shared.items()}
        return self._shared_cache[key]

    def _check(self, params: Params, x: Tensor) -> int:
        if not isinstance(x, Tensor) or x.dim() < 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x has shape {got}, expected [T, N, *in]: one batch of inputs "
                             "per task (add the task dimension)")
        T = x.shape[0]
        missing = [n for n in self.names if n not in params]
        unexpected = [k for k in params if k not in self.shapes]
        if missing or unexpected:
            raise ValueError(f"params do not fit {type(self.module).__name__}: missing "
                             f"{missing}, unexpected {unexpected}; expected the keys "
                             f"{self.names} (make them with FunctionalModule.init)")
        for n in self.names:
            v = params[n]
            if tuple(v.shape) != (T, *self.shapes[n]):
                raise ValueError(f"{n} has shape {tuple(v.shape)}, expected "
                                 f"[T={T}, {', '.join(map(str, self.shapes[n]))}]: pass "
                                 "per-task parameters (metarl.params.expand(theta, T))")
        return T

    def __repr__(self) -> str:
        return (f"FunctionalModule({self.module!r}, init={self.init_scheme!r}, "
                f"impl={self.impl!r})")


def _check_is_module(module: object) -> None:
    if isinstance(module, type) and issubclass(module, nn.Module):
        raise TypeError(f"FunctionalModule expects an nn.Module instance, got the class "
                        f"{module.__name__}: construct it first, e.g. "
                        f"FunctionalModule({module.__name__}(...))")
    if not isinstance(module, nn.Module):
        is_model = all(callable(getattr(module, a, None)) for a in ("init", "forward"))
        hint = ("it is already a metarl model: use it directly" if is_model
                else "wrap your network in an nn.Module subclass")
        raise TypeError(f"FunctionalModule expects a torch.nn.Module instance, got "
                        f"{type(module).__name__}: {hint}")


def _check_modes(module: nn.Module) -> None:
    """Refuse what cannot run per task under vmap on fixed data."""
    for name, mod in module.named_modules():
        where = f"{name!r} ({type(mod).__name__})" if name else type(mod).__name__
        for pname, p in mod.named_parameters(recurse=False):
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(f"{where} has an uninitialised lazy parameter {pname!r}: run "
                                 "the module once on an example input (module(x)) before "
                                 "wrapping it, so that its shapes are known")
        if isinstance(mod, _DropoutNd) and mod.training and mod.p > 0:
            raise ValueError(f"{where} is dropout in training mode (p={mod.p}): the loss on "
                             "fixed data must be deterministic (iMAML and the gradient checks "
                             "evaluate it again); remove it, set p=0, or call .eval() on that "
                             "layer")
        if isinstance(mod, _InstanceNorm) and mod.training and mod.track_running_stats:
            raise ValueError(f"{where} is instance norm updating running statistics in "
                             "training mode, which cannot be done per task under vmap: use "
                             "track_running_stats=False, or call .eval() on that layer")


def _with_task_batch_norm(module: nn.Module) -> nn.Module:
    """Swap batch-norm layers that use batch statistics for :class:`TaskBatchNorm`."""
    if isinstance(module, _BatchNorm) and _uses_batch_stats(module):
        return TaskBatchNorm(module)
    for name, child in list(module.named_children()):
        new = _with_task_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _uses_batch_stats(bn: nn.Module) -> bool:
    return bool(bn.training or getattr(bn, "running_mean", None) is None)


def _reset_method(mod: nn.Module) -> Callable[[], None] | None:
    for attr in ("reset_parameters", "_reset_parameters"):
        fn = getattr(mod, attr, None)
        if callable(fn):
            return fn
    return None


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Children before their parent (the order in which construction initialises them)."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def _check_resettable(module: nn.Module, names: list[str]) -> None:
    owned: set[str] = set()
    for prefix, mod in module.named_modules():
        if _reset_method(mod) is not None:
            owned.update(f"{prefix}.{n}" if prefix else n
                         for n, _ in mod.named_parameters(recurse=False))
    orphans = [n for n in names if n not in owned]
    if orphans:
        raise ValueError(f"init='reset' cannot redraw {orphans}: the modules that own them have "
                         "no reset_parameters() method; add one that initialises them, or use "
                         "FunctionalModule(module, init='copy') to start from the module's "
                         "current values")
