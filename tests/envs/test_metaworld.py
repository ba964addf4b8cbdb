"""The Meta-World families: Meta-World's own train and test splits (and the upstream defect
worked around), the registered ids under check_env, the in-process stepper against the
Gymnasium env, workers, the success flag as defined, train/evaluate end to end, and the
one-line error without the extra."""

from __future__ import annotations

import json
import pickle
import sys
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import metarl.envs  # noqa: F401  (registers the ids, without importing Meta-World)
from metarl import families
from metarl import params as P
from metarl.envs import metaworld as mwf
from metarl.rl.batch import RLBatch, RLConfig
from metarl.rl.sampler import Rollouts, sample
from metarl.types import ConfigError, ReportsExtraMetrics

pytestmark = pytest.mark.filterwarnings(  # the hidden goal's 3 dims are Box(0, 0), as intended
    "ignore:.*Box observation space maximum and minimum:UserWarning")
CPU = torch.device("cpu")
TINY = ["--meta-batch", "2", "--rollouts", "2", "--horizon", "20", "--device", "cpu",
        "--family-opt", "hidden=[8]"]


@pytest.fixture(scope="module")
def metaworld():
    return pytest.importorskip("metaworld")


def rand_vecs(tasks):
    """Object and goal positions of Meta-World ``Task`` objects: ``[n, d]``."""
    return np.stack([pickle.loads(t.data)["rand_vec"] for t in tasks])


def test_ml10_environment_lists_are_meta_worlds(metaworld):
    ml10 = metaworld.env_dict.ML10_V3
    assert tuple(ml10["train"]) == mwf.ML10_TRAIN and tuple(ml10["test"]) == mwf.ML10_TEST
    assert not set(mwf.ML10_TRAIN) & set(mwf.ML10_TEST)


@pytest.mark.parametrize("seed", [0, 3])
def test_ml1_splits_equal_meta_worlds_and_are_disjoint(metaworld, seed):
    ours = mwf.Suite("ML1", "reach-v3", seed).tasks()
    theirs = metaworld.ML1("reach-v3", seed=seed)  # an independent build of the benchmark
    train, test = ours[("train", "reach-v3")], ours[("test", "reach-v3")]
    assert len(train) == len(test) == mwf.N_GOALS
    np.testing.assert_array_equal(rand_vecs(train), rand_vecs(theirs.train_tasks))
    np.testing.assert_array_equal(rand_vecs(test), rand_vecs(theirs.test_tasks))
    goals_train = {tuple(v) for v in rand_vecs(train)}
    assert not goals_train & {tuple(v) for v in rand_vecs(test)}


def test_the_upstream_ml1_train_registration_gives_the_test_split(metaworld):
    """Meta-World 3.1.1's ``Meta-World/ML1-train`` id is built with the test split
    (Farama-Foundation/Metaworld PR #573): the families read the benchmark's own lists
    instead. If this starts failing, the pinned Meta-World has fixed it."""
    vec = gymnasium.make_vec("Meta-World/ML1-train", env_name="reach-v3", seed=0,
                             meta_batch_size=10)
    try:
        given = {tuple(v) for tasks in vec.get_attr("tasks") for v in rand_vecs(tasks)}
    finally:
        vec.close()
    table = mwf.Suite("ML1", "reach-v3", 0).tasks()
    train = {tuple(v) for v in rand_vecs(table[("train", "reach-v3")])}
    test = {tuple(v) for v in rand_vecs(table[("test", "reach-v3")])}
    assert given == test and not given & train


def test_sampled_specs_come_from_the_split_asked_for(metaworld):
    fam = families.make("metaworld-ml1", env_name="push-v3")
    rng = np.random.default_rng(0)
    train, test = fam.sample_tasks(20, rng), fam.sample_test_tasks(60, rng)
    assert {t["split"] for t in train} == {"train"} and {t["split"] for t in test} == {"test"}
    assert len({t["index"] for t in train}) == 20  # without replacement within a batch
    assert sorted(t["index"] for t in test[:50]) == list(range(50))  # every test goal once
    ml10 = mwf.Suite("ML10", None, 0)
    drawn = ml10.draw("train", 23, np.random.default_rng(1))
    counts = {n: sum(t["env_name"] == n for t in drawn) for n in mwf.ML10_TRAIN}
    assert sorted(counts.values()) == [2] * 7 + [3] * 3
    assert {t["env_name"] for t in ml10.draw("test", 10, rng)} == set(mwf.ML10_TEST)


def test_a_spec_runs_the_task_it_names(metaworld):
    """After a reset with a spec, the environment's goal is that Meta-World task's."""
    env = gymnasium.make("metarl/MetaWorldML1-v0", env_name="reach-v3", seed=0)
    table = mwf.Suite("ML1", "reach-v3", 0).tasks()
    for split, index in (("train", 4), ("test", 4), ("test", 49)):
        env.reset(seed=0, options={"task": {"env_name": "reach-v3", "index": index,
                                            "split": split}})
        goal = rand_vecs([table[(split, "reach-v3")][index]])[0][-3:]
        np.testing.assert_allclose(env.unwrapped._active._target_pos, goal)
    env.close()


