"""The four meta-gradients, behind one call."""

from __future__ import annotations

from metarl.algorithms import imaml, maml, reptile
from metarl.algorithms.base import MetaGrad
from metarl.algorithms.imaml import IMAMLConfig
from metarl.inner import InnerConfig
from metarl.types import ConfigError, Params, TaskBatch

ALGORITHMS = ("maml", "fomaml", "reptile", "imaml")


def check_algo(name: str) -> str:
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}: use one of {', '.join(ALGORITHMS)}")
    return name


def meta_grad(algo: str, theta: Params, batch: TaskBatch, inner: InnerConfig,
              imaml_cfg: IMAMLConfig | None = None) -> MetaGrad:
    """The meta-gradient of ``algo`` ("maml", "fomaml", "reptile", "imaml") for one meta-batch."""
    if algo == "maml":
        return maml.meta_grad(theta, batch, inner)
    if algo == "fomaml":
        return maml.meta_grad(theta, batch, inner, first_order=True)
    if algo == "reptile":
        return reptile.meta_grad(theta, batch, inner)
    if algo == "imaml":
        return imaml.meta_grad(theta, batch, inner, imaml_cfg or IMAMLConfig())
    raise ConfigError(f"unknown algorithm {algo!r}: use one of {', '.join(ALGORITHMS)}")


__all__ = ["ALGORITHMS", "IMAMLConfig", "MetaGrad", "check_algo", "meta_grad"]


def loop_meta_grad(algo: str, theta: Params, batch: TaskBatch, inner: InnerConfig,
                   imaml_cfg: IMAMLConfig | None = None) -> MetaGrad:
    """Reference implementation: one task at a time, as per-task libraries do.

    Needs a batch with ``select(t)`` (supervised batches have it). Returns the
    mean of the per-task meta-gradients, which the batched engine must equal.
    """
    select = getattr(batch, "select", None)
    if select is None:
        raise TypeError(f"{type(batch).__name__} has no select(t): the loop reference needs one")
    grads = [meta_grad(algo, theta, select(t), inner, imaml_cfg).grad for t in range(batch.n_tasks)]
    return MetaGrad(grad={k: sum(g[k] for g in grads) / len(grads) for k in grads[0]})


__all__ += ["loop_meta_grad"]
