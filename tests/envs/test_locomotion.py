"""The MuJoCo locomotion families: rewards against their formulas, task distributions, the
registered ids, the batched stepping, worker processes (determinism, failures) and the CLI."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("mujoco")

from gymnasium.utils.env_checker import check_env

import metarl.envs.locomotion as loco
from metarl import families
from metarl import params as P
from metarl.rl.family import RLFamily
from metarl.rl.sampler import sample
from metarl.rl.workers import GymSlots, WorkerBatchEnv, WorkerError
from metarl.types import ConfigError

FAMILIES = {"halfcheetah-vel": "HalfCheetahVel", "halfcheetah-dir": "HalfCheetahDir",
            "ant-vel": "AntVel", "ant-dir": "AntDir"}
IDS = [f"metarl/{stem}{suffix}-v0" for stem in FAMILIES.values() for suffix in ("", "Oracle")]
CPU = torch.device("cpu")


@pytest.mark.parametrize("env_id", IDS)
def test_check_env(env_id):
    env = gymnasium.make(env_id)
    assert gymnasium.registry[env_id].max_episode_steps == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Unbounded observations are intended (as Gymnasium's own MuJoCo envs).
        warnings.filterwarnings("ignore", message=".*Box observation space (minimum|maximum)")
        check_env(env.unwrapped)
    env.close()


def expected_reward(stem, param, x_before, x_after, action, data):
    """The formulas of REFERENCE.md, from the recorded state (independent of the code)."""
    a = np.clip(action, -1.0, 1.0).astype(np.float64)
    vx = (x_after - x_before) / 0.05
    forward = -abs(vx - param) if stem.endswith("Vel") else param * vx
    if stem.startswith("HalfCheetah"):
        return forward - 0.05 * np.sum(a ** 2)
    contact = np.sum(np.clip(data.cfrc_ext, -1, 1) ** 2)
    healthy = 0.2 <= data.qpos[2] <= 1.0
    bonus = 1.0 if stem.endswith("Vel") else 0.0
    return forward + bonus - 0.005 * np.sum(a ** 2) - 5e-4 * contact + 0.05 * healthy


@pytest.mark.parametrize("stem", FAMILIES.values())
def test_reward_equals_formula_on_recorded_steps(stem):
    env = gymnasium.make(f"metarl/{stem}Oracle-v0")
    inner = env.unwrapped
    task = {"velocity": 1.3} if stem.endswith("Vel") else {"direction": -1}
    param = next(iter(task.values()))
    obs, info = env.reset(seed=3, options={"task": task})
    assert obs[-1] == param and info[next(iter(task))] == param
    sim = inner.sim
    assert sim.dt == pytest.approx(0.05)
    rng = np.random.default_rng(0)
    for _ in range(30):
        action = rng.uniform(-1.5, 1.5, env.action_space.shape).astype(np.float32)  # clipped
        x_before = float(sim.data.qpos[0])
        obs, reward, terminated, truncated, info = env.step(action)
        x_after = float(sim.data.qpos[0])
        expected = expected_reward(stem, param, x_before, x_after, action, sim.data)
        assert reward == pytest.approx(expected, rel=1e-9, abs=1e-12)
        terms = sum(v for k, v in info.items() if k.startswith("reward_"))
        assert terms == pytest.approx(reward, rel=1e-12, abs=1e-12)
        assert info["x_velocity"] == pytest.approx((x_after - x_before) / 0.05, rel=1e-12)
        # Gymnasium's v5 observation, then the task parameter (oracle)
        np.testing.assert_array_equal(obs[:-1], sim._get_obs())
        assert obs[-1] == param and obs.shape == env.observation_space.shape
        assert not truncated
        if terminated:
            break


@pytest.mark.parametrize("name", FAMILIES)
def test_task_distributions(name):
    fam = families.make(name)
    tasks = fam.sample_tasks(4000, np.random.default_rng(0))
    assert tasks == fam.sample_tasks(4000, np.random.default_rng(0))
    json.dumps(tasks)
    if name.endswith("vel"):
        high = 2.0 if name.startswith("halfcheetah") else 3.0
        v = np.array([t["velocity"] for t in tasks])
        assert v.min() >= 0 and v.max() < high
        assert v.min() < 0.01 * high and v.max() > 0.99 * high
        assert v.mean() == pytest.approx(high / 2, abs=0.05 * high)
    else:
        d = np.array([t["direction"] for t in tasks])
        assert set(d.tolist()) == {-1, 1}
        assert abs((d == 1).mean() - 0.5) < 0.03


def test_check_task_and_bad_specs():
    vel, direc = families.make("ant-vel"), families.make("halfcheetah-dir")
    assert vel.check_task({"velocity": 2}) == {"velocity": 2.0}
    assert direc.check_task({"direction": -1.0}) == {"direction": -1}
    with pytest.raises(ValueError, match=r"direction 0.5 is neither 1 nor -1"):
        direc.check_task({"direction": 0.5})
    with pytest.raises(ValueError, match=r"not a finite number"):
        vel.check_task({"velocity": float("nan")})
    with pytest.raises(ValueError, match=r"task is \{'velocity': v\}"):
        vel.check_task({"goal": [0, 1]})


def test_horizon_and_sticky_task():
    env = gymnasium.make("metarl/HalfCheetahDir-v0")
    env.reset(seed=0, options={"task": {"direction": 1}})
    for step in range(1, 101):
        _, _, terminated, truncated, info = env.step(np.zeros(6, dtype=np.float32))
        assert not terminated and truncated == (step == 100)
    assert info["direction"] == 1.0
    env.reset()
    assert env.unwrapped.param == 1.0  # the task stays until another is set
    short = families.make("halfcheetah-dir", horizon=7).make_env({"direction": -1})
    short.reset(seed=0)
    assert [short.step(np.zeros(6, dtype=np.float32))[3] for _ in range(7)][-1]


def test_ant_terminates_when_torso_leaves_healthy_range():
    env = gymnasium.make("metarl/AntVel-v0")
    env.reset(seed=0, options={"task": {"velocity": 1.0}})
    sim = env.unwrapped.sim
    qpos = sim.data.qpos.copy()
    qpos[2] = 1.5  # torso above the range
    sim.set_state(qpos, sim.data.qvel.copy())
    _, _, terminated, _, info = env.step(np.zeros(8, dtype=np.float32))
    assert terminated and info["reward_survive"] == 0.0


def test_healthy_z_range_sets_where_an_ant_episode_ends():
    """``--family-opt healthy_z_range=[low, high]``: a torso above 1.0 goes on under
    [0.2, Infinity] and ends under [0.2, 1.0], in the registered environment and in the
    sampler's slots alike; the family carries the option in its options."""
    def lifted(fam):
        env = fam.make_env({"direction": 1})
        env.reset(seed=0)
        sim = env.unwrapped.sim
        qpos = sim.data.qpos.copy()
        qpos[2] = 1.5
        sim.set_state(qpos, sim.data.qvel.copy())
        _, _, terminated, _, info = env.step(np.zeros(8, dtype=np.float32))
        slots = fam.slots_factory()()
        slots.reset([{"direction": 1}], [0])
        sim = slots.envs[0].sim
        sim.set_state(qpos, sim.data.qvel.copy())
        _, reward, done = slots.step(np.zeros((1, 8), dtype=np.float32))
        return terminated, info["reward_survive"], bool(done[0])

    free = families.make("ant-dir", healthy_z_range=[0.2, float("inf")])
    assert lifted(free) == (False, 0.05, False)
    assert lifted(families.make("ant-dir")) == (True, 0.0, True)
    assert free.options()["healthy_z_range"] == [0.2, float("inf")]
    assert "healthy_z_range" not in families.make("ant-dir").options()
    again = families.make("ant-dir", **free.options())
    assert again.robot_options["healthy_z_range"] == (0.2, float("inf"))
    with pytest.raises(ConfigError, match=r"healthy_z_range \[1.0, 0.5\] is not \[low, high\]"):
        families.make("ant-vel", healthy_z_range=[1.0, 0.5])
    with pytest.raises(ConfigError, match="never terminates, so it has no healthy_z_range"):
        families.make("halfcheetah-dir", healthy_z_range=[0.2, 1.0])
    with pytest.raises(ConfigError,
                       match=r"expected a list of 2 items .* healthy_z_range=\[0.5,1.5\]"):
        families.make("ant-dir", healthy_z_range="high")


