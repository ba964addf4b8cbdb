"""Multi-layer perceptron with per-task weights, as batched matrix products."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from metarl.types import Params

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class MLP:
    """``in -> hidden... -> out`` with ReLU or tanh, weights ``l{i}.w [in, out]``, ``l{i}.b [out]``.

    With per-task parameters ``[T, in, out]`` a layer is one ``baddbmm`` for
    all tasks: no loop over tasks, no ``vmap``.
    """

    def __init__(self, n_in: int, n_out: int, hidden: Sequence[int] = (40, 40),
                 activation: str = "relu") -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
        self.sizes = [n_in, *hidden, n_out]
        self.activation = activation
        self._act = ACTIVATIONS[activation]

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, scheme: str = "torch") -> Params:
        """Fresh parameters.

        ``scheme="torch"``: PyTorch's ``nn.Linear`` default, weights and biases
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)). ``scheme="xavier"``: Xavier-uniform
        weights and zero biases (rllab's and the MAML-RL code's policies: the mean
        action of a fresh policy is then 0 at a zero observation).
        """
        if scheme not in ("torch", "xavier"):
            raise ValueError(f"unknown init scheme {scheme!r}: use torch or xavier")
        params: Params = {}
        for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            bound = 1.0 / math.sqrt(a) if scheme == "torch" else math.sqrt(6.0 / (a + b))
            w = (torch.rand(a, b, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            bias = (torch.rand(b, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            if scheme == "xavier":
                bias = torch.zeros_like(bias)
            params[f"l{i}.w"] = w.to(device=device, dtype=dtype)
            params[f"l{i}.b"] = bias.to(device=device, dtype=dtype)
        return params

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """``x [T, N, in]`` -> ``[T, N, out]`` with task t's weights on task t's inputs."""
        h = x
        for i in range(self.n_layers):
            h = torch.baddbmm(params[f"l{i}.b"].unsqueeze(1), h, params[f"l{i}.w"])  # [T, N, out_i]
            if i < self.n_layers - 1:
                h = self._act(h)
        return h

    __call__ = forward
