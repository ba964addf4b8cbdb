"""Meta-testing: adapt to fresh test tasks and score after 0..K inner steps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from metarl import params as P
from metarl.families import Family
from metarl.inner import InnerConfig, adapt
from metarl.types import Params

TEST_SEED_OFFSET = 1_000_003
"""Test tasks are drawn from ``seed + TEST_SEED_OFFSET``: never the training stream."""


@dataclass
class Curve:
    """A metric after 0..K adaptation steps, over n tasks."""

    label: str
    steps: list[int]
    mean: list[float]
    ci95: list[float]
    n_tasks: int
    per_task: torch.Tensor | None = field(default=None, repr=False)
    """``[n_tasks, K+1]``."""

    @classmethod
    def from_values(cls, label: str, values: torch.Tensor) -> Curve:
        """``values [n_tasks, K+1]`` -> mean and 95% CI (1.96 std / sqrt(n))."""
        v = values.double()
        n = v.shape[0]
        std = v.std(0, unbiased=True) if n > 1 else torch.zeros(v.shape[1], dtype=v.dtype)
        return cls(label=label, steps=list(range(v.shape[1])), mean=v.mean(0).tolist(),
                   ci95=(1.96 * std / math.sqrt(n)).tolist(), n_tasks=n, per_task=values)

    def to_json(self, **head: Any) -> dict[str, Any]:
        return {**head, "steps": self.steps, "mean": self.mean, "ci95": self.ci95,
                "n_tasks": self.n_tasks}


def adaptation_values(theta: Params, family: Family, *, n_tasks: int, steps: int,
                      lr: float | tuple[float, ...], seed: int, device: torch.device,
                      dtype: torch.dtype, chunk: int = 600, prox_lam: float | None = None,
                      **overrides: Any) -> torch.Tensor:
    """Per-task metric after 0..K steps of gradient descent on the inner loss.

    With ``prox_lam`` the steps descend iMAML's proximal inner objective
    ``L_in(phi) + lam/2 |phi - theta|^2`` (an iMAML model adapts as it was trained).

    Tasks are drawn from the test split with ``seed + TEST_SEED_OFFSET`` and
    processed ``chunk`` at a time (all tasks of a chunk adapt as one batch).

    Returns:
        ``[n_tasks, steps + 1]`` (CPU, float64).
    """
    cfg = InnerConfig(steps=steps, lr=lr)
    gen = torch.Generator().manual_seed(seed + TEST_SEED_OFFSET)
    theta = P.to(P.detach(theta), device, dtype)
    rows = []
    for start in range(0, n_tasks, chunk):
        T = min(chunk, n_tasks - start)
        batch = family.sample_batch(T, gen, split="test", device=device, dtype=dtype, **overrides)
        prox = (prox_lam, P.expand(theta, T)) if prox_lam else None
        _, vals = score_while_adapting(batch, P.expand(theta, T), steps, cfg, prox=prox)
        rows.append(torch.stack(vals, 1))  # [T, K+1]
    return torch.cat(rows)


def score_while_adapting(batch: Any, phi: Params, steps: int, cfg: InnerConfig,
                         prox: tuple[float, Params] | None = None) -> tuple[Params, list[torch.Tensor]]:
    """Take ``steps`` inner steps from ``phi``, scoring before each step and after the last.

    RL batches (``scores_inner_data``): the score at step j is the return of the
    trajectories phi_j samples to adapt on. Supervised: the metric on the query
    set; adaptation uses the support set.

    Returns:
        The adapted parameters and ``steps + 1`` per-task scores ``[T]`` (CPU, float64).
    """
    on_inner = getattr(batch, "scores_inner_data", False)
    vals = []
    for j in range(steps + 1):
        data = batch.inner_data(phi) if on_inner else None
        with torch.no_grad():
            scored = data if on_inner else batch.outer_data(phi)
            vals.append(batch.metric(phi, scored).double().cpu())
        if j < steps:
            phi = adapt(phi, batch, InnerConfig(steps=1, lr=cfg.lr_at(j)), create_graph=False,
                        data=[data] if on_inner else None, prox=prox).phi
    return phi, vals


@dataclass
class Evaluation:
    """The result of meta-testing a checkpoint."""

    family: str
    algo: str
    metric: str
    curve: Curve
    baselines: list[Curve] = field(default_factory=list)
    """Other curves drawn in the same run (random init, pretrained, ...)."""
    hlines: dict[str, float] = field(default_factory=dict)
    """Reference levels (an oracle's metric)."""
    settings: dict[str, Any] = field(default_factory=dict)

    def gap_closed(self) -> list[float] | None:
        """The fraction of the gap between the metric before adaptation and the oracle's
        that adaptation closes after 0..K steps (REFERENCE.md's scale-free figure:
        MAML on HalfCheetah velocity closes 0.68 after 1 step, 0.92 after 3); None
        without an oracle line or with no gap."""
        oracle = self.hlines.get("oracle")
        if oracle is None or oracle == self.curve.mean[0]:
            return None
        start = self.curve.mean[0]
        return [(m - start) / (oracle - start) for m in self.curve.mean]

    def to_json(self) -> dict[str, Any]:
        d = self.curve.to_json(family=self.family, algo=self.algo, metric=self.metric)
        if self.baselines:
            d["baselines"] = {c.label: c.to_json() for c in self.baselines}
        if self.hlines:
            d["reference_lines"] = self.hlines
        gap = self.gap_closed()
        if gap is not None:
            d["gap_closed"] = gap
        d["settings"] = self.settings
        return d


def evaluate_checkpoint(state: dict[str, Any], *, n_tasks: int | None = None,
                        steps: int | None = None, lr: tuple[float, ...] | None = None,
                        seed: int = 0, device: str = "auto", chunk: int | None = None,
                        baselines: bool = True, pretrained: Params | None = None,
                        proximal: bool = True, **overrides: Any) -> Evaluation:
    """Meta-test the parameters of a checkpoint on fresh test tasks.

    Defaults (tasks, steps, test-time inner lr) come from the family; a model
    trained with more inner steps than the family's test default is tested
    with its own number (iMAML's 16 proximal steps, Reptile's 5). Families
    that define ``baselines(...)`` add their reference curves to the result.
    iMAML models adapt on their proximal objective (their own lambda) unless
    ``proximal`` is False.
    """
    from metarl import families
    from metarl.types import resolve_device, resolve_dtype

    cfg = state["config"]
    family = families.make(cfg["family"], **cfg.get("family_options", {}))
    d = family.defaults
    n = n_tasks if n_tasks is not None else d.eval_tasks
    k = steps if steps is not None else max(d.eval_steps, int(cfg["inner_steps"]))
    rates = lr or d.eval_lr or (float(cfg["inner_lr"]),)
    dev, dtype = resolve_device(device), resolve_dtype(cfg.get("dtype", "float32"))
    size = chunk or getattr(family, "eval_chunk", 600)
    theta = state["theta"]
    common = dict(n_tasks=n, steps=k, lr=tuple(rates), seed=seed, device=dev, dtype=dtype,
                  chunk=size, **overrides)
    prox_lam = float(cfg["imaml_lam"]) if cfg["algo"] == "imaml" and proximal else None
    values = adaptation_values(theta, family, prox_lam=prox_lam, **common)
    result = Evaluation(family=family.name, algo=cfg["algo"], metric=family.metric,
                        curve=Curve.from_values(cfg["algo"], values),
                        settings={"n_tasks": n, "steps": k, "lr": list(rates), "seed": seed,
                                  "proximal_lam": prox_lam, "family_options": family.options(),
                                  **overrides})
    extra = getattr(family, "baselines", None)
    if baselines and extra is not None:
        kw = {"pretrained": P.to(pretrained, dev, dtype)} if pretrained is not None else {}
        curves, hlines = extra(theta=theta, config=cfg, **common, **kw)
        result.baselines, result.hlines = list(curves), dict(hlines)
    return result


def pretrained_baseline(run_or_checkpoint: str, state: dict[str, Any], *, iterations: int,
                        progress: Any = None) -> Params:
    """The "pretrained on all tasks jointly" baseline of a run, trained once and cached.

    It is the run's own configuration with no inner step (the meta-objective is
    then the ordinary objective averaged over tasks), trained for
    ``iterations`` with the same outer optimizer and seed, and stored in the
    ``pretrained/`` folder next to the run's checkpoint.
    """
    from pathlib import Path

    from metarl import checkpoint as ck
    from metarl.train import load_config, train

    path = ck.resolve_path(run_or_checkpoint)
    cache = path.parent / "pretrained"
    if (cache / ck.CHECKPOINT).is_file():
        cached = ck.load(cache)
        if int(cached["iteration"]) >= iterations:
            return cached["theta"]
    from dataclasses import replace

    cfg = replace(load_config(state), algo="maml", inner_steps=0, iterations=iterations,
                  log_every=max(1, iterations // 10), checkpoint_every=iterations)
    train(cfg, Path(cache), overwrite=True, progress=progress)
    return ck.load(cache)["theta"]
