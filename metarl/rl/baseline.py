"""The linear feature baseline of rllab and MAML-RL, fitted per task in one batched solve.

Features of the observation ``o`` at step ``h`` of an episode, with
``t = h / 100``::

    phi(o, h) = [clip(o, -10, 10), clip(o, -10, 10)^2, t, t^2, t^3, 1]

For each task the coefficients solve the ridge least-squares problem on the
reward-to-go of that task's valid steps,
``(Phi^T Phi + reg I) w = Phi^T R``; all T systems are built with two batched
matrix products and solved by one batched ``linalg.solve`` (in float64). As in
rllab, ``reg`` starts at ``reg_coeff * I`` (absolute, not scaled by the data)
and is multiplied by 10 for the tasks whose solve failed or was not finite,
up to ``max_tries`` attempts. As in the MAML-RL code, the baseline is fitted
and evaluated on the same batch (:meth:`LinearFeatureBaseline.fit_predict`).

References: Duan et al. 2016 (rllab, ``LinearFeatureBaseline``); Finn et al.
2017, appendix (MAML-RL uses it with ridge 1e-5).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LinearFeatureBaseline"]


class LinearFeatureBaseline:
    """Per-task linear value baseline on hand-made features.

    Args:
        reg_coeff: initial ridge coefficient (rllab: 1e-5).
        max_tries: solves attempted, the ridge growing x10 after each failure.
        obs_clip: observations are clipped to ``[-obs_clip, obs_clip]`` (rllab: 10).
        time_scale: ``t = step / time_scale`` (rllab: 100, whatever the horizon).
    """

    def __init__(self, reg_coeff: float = 1e-5, max_tries: int = 5, obs_clip: float = 10.0,
                 time_scale: float = 100.0) -> None:
        if reg_coeff <= 0 or max_tries < 1 or obs_clip <= 0 or time_scale <= 0:
            raise ValueError(
                f"LinearFeatureBaseline needs reg_coeff > 0, max_tries >= 1, obs_clip > 0 and "
                f"time_scale > 0, got {reg_coeff}, {max_tries}, {obs_clip}, {time_scale}")
        self.reg_coeff = reg_coeff
        self.max_tries = max_tries
        self.obs_clip = obs_clip
        self.time_scale = time_scale

    def features(self, obs: Tensor) -> Tensor:
        """``obs [T, E, H, obs]`` -> features ``[T, E, H, 2 * obs + 4]``."""
        if obs.dim() != 4:
            raise ValueError(f"observations have shape {tuple(obs.shape)}, expected [T, E, H, obs]")
        T, E, H, _ = obs.shape
        o = obs.clamp(-self.obs_clip, self.obs_clip)  # [T, E, H, obs]
        t = torch.arange(H, device=obs.device, dtype=obs.dtype) / self.time_scale  # [H]
        t = t.reshape(1, 1, H, 1).expand(T, E, H, 1)  # [T, E, H, 1]
        return torch.cat([o, o * o, t, t * t, t * t * t, torch.ones_like(t)], dim=-1)

    def fit(self, obs: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
        """Per-task ridge least squares on valid steps.

        Args:
            obs: ``[T, E, H, obs]``.
            returns: ``[T, E, H]`` regression targets (discounted reward-to-go).
            mask: ``[T, E, H]``, 1.0 on valid steps.

        Returns:
            coefficients ``[T, F]`` in float64, ``F = 2 * obs + 4``.
        """
        _check_shapes(obs, returns, mask)
        return self._solve(self.features(obs.to(torch.float64)), returns, mask)

    def _solve(self, features: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
        """:meth:`fit` on the float64 ``features [T, E, H, F]`` of its observations."""
        T = features.shape[0]
        m = mask.to(torch.float64).reshape(T, -1, 1)  # [T, N, 1]
        phi = features.reshape(T, m.shape[1], -1) * m  # [T, N, F]
        dev = features.device
        y = returns.to(torch.float64).reshape(T, -1, 1) * m  # [T, N, 1]
        F = phi.shape[-1]
        gram = phi.transpose(1, 2) @ phi  # [T, F, F]
        rhs = phi.transpose(1, 2) @ y  # [T, F, 1]
        eye = torch.eye(F, dtype=torch.float64, device=dev)  # [F, F]
        reg = torch.full((T, 1, 1), self.reg_coeff, dtype=torch.float64, device=dev)
        coeffs = torch.zeros(T, F, 1, dtype=torch.float64, device=dev)
        todo = torch.ones(T, dtype=torch.bool, device=dev)  # [T] tasks still unsolved
        for _ in range(self.max_tries):
            w, info = torch.linalg.solve_ex(gram + reg * eye, rhs)  # [T, F, 1], [T]
            ok = (info == 0) & torch.isfinite(w).all(dim=(1, 2))  # [T]
            coeffs = torch.where((todo & ok).reshape(T, 1, 1), w, coeffs)
            todo = todo & ~ok
            if not bool(todo.any()):
                break
            reg = torch.where(todo.reshape(T, 1, 1), reg * 10.0, reg)
        return coeffs.squeeze(-1)  # failed tasks after max_tries keep zero coefficients

    def predict(self, obs: Tensor, coeffs: Tensor, mask: Tensor | None = None) -> Tensor:
        """Values ``[T, E, H]`` (in ``obs.dtype``) from ``coeffs [T, F]``; 0 where ``mask`` is 0."""
        return self._values(self.features(obs.to(torch.float64)), coeffs, obs.dtype, mask)

    @staticmethod
    def _values(phi: Tensor, coeffs: Tensor, dtype: torch.dtype, mask: Tensor | None) -> Tensor:
        """:meth:`predict` on the float64 features ``phi [T, E, H, F]`` of its observations."""
        # a product and a sum, not einsum/bmm: those fold a batch of one task into a
        # matrix-vector kernel that rounds differently, and a task's values must not depend
        # on how many tasks share its batch (distributed ranks hold different numbers)
        values = (phi * coeffs[:, None, None, :]).sum(-1).to(dtype)  # [T, E, H]
        return values if mask is None else values * mask.to(values.dtype)

    def fit_predict(self, obs: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
        """Fit on ``(obs, returns, mask)``, return the values on the same steps: ``[T, E, H]``."""
        _check_shapes(obs, returns, mask)
        with torch.no_grad():  # the features once, for the fit and the values alike
            phi = self.features(obs.to(torch.float64))  # [T, E, H, F]
            return self._values(phi, self._solve(phi, returns, mask), obs.dtype, mask)


def _check_shapes(obs: Tensor, returns: Tensor, mask: Tensor) -> None:
    """Raise unless ``returns`` and ``mask`` have the observations' ``[T, E, H]``."""
    if returns.shape != obs.shape[:3] or mask.shape != obs.shape[:3]:
        raise ValueError(f"returns {tuple(returns.shape)} and mask {tuple(mask.shape)} must "
                         f"have shape {tuple(obs.shape[:3])} (the observations' [T, E, H])")
