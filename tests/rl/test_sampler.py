"""The batched sampler on the navigation tensor env and on plain Gymnasium envs."""

from __future__ import annotations

import math

import gymnasium
import numpy as np
import pytest
import torch

import metarl.envs.navigation as nav
from metarl.params import expand
from metarl.rl.policies import CategoricalMLPPolicy, GaussianMLPPolicy
from metarl.rl.sampler import BatchEnv, GymBatchEnv, NormalizedActions, Rollouts, sample

T, E, H = 4, 5, 30


def _nav_setup(dtype=torch.float32):
    pol = GaussianMLPPolicy(2, 2, hidden=(16, 16))
    theta = pol.init(torch.Generator().manual_seed(0), dtype=dtype)
    tasks = nav.sample_tasks(T, np.random.default_rng(0))
    return pol, expand(theta, T), tasks


def _same(a: Rollouts, b: Rollouts) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("obs", "actions", "rewards", "mask", "log_probs"))


def test_navigation_shapes_and_returns():
    pol, params_T, tasks = _nav_setup()
    env = nav.Navigation2DBatchEnv()
    assert isinstance(env, BatchEnv)
    roll = sample(pol, params_T, env, tasks, E, H, seed=0)
    assert roll.obs.shape == (T, E, H, 2) and roll.actions.shape == (T, E, H, 2)
    for f in (roll.rewards, roll.mask, roll.log_probs):
        assert f.shape == (T, E, H) and f.dtype == torch.float32
    assert (roll.n_tasks, roll.n_episodes, roll.horizon) == (T, E, H)
    assert roll.returns().shape == (T, E) and roll.mean_return().shape == (T,)
    torch.testing.assert_close(roll.mean_return(), roll.rewards.sum(-1).mean(-1))
    assert torch.all(roll.obs[:, :, 0] == 0)  # start at the origin
    assert torch.all(roll.rewards <= 0)
    # actions are stored unclipped (the log-probs refer to them)
    assert float(roll.actions.abs().max()) > 0.1
    assert not roll.obs.requires_grad and not roll.log_probs.requires_grad


def test_navigation_determinism():
    pol, params_T, tasks = _nav_setup()
    env = nav.Navigation2DBatchEnv()
    a = sample(pol, params_T, env, tasks, E, H, seed=3)
    b = sample(pol, params_T, env, tasks, E, H, seed=3)
    c = sample(pol, params_T, env, tasks, E, H, seed=4)
    assert _same(a, b)
    assert not torch.equal(a.actions, c.actions)
    # episodes of one task differ from each other
    assert not torch.equal(a.actions[0, 0], a.actions[0, 1])


def test_log_probs_match_recomputed_distribution():
    pol, params_T, tasks = _nav_setup(torch.float64)
    params_T = {k: v + 0.05 * torch.randn(v.shape, dtype=v.dtype,
                                          generator=torch.Generator().manual_seed(1))
                for k, v in params_T.items()}  # distinct per-task parameters
    roll = sample(pol, params_T, nav.Navigation2DBatchEnv(dtype=torch.float64), tasks, E, H, 0)
    recomputed = pol.dist(params_T, roll.obs).log_prob(roll.actions)  # [T, E, H]
    torch.testing.assert_close(roll.log_probs, recomputed)


def test_mask_after_termination_on_navigation():
    """A near-deterministic policy that barely moves, with goals at (or near) the start:
    every episode terminates at its first step."""
    pol = GaussianMLPPolicy(2, 2, hidden=(4,), init_std=1e-4)
    theta = {k: torch.zeros_like(v) if k != "log_std" else v
             for k, v in pol.init(torch.Generator().manual_seed(0)).items()}
    tasks = [{"goal": [0.0, 0.0]}, {"goal": [0.005, -0.003]}, {"goal": [0.3, 0.3]}]
    roll = sample(pol, expand(theta, 3), nav.Navigation2DBatchEnv(), tasks, 2, H, seed=0)
    assert torch.all(roll.mask[:2, :, 0] == 1) and torch.all(roll.mask[:2, :, 1:] == 0)
    assert torch.all(roll.rewards[:2, :, 1:] == 0)
    assert torch.all(roll.mask[2] == 1)  # far goal: never reached, truncated at H
    torch.testing.assert_close(roll.lengths(), torch.tensor([[1.0, 1.0], [1.0, 1.0], [H, H]]))
    torch.testing.assert_close(roll.returns()[2], roll.rewards[2].sum(-1))


