"""Every tensor follows the parameters' dtype: a float64 run creates no float32 tensor.

The code that picks a new tensor's dtype (and device) is the same whatever they
are, so a float64 run on CPU that never makes a float32 tensor also never falls
back to the CPU or to another dtype on CUDA (tests/test_gpu.py checks the device
there). :class:`FloatDtypes` watches the output of every operation, forward and
backward, while whole training iterations run: families, samplers, baselines,
the inner loop, the four algorithms, TRPO and the outer optimizers.
"""

from __future__ import annotations

import collections
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from metarl import config as C
from metarl import families
from metarl.train import train

ROOT = Path(__file__).resolve().parents[1]


def _site() -> str:
    """The innermost frame in the repository's library code (not the tests)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if ROOT in path.parents and "tests" not in path.relative_to(ROOT).parts[:1] \
                and ".venv" not in path.parts:
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    return "outside the library"


def _optimizer_step_counter(t: torch.Tensor) -> bool:
    """A 0-dim CPU tensor made inside ``torch.optim``: Adam's step counter, kept on the host
    in torch's default dtype whatever the parameters' (with ``capturable=False``)."""
    return (t.dim() == 0 and t.device.type == "cpu"
            and any(f"torch{os.sep}optim{os.sep}" in f.filename for f in traceback.extract_stack()))


class FloatDtypes(TorchDispatchMode):
    """Records every floating-point output whose dtype is not ``expected``, with the
    operation and the library line that caused it."""

    def __init__(self, expected: torch.dtype) -> None:
        super().__init__()
        self.expected = expected
        self.wrong: collections.Counter[str] = collections.Counter()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != self.expected
                    and not _optimizer_step_counter(t)):
                self.wrong[f"{func} -> {t.dtype} at {_site()}"] += 1
        return out

    def report(self) -> str:
        return "\n".join(f"{n} x {what}" for what, n in self.wrong.most_common())


def run_float64(tmp_path: Path, family: str, options: dict, **settings) -> FloatDtypes:
    """Train ``family`` for the given settings in float64 on CPU, watching every op."""
    fam = families.make(family, **options)
    fam.prepare()  # data loading and its preprocessing are not the training pipeline
    cfg = C.resolve(fam, {"device": "cpu", "dtype": "float64", "family_options": options,
                          "log_every": 1, **settings})
    with FloatDtypes(torch.float64) as watch:
        train(cfg, tmp_path / "run")
    assert watch.ops > 200  # the mode saw the run
    return watch


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "imaml"])
def test_sinusoid_float64_creates_no_float32(tmp_path, algo):
    watch = run_float64(tmp_path, "sinusoid", {"hidden": [8, 8]}, algo=algo, iterations=2,
                        meta_batch=3, inner={"steps": 2})
    assert not watch.wrong, watch.report()


@pytest.mark.parametrize("algo", ["maml", "imaml"])
def test_navigation_trpo_float64_creates_no_float32(tmp_path, algo):
    """Sampling on the tensor env, returns, the float64 baseline, advantages, the inner
    loop, TRPO's Fisher products, CG and line search."""
    watch = run_float64(tmp_path, "navigation2d", {"rollouts": 2, "horizon": 6, "hidden": [4]},
                        algo=algo, iterations=2, meta_batch=2, outer={"optimizer": "trpo"})
    assert not watch.wrong, watch.report()


def test_navigation_gym_env_float64_creates_no_float32(tmp_path):
    """The host sampler (plain Gymnasium envs behind SlotsBatchEnv): numpy float32
    observations are cast on the host, the tensors made from them are float64."""
    from metarl.envs.navigation import Navigation2DFamily
    from metarl.rl.sampler import GymBatchEnv

    class GymNavigation(Navigation2DFamily):
        name = "gym-navigation-placement"

        def batch_env(self, device, dtype):
            return GymBatchEnv(self.make_env, device=device, dtype=dtype, task_option=True)

    fam = GymNavigation(rollouts=2, horizon=6, hidden=[4])
    batch = fam.batch_for(fam.sample_tasks(2, np.random.default_rng(0)), seed=0,
                          dtype=torch.float64)
    theta = fam.init_params(torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64)
    from metarl import params as P

    with FloatDtypes(torch.float64) as watch:
        traj = batch.sample(P.expand(theta, 2))
    assert traj.rollouts.obs.dtype == torch.float64
    assert not watch.wrong, watch.report()


def omniglot_folder(root: Path, chars: int = 6, drawers: int = 20) -> Path:
    """Omniglot-shaped synthetic data in the official layout (as tests/tasks build it)."""
    rng = np.random.default_rng(0)
    for c in range(1, chars + 1):
        folder = root / "images_background" / "Alpha" / f"character{c:02d}"
        folder.mkdir(parents=True)
        for d in range(1, drawers + 1):
            a = np.ones((105, 105), dtype=bool)
            r, col = rng.integers(0, 80, size=2)
            a[r:r + 20, col:col + 20] = False  # one ink block
            Image.fromarray(a).save(folder / f"{c:04d}_{d:02d}.png")
    return root


@pytest.mark.parametrize("algo", ["maml", "imaml"])
def test_omniglot_float64_creates_no_float32(tmp_path, monkeypatch, algo):
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "cache"))
    data = omniglot_folder(tmp_path / "omniglot")
    watch = run_float64(tmp_path, "omniglot",
                        {"data": str(data), "filters": 4, "query": 1, "ways": 3}, algo=algo,
                        iterations=1, meta_batch=2, inner={"steps": 1})
    assert not watch.wrong, watch.report()
