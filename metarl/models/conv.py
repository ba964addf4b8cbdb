"""The Omniglot 4-block convolutional network, with per-task weights batched over tasks.

Finn et al. 2017 (section 5.2, appendix A.1): 4 x [conv 3x3 (64 filters) -> batch
norm -> ReLU -> downsample by 2], mean over space, linear head. With stride-2
convolutions a 28x28 image goes 28 -> 14 -> 7 -> 4 -> 2.

How the tasks are batched (``impl``):

- ``"grouped"``: tasks folded into channels, maps ``[N, T*F, H, W]`` in channels-last
  memory (``[N, H, W, T, F]``: channel ``t*F + f`` is task t's filter f, so per-channel
  statistics are per task). Block 0 is one fused op (``_FirstBlock``); blocks 1.. are
  one grouped convolution (weight ``[T*F, C, 3, 3]``, ``groups=T``, ``_Conv``) and one
  fused batch-norm / max-pool / ReLU op (``_BNPoolReLU``). Tasks go through in chunks
  (``task_chunk``); large chunks (the query sets) are recomputed in the backward
  (``recompute``).
- ``"loop"``: a Python loop over tasks, one ``F.conv2d`` per task and plain-op batch
  norm: the reference.
- ``"vmap"``: ``torch.func.vmap`` over the per-task network, for comparison only.
- ``"auto"`` (default): ``"grouped"``.

The fused ops are ``torch.autograd.Function``s whose backward is written with
differentiable tensor ops (or other such Functions) on saved inputs and outputs, so
every derivative order stays exact: MAML's second order, a Hessian of the MAML
objective, TRPO through the adaptation, batched gradients (``is_grads_batched``) for
the explicit-Jacobian references. The tests check them to the third order against the
plain-op loop, and MAML against the explicit Jacobian and finite differences.

- ``_FirstBlock``: one input channel, so the convolution is an im2col product: patches
  ``U [T, rows, 9C]`` (no gradient) centred on their mean, ``Uc``, times
  ``W [T, 9C, F]`` gives the conv output minus its batch mean for any bias (the bias
  drops out, its gradient is exactly 0). The variance is ``w^T Sigma_U w`` with the
  patches' covariance computed in float64. The map itself is computed a few images at
  a time (``BLOCK_BYTES``), pooled while in cache and never stored; the backward needs
  only the pooled map: ``grad W = Uc^T unpool(g)``.
- max-pool before the affine part of batch norm: ``pool(a*d + beta) = a*pool(s*d)*s +
  beta`` with ``s = sign(a) = sign(gamma)``, then ReLU, which commutes with max-pooling:
  normalisation and ReLU run on a quarter of the data, exactly (ties included).
- ``_BNPoolReLU`` (blocks 1..): two-pass statistics; the centred map ``d = y - mean``
  is kept (no cancellation in float32) instead of y; the conv bias is left out (batch
  norm cancels it) and gets its exact zero gradient.
- ``_Conv``: PyTorch differentiates a grouped convolution twice by looping over the
  groups (a weight-gradient convolution and two copies per group); ``_ConvBackward``
  does it with grouped native convolutions.
- small chunks (the support sets) convolve in NCHW and keep their pooling indices as
  int16; large ones (the query sets) convolve channels-last with int64 indices.
- ``recompute``: on CPU a chunk whose first-block map per task exceeds
  ``RECOMPUTE_BYTES`` (a 75-image query) runs without a graph and again, with one, in
  its backward (activation checkpointing), so a meta-batch's graph holds the support
  passes and one query at a time.

Findings (2-core AMD EPYC, AVX-512, torch 2.13, 1 thread; MAML on the peer harness's W3
workload: 5-way 1-shot, 15 query per class, meta-batch 32, 5 inner steps at lr 0.4,
max-pool, 28x28, float32). The byte budgets below were chosen there and kept unchanged
on a 2-core Intel Xeon (4 MiB L2 per core), where the path ran 1.58-1.97x faster than the
plain PyTorch loop and 1.3x for the per-task reference (README, Omniglot):

- Why the previous grouped path (NCHW, plain-op batch norm, 2 MiB chunks) was 10%
  slower than the per-task loop and 8x bigger: ``F.max_pool2d`` takes 18 ms on an
  NCHW query map ``[75, 64, 28, 28]`` (1.9 ms channels-last); oneDNN's 1-channel
  convolution runs at 4 GFLOP/s (17 ms; im2col + matmul 3 ms); plain-op batch norm
  streams each 15 MB map 8-10 times per forward and backward, from DRAM; and the
  meta-gradient keeps every intermediate of all 32 query passes (4.2 GB).
- Now (one thread-time A/B, min of rounds, the rest fixed; they do not add up exactly):
  channels-last + fused ops + im2col first block, chunks of 8 support tasks: 5.9 s ->
  3.4 s (the per-task loop: 5.3 s); the custom grouped double backward 8%; 8 support
  tasks per chunk instead of 2, 1.3x, instead of 32, 1.06x; recomputing the queries costs
  +15-20% and halves the peak memory; NCHW support convolutions cost 1-7%.
- float32: oneDNN's channels-last convolution (brgemm) rounds 3x more than its NCHW one
  (1.0e-6 vs 3.7e-7 relative on a 64->64 3x3 layer). In the support passes this doubled
  the per-task float32 meta-gradient error (median 2.8e-5 vs 1.6e-5 for the loop) and the
  number of ReLU / max-pool kinks crossed by round-off, which the inner steps (lr 0.4)
  amplify: the W3 meta-batch gradient was 4e-2 from float64 against the loop's 2e-3.
  Hence NCHW convolutions for small chunks (median 1.2e-5, total 2.0e-3); the query's
  convolutions do not feed an inner step and stay channels-last (no measurable effect).
  BN sums use torch's cascade sum: a matrix-vector product sums sequentially and loses
  1e-5 over 58800 rows; the first block's variance from a float32 QR or Gram matrix of
  the patches lost 4e-5 to 4e-4 on binary images, hence float64.
- Remaining float32 differences come from ReLU inputs within round-off of 0 (or max-pool
  near-ties) that fall on the other side of the kink: the gradient jumps and the inner
  steps carry the jump; which tasks it hits depends on rounding order, so a single
  comparison of two implementations can differ 100x either way. In float64 the grouped
  path equals the loop to 1e-13 on W3.
- Second order: grouped, loop and vmap (forward only, plain autograd outside) all match
  the explicit Jacobian and finite differences in float64. What breaks is
  ``torch.func.grad`` nested in ``vmap`` over the FUSED ``F.batch_norm`` (7% error;
  plain-op batch norm there is exact); the fused op alone is exact to second order
  but wrong from the third derivative on (PyTorch issue #186256). Hence plain tensor
  ops in ``"loop"`` / ``"vmap"`` by default, ``F.batch_norm`` as an opt-in there
  (``fused_bn``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from metarl.types import Params

Downsample = Literal["stride", "maxpool"]
Impl = Literal["auto", "grouped", "loop", "vmap"]
BNScale = Literal["one", "uniform"]
DOWNSAMPLE = ("stride", "maxpool")
IMPLS = ("auto", "grouped", "loop", "vmap")
BN_SCALES = ("one", "uniform")

CHUNK_BYTES = 8 * 2**20
"""CPU budget for one chunk of tasks: bytes of its first-block activation (measured optimum)."""
BLOCK_BYTES = 2**20
"""Bytes of first-block conv output computed at a time inside ``_FirstBlock`` (cache-sized)."""
RECOMPUTE_BYTES = 4 * 2**20
"""On CPU, a chunk whose first-block activation per task exceeds this is recomputed in backward."""

_CL = torch.channels_last


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


# --- fused ops of the grouped path ---------------------------------------------------------
# Maps are [N, C, H, W] in channels-last memory; _rows views one as the matrix [N*H*W, C]
# (row n*H*W + h*W + w), so the statistics of the first m images are those of the first
# m*H*W rows.


def _rows(t: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N*H*W, C]``: a view for a channels-last tensor, else a copy."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _colsum(x2: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * x2.sum(0)`` for ``x2 [M, C]`` (torch's cascade sum: a matrix-vector product
    is 2x faster but sums sequentially, 1e-5 relative error over 58800 rows in float32)."""
    s = x2.sum(0)
    return s if scale == 1.0 else s * scale


