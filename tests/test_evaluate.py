"""Meta-testing: defaults that come from the family, RL baselines on the same tasks."""

import torch
from typer.testing import CliRunner

from metarl import checkpoint, families
from metarl.cli.main import app
from metarl.envs.navigation import Navigation2DFamily
from metarl.evaluate import adaptation_values

runner = CliRunner()


class QuickPretrainNavigation(Navigation2DFamily):
    name = "navigation2d-quick-pretrain"
    defaults = Navigation2DFamily.defaults.with_(pretrain_iterations=2)


def test_pretrain_iterations_default_is_the_familys(tmp_path):
    families.register(QuickPretrainNavigation.name, QuickPretrainNavigation, overwrite=True)
    run = tmp_path / "nav"
    r = runner.invoke(app, ["train", "--family", QuickPretrainNavigation.name, "--iterations", "1",
                            "--meta-batch", "2", "--rollouts", "2", "--horizon", "5",
                            "--family-opt", "hidden=[4]", "--out", str(run)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", str(run), "--tasks", "2", "--steps", "1"])
    assert r.exit_code == 0, r.output
    assert "pretrained baseline: 2 iterations" in r.output  # not a hard-coded 100
    assert checkpoint.load(run / "pretrained").iteration == 2


def test_rl_scores_report_the_tasks_every_policy_is_tested_on():
    fam = families.make("navigation2d", rollouts=2, horizon=5, hidden=[4])
    kw = dict(n_tasks=5, steps=1, lr=0.1, seed=3, device=torch.device("cpu"), dtype=torch.float32,
              chunk=2)
    a = adaptation_values(fam.init_params(torch.Generator().manual_seed(0), kw["device"],
                                          kw["dtype"]), fam, **kw)
    b = adaptation_values(fam.init_params(torch.Generator().manual_seed(1), kw["device"],
                                          kw["dtype"]), fam, **kw)
    assert a.values.shape == (5, 2) and a.tasks is not None and len(a.tasks) == 5
    assert a.tasks == b.tasks  # the oracle line is drawn on exactly these tasks
    sup = adaptation_values(families.make("sinusoid", hidden=[4]).init_params(
        torch.Generator().manual_seed(0), kw["device"], kw["dtype"]),
        families.make("sinusoid", hidden=[4]), **kw)
    assert sup.tasks is None


def test_supervised_batch_sizes_on_an_rl_run_are_one_line(tmp_path):
    from tests.cli_run import one_line_error, run

    out = tmp_path / "nav"
    r = run("train", "--family", "navigation2d", "--iterations", 1, "--meta-batch", 2,
            "--rollouts", 2, "--horizon", 5, "--family-opt", "hidden=[4]", "--out", out)
    assert r.exit_code == 0, r.output
    one_line_error(run("evaluate", out, "--shots", 5), "shots (support and query sizes) is for "
                   "supervised families", "'navigation2d' is RL", "--rollouts")


def test_a_run_trained_with_inner_adam_is_tested_with_it(tmp_path):
    from metarl.evaluate import evaluate_checkpoint
    from metarl.inner import InnerConfig
    from tests.cli_run import one_line_error, run

    out = tmp_path / "rep"
    args = ("train", "--family", "sinusoid", "--family-opt", "hidden=[4]", "--algo", "reptile",
            "--inner-optimizer", "adam", "--inner-lr", 0.05, "--inner-steps", 3, "--outer", "sgd",
            "--outer-lr", 0.15, "--outer-lr-final", 0, "--iterations", 4, "--meta-batch", 3)
    r = run(*args, "--out", out)
    assert r.exit_code == 0, r.output
    trained = checkpoint.load(out)
    assert trained.config.inner.optimizer == "adam" and trained.config.outer.lr_final == 0.0
    result = evaluate_checkpoint(trained, n_tasks=6, steps=3, device="cpu")
    assert result.settings["inner_optimizer"] == "adam"
    fam = trained.family()
    kw = dict(n_tasks=6, steps=3, lr=(0.05,), seed=0, device=torch.device("cpu"),
              dtype=torch.float32)
    by_adam = adaptation_values(trained.theta, fam, rule=trained.config.inner, **kw)
    by_sgd = adaptation_values(trained.theta, fam, **kw)
    assert result.curve.mean == by_adam.curve("x").mean
    assert by_adam.values[:, 0].equal(by_sgd.values[:, 0])  # same tasks, same start
    assert not torch.allclose(by_adam.values[:, 1:], by_sgd.values[:, 1:])
    assert InnerConfig().optimizer == "sgd"
    one_line_error(run(*args[:5], "--inner-optimizer", "adam", "--out", tmp_path / "m"),
                   "--inner-optimizer adam is first order")
