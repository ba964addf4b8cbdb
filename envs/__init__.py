"""Gymnasium task families; importing this package registers their environment ids."""

from metarl.envs import navigation  # noqa: F401  (registers metarl/Navigation2D-v0)
