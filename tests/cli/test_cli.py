"""The command line: training run folders, evaluation output, config precedence, errors."""

import json

import pytest
import torch

from metarl import checkpoint, families
from metarl.train import read_metrics
from metarl.types import ConfigError
from tests.cli_run import one_line_error, run


def parser_error(result, *fragments):
    """A closed choice rejected by the parser: usage error 2, the choices named."""
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "Traceback" not in text
    for f in fragments:
        assert f in text, text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sin"
    r = run("train", "--family", "sinusoid", "--algo", "maml", "--iterations", 30,
            "--log-every", 10, "--out", out, "--device", "cpu", "--family-opt", "hidden=[16,16]")
    assert r.exit_code == 0, r.output
    return out


def test_train_writes_run_folder(trained):
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["iterations"] == 30 and cfg["inner"]["lr"] == 0.01 and cfg["meta_batch"] == 25
    assert cfg["family_options"]["hidden"] == [16, 16]
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [10, 20, 30]
    assert {"inner/loss_0", "outer/loss"} <= set(rows[0])
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 30 and state["theta"]["l0.w"].shape == (1, 16)
    assert not list(trained.glob(".*.tmp"))


def test_evaluate_json_and_plot(trained, tmp_path):
    r = run("evaluate", trained, "--tasks", 50, "--steps", 3, "--shots", 5,
            "--json", tmp_path / "e.json", "--plot", tmp_path / "e.png")
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "e.json").read_text())
    assert d["family"] == "sinusoid" and d["algo"] == "maml" and d["metric"] == "mse"
    assert d["steps"] == [0, 1, 2, 3] and d["n_tasks"] == 50
    assert len(d["mean"]) == len(d["ci95"]) == 4 and all(c > 0 for c in d["ci95"])
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the checkpoint file itself is accepted too, and the test seed is reproducible
    r2 = run("evaluate", trained / "checkpoint.pt", "--tasks", 50, "--steps", 3, "--shots", 5,
             "--json", tmp_path / "e2.json")
    assert r2.exit_code == 0, r2.output
    assert json.loads((tmp_path / "e2.json").read_text())["mean"] == d["mean"]


def test_evaluate_ci_matches_formula(trained):
    from metarl.evaluate import Curve

    v = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    c = Curve.from_values("x", v)
    assert c.mean == [3.0, 2.0]
    assert c.ci95[0] == pytest.approx(1.96 * 2.0 / 3 ** 0.5) and c.ci95[1] == 0.0


def test_config_file_and_flag_precedence(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('family = "sinusoid"\nalgo = "fomaml"\niterations = 4\nmeta_batch = 3\n'
                        '[inner]\nlr = 0.05\n[family_options]\nhidden = [4]\nshots = 7\n')
    out = tmp_path / "run"
    r = run("train", "--config", cfg_file, "--iterations", 2, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["algo"] == "fomaml"          # from the file
    assert cfg["iterations"] == 2           # the flag wins over the file
    assert cfg["inner"]["lr"] == 0.05 and cfg["meta_batch"] == 3
    assert cfg["outer"]["lr"] == 1e-3       # the family's default
    assert cfg["family_options"]["hidden"] == [4] and cfg["family_options"]["shots"] == 7
    # the defaults are recorded too: a later change of a default leaves the run as trained
    assert cfg["family_options"] == families.make("sinusoid", hidden=[4], shots=7).options()


def test_curve_draws_logged_metrics_and_reports_the_end(trained, tmp_path):
    png = tmp_path / "c.png"
    r = run("curve", trained, "--smooth", 2, "--out", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert "inner/loss_0" in r.output and "outer/loss" in r.output  # the supervised default
    last = (rows[-1]["outer/loss"] + rows[-2]["outer/loss"]) / 2  # mean of the last 2 rows
    assert f"-> {last:.4g}" in r.output and " 30 │" in r.output
    r = run("curve", trained, "-m", "time/iteration", "--x", "seconds", "--out", png)
    assert r.exit_code == 0, r.output
    one_line_error(run("curve", trained, "-m", "return/pre", "--out", png),
                   "logs no return/pre", "choose --metric from", "outer/loss")
    one_line_error(run("curve", trained, "--x", "epoch", "--out", png), "--x 'epoch'")
    one_line_error(run("curve", tmp_path / "none", "--out", png), "does not exist")


def test_read_metrics_joins_seconds_restarted_by_old_resumes(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"iteration": i, "seconds": s}) + "\n"
                           for i, s in [(1, 1.0), (2, 2.0), (3, 0.5), (4, 1.5)]))
    assert [r["seconds"] for r in read_metrics(tmp_path)] == [1.0, 2.0, 2.5, 3.5]
    log.write_text('{"iteration": 1, "seconds": 1.0}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2"):
        read_metrics(log)


def test_resume_drops_rows_past_the_checkpoint_and_counts_seconds_on(tmp_path):
    out = tmp_path / "r"
    args = ["train", "--family", "sinusoid", "--family-opt", "hidden=[4]", "--log-every", 1,
            "--checkpoint-every", 5, "--out", out, "--iterations"]
    assert run(*args, 5).exit_code == 0
    # an unclean stop logged an iteration the checkpoint lacks
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 6, "seconds": 99.0}) + "\n")
    assert run(*args, 8, "--resume").exit_code == 0
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows] == list(range(1, 9))
    secs = [r["seconds"] for r in rows]
    assert secs == sorted(secs) and secs[-1] < 99.0