def test_check_task_and_bad_specs(metaworld):
    fam = families.make("metaworld-ml10")
    spec = {"env_name": "door-close-v3", "index": 3, "split": "test"}
    assert fam.check_task(spec) == spec
    bad = [({"env_name": "door-close-v3", "index": 3, "split": "train"},
            r"not in ML10's train split \(it is a test environment\)"),
           ({"env_name": "reach-v2", "index": 0, "split": "train"}, r"did you mean 'reach-v3'"),
           ({"env_name": "reach-v3", "index": 50, "split": "train"}, r"integer in \[0, 50\)"),
           ({"env_name": "reach-v3", "index": 0, "split": "val"}, r"neither 'train' nor 'test'"),
           ({"goal": [0, 0]}, r"a Meta-World ML10 task is \{\"env_name\"")]
    for task, match in bad:
        with pytest.raises(ValueError, match=match):
            fam.check_task(task)
    with pytest.raises(ConfigError, match=r"env_name 'reach' is not a Meta-World v3 environment"):
        families.make("metaworld-ml1", env_name="reach")
    with pytest.raises(ConfigError, match=r"normalize_actions must be false"):
        families.make("metaworld-ml1", normalize_actions=True)


@pytest.mark.parametrize("benchmark", ["ML1", pytest.param("ML10", marks=pytest.mark.slow)])
def test_check_env(metaworld, benchmark):
    from gymnasium.utils.env_checker import check_env

    kwargs = {"env_name": "reach-v3"} if benchmark == "ML1" else {}
    env = gymnasium.make(f"metarl/MetaWorld{benchmark}-v0", **kwargs)
    assert gymnasium.registry[f"metarl/MetaWorld{benchmark}-v0"].max_episode_steps == 500
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Meta-World's observation box: unbounded object coordinates, the hidden goal Box(0, 0)
        warnings.filterwarnings("ignore", message=".*Box observation space (minimum|maximum)")
        check_env(env.unwrapped)
    env.close()


def test_slots_equal_the_gymnasium_env_and_flag_success(metaworld):
    """The in-process stepper gives the Gymnasium env's transitions; its extra column is
    that step's ``info["success"]``. A scripted reach to the goal makes it 1."""
    suite = mwf.Suite("ML1", "reach-v3", 0)
    specs = [{"env_name": "reach-v3", "index": 3, "split": "train"},
             {"env_name": "reach-v3", "index": 5, "split": "test"}]
    slots = mwf.MetaWorldSlots(suite.tasks(), suite, horizon=60)
    obs = slots.reset(specs, [1, 2])
    envs = [gymnasium.make("metarl/MetaWorldML1-v0", env_name="reach-v3",
                           max_episode_steps=60) for _ in specs]
    first = [e.reset(seed=s, options={"task": t})[0] for e, t, s in zip(envs, specs, (1, 2))]
    np.testing.assert_array_equal(obs[:, :-1], np.stack(first))
    goals = np.stack([e.unwrapped._active._target_pos for e in envs])  # [2, 3]
    successes = []
    for h in range(60):
        a = np.zeros((2, 4), dtype=np.float32)
        a[0, :3] = np.clip((goals[0] - obs[0, :3]) * 50, -1, 1)  # slot 0 reaches its goal
        a[1] = np.random.default_rng(h).uniform(-1, 1, 4)
        obs, reward, done = slots.step(a)
        for k, env in enumerate(envs):
            o, r, terminated, truncated, info = env.step(a[k])
            np.testing.assert_array_equal(obs[k, :-1], o)
            assert reward[k] == r and obs[k, -1] == info["success"]
            assert done[k] == (terminated or truncated)
        successes.append(obs[:, -1].copy())
    assert np.array(successes)[:, 0].max() == 1.0 and done.all()
    slots.close()
    for env in envs:
        env.close()


class FlagEnv:
    """A BatchEnv whose episode e of task t ends after ``t + e + 1`` steps and raises the
    ``success`` flag at step 2 only, and at every step after it ended (ignored)."""

    def reset(self, tasks, n_episodes, seed, *, offset=0):
        self.T, self.E, self.h = len(tasks), n_episodes, 0
        return torch.zeros(self.T, self.E, 1)

    def step(self, actions):
        self.h += 1
        length = torch.arange(self.T)[:, None] + torch.arange(self.E)[None] + 1  # [T, E]
        done = self.h >= length
        self.flag = (self.h == 2) | (self.h > length)
        return torch.zeros(self.T, self.E, 1), torch.ones(self.T, self.E), done

    def step_flags(self):
        return {"success": self.flag}


