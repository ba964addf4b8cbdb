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
