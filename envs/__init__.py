"""Gymnasium task families; importing this package registers their environment ids.

The locomotion ids (``metarl/HalfCheetahVel-v0``, ...) are registered without
importing MuJoCo; making one needs the ``mujoco`` extra.
"""

from metarl.envs import locomotion, navigation  # noqa: F401  (register the ids)
