"""The 2D navigation family: Gymnasium env, tensor env, registration, task sampling."""

from __future__ import annotations

import importlib
import json
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import metarl.envs.navigation as nav


@pytest.mark.parametrize("env_id", [nav.ENV_ID, nav.ORACLE_ENV_ID])
def test_check_env(env_id):
    env = gymnasium.make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Unbounded positions are intended; the checker only flags them as unusual.
        warnings.filterwarnings("ignore", message=".*Box observation space (minimum|maximum)")
        check_env(env.unwrapped)
    env.close()


def test_registration_is_idempotent():
    importlib.reload(nav)
    assert nav.ENV_ID in gymnasium.registry
    assert gymnasium.registry[nav.ENV_ID].max_episode_steps == 100


def test_reward_transition_and_info():
    env = gymnasium.make(nav.ENV_ID)
    obs, info = env.reset(seed=0, options={"task": {"goal": [0.3, -0.2]}})
    np.testing.assert_array_equal(obs, np.zeros(2, dtype=np.float32))
    np.testing.assert_allclose(info["goal"], [0.3, -0.2], rtol=1e-6)
    obs, reward, terminated, truncated, info = env.step(np.array([0.5, -0.05], dtype=np.float32))
    np.testing.assert_allclose(obs, [0.1, -0.05], rtol=1e-6)  # x clipped to 0.1
    expected = -np.hypot(0.1 - 0.3, -0.05 + 0.2)  # distance after the move
    assert reward == pytest.approx(expected, rel=1e-6)
    assert info["distance"] == pytest.approx(-expected, rel=1e-6)
    assert info["reward_distance"] == reward
    assert not terminated and not truncated


def test_truncation_at_100_steps():
    env = gymnasium.make(nav.ENV_ID)
    env.reset(seed=0, options={"task": {"goal": [0.4, 0.4]}})
    for step in range(1, 101):
        _, _, terminated, truncated, _ = env.step(np.zeros(2, dtype=np.float32))
        assert not terminated
        assert truncated == (step == 100)


def test_task_is_sticky_and_set_task_waits_for_reset():
    env = nav.Navigation2DEnv()
    env.reset(seed=1, options={"task": {"goal": [0.1, 0.2]}})
    env.reset()
    np.testing.assert_allclose(env.goal, [0.1, 0.2], rtol=1e-6)
    env.set_task({"goal": [-0.3, 0.0]})
    np.testing.assert_allclose(env.goal, [0.1, 0.2], rtol=1e-6)  # not mid-episode
    env.reset()
    np.testing.assert_allclose(env.goal, [-0.3, 0.0], rtol=1e-6)
    assert env.task == {"goal": [pytest.approx(-0.3), 0.0]}


def test_default_goal_drawn_from_np_random():
    env = nav.Navigation2DEnv()
    assert env.task is None
    env.reset(seed=3)
    g1 = env.goal
    env.reset()
    g2 = env.goal
    env.reset(seed=3)
    np.testing.assert_array_equal(env.goal, g1)
    assert not np.array_equal(g1, g2)
    assert np.all(np.abs(np.stack([g1, g2])) <= 0.5)


def test_oracle_observation_has_goal():
    env = gymnasium.make(nav.ORACLE_ENV_ID)
    obs, _ = env.reset(seed=0, options={"task": {"goal": [0.25, -0.5]}})
    assert obs.shape == (4,) and obs.dtype == np.float32
    np.testing.assert_allclose(obs, [0, 0, 0.25, -0.5])
    obs, *_ = env.step(np.array([0.1, 0.1], dtype=np.float32))
    np.testing.assert_allclose(obs, [0.1, 0.1, 0.25, -0.5], rtol=1e-6)


@pytest.mark.parametrize("task, match", [
    ({"gaol": [0, 0]}, "expected exactly"),
    ({"goal": [0, 0, 1]}, "two finite numbers"),
    ({"goal": [0, float("nan")]}, "two finite numbers"),
    ([0.1, 0.2], "must be a dict"),
])
def test_bad_task_raises(task, match):
    env = nav.Navigation2DEnv()
    with pytest.raises(ValueError, match=match):
        env.reset(options={"task": task})


def test_bad_action_shape_raises():
    env = nav.Navigation2DEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        env.step(np.zeros(3, dtype=np.float32))


def test_sample_tasks():
    tasks = nav.sample_tasks(50, np.random.default_rng(0))
    assert tasks == nav.sample_tasks(50, np.random.default_rng(0))
    assert json.loads(json.dumps(tasks)) == tasks
    goals = np.array([t["goal"] for t in tasks])
    assert goals.shape == (50, 2) and np.all(np.abs(goals) <= 0.5)
    assert all(type(x) is float for t in tasks for x in t["goal"])


