"""No host-device synchronisation on the hot paths, checked on CPU.

On CUDA, reading a tensor's value on the host (``.item()``, ``.cpu()``, ``.numpy()``,
``.tolist()``, ``float()``, ``bool()``, ``int()`` of a tensor, a Python ``if`` on one)
waits for every kernel queued before it. :func:`count_syncs` counts those reads while
a code path runs on CPU, where the same Python decides what runs on CUDA. The count
may hold a fixed few per call (logging, one check per solve); it must not grow with
the number of time steps of a sampling call or the number of inner steps of a
meta-gradient.

The MuJoCo families step on the host, so their sampler copies once per time step in
each direction: the test below counts those copies.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import traceback
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl import params as P
from metarl.algorithms import IMAMLConfig, meta_grad
from metarl.inner import InnerConfig
from metarl.rl import sampler as S
from metarl.tasks.sinusoid import SinusoidFamily

SYNC_METHODS = ("item", "cpu", "numpy", "tolist", "__float__", "__bool__", "__int__",
                "__index__")
"""Tensor methods that copy a value to the host (a synchronisation on CUDA)."""

ROOT = Path(__file__).resolve().parents[1]


class SyncCount:
    """Counts per tensor method, and where in the repository each call came from."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def report(self) -> str:
        return ", ".join(f"{site} x{n}" for site, n in self.sites.most_common())