def test_existing_run_is_not_overwritten(trained):
    before = (trained / "checkpoint.pt").read_bytes()
    r = run("train", "--family", "sinusoid", "--iterations", 2, "--out", trained)
    one_line_error(r, "already holds a checkpoint", "--resume", "--overwrite")
    assert (trained / "checkpoint.pt").read_bytes() == before


def test_resume_continues(tmp_path):
    out = tmp_path / "r"
    args = ["train", "--iterations", 5, "--log-every", 5, "--out", out, "--family", "sinusoid",
            "--family-opt", "hidden=[4]"]
    assert run(*args).exit_code == 0
    r = run(*args[:2], 8, *args[3:], "--resume")
    assert r.exit_code == 0, r.output
    assert checkpoint.load(out).iteration == 8
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in rows] == [5, 8]
    # the run's own settings are the base: --out, --resume and --iterations are enough
    r = run("train", "--out", out, "--resume", "--iterations", 10)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["family"] == "sinusoid" and cfg["family_options"]["hidden"] == [4]
    assert checkpoint.load(out).iteration == 10
    one_line_error(run("train", "--out", out, "--resume", "--iterations", 12, "--family",
                       "navigation2d"), "trains family 'sinusoid'", "drop --family")
    one_line_error(run("train", "--out", out, "--resume", "--iterations", 12, "--family-opt",
                       "hidden=[8]"), "does not fit these settings")
    one_line_error(run("train", "--out", out, "--resume", "--iterations", 10),
                   "already has 10 iterations", "raise --iterations")


def test_keep_checkpoints_keeps_each_periodic_checkpoint(tmp_path):
    out = tmp_path / "k"
    args = ["train", "--family", "sinusoid", "--family-opt", "hidden=[4]", "--iterations", 6,
            "--checkpoint-every", 2, "--out", out]
    assert run(*args, "--keep-checkpoints").exit_code == 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["iteration-000002.pt", "iteration-000004.pt", "iteration-000006.pt"]
    assert checkpoint.load(out / "checkpoints" / kept[0]).iteration == 2
    assert torch.equal(checkpoint.load(out / "checkpoints" / kept[-1]).theta["l0.w"],
                       checkpoint.load(out).theta["l0.w"])
    assert run("evaluate", out / "checkpoints" / kept[1], "--tasks", 3).exit_code == 0
    assert run(*args, "--overwrite").exit_code == 0  # a new run does not inherit old snapshots
    assert not list((out / "checkpoints").iterdir())


def test_sigterm_checkpoints_the_last_finished_iteration(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "t"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarl.cli.main", "train", "--family", "sinusoid", "--iterations",
         "1000000", "--log-every", "1", "--checkpoint-every", "1000000", "--out", str(out),
         "--threads", "1"], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    state = checkpoint.load(out)  # written on SIGTERM, although no checkpoint was due
    assert 1 <= state.iteration < 1000000


@pytest.mark.parametrize("args, fragments", [
    (["train", "--family", "sinusiod"], ["unknown family 'sinusiod'", "did you mean 'sinusoid'"]),
    (["train", "--family", "sinusoid", "--outer", "trpo", "--iterations", 1],
     ["trpo", "adam or sgd"]),
    (["train", "--device", "cuda", "--iterations", 1], ["CUDA is not available"]),
    (["train", "--inner-lr", "-1", "--iterations", 1], ["inner lr must be positive"]),
    (["train", "--family-opt", "oops"], ["is not KEY=VALUE"]),
    (["train", "--threads", "0"], ["--threads must be >= 1"]),
    (["train", "--config", "/nonexistent.toml"], ["config file", "does not exist"]),
    (["evaluate", "/nonexistent/run"], ["does not exist", "run folder or a checkpoint"]),
    (["families", "show", "navigatoin"], ["unknown family 'navigatoin'"]),
    (["bench", "--section", "nope"], ["unknown bench section"]),
])
def test_bad_input_gives_one_line_and_exit_2(args, fragments, tmp_path):
    out = ["--out", tmp_path / "o"] if args[0] == "train" else []
    one_line_error(run(*args, *out), *fragments)


