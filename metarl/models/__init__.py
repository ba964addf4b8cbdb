"""Models evaluated with per-task parameters ``[T, ...]``."""

from metarl.models.base import Model
from metarl.models.conv import ConvNet
from metarl.models.mlp import MLP
from metarl.models.module import FunctionalModule

__all__ = ["MLP", "ConvNet", "FunctionalModule", "Model"]
