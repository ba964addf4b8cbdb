"""``metarl bench``: seconds per meta-iteration and peak memory, each case in its own process.

Every case runs in a fresh Python process (``python -m metarl.bench CASE_JSON``)
so that peak memory is that case's alone; glibc's mmap threshold is pinned in
the child so freed memory is returned rather than cached. Time is the median of
several iterations after warm-up; on CUDA each iteration is synchronised.
Sections: ``sinusoid`` (the four algorithms at meta-batch 25, k = 1..40,
batched engine versus a per-task loop). Other families add their own sections
through :data:`SECTIONS`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

Row = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Case:
    section: str
    algo: str
    k: int
    impl: str  # "batched" | "loop"
    device: str = "cpu"
    meta_batch: int = 25
    repeats: int = 10
    warmup: int = 3
    options: dict[str, Any] | None = None


def _timeit(step: Callable[[], None], case: Case) -> float:
    dev = torch.device(case.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
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
                     inner_lr: float, imaml_lam: float, imaml_cg: int) -> Callable[[], None]:
    from metarl import families
    from metarl import params as P
    from metarl.algorithms import IMAMLConfig, loop_meta_grad, meta_grad
    from metarl.inner import InnerConfig
    from metarl.outer import GradientOuter

    dev = torch.device(case.device)
    fam = families.make(family_name, **family_options)
    g = torch.Generator().manual_seed(0)
    theta = P.clone_leaf(fam.init_params(g, dev, torch.float32))
    batch = fam.sample_batch(case.meta_batch, g, split="train", device=dev, dtype=torch.float32)
    inner = InnerConfig(steps=case.k, lr=inner_lr)
    icfg = IMAMLConfig(lam=imaml_lam, cg_iters=imaml_cg)
    fn = meta_grad if case.impl == "batched" else loop_meta_grad
    outer = GradientOuter(theta, "adam", 1e-3)

    def step() -> None:
        outer.step(theta, batch, lambda th, b: fn(case.algo, th, b, inner, icfg))

    return step


def run_sinusoid(case: Case) -> Row:
    from metarl.memory import peak_memory

    step = _supervised_step("sinusoid", case, {}, inner_lr=0.01, imaml_lam=10.0, imaml_cg=5)
    step()  # load kernels before measuring memory
    with peak_memory(case.device) as peak:
        step()
    sec = _timeit(step, case)
    return {"algo": case.algo, "k": case.k, "impl": case.impl, "sec_per_iter": sec,
            "peak_mb": peak.mb}


def sinusoid_cases(device: str, quick: bool) -> Iterator[Case]:
    ks = (1, 5) if quick else (1, 5, 10, 20, 40)
    for algo in ("maml", "fomaml", "reptile", "imaml"):
        for k in ks:
            for impl in ("batched", "loop"):
                yield Case(section="sinusoid", algo=algo, k=k, impl=impl, device=device,
                           repeats=5 if quick else 10, warmup=2 if quick else 3)


SECTIONS: dict[str, tuple[Callable[[str, bool], Iterator[Case]], Callable[[Case], Row]]] = {
    "sinusoid": (sinusoid_cases, run_sinusoid),
}


def run_in_subprocess(case: Case, timeout: float = 900) -> Row:
    """Run one case in a fresh interpreter and return its row (an ``error`` key if it failed)."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "metarl.bench", json.dumps(asdict(case))],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"algo": case.algo, "k": case.k, "impl": case.impl, "error": last}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(case_json: str) -> None:
    case = Case(**json.loads(case_json))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    row = SECTIONS[case.section][1](case)
    print(json.dumps(row))


if __name__ == "__main__":
    worker(sys.argv[1])