def test_ant_without_contact_forces_in_the_observation():
    """``include_cfrc_ext_in_observation=false``: the same physics and rewards (the contact
    cost still charged), the observation without its 78 contact forces, in the registered
    environment and the slots alike; the policy's input shrinks with it."""
    full, bare = families.make("ant-vel"), families.make(
        "ant-vel", include_cfrc_ext_in_observation=False)
    task = {"velocity": 1.2}
    envs = [fam.make_env(task) for fam in (full, bare)]
    assert [e.observation_space.shape for e in envs] == [(105,), (27,)]
    obs = [e.reset(seed=4)[0] for e in envs]
    slots = bare.slots_factory()()
    np.testing.assert_array_equal(slots.reset([task], [4])[0], obs[1])
    np.testing.assert_array_equal(obs[0][:27], obs[1])
    rng = np.random.default_rng(0)
    contact = 0.0
    for _ in range(20):
        a = rng.uniform(-1, 1, 8).astype(np.float32)
        (o_full, r_full, *_, i_full), (o_bare, r_bare, *_, i_bare) = (e.step(a) for e in envs)
        s_obs, s_rew, _ = slots.step(a[None])
        np.testing.assert_array_equal(o_full[:27], o_bare)
        np.testing.assert_array_equal(s_obs[0], o_bare)
        assert r_full == r_bare == s_rew[0]
        contact += i_bare["reward_contact"]
    assert contact < 0  # still charged
    assert bare.options()["include_cfrc_ext_in_observation"] is False
    theta = bare.init_params(torch.Generator().manual_seed(0), CPU, torch.float32)
    assert theta["l0.w"].shape == (27, 64)
    with pytest.raises(ConfigError, match="observes no contact forces"):
        families.make("halfcheetah-vel", include_cfrc_ext_in_observation=False)


