"""The Omniglot 4-block convolutional network, with per-task weights batched over tasks.

Finn et al. 2017 (section 5.2, appendix A.1): 4 x [conv 3x3 (64 filters) -> batch
norm -> ReLU -> downsample by 2], mean over space, linear head. With stride-2
convolutions a 28x28 image goes 28 -> 14 -> 7 -> 4 -> 2.

How the tasks are batched (``impl``):

- ``"grouped"``: per-task weights as ONE grouped convolution, tasks folded into
  channels (input ``[N, T*C, H, W]``, weight ``[T*F, C, 3, 3]``, ``groups=T``); batch
  norm, ReLU and pooling act on that layout directly (channel ``t*F + f`` is task t's
  filter f, so per-channel statistics are per task). On CPU the tasks go through in
  cache-sized chunks, each one grouped convolution (``task_chunk``).
- ``"loop"``: a Python loop over tasks, one ``F.conv2d`` per task: the reference.
- ``"vmap"``: ``torch.func.vmap`` over the per-task network, for comparison only.
- ``"auto"`` (default): ``"grouped"`` with automatic chunks.

Findings (2-core AMD EPYC, AVX-512, torch 2.13, 1 thread; MAML, 5-way 1-shot, 15
query per class, meta-batch 32, 28x28, float32):

- Speed: one grouped convolution over all 32 tasks is SLOWER than the loop on CPU
  (k=5: 4.1 s vs 3.5 s; k=1: 2.5 s vs 1.5 s). A query-pass activation is then
  120 MB and every batch-norm/ReLU pass streams it from memory, while one task's
  3.7 MB stays in cache; oneDNN's grouped convolution is also slower per FLOP
  (first layer 5x). Chunks sized to ~2 MiB of first-block activation (``CHUNK_BYTES``:
  1 task of 75 query images, 8 tasks of 5 support images) keep the cache: k=5 2.5 s,
  k=1 1.3 s, peak memory 1.06-1.14x the loop's. ``vmap`` (a grouped convolution
  underneath) is the slowest: 4.2 s. On CUDA all tasks go in one grouped convolution.
- Second order: grouped, loop and vmap (forward only, plain autograd outside) all
  match the explicit Jacobian and finite differences in float64. What breaks is
  ``torch.func.grad`` nested in ``vmap`` over the FUSED ``F.batch_norm`` (7% error;
  plain-op batch norm there is exact); the fused op alone is exact to second order
  but wrong from the third derivative on (PyTorch issue #186256). Hence plain
  tensor ops by default, the fused op as an opt-in (``fused_bn``, 12-22% faster).
- float32: every impl and formulation tried (two-pass variance, ``E[x^2] - E[x]^2``,
  ``torch.var_mean``, fused) gives per-task meta-gradient errors of 2e-6 to 7e-6
  against float64. Larger errors (1e-4 to 2e-2 of the meta-batch gradient, loop
  and grouped alike) come from ReLU inputs within round-off of 0 that fall on the
  other side of the kink in float32: the gradient jumps, and on a 5-image support
  set with inner lr 0.4 the jump is carried through the next inner steps. Which
  tasks it hits depends on rounding order, so a single comparison of two impls can
  differ 100x either way (like the 0.03% loop vs 4.6% vmap once reported); over 16
  seeds loop and grouped have the same error distribution.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from metarl.types import Params

Downsample = Literal["stride", "maxpool"]
Impl = Literal["auto", "grouped", "loop", "vmap"]
DOWNSAMPLE = ("stride", "maxpool")
IMPLS = ("auto", "grouped", "loop", "vmap")

CHUNK_BYTES = 2 * 2**20
"""CPU cache budget for one chunk of tasks: bytes of its largest activation (measured optimum)."""


def batch_norm(h: Tensor, gamma: Tensor, beta: Tensor, eps: float, m: int | None = None,
               fused: bool = False) -> Tensor:
    """Batch norm of ``h [N, C, H, W]`` over (N, H, W) per channel, without running statistics.

    Args:
        h: activations; a channel is one task's filter (``C = T*F`` in the grouped layout).
        gamma, beta: per-channel scale and shift ``[C]``.
        eps: added to the variance inside the square root.
        m: normalise with the statistics of ``h[:m]`` only (the support images); ``None``
            uses all of ``h``.
        fused: use ``F.batch_norm`` (training mode, no running statistics) where it
            applies (``m`` is None): faster, exact to second order, but its third and
            higher derivatives are wrong (PyTorch issue #186256, reproduced on 2.13).
            Otherwise plain tensor ops with the two-pass variance ``mean((h - mean)^2)``,
            exact to every order.

    Returns:
        ``gamma * (h - mean) / sqrt(var + eps) + beta``, shape of ``h``.
    """
    if fused and m is None:
        return F.batch_norm(h, None, None, gamma, beta, training=True, momentum=0.0, eps=eps)
    s = h if m is None else h[:m]
    mean = s.mean((0, 2, 3), keepdim=True)  # [1, C, 1, 1]
    d = h - mean
    ds = d if m is None else d[:m]
    var = (ds * ds).mean((0, 2, 3), keepdim=True)  # two-pass: no E[x^2] - E[x]^2 cancellation
    scale = gamma.view(1, -1, 1, 1) * torch.rsqrt(var + eps)
    return torch.addcmul(beta.view(1, -1, 1, 1), d, scale)


class ConvNet:
    """MAML's Omniglot conv net with per-task weights ``[T, ...]`` on images ``[T, N, C, H, W]``.

    Blocks ``i = 0..blocks-1``: conv 3x3, padding 1 (``conv{i}.w [F, C, 3, 3]``,
    ``conv{i}.b [F]``), batch norm (``bn{i}.w``, ``bn{i}.b`` ``[F]``: learned scale and
    shift, no running statistics), ReLU, then the downsampling: ``"stride"`` makes the
    convolution stride 2 (MAML's Omniglot net), ``"maxpool"`` keeps stride 1 and adds
    a 2x2 max-pool. Then the mean over space and ``head.w [F, ways]``, ``head.b [ways]``.
    (The conv bias is cancelled by the batch norm that follows; it is kept, as in MAML,
    and its gradient is zero up to round-off.)

    Batch norm statistics are per task and per channel:

    - transductive (default, ``forward(params, x)``): the statistics of the task's own
      batch x (its N images and all positions), as in MAML's published Omniglot
      numbers: query images are normalised with query statistics.
    - support statistics (``forward(params, x, stats_x=support_x)``): every batch-norm
      layer normalises x with the statistics of stats_x's activations at that layer,
      computed in the same pass (stats_x runs alongside x, concatenated along N); only
      x's logits are returned. The gradient flows through those statistics too.

    Args:
        ways: classes per task (head outputs).
        in_channels: image channels C (1 for Omniglot).
        filters: F, filters per convolution (64 in MAML's Omniglot net).
        blocks: number of conv blocks (4).
        downsample: ``"stride"`` (default) or ``"maxpool"``; see above.
        impl: how the tasks are batched: ``"grouped"``, ``"loop"``, ``"vmap"``, or
            ``"auto"`` (= ``"grouped"``); see the module docstring.
        task_chunk: tasks per grouped convolution; ``None`` chooses: all tasks on
            CUDA, on CPU as many as keep one chunk's largest activation within
            ``CHUNK_BYTES`` (cache blocking). Ignored by ``"loop"`` and ``"vmap"``.
        eps: batch-norm epsilon (1e-3, TensorFlow's default that MAML used).
        fused_bn: transductive batch norm by the fused ``F.batch_norm`` (12-22% faster on
            CPU) instead of plain tensor ops. Exact for MAML and iMAML (second order) but
            NOT for third derivatives (e.g. a Hessian of the MAML meta-objective, TRPO
            through the adaptation): PyTorch issue #186256. Never used under ``vmap``
            (``torch.func.grad`` inside ``vmap`` over it gives wrong second derivatives).

    References: Finn et al. 2017, section 5.2 and appendix A.1; Vinyals et al. 2016.
    """

    def __init__(self, ways: int, *, in_channels: int = 1, filters: int = 64, blocks: int = 4,
                 downsample: Downsample = "stride", impl: Impl = "auto",
                 task_chunk: int | None = None, eps: float = 1e-3,
                 fused_bn: bool = False) -> None:
        if downsample not in DOWNSAMPLE:
            raise ValueError(f"unknown downsample {downsample!r}: use 'stride' or 'maxpool'")
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}: use one of {', '.join(IMPLS)}")
        for name, v in (("ways", ways), ("in_channels", in_channels), ("filters", filters),
                        ("blocks", blocks)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if task_chunk is not None and task_chunk < 1:
            raise ValueError(f"task_chunk must be >= 1 or None (automatic), got {task_chunk}")
        if eps <= 0:
            raise ValueError(f"batch-norm eps must be > 0, got {eps}")
        self.ways, self.in_channels, self.filters, self.blocks = ways, in_channels, filters, blocks
        self.downsample, self.impl, self.task_chunk, self.eps = downsample, impl, task_chunk, eps
        self.fused_bn = fused_bn
        self.stride = 2 if downsample == "stride" else 1

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Params:
        """MAML's initialisation: Xavier-uniform convolutions, zero biases, batch-norm
        scale 1 and shift 0, head weights N(0, 1), head bias 0."""
        p: Params = {}
        c, f = self.in_channels, self.filters
        for i in range(self.blocks):
            bound = math.sqrt(6.0 / (9 * c + 9 * f))  # Xavier: fan_in + fan_out = 9C + 9F
            p[f"conv{i}.w"] = (torch.rand(f, c, 3, 3, generator=generator, dtype=torch.float64)
                               * 2 - 1) * bound
            p[f"conv{i}.b"] = torch.zeros(f, dtype=torch.float64)
            p[f"bn{i}.w"] = torch.ones(f, dtype=torch.float64)
            p[f"bn{i}.b"] = torch.zeros(f, dtype=torch.float64)
            c = f
        p["head.w"] = torch.randn(f, self.ways, generator=generator, dtype=torch.float64)
        p["head.b"] = torch.zeros(self.ways, dtype=torch.float64)
        return {k: v.to(device=device, dtype=dtype) for k, v in p.items()}

    def out_size(self, size: int) -> int:
        """Spatial size after the blocks for an input of ``size`` (0: the image is too small)."""
        for _ in range(self.blocks):
            size = (size - 1) // 2 + 1 if self.downsample == "stride" else size // 2
        return size

    def resolve_impl(self) -> str:
        return "grouped" if self.impl == "auto" else self.impl

    def chunk_size(self, n_tasks: int, n_images: int, size: tuple[int, int], device: torch.device,
                   dtype: torch.dtype) -> int:
        """Tasks per grouped convolution (see ``task_chunk``)."""
        if self.task_chunk is not None:
            return min(self.task_chunk, n_tasks)
        if device.type != "cpu":
            return n_tasks
        h, w = ((s - 1) // self.stride + 1 for s in size)  # first block: the largest activation
        per_task = n_images * self.filters * h * w * dtype.itemsize
        return max(1, min(n_tasks, CHUNK_BYTES // per_task))

    def forward(self, params: Params, x: Tensor, stats_x: Tensor | None = None) -> Tensor:
        """Logits of every task's images under that task's weights.

        Args:
            params: per-task parameters, leaves ``[T, *shape]``.
            x: images ``[T, N, C, H, W]``, float in [0, 1].
            stats_x: ``None`` for transductive batch norm (statistics of x per task), or
                images ``[T, M, C, H, W]`` (the support set) whose activations give the
                batch-norm statistics for x at every layer.

        Returns:
            Logits ``[T, N, ways]``.

        Raises:
            ValueError: on shapes that do not match (images, tasks, channels, size).
        """
        T = self._check(params, x, stats_x)
        m = None
        if stats_x is not None:
            m = stats_x.shape[1]
            x = torch.cat([stats_x, x], dim=1)  # [T, M+N, C, H, W]; statistics from [:, :M]
        impl = self.resolve_impl()
        if impl == "grouped":
            c = self.chunk_size(T, x.shape[1], (x.shape[3], x.shape[4]), x.device, x.dtype)
            if c >= T:
                out = self._grouped(params, x, m)
            else:  # cache blocking: chunks of tasks, each one grouped convolution
                # torch.split, not Tensor.split (the same op, but unannotated in torch)
                pc = {k: torch.split(v, c) for k, v in params.items()}
                out = torch.cat([self._grouped({k: v[i] for k, v in pc.items()}, xc, m)
                                 for i, xc in enumerate(torch.split(x, c))])
        elif impl == "loop":
            per_task = {k: v.unbind(0) for k, v in params.items()}
            out = torch.stack([self._one({k: v[t] for k, v in per_task.items()}, xt, m,
                                         self.fused_bn)
                               for t, xt in enumerate(x.unbind(0))])
        else:
            out = torch.func.vmap(lambda p, xt: self._one(p, xt, m, fused=False))(params, x)
        return out if m is None else out[:, m:]

    __call__ = forward

    def _grouped(self, params: Params, x: Tensor, m: int | None) -> Tensor:
        """All tasks of ``x [T, N, C, H, W]`` at once: tasks folded into channels."""
        T, N, C, H, W = x.shape
        h = x.transpose(0, 1).reshape(N, T * C, H, W)  # [N, T*C, H, W]: channel t*C + c
        for i in range(self.blocks):
            w = params[f"conv{i}.w"]  # [T, F, C, 3, 3]
            f, c = w.shape[1], w.shape[2]
            h = F.conv2d(h, w.reshape(T * f, c, 3, 3), params[f"conv{i}.b"].reshape(T * f),
                         stride=self.stride, padding=1, groups=T)  # [N, T*F, H', W']
            h = torch.relu(batch_norm(h, params[f"bn{i}.w"].reshape(T * f),
                                      params[f"bn{i}.b"].reshape(T * f), self.eps, m,
                                      self.fused_bn))
            if self.downsample == "maxpool":
                h = F.max_pool2d(h, 2)
        feat = h.flatten(2).mean(2).view(N, T, -1).transpose(0, 1)  # [T, N, F]
        return torch.baddbmm(params["head.b"].unsqueeze(1), feat, params["head.w"])  # [T, N, ways]

    def _one(self, p: Params, x: Tensor, m: int | None, fused: bool) -> Tensor:
        """One task: parameters without the task dimension, ``x [N, C, H, W]`` -> ``[N, ways]``."""
        h = x
        for i in range(self.blocks):
            h = F.conv2d(h, p[f"conv{i}.w"], p[f"conv{i}.b"], stride=self.stride, padding=1)
            h = torch.relu(batch_norm(h, p[f"bn{i}.w"], p[f"bn{i}.b"], self.eps, m, fused))
            if self.downsample == "maxpool":
                h = F.max_pool2d(h, 2)
        feat = h.flatten(2).mean(2)  # [N, F]
        return torch.addmm(p["head.b"], feat, p["head.w"])

    def _check(self, params: Params, x: Tensor, stats_x: Tensor | None) -> int:
        if x.dim() != 5:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [T, N, C, H, W]: one "
                             "batch of images per task (add the task dimension)")
        T, _, C, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(f"x has {C} channels, the net was built for in_channels="
                             f"{self.in_channels}")
        if min(self.out_size(H), self.out_size(W)) < 1:
            raise ValueError(f"images of {H}x{W} are too small for {self.blocks} blocks with "
                             f"downsample={self.downsample!r}: use larger images or fewer blocks")
        w = params["conv0.w"]
        if w.dim() != 5 or w.shape[0] != T:
            raise ValueError(f"conv0.w has shape {tuple(w.shape)}, expected [T={T}, F, C, 3, 3]: "
                             "pass per-task parameters (metarl.params.expand(theta, T))")
        if stats_x is not None and (stats_x.dim() != 5 or stats_x.shape[0] != T
                                    or stats_x.shape[2:] != x.shape[2:]):
            raise ValueError(f"stats_x has shape {tuple(stats_x.shape)}, expected "
                             f"[T={T}, M, {C}, {H}, {W}] like x")
        return T