def _gym_rollout(goals, actions, oracle=False):
    """Step one Gymnasium env per (task, episode): obs, reward, terminated ``[T, E, H, ...]``."""
    T, E, H, _ = actions.shape
    obs = np.zeros((T, E, H, 4 if oracle else 2), dtype=np.float32)
    rew = np.zeros((T, E, H), dtype=np.float64)
    term = np.zeros((T, E, H), dtype=bool)
    for t in range(T):
        for e in range(E):
            env = nav.Navigation2DEnv(oracle=oracle)
            env.reset(seed=0, options={"task": {"goal": goals[t].tolist()}})
            for h in range(H):
                o, r, d, _, _ = env.step(actions[t, e, h])
                obs[t, e, h], rew[t, e, h], term[t, e, h] = o, r, d
                if d:
                    term[t, e, h:] = True
                    break
    return obs, rew, term


def _tensor_rollout(goals, actions, dtype=torch.float32, oracle=False):
    T, E, H, _ = actions.shape
    env = nav.Navigation2DTensorEnv(dtype=dtype, oracle=oracle)
    env.reset(goals, E)
    out = [env.step(torch.from_numpy(actions[:, :, h])) for h in range(H)]
    obs, rew, term = (torch.stack(x, dim=2).numpy() for x in zip(*out))
    return obs, rew, term


@pytest.mark.parametrize("oracle", [False, True])
def test_tensor_env_matches_gym_env_on_random_actions(oracle):
    rng = np.random.default_rng(0)
    T, E, H = 3, 4, 100
    goals = rng.uniform(-0.5, 0.5, size=(T, 2)).astype(np.float32)
    actions = rng.uniform(-0.3, 0.3, size=(T, E, H, 2)).astype(np.float32)  # many outside the clip
    g_obs, g_rew, g_term = _gym_rollout(goals, actions, oracle)
    t_obs, t_rew, t_term = _tensor_rollout(goals, actions, oracle=oracle)
    np.testing.assert_array_equal(t_term, g_term)
    alive = ~np.concatenate([np.zeros((T, E, 1), bool), g_term[..., :-1]], axis=-1)
    np.testing.assert_array_equal(t_obs[alive], g_obs[alive])  # positions bit-identical
    np.testing.assert_allclose(t_rew[alive], g_rew[alive], rtol=1e-6, atol=1e-7)
    # float64 tensor env: same trajectories up to float32 rounding of the gym env
    d_obs, d_rew, d_term = _tensor_rollout(goals, actions, dtype=torch.float64, oracle=oracle)
    np.testing.assert_allclose(d_obs[alive], g_obs[alive], atol=1e-5)
    np.testing.assert_allclose(d_rew[alive], g_rew[alive], atol=1e-5)


def test_tensor_env_matches_gym_env_reaching_the_goal():
    goals = np.array([[0.25, -0.13], [-0.43, 0.05]], dtype=np.float32)
    T, E, H = 2, 1, 10
    # greedy controller: full speed towards the goal, then the remainder
    actions = np.zeros((T, E, H, 2), dtype=np.float32)
    for t in range(T):
        pos = np.zeros(2, dtype=np.float32)
        for h in range(H):
            actions[t, 0, h] = goals[t] - pos
            pos = pos + np.clip(actions[t, 0, h], -0.1, 0.1)
    g_obs, g_rew, g_term = _gym_rollout(goals, actions)
    t_obs, t_rew, t_term = _tensor_rollout(goals, actions)
    assert g_term[0, 0].argmax() == 2 and g_term[1, 0].argmax() == 4  # reached in 3 and 5 steps
    np.testing.assert_array_equal(t_term, g_term)
    np.testing.assert_allclose(t_rew[:, :, :3], g_rew[:, :, :3], rtol=1e-6, atol=1e-7)
    # after termination: frozen position, zero reward, still terminated
    np.testing.assert_array_equal(t_obs[0, 0, 3:], np.broadcast_to(t_obs[0, 0, 2], (7, 2)))
    assert np.all(t_rew[0, 0, 3:] == 0) and np.all(t_term[0, 0, 2:])


def test_tensor_env_errors():
    env = nav.Navigation2DTensorEnv()
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match=r"expected \[T, 2\]"):
        env.reset(np.zeros((3, 3)), 2)
    env.reset(np.zeros((3, 2)), 2)
    with pytest.raises(ValueError, match="expected"):
        env.step(torch.zeros(3, 2, 3))


def test_batch_env_adapter():
    env = nav.Navigation2DBatchEnv(dtype=torch.float64, oracle=True)
    tasks = nav.sample_tasks(3, np.random.default_rng(1))
    obs = env.reset(tasks, 5, seed=0)
    assert obs.shape == (3, 5, 4) and obs.dtype == torch.float64
    np.testing.assert_allclose(obs[:, 0, 2:].numpy(), [t["goal"] for t in tasks], atol=1e-7)
    obs, reward, done = env.step(torch.zeros(3, 5, 2, dtype=torch.float64))
    assert reward.shape == (3, 5) and done.dtype == torch.bool
