"""Data-parallel training on real torch.distributed (gloo) processes: equal to one process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from metarl import checkpoint
from metarl.algorithms import meta_grad
from metarl.distributed import Group
from tests.cli_run import one_line_error
from tests.cli_run import run as cli_run

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
    for it in (1, 2, 3):  # rank 0 alone prints the progress lines (--log-every 1)
        assert r1.stderr.count(f"[{it}/3]") == 1
        assert r2.stderr.count(f"[{it}/3]") == 1, r2.stderr


def test_a_tasks_rows_do_not_depend_on_the_tasks_beside_it():
    """What makes N processes equal one to the last bit: a task's meta-gradient and
    Fisher-vector products are the same whether its batch holds all 5 tasks, 2 or 1."""
    from metarl import config as C
    from metarl import families
    from metarl import params as P
    from metarl.rl.returns import discount_cumsum

    x = torch.randn(5, 3, 20, dtype=torch.float64)
    one_by_one = torch.cat([discount_cumsum(x[t:t + 1], 0.99) for t in range(5)])
    assert torch.equal(discount_cumsum(x, 0.99), one_by_one)  # a [H, H] matmul is not
    fam = families.make("navigation2d", hidden=[8], rollouts=3, horizon=20)
    cfg = C.resolve(fam, {"family": "navigation2d", "family_options": fam.options(),
                          "meta_batch": 5, "dtype": "float64"})
    theta = P.clone_leaf(fam.init_params(torch.Generator().manual_seed(0), "cpu", torch.float64))
    trpo = fam.make_outer(cfg, theta)
    v = torch.randn(P.flatten(theta).numel(), dtype=torch.float64)

    def rows(share):
        batch = fam.sample_batch(5, torch.Generator().manual_seed(5), split="train",
                                 device=torch.device("cpu"), dtype=torch.float64, share=share)
        mg = meta_grad("maml", theta, batch, cfg.inner)
        g = torch.cat([r.reshape(batch.n_tasks, -1) for r in mg.task_grads.values()], 1)
        return g, trpo.task_fisher_vector_products(theta, batch, mg)(v)

    whole = rows(None)
    for shares in ([slice(0, 3), slice(3, 5)], [slice(t, t + 1) for t in range(5)]):
        parts = [rows(s) for s in shares]
        for i in range(2):
            assert torch.equal(whole[i], torch.cat([p[i] for p in parts]))


@pytest.mark.parametrize("procs", [2, 3])
def test_trpo_step_over_several_processes_equals_one(tmp_path, procs):
    one, many = tmp_path / "one", tmp_path / "many"
    assert metarl("train", *NAVIGATION, "--iterations", 2, "--out", one).returncode == 0
    r = metarl("train", *NAVIGATION, "--iterations", 2, "--out", many, "--procs", procs)
    assert r.returncode == 0, r.stderr
    # the same trajectories (noise by task, not by split), each task's rows the same bits
    # on any rank, summed in task order: the same steps (0.0 measured; an all-reduce of
    # rank means differed by 7.7e-10, round-off amplified by conjugate gradient)
    assert rel_diff(checkpoint.load(one), checkpoint.load(many)) < 1e-10


def test_locomotion_trpo_step_over_two_processes_equals_one(tmp_path):
    pytest.importorskip("mujoco")
    cheetah = ["--family", "halfcheetah-vel", "--family-opt", "hidden=[8]", "--rollouts", "2",
               "--horizon", "10", "--meta-batch", "4", "--dtype", "float64", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = metarl("train", *cheetah, "--iterations", 2, "--out", one)
    assert r.returncode == 0, r.stderr
    r = metarl("train", *cheetah, "--iterations", 2, "--out", two, "--procs", 2)
    assert r.returncode == 0, r.stderr
    # each rank steps its own MuJoCo environments: the same start states and action noise
    # for a task wherever it runs, so the same steps (0.0 measured)
    assert rel_diff(checkpoint.load(one), checkpoint.load(two)) < 1e-10


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
        """Sinusoid whose rank 1 fails at its FAIL_AT-th (default third) meta-batch, as HOW
        says."""
        calls = 0

        def sample_batch(self, *args, **kwargs):
            Failing.calls += 1
            if os.environ.get("RANK") == "1" and Failing.calls == int(os.environ.get("FAIL_AT",
                                                                                     "3")):
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


@pytest.mark.parametrize("how, says", [("raise", "rank 1: the simulator of task 3 crashed"),
                                       ("kill", "rank 1 was killed by SIGKILL")])
def test_a_rank_failing_during_evaluate_ends_it_with_one_line(tmp_path, monkeypatch, how, says):
    (tmp_path / "failing_family.py").write_text(textwrap.dedent(FAILING))
    run = tmp_path / "run"
    r = metarl("train", "--family", "failing_family:Failing", "--family-opt", "hidden=[8]",
               "--meta-batch", "4", "--iterations", 1, "--out", run, cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # one process: no rank 1, nothing fails
    monkeypatch.setenv("HOW", how)
    monkeypatch.setenv("FAIL_AT", "1")
    out = tmp_path / "eval.json"
    r = metarl("evaluate", run, "--tasks", 6, "--procs", 2, "--json", out, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


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



SMALL_CHUNKS = '''
    from metarl.tasks.sinusoid import SinusoidFamily

    class SmallChunks(SinusoidFamily):
        """Sinusoid evaluated 3 tasks at a time: 7 test tasks are chunks of 3, 3 and 1, and
        in the last one rank 1 has no task of its own."""
        eval_chunk = 3
'''


def assert_json_close(a, b, rel, where="$"):
    """Equal structure and strings; numbers equal to ``rel`` (relative, absolute below 1)."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_json_close(a[k], b[k], rel, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_json_close(x, y, rel, f"{where}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= rel * max(1.0, abs(a)), (where, a, b)
    else:
        assert a == b, where


