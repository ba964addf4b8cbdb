"""Meta-RL: gradients on fixed trajectories, resampling, TRPO, estimators, CLI, user families."""

import dataclasses
import json
import math

import gymnasium
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from metarl import checkpoint, families
from metarl import config as C
from metarl import params as P
from metarl.algorithms import exact, maml, meta_grad
from metarl.cli.main import app
from metarl.inner import InnerConfig, with_learned_lr
from metarl.rl.batch import RLBatch, RLConfig
from metarl.rl.family import RLFamily
from metarl.rl.policies import GaussianMLPPolicy
from metarl.train import train
from metarl.types import ConfigError

F64 = torch.float64


def nav(dtype=torch.float32, **opts):
    fam = families.make("navigation2d", **{"rollouts": 4, "hidden": [8, 8], **opts})
    g = torch.Generator().manual_seed(0)
    theta = fam.init_params(g, torch.device("cpu"), dtype)
    return fam, theta, g


@pytest.mark.parametrize("k", [1, 2])
def test_maml_rl_gradient_equals_finite_differences_on_fixed_trajectories(k):
    fam, theta, g = nav(F64, horizon=10)
    batch = exact.Recorder(fam.sample_batch(3, g, dtype=F64))
    inner = InnerConfig(steps=k, lr=0.1)
    mg = maml.meta_grad(theta, batch, inner)  # samples, and the recorder keeps the trajectories
    ref = exact.maml(theta, batch, inner, batch.inner, batch.outer)
    fd = exact.central_diff(
        lambda th: exact.meta_objective(th, batch.replay(), inner, batch.inner, batch.outer), theta)
    assert exact.rel_error(mg.grad, ref) <= 1e-6
    assert exact.rel_error(fd, P.flatten(ref)) <= 1e-6


def test_outer_trajectories_are_resampled_with_the_adapted_policy():
    fam, theta, g = nav()
    batch = fam.sample_batch(3, g)
    mg = maml.meta_grad(theta, batch, InnerConfig(steps=2, lr=0.1))
    inner0, inner1 = mg.inner_data[0].rollouts, mg.inner_data[1].rollouts
    outer = mg.outer_data.rollouts
    assert not torch.equal(inner0.actions, outer.actions)
    assert not torch.equal(inner1.actions, outer.actions)
    policy = fam.policy()
    with torch.no_grad():
        under_phi = policy.dist(mg.phi, outer.obs).log_prob(outer.actions)
        under_theta = policy.dist(P.expand(theta, 3), outer.obs).log_prob(outer.actions)
    assert torch.allclose(under_phi, outer.log_probs, atol=1e-5)  # sampled by the adapted policy
    assert not torch.allclose(under_theta, outer.log_probs, atol=1e-3)
    assert batch.calls == 3  # two inner samplings and one outer, never reused


def test_losses_reuse_data_without_resampling():
    fam, theta, g = nav()
    batch = fam.sample_batch(2, g)
    th = P.expand(theta, 2)
    d = batch.inner_data(th)
    calls = batch.calls
    a, b = batch.inner_loss(th, d), batch.inner_loss(th, d)
    assert torch.equal(a, b) and batch.calls == calls


def test_trpo_step_respects_kl_bound_and_improves():
    fam, theta, g = nav(hidden=[16, 16])
    cfg = C.resolve(fam, {"iterations": 1, "meta_batch": 4, "device": "cpu",
                          "family_options": fam.options(), "trpo": {"max_kl": 0.005}})
    theta = P.clone_leaf(theta)
    trpo = fam.make_outer(cfg, theta)
    batch = fam.sample_batch(4, g)
    before = P.flatten(P.detach(theta)).clone()
    mg = trpo.step(theta, batch, lambda th, b: meta_grad("maml", th, b, cfg.inner))
    assert mg.extra["trpo/accepted"] == 1.0 and mg.extra["trpo/cg_indefinite"] == 0.0
    # recompute the KL of the new adapted policies on the post-adaptation trajectories
    phi_new = trpo.readapt(P.detach(theta), batch, mg.inner_data, False).phi
    kl = float(batch.kl(mg.phi, phi_new, mg.outer_data).mean())
    assert 0 < kl <= 0.005 * (1 + 1e-4)
    assert float(batch.outer_loss(phi_new, mg.outer_data).mean()) < float(mg.outer_loss.mean())
    assert not torch.equal(before, P.flatten(P.detach(theta)))


