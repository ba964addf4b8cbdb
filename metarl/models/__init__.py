"""Models evaluated with per-task parameters ``[T, ...]``."""

from metarl.models.base import Model
from metarl.models.conv import ConvNet
from metarl.models.mlp import MLP

__all__ = ["MLP", "ConvNet", "Model"]
