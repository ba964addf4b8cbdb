"""Stable-Baselines3 interop: exported policies have metarl's action distribution (mean and
std, random and real observations), PPO.load predicts, evaluates and learns, the PPO oracle
is usable as oracle_run, PPO from scratch reports the steps to reach a return, and bad
input gets one line."""

import json

import gymnasium
import numpy as np
import pytest
import torch

from metarl import checkpoint, families
from metarl import params as P
from metarl.types import ConfigError

sb3_lib = pytest.importorskip("stable_baselines3")
from metarl import sb3  # noqa: E402
from tests.cli_run import one_line_error, run  # noqa: E402

CPU = torch.device("cpu")



def perturbed_theta(family, seed=0):
    """Initial parameters with non-trivial biases and a per-dimension log-std."""
    g = torch.Generator().manual_seed(seed)
    theta = family.init_params(g, CPU, torch.float32)
    for k, v in theta.items():
        theta[k] = v + 0.2 * torch.randn(v.shape, generator=g)
    return theta


def real_observations(family, task, n=100, seed=0):
    env = family.make_env(task)
    obs, _ = env.reset(seed=seed)
    rows = [obs]
    rng = np.random.default_rng(seed)
    for _ in range(n - 1):
        obs, _, term, trunc, _ = env.step(rng.uniform(env.action_space.low,
                                                      env.action_space.high))
        rows.append(obs)
        if term or trunc:
            break
    env.close()
    return torch.as_tensor(np.stack(rows), dtype=torch.float64)


def close(a, b):
    return torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_exported_distribution_is_metarls_in_box_units_navigation():
    """navigation2d acts in [-1, 1] units mapped onto the [-0.1, 0.1] box: the SB3 policy's
    mean and std are metarl's pushed through that map (checked independently of
    sb3.action_map), on random and on real observations."""
    nav = families.make("navigation2d")
    assert nav.normalize_actions
    theta = perturbed_theta(nav)
    task = {"goal": [0.3, -0.2]}
    model = sb3.to_sb3(nav, theta, task=task)
    obs = torch.cat([torch.randn(64, 2, generator=torch.Generator().manual_seed(1)).double(),
                     real_observations(nav, task)])
    d = nav.policy().dist(P.expand(theta, 1), obs.float().unsqueeze(0))
    low, high = -0.1, 0.1
    mean = low + (d.mean[0].double() + 1.0) * 0.5 * (high - low)  # NormalizedActions' map
    std = d.std.expand_as(d.mean)[0].double() * 0.5 * (high - low)
    m, s = sb3.sb3_action_dist(model, obs)
    assert close(m, mean) and close(s, std)
    assert float(s.std()) > 0  # per-dimension log-std, not a shared scalar
    back = sb3.from_sb3(model, nav)  # and back again
    assert all(torch.allclose(back[k], theta[k], atol=1e-6) for k in theta)


def test_exported_std_floor_is_the_std_and_maps_back():
    """A family with min_std: SB3's log-std is the floored std's, and from_sb3 returns the
    floored parameterisation; an SB3 std at or below the floor is one ConfigError."""
    nav = families.make("navigation2d", min_std=0.3)
    theta = perturbed_theta(nav)
    theta["log_std"] = torch.tensor([-8.0, 0.2])  # one dimension at the floor
    model = sb3.to_sb3(nav, theta, task={"goal": [0.3, -0.2]})
    obs = torch.randn(16, 2, generator=torch.Generator().manual_seed(4)).double()
    _, s = sb3.sb3_action_dist(model, obs)
    want = (0.3 + theta["log_std"].double().exp()) * 0.1  # [-1, 1] units onto [-0.1, 0.1]
    assert close(s[0], want)
    back = sb3.from_sb3(model, nav)
    assert torch.allclose(back["log_std"][1], theta["log_std"][1], atol=1e-6)
    with torch.no_grad():
        model.policy.log_std.fill_(float(np.log(0.3 * 0.1 * 0.5)))
    with pytest.raises(ConfigError, match="not above the policy's min_std=0.3"):
        sb3.from_sb3(model, nav)


def test_exported_distribution_is_metarls_halfcheetah():
    pytest.importorskip("mujoco")
    fam = families.make("halfcheetah-vel")
    theta = perturbed_theta(fam)
    task = {"velocity": 1.3}
    model = sb3.to_sb3(fam, theta, task=task)
    obs = torch.cat([3.0 * torch.randn(64, 17, generator=torch.Generator().manual_seed(2))
                     .double(), real_observations(fam, task)])
    d = fam.policy().dist(P.expand(theta, 1), obs.float().unsqueeze(0))
    m, s = sb3.sb3_action_dist(model, obs)
    assert close(m, d.mean[0].double()) and close(s, d.std.expand_as(d.mean)[0].double())
    # the same log-density of any action: the distribution, not only its mean
    a = torch.randn(len(obs), 6, generator=torch.Generator().manual_seed(3))
    lp_sb3 = model.policy.get_distribution(obs.float()).log_prob(a)
    assert torch.allclose(lp_sb3, d.log_prob(a.unsqueeze(0))[0], atol=1e-4)