@pytest.mark.parametrize("name", ["ant-dir", "halfcheetah-vel"])
def test_frame_skip_sets_the_control_rate(name):
    """``frame_skip=2``: two MuJoCo steps of 0.01 s per action (rllab's Ant rate), v_x over
    0.02 s, in the registered environment and the slots alike, and the same state as the
    default model stepped twice as often; bad values are refused in one line."""
    fam, default = families.make(name, frame_skip=2), families.make(name)
    task = fam.sample_tasks(1, np.random.default_rng(3))[0]
    env, ref = fam.make_env(task), default.make_env(task)
    assert env.unwrapped.dt == pytest.approx(0.02) and ref.unwrapped.dt == pytest.approx(0.05)
    obs = env.reset(seed=4)[0]
    slots = fam.slots_factory()()
    np.testing.assert_array_equal(slots.reset([task], [4])[0], obs)
    rng = np.random.default_rng(0)
    for _ in range(10):
        a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        x = env.unwrapped.sim.data.qpos[0]
        o, r, *_, info = env.step(a)
        s_obs, s_rew, _ = slots.step(a[None])
        np.testing.assert_array_equal(s_obs[0], o)
        assert s_rew[0] == r
        assert info["x_velocity"] == pytest.approx((env.unwrapped.sim.data.qpos[0] - x) / 0.02)
    # five actions at frame_skip 2 held for two steps each = two at 5 (10 MuJoCo steps)
    raw = families.make(name, frame_skip=1).make_env(task)
    raw.reset(seed=4)
    ref.reset(seed=4)
    a = np.full(env.action_space.shape, 0.3, dtype=np.float32)
    for _ in range(10):
        raw.step(a)
    for _ in range(2):
        ref.step(a)
    np.testing.assert_allclose(raw.unwrapped.sim.data.qpos, ref.unwrapped.sim.data.qpos,
                               atol=1e-12)
    assert fam.options()["frame_skip"] == 2 and "frame_skip" not in default.options()
    assert families.make(name, **fam.options()).robot.frame_skip == 2
    assert "frame_skip 2: 0.02 s per action" in fam.describe()
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=rf"frame_skip {bad} is not a positive integer"):
            families.make(name, frame_skip=bad)
    with pytest.raises(ConfigError, match=r"frame_skip=1.5: expected an integer"):
        families.make(name, frame_skip=1.5)