@pytest.mark.parametrize("k, min_std, learn_lr", [(1, 0.0, False), (2, 0.0, False),
                                                  (2, 0.3, False), (2, 0.0, True)])
def test_fisher_chain_equals_direct_kl_hessian(k, min_std, learn_lr):
    fam, theta, g = nav(F64, horizon=10, min_std=min_std)
    cfg = C.resolve(fam, {"iterations": 1, "device": "cpu", "dtype": "float64", "inner_steps": k,
                          "inner": {"learn_lr": learn_lr}, "family_options": fam.options()})
    if learn_lr:  # the rates are meta-parameters too: the Fisher covers them
        theta = with_learned_lr(theta, cfg.inner)
    trpo = fam.make_outer(cfg, theta)
    batch = fam.sample_batch(3, g, dtype=F64)
    mg = meta_grad("maml", theta, batch, cfg.inner)
    v = torch.randn(P.n_params(theta), dtype=F64, generator=torch.Generator().manual_seed(1))
    a = trpo.fisher_vector_product(theta, batch, mg)(v)
    b = trpo.direct_fisher_vector_product(theta, batch, mg)(v)
    assert float((a - b).norm() / b.norm()) < 1e-10


def test_direct_fisher_needs_the_old_adapted_parameters():
    fam, theta, g = nav(F64, horizon=5)
    cfg = C.resolve(fam, {"iterations": 1, "device": "cpu", "dtype": "float64",
                          "family_options": fam.options()})
    batch = fam.sample_batch(2, g, dtype=F64)
    mg = dataclasses.replace(meta_grad("maml", theta, batch, cfg.inner), phi=None)
    with pytest.raises(ValueError, match="needs the old adapted parameters: mg.phi is None"):
        fam.make_outer(cfg, theta).direct_fisher_vector_product(theta, batch, mg)


def test_estimators_share_value_and_gradient_but_not_curvature():
    fam, theta, g = nav(F64, horizon=10)
    out = {}
    for est in ("reinforce", "lvc", "dice"):
        f = families.make("navigation2d", rollouts=4, hidden=[8, 8], horizon=10, estimator=est)
        b = f.batch_for([{"goal": [0.2, -0.1]}, {"goal": [-0.3, 0.4]}], seed=5, dtype=F64)
        th = P.detach(P.expand(theta, 2), True)
        d = b.inner_data(th)
        loss = b.inner_loss(th, d)
        grad = P.grads(loss.sum(), th, create_graph=True)
        v = {k: torch.ones_like(t) for k, t in th.items()}
        hv = P.grads(P.task_dot(grad, v).sum(), th)
        out[est] = (P.flatten_tasks(P.detach(grad)), P.flatten_tasks(hv))
    # the same first derivative (the policy gradient)...
    assert torch.allclose(out["lvc"][0], out["reinforce"][0], atol=1e-10)
    # ...different second derivatives (the reason the estimators exist)
    assert not torch.allclose(out["lvc"][1], out["reinforce"][1], rtol=1e-3)
    assert not torch.allclose(out["dice"][1], out["reinforce"][1], rtol=1e-3)


class Bandit:
    """One-step continuous bandit, reward -(a - 1)^2: a BatchEnv for estimator tests."""

    def reset(self, tasks, n_episodes, seed):
        self.shape = (len(tasks), n_episodes)
        return torch.zeros(*self.shape, 1, dtype=F64)

    def step(self, actions):
        r = -(actions[..., 0] - 1.0) ** 2
        return torch.zeros(*self.shape, 1, dtype=F64), r, torch.ones(self.shape, dtype=torch.bool)