def _site() -> str:
    """``file:line`` of the innermost frame in the repository (not this file)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename).resolve()
        if path != Path(__file__).resolve() and ROOT in path.parents and ".venv" not in path.parts:
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    return "outside the repository"


def _optimizer_step_counter(frame: types.FrameType) -> bool:
    """A read inside ``torch.optim``: Adam's and SGD's step counters live on the host
    unless ``capturable`` (their ``.item()`` is not a device synchronisation)."""
    return f"torch{os.sep}optim{os.sep}" in frame.f_code.co_filename


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCount]:
    """Count calls of :data:`SYNC_METHODS` on any tensor while the block runs."""
    count = SyncCount()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counting(name: str, fn):
        def wrapper(self, *args, **kwargs):
            if not _optimizer_step_counter(sys._getframe(1)):
                count.calls[name] += 1
                count.sites[f"{name} at {_site()}"] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, counting(name, fn))
        yield count
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_counter_sees_every_kind_of_host_read():
    x = torch.ones(3)
    with count_syncs() as c:
        x.sum().item()
        float(x[0])
        int(x[0])
        bool(x.any())
        if x.all():
            pass
        x.tolist()
        x.cpu()
        x.numpy()
        [0, 1][torch.tensor(1)]
    assert c.calls == {"item": 1, "__float__": 1, "__int__": 1, "__bool__": 2, "tolist": 1,
                       "cpu": 1, "numpy": 1, "__index__": 1}, c.calls


# --- navigation2d: the tensor sampler -----------------------------------------------

def _navigation_counts(horizon: int, rollouts: int = 3, n_tasks: int = 4) -> SyncCount:
    from metarl.envs.navigation import Navigation2DFamily

    fam = Navigation2DFamily(rollouts=rollouts, horizon=horizon, hidden=[8])
    theta = fam.init_params(torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    batch = fam.batch_for(fam.sample_tasks(n_tasks, np.random.default_rng(0)), seed=0)
    env, tasks = batch.env, batch.tasks
    assert isinstance(env, S.NormalizedActions)  # the family's default: the tensor env inside
    theta_T = P.expand(theta, n_tasks)
    S.sample(fam.policy(), theta_T, env, tasks, rollouts, horizon, seed=0)  # warm caches
    with count_syncs() as c:
        S.sample(fam.policy(), theta_T, env, tasks, rollouts, horizon, seed=1)
    return c


def test_host_sync_navigation_sampling_none_per_time_step():
    short, long = _navigation_counts(horizon=5), _navigation_counts(horizon=40)
    assert long.total == short.total, (f"host reads grow with the horizon: {short.total} at "
                                       f"H=5, {long.total} at H=40: {long.report()}")
    assert long.total == 0, long.report()


def test_host_sync_navigation_sample_and_process_fixed_per_call():
    """The whole data step of an RL meta-gradient (sampling, returns, baseline fit,
    advantages) on the tensor path: a fixed number of host reads per call."""
    from metarl.envs.navigation import Navigation2DFamily

    counts = []
    for horizon in (5, 40):
        fam = Navigation2DFamily(rollouts=3, horizon=horizon, hidden=[8])
        theta = fam.init_params(torch.Generator().manual_seed(0), torch.device("cpu"),
                                torch.float32)
        batch = fam.batch_for(fam.sample_tasks(4, np.random.default_rng(0)), seed=0)
        batch.sample(P.expand(theta, 4))
        with count_syncs() as c:
            batch.sample(P.expand(theta, 4))
        counts.append(c)
    assert counts[0].total == counts[1].total, counts[1].report()
    assert counts[1].total <= 1, counts[1].report()  # the baseline's check for failed solves


# --- a supervised meta-gradient -------------------------------------------------------

def _meta_grad_counts(algo: str, steps: int) -> SyncCount:
    fam = SinusoidFamily(hidden=[8, 8])
    g = torch.Generator().manual_seed(0)
    theta = P.clone_leaf(fam.init_params(g, torch.device("cpu"), torch.float32))
    batch = fam.sample_batch(5, g)
    inner, icfg = InnerConfig(steps=steps, lr=0.01), IMAMLConfig(lam=10.0, cg_iters=5)
    meta_grad(algo, theta, batch, inner, icfg)
    with count_syncs() as c:
        meta_grad(algo, theta, batch, inner, icfg)
    return c


MAX_SYNCS_PER_META_GRAD = {"maml": 0, "fomaml": 0, "reptile": 0, "imaml": 5}
"""Host reads per meta-gradient. iMAML: CG's stop check before products 0, 1, 2 and 4
of its 5 (metarl.linalg.cg), then the fraction of indefinite systems for the metrics
and the log (metarl.algorithms.imaml)."""


@pytest.mark.parametrize("algo", sorted(MAX_SYNCS_PER_META_GRAD))
def test_host_sync_supervised_meta_gradient_none_per_inner_step(algo):
    few, many = _meta_grad_counts(algo, 1), _meta_grad_counts(algo, 6)
    assert many.total == few.total, (f"{algo}: host reads grow with the inner steps: "
                                     f"{few.total} at k=1, {many.total} at k=6: {many.report()}")
    assert many.total <= MAX_SYNCS_PER_META_GRAD[algo], many.report()


def test_host_sync_outer_step_checks_finiteness_once():
    from metarl.outer import GradientOuter

    fam = SinusoidFamily(hidden=[8, 8])
    g = torch.Generator().manual_seed(0)
    theta = P.clone_leaf(fam.init_params(g, torch.device("cpu"), torch.float32))
    batch = fam.sample_batch(5, g)
    inner = InnerConfig(steps=2, lr=0.01)
    outer = GradientOuter(theta, "adam", 1e-3)
    outer.step(theta, batch, lambda th, b: meta_grad("maml", th, b, inner))
    with count_syncs() as c:
        outer.step(theta, batch, lambda th, b: meta_grad("maml", th, b, inner))
    assert c.total == 1, c.report()  # one check that every leaf is finite


# --- MuJoCo families: one copy each way per time step -----------------------------

def _host_env_traffic(horizon: int, T: int = 2, E: int = 3) -> dict[str, list[int]]:
    """Bytes of every host -> device upload and device -> host copy of one sampling call
    on halfcheetah-vel (CPU stands in for the device: the same calls run on CUDA)."""
    from metarl.envs.locomotion import HalfCheetahVelFamily

    fam = HalfCheetahVelFamily(rollouts=E, horizon=horizon, hidden=[8])
    env = fam.batch_env(torch.device("cpu"), torch.float32)
    tasks = fam.sample_tasks(T, np.random.default_rng(0))
    theta_T = P.expand(fam.init_params(torch.Generator().manual_seed(0), torch.device("cpu"),
                                       torch.float32), T)
    traffic: dict[str, list[int]] = {"up": [], "down": [], "other": []}
    inside_upload = [False]
    upload, cpu = S.SlotsBatchEnv._upload, torch.Tensor.cpu
    makers = {name: getattr(torch, name) for name in ("from_numpy", "as_tensor", "tensor")}

    def counted_upload(self, host):
        traffic["up"].append(host.nbytes)
        inside_upload[0] = True
        try:
            return upload(self, host)
        finally:
            inside_upload[0] = False

    def counted_cpu(self, *args, **kwargs):
        traffic["down"].append(self.nbytes)
        return cpu(self, *args, **kwargs)

    def other(fn):
        def wrapper(*args, **kwargs):
            if not inside_upload[0]:
                traffic["other"].append(1)
            return fn(*args, **kwargs)
        return wrapper

    try:
        S.SlotsBatchEnv._upload = counted_upload
        torch.Tensor.cpu = counted_cpu
        for name, fn in makers.items():
            setattr(torch, name, other(fn))
        S.sample(fam.policy(), theta_T, env, tasks, E, horizon, seed=0)
    finally:
        S.SlotsBatchEnv._upload, torch.Tensor.cpu = upload, cpu
        for name, fn in makers.items():
            setattr(torch, name, fn)
        env.close()
    return traffic


def test_mujoco_sampler_copies_once_each_way_per_time_step():
    pytest.importorskip("mujoco")
    T, E, obs, act = 2, 3, 17, 6  # halfcheetah: 17 observations, 6 actions, float32
    for H in (3, 9):
        traffic = _host_env_traffic(H, T, E)
        # the reset's observations, then one upload of [T*E, obs + 2] per step (obs, reward
        # and done side by side) and one download of the [T*E, act] actions
        assert traffic["up"] == [T * E * (obs + 2) * 4] * (H + 1), traffic
        assert traffic["down"] == [T * E * act * 4] * H, traffic
        assert traffic["other"] == [], traffic