@pytest.mark.parametrize("cls", [loco.HalfCheetahVelEnv, loco.AntDirEnv])
def test_batched_slots_equal_the_gymnasium_env(cls):
    """The sampler's fast path steps exactly as the registered environment, including an
    episode that terminates (frozen afterwards, reward 0) and the horizon."""
    tasks = cls.sample_tasks(3, np.random.default_rng(1))
    seeds = [11, 12, 13]
    slots = loco.LocomotionSlots(cls, oracle=True, horizon=12)
    obs = slots.reset(tasks, seeds)
    envs = [gymnasium.make(f"metarl/{cls.__name__[:-3]}Oracle-v0", max_episode_steps=12)
            for _ in tasks]
    ref = [e.reset(seed=s, options={"task": t})[0] for e, t, s in zip(envs, tasks, seeds)]
    np.testing.assert_array_equal(obs, np.stack(ref))
    if cls.robot.healthy_z:  # make slot 1 unhealthy in both
        for sim in (slots.envs[1].sim, envs[1].unwrapped.sim):
            qpos = sim.data.qpos.copy()
            qpos[2] = 1.5
            sim.set_state(qpos, sim.data.qvel.copy())
    rng = np.random.default_rng(2)
    done_ref = np.zeros(3, dtype=bool)
    for _ in range(12):
        a = rng.uniform(-1, 1, (3, *slots.action_space.shape)).astype(np.float32)
        obs, reward, done = slots.step(a)
        for k, env in enumerate(envs):
            if done_ref[k]:
                assert reward[k] == 0.0
                continue
            o, r, term, trunc, _ = env.step(a[k])
            np.testing.assert_array_equal(obs[k], o)
            assert reward[k] == r
            done_ref[k] = term or trunc
        np.testing.assert_array_equal(done, done_ref)
    assert done.all()


def rollouts(name, workers, T=3, E=2, H=15):
    fam = families.make(name, rollouts=E, horizon=H, workers=workers)
    tasks = fam.sample_tasks(T, np.random.default_rng(5))
    theta = fam.init_params(torch.Generator().manual_seed(0), CPU, torch.float32)
    env = fam.batch_env(CPU, torch.float32)
    roll = sample(fam.policy(), P.expand(theta, T), env, tasks, E, H, seed=17)
    one = sample(fam.policy(), P.expand(theta, 1), env, tasks[:1], 1, H, seed=17)  # n < workers
    env.close()
    return roll, one


@pytest.mark.timeout(120)
def test_same_trajectories_whatever_the_number_of_workers():
    ref, ref_one = rollouts("ant-dir", 0)
    for workers in (1, 2):
        roll, one = rollouts("ant-dir", workers)
        for field in ("obs", "actions", "rewards", "mask", "log_probs"):
            assert torch.equal(getattr(roll, field), getattr(ref, field)), (workers, field)
            assert torch.equal(getattr(one, field), getattr(ref_one, field)), (workers, field)


class PendulumFamily(RLFamily):
    """A user's family without its own batched physics: workers pickle the family itself."""

    name = "pendulum-test"

    def sample_tasks(self, n, rng):
        return [{"g": float(g)} for g in rng.uniform(5, 15, n)]

    def make_env(self, task):
        return gymnasium.make("Pendulum-v1", g=task["g"], max_episode_steps=self.rl.horizon)


@pytest.mark.timeout(60)
def test_user_family_in_a_worker_matches_in_process():
    out = []
    for workers in (0, 1):
        fam = PendulumFamily(rollouts=2, horizon=10, workers=workers)
        batch = fam.sample_batch(2, torch.Generator().manual_seed(0))
        theta = fam.init_params(torch.Generator().manual_seed(0), CPU, torch.float32)
        out.append(batch.inner_data(P.expand(theta, 2)).rollouts)
        batch.env.close()
    for field in ("obs", "actions", "rewards", "mask"):
        assert torch.equal(getattr(out[0], field), getattr(out[1], field)), field


class FailingEnv(gymnasium.Env):
    """Raises (or kills its process) at step ``fail_at`` when the task says so."""

    observation_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(1,))
    action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(1,))

    def __init__(self, task):
        self.task, self.t = dict(task), 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        if self.task.get("fail_at") == self.t:
            if self.task.get("how") == "exit":
                os._exit(3)
            raise RuntimeError("boom")
        return np.zeros(1, dtype=np.float32), 1.0, False, False, {}


def make_failing_env(task):
    return FailingEnv(task)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["raise", "exit"])