def test_dice_and_lvc_curvature_is_unbiased_on_a_bandit():
    """J(mu) = -((mu - 1)^2 + sigma^2): d2J/dmu2 = -2. The plain surrogate's
    second derivative misses the sampling term; DiCE and LVC recover it."""
    pol = GaussianMLPPolicy(1, 1, hidden=(), init_std=0.5)
    theta = {"l0.w": torch.zeros(1, 1, dtype=F64), "l0.b": torch.zeros(1, dtype=F64),
             "log_std": torch.full((1,), math.log(0.5), dtype=F64)}
    res = {}
    for est in ("reinforce", "lvc", "dice"):
        cfg = RLConfig(rollouts=200_000, horizon=1, gamma=1.0, normalize_advantages=False,
                       estimator=est)
        b = RLBatch(pol, Bandit(), [{}], cfg, seed=3)
        th = P.detach(P.expand(theta, 1), True)
        d = b.inner_data(th)
        # no baseline
        d = type(d)(d.rollouts, d.rollouts.rewards, d.discounted_rewards, 0 * d.values)
        g = P.grads(b.inner_loss(th, d).sum(), th, create_graph=True)["l0.b"]
        h = P.grads(g.sum(), th)["l0.b"]
        res[est] = -float(h)  # Hessian of the objective J = -loss
    assert res["dice"] == pytest.approx(-2.0, abs=0.15)
    assert res["lvc"] == pytest.approx(-2.0, abs=0.15)
    assert abs(res["reinforce"] + 2.0) > 1.0


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "imaml"])
@pytest.mark.parametrize("outer", ["trpo", "adam"])
def test_all_algorithms_run_rl_iterations(algo, outer, tmp_path):
    fam = families.make("navigation2d", rollouts=3, hidden=[8, 8], horizon=20)
    cfg = C.resolve(fam, {"algo": algo, "outer": outer, "iterations": 2, "meta_batch": 3,
                          "log_every": 1, "device": "cpu", "family_options": fam.options(),
                          "imaml_lam": 5.0})
    r = train(cfg, tmp_path / "run")
    assert {"return/pre", "return/post", "outer/loss"} <= set(r.metrics)
    assert all(math.isfinite(v) for v in r.metrics.values())
    m = r.metrics  # the iteration's wall time splits into sampling and update
    assert 0 < m["time/sample"] < m["time/iteration"]
    assert m["time/sample"] + m["time/update"] == pytest.approx(m["time/iteration"])


