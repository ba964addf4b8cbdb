"""Stop a training run when validation stops improving, with a training callback.

    python examples/early_stopping.py runs/sin-early   # a few minutes on one CPU core

Every ``every`` iterations the callback adapts theta to validation tasks (seed 1; the
test tasks of ``metarl evaluate`` use seed 0) and stops the run after ``patience``
checks without a better query loss. The run folder then holds the checkpoint of the
iteration it stopped at, which ``metarl evaluate`` and ``metarl train --resume`` read.
"""

from __future__ import annotations

import sys

import torch

from metarl import families
from metarl.config import TrainConfig
from metarl.evaluate import adaptation_values
from metarl.train import RunResult, Step, train


class EarlyStopping:
    """A :class:`metarl.train.Callback`: validation loss every ``every`` iterations."""

    def __init__(self, cfg: TrainConfig, *, every: int = 500, patience: int = 3,
                 tasks: int = 200) -> None:
        self.family = families.make(cfg.family, **cfg.family_options)
        self.cfg, self.every, self.patience, self.tasks = cfg, every, patience, tasks
        self.history: list[tuple[int, float]] = []  # (iteration, validation loss)
        self.best, self.bad = float("inf"), 0

    def on_iteration(self, step: Step) -> bool:
        if step.iteration % self.every:
            return True
        scores = adaptation_values(step.theta, self.family, n_tasks=self.tasks,
                                   steps=self.cfg.inner.steps, lr=self.cfg.inner.lr, seed=1,
                                   device=torch.device("cpu"), dtype=torch.float32)
        loss = float(scores.values[:, -1].mean())  # after the training's inner steps
        self.history.append((step.iteration, loss))
        print(f"iteration {step.iteration}: validation loss {loss:.4f}")
        self.best, self.bad = (loss, 0) if loss < self.best else (self.best, self.bad + 1)
        return self.bad < self.patience  # False stops the run here


def main(out: str, iterations: int = 20_000, every: int = 500,
         patience: int = 3) -> tuple[RunResult, EarlyStopping]:
    cfg = TrainConfig(family="sinusoid", iterations=iterations, meta_batch=25, device="cpu",
                      log_every=every, checkpoint_every=every)
    cfg = cfg.replace({"inner": {"steps": 1, "lr": 0.01}})
    stopper = EarlyStopping(cfg, every=every, patience=patience)
    result = train(cfg, out, callbacks=[stopper], overwrite=True)
    print(f"stopped after {result.iterations} iterations; best validation loss {stopper.best:.4f}")
    return result, stopper


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/sin-early")