def evaluate_on_one_and_two(tmp_path, run, *args):
    """``metarl evaluate`` of ``run`` in this process and of a copy of it (its own
    pretrained cache) on two launched processes: both JSONs and the second's output."""
    import json
    import shutil

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("checkpoint.pt", "config.json"):
        shutil.copy(run / name, copy / name)
    r1 = cli_run("evaluate", run, *args, "--json", tmp_path / "one.json")
    assert r1.exit_code == 0, r1.output
    r2 = metarl("evaluate", copy, *args, "--procs", 2, "--json", tmp_path / "two.json",
                cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert "Traceback" not in r2.stderr
    return (json.loads((tmp_path / "one.json").read_text()),
            json.loads((tmp_path / "two.json").read_text()), r2)


def test_two_processes_evaluate_sinusoid_as_one(tmp_path, monkeypatch):
    (tmp_path / "small_chunks.py").write_text(textwrap.dedent(SMALL_CHUNKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    r = cli_run("train", *SINUSOID, "--family", "small_chunks:SmallChunks", "--iterations", 1,
                "--threads", 1, "--out", run)
    assert r.exit_code == 0, r.output
    one, two, r2 = evaluate_on_one_and_two(tmp_path, run, "--tasks", 7, "--steps", 2,
                                           "--threads", 1)
    assert one["n_tasks"] == 7 and len(one["mean"]) == 3
    # float64; each rank adapts its tasks as a smaller batch: equal up to round-off (~1e-16)
    assert_json_close(one, two, rel=1e-10)
    assert r2.stdout.count("mse after k adaptation steps") == 1  # rank 0 alone prints
    assert r2.stderr.count("wrote") == 1


def test_two_processes_evaluate_navigation_as_one(tmp_path):
    run = tmp_path / "run"
    # adam, not TRPO: the pretrained baseline (k = 0) then trains to round-off on two
    # processes, where TRPO's conjugate gradient on this tiny policy's Fisher (eigenvalues
    # down to the damping) turns a 1e-16 difference into a 10% different step
    r = cli_run("train", *NAVIGATION, "--outer", "adam", "--iterations", 1, "--threads", 1,
                "--out", run)
    assert r.exit_code == 0, r.output
    one, two, r2 = evaluate_on_one_and_two(tmp_path, run, "--tasks", 5, "--steps", 1,
                                           "--pretrain-iterations", 2, "--threads", 1)
    assert set(one["baselines"]) == {"random init", "pretrained"}
    assert "oracle" in one["reference_lines"]
    # float64: the same trajectories (noise by task row), the pretrained baseline trained by
    # both ranks together: equal up to round-off (~1e-15 measured)
    assert_json_close(one, two, rel=1e-10)
    assert checkpoint.load(tmp_path / "copy" / "pretrained").iteration == 2
    assert r2.stdout.count("return after k adaptation steps") == 1
    assert r2.stderr.count("pretrained baseline:") == 1


def test_evaluate_bad_procs_and_a_port_in_use_are_one_line(tmp_path):
    import socket

    run = tmp_path / "run"
    assert cli_run("train", *SINUSOID, "--iterations", 1, "--threads", 1,
                   "--out", run).exit_code == 0
    one_line_error(cli_run("evaluate", run, "--tasks", 3, "--procs", 4), "at most --procs 3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli_run("evaluate", run, "--tasks", 3, "--procs", 2, "--port", port)
    one_line_error(r, f"port {port} is in use")