def test_failing_worker_is_reported_not_hung_on(how):
    env = WorkerBatchEnv(functools.partial(GymSlots, make_failing_env), workers=2)
    tasks = [{"id": 0}, {"id": 1}, {"id": 2, "fail_at": 3, "how": how}]
    env.reset(tasks, 2, seed=11)
    zeros = torch.zeros(3, 2, 1)
    env.step(zeros)
    env.step(zeros)
    if how == "raise":
        match = (r"task \{'id': 2, 'fail_at': 3, 'how': 'raise'\} \(episode 0, env seed \d+, "
                 r"sampler seed 11\) raised RuntimeError: boom at step 3 in worker 1")
    else:
        match = (r"worker 1 died \(exit code 3.*\) at step 3 while running slots 3..5 "
                 r"\(tasks \{'id': 1\}, \{'id': 2, .*SeedSequence\(11\)")
    with pytest.raises(WorkerError, match=match):
        env.step(zeros)
    env.close()


def test_workers_option_checks():
    with pytest.raises(ConfigError, match=r"workers must be an integer >= 0"):
        families.make("halfcheetah-vel", workers=-1)
    nav = families.make("navigation2d", workers=2)
    with pytest.raises(ConfigError, match=r"not in worker processes: drop the workers option"):
        nav.sample_batch(2, torch.Generator().manual_seed(0))


def test_missing_mujoco_is_one_line_naming_the_extra(monkeypatch):
    for mod in [m for m in sys.modules if m == "mujoco" or m.startswith(("mujoco.",
                                                                         "gymnasium.envs.mujoco"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "mujoco", None)  # import mujoco -> ImportError
    with pytest.raises(ConfigError, match=r'needs MuJoCo.*pip install -c constraints.txt -e '
                                          r'"\.\[mujoco\]"'):
        families.make("ant-dir")
    from metarl.cli.main import app

    result = CliRunner().invoke(app, ["families", "show", "halfcheetah-vel"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and 'pip install -c constraints.txt -e ".[mujoco]"' in lines[0]


def test_registering_the_ids_does_not_import_mujoco():
    code = "import sys, metarl.envs, gymnasium; " \
           "assert 'metarl/AntDir-v0' in gymnasium.registry; print('mujoco' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_families_show_documents_the_family():
    from metarl.cli.main import app

    result = CliRunner().invoke(app, ["families", "show", "halfcheetah-vel"])
    assert result.exit_code == 0, result.output
    for text in ("v ~ U[0, 2]", "-|v_x - v| - 0.05 * sum(a^2)", "Horizon 100", "no termination",
                 "rllab", "metarl/HalfCheetahVel-v0", "meta_batch = 40", "'workers': 0"):
        assert text in result.output, text


@pytest.mark.timeout(300)
def test_train_evaluate_with_oracle_line(tmp_path):
    from metarl.cli.main import app

    runner = CliRunner()
    tiny = ["--meta-batch", "2", "--rollouts", "2", "--horizon", "10", "--device", "cpu",
            "--family-opt", "hidden=[8]"]
    oracle = tmp_path / "oracle"
    r = runner.invoke(app, ["train", "--family", "halfcheetah-vel", "--iterations", "1",
                            "--inner-steps", "0", "--family-opt", "oracle=true", "--out",
                            str(oracle), *tiny])
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--family", "halfcheetah-vel", "--iterations", "2",
                            "--family-opt", f"oracle_run={oracle}", "--out", str(run), *tiny])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", str(run), "--tasks", "2", "--steps", "1",
                            "--pretrain-iterations", "1", "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["family"] == "halfcheetah-vel" and len(result["mean"]) == 2
    assert np.isfinite(result["reference_lines"]["oracle"])
    not_oracle = families.make("halfcheetah-vel", oracle_run=str(run))
    with pytest.raises(ConfigError, match=r"with oracle=False: train one with"):
        not_oracle.oracle_returns([{"velocity": 1.0}], CPU, torch.float32)
    other_rate = families.make("halfcheetah-vel", oracle_run=str(oracle), frame_skip=2)
    with pytest.raises(ConfigError, match=r"trained with frame_skip 5, this family steps with "
                                          r"frame_skip 2: train the oracle with the same"):
        other_rate.oracle_returns([{"velocity": 1.0}], CPU, torch.float32)
