"""Validation while training (``--validate-every``): the logged metrics are those of the
validation tasks, ``best.pt`` holds the best of them, training is unchanged by it, a resumed
run validates as an uninterrupted one, and wrong settings get one-line errors."""

import json

import pytest
import torch

from metarl import checkpoint, families
from metarl.evaluate import adaptation_values
from metarl.train import kept_checkpoint
from metarl.validation import BEST
from tests.cli_run import one_line_error, run

SIN = ("train", "--family", "sinusoid", "--meta-batch", 4, "--log-every", 2, "--threads", 1,
       "--device", "cpu")
SIN_VAL = ("--validate-tasks", 12, "--validate-steps", 2)
NAV = ("train", "--family", "navigation2d", "--meta-batch", 2, "--rollouts", 3,
       "--family-opt", "horizon=8", "--log-every", 2, "--threads", 1, "--device", "cpu")


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def validated(out):
    return {r["iteration"]: r for r in rows(out) if "validation/best" in r}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_logged_validation_is_the_adaptation_of_every_validated_iteration(tmp_path):
    """Each validated row is the adaptation curve of that iteration's parameters on the
    validation tasks (training split, the validation seed), and best.pt is the iteration
    with the lowest error after the last step (sinusoid: lower is better)."""
    out = tmp_path / "sin"
    r = run(*SIN, "--iterations", 7, "--validate-every", 3, *SIN_VAL, "--checkpoint-every", 1,
            "--keep-checkpoints", "--out", out)
    assert r.exit_code == 0, r.output
    val = validated(out)
    assert sorted(val) == [3, 6, 7]  # every third, and the last
    fam = families.make("sinusoid")
    for it, row in val.items():
        theta = checkpoint.load(kept_checkpoint(out, it)).theta
        cfg = checkpoint.load(out).config
        curve = adaptation_values(theta, fam, n_tasks=12, steps=2, lr=(cfg.inner.lr,), seed=0,
                                  device=torch.device("cpu"), dtype=torch.float32,
                                  rule=cfg.inner, split="train").curve("v")
        assert [row[f"validation/mse_{j}"] for j in range(3)] == pytest.approx(curve.mean)
        test = adaptation_values(theta, fam, n_tasks=12, steps=2, lr=(cfg.inner.lr,), seed=0,
                                 device=torch.device("cpu"), dtype=torch.float32,
                                 rule=cfg.inner).curve("t")
        assert test.mean[2] != pytest.approx(curve.mean[2])  # not the test tasks
    best_it = min(val, key=lambda i: val[i]["validation/mse_2"])
    assert val[7]["validation/best_iteration"] == best_it
    assert val[7]["validation/best"] == val[best_it]["validation/mse_2"]
    best = checkpoint.load(out / BEST)
    assert best.iteration == best_it
    assert same(best.theta, checkpoint.load(kept_checkpoint(out, best_it)).theta)
    assert checkpoint.load(out).validation_best == pytest.approx(
        (best_it, val[best_it]["validation/mse_2"]))


def test_validation_leaves_training_as_it_is_and_keeps_the_highest_return(tmp_path):
    """The same parameters with and without validation (it draws from no generator training
    uses); on RL the best is the highest return after the last step."""
    plain, checked = tmp_path / "plain", tmp_path / "checked"
    assert run(*NAV, "--iterations", 4, "--out", plain).exit_code == 0
    r = run(*NAV, "--iterations", 4, "--validate-every", 1, "--validate-tasks", 3,
            "--validate-steps", 1, "--validate-rollouts", 4, "--out", checked)
    assert r.exit_code == 0, r.output
    assert same(checkpoint.load(plain).theta, checkpoint.load(checked).theta)
    val = validated(checked)
    assert sorted(val) == [1, 2, 3, 4]
    best_it = max(val, key=lambda i: val[i]["validation/return_1"])
    assert checkpoint.load(checked / BEST).iteration == best_it
    assert "validation/return_1_ci95" in val[4]
    plain_rows = {r["iteration"]: r for r in rows(plain)}
    assert plain_rows[4]["return/post"] == val[4]["return/post"]  # same training metrics


