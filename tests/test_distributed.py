"""Data-parallel training on real torch.distributed (gloo) processes: equal to one process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from metarl import checkpoint
from metarl.distributed import Group

SINUSOID = ["--family", "sinusoid", "--family-opt", "hidden=[8]", "--meta-batch", "5",
            "--dtype", "float64", "--device", "cpu", "--log-every", "1"]
NAVIGATION = ["--family", "navigation2d", "--family-opt", "hidden=[8]", "--rollouts", "3",
              "--horizon", "20", "--meta-batch", "5", "--dtype", "float64", "--device", "cpu"]


def metarl(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "metarl.cli.main", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def rel_diff(a, b):
    return max(float((a.theta[k] - b.theta[k]).abs().max() / a.theta[k].abs().max())
               for k in a.theta)


def test_share_splits_every_task_once():
    for n in (1, 5, 7, 40):
        for world in (1, 2, 3, 4):
            shares = [Group(rank=r, world=world).share(n) for r in range(world)]
            covered = [i for s in shares for i in range(n)[s]]
            assert covered == list(range(n))
            sizes = [len(range(n)[s]) for s in shares]
            assert max(sizes) - min(sizes) <= 1


def test_group_of_one_changes_nothing():
    x = torch.randn(3, dtype=torch.float64)
    assert Group().task_mean(x, 3) is x
    assert Group().task_mean_metrics({"a": 1.5}, 2) == {"a": 1.5}


@pytest.mark.parametrize("algo", ["maml", "imaml"])
def test_two_processes_train_the_same_parameters_as_one(tmp_path, algo):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = metarl("train", *SINUSOID, "--algo", algo, "--iterations", 3, "--out", one)
    r2 = metarl("train", *SINUSOID, "--algo", algo, "--iterations", 3, "--out", two,
                "--procs", 2)
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    a, b = checkpoint.load(one), checkpoint.load(two)
    assert b.iteration == 3 and rel_diff(a, b) < 1e-10
    assert (one / "metrics.jsonl").read_text().count("\n") == 3  # rank 0 alone writes the log
    assert (two / "metrics.jsonl").read_text().count("\n") == 3
    assert "Traceback" not in r2.stderr


def test_trpo_step_over_two_processes_equals_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert metarl("train", *NAVIGATION, "--iterations", 1, "--out", one).returncode == 0
    r = metarl("train", *NAVIGATION, "--iterations", 1, "--out", two, "--procs", 2)
    assert r.returncode == 0, r.stderr
    # the same trajectories (noise by task, not by split) and a step equal up to round-off
    # that conjugate gradient amplifies by the Fisher's conditioning (~1e5 here)
    assert rel_diff(checkpoint.load(one), checkpoint.load(two)) < 1e-7


def test_resume_with_another_number_of_processes(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert metarl("train", *SINUSOID, "--iterations", 4, "--out", straight).returncode == 0
    r = metarl("train", *SINUSOID, "--iterations", 2, "--out", split, "--procs", 2)
    assert r.returncode == 0, r.stderr
    r = metarl("train", "--out", split, "--resume", "--iterations", 4)  # one process now
    assert r.returncode == 0, r.stderr
    assert rel_diff(checkpoint.load(straight), checkpoint.load(split)) < 1e-10


FAILING = '''
    import os, signal
    from metarl.tasks.sinusoid import SinusoidFamily
    from metarl.types import SamplingError

    class Failing(SinusoidFamily):
        """Sinusoid whose rank 1 fails at its third meta-batch, as HOW says."""
        calls = 0

        def sample_batch(self, *args, **kwargs):
            Failing.calls += 1
            if os.environ.get("RANK") == "1" and Failing.calls == 3:
                if os.environ["HOW"] == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise SamplingError("the simulator of task 3 crashed")
            return super().sample_batch(*args, **kwargs)
'''


@pytest.mark.parametrize("how, says", [("raise", "rank 1: the simulator of task 3 crashed"),
                                       ("kill", "rank 1 was killed by SIGKILL")])
def test_a_failing_rank_ends_the_run_with_one_line(tmp_path, monkeypatch, how, says):
    (tmp_path / "failing_family.py").write_text(textwrap.dedent(FAILING))
    monkeypatch.setenv("HOW", how)
    run = tmp_path / "run"
    r = metarl("train", "--family", "failing_family:Failing", "--family-opt", "hidden=[8]",
               "--meta-batch", "4", "--iterations", 50, "--checkpoint-every", 100, "--out", run,
               "--procs", 2, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and says in errors[0] and str(run) in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert checkpoint.load(run).iteration == 2  # the last finished iteration


def test_bad_procs_and_a_port_in_use_are_one_line(tmp_path):
    import socket

    r = metarl("train", *SINUSOID, "--iterations", 1, "--procs", 6, "--out", tmp_path / "a")
    assert r.returncode == 2 and "at most --procs 5" in r.stderr, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = metarl("train", *SINUSOID, "--iterations", 1, "--procs", 2, "--port", port,
                   "--out", tmp_path / "b")
    assert r.returncode == 2 and f"port {port} is in use" in r.stderr, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