@pytest.fixture(scope="module")
def nav_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nav") / "run"
    r = run("train", "--family", "navigation2d", "--iterations", 1, "--meta-batch", 2,
            "--rollouts", 2, "--device", "cpu", "--family-opt", "hidden=[8]", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_export_adapted_policy_then_ppo_load_predict_evaluate_learn(nav_run, tmp_path):
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy

    adapted = tmp_path / "adapted.pt"
    r = run("adapt", nav_run, "--task", '{"goal": [0.3, -0.2]}', "--steps", 1, "--out", adapted)
    assert r.exit_code == 0, r.output
    r = run("export", adapted, "--format", "sb3", "--out", tmp_path / "policy")
    assert r.exit_code == 0, r.output
    path = tmp_path / "policy.zip"
    assert path.is_file() and "PPO.load" in r.output
    info = PPO.load(path).metarl
    assert info["task"] == {"goal": [0.3, -0.2]} and info["env_id"] == "metarl/Navigation2D-v0"
    assert len(info["adapted"]) == 1 and info["format"] == sb3.FORMAT
    env = gymnasium.make(info["env_id"], task=info["task"],
                         max_episode_steps=info["max_episode_steps"])
    model = PPO.load(path, env=env, n_steps=64, batch_size=32, n_epochs=1)
    phi = checkpoint.load(adapted)
    fam = phi.family()
    obs = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)).numpy()
    mean, _ = sb3.metarl_action_dist(fam, phi.theta, torch.as_tensor(obs))
    act, _ = model.predict(obs, deterministic=True)  # the mean, clipped to the box
    assert np.allclose(act, np.clip(mean.numpy(), -0.1, 0.1), atol=1e-6)
    mean_return, _ = evaluate_policy(model, env, n_eval_episodes=2)
    assert np.isfinite(mean_return)
    model.learn(total_timesteps=64)
    assert model.num_timesteps >= 64


def test_export_meta_parameters_of_a_run_folder(nav_run, tmp_path):
    done = sb3.export_sb3(checkpoint.load(nav_run), tmp_path / "meta.zip")
    assert done.task is None and done.max_abs_error <= 1e-6 and done.path.is_file()


def test_export_bad_input_one_line(nav_run, tmp_path):
    one_line_error(run("export", nav_run, "--format", "onnx", "--out", tmp_path / "p.zip"),
                   "unknown export format 'onnx'", "use sb3")
    one_line_error(run("export", nav_run, "--out", tmp_path / "p.pt"), "is a .zip file")
    one_line_error(run("export", tmp_path / "missing", "--out", tmp_path / "p.zip"),
                   "does not exist")
    sin = tmp_path / "sin"
    r = run("train", "--family", "sinusoid", "--iterations", 1, "--out", sin,
            "--family-opt", "hidden=[4]", "--device", "cpu")
    assert r.exit_code == 0, r.output
    one_line_error(run("export", sin, "--out", tmp_path / "p.zip"), "not RL")


def test_evaluation_tasks_are_evaluates_test_tasks():
    from metarl.evaluate import adaptation_values

    nav = families.make("navigation2d", rollouts=1, hidden=[4])
    theta = nav.init_params(torch.Generator().manual_seed(0), CPU, torch.float32)
    scores = adaptation_values(theta, nav, n_tasks=5, steps=0, lr=0.1, seed=3, device=CPU,
                               dtype=torch.float32)
    assert sb3.evaluation_tasks(nav, 5, seed=3) == scores.tasks


TINY_PPO = ["--n-envs", 2, "--ppo-opt", "n_steps=64", "--ppo-opt", "batch_size=64",
            "--ppo-opt", "n_epochs=1", "--family-opt", "horizon=20", "--family-opt", "rollouts=2",
            "--family-opt", "hidden=[8]"]