def test_rl_train_adapt_evaluate_cli(tmp_path):
    runner = CliRunner()
    run = tmp_path / "nav"
    common = ["--family-opt", "hidden=[8,8]", "--rollouts", "4", "--threads", "1"]
    r = runner.invoke(app, ["train", "--iterations", "2", "--meta-batch", "4", "--out", str(run),
                            *common])
    assert r.exit_code == 0, r.output
    out = tmp_path / "adapted.pt"
    r = runner.invoke(app, ["adapt", str(run), "--task", '{"goal": [0.3, -0.2]}', "--steps", "2",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    adapted = checkpoint.load(out).adapted
    assert len(adapted) == 1 and adapted[0].task == {"goal": [0.3, -0.2]}
    assert len(adapted[0].returns) == 3 and adapted[0].source == str(run)
    r = runner.invoke(app, ["adapt", str(out), "--task", '{"goal": [0.3, -0.2]}', "--steps", "1",
                            "--out", str(tmp_path / "again.pt")])
    assert r.exit_code == 0, r.output  # an adapted policy adapts further, keeping its history
    assert [a.steps for a in checkpoint.load(tmp_path / "again.pt").adapted] == [2, 1]
    r = runner.invoke(app, ["adapt", str(run), "--task", '{"goal": [0.3]}'])
    assert r.exit_code == 2 and "error: bad task for family 'navigation2d'" in r.output
    r = runner.invoke(app, ["adapt", str(run), "--task", "{goal"])
    assert r.exit_code == 2 and "not valid JSON" in r.output
    js = tmp_path / "e.json"
    r = runner.invoke(app, ["evaluate", str(run), "--tasks", "4", "--pretrain-iterations", "1",
                            "--json", str(js), "--plot", str(tmp_path / "e.png")])
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())
    assert d["metric"] == "return" and d["steps"] == [0, 1, 2, 3] and d["n_tasks"] == 4
    assert set(d["baselines"]) == {"random init", "pretrained"}
    assert d["reference_lines"]["oracle"] > max(d["mean"])  # the oracle is given the goal
    gap = [(m - d["mean"][0]) / (d["reference_lines"]["oracle"] - d["mean"][0]) for m in d["mean"]]
    assert d["gap_closed"] == pytest.approx(gap) and d["gap_closed"][0] == 0.0
    assert "fraction of the gap to the oracle closed" in r.output
    assert d["settings"]["lr"] == [0.1, 0.05]
    assert (run / "pretrained" / "checkpoint.pt").is_file()
    # family options of the run can be overridden at test time, the model's shape cannot
    r = runner.invoke(app, ["evaluate", str(run), "--tasks", "2", "--steps", "1", "--no-baselines",
                            "--rollouts", "3", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["settings"]["family_options"]["rollouts"] == 3
    r = runner.invoke(app, ["evaluate", str(run), "--family-opt", "hidden=[4]"])
    assert r.exit_code == 2 and "hidden=[4] change the model of this run" in r.output


def test_oracle_is_optimal_greedy_path():
    fam = families.make("navigation2d")
    r = fam.oracle_returns([{"goal": [0.3, -0.2]}], torch.device("cpu"), torch.float32)
    # moves (0.1,-0.1), (0.1,-0.1), (0.1, 0): distances after each move
    assert float(r[0]) == pytest.approx(-(math.hypot(0.2, 0.1) + 0.1 + 0.0), abs=1e-5)


def test_user_family_three_ways(tmp_path, monkeypatch):
    from examples.custom_family import PendulumGravityFamily, main

    # 1. a Python call
    main(iterations=1, out=str(tmp_path / "py"))
    assert "pendulum-gravity" in families.names()
    # 2. an entry point of an installed package
    dist = tmp_path / "site" / "userpkg-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userpkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[metarl.families]\npendulum-ep = examples.custom_family:PendulumGravityFamily\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(families, "_loaded_entry_points", False)
    assert isinstance(families.make("pendulum-ep"), PendulumGravityFamily)
    families._registry.pop("pendulum-ep", None)
    # 3. package.module:Factory on the command line, trained and adapted
    runner = CliRunner()
    run = tmp_path / "cli"
    r = runner.invoke(app, ["train", "--family", "examples.custom_family:PendulumGravityFamily",
                            "--iterations", "1", "--meta-batch", "2", "--rollouts", "2",
                            "--horizon", "20", "--family-opt", "hidden=[8,8]", "--out", str(run)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["adapt", str(run), "--task", '{"g": 12.0}', "--rollouts", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["adapt", str(run), "--task", '{"g": -1}'])
    assert r.exit_code == 2 and "gravity must be positive" in r.output


class DictObservationEnv(gymnasium.Env):
    observation_space = gymnasium.spaces.Dict({"pos": gymnasium.spaces.Box(-1.0, 1.0, (2,))})
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,))


class DictObservationFamily(RLFamily):
    name = "dict-observation"

    def sample_tasks(self, n, rng):
        return [{} for _ in range(n)]

    def make_env(self, task):
        return DictObservationEnv()


def test_an_observation_space_without_shape_is_one_config_error():
    # np.prod(None) used to reach int(): a TypeError that named nothing
    with pytest.raises(ConfigError, match=r"observation space Dict\('pos'.*has no shape.*"
                                          r"gymnasium.wrappers.FlattenObservation"):
        DictObservationFamily().init_params(torch.Generator(), torch.device("cpu"), F64)


def test_plain_gymnasium_family_is_batched_over_envs():
    from examples.custom_family import PendulumGravityFamily

    fam = PendulumGravityFamily(rollouts=3, horizon=15, hidden=[8, 8])
    theta = fam.init_params(torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    b = fam.batch_for([{"g": 5.0}, {"g": 15.0}], seed=0)
    d = b.inner_data(P.expand(theta, 2))
    assert d.rollouts.obs.shape == (2, 3, 15, 3)
    # the same policy in different gravity gives different dynamics
    assert not torch.allclose(d.rollouts.obs[0], d.rollouts.obs[1])
    np.testing.assert_allclose(d.rollouts.mask.numpy(), 1.0)


@pytest.mark.slow
def test_navigation_training_shows_adaptation_gain(tmp_path):
    """A short MAML-TRPO run must already adapt: return after 1 step clearly above before."""
    from metarl.evaluate import adaptation_values

    fam = families.make("navigation2d")
    cfg = C.resolve(fam, {"iterations": 40, "device": "cpu", "log_every": 10})
    train(cfg, tmp_path / "nav")
    theta = torch.load(tmp_path / "nav" / "checkpoint.pt", weights_only=True)["theta"]
    v = adaptation_values(theta, fam, n_tasks=40, steps=2, lr=(0.1, 0.05), seed=0,
                          device=torch.device("cpu"), dtype=torch.float32)
    mean = v.mean(0)
    assert mean[1] > mean[0] + 10, mean


def test_environment_failure_mid_training_keeps_the_last_iteration(tmp_path, monkeypatch):
    """A worker that fails while sampling iteration 3 stops the run with one line and exit 1;
    iteration 2 is checkpointed (sampling comes before the update, so theta is whole)."""
    from metarl.rl.workers import WorkerError

    sample = RLBatch.sample
    calls = {"n": 0}

    def failing_sample(self, params):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 samplings per MAML iteration: the first of iteration 3
            raise WorkerError("worker 0 died (exit code 3) at step 7 while running slots 0..3")
        return sample(self, params)

    for name in ("sample", "inner_data", "outer_data"):
        monkeypatch.setattr(RLBatch, name, failing_sample)
    run = tmp_path / "nav"
    r = CliRunner().invoke(app, ["train", "--iterations", "5", "--meta-batch", "2", "--rollouts",
                                 "2", "--family-opt", "hidden=[4]", "--checkpoint-every", "100",
                                 "--out", str(run), "--threads", "1"])
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "worker 0 died" in errors[0] and str(run) in errors[0]
    assert "Traceback" not in r.output
    assert checkpoint.load(run).iteration == 2


def test_adapt_kl_diagnostic_estimates_the_adaptation_kl():
    """adapt/kl, the Monte Carlo KL(pi_theta || pi_phi) from the sampled actions' recorded
    log-probabilities, agrees with the closed-form Gaussian KL on the same states; 0 at
    phi = theta."""
    from metarl.rl.diagnostics import rl_diagnostics

    fam, theta, g = nav(F64, rollouts=50, horizon=50)
    batch = fam.sample_batch(4, g, dtype=F64)
    mg = maml.meta_grad(theta, batch, InnerConfig(steps=1, lr=3.0))  # a long step
    data = mg.inner_data[0]
    got = rl_diagnostics(batch, theta, mg.inner_data, mg.outer_data, 1.0, phi=mg.phi)
    exact_kl = float(batch.kl(P.expand(theta, 4), mg.phi, data).mean())
    assert exact_kl > 0.05 and got["adapt/kl"] == pytest.approx(exact_kl, rel=0.05)
    same = rl_diagnostics(batch, theta, mg.inner_data, mg.outer_data, 1.0,
                          phi=P.expand(theta, 4))
    assert abs(same["adapt/kl"]) < 1e-10