def _out_like(t: Tensor, nchw: bool) -> Tensor:
    """An empty map shaped like ``t [N, C, H, W]``: NCHW-contiguous (the input of an NCHW
    convolution, see the module docstring) or channels-last."""
    N, C, H, W = t.shape
    return t.new_empty((N, C, H, W)) if nchw else t.new_empty((N, H, W, C)).permute(0, 3, 1, 2)


def _signs(a: Tensor) -> Tensor | None:
    """``+-1`` per channel ``[1, C, 1, 1]`` with the sign of ``a`` (+1 at 0); ``None`` when
    all are +1 (checked on CPU only: on other devices the check would wait for the device)."""
    if a.device.type == "cpu" and not bool((a < 0).any()):
        return None
    return torch.where(a.reshape(1, -1, 1, 1) < 0, -1.0, 1.0).to(a.dtype)


def _maxpool(y: Tensor, s: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(s * max_pool(s * y), indices)``: the max-pool of ``a * y`` for ``a`` of sign s,
    divided by ``a``; 2x2 windows, stride 2, odd edges dropped."""
    if s is None:
        return F.max_pool2d_with_indices(y, (2, 2))
    p, idx = F.max_pool2d_with_indices(y * s, (2, 2))
    return p * s, idx


def _unpool(g: Tensor, idx: Tensor, H: int, W: int) -> Tensor:
    """The transpose of the max-pool: ``g [N, C, h, w]`` scattered to ``[N, C, H, W]`` at the
    pooled positions ``idx`` (zeros elsewhere); differentiable to every order (its
    derivative is the gather at ``idx``). ``idx``: max_pool2d's plane indices, int64 or
    int16 (``_compact``)."""
    if idx.dtype != torch.long:
        out: Tensor = _apply(_Unpool, g, idx, H, W)
        return out
    N, C = g.shape[:2]
    like = torch.empty((N, H, W, C), dtype=g.dtype, device=g.device).permute(0, 3, 1, 2)
    return torch.ops.aten.max_pool2d_with_indices_backward(
        g, like, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


def _compact(idx: Tensor, plane: int) -> Tensor:
    """max_pool2d's int64 plane indices as int16 (a quarter of the memory) where the plane
    (``H*W`` positions) allows it."""
    return idx.to(torch.int16) if plane <= 2**15 else idx


class _Unpool(torch.autograd.Function):
    """``_unpool`` for compact indices ``off``; saves only them (a recorded native unpool
    would keep their int64 copy for the double backward)."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, off: Tensor, H: int, W: int) -> Tensor:
        ctx.save_for_backward(off)
        ctx.HW = (H, W)
        return _unpool(g, off.long(), H, W)

    @staticmethod
    def backward(ctx: Any, gg: Tensor) -> tuple[Tensor | None, ...]:
        (off,) = ctx.saved_tensors
        return _apply(_PoolGather, gg, off, *ctx.HW), None, None, None


class _PoolGather(torch.autograd.Function):
    """``full [N, C, H, W]`` at the pooled positions ``off`` (compact plane indices):
    ``[N, C, h, w]``, the transpose of ``_Unpool``."""

    @staticmethod
    def forward(ctx: Any, full: Tensor, off: Tensor, H: int, W: int) -> Tensor:
        ctx.save_for_backward(off)
        ctx.HW = (H, W)
        N, C, h, w = off.shape
        return full.flatten(2).gather(2, off.long().flatten(2)).view(N, C, h, w)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (off,) = ctx.saved_tensors
        return _apply(_Unpool, g, off, *ctx.HW), None, None, None


class _BNPoolReLU(torch.autograd.Function):
    """``relu(pool(gamma * (y - mean) * rstd + beta))`` for a conv output ``y`` (without
    its bias, which the batch norm cancels), with the batch statistics of its first ``R``
    rows; the pooling (if any) acts on the centred ``d = y - mean``, before the scaling.

    Returns ``(out, mean, rstd, d, pd)`` (``pd`` = pooled d, ``None`` without pooling):
    the backward works on the centred map (no cancellation in float32) and uses these
    outputs, so it stays differentiable through them: every derivative order is exact.
    ``bias`` (the conv bias) only receives its gradient, exactly zero.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, gamma: Tensor, beta: Tensor, bias: Tensor, eps: float,
                R: int, pool: bool,
                small: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        N, C, H, W = y.shape
        y2 = _rows(y)  # [M, C]
        mean = _colsum(y2[:R], 1.0 / R)  # [C]
        d2 = y2 - mean
        rstd = torch.rsqrt(_colsum(d2[:R] * d2[:R], 1.0 / R) + eps)  # two-pass variance
        d = d2.view(N, H, W, C).permute(0, 3, 1, 2)
        a = gamma * rstd
        pd: Tensor | None = None
        idx: Tensor | None = None
        if pool:
            pd, idx = _maxpool(d, _signs(a))
            if small:
                idx = _compact(idx, H * W)
        src = d if pd is None else pd
        out = _out_like(src, small)
        torch.addcmul(beta.view(1, C, 1, 1), src, a.view(1, C, 1, 1), out=out).clamp_min_(0)
        ctx.save_for_backward(gamma, bias, out, rstd, d, pd, idx)
        ctx.R = R
        ctx.set_materialize_grads(False)
        return out, mean, rstd, d, pd

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_mean: Tensor | None, g_rstd: Tensor | None,
                 g_d: Tensor | None, g_pd: Tensor | None) -> tuple[Tensor | None, ...]:
        gamma, bias, out, rstd, d, pd, idx = ctx.saved_tensors
        R: int = ctx.R
        N, C, H, W = d.shape
        g_gamma = g_beta = None
        # S: the sum over all rows of d L / d d (but the variance term), i.e. -d L / d mean
        # through d = y - mean
        S = None if g_d is None else _colsum(_rows(g_d))
        if g_pd is not None:
            S = _colsum(_rows(g_pd)) if S is None else S + _colsum(_rows(g_pd))
        if g_out is not None:
            # out = relu(a * pd + beta), a = gamma * rstd
            a = gamma * rstd
            gz2 = _rows(torch.ops.aten.threshold_backward(g_out, out, 0.0))  # relu'
            g_z = gz2.reshape(out.shape[0], out.shape[2], out.shape[3], C).permute(0, 3, 1, 2)
            g_beta = _colsum(gz2)
            g_a = _colsum(gz2 * _rows(d if pd is None else pd))
            g_gamma = g_a * rstd
            g_rstd = g_a * gamma if g_rstd is None else g_rstd + g_a * gamma
            gp = g_z * a.view(1, C, 1, 1)
            S = a * g_beta if S is None else S + a * g_beta
            if pd is None:
                g_d = gp if g_d is None else g_d + gp
            else:
                g_pd = gp if g_pd is None else g_pd + gp
        if g_pd is not None:  # pd = pool(d)
            up = _unpool(g_pd, idx, H, W)
            g_d = up if g_d is None else g_d + up
        # d = y - mean on all rows, mean and var over the first R rows: grad y = g_d plus, on
        # those rows, (g_mean - S) / R + 2 (y - mean) / R * d L / d var (the sum of y - mean
        # over them is zero, so the variance's own dependence on the mean drops out)
        k0 = None
        if g_mean is not None:
            k0 = g_mean / R if S is None else (g_mean - S) / R
        elif S is not None:
            k0 = S / -R
        stats = None  # [R, C]
        d2 = _rows(d)
        if g_rstd is not None:
            k1 = (-1.0 / R) * g_rstd * rstd * rstd * rstd  # 2/R * d rstd / d var
            stats = torch.mul(d2[:R], k1) if k0 is None else torch.addcmul(k0, d2[:R], k1)
        elif k0 is not None:
            stats = k0.expand(R, C)
        # out of place throughout: the backward also runs under vmap (batched gradients),
        # where views and in-place updates of reshaped tensors are not reliable
        M = N * H * W
        if g_d is None:
            assert stats is not None
            gy2 = stats if R == M else torch.cat([stats, stats.new_zeros(M - R, C)])
        else:
            gy2 = _rows(g_d)
            if stats is not None:
                gy2 = gy2 + stats if R == M else torch.cat([gy2[:R] + stats, gy2[R:]])
        grad_y = gy2.reshape(N, H, W, C).permute(0, 3, 1, 2)
        return grad_y, g_gamma, g_beta, torch.zeros_like(bias), None, None, None, None


class _FirstBlock(torch.autograd.Function):
    """First block: ``d = Uc @ W`` (the centred conv output), ``pd = pool(d)``,
    ``out = relu(a * pd + beta)`` per task.

    ``Uc [T, N*Hc*Wc, K]`` are the image patches minus their mean over the statistics rows
    (rows (n, h, w), no gradient), so ``Uc @ W`` is the conv output minus its batch mean
    for any bias: the conv bias ``b [T, F]`` drops out and gets its gradient, exactly
    zero. ``W [T, K, F]``; ``a, beta [T, F]`` are the batch-norm scale (``gamma * rstd``,
    from the closed-form variance) and shift. ``d`` is computed ``nb`` images at a time
    and never kept. Returns ``(out, pd)``, both ``[N, T*F, h, w]`` channels-last; without
    pooling ``pd`` is ``d``.
    """

    @staticmethod
    def forward(ctx: Any, Uc: Tensor, W: Tensor, b: Tensor, a: Tensor, beta: Tensor,
                geom: tuple[int, int, int, bool, int, bool],
                keep: bool) -> tuple[Tensor, Tensor]:
        N, Hc, Wc, pool, nb, small = geom
        T = Uc.shape[0]
        C = T * W.shape[2]
        h, w = (Hc // 2, Wc // 2) if pool else (Hc, Wc)
        out = (W.new_empty((N, C, h, w)) if small
               else W.new_empty((N, h, w, C)).permute(0, 3, 1, 2))
        pd = W.new_empty((N, h, w, C)).permute(0, 3, 1, 2) if keep or not pool else None
        compact = small and Hc * Wc <= 2**15
        idx = (torch.empty((N, h, w, C), dtype=torch.int16 if compact else torch.long,
                           device=W.device).permute(0, 3, 1, 2) if keep and pool else None)
        a4, beta4 = a.reshape(1, C, 1, 1), beta.reshape(1, C, 1, 1)
        s = _signs(a) if pool else None
        for n0 in range(0, N, nb):
            n1 = min(N, n0 + nb)
            db = _conv_rows(Uc, W, n0, n1, Hc, Wc)
            if not pool:
                assert pd is not None
                pd[n0:n1] = db
                pb = pd[n0:n1]
            elif idx is not None and pd is not None and s is None and not compact:
                pb, _ = torch.ops.aten.max_pool2d_with_indices.out(
                    db, [2, 2], [2, 2], [0, 0], [1, 1], False, out=pd[n0:n1], indices=idx[n0:n1])
            else:
                pb, ib = _maxpool(db, s)
                if pd is not None and idx is not None:
                    pd[n0:n1], idx[n0:n1] = pb, ib
            torch.addcmul(beta4, pb, a4, out=out[n0:n1]).clamp_min_(0)
        ctx.save_for_backward(Uc, b, a, out, pd, idx)
        ctx.geom = geom
        ctx.set_materialize_grads(False)
        return out, (out if pd is None else pd)

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None,
                 g_pd: Tensor | None) -> tuple[Tensor | None, ...]:
        Uc, b, a, out, pd, idx = ctx.saved_tensors
        N, Hc, Wc, pool, nb, _ = ctx.geom
        T = Uc.shape[0]
        C = a.numel()
        Fo = C // T
        L = Hc * Wc
        g_a = g_beta = None
        if g_out is not None:
            gz2 = _rows(torch.ops.aten.threshold_backward(g_out, out, 0.0))  # relu'
            g_z = gz2.reshape(out.shape[0], out.shape[2], out.shape[3], C).permute(0, 3, 1, 2)
            g_beta = _colsum(gz2).view(T, Fo)
            g_a = _colsum(gz2 * _rows(pd)).view(T, Fo)
            gp = g_z * a.reshape(1, C, 1, 1)
            g_pd = gp if g_pd is None else g_pd + gp
        g_W = None
        if g_pd is not None:
            for n0 in range(0, N, nb):  # grad W = Uc^T unpool(g_pd), a few images at a time
                n1 = min(N, n0 + nb)
                gd = _unpool(g_pd[n0:n1], idx[n0:n1], Hc, Wc) if pool else g_pd[n0:n1]
                gdt = gd.permute(0, 2, 3, 1).reshape((n1 - n0) * L, T, Fo).transpose(0, 1)
                gw = torch.bmm(Uc[:, n0 * L:n1 * L].transpose(1, 2), gdt)  # [T, K, F]
                g_W = gw if g_W is None else g_W + gw
        return None, g_W, torch.zeros_like(b), g_a, g_beta, None, None


def _conv_rows(Uc: Tensor, W: Tensor, n0: int, n1: int, Hc: int, Wc: int) -> Tensor:
    """``Uc @ W`` for images ``n0:n1``: ``[n1-n0, T*F, Hc, Wc]`` channels-last."""
    T = Uc.shape[0]
    Fo = W.shape[2]
    L = Hc * Wc
    nb = n1 - n0
    yt = torch.bmm(Uc[:, n0 * L:n1 * L], W)  # [T, nb*L, F]
    if T == 1:
        return yt.view(nb, Hc, Wc, Fo).permute(0, 3, 1, 2)
    return (yt.view(T, nb, Hc, Wc, Fo).permute(1, 2, 3, 0, 4).reshape(nb, Hc, Wc, T * Fo)
            .permute(0, 3, 1, 2))


class _Conv(torch.autograd.Function):
    """``F.conv2d(x, w, stride=stride, padding=1, groups=groups)`` whose backward is
    ``_ConvBackward``: PyTorch's own double backward of a grouped convolution loops over the
    groups (a weight-gradient convolution and two copies per group), ``_ConvBackward``
    differentiates with grouped native convolutions."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, stride: int, groups: int) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.cfg = (stride, groups)
        return F.conv2d(x, w, None, stride=stride, padding=1, groups=groups)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        gx, gw = _apply(_ConvBackward, gy, x, w, *ctx.cfg, need_x, need_w)
        return gx, gw, None, None


class _ConvBackward(torch.autograd.Function):
    """``(grad x, grad w)`` of ``y = conv(x, w)`` at ``gy``, differentiable to every order:
    grad x is linear in (gy, w) and grad w in (x, gy), so their derivatives are again
    convolutions and convolution backwards."""

    @staticmethod
    def forward(ctx: Any, gy: Tensor, x: Tensor, w: Tensor, stride: int, groups: int,
                need_x: bool, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
        gx, gw, _ = torch.ops.aten.convolution_backward(
            gy, x, w, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], groups,
            [need_x, need_w, False])
        ctx.save_for_backward(gy, x, w)
        ctx.cfg = (stride, groups)
        ctx.set_materialize_grads(False)
        return gx, gw

    @staticmethod
    def backward(ctx: Any, ggx: Tensor | None, ggw: Tensor | None) -> tuple[Tensor | None, ...]:
        gy, x, w = ctx.saved_tensors
        stride, groups = ctx.cfg
        n_gy, n_x, n_w = ctx.needs_input_grad[:3]
        g_gy = g_x = g_w = None
        if n_gy:  # <ggx, convT(gy, w)> + <ggw, wgrad(x, gy)> = <conv(ggx, w) + conv(x, ggw), gy>
            if ggx is not None:
                g_gy = _apply(_Conv, ggx, w, stride, groups)
            if ggw is not None:
                t = _apply(_Conv, x, ggw, stride, groups)
                g_gy = t if g_gy is None else g_gy + t
        if n_x and ggw is not None:  # d<ggw, wgrad(x, gy)>/dx: the input gradient of conv(., ggw)
            g_x = _apply(_ConvBackward, gy, x, ggw, stride, groups, True, False)[0]
        if n_w and ggx is not None:  # d<ggx, convT(gy, w)>/dw = wgrad(ggx, gy)
            g_w = _apply(_ConvBackward, gy, ggx, w, stride, groups, False, True)[1]
        return g_gy, g_x, g_w, None, None, None, None


def _apply(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)`` (which torch leaves untyped)."""
    return fn.apply(*args)  # type: ignore[no-untyped-call]


class _Recompute(torch.autograd.Function):
    """``fn(*tensors)`` without a graph; the backward runs ``fn`` again with one and
    backpropagates through it (activation checkpointing). Under ``create_graph`` the rerun
    records on the original inputs, so higher derivatives stay exact."""

    @staticmethod
    def forward(ctx: Any, fn: Any, *tensors: Tensor) -> Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            out: Tensor = fn(*tensors)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        tensors = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()
        need = [i for i, t in enumerate(tensors) if t.requires_grad]
        # the results go to buffers allocated before this chunk's temporaries: allocated after
        # them they would split the freed space and every chunk would take new memory (+130 MB
        # over the 32 query chunks of W3)
        res: list[Tensor | None] = [None] * len(tensors)
        if not create_graph:
            for i in need:
                res[i] = torch.empty_like(tensors[i])
        with torch.enable_grad():
            ins = (tensors if create_graph
                   else [t.detach().requires_grad_(t.requires_grad) for t in tensors])
            gs = torch.autograd.grad(ctx.fn(*ins), [ins[i] for i in need], g,
                                     create_graph=create_graph, allow_unused=True)
        for i, gi in zip(need, gs):
            buf = res[i]
            if buf is not None and gi is not None:
                try:
                    gi = buf.copy_(gi)
                except RuntimeError:  # a batched gradient (under vmap) cannot go to buf
                    pass
            res[i] = gi
        return (None, *res)


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
        task_chunk: tasks per grouped op; ``None`` chooses: all tasks on CUDA, on CPU as
            many as keep one chunk's first-block activation within ``CHUNK_BYTES`` (8
            tasks of 5 support images, 1 task of 75 query images at 28x28 with
            max-pooling). Ignored by ``"loop"`` and ``"vmap"``.
        eps: batch-norm epsilon (1e-3, TensorFlow's default that MAML used).
        bn_scale: initial batch-norm scales: ``"one"`` (MAML's TensorFlow code) or
            ``"uniform"``, drawn from U(0, 1) (PyTorch's reset of ``BatchNorm2d`` before
            1.2, which learn2learn's Omniglot net keeps).
        head_std: standard deviation of the initial head weights (1: MAML's and
            learn2learn's N(0, 1)).
        fused_bn: ``"loop"`` only: transductive batch norm by the fused ``F.batch_norm``
            (12-22% faster) instead of plain tensor ops. Exact for MAML and iMAML (second
            order) but NOT for third derivatives (e.g. a Hessian of the MAML
            meta-objective, TRPO through the adaptation): PyTorch issue #186256. Never
            used under ``vmap``. ``"grouped"`` has its own fused batch norm, exact to
            every order, and ignores this flag.
        recompute: ``"grouped"`` only: keep no graph of a chunk's forward and run it again
            in the backward (more time, much less memory: see the module docstring).
            ``None`` chooses: on CPU for chunks whose first-block activation per task
            exceeds ``RECOMPUTE_BYTES`` (the query sets), never on other devices.

    References: Finn et al. 2017, section 5.2 and appendix A.1; Vinyals et al. 2016.
    """

    def __init__(self, ways: int, *, in_channels: int = 1, filters: int = 64, blocks: int = 4,
                 downsample: Downsample = "stride", impl: Impl = "auto",
                 task_chunk: int | None = None, eps: float = 1e-3,
                 bn_scale: BNScale = "one", head_std: float = 1.0, fused_bn: bool = False,
                 recompute: bool | None = None) -> None:
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
        if bn_scale not in BN_SCALES:
            raise ValueError(f"unknown bn_scale {bn_scale!r}: use 'one' or 'uniform'")
        if head_std <= 0:
            raise ValueError(f"head_std must be > 0, got {head_std}")
        self.bn_scale, self.head_std = bn_scale, head_std
        self.ways, self.in_channels, self.filters, self.blocks = ways, in_channels, filters, blocks
        self.downsample, self.impl, self.task_chunk, self.eps = downsample, impl, task_chunk, eps
        self.fused_bn, self.recompute = fused_bn, recompute
        self.stride = 2 if downsample == "stride" else 1

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Params:
        """MAML's initialisation: Xavier-uniform convolutions, zero biases, batch-norm
        scale 1 (or U(0, 1) with ``bn_scale="uniform"``, drawn after each block's
        convolution) and shift 0, head weights N(0, head_std^2) (N(0, 1) by default), head
        bias 0."""
        p: Params = {}
        c, f = self.in_channels, self.filters
        for i in range(self.blocks):
            bound = math.sqrt(6.0 / (9 * c + 9 * f))  # Xavier: fan_in + fan_out = 9C + 9F
            p[f"conv{i}.w"] = (torch.rand(f, c, 3, 3, generator=generator, dtype=torch.float64)
                               * 2 - 1) * bound
            p[f"conv{i}.b"] = torch.zeros(f, dtype=torch.float64)
            p[f"bn{i}.w"] = (torch.rand(f, generator=generator, dtype=torch.float64)
                             if self.bn_scale == "uniform" else torch.ones(f, dtype=torch.float64))
            p[f"bn{i}.b"] = torch.zeros(f, dtype=torch.float64)
            c = f
        p["head.w"] = torch.randn(f, self.ways, generator=generator,
                                  dtype=torch.float64) * self.head_std
        p["head.b"] = torch.zeros(self.ways, dtype=torch.float64)
        return {k: v.to(device=device, dtype=dtype) for k, v in p.items()}

    def out_size(self, size: int) -> int:
        """Spatial size after the blocks for an input of ``size`` (0: the image is too small)."""
        for _ in range(self.blocks):
            size = (size - 1) // 2 + 1 if self.downsample == "stride" else size // 2
        return size

    def resolve_impl(self) -> str:
        return "grouped" if self.impl == "auto" else self.impl

    def _first_bytes(self, n_images: int, size: tuple[int, int], dtype: torch.dtype) -> int:
        """Bytes of one task's first-block conv output."""
        h, w = ((s - 1) // self.stride + 1 for s in size)
        return n_images * self.filters * h * w * dtype.itemsize

    def chunk_size(self, n_tasks: int, n_images: int, size: tuple[int, int], device: torch.device,
                   dtype: torch.dtype) -> int:
        """Tasks per grouped op (see ``task_chunk``)."""
        if self.task_chunk is not None:
            return min(self.task_chunk, n_tasks)
        if device.type != "cpu":
            return n_tasks
        return max(1, min(n_tasks, CHUNK_BYTES // self._first_bytes(n_images, size, dtype)))

    def recomputes(self, n_images: int, size: tuple[int, int], device: torch.device,
                   dtype: torch.dtype) -> bool:
        """Whether ``"grouped"`` recomputes a chunk in the backward (see ``recompute``)."""
        if self.recompute is not None:
            return self.recompute
        return device.type == "cpu" and self._first_bytes(n_images, size, dtype) > RECOMPUTE_BYTES

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
            size = (x.shape[3], x.shape[4])
            c = self.chunk_size(T, x.shape[1], size, x.device, x.dtype)
            keys = list(params)
            recompute = (self.recomputes(x.shape[1], size, x.device, x.dtype)
                         and torch.is_grad_enabled()
                         and any(v.requires_grad for v in params.values()))

            def run(*flat: Tensor) -> Tensor:
                return self._grouped(dict(zip(keys, flat[:-1])), flat[-1], m)

            pc = [torch.split(params[k], c) for k in keys]  # one SplitBackward for all chunks
            outs = []
            for i, xc in enumerate(torch.split(x, c)):
                flat = [v[i] for v in pc] + [xc]
                outs.append(_apply(_Recompute, run, *flat) if recompute else run(*flat))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
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
        T, N = x.shape[:2]
        pool = self.downsample == "maxpool"
        large = self._first_bytes(N, (x.shape[3], x.shape[4]), x.dtype) > RECOMPUTE_BYTES
        h = self._first_block(params, x, m, large)  # [N, T*F, H', W'] channels-last
        for i in range(1, self.blocks):
            w = params[f"conv{i}.w"]  # [T, F, C, 3, 3]
            f, c = w.shape[1], w.shape[2]
            # the conv bias is left out: batch norm cancels it (_BNPoolReLU gives it its zero
            # gradient). Small batches convolve in NCHW (see the module docstring: rounding)
            y = _apply(_Conv, h if large else h.contiguous(), w.reshape(T * f, c, 3, 3),
                       self.stride, T)  # [N, T*F, H', W']
            if not large:
                y = y.contiguous(memory_format=_CL)
            R = (N if m is None else m) * y.shape[2] * y.shape[3]  # statistics rows
            h = _apply(_BNPoolReLU, y, params[f"bn{i}.w"].reshape(T * f),
                       params[f"bn{i}.b"].reshape(T * f), params[f"conv{i}.b"], self.eps, R,
                       pool, not large)[0]
        feat = h.flatten(2).mean(2).view(N, T, -1).transpose(0, 1)  # [T, N, F]
        return torch.baddbmm(params["head.b"].unsqueeze(1), feat, params["head.w"])  # [T, N, ways]

    def _first_block(self, params: Params, x: Tensor, m: int | None, large: bool) -> Tensor:
        """Block 0 of every task: ``[N, T*F, H', W']`` channels-last (see ``_FirstBlock``)."""
        T, N, C, H, W = x.shape
        w = params["conv0.w"]  # [T, F, C, 3, 3]
        f, K = w.shape[1], 9 * C
        Hc, Wc = (H - 1) // self.stride + 1, (W - 1) // self.stride + 1
        L = Hc * Wc
        u = F.unfold(x.reshape(T * N, C, H, W), 3, padding=1, stride=self.stride)  # [T*N, K, L]
        R = (N if m is None else m) * L  # statistics rows
        with torch.no_grad():  # the patches centred on their mean, and their covariance
            U = u.view(T, N, K, L).transpose(2, 3)  # [T, N, L, K]: rows (n, h, w)
            Us = U[:, :R // L].reshape(T, R, K).to(torch.float64)
            mu = Us.mean(1)  # [T, K]
            Us = Us - mu.unsqueeze(1)
            Sigma = torch.bmm(Us.transpose(1, 2), Us) / R  # [T, K, K], float64
            Uc = torch.empty((T, N, L, K), dtype=x.dtype, device=x.device)
            torch.sub(U, mu.to(x.dtype).view(T, 1, 1, K), out=Uc)  # one pass, rows contiguous
            Uc = Uc.view(T, N * L, K)
        W0 = w.reshape(T, f, K).transpose(1, 2).contiguous()  # [T, K, F]
        # the conv output's variance w^T Sigma_U w, in float64 (float32 sums over 58800 rows
        # of patches lose 1e-5; the two-pass variance of the map itself loses 4e-7)
        W64 = W0.to(torch.float64)
        var = (torch.bmm(Sigma, W64) * W64).sum(1).to(x.dtype)  # [T, F]
        a = params["bn0.w"] * torch.rsqrt(var + self.eps)
        beta = params["bn0.b"]
        nb = max(1, BLOCK_BYTES // (L * T * f * x.element_size()))
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in (W0, a, beta))
        geom = (N, Hc, Wc, self.downsample == "maxpool", nb, not large)
        out: Tensor = _apply(_FirstBlock, Uc, W0, params["conv0.b"], a, beta, geom, keep)[0]
        return out

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