@pytest.mark.parametrize("option, value, choices", [
    ("--algo", "mamal", "'maml', 'fomaml', 'reptile', 'imaml'"),
    ("--outer", "adamw", "'adam', 'sgd', 'trpo'"),
    ("--estimator", "ppo", "'reinforce', 'lvc', 'dice'"),
    ("--device", "tpu", "'auto', 'cpu', 'cuda'"),
    ("--dtype", "float16", "'float32', 'float64'"),
    ("--split", "random", "'character', 'alphabet'"),
])
def test_closed_choices_are_rejected_by_the_parser(option, value, choices, tmp_path):
    parser_error(run("train", option, value, "--out", tmp_path / "o"), f"'{value}' is not one of",
                 choices)
    assert not (tmp_path / "o").exists()
    r = run("train", "--help")
    assert choices.replace("'", "").replace(", ", "|") in r.output.replace(" ", "")


def test_bad_config_and_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("itrations = 3\n")
    one_line_error(run("train", "--config", bad), "unknown setting 'itrations'",
                   "did you mean 'iterations'?")
    bad.write_text("iterations = [\n")
    one_line_error(run("train", "--config", bad), "not valid TOML")
    ck = tmp_path / "checkpoint.pt"
    ck.write_bytes(b"not a checkpoint")
    one_line_error(run("evaluate", ck), "corrupt or not a metarl checkpoint")


def test_families_list_and_show():
    r = run("families")
    assert r.exit_code == 0 and "sinusoid" in r.output
    r = run("families", "show", "sinusoid")
    assert r.exit_code == 0
    assert "A ~ U[0.1, 5.0]" in r.output and "inner.lr = 0.01" in r.output
    r = run("families", "show", "navigation2d")  # docstrings printed as plain text
    assert r.exit_code == 0 and "Task: goal ~ U[-0.5, 0.5]^2" in r.output.splitlines()[3]
    assert "``" not in r.output and ":class:" not in r.output


def test_gradcheck_json(tmp_path):
    r = run("gradcheck", "--steps", 2, "--tasks", 2, "--family-opt", "hidden=[6,6]",
            "--cg-iters", 1, "--cg-iters", 100, "--json", tmp_path / "g.json")
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "g.json").read_text())
    assert d["dtype"] == "float64" and d["steps"] == 2
    m = d["methods"]
    assert set(m) >= {"maml", "fomaml", "reptile", "imaml_cg1", "imaml_cg100", "finite_diff"}
    assert set(m["maml"]) == {"rel_error", "cosine", "seconds", "peak_mb"}
    assert m["maml"]["rel_error"] < 1e-10 and m["finite_diff"]["rel_error"] < 1e-6
    assert m["imaml_cg100"]["rel_error"] < 1e-8 < m["imaml_cg1"]["rel_error"]
    assert m["fomaml"]["rel_error"] > 1e-4 and m["maml"]["cosine"] == pytest.approx(1.0)


def test_imaml_takes_the_familys_own_inner_loop():
    from metarl import config as C
    from metarl import families

    fam = families.make("omniglot", data="unused")
    cfg = C.resolve(fam, {"algo": "imaml"})
    assert (cfg.inner.steps, cfg.inner.lr, cfg.imaml.lam) == (16, 0.1, 2.0)
    cfg = C.resolve(fam, {"algo": "imaml", "inner": {"steps": 3}})
    assert (cfg.inner.steps, cfg.inner.lr) == (3, 0.1)
    cfg = C.resolve(fam, {"algo": "maml"})
    assert (cfg.inner.steps, cfg.inner.lr, cfg.meta_batch) == (1, 0.4, 32)
    # RL: Reptile and iMAML need k > 1, MAML keeps the paper's 1
    nav = families.make("navigation2d")
    steps = [C.resolve(nav, {"algo": a}).inner.steps for a in ("maml", "reptile", "imaml")]
    assert steps == [1, 3, 3]


def test_plot_overlays_evaluations(trained, tmp_path):
    paths = []
    for seed in (0, 1):
        p = tmp_path / f"e{seed}.json"
        assert run("evaluate", trained, "--tasks", 20, "--steps", 2, "--seed", seed,
                   "--json", p).exit_code == 0
        paths.append(p)
    r = run("plot", *paths, "--out", tmp_path / "both.png", "--label", "a", "--label", "b")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    one_line_error(run("plot", paths[0], "--out", tmp_path / "x.png", "--label", "a",
                       "--label", "b"),
                   "give one per file")
    (tmp_path / "bad.json").write_text("{}")
    one_line_error(run("plot", tmp_path / "bad.json", "--out", tmp_path / "x.png"),
                   "is not a metarl evaluate --json result")
