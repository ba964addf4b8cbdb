"""The model protocol: functional, parameters passed in, batched over tasks."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from metarl.types import Params


class Model(Protocol):
    """A functional model. ``forward`` takes per-task parameters (every leaf
    ``[T, *shape]``) and per-task inputs ``[T, N, *in_shape]`` and returns
    ``[T, N, *out_shape]``: task t's weights apply to task t's inputs only."""

    def init(self, generator: torch.Generator, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Params:
        """Fresh meta-parameters (no task dimension)."""
        ...

    def forward(self, params: Params, x: Tensor) -> Tensor: ...
