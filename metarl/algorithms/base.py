"""What every meta-gradient returns: :class:`MetaGrad`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from metarl.types import Data, Params


@dataclass
class MetaGrad:
    """A meta-gradient and what was computed on the way.

    ``grad`` has the shapes of theta (no task dimension) and is the gradient of
    the *mean* over tasks of the method's meta-objective; pass it to any outer
    optimizer.
    """

    grad: Params
    task_grads: Params | None = None
    """Each task's gradient ``[T, *shape]``, whose mean over tasks is ``grad``: ranks
    sharing a meta-batch average these in task order (see
    :meth:`metarl.distributed.Group.ordered_mean`)."""
    inner_losses: list[Tensor] = field(default_factory=list)
    """Inner loss ``[T]`` at each inner step (step 0 is at theta)."""
    outer_loss: Tensor | None = None
    """Outer loss ``[T]`` of the adapted parameters (``None`` if not scored)."""
    phi: Params | None = None
    """Adapted parameters, detached, ``[T, *shape]``."""
    inner_data: list[Data] = field(default_factory=list)
    outer_data: Data = None
    kl_penalty: float = 0.0
    """The inner KL coefficient eta of the meta-objective (0: none): an outer optimizer
    that scores the objective itself (TRPO's line search) scores it with the same."""
    extra: dict[str, float] = field(default_factory=dict)
    """Algorithm-specific diagnostics, namespaced (``imaml/cg_indefinite``)."""

    def metrics(self) -> dict[str, float]:
        m: dict[str, float] = {}
        if self.inner_losses:
            m["inner/loss_0"] = float(self.inner_losses[0].mean())
        if self.outer_loss is not None:
            m["outer/loss"] = float(self.outer_loss.mean())
        m.update(self.extra)
        return m