def test_oracle_runs_at_tiny_size_and_is_usable_as_oracle_run(tmp_path):
    pytest.importorskip("mujoco")
    out = tmp_path / "oracle"
    r = run("oracle", "halfcheetah-vel", "--timesteps", 128, "--eval-tasks", 2, "--out", out,
            *TINY_PPO)
    assert r.exit_code == 0, r.output
    for name in ("oracle.zip", "checkpoint.pt", "metrics.jsonl", "oracle.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "oracle.json").read_text())
    assert info["timesteps"] == 128 and info["n_test_tasks"] == 2
    assert np.isfinite(info["test_return"]) and "oracle line on 2 test tasks" in r.output
    # the checkpoint is a metarl oracle run, read by the unchanged oracle_returns path ...
    ck = checkpoint.load(out)
    assert ck.config.family_options["oracle"] is True and ck.config.inner.steps == 0
    tasks = [{"velocity": 0.5}, {"velocity": 1.5}]
    meta = families.make("halfcheetah-vel", horizon=20, rollouts=2, hidden=[8],
                         oracle_run=str(out))
    by_ckpt = meta.oracle_returns(tasks, CPU, torch.float32)
    # ... and the SB3 model alone (a .zip, or a folder with only oracle.zip) gives the same line
    zip_only = families.make("halfcheetah-vel", horizon=20, rollouts=2, hidden=[8],
                             oracle_run=str(out / "oracle.zip"))
    assert torch.allclose(zip_only.oracle_returns(tasks, CPU, torch.float32), by_ckpt)
    # --resume continues to a larger budget
    r = run("oracle", "halfcheetah-vel", "--timesteps", 256, "--eval-tasks", 0, "--out", out,
            "--resume", *TINY_PPO)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "oracle.json").read_text())["timesteps"] == 256
    # the model records its architecture, so a meta-run with another one still reads it ...
    other = families.make("halfcheetah-vel", horizon=20, hidden=[16],
                          oracle_run=str(out / "oracle.zip"))
    assert other.oracle_returns(tasks[:1], CPU, torch.float32).shape == (1,)
    # ... while reading it as another architecture is refused, naming both
    with pytest.raises(ConfigError, match=r"\(18-8-6, Tanh\) is not family 'halfcheetah-vel'"):
        sb3.from_sb3(sb3.load_model(out / "oracle.zip"),
                     families.make("halfcheetah-vel", oracle=True, hidden=[16]))


def test_oracle_bad_input_one_line(tmp_path):
    one_line_error(run("oracle", "navigation2d", "--out", tmp_path / "o"),
                   "locomotion family", "straight-line policy")
    pytest.importorskip("mujoco")
    one_line_error(run("oracle", "halfcheetah-dir", "--out", tmp_path / "o", "--ppo-opt",
                       "n_step=8"), "unknown PPO setting 'n_step'", "did you mean 'n_steps'")
    one_line_error(run("oracle", "halfcheetah-dir", "--out", tmp_path / "o", "--resume"),
                   "no oracle.zip to continue")


def test_ppo_from_scratch_reports_steps_to_reach():
    nav = families.make("navigation2d", hidden=[8], rollouts=2)
    curve = sb3.ppo_from_scratch(nav, {"goal": [0.3, -0.2]}, {1: -1e9, 3: 1.0}, max_steps=256,
                                 ppo_kwargs={"n_steps": 32, "batch_size": 64, "n_epochs": 1},
                                 n_envs=2)
    # the first time 2 episodes (rollouts) have ended: both environments at their step 100
    assert curve.reached[1] == 200
    assert curve.reached[3] is None  # a return above 0 is impossible here
    assert curve.total_steps >= 256 and len(curve.timesteps) == len(curve.returns) > 0


def test_evaluate_baseline_ppo(nav_run, tmp_path):
    r = run("evaluate", nav_run, "--tasks", 2, "--steps", 1, "--no-baselines", "--baseline",
            "ppo", "--ppo-steps", 64, "--ppo-tasks", 1, "--json", tmp_path / "e.json",
            "--ppo-plot", tmp_path / "ppo.png")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "e.json").read_text())
    ppo = result["ppo_baseline"]
    assert len(ppo["tasks"]) == 1 and ppo["meta_steps"] == {"1": 2 * 100}
    assert np.isfinite(ppo["tasks"][0]["thresholds"]["1"])
    assert (tmp_path / "ppo.png").stat().st_size > 0 and "PPO steps to reach it" in r.output
    one_line_error(run("evaluate", nav_run, "--tasks", 2, "--baseline", "dqn"),
                   "unknown --baseline 'dqn'")
    # refused before anything is evaluated (one_line_error: no table printed first)
    one_line_error(run("evaluate", nav_run, "--tasks", 2, "--steps", 0, "--baseline", "ppo"),
                   "give --steps 1 or more")


def test_evaluate_baseline_ppo_on_a_supervised_run_is_refused_first(tmp_path):
    out = tmp_path / "sin"
    r = run("train", "--family", "sinusoid", "--iterations", 1, "--meta-batch", 2, "--out", out)
    assert r.exit_code == 0, r.output
    one_line_error(run("evaluate", out, "--tasks", 2, "--baseline", "ppo"),
                   "--baseline ppo is for RL families", "'sinusoid' is supervised")


def test_finetune_example_runs(nav_run, tmp_path):
    from examples.sb3_finetune import main

    policy = tmp_path / "policy.zip"
    sb3.export_sb3(checkpoint.load(nav_run), policy)
    before, after = main(str(policy), timesteps=64, n_steps=64, batch_size=32, n_epochs=1)
    assert np.isfinite(before) and np.isfinite(after)
