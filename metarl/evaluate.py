"""Meta-testing: adapt to fresh test tasks and score after 0..K inner steps.

On several ranks (``metarl evaluate --procs N``, or under ``torchrun``) the test tasks
are split like training's meta-batch: every rank draws the same tasks from the seed,
adapts its :meth:`~metarl.distributed.Group.share` of each chunk, and the per-task
values are gathered in task order (:meth:`~metarl.distributed.Group.gather_rows`), so
the curves equal one process's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metarl import checkpoint, distributed, threads
from metarl import params as P
from metarl.checkpoint import Run
from metarl.families import Family
from metarl.inner import InnerConfig, adapt, has_learned_lr, model_params
from metarl.rl.family import RLFamily
from metarl.types import (
    ConfigError,
    Params,
    ReportsExtraMetrics,
    RLTaskBatch,
    SupportsSelect,
    TaskBatch,
    resolve_device,
    resolve_dtype,
)

TEST_SEED_OFFSET = 1_000_003
"""Test tasks are drawn from ``seed + TEST_SEED_OFFSET``: never the training stream."""
VALIDATION_SEED_OFFSET = 2_000_029
"""Validation tasks (training split, :mod:`metarl.train`'s ``--validate-every``) are drawn
from ``seed + VALIDATION_SEED_OFFSET``: neither the training stream nor the test tasks."""
SEED_OFFSETS = {"test": TEST_SEED_OFFSET, "train": VALIDATION_SEED_OFFSET}


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
    extra: dict[str, Curve] = field(default_factory=dict)
    """Other metrics of the same adaptation runs, by name (the batch's
    :meth:`~metarl.types.ReportsExtraMetrics.extra_metrics`, e.g. Meta-World's success rate)."""

    @classmethod
    def from_values(cls, label: str, values: torch.Tensor,
                    extra: Mapping[str, torch.Tensor] | None = None) -> Curve:
        """``values [n_tasks, K+1]`` -> mean and 95% CI (1.96 std / sqrt(n)); ``extra``:
        name -> ``[n_tasks, K+1]`` of each other metric, summarised the same way."""
        v = values.double()
        n = v.shape[0]
        std = v.std(0, unbiased=True) if n > 1 else torch.zeros(v.shape[1], dtype=v.dtype)
        return cls(label=label, steps=list(range(v.shape[1])), mean=v.mean(0).tolist(),
                   ci95=(1.96 * std / math.sqrt(n)).tolist(), n_tasks=n, per_task=values,
                   extra={k: cls.from_values(label, x) for k, x in (extra or {}).items()})

    def to_json(self, **head: Any) -> dict[str, Any]:
        d = {**head, "steps": self.steps, "mean": self.mean, "ci95": self.ci95,
             "n_tasks": self.n_tasks}
        if self.extra:
            d["extra_metrics"] = {k: c.to_json() for k, c in self.extra.items()}
        return d


@dataclass
class Scores:
    """Per-task metric after 0..K adaptation steps, and the tasks it was measured on."""

    values: torch.Tensor
    """``[n_tasks, K+1]`` (CPU, float64)."""
    tasks: list[dict[str, Any]] | None
    """RL: the task specs drawn (for the oracle line); None for supervised families."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """name -> ``[n_tasks, K+1]`` of each extra metric the batches report (CPU, float64)."""

    def curve(self, label: str) -> Curve:
        """The metric and every extra metric as a :class:`Curve` (mean and 95% CI)."""
        return Curve.from_values(label, self.values, self.extra)


def adaptation_values(theta: Params, family: Family, *, n_tasks: int, steps: int,
                      lr: float | tuple[float, ...], seed: int, device: torch.device,
                      dtype: torch.dtype, chunk: int = 600, prox_lam: float | None = None,
                      group: distributed.Group = distributed.LOCAL,
                      rule: InnerConfig | None = None, split: str = "test",
                      **overrides: Any) -> Scores:
    """Per-task metric after 0..K steps of gradient descent on the inner loss.

    With ``prox_lam`` the steps descend iMAML's proximal inner objective
    ``L_in(phi) + lam/2 |phi - theta|^2`` (an iMAML model adapts as it was trained).
    ``rule``: the inner optimizer and its settings (a run's ``config.inner``: a model
    trained with an inner Adam adapts with it); None: plain gradient steps.

    Tasks are drawn from the test split with ``seed + TEST_SEED_OFFSET`` (``split="train"``:
    validation tasks, the training split with ``seed + VALIDATION_SEED_OFFSET``) and
    processed ``chunk`` at a time (all tasks of a chunk adapt as one batch): every
    ``theta`` evaluated with the same arguments sees the same tasks.

    With a ``group`` of several ranks each rank adapts its share of every chunk (RL:
    with the trajectories those tasks have in the whole chunk) and every rank returns
    all ``n_tasks`` rows, in task order: the values of one process, up to round-off.
    """
    cfg = (rule or InnerConfig()).with_steps(steps, lr)
    gen = torch.Generator().manual_seed(seed + SEED_OFFSETS[split])
    theta = P.to(P.detach(theta), device, dtype)
    rows, tasks = [], []
    extra_rows: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n_tasks, chunk):
        threads.tick()
        T = min(chunk, n_tasks - start)
        batch, n_mine = _eval_share(family, T, gen, group, split=split, device=device,
                                    dtype=dtype, **overrides)
        n = batch.n_tasks
        prox = (prox_lam, P.expand(theta, n)) if prox_lam else None
        _, vals, extra = score_while_adapting(batch, P.expand(theta, n), steps, cfg, prox=prox)
        names = list(extra)  # the same on every rank: the family's metrics, in its order
        local = torch.stack([torch.stack(vals, 1)]
                            + [torch.stack(extra[k], 1) for k in names], 1)  # [n, 1+M, K+1]
        whole = group.gather_rows(local[:n_mine], group.counts(T))  # [T, 1+M, K+1]
        rows.append(whole[:, 0])  # [T, K+1]
        for i, name in enumerate(names, 1):
            extra_rows.setdefault(name, []).append(whole[:, i])  # [T, K+1]
        if isinstance(batch, RLTaskBatch):
            tasks += group.gather_objects(batch.tasks[:n_mine])
    return Scores(torch.cat(rows), tasks if family.kind == "rl" else None,
                  {name: torch.cat(r) for name, r in extra_rows.items()})


def _eval_share(family: Family, n: int, generator: torch.Generator, group: distributed.Group,
                *, split: str, device: torch.device, dtype: torch.dtype,
                **overrides: Any) -> tuple[TaskBatch, int]:
    """This rank's share of ``n`` tasks of ``split`` and how many of the batch's tasks are
    its own.

    Every rank draws all ``n`` (the generator stays in step). A rank whose share is empty
    (a last chunk smaller than the group) adapts the chunk's last task and keeps none of it,
    so that every rank runs the same calls. One process: the whole batch, as before.
    """
    if group.world == 1:
        return family.sample_batch(n, generator, split=split, device=device, dtype=dtype,
                                   **overrides), n
    share = group.share(n)
    mine = share.stop - share.start
    rows = share if mine > 0 else slice(n - 1, n)
    if isinstance(family, RLFamily):
        return family.sample_batch(n, generator, split=split, device=device, dtype=dtype,
                                   share=rows, **overrides), mine
    batch = family.sample_batch(n, generator, split=split, device=device, dtype=dtype,
                                **overrides)
    if not isinstance(batch, SupportsSelect):
        raise ConfigError(f"family {family.name!r} returns {type(batch).__name__}, which cannot "
                          "be split over processes (it has no select): evaluate it with one "
                          "process")
    return batch.select(rows), mine


def score_while_adapting(batch: TaskBatch, phi: Params, steps: int, cfg: InnerConfig,
                         prox: tuple[float, Params] | None = None,
                         keep: list[Params] | None = None
                         ) -> tuple[Params, list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Take ``steps`` inner steps from ``phi``, scoring before each step and after the last.

    RL batches (:class:`~metarl.types.RLTaskBatch`): the score at step j is the return of
    the trajectories phi_j samples to adapt on. Supervised: the metric on the query
    set; adaptation uses the support set. A batch that reports extra metrics
    (:class:`~metarl.types.ReportsExtraMetrics`, e.g. Meta-World's success rate) is
    scored on them on the same data.

    The steps are taken one call of :func:`~metarl.inner.adapt` at a time, carrying its
    state (inner Adam's moments, the proximal steps' halvings), so they are the steps of
    one ``steps``-step adaptation. ``keep``: a list that receives phi_0 ... phi_K
    (detached), for callers that need every policy (rendering).

    Returns:
        The adapted parameters, ``steps + 1`` per-task scores ``[T]`` (CPU, float64) and,
        for each extra metric, its ``steps + 1`` per-task values ``[T]`` by name.
    """
    on_inner = isinstance(batch, RLTaskBatch)
    extra_metrics = batch.extra_metrics if isinstance(batch, ReportsExtraMetrics) else None
    vals: list[torch.Tensor] = []
    extra: dict[str, list[torch.Tensor]] = {}
    state = None  # inner Adam's moments and the proximal halvings, carried step to step
    for j in range(steps + 1):
        model = model_params(phi)  # phi_0 may carry learned inner rates; adapt takes them
        data = batch.inner_data(model) if on_inner else None
        if keep is not None:
            keep.append(P.detach(model))
        with torch.no_grad():
            scored = data if on_inner else batch.outer_data(model)
            vals.append(batch.metric(model, scored).double().cpu())
            for name, v in (extra_metrics(model, scored) if extra_metrics else {}).items():
                extra.setdefault(name, []).append(v.double().cpu())
        if j < steps:
            ad = adapt(phi, batch, cfg.with_steps(1, cfg.lr_at(j)), create_graph=False,
                       data=[data] if on_inner else None, prox=prox, state=state)
            phi, state = ad.phi, ad.state
    return phi, vals, extra


def adapt_to_task(family: RLFamily, theta: Params, task: dict[str, Any], *, steps: int,
                  lr: tuple[float, ...], rollouts: int | None, seed: int, device: torch.device,
                  dtype: torch.dtype, rule: InnerConfig | None = None
                  ) -> tuple[Params, list[float]]:
    """Adapt to one task: returns the adapted parameters (no task dim) and the average
    return of the trajectories sampled before each step and after the last (``rule``: the
    inner optimizer, as in :func:`adaptation_values`)."""
    batch = family.batch_for([task], seed, device=device, dtype=dtype, rollouts=rollouts)
    phi, vals, _ = score_while_adapting(batch, P.expand(P.to(theta, device, dtype), 1), steps,
                                        (rule or InnerConfig()).with_steps(steps, lr))
    return {k: v[0].detach() for k, v in phi.items()}, [float(v[0]) for v in vals]


def rl_baselines(family: Family, *, scores: Scores, pretrained: Params | None,
                 **common: Any) -> tuple[list[Curve], dict[str, float]]:
    """Reference curves on the test tasks of ``scores``: a randomly initialised policy and
    a policy pretrained on all tasks jointly (if given), both adapted with the same
    steps (``common``: the arguments of :func:`adaptation_values`, its ``group``
    included: the curves are split over the ranks the same way), and the oracle's
    return where the family defines one.

    The oracle line is computed by rank 0 alone, on all the tasks as one batch (as one
    process does): a sampled oracle (locomotion) keys its noise by the row of its own
    batch, so a split would change its trajectories. The other ranks return no oracle
    line."""
    group: distributed.Group = common.get("group", distributed.LOCAL)
    rand = family.init_params(torch.Generator().manual_seed(common["seed"] + 12345),
                              common["device"], common["dtype"])
    curves = [adaptation_values(rand, family, **common).curve("random init")]
    if pretrained is not None:
        curves.append(adaptation_values(pretrained, family, **common).curve("pretrained"))
    hlines: dict[str, float] = {}
    if isinstance(family, RLFamily) and scores.tasks is not None and group.is_main:
        oracle = family.oracle_returns(scores.tasks, common["device"], common["dtype"])
        if oracle is not None:
            hlines["oracle"] = float(oracle.double().mean())
    return curves, hlines


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

    def extra_metrics(self) -> dict[str, list[Curve]]:
        """name -> the curves of each extra metric (success rate, ...): this model's, then
        the baselines' that report it, in the order of :attr:`baselines`."""
        return {name: [c.extra[name] for c in [self.curve, *self.baselines] if name in c.extra]
                for name in self.curve.extra}

    def to_json(self) -> dict[str, Any]:
        """The metric's curve (``steps``, ``mean``, ``ci95``, ``n_tasks``), ``extra_metrics``
        (name -> the same fields, e.g. ``success``), ``baselines`` (label -> the same,
        with their own ``extra_metrics``), ``reference_lines``, ``gap_closed`` and
        ``settings``."""
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


def evaluate_checkpoint(run: Run, *, n_tasks: int | None = None, steps: int | None = None,
                        lr: tuple[float, ...] | None = None, seed: int = 0, device: str = "auto",
                        chunk: int | None = None, baselines: bool = True,
                        pretrained: str | Path | None = None,
                        pretrain_iterations: int | None = None, proximal: bool = True,
                        notify: Callable[[str], None] | None = None, validation: bool = False,
                        **overrides: Any) -> Evaluation:
    """Meta-test the parameters of a checkpoint on fresh test tasks.

    ``validation``: adapt on the validation tasks of ``metarl train --validate-every``
    instead (the training split's held-out tasks, drawn from the run's own seed; ``seed``
    is then unused): with the run's validation settings (tasks, steps, rollouts) as the
    defaults, the curve is the validation row that iteration logged. No baselines then.

    Defaults (tasks, steps, test-time inner lr) come from the family; a model
    trained with more inner steps than the family's test default is tested
    with its own number (iMAML's 16 proximal steps, Reptile's 5). iMAML models
    adapt on their proximal objective (their own lambda) unless ``proximal`` is False.

    RL families with ``baselines`` add a randomly initialised policy, a policy
    pretrained on all tasks jointly (``pretrained``: its run or checkpoint; None:
    ``RUN/pretrained``, trained for ``pretrain_iterations`` on first use, the
    family's default when None) and the family's oracle line. ``notify`` receives
    a line before anything long starts.

    In a process launched as one of several ranks (``metarl evaluate --procs N``,
    ``torchrun``) the ranks split every curve's test tasks (:func:`adaptation_values`)
    and train a missing pretrained baseline together, on the distributed training path;
    rank 0's result is the whole evaluation, the other ranks' lacks the oracle line.

    Raises:
        ConfigError: more ranks than test tasks, or more ranks than the run's meta-batch
            when the pretrained baseline must be trained (:func:`check_procs`); test-time
            batch sizes (``shots``, ``query``) given for an RL family.
    """
    family = run.family()
    sizes = sorted(k for k in overrides if k != "rollouts")
    if sizes and family.kind == "rl":
        names, verb = " and ".join(sizes), "is" if len(sizes) == 1 else "are"
        raise ConfigError(f"{names} (support and query sizes) {verb} for supervised families; "
                          f"family {family.name!r} is RL: set the "
                          "trajectories per adaptation step with rollouts (--rollouts)")
    if "rollouts" in overrides and family.kind != "rl":
        raise ConfigError(f"rollouts (trajectories per adaptation step) are for RL families; "
                          f"family {family.name!r} is supervised: set shots and query instead")
    d = family.defaults.eval
    cfg = run.config
    if validation:
        v = cfg.validate
        n_tasks = n_tasks if n_tasks is not None else v.tasks
        steps = steps if steps is not None else v.steps
        if v.rollouts is not None and family.kind == "rl":
            overrides.setdefault("rollouts", v.rollouts)
        seed, baselines = cfg.seed, False
    n = n_tasks if n_tasks is not None else d.tasks
    k = steps if steps is not None else max(d.steps, cfg.inner.steps)
    rates = eval_rates(run, family, lr)
    dev, dtype = resolve_device(device), resolve_dtype(cfg.dtype)
    group = distributed.init(dev)  # the group of one unless launched with several ranks
    dev = distributed.local_device(dev)
    check_procs(run, group.world, n_tasks=n, baselines=baselines, pretrained=pretrained,
                pretrain_iterations=pretrain_iterations)
    common: dict[str, Any] = dict(n_tasks=n, steps=k, lr=tuple(rates), seed=seed, device=dev,
                                  dtype=dtype, chunk=chunk or family.eval_chunk, group=group,
                                  rule=cfg.inner, split="train" if validation else "test",
                                  **overrides)
    prox_lam = cfg.imaml.lam if cfg.algo == "imaml" and proximal else None
    scores = adaptation_values(run.theta, family, prox_lam=prox_lam, **common)
    result = Evaluation(family=family.name, algo=cfg.algo, metric=family.metric,
                        curve=scores.curve(cfg.algo),
                        settings={"n_tasks": n, "steps": k,
                                  "lr": "learned" if has_learned_lr(run.theta) else list(rates),
                                  "seed": seed, "tasks": "validation" if validation else "test",
                                  "proximal_lam": prox_lam, "inner_optimizer": cfg.inner.optimizer,
                                  "family_options": family.options(),
                                  **overrides})
    if baselines and family.kind == "rl":
        if pretrained is not None:
            pre = checkpoint.load(pretrained).theta
        else:
            iters = pretrain_iterations or d.pretrain_iterations
            if notify is not None and group.is_main:
                notify(f"pretrained baseline: {iters} iterations on all tasks jointly, cached in "
                       f"{pretrained_cache(run)}")
            pre = pretrained_baseline(run, iterations=iters)
        curves, hlines = rl_baselines(family, scores=scores, pretrained=P.to(pre, dev, dtype),
                                      **common)
        result.baselines, result.hlines = curves, hlines
    return result


def eval_rates(run: Run, family: Family, lr: Sequence[float] | None) -> tuple[float, ...]:
    """The test-time inner rates: ``lr``, else ``family``'s test-time ones (the run's
    family, already built by the caller), else the run's
    training rates (parameters with learned rates adapt with them; these are then unused;
    a policy adapted from them, ``metarl adapt``'s output, holds none and takes these).

    Raises:
        ConfigError: ``lr`` given for a run that learned its inner rates.
    """
    if lr and has_learned_lr(run.theta):
        raise ConfigError("this run learned its inner rates (--inner-learn-lr) and adapts with "
                          "them: drop --lr")
    return tuple(lr) if lr else test_rates(run.config.inner, family)


def test_rates(inner: InnerConfig, family: Family) -> tuple[float, ...]:
    """``family``'s test-time inner rates, else the training rates of ``inner``."""
    return family.defaults.eval.lr or (inner.lr if isinstance(inner.lr, tuple) else (inner.lr,))


def check_procs(run: Run, procs: int, *, n_tasks: int | None = None, baselines: bool = True,
                pretrained: str | Path | None = None,
                pretrain_iterations: int | None = None) -> None:
    """Raise :class:`ConfigError` when ``procs`` ranks cannot evaluate ``run``: more ranks
    than test tasks (``n_tasks``; None: the family's default), or, when the pretrained
    baseline must be trained (an RL family with ``baselines``, no ``pretrained`` and no
    cache of enough iterations), more ranks than the run's meta-batch it trains on."""
    if procs <= 1:
        return
    family = run.family()
    n = n_tasks if n_tasks is not None else family.defaults.eval.tasks
    if procs > n:
        raise ConfigError(f"{procs} processes for {n} test tasks: use at most --procs {n}, or "
                          "raise --tasks")
    iters = pretrain_iterations or family.defaults.eval.pretrain_iterations
    meta_batch = run.config.meta_batch
    if (baselines and family.kind == "rl" and pretrained is None and procs > meta_batch
            and _cached_pretrained(run, iters) is None):
        raise ConfigError(f"the pretrained baseline trains on the run's meta-batch of "
                          f"{meta_batch} tasks, too few for {procs} processes: use at most "
                          f"--procs {meta_batch}, give --pretrained, or --no-baselines")


def pretrained_cache(run: Run) -> Path:
    """Where the pretrained baseline of ``run`` is kept: ``pretrained/`` beside its checkpoint."""
    if run.path is None:
        raise ValueError("the run was not loaded from a file: give its pretrained baseline")
    return run.path.parent / "pretrained"


def _cached_pretrained(run: Run, iterations: int) -> Params | None:
    """The cached pretrained baseline of ``run`` if it has at least ``iterations``."""
    cache = pretrained_cache(run)
    if (cache / checkpoint.CHECKPOINT).is_file():
        cached = checkpoint.load(cache)
        if cached.iteration >= iterations:
            return cached.theta
    return None


def pretrained_baseline(run: Run, *, iterations: int, progress: Any = None) -> Params:
    """The "pretrained on all tasks jointly" baseline of a run, trained once and cached.

    It is the run's own configuration with no inner step (the meta-objective is
    then the ordinary objective averaged over tasks), trained for
    ``iterations`` with the same outer optimizer and seed, and stored in
    :func:`pretrained_cache`. Launched as one of several ranks, every rank calls this:
    they train it together (:func:`metarl.train.train` on their group, rank 0 writing
    the cache) and each reads the cache once rank 0 has written it.
    """
    from metarl.train import train  # training validates with this module's adaptation_values

    group = distributed.current()
    # every rank decides from the same cache: all of them read it before any rewrites it
    cached = _cached_pretrained(run, iterations)
    group.barrier()
    if cached is not None:
        return cached
    cfg = run.config.replace({"algo": "maml", "inner": {"steps": 0, "optimizer": "sgd"},
                              "iterations": iterations,
                              "log_every": max(1, iterations // 10),
                              "checkpoint_every": iterations})
    train(cfg, pretrained_cache(run), overwrite=True, progress=progress)
    group.barrier()  # rank 0 saved the checkpoint after the last collective
    return checkpoint.load(pretrained_cache(run)).theta