def test_success_is_any_step_while_alive_and_its_rate_per_task():
    from metarl.rl.policies import GaussianMLPPolicy

    policy = GaussianMLPPolicy(1, 1, (4,), "tanh", 1.0)
    theta = policy.init(torch.Generator().manual_seed(0), CPU, torch.float32)
    tasks = [{"t": 0}, {"t": 1}, {"t": 2}]
    roll = sample(policy, P.expand(theta, 3), FlagEnv(), tasks, 2, 5, seed=0)
    # an episode succeeds iff it lived to step 2: length t + e + 1 >= 2
    expected = torch.tensor([[False, True], [True, True], [True, True]])
    assert torch.equal(roll.flags["success"], expected)
    batch = RLBatch(policy, FlagEnv(), tasks, RLConfig(rollouts=2, horizon=5), seed=0)
    assert isinstance(batch, ReportsExtraMetrics)
    data = batch.inner_data(P.expand(theta, 3))
    assert torch.equal(batch.extra_metrics(None, data)["success"], torch.tensor([0.5, 1.0, 1.0]))
    plain = Rollouts(roll.obs, roll.actions, roll.rewards, roll.mask, roll.log_probs)
    assert plain.flags == {}  # envs that report no flags: no extra metric


@pytest.mark.timeout(180)
def test_same_trajectories_and_success_whatever_the_number_of_workers(metaworld):
    out = []
    for workers in (0, 2):
        fam = families.make("metaworld-ml1", rollouts=2, horizon=15, workers=workers,
                            hidden=[8])
        batch = fam.sample_batch(3, torch.Generator().manual_seed(0))
        theta = fam.init_params(torch.Generator().manual_seed(0), CPU, torch.float32)
        out.append(batch.inner_data(P.expand(theta, 3)).rollouts)
        batch.env.close()
    for field in ("obs", "actions", "rewards", "mask", "log_probs"):
        assert torch.equal(getattr(out[0], field), getattr(out[1], field)), field
    assert out[0].obs.shape[-1] == 39  # Meta-World's observation: the success column is off
    assert torch.equal(out[0].flags["success"], out[1].flags["success"])


def test_families_show_gives_the_paper_settings():
    from metarl.cli.main import app

    result = CliRunner().invoke(app, ["families", "show", "metaworld-ml1"])
    assert result.exit_code == 0, result.output
    for text in ("arXiv 1910.10897", "Table 9", "meta_batch = 20", "inner.lr = 0.0001",
                 "trpo.max_kl = 0.01", "'rollouts': 10", "'horizon': 500", "'hidden': [128, 128]",
                 "success rate", "44.4%", "31.6%", "metarl/MetaWorldML1-v0"):
        assert text in result.output, text


def test_without_the_extra_one_line_names_the_install(monkeypatch, tmp_path):
    for mod in [m for m in sys.modules if m == "metaworld" or m.startswith("metaworld.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "metaworld", None)  # import metaworld -> ImportError
    mwf._build_tasks.cache_clear()
    fam = families.make("metaworld-ml1")  # listing and show work without it
    assert "metaworld-ml10" in families.names()
    with pytest.raises(ConfigError,
                       match=r'needs Meta-World.*pip install "metarl-toolkit\[metaworld\]"'):
        fam.init_params(torch.Generator().manual_seed(0), CPU, torch.float32)
    from metarl.cli.main import app

    runner = CliRunner()
    assert runner.invoke(app, ["families", "show", "metaworld-ml10"]).exit_code == 0
    result = runner.invoke(app, ["train", "--family", "metaworld-ml10", "--iterations", "1",
                                 "--out", str(tmp_path / "run"), *TINY])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and 'pip install "metarl-toolkit[metaworld]"' in lines[0], lines
    mwf._build_tasks.cache_clear()


def train_and_evaluate(tmp_path, family, *extra):
    from metarl.cli.main import app

    runner = CliRunner()
    run = tmp_path / family
    r = runner.invoke(app, ["train", "--family", family, "--iterations", "2", "--log-every", "1",
                            "--out", str(run), *TINY, *extra])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= row[k] <= 1 for row in rows
                                  for k in ("success/pre", "success/post"))
    r = runner.invoke(app, ["evaluate", str(run), "--tasks", "3", "--steps", "1",
                            "--pretrain-iterations", "1", "--json", str(tmp_path / "e.json"),
                            "--plot", str(tmp_path / "e.png")])
    assert r.exit_code == 0, r.output
    assert "success after k adaptation steps" in r.output
    result = json.loads((tmp_path / "e.json").read_text())
    success = result["extra_metrics"]["success"]
    assert len(success["mean"]) == 2 and all(0 <= m <= 1 for m in success["mean"])
    assert set(result["baselines"]) == {"random init", "pretrained"}
    assert "success" in result["baselines"]["random init"]["extra_metrics"]
    assert (tmp_path / "e.png").stat().st_size > 0
    return result


@pytest.mark.timeout(300)
def test_ml1_trains_two_iterations_and_evaluates_with_success(metaworld, tmp_path):
    result = train_and_evaluate(tmp_path, "metaworld-ml1", "--family-opt", "env_name=reach-v3")
    assert result["settings"]["family_options"]["env_name"] == "reach-v3"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ml10_trains_two_iterations_and_evaluates_with_success(metaworld, tmp_path):
    result = train_and_evaluate(tmp_path, "metaworld-ml10", "--meta-batch", "10")
    assert result["n_tasks"] == 3