def test_all_done_stops_early_and_pads():
    pol = GaussianMLPPolicy(2, 2, hidden=(4,), init_std=1e-4)
    theta = {k: torch.zeros_like(v) if k != "log_std" else v
             for k, v in pol.init(torch.Generator().manual_seed(0)).items()}
    roll = sample(pol, expand(theta, 1), nav.Navigation2DBatchEnv(), [{"goal": [0.0, 0.0]}],
                  3, 50, seed=0)
    assert roll.horizon == 50 and torch.all(roll.mask[..., 1:] == 0)
    assert torch.all(roll.obs[..., 1:, :] == 0) and torch.all(roll.actions[..., 1:, :] == 0)


def test_tensor_env_and_gym_env_give_the_same_rollouts():
    pol, params_T, tasks = _nav_setup()
    a = sample(pol, params_T, nav.Navigation2DBatchEnv(), tasks, E, H, seed=7)
    gym_env = GymBatchEnv(lambda task: nav.make_env(task))
    b = sample(pol, params_T, gym_env, tasks, E, H, seed=7)
    torch.testing.assert_close(a.obs, b.obs, rtol=0, atol=0)
    torch.testing.assert_close(a.actions, b.actions, rtol=0, atol=0)
    torch.testing.assert_close(a.rewards, b.rewards, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.mask, b.mask, rtol=0, atol=0)


def _pendulum(task):
    return gymnasium.make("Pendulum-v1", g=task["g"])


def test_pendulum_gym_batch_env():
    pol = GaussianMLPPolicy(3, 1, hidden=(16,))
    tasks = [{"g": 9.81}, {"g": 3.0}]
    params_T = expand(pol.init(torch.Generator().manual_seed(0)), 2)
    env = GymBatchEnv(_pendulum)
    a = sample(pol, params_T, env, tasks, 3, 40, seed=0)
    assert a.obs.shape == (2, 3, 40, 3) and a.actions.shape == (2, 3, 40, 1)
    assert torch.all(a.mask == 1)  # Pendulum never terminates before its 200-step limit
    assert not torch.equal(a.obs[0, 0, 0], a.obs[0, 1, 0])  # random starts differ
    envs_before = list(env.envs)
    b = sample(pol, params_T, env, tasks, 3, 40, seed=0)
    assert _same(a, b)
    assert env.envs == envs_before  # same tasks: envs reused, not rebuilt
    c = sample(pol, params_T, env, tasks, 3, 40, seed=1)
    assert not torch.equal(a.obs[:, :, 0], c.obs[:, :, 0])
    # gravity matters: same start state and actions, different dynamics
    same_start = sample(pol, params_T, env, [{"g": 9.81}, {"g": 9.81}], 3, 40, seed=0)
    assert env.envs[3] is not envs_before[3]  # task changed: slot rebuilt
    torch.testing.assert_close(same_start.obs[0], a.obs[0])
    assert not torch.allclose(same_start.obs[1, :, 5], a.obs[1, :, 5])
    # the env clipped the actions to [-2, 2] but the sampler kept them as sampled
    assert float(a.actions.abs().max()) > 2.0
    torch.testing.assert_close(pol.dist(params_T, a.obs).log_prob(a.actions), a.log_probs)
    env.close()


