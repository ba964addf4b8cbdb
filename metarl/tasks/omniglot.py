"""Omniglot N-way K-shot classification (Finn et al. 2017, section 5.2)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

import torch
from torch import Tensor

from metarl.algorithms.imaml import IMAMLConfig
from metarl.config import Defaults, EvalDefaults, InnerOverride, OuterConfig, TrainConfig
from metarl.families import FamilyBase
from metarl.inner import InnerConfig
from metarl.options import require
from metarl.tasks.supervised import (
    Examples,
    MinibatchPlan,
    SupervisedBatch,
    accuracy,
    cross_entropy,
)
from metarl.types import ConfigError, Params

DATA_ENV = "METARL_OMNIGLOT"


class OmniglotBatch(SupervisedBatch):
    """T N-way tasks. With ``transductive=False`` batch norm normalises the query
    set with the support set's statistics instead of the query's own."""

    def __init__(self, *args: Any, transductive: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transductive = transductive

    def _logits(self, params: Params, data: Examples) -> Tensor:
        stats = None if self.transductive or data is not self.query else self.support.x
        return self.model.forward(params, data.x, stats_x=stats)  # type: ignore[call-arg]

    def inner_loss(self, params: Params, data: Examples) -> Tensor:
        return self.loss(self._logits(params, data), data.y)

    outer_loss = inner_loss

    def metric(self, params: Params, data: Examples) -> Tensor:
        return self._metric(self._logits(params, data), data.y)

    def select(self, idx: Tensor | slice | int) -> OmniglotBatch:
        return OmniglotBatch(self.model, self.loss, self._metric, **self._selected(idx),
                             transductive=self.transductive)


class OmniglotFamily(FamilyBase):
    """Omniglot N-way K-shot: T tasks of N characters, K support + Q query drawings each.

    Data: the official release (``images_background.zip``, ``images_evaluation.zip``
    or the small splits, zipped or unzipped), given with ``data`` (several paths
    are merged) or ``$METARL_OMNIGLOT``; nothing is downloaded. Images are resized
    to 28x28 and cached as uint8. Classes are split by character with a fixed
    seed (the paper's 1200 of 1623 for meta-training; the same fraction for other
    data) or by alphabet, and each character rotated by 0/90/180/270 degrees is a
    class of its own on both sides, as in MAML's code. ``eval_data`` meta-tests on
    another data set, all of whose characters are test classes. ``val_fraction > 0``
    holds that share of the meta-train characters (alphabets with ``split=alphabet``)
    out as the meta-test pool, to choose settings on validation classes; the test
    classes are then never seen.

    Model: 4 x [conv 3x3, 64 filters, batch norm, ReLU, stride 2], mean over
    space, linear head; per-task weights batched over tasks. Batch norm uses the
    statistics of the task's own batch (transductive, as the published MAML
    numbers did); ``transductive=False`` normalises the query set with the
    support set's statistics.

    Initialisation: Xavier-uniform convolutions, head weights N(0, ``head_std``^2),
    batch-norm shifts 0 and scales drawn from U(0, 1) (``bn_scale="uniform"``, the
    default), or all 1 as in MAML's TensorFlow code (``bn_scale="one"``, to reproduce
    the paper). The uniform scales were chosen on validation characters: +7 points of
    5-way 1-shot accuracy after 300 iterations (README, "Omniglot initialisation").

    ``train_shots`` gives meta-training tasks more support images than test tasks
    have (``shots``), as Reptile's protocol (10 at training for 1-shot testing); their
    query set shrinks to the drawings left (at most ``20 - train_shots``).
    ``inner_batch`` makes every inner step of a meta-training task adapt on a minibatch
    of that many of its support images, each task's support set reshuffled every epoch
    (Reptile's protocol: 10 of the 5 x 10 images per Adam step); test tasks adapt on
    their whole support set.

    Defaults follow the MAML paper: 5-way, 1 inner step at lr 0.4 (3 at test),
    meta-batch 32; 20-way, 5 steps at lr 0.1, meta-batch 16; Adam 1e-3; 60,000
    iterations; iMAML lambda 2, 5 CG steps, 16 (5-way) / 25 (20-way) inner steps
    at lr 0.1. Reptile takes 5 (5-way) / 10 (20-way) plain gradient steps at lr
    0.1; the Reptile paper's own protocol (inner Adam, ``train_shots``, annealed
    meta-step) is one command in the README ("Reptile's protocol").
    """

    name = "omniglot"
    description = "Omniglot N-way K-shot character classification, conv-4 (MAML paper 5.2)"
    metric = "accuracy"
    higher_is_better = True
    eval_chunk = 100

    def __init__(self, data: str | Sequence[str] | None = None, ways: int = 5, shots: int = 1,
                 query: int = 15, split: Literal["character", "alphabet"] = "character",
                 split_seed: int = 0, transductive: bool = True,
                 eval_data: str | Sequence[str] | None = None, cache_dir: str | None = None,
                 filters: int = 64, downsample: Literal["stride", "maxpool"] = "stride",
                 impl: Literal["auto", "grouped", "loop", "vmap"] = "auto",
                 bn_scale: Literal["one", "uniform"] = "uniform", bn_eps: float = 1e-3,
                 head_std: float = 1.0, val_fraction: float = 0.0,
                 train_shots: int | None = None, inner_batch: int | None = None) -> None:
        from metarl.models.conv import ConvNet
        from metarl.tasks.omniglot_data import DRAWERS

        for what, v, lo in (("ways", ways, 2), ("shots", shots, 1), ("query", query, 1),
                            ("filters", filters, 1)):
            require(int(v) >= lo, self.name, what, v, f">= {lo}")
        require(train_shots is None or int(train_shots) >= 1, self.name, "train_shots",
                train_shots, ">= 1 (or none: the test shots)")
        require(inner_batch is None or int(inner_batch) >= 1, self.name, "inner_batch",
                inner_batch, ">= 1 (or none: the whole support set every inner step)")
        require(int(shots) + int(query) <= DRAWERS, self.name, "shots", shots,
                f"<= {DRAWERS - int(query)} (each character has {DRAWERS} drawings, query={query} "
                "of them are the query set)")
        require(train_shots is None or int(train_shots) < DRAWERS, self.name, "train_shots",
                train_shots, f"<= {DRAWERS - 1} (each character has {DRAWERS} drawings)")
        require(split in ("character", "alphabet"), self.name, "split", split,
                "character or alphabet")
        require(bn_scale in ("one", "uniform"), self.name, "bn_scale", bn_scale, "one or uniform")
        require(float(bn_eps) > 0, self.name, "bn_eps", bn_eps, "> 0")
        require(float(head_std) > 0, self.name, "head_std", head_std, "> 0")
        require(0.0 <= float(val_fraction) < 1.0, self.name, "val_fraction", val_fraction,
                "in [0, 1)")
        self.data = _paths(data) or _paths(os.environ.get(DATA_ENV))
        self.eval_data = _paths(eval_data)
        self.ways, self.shots, self.query = int(ways), int(shots), int(query)
        self.split, self.split_seed, self.transductive = split, int(split_seed), bool(transductive)
        self.cache_dir, self.filters = cache_dir, int(filters)
        self.downsample, self.impl = downsample, impl
        self.bn_scale, self.bn_eps, self.head_std = bn_scale, float(bn_eps), float(head_std)
        self.val_fraction = float(val_fraction)
        self.train_shots = None if train_shots is None else int(train_shots)
        self.inner_batch = None if inner_batch is None else int(inner_batch)
        try:
            self.model = ConvNet(self.ways, filters=self.filters, downsample=downsample, impl=impl,
                                 eps=self.bn_eps, bn_scale=bn_scale, head_std=self.head_std)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def defaults(self) -> Defaults:
        five = self.ways <= 5
        return Defaults(
            train=TrainConfig(algo="maml", iterations=60_000, meta_batch=32 if five else 16,
                              inner=InnerConfig(steps=1 if five else 5, lr=0.4 if five else 0.1),
                              outer=OuterConfig(lr=1e-3), imaml=IMAMLConfig(lam=2.0, cg_iters=5),
                              log_every=100, checkpoint_every=1000, task_chunk="auto"),
            per_algo={"imaml": InnerOverride(steps=16 if five else 25, lr=0.1),
                      "reptile": InnerOverride(steps=5 if five else 10, lr=0.1)},
            eval=EvalDefaults(steps=3 if five else 5, tasks=600))

    def options(self) -> dict[str, Any]:
        return {"data": self.data, "ways": self.ways, "shots": self.shots, "query": self.query,
                "split": self.split, "split_seed": self.split_seed,
                "transductive": self.transductive, "eval_data": self.eval_data,
                "cache_dir": self.cache_dir, "filters": self.filters,
                "downsample": self.downsample, "impl": self.impl, "bn_scale": self.bn_scale,
                "bn_eps": self.bn_eps, "head_std": self.head_std,
                "val_fraction": self.val_fraction, "train_shots": self.train_shots,
                "inner_batch": self.inner_batch}

    def describe(self) -> str:
        return inspect.cleandoc(type(self).__doc__ or "") + (
            f"\n\nthis instance: {self.ways}-way {self.shots}-shot, {self.query} query per class, "
            f"split by {self.split}, data {self.data or '(none given)'}")

    # --- data --------------------------------------------------------------
    def _load(self, paths: list[str]) -> Any:
        from metarl.tasks.omniglot_data import load_omniglot

        if not paths:
            raise ConfigError("omniglot needs its data: pass --data PATH (the official release's "
                              "images_background.zip / images_evaluation.zip, or a folder holding "
                              f"them) or set ${DATA_ENV}; nothing is downloaded")
        return load_omniglot(paths, cache_dir=self.cache_dir)

    @cached_property
    def pools(self) -> tuple[Any, Any]:
        """(meta-train pool, meta-test pool) of classes."""
        from metarl.tasks.omniglot_data import OmniglotPool, omniglot_pools, split_characters

        data = self._load(self.data)
        if self.val_fraction > 0:  # validation: held-out meta-train classes; test ones unused
            train_idx, _ = split_characters(data.chars, split=self.split, seed=self.split_seed)
            sub = [data.chars[i] for i in train_idx.tolist()]
            keep, val = split_characters(sub, split=self.split, seed=self.split_seed + 1,
                                         train_fraction=1.0 - self.val_fraction)
            if len(keep) == 0 or len(val) == 0:
                raise ConfigError(f"omniglot val_fraction={self.val_fraction} leaves "
                                  f"{len(keep)} meta-train and {len(val)} validation "
                                  f"{self.split}s of {len(sub)}: choose another fraction")
            return (OmniglotPool(data.images[train_idx[keep]], rotations=True),
                    OmniglotPool(data.images[train_idx[val]], rotations=True))
        train, test = omniglot_pools(data, split=self.split, seed=self.split_seed)
        if self.eval_data:
            test = OmniglotPool(self._load(self.eval_data).images, rotations=True)
        return train, test

    def prepare(self) -> None:
        """Load (or read from cache) and split the data; raises DataError/ConfigError early."""
        self.pools  # noqa: B018

    def init_params(self, generator: torch.Generator, device: torch.device,
                    dtype: torch.dtype) -> Params:
        return self.model.init(generator, device, dtype)

    def sample_batch(self, n_tasks: int, generator: torch.Generator, *, split: str = "train",
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     shots: int | None = None, query: int | None = None) -> OmniglotBatch:
        pool = self.pools[0 if split == "train" else 1]
        if pool.n_classes < self.ways:
            raise ConfigError(f"the {split} split has {pool.n_classes} classes, fewer than "
                              f"{self.ways} ways: use more data or fewer --ways")
        from metarl.tasks.omniglot_data import DRAWERS

        k, q = self.shots, self.query
        if split == "train" and self.train_shots is not None:  # the query set takes the rest
            k, q = self.train_shots, min(self.query, DRAWERS - self.train_shots)
        b = pool.sample(n_tasks, self.ways, shots or k, query or q,
                        generator=generator, device=torch.device(device), dtype=dtype)
        plan = None
        if split == "train" and self.inner_batch is not None:  # drawn only then: same streams
            seed = int(torch.randint(2**62, (1,), generator=generator))
            plan = MinibatchPlan(n_tasks, b.x_support.shape[1], self.inner_batch, seed)
        return OmniglotBatch(self.model, cross_entropy, accuracy,
                             Examples(b.x_support, b.y_support), Examples(b.x_query, b.y_query),
                             transductive=self.transductive, plan=plan)


def _paths(value: str | os.PathLike[str] | Sequence[str] | None) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, os.PathLike):
        return [os.fspath(value)]
    if isinstance(value, str):
        return [p for p in value.split(os.pathsep) if p]
    return [str(p) for p in value]
