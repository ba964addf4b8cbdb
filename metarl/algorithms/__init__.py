"""The four meta-gradients, behind one call."""

from __future__ import annotations

import time

import torch

from metarl import params as P
from metarl.algorithms import imaml, maml, reptile
from metarl.algorithms.base import MetaGrad
from metarl.algorithms.imaml import IMAMLConfig
from metarl.inner import InnerConfig
from metarl.types import ConfigError, Params, SupportsSelect, TaskBatch

ALGORITHMS = ("maml", "fomaml", "reptile", "imaml")


def meta_grad(algo: str, theta: Params, batch: TaskBatch, inner: InnerConfig,
              imaml_cfg: IMAMLConfig | None = None, *, chunk: int | None = None) -> MetaGrad:
    """The meta-gradient of ``algo`` ("maml", "fomaml", "reptile", "imaml") for one meta-batch.

    ``chunk`` bounds memory: the tasks are processed ``chunk`` at a time (each
    chunk batched) and the meta-gradients averaged, so the peak is that of one
    chunk. The result is the same up to float rounding. Needs a batch with
    ``select`` (supervised batches have it); ``None`` or ``chunk >= T`` is one
    batched pass.
    """
    T = batch.n_tasks
    if chunk is not None and chunk < 1:
        raise ConfigError(f"task chunk must be at least 1, got {chunk}")
    if chunk is not None and chunk < T:
        if not isinstance(batch, SupportsSelect):
            raise ConfigError(f"{type(batch).__name__} cannot be split into task chunks: "
                              "drop --task-chunk for this family")
        parts = [(meta_grad(algo, theta, batch.select(slice(s, s + chunk)), inner, imaml_cfg),
                  min(chunk, T - s)) for s in range(0, T, chunk)]
        return _merge(parts, T)
    if algo == "maml":
        return maml.meta_grad(theta, batch, inner)
    if algo == "fomaml":
        return maml.meta_grad(theta, batch, inner, first_order=True)
    if algo == "reptile":
        return reptile.meta_grad(theta, batch, inner)
    if algo == "imaml":
        return imaml.meta_grad(theta, batch, inner, imaml_cfg or IMAMLConfig())
    raise ConfigError(f"unknown algorithm {algo!r}: use one of {', '.join(ALGORITHMS)}")


def _merge(parts: list[tuple[MetaGrad, int]], T: int) -> MetaGrad:
    """Task-weighted mean of chunk meta-gradients; per-task values (gradients included)
    concatenated."""
    first = parts[0][0]
    rows = [mg.task_grads for mg, _ in parts]
    task_grads = ({k: torch.cat([r[k] for r in rows if r is not None]) for k in first.grad}
                  if None not in rows else None)
    grad = (P.task_mean(task_grads) if task_grads is not None else
            {k: torch.stack([mg.grad[k] * (n / T) for mg, n in parts]).sum(0) for k in first.grad})
    inner_losses = [torch.cat([mg.inner_losses[j] for mg, _ in parts])
                    for j in range(len(first.inner_losses))]
    outers = [mg.outer_loss for mg, _ in parts]
    outer_loss = torch.cat([o for o in outers if o is not None]) if None not in outers else None
    phis = [mg.phi for mg, _ in parts]
    phi = ({k: torch.cat([p[k] for p in phis if p is not None]) for k in phis[0]}
           if phis[0] is not None and None not in phis else None)
    extra = {k: sum(mg.extra[k] * n for mg, n in parts) / T for k in first.extra}
    return MetaGrad(grad=grad, task_grads=task_grads, inner_losses=inner_losses,
                    outer_loss=outer_loss, phi=phi, kl_penalty=first.kl_penalty, extra=extra)


class ChunkChooser:
    """``--task-chunk auto``: the number of tasks per chunk chosen by timing, once.

    The first call times :func:`meta_grad` on that call's meta-batch at chunks of T, T/2,
    T/4, ... 1 task (powers of two), after one untimed warm-up pass on a single task, and
    stops going smaller once a chunk takes 1.5 times the fastest so far (smaller chunks only
    add per-chunk overhead past that point). It keeps the fastest chunk for every later
    call and returns the meta-gradient that chunk computed (the candidates' meta-gradients
    agree up to float rounding). Whether a whole batch or a few tasks at a time is faster
    depends on the CPU's caches and the model (on one Intel Xeon, four Omniglot tasks at a
    time were 1.3x faster than 32 at once at one inner step): measured, not a constant
    tuned on one CPU model. Costs a few meta-iterations once per process start.

    A batch without ``select`` (RL) or of one task is computed whole.
    """

    factor = 1.5
    """Stop trying smaller chunks once one takes this times the fastest so far."""

    def __init__(self) -> None:
        self.chunk: int | None = None
        """The chosen tasks per chunk (None until the first call)."""
        self.seconds: dict[int, float] = {}
        """Seconds each candidate took on the first call."""

    @staticmethod
    def candidates(n_tasks: int) -> list[int]:
        """``[T, then the powers of two below T, largest first]``."""
        return [n_tasks] + [2**i for i in reversed(range(n_tasks.bit_length()))
                            if 2**i < n_tasks]

    def meta_grad(self, algo: str, theta: Params, batch: TaskBatch, inner: InnerConfig,
                  imaml_cfg: IMAMLConfig | None = None) -> MetaGrad:
        if self.chunk is not None:
            return self.run(algo, theta, batch, inner, imaml_cfg, self.chunk)
        T = batch.n_tasks
        if T == 1 or not isinstance(batch, SupportsSelect):
            self.chunk = T
            return self.run(algo, theta, batch, inner, imaml_cfg, T)
        _wait(self.run(algo, theta, batch.select(slice(0, 1)), inner, imaml_cfg, 1))  # warm-up
        best: tuple[float, int, MetaGrad] | None = None
        for c in self.candidates(T):
            t0 = time.perf_counter()
            mg = _wait(self.run(algo, theta, batch, inner, imaml_cfg, c))
            dt = self.seconds[c] = time.perf_counter() - t0
            if best is None or dt < best[0]:
                best = (dt, c, mg)
            elif dt > self.factor * best[0]:
                break
        assert best is not None
        self.chunk = best[1]
        return best[2]

    def run(self, algo: str, theta: Params, batch: TaskBatch, inner: InnerConfig,
            imaml_cfg: IMAMLConfig | None, chunk: int) -> MetaGrad:
        """One meta-gradient at ``chunk`` tasks per chunk (what is timed)."""
        return meta_grad(algo, theta, batch, inner, imaml_cfg, chunk=chunk)


def _wait(mg: MetaGrad) -> MetaGrad:
    """``mg`` once its gradient is computed (one host read: waits for an accelerator)."""
    float(sum(v.sum() for v in mg.grad.values()))
    return mg


def loop_meta_grad(algo: str, theta: Params, batch: TaskBatch, inner: InnerConfig,
                   imaml_cfg: IMAMLConfig | None = None) -> MetaGrad:
    """Reference implementation: one task at a time, as per-task libraries do."""
    return meta_grad(algo, theta, batch, inner, imaml_cfg, chunk=1)


__all__ = ["ALGORITHMS", "ChunkChooser", "IMAMLConfig", "MetaGrad", "loop_meta_grad",
           "meta_grad"]