def test_cartpole_categorical_early_termination():
    pol = CategoricalMLPPolicy(4, 2, hidden=(16,))
    params_T = expand(pol.init(torch.Generator().manual_seed(0)), 2)
    env = GymBatchEnv(lambda task: gymnasium.make("CartPole-v1"))
    roll = sample(pol, params_T, env, [{}, {}], 6, 100, seed=0)
    assert roll.actions.shape == (2, 6, 100) and roll.actions.dtype == torch.long
    lengths = roll.lengths()
    assert float(lengths.max()) < 100  # a random policy falls well before 100 steps
    steps = torch.arange(100, dtype=torch.float32)
    torch.testing.assert_close(roll.mask, (steps < lengths.unsqueeze(-1)).float())  # prefix mask
    torch.testing.assert_close(roll.returns(), lengths)  # reward 1 per valid step
    assert torch.all(roll.rewards[roll.mask == 0] == 0)
    recomputed = pol.dist(params_T, roll.obs).log_prob(roll.actions)  # [T, E, H]
    torch.testing.assert_close(recomputed * roll.mask, roll.log_probs * roll.mask)
    again = sample(pol, params_T, env, [{}, {}], 6, 100, seed=0)
    assert _same(roll, again)


def test_task_option_reuses_envs():
    made = []

    def make(task):
        made.append(task)
        return nav.make_env()

    env = GymBatchEnv(make, task_option=True)
    tasks = nav.sample_tasks(2, np.random.default_rng(0))
    obs = env.reset(tasks, 2, seed=0)
    assert obs.shape == (2, 2, 2) and len(made) == 4
    env.reset(nav.sample_tasks(2, np.random.default_rng(1)), 2, seed=0)
    assert len(made) == 4
    goals = [e.unwrapped.goal for e in env.envs]
    new = nav.sample_tasks(2, np.random.default_rng(1))
    np.testing.assert_allclose(goals[3], new[1]["goal"], rtol=1e-6)


def test_sampler_errors():
    pol, params_T, tasks = _nav_setup()
    with pytest.raises(ValueError, match="4 tasks but 3 task specs"):
        sample(pol, params_T, nav.Navigation2DBatchEnv(), tasks[:3], E, H, seed=0)
    with pytest.raises(ValueError, match="horizon"):
        sample(pol, params_T, nav.Navigation2DBatchEnv(), tasks, E, 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        GymBatchEnv(_pendulum).reset([{"g": 1.0}], 1, seed=-1)


class WholeBatchEnv:
    """The navigation env with a reset that takes no ``offset``: it samples whole batches."""

    def __init__(self):
        self.env = nav.Navigation2DBatchEnv()

    def reset(self, tasks, n_episodes, seed):
        return self.env.reset(tasks, n_episodes, seed)

    def step(self, actions):
        return self.env.step(actions)


def test_a_share_of_a_batch_needs_reset_to_take_offset():
    pol, params_T, tasks = _nav_setup()
    env = WholeBatchEnv()
    sample(pol, params_T, env, tasks, E, 3, seed=0)  # the whole batch: no offset passed
    match = (r"WholeBatchEnv.reset takes no keyword offset, which sampling a share of a batch "
             r"\(tasks from row 2\) needs: add `\*, offset: int = 0` to reset")
    with pytest.raises(TypeError, match=match):
        sample(pol, params_T, env, tasks, E, 3, seed=0, rows=(2, T + 2))
    with pytest.raises(TypeError, match=match):  # through the wrapper that rescales actions
        sample(pol, params_T, NormalizedActions(env, -np.ones(2), np.ones(2)), tasks, E, 3,
               seed=0, rows=(2, T + 2))
    share = sample(pol, params_T, nav.Navigation2DBatchEnv(), tasks, E, 3, seed=0,
                   rows=(2, T + 2))  # an env that takes it (and ignores it: fixed starts)
    assert share.obs.shape == (T, E, 3, 2)


def test_rollouts_to():
    pol, params_T, tasks = _nav_setup()
    roll = sample(pol, params_T, nav.Navigation2DBatchEnv(), tasks, 2, 5, seed=0)
    r64 = roll.to(dtype=torch.float64)
    assert r64.obs.dtype == torch.float64 and r64.mask.dtype == torch.float64
    assert math.isclose(float(r64.mean_return().sum()), float(roll.mean_return().sum()),
                        rel_tol=1e-6)
