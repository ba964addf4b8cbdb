"""The Omniglot 4-block convolutional network, with per-task weights batched over tasks.

DRAFT (being measured).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metarl.types import Params

DOWNSAMPLE = ("stride", "maxpool")
IMPLS = ("auto", "grouped", "grouped_nhwc", "loop", "vmap")


def batch_norm(h: Tensor, gamma: Tensor, beta: Tensor, dims: tuple[int, ...], m: int | None,
               eps: float) -> Tensor:
    """Normalise ``h`` over ``dims`` with the statistics of ``h[:m]`` (all of it if ``m`` is None).

    Two-pass variance ``mean((h - mean)^2)``, never ``E[h^2] - E[h]^2``.
    """
    s = h if m is None else h[:m]
    mean = s.mean(dims, keepdim=True)
    d = h - mean
    ds = d if m is None else d[:m]
    var = (ds * ds).mean(dims, keepdim=True)
    return torch.addcmul(beta, d, gamma * torch.rsqrt(var + eps))


class ConvNet:
    def __init__(self, ways: int, *, in_channels: int = 1, filters: int = 64, blocks: int = 4,
                 downsample: str = "stride", impl: str = "auto", eps: float = 1e-3) -> None:
        if downsample not in DOWNSAMPLE:
            raise ValueError(f"unknown downsample {downsample!r}: use one of {DOWNSAMPLE}")
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}: use one of {IMPLS}")
        self.ways, self.in_channels, self.filters, self.blocks = ways, in_channels, filters, blocks
        self.downsample, self.impl, self.eps = downsample, impl, eps
        self.stride = 2 if downsample == "stride" else 1

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Params:
        p: Params = {}
        c = self.in_channels
        f = self.filters
        for i in range(self.blocks):
            bound = math.sqrt(6.0 / (9 * c + 9 * f))
            p[f"conv{i}.w"] = (torch.rand(f, c, 3, 3, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            p[f"conv{i}.b"] = torch.zeros(f, dtype=torch.float64)
            p[f"bn{i}.w"] = torch.ones(f, dtype=torch.float64)
            p[f"bn{i}.b"] = torch.zeros(f, dtype=torch.float64)
            c = f
        p["head.w"] = torch.randn(f, self.ways, generator=generator, dtype=torch.float64)
        p["head.b"] = torch.zeros(self.ways, dtype=torch.float64)
        return {k: v.to(device=device, dtype=dtype) for k, v in p.items()}

    def resolve_impl(self, device: torch.device) -> str:
        if self.impl != "auto":
            return self.impl
        return "grouped"

    def forward(self, params: Params, x: Tensor, stats_x: Tensor | None = None,
                impl: str | None = None) -> Tensor:
        m = None
        if stats_x is not None:
            m = stats_x.shape[1]
            x = torch.cat([stats_x, x], dim=1)
        impl = impl or self.resolve_impl(x.device)
        if impl == "grouped":
            out = self._grouped(params, x, m)
        elif impl == "grouped_nhwc":
            out = self._grouped_nhwc(params, x, m)
        elif impl == "loop":
            out = torch.stack([self._one({k: v[t] for k, v in params.items()}, x[t], m)
                               for t in range(x.shape[0])])
        elif impl == "vmap":
            out = torch.func.vmap(lambda p, xx: self._one(p, xx, m))(params, x)
        else:
            raise ValueError(impl)
        return out if m is None else out[:, m:]

    __call__ = forward

    def _grouped(self, params: Params, x: Tensor, m: int | None) -> Tensor:
        T, N, C, H, W = x.shape
        h = x.transpose(0, 1).reshape(N, T * C, H, W)  # [N, T*C, H, W]
        for i in range(self.blocks):
            w = params[f"conv{i}.w"]  # [T, F, C, 3, 3]
            f, c = w.shape[1], w.shape[2]
            h = F.conv2d(h, w.reshape(T * f, c, 3, 3), params[f"conv{i}.b"].reshape(T * f),
                         stride=self.stride, padding=1, groups=T)  # [N, T*F, H', W']
            h5 = h.view(N, T, f, h.shape[-2], h.shape[-1])
            g = params[f"bn{i}.w"].view(1, T, f, 1, 1)
            b = params[f"bn{i}.b"].view(1, T, f, 1, 1)
            h5 = torch.relu(batch_norm(h5, g, b, (0, 3, 4), m, self.eps))
            h = h5.view(N, T * f, h5.shape[-2], h5.shape[-1])
            if self.downsample == "maxpool":
                h = F.max_pool2d(h, 2)
        feat = h.view(N, T, self.filters, -1).mean(-1).transpose(0, 1)  # [T, N, F]
        return torch.baddbmm(params["head.b"].unsqueeze(1), feat, params["head.w"])

    def _grouped_nhwc(self, params: Params, x: Tensor, m: int | None) -> Tensor:
        T, N, C, H, W = x.shape
        h = x.permute(1, 3, 4, 0, 2).reshape(N, H, W, T, C)  # [N, H, W, T, C]
        for i in range(self.blocks):
            w = params[f"conv{i}.w"]  # [T, F, C, 3, 3]
            f, c = w.shape[1], w.shape[2]
            H, W = h.shape[1], h.shape[2]
            hc = h.view(N, H, W, T * c).permute(0, 3, 1, 2)  # [N, T*C, H, W], channels_last
            y = F.conv2d(hc, w.reshape(T * f, c, 3, 3), params[f"conv{i}.b"].reshape(T * f),
                         stride=self.stride, padding=1, groups=T)  # [N, T*F, H', W']
            y = y.permute(0, 2, 3, 1).reshape(N, y.shape[2], y.shape[3], T, f)  # [N, H', W', T, F]
            g = params[f"bn{i}.w"]  # [T, F]
            b = params[f"bn{i}.b"]
            h = torch.relu(batch_norm(y, g, b, (0, 1, 2), m, self.eps))
            if self.downsample == "maxpool":
                H2, W2 = h.shape[1], h.shape[2]
                hc = h.view(N, H2, W2, T * f).permute(0, 3, 1, 2)
                hc = F.max_pool2d(hc, 2)
                h = hc.permute(0, 2, 3, 1).reshape(N, hc.shape[2], hc.shape[3], T, f)
        feat = h.mean((1, 2)).transpose(0, 1)  # [T, N, F]
        return torch.baddbmm(params["head.b"].unsqueeze(1), feat, params["head.w"])

    def _one(self, p: Params, x: Tensor, m: int | None) -> Tensor:
        h = x  # [N, C, H, W]
        for i in range(self.blocks):
            h = F.conv2d(h, p[f"conv{i}.w"], p[f"conv{i}.b"], stride=self.stride, padding=1)
            g = p[f"bn{i}.w"].view(1, -1, 1, 1)
            b = p[f"bn{i}.b"].view(1, -1, 1, 1)
            h = torch.relu(batch_norm(h, g, b, (0, 2, 3), m, self.eps))
            if self.downsample == "maxpool":
                h = F.max_pool2d(h, 2)
        feat = h.flatten(2).mean(-1)  # [N, F]
        return torch.addmm(p["head.b"], feat, p["head.w"])