def test_a_resumed_run_validates_and_keeps_best_as_an_uninterrupted_one(tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    common = (*SIN, "--validate-every", 2, *SIN_VAL)
    assert run(*common, "--iterations", 6, "--out", whole).exit_code == 0
    assert run(*common, "--iterations", 4, "--out", halves).exit_code == 0
    r = run("train", "--out", halves, "--resume", "--iterations", 6, "--threads", 1)
    assert r.exit_code == 0, r.output
    def values(out):
        return {i: {k: v for k, v in r.items() if k.startswith("validation/")}
                for i, r in validated(out).items()}

    assert values(whole) == values(halves)
    a, b = checkpoint.load(whole / BEST), checkpoint.load(halves / BEST)
    assert a.iteration == b.iteration and same(a.theta, b.theta)
    assert checkpoint.load(whole).validation_best == checkpoint.load(halves).validation_best
    r = run(*common, "--iterations", 2, "--overwrite", "--validate-every", 0,
            "--validate-tasks", 12, "--out", whole)
    one_line_error(r, "--validate-every N")
    assert (whole / BEST).exists()  # a refused command leaves the run as it was


@pytest.mark.parametrize("args, fragments", [
    (("--validate-steps", 2), ("--validate-every N",)),
    (("--validate-every", -1), ("validate-every must be >= 0",)),
    (("--validate-every", 2, "--validate-rollouts", 4), ("--validate-rollouts", "supervised")),
    (("--validate-every", 2, "--validate-tasks", 0), ("validate-tasks must be >= 1",)),
])
def test_wrong_validation_settings_get_one_line(tmp_path, args, fragments):
    one_line_error(run(*SIN, "--iterations", 2, *args, "--out", tmp_path / "r"), *fragments)


def test_a_curve_of_a_key_some_rows_lack_joins_the_rows_that_have_it(tmp_path, monkeypatch):
    """Validation metrics are logged every N iterations: their line in ``metarl curve``
    runs through the validated iterations only, the other keys' through every row."""
    from metarl import plots

    drawn, save = {}, plots._save

    def keep(fig, panels, path, title):
        drawn.update({line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                      for line in panels[0].get_lines()})
        return save(fig, panels, path, title)

    monkeypatch.setattr(plots, "_save", keep)
    log = [{"iteration": i, "return/post": -10.0 + i} for i in range(1, 7)]
    for r in log[1::3]:
        r["validation/return_2"] = -5.0 + r["iteration"]
    png = plots.training_curves([("run", log)], ["return/post", "validation/return_2"],
                                tmp_path / "c.png")
    assert png.is_file()
    assert drawn["return/post"] == ([1, 2, 3, 4, 5, 6], [-9.0, -8.0, -7.0, -6.0, -5.0, -4.0])
    assert drawn["validation/return_2"] == ([2, 5], [-3.0, 0.0])


def test_evaluate_validation_reproduces_the_logged_rows(tmp_path):
    """``metarl evaluate CKPT --validation`` adapts on the run's validation tasks (its own
    seed, tasks, steps and rollouts): its curve is the row that iteration logged; given
    --rollouts it samples those instead, and it refuses --seed and --baseline ppo."""
    out = tmp_path / "nav"
    r = run(*NAV, "--seed", 3, "--iterations", 4, "--validate-every", 2, "--validate-tasks", 3,
            "--validate-steps", 1, "--validate-rollouts", 4, "--out", out)
    assert r.exit_code == 0, r.output
    val = validated(out)
    best = checkpoint.load(out / BEST).iteration
    for ckpt, it in ((out / BEST, best), (out, 4)):
        js = tmp_path / f"val-{it}.json"
        r = run("evaluate", ckpt, "--validation", "--threads", 1, "--device", "cpu",
                "--json", js)
        assert r.exit_code == 0, r.output
        assert "3 validation tasks" in r.output
        ev = json.loads(js.read_text())
        assert ev["n_tasks"] == 3 and ev["steps"] == [0, 1] and "baselines" not in ev
        assert ev["mean"] == pytest.approx([val[it]["validation/return_0"],
                                            val[it]["validation/return_1"]], rel=1e-6)
    js = tmp_path / "more.json"
    assert run("evaluate", out, "--validation", "--rollouts", 6, "--threads", 1, "--device",
               "cpu", "--json", js).exit_code == 0
    assert json.loads(js.read_text())["mean"][1] != pytest.approx(val[4]["validation/return_1"])
    test = tmp_path / "test.json"
    assert run("evaluate", out, "--tasks", 3, "--steps", 1, "--no-baselines", "--threads", 1,
               "--device", "cpu", "--json", test).exit_code == 0
    assert json.loads(test.read_text())["mean"][1] != pytest.approx(val[4]["validation/return_1"])
    one_line_error(run("evaluate", out, "--validation", "--seed", 1), "drop --seed")
    one_line_error(run("evaluate", out, "--validation", "--baseline", "ppo"), "--validation")
