"""``metarl bench``: seconds per meta-iteration and peak memory, each case in its own process.

Every case runs in a fresh Python process (``python -m metarl.bench CASE_JSON``).
Peak memory is the peak of live tensor bytes during one iteration
(:mod:`metarl.memory`), measured in an iteration of its own; time is the median
of several other iterations after warm-up (on CUDA each one synchronised).
Sections (:data:`SECTIONS`): ``sinusoid`` (the four algorithms at meta-batch
25, k = 1..40, batched engine versus a per-task loop), ``rl`` (navigation2d
sampler throughput and MAML-TRPO iterations), ``omniglot`` (5-way 1-shot conv-4,
batched, chunked and looped), ``locomotion`` (halfcheetah-vel sampler against
bare ``mj_step``), ``metaworld`` (ML1 reach-v3 sampler against bare Meta-World
stepping; skipped without the ``metaworld`` extra), ``distributed`` (a training
iteration on 1 process against 2 torch.distributed ranks, and the bytes of its
collectives per iteration), ``threads`` (the automatic thread count against one thread, torch's
default and the per-task loop, on a quiet machine and beside a busy process).

Each section's case list comes at a :data:`Scale`: ``"full"`` (the README's
numbers), ``"quick"`` (fewer cases and repeats) or ``"tiny"`` (one case per section,
two for rl, at toy sizes with one timed repeat: it checks that every section runs,
in seconds, and measures nothing worth reading).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from metarl import config as C
from metarl import distributed, families, threads
from metarl import params as P
from metarl.algorithms import ChunkChooser, IMAMLConfig, meta_grad
from metarl.inner import InnerConfig
from metarl.memory import peak_memory
from metarl.outer import GradientOuter
from metarl.rl.batch import masked_task_mean
from metarl.rl.family import RLFamily
from metarl.rl.sampler import GymBatchEnv, sample
from metarl.rl.trpo import FAST_FISHER_SUBSAMPLE
from metarl.train import make_outer, meta_batch_grad, sample_share
from metarl.types import Params

Row = dict[str, Any]
Scale = Literal["full", "quick", "tiny"]
"""How many cases, of what size: the README's ("full"), a shorter run ("quick"), or a
smoke run of toy cases ("tiny")."""


@dataclass(frozen=True, kw_only=True)
class Case:
    section: str
    algo: str
    k: int
    impl: str  # "batched" | "chunked" (options["chunk"] tasks at a time) | "loop"
    device: str = "cpu"
    meta_batch: int = 25
    repeats: int = 10
    warmup: int = 3
    options: dict[str, Any] | None = None
    """Section-specific settings (data, chunk, workers; sizes of the tiny scale)."""


def _rl_family(name: str, **options: Any) -> RLFamily:
    """An RL family: the sampler cases need its policy, tasks and environments."""
    fam = families.make(name, **options)
    if not isinstance(fam, RLFamily):
        raise TypeError(f"bench needs an RL family for {name!r}, got {type(fam).__name__}: "
                        "subclass metarl.rl.family.RLFamily")
    return fam


def _timeit(step: Callable[[], None], case: Case) -> float:
    dev = torch.device(case.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(case.warmup):
        step()
    sync()
    times = []
    for _ in range(case.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _supervised_step(family_name: str, case: Case, family_options: dict[str, Any],
                     inner_lr: float, imaml_lam: float, imaml_cg: int,
                     chooser: ChunkChooser | None = None) -> Callable[[], None]:
    """One outer step of ``case`` (impl "auto": through ``chooser``, which its first call
    sets)."""
    dev = torch.device(case.device)
    fam = families.make(family_name, **family_options)
    g = torch.Generator().manual_seed(0)
    theta = P.clone_leaf(fam.init_params(g, dev, torch.float32))
    batch = fam.sample_batch(case.meta_batch, g, split="train", device=dev, dtype=torch.float32)
    inner = InnerConfig(steps=case.k, lr=inner_lr)
    icfg = IMAMLConfig(lam=imaml_lam, cg_iters=imaml_cg)
    chunk = {"batched": None, "loop": 1, "auto": None,
             "chunked": (case.options or {}).get("chunk")}[case.impl]
    outer = GradientOuter(theta, "adam", 1e-3)

    def step() -> None:
        if chooser is not None:
            outer.step(theta, batch, lambda th, b: chooser.meta_grad(case.algo, th, b, inner,
                                                                     icfg))
            return
        outer.step(theta, batch, lambda th, b: meta_grad(case.algo, th, b, inner, icfg,
                                                         chunk=chunk))

    return step


def run_sinusoid(case: Case) -> Row:
    step = _supervised_step("sinusoid", case, dict(case.options or {}), inner_lr=0.01,
                            imaml_lam=10.0, imaml_cg=5)
    step()  # load kernels before measuring memory
    with peak_memory(case.device) as peak:
        step()
    sec = _timeit(step, case)
    return {"algo": case.algo, "k": case.k, "impl": case.impl, "sec_per_iter": sec,
            "peak_mb": peak.mb}


def sinusoid_cases(device: str, scale: Scale) -> Iterator[Case]:
    if scale == "tiny":  # batched MAML k = 1 on 2 tasks, a 2 x 8 MLP
        yield Case(section="sinusoid", algo="maml", k=1, impl="batched", device=device,
                   meta_batch=2, repeats=1, warmup=0, options={"hidden": [8, 8]})
        return
    quick = scale == "quick"
    ks = (1, 5) if quick else (1, 5, 10, 20, 40)
    for algo in ("maml", "fomaml", "reptile", "imaml"):
        for k in ks:
            for impl in ("batched", "loop"):
                yield Case(section="sinusoid", algo=algo, k=k, impl=impl, device=device,
                           repeats=5 if quick else 10, warmup=2 if quick else 3)


def run_rl(case: Case) -> Row:
    """Navigation sampler throughput, or seconds per meta-iteration of an RL algorithm."""
    if case.algo == "maml-trpo":
        return run_trpo_paths(case)
    dev = torch.device(case.device)
    opts = case.options or {}
    T, E, H = case.meta_batch, int(opts.get("rollouts", 20)), int(opts.get("horizon", 100))
    fam = _rl_family("navigation2d", rollouts=E, horizon=H)
    policy = fam.policy()
    g = torch.Generator().manual_seed(0)
    theta = fam.init_params(g, dev, torch.float32)
    row: Row = {"algo": case.algo, "impl": case.impl, "T": T, "E": E, "H": H}
    if case.algo == "sampler":
        tasks = fam.sample_tasks(T, np.random.default_rng(0))
        if case.impl == "one-by-one":
            env = fam.make_env(tasks[0])
            th1 = P.expand(theta, 1)
            n_tasks = max(1, T // 10)  # a tenth of the tasks: this path is slow

            def step() -> None:
                for t in range(n_tasks):
                    for e in range(E):
                        obs, _ = env.reset(seed=e, options={"task": tasks[t]})
                        for _ in range(H):
                            with torch.no_grad():
                                o = torch.as_tensor(obs, dtype=torch.float32).view(1, 1, -1)
                                a = policy.dist(th1, o).sample(g)[0, 0].numpy()
                            obs, _, term, trunc, _ = env.step(a)
                            if term or trunc:
                                break

            steps = n_tasks * E * H
        else:
            benv = fam.batch_env(dev, torch.float32) if case.impl == "tensor" else GymBatchEnv(
                fam.make_env, device=dev, task_option=True)
            th = P.expand(theta, T)

            def step() -> None:
                sample(policy, th, benv, tasks, E, H, seed=0)

            steps = T * E * H
        sec = _timeit(step, case)
        row.update(sec_per_iter=sec, env_steps_per_sec=steps / sec)
        return row
    cfg = C.resolve(fam, {"algo": case.algo, "inner": {"steps": case.k}, "meta_batch": T,
                          "device": case.device, "family_options": fam.options(),
                          "trpo": opts.get("trpo", {})})
    theta = P.clone_leaf(theta)
    outer = fam.make_outer(cfg, theta)

    def update() -> None:
        batch = fam.sample_batch(T, g, device=dev)
        outer.step(theta, batch, lambda th, b: meta_grad(case.algo, th, b, cfg.inner, cfg.imaml))

    update()
    with peak_memory(case.device) as peak:
        update()
    row.update(sec_per_iter=_timeit(update, case), peak_mb=peak.mb, outer="trpo", k=case.k)
    return row


def rl_cases(device: str, scale: Scale) -> Iterator[Case]:
    if scale == "tiny":  # T = 2 tasks x E = 2 episodes x H = 5 steps: the sampler, and
        # MAML-TRPO with 2 CG iterations and 2 line-search steps
        tiny = {"rollouts": 2, "horizon": 5, "trpo": {"cg_iters": 2, "ls_steps": 2}}
        for algo, impl in (("sampler", "tensor"), ("maml", "batched")):
            yield Case(section="rl", algo=algo, k=0 if algo == "sampler" else 1, impl=impl,
                       device=device, meta_batch=2, repeats=1, warmup=0, options=tiny)
        return
    quick = scale == "quick"
    r: dict[str, Any] = dict(repeats=2 if quick else 5, warmup=1)
    for impl in ("tensor", "gym-batched", "one-by-one"):
        yield Case(section="rl", algo="sampler", k=0, impl=impl, device=device, meta_batch=20,
                   **{**r, "repeats": 2 if impl == "one-by-one" else r["repeats"]})
    for algo in ("maml", "fomaml") if quick else ("maml", "fomaml", "reptile", "imaml"):
        yield Case(section="rl", algo=algo, k=1, impl="batched", device=device, meta_batch=20,
                   repeats=2 if quick else 3, warmup=1)
    yield from trpo_path_cases(device, scale)


TRPO_PATH_FAMILIES = {"navigation2d": 20, "halfcheetah-vel": 40}
"""The families whose MAML-TRPO paths the rl section compares, with their meta-batch."""


def trpo_path_cases(device: str, scale: Scale) -> Iterator[Case]:
    """MAML-TRPO, the fast Fisher path against the exact one, per family of
    :data:`TRPO_PATH_FAMILIES` (halfcheetah-vel only where MuJoCo is installed);
    ``tiny``: T = 2 x E = 2 x H = 5."""
    for name, T in TRPO_PATH_FAMILIES.items():
        if name == "halfcheetah-vel" and importlib.util.find_spec("mujoco") is None:
            continue
        opts: dict[str, Any] = {"family": name, "fisher_subsample": FAST_FISHER_SUBSAMPLE}
        if scale == "tiny":
            yield Case(section="rl", algo="maml-trpo", k=1, impl="fast-vs-exact", device=device,
                       meta_batch=2, repeats=1, warmup=0,
                       options={**opts, "rollouts": 2, "horizon": 5})
        else:
            yield Case(section="rl", algo="maml-trpo", k=1, impl="fast-vs-exact", device=device,
                       meta_batch=T, repeats=2 if scale == "quick" else 3, warmup=1, options=opts)


def run_trpo_paths(case: Case) -> Row:
    """MAML-TRPO meta-iterations on one family, the fast path (``fisher_subsample`` of
    the case) and the reference exact path (1.0, the previous code's numbers bit for bit)
    in this process, their iterations alternating, each path its own theta from the same
    start and its own task stream.

    Per path: seconds per iteration (sampling included), the sampler's share, the update
    (the rest: meta-gradient, conjugate gradient, line search), and the update in
    policy-gradient equivalents: update seconds over those of one first-order policy
    gradient (the REINFORCE surrogate's forward and backward with respect to theta) on
    that iteration's post-adaptation trajectories (T x E x H steps). Medians over
    ``repeats`` iterations after ``warmup``; ``speedup`` = reference / fast seconds per
    iteration."""
    dev = torch.device(case.device)
    opts = dict(case.options or {})
    name, share = str(opts["family"]), float(opts["fisher_subsample"])
    fam = _rl_family(name, **{k: int(opts[k]) for k in ("rollouts", "horizon") if k in opts})
    T = case.meta_batch
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    paths: dict[str, Callable[[], tuple[float, float, float]]] = {}
    units: dict[str, str] = {}
    for path, f in (("fast", share), ("exact", 1.0)):
        cfg = C.resolve(fam, {"algo": "maml", "meta_batch": T, "device": case.device,
                              "family_options": fam.options(), "trpo": {"fisher_subsample": f}})
        units[path] = cfg.trpo.fisher_unit
        g = torch.Generator().manual_seed(0)
        theta = P.clone_leaf(fam.init_params(g, dev, torch.float32))
        paths[path] = _trpo_iteration(fam, cfg, theta, fam.make_outer(cfg, theta), g, dev, sync)
    for _ in range(case.warmup):
        for run in paths.values():
            run()
    times: dict[str, list[tuple[float, float, float]]] = {p: [] for p in paths}
    for _ in range(case.repeats):
        for path, run in paths.items():
            times[path].append(run())
    med = {p: [statistics.median(x[i] for x in ts) for i in range(3)] for p, ts in times.items()}
    row: Row = {"algo": case.algo, "impl": case.impl, "family": name, "T": T,
                "E": fam.rl.rollouts, "H": fam.rl.horizon, "fisher_subsample": share,
                "fisher_unit": units["fast"]}
    for path, prefix in (("fast", ""), ("exact", "ref_")):
        total, sample_s, pg = med[path]
        update = statistics.median(t - s for t, s, _ in times[path])
        row.update({f"{prefix}sec_per_iter": total, f"{prefix}sample_sec": sample_s,
                    f"{prefix}update_sec": update, f"{prefix}pg_sec": pg,
                    f"{prefix}pg_equivalents": update / pg})
    row["speedup"] = row["ref_sec_per_iter"] / row["sec_per_iter"]
    row["update_speedup"] = row["ref_update_sec"] / row["update_sec"]
    return row


def _trpo_iteration(fam: RLFamily, cfg: C.TrainConfig, theta: Params, outer: Any,
                    g: torch.Generator, dev: torch.device,
                    sync: Callable[[], None]) -> Callable[[], tuple[float, float, float]]:
    """One timed MAML-TRPO iteration -> (seconds, sampling seconds, one policy gradient's
    seconds on its post-adaptation trajectories)."""

    def run() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        batch = fam.sample_batch(cfg.meta_batch, g, device=dev)
        mg = outer.step(theta, batch, lambda th, b: meta_grad("maml", th, b, cfg.inner))
        sync()
        total = time.perf_counter() - t0
        data = mg.outer_data
        t1 = time.perf_counter()
        th = P.detach(theta, requires_grad=True)
        logp = batch.log_probs(P.expand(th, batch.n_tasks), data)  # [T, E, H]
        loss = -masked_task_mean(logp * data.advantages, data.rollouts.mask)  # REINFORCE, [T]
        P.grads(loss.mean(), th)
        sync()
        return total, batch.sample_seconds, time.perf_counter() - t1

    return run


def run_omniglot(case: Case) -> Row:
    """5-way 1-shot, 15 query per class, meta-batch 32: MAML (k = 1, 5) and iMAML."""
    opts = dict(case.options or {})
    lam = 2.0
    inner_lr = 0.4 if case.algo in ("maml", "fomaml") else 0.1
    fam_opts = {"data": opts.get("data"), "ways": 5, "shots": 1,
                "query": int(opts.get("query", 15)), "filters": int(opts.get("filters", 64))}
    chooser = ChunkChooser() if case.impl == "auto" else None
    step = _supervised_step("omniglot", case, fam_opts, inner_lr=inner_lr, imaml_lam=lam,
                            imaml_cg=5, chooser=chooser)
    step()  # with impl "auto": times the candidates and keeps the fastest
    with peak_memory(case.device) as peak:
        step()
    impl = case.impl + (f"-{opts['chunk']}" if case.impl == "chunked" else "")
    row: Row = {"algo": case.algo, "k": case.k, "impl": impl,
                "sec_per_iter": _timeit(step, case), "peak_mb": peak.mb}
    if chooser is not None:
        row["chunk"] = chooser.chunk  # what --task-chunk auto chose here
    return row


OMNIGLOT_CHUNK = 4
"""Tasks per chunk in the Omniglot section's memory-bounded rows (``--task-chunk``)."""


def omniglot_cases(device: str, scale: Scale, data: str | None = None) -> Iterator[Case]:
    data = data or os.environ.get("METARL_OMNIGLOT")
    if scale == "tiny":  # MAML k = 1 on 2 tasks one at a time, 1 query per class, 8 filters
        yield Case(section="omniglot", algo="maml", k=1, impl="chunked", device=device,
                   meta_batch=2, repeats=1, warmup=0,
                   options={"data": data, "chunk": 1, "query": 1, "filters": 8})
        return
    quick = scale == "quick"
    plan = [("maml", 1), ("maml", 5), ("imaml", 5)] if not quick else [("maml", 1)]
    for algo, k in plan:
        for impl in ("batched", "chunked", "auto", "loop"):
            yield Case(section="omniglot", algo=algo, k=k, impl=impl, device=device, meta_batch=32,
                       repeats=2 if quick else 3, warmup=1,
                       options={"data": data, "chunk": OMNIGLOT_CHUNK})


def run_locomotion(case: Case) -> Row:
    """Env-steps/s of the sampler on halfcheetah-vel (policy included: one batched call per
    step), against the raw ``mujoco.mj_step`` rate of the same T x E environments (controls
    set, ``frame_skip`` steps per env step, nothing else). Sampler and raw runs alternate;
    each is the median of ``repeats`` after warm-up. overhead = sampler / raw - 1."""
    # imported here, not at the top: MuJoCo is the optional [mujoco] extra, and the other
    # sections (and their worker processes) must run without it
    import mujoco

    dev = torch.device(case.device)
    opts = case.options or {}
    T, E, H = case.meta_batch, int(opts.get("rollouts", 20)), int(opts.get("horizon", 100))
    workers = int(opts.get("workers", 0))
    fam = _rl_family("halfcheetah-vel", rollouts=E, horizon=H, workers=workers)
    tasks = fam.sample_tasks(T, np.random.default_rng(0))
    theta_T = P.expand(fam.init_params(torch.Generator().manual_seed(0), dev, torch.float32), T)
    env = fam.batch_env(dev, torch.float32)

    from metarl.envs.locomotion import LocomotionSlots

    slots = fam.slots_factory()()  # the raw reference: the same models, stepped bare
    assert isinstance(slots, LocomotionSlots)
    slot_tasks, slot_seeds = [t for t in tasks for _ in range(E)], list(range(T * E))
    slots.reset(slot_tasks, slot_seeds)
    sims = [e.sim for e in slots.envs]
    models, datas = [s.model for s in sims], [s.data for s in sims]
    ctrls, frame_skip = [d.ctrl for d in datas], sims[0].frame_skip
    acts = np.random.default_rng(0).uniform(-1, 1, (H, T * E, ctrls[0].shape[0]))  # [H, n, act]
    mj_step = mujoco.mj_step

    def sampler_run() -> float:
        t0 = time.perf_counter()
        sample(fam.policy(), theta_T, env, tasks, E, H, seed=0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    def raw_run() -> float:
        slots.reset(slot_tasks, slot_seeds)  # the start states, untimed
        t0 = time.perf_counter()
        for h in range(H):
            a = acts[h]
            for k in range(T * E):
                ctrls[k][:] = a[k]
                mj_step(models[k], datas[k], nstep=frame_skip)
        return time.perf_counter() - t0

    try:
        return _sampler_row(case, sampler_run, raw_run, "raw_mj_step_per_sec", T, E, H, workers)
    finally:
        close = getattr(env, "close", None)
        if close is not None:
            close()


def _sampler_row(case: Case, sampler_run: Callable[[], float], ref_run: Callable[[], float],
                 ref_key: str, T: int, E: int, H: int, workers: int) -> Row:
    """The sampler against a bare-stepping reference, runs alternating (warm-up first): the
    medians of ``case.repeats`` each, as env-steps/s and the sampler's overhead."""
    for _ in range(case.warmup):  # starts the workers, loads kernels
        sampler_run()
        ref_run()
    timings = [(sampler_run(), ref_run()) for _ in range(case.repeats)]
    sec = statistics.median(t for t, _ in timings)
    ref = statistics.median(r for _, r in timings)
    steps = T * E * H
    return {"algo": "sampler", "impl": "in-process" if workers == 0 else f"{workers} workers",
            "T": T, "E": E, "H": H, "sec_per_iter": sec, "env_steps_per_sec": steps / sec,
            ref_key: steps / ref, "overhead": sec / ref - 1.0}


def locomotion_cases(device: str, scale: Scale) -> Iterator[Case]:
    """halfcheetah-vel sampling, T = 40 (8 with ``quick``), E = 20, H = 100: in-process and
    with 2 worker processes (``tiny``: in-process only, T = 1, E = 2, H = 5)."""
    if scale == "tiny":
        yield Case(section="locomotion", algo="sampler", k=0, impl="in-process", device=device,
                   meta_batch=1, repeats=1, warmup=0,
                   options={"workers": 0, "rollouts": 2, "horizon": 5})
        return
    quick = scale == "quick"
    for workers in (0, 2):
        yield Case(section="locomotion", algo="sampler", k=0,
                   impl="in-process" if workers == 0 else f"{workers} workers", device=device,
                   meta_batch=8 if quick else 40, repeats=2 if quick else 3, warmup=1,
                   options={"workers": workers})


def run_metaworld(case: Case) -> Row:
    """Env-steps/s of the sampler on Meta-World ML1 reach-v3 (policy included: one batched
    call per step), against bare Meta-World stepping: the same T x E environments, each
    reset (Meta-World's reset moves the hand for 100 simulation steps, a sizeable share
    at short horizons) and then stepped H times with ``env.step(action)`` in a loop with
    precomputed actions, nothing else.
    Sampler and bare runs alternate; each is the median of ``repeats`` after warm-up.
    overhead = sampler / bare - 1."""
    dev = torch.device(case.device)
    opts = case.options or {}
    T, E, H = case.meta_batch, int(opts.get("rollouts", 10)), int(opts.get("horizon", 100))
    workers = int(opts.get("workers", 0))
    fam = _rl_family("metaworld-ml1", env_name="reach-v3", rollouts=E, horizon=H,
                     workers=workers)
    tasks = fam.sample_tasks(T, np.random.default_rng(0))
    theta_T = P.expand(fam.init_params(torch.Generator().manual_seed(0), dev, torch.float32), T)
    env = fam.batch_env(dev, torch.float32)

    from metarl.envs.metaworld import MetaWorldSlots

    slots = fam.slots_factory()()  # the bare reference: the same environments, stepped alone
    assert isinstance(slots, MetaWorldSlots)
    slot_tasks, slot_seeds = [t for t in tasks for _ in range(E)], list(range(T * E))
    slots.reset(slot_tasks, slot_seeds)
    sims = [sim.env for sim in slots.sims]
    acts = np.random.default_rng(0).uniform(-1, 1, (H, T * E, 4)).astype(np.float32)

    def sampler_run() -> float:
        t0 = time.perf_counter()
        sample(fam.policy(), theta_T, env, tasks, E, H, seed=0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    def bare_run() -> float:  # what the sampler must do too: reset each env, H steps
        t0 = time.perf_counter()
        for sim in sims:
            sim.reset()
        for h in range(H):
            a = acts[h]
            for k, sim in enumerate(sims):
                sim.step(a[k])
        return time.perf_counter() - t0

    try:
        return _sampler_row(case, sampler_run, bare_run, "bare_metaworld_steps_per_sec", T, E, H,
                            workers)
    finally:
        close = getattr(env, "close", None)  # optional in the BatchEnv protocol
        if close is not None:
            close()
        slots.close()


def metaworld_cases(device: str, scale: Scale) -> Iterator[Case]:
    """ML1 reach-v3 sampling, T = 20 (4 with ``quick``), E = 10, H = 100: in-process and
    with 2 worker processes (``tiny``: in-process only, T = 1, E = 2, H = 5). None without
    the ``metaworld`` extra (the section is skipped)."""
    if importlib.util.find_spec("metaworld") is None:
        return
    if scale == "tiny":
        yield Case(section="metaworld", algo="sampler", k=0, impl="in-process", device=device,
                   meta_batch=1, repeats=1, warmup=0,
                   options={"workers": 0, "rollouts": 2, "horizon": 5})
        return
    quick = scale == "quick"
    for workers in (0, 2):
        yield Case(section="metaworld", algo="sampler", k=0,
                   impl="in-process" if workers == 0 else f"{workers} workers", device=device,
                   meta_batch=4 if quick else 20, repeats=2 if quick else 3, warmup=1,
                   options={"workers": workers, "rollouts": 5 if quick else 10})


DISTRIBUTED_FAMILIES: dict[str, dict[str, Any]] = {
    "sinusoid": {},  # MAML k = 1, Adam, meta-batch 25, 40-40 ReLU
    "navigation2d": {"hidden": [100, 100]},  # the paper's policy (the family's default: 64-64)
    "halfcheetah-vel": {},  # MAML-TRPO, meta-batch 40, E = 20, H = 100, 64-64 tanh
}
"""The families of the distributed section and their options: the paper's settings, the
family's defaults otherwise (meta-batch, inner step, outer optimizer, TRPO's 10 CG
iterations and 15 line-search steps)."""
DISTRIBUTED_PROCS = 2
"""Ranks the distributed section compares with one process."""


def distributed_cases(device: str, scale: Scale) -> Iterator[Case]:
    """One training iteration (sampling and update) per family of
    :data:`DISTRIBUTED_FAMILIES`, on 1 process and on :data:`DISTRIBUTED_PROCS` gloo
    ranks, one thread each; halfcheetah-vel only where MuJoCo is installed. ``quick``:
    halfcheetah-vel at meta-batch 8 and fewer repeats; ``tiny``: 2 tasks (one per rank),
    a 2 x 8 network, E = 2, H = 5, 2 CG iterations and 2 line-search steps. CPU only
    (none on another device: one GPU cannot hold two NCCL ranks)."""
    if device != "cpu":
        return
    for name, fam_opts in DISTRIBUTED_FAMILIES.items():
        if name == "halfcheetah-vel" and importlib.util.find_spec("mujoco") is None:
            continue
        opts: dict[str, Any] = {"family": name, "procs": DISTRIBUTED_PROCS,
                                "family_options": dict(fam_opts)}
        if scale == "tiny":
            rl = {} if name == "sinusoid" else {"rollouts": 2, "horizon": 5}
            opts.update(family_options={"hidden": [8, 8], **rl},
                        trpo={"cg_iters": 2, "ls_steps": 2})
            yield Case(section="distributed", algo="maml", k=1, impl="1-vs-2-procs",
                       device=device, meta_batch=2, repeats=1, warmup=0, options=opts)
            continue
        quick = scale == "quick"
        fam = families.make(name, **fam_opts)
        T = 8 if quick and name == "halfcheetah-vel" else fam.defaults.train.meta_batch
        yield Case(section="distributed", algo="maml", k=1, impl="1-vs-2-procs", device=device,
                   meta_batch=T, repeats=3 if quick else 5, warmup=1, options=opts)


Timing = tuple[float, float, distributed.Traffic]
"""One iteration: (seconds, sampling seconds, this rank's collectives' traffic)."""


def _training_iteration(case: Case, group: distributed.Group) -> Callable[[], Timing]:
    """``metarl train``'s iteration of the case's family on ``group`` (its own theta,
    outer optimizer and task stream from the family's seeds): this rank's share of the
    meta-batch, the meta-gradient averaged over the ranks, the outer step (TRPO: every
    Fisher-vector product, s^T F s and line-search candidate reduced). Logging's one
    metrics all-reduce (every ``log_every`` iterations) is left out."""
    opts = dict(case.options or {})
    name = str(opts["family"])
    fam = families.make(name, **opts.get("family_options", {}))
    cfg = C.resolve(fam, {"family": name, "family_options": fam.options(),
                          "meta_batch": case.meta_batch, "device": case.device,
                          "trpo": opts.get("trpo", {})})
    dev, dtype = torch.device(case.device), torch.float32
    g_init, g_tasks = torch.Generator().manual_seed(0), torch.Generator().manual_seed(7919)
    theta = P.clone_leaf(fam.init_params(g_init, dev, dtype))
    outer = make_outer(cfg, theta, fam, group)
    compute = meta_batch_grad(cfg, group)

    def run() -> Timing:
        before = distributed.TRAFFIC.snapshot()
        t0 = time.perf_counter()
        batch = sample_share(fam, cfg.meta_batch, g_tasks, group, device=dev, dtype=dtype)
        outer.step(theta, batch, compute)
        return (time.perf_counter() - t0, float(getattr(batch, "sample_seconds", 0.0)),
                distributed.TRAFFIC.since(before))

    return run


def _rank_loop(case_json: str, rank: int, world: int, port: int, conn: Any) -> None:
    """A rank of the distributed section: joins the group as a launched rank does (the
    launcher's variables, then :func:`metarl.distributed.init`), then runs one iteration
    per ``"go"`` until ``"stop"``, answering ``("ok", Timing)`` or ``("error", line)``."""
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        case = Case(**json.loads(case_json))
        run = _training_iteration(case, distributed.init(torch.device(case.device)))
        conn.send(("ready", None))
        while conn.recv() == "go":
            conn.send(("ok", run()))
    except BaseException as e:  # reported by the case process, which fails the row
        conn.send(("error", f"rank {rank}: {type(e).__name__}: {' '.join(str(e).split())}"))
    finally:
        distributed.shutdown()


def run_distributed(case: Case) -> Row:
    """A training iteration of one family on 1 process and on ``procs`` ranks side by side,
    one thread per process: the ranks (spawned here, joined over gloo on 127.0.0.1) and
    this process's own iteration alternate, the ranks idle while it runs; medians of
    ``repeats`` after ``warmup``. Both start from the same theta and task stream, so they
    take the same iterations. The ranks' time of an iteration is the slowest rank's.

    Row: seconds per iteration on 1 process (``sec_per_iter_1``) and on ``procs``
    (``sec_per_iter_n``), ``speedup`` = their ratio, the sampling seconds of each (the
    slowest rank's), and per rank and iteration the collectives' (all-gathers of per-task
    rows, all-reduces) count, payload bytes (``collective_bytes_per_iter``; one process
    communicates nothing) and seconds spent in them (transfer and waiting for the other
    ranks), with the parameter count."""
    import multiprocessing as mp

    from metarl import bench as this  # the ranks import it by name, not as __main__

    torch.set_num_threads(1)
    opts = dict(case.options or {})
    world = int(opts.get("procs", DISTRIBUTED_PROCS))
    # forked before this process runs any torch op (no thread pool to inherit): the ranks
    # start in a fraction of a second instead of importing everything again
    ctx: Any = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    port = distributed.free_port()
    conns, procs = [], []
    for rank in range(world):
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=this._rank_loop, daemon=True,
                        args=(json.dumps(asdict(case)), rank, world, port, theirs))
        p.start()
        conns.append(ours)
        procs.append(p)

    def answers() -> list[Any]:
        out = []
        for rank, c in enumerate(conns):
            try:
                kind, value = c.recv()
            except EOFError:
                raise RuntimeError(f"rank {rank} exited (code {procs[rank].exitcode})") from None
            if kind == "error":
                raise RuntimeError(value)
            out.append(value)
        return out

    def ranks_run() -> tuple[float, float, distributed.Traffic]:
        for c in conns:
            c.send("go")
        timings: list[Timing] = answers()
        return (max(t for t, _, _ in timings), max(s for _, s, _ in timings), timings[0][2])

    try:
        one = _training_iteration(case, distributed.LOCAL)
        answers()  # every rank has joined and built its iteration
        for _ in range(case.warmup):
            one()
            ranks_run()
        pairs = [(one(), ranks_run()) for _ in range(case.repeats)]
    finally:
        for c in conns:
            try:
                c.send("stop")
            except (BrokenPipeError, OSError):
                pass
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    fam = families.make(str(opts["family"]), **opts.get("family_options", {}))
    theta = fam.init_params(torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    med = statistics.median
    sec_1, sec_n = med(a[0] for a, _ in pairs), med(b[0] for _, b in pairs)
    traffic = [b[2] for _, b in pairs]
    return {"algo": case.algo, "impl": case.impl, "family": opts["family"], "T": case.meta_batch,
            "procs": world, "params": sum(v.numel() for v in theta.values()),
            "sec_per_iter_1": sec_1, "sec_per_iter_n": sec_n, "speedup": sec_1 / sec_n,
            "sample_sec_1": med(a[1] for a, _ in pairs),
            "sample_sec_n": med(b[1] for _, b in pairs),
            "collectives_per_iter": med(t.calls for t in traffic),
            "collective_bytes_per_iter": med(t.bytes for t in traffic),
            "collective_sec_per_iter": med(t.seconds for t in traffic)}


THREAD_POLICIES = ("one", "torch-default", "auto")
"""The thread counts the threads section compares: 1, torch's own default, and
``metarl.threads``'s automatic choice (what a run without ``--threads`` uses)."""

THREAD_WORKLOADS: dict[str, dict[str, Any]] = {
    "sinusoid": {"hidden": [40, 40]},  # the paper's MLP: small ops, threads cannot help
    "sinusoid-wide": {"hidden": [512, 512]},  # large enough for torch to split its matmuls
}
"""The threads section's workloads: sinusoid MAML (k = 5, meta-batch 25) at two widths."""

BUSY = "import time\nwhile True:\n    time.time()\n"
"""The busy process of the loaded cases: one pure-Python spin, a core's worth of load."""


def threads_cases(device: str, scale: Scale) -> Iterator[Case]:
    """Per workload and load (quiet, busy): the per-task loop at one thread, then the
    batched engine at each of :data:`THREAD_POLICIES`."""
    if scale == "tiny":
        yield Case(section="threads", algo="maml", k=1, impl="batched", device=device,
                   meta_batch=2, repeats=1, warmup=0,
                   options={"workload": "sinusoid", "hidden": [8, 8], "load": "busy",
                            "policy": "auto"})
        return
    quick = scale == "quick"
    r: dict[str, Any] = dict(repeats=5 if quick else 10, warmup=2 if quick else 3)
    for workload, opts in THREAD_WORKLOADS.items():
        for load in ("quiet", "busy"):
            for impl, policy in (("loop", "one"), *(("batched", p) for p in THREAD_POLICIES)):
                yield Case(section="threads", algo="maml", k=5, impl=impl, device=device,
                           options={"workload": workload, **opts, "load": load,
                                    "policy": policy}, **r)


def run_threads(case: Case) -> Row:
    """Seconds per sinusoid meta-iteration under one thread policy, with a busy process
    running beside this one when ``load`` is ``"busy"`` (started first, so that the
    automatic policy's first measurement sees it). The automatic policy re-measures
    before every iteration, as a training run does."""
    opts = dict(case.options or {})
    workload, load, policy = opts.pop("workload"), opts.pop("load"), opts.pop("policy")
    busy = None
    if load == "busy":
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        time.sleep(0.5)
    try:
        if policy == "one":
            threads.use(1)
        elif policy == "torch-default":
            threads.use(threads.TORCH_DEFAULT)
        else:
            threads.use(None)
        inner_step = _supervised_step("sinusoid", case, opts, inner_lr=0.01, imaml_lam=10.0,
                                      imaml_cg=5)

        def step() -> None:
            threads.tick()
            inner_step()

        sec = _timeit(step, case)
        gov = threads.current()
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return {"workload": workload, "load": load, "algo": case.algo, "k": case.k,
            "impl": case.impl, "policy": policy, "threads": torch.get_num_threads(),
            "others": None if gov is None else round(gov.others, 2),
            "chosen": None if gov is None else sorted(set(gov.history)), "sec_per_iter": sec}


SECTIONS: dict[str, tuple[Callable[..., Iterator[Case]], Callable[[Case], Row]]] = {
    "sinusoid": (sinusoid_cases, run_sinusoid),
    "rl": (rl_cases, run_rl),
    "omniglot": (omniglot_cases, run_omniglot),
    "locomotion": (locomotion_cases, run_locomotion),
    "metaworld": (metaworld_cases, run_metaworld),
    "distributed": (distributed_cases, run_distributed),
    "threads": (threads_cases, run_threads),
}
"""name -> (cases(device, scale[, data]), run(case) -> row)."""


def run_in_subprocess(case: Case, timeout: float = 900) -> Row:
    """Run one case in a fresh interpreter and return its row (an ``error`` key if it failed)."""
    env = dict(os.environ)
    if case.section == "threads":  # each case sets its own count; torch's default must be
        env.pop("OMP_NUM_THREADS", None)  # the machine's, not one inherited
        env.pop("METARL_THREADS", None)
    else:
        env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "metarl.bench", json.dumps(asdict(case))],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"algo": case.algo, "k": case.k, "impl": case.impl, "error": last}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(case_json: str) -> None:
    case = Case(**json.loads(case_json))
    if case.section != "threads":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    row = SECTIONS[case.section][1](case)
    print(json.dumps(row))


if __name__ == "__main__":
    worker(sys.argv[1])
