"""The automatic thread count (metarl.threads): the choice, the load measurement, the
re-measurement between iterations, and a real busy process beside this one."""

import multiprocessing
import subprocess
import sys
import time

import pytest
import torch

from metarl import threads

SPIN = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < {s}: pass\n"


def _spin(seconds):
    t = time.monotonic()
    while time.monotonic() - t < seconds:
        pass


@pytest.mark.parametrize("cpus, others, expected", [
    (2, 0.0, 2), (2, 0.15, 2), (2, 0.3, 1), (2, 1.0, 1), (2, 3.0, 1),
    (16, 0.5, 15), (16, 4.9, 11), (1, 0.0, 1), (8, 0.0, 8)])
def test_choose_leaves_the_busy_cpus_to_their_owners(cpus, others, expected):
    assert threads.choose(cpus, others) == expected


def test_busy_seconds_reads_only_the_affine_cpus():
    stat = ("cpu  900 0 300 5000 100 0 0 0 0 0\n"
            "cpu0 100 0 100 2000 50 0 0 0 0 0\n"
            "cpu1 800 0 200 3000 50 10 10 30 0 0\n"
            "intr 12345\nctxt 999\n")
    hz = threads._clock_ticks()
    assert threads.busy_seconds({0}, stat) == pytest.approx(200 / hz)
    assert threads.busy_seconds({1}, stat) == pytest.approx(1050 / hz)  # steal counts as busy
    assert threads.busy_seconds(set(), stat) == pytest.approx(1250 / hz)
    assert threads.busy_seconds({7}, stat) is None


class FakeMachine:
    """A clock, /proc/stat's busy seconds and this process's CPU seconds, advanced by hand."""

    def __init__(self):
        self.t = self.busy = self.own = 0.0

    def run(self, seconds, *, others, mine=0.0):
        self.t += seconds
        self.busy += seconds * (others + mine)
        self.own += seconds * mine

    def governor(self, cpus):
        return threads.Governor(cpus=cpus, clock=lambda: self.t, busy=lambda: self.busy,
                                own=lambda: self.own)


def test_governor_follows_the_load_and_ignores_its_own_work():
    m = FakeMachine()
    gov = m.governor(cpus=2)
    assert gov.start(sleep=lambda s: m.run(s, others=0.0)) == 2
    assert torch.get_num_threads() == 2
    # this process working both cores is not "others"
    m.run(5.0, others=0.0, mine=2.0)
    assert gov.update() == 2
    # a job starts on the other core: one thread from the next measurement on
    m.run(5.0, others=1.0, mine=1.0)
    assert gov.update() == 1 and gov.others == pytest.approx(1.0)
    assert torch.get_num_threads() == 1
    # re-measured only once WINDOW has passed since the last measurement
    m.run(threads.WINDOW / 4, others=0.0, mine=1.0)
    assert gov.update() == 1
    m.run(threads.WINDOW, others=0.0, mine=1.0)
    assert gov.update() == 2


def test_a_loaded_machine_starts_with_one_thread():
    m = FakeMachine()
    gov = m.governor(cpus=2)
    assert gov.start(sleep=lambda s: m.run(s, others=1.0)) == 1
    assert torch.get_num_threads() == 1


def test_fixed_count_and_bad_count():
    assert threads.use(1) == 1 and threads.current() is None and threads.tick() == 1
    with pytest.raises(ValueError, match="threads must be >= 1"):
        threads.use(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_real_busy_process_is_others_and_a_worker_child_is_not():
    """A spinning unrelated process counts as another's load (about one CPU); the same
    spin in a multiprocessing child (as the environment workers are) counts as this
    process's own. Measured against the idle baseline of the moment."""

    def others(window):
        gov = threads.Governor(cpus=2)
        gov.start(window=window)
        return gov.others

    base = others(0.5)
    if base > 1.2:  # both CPUs already busy: a spinning process cannot add a measurable one
        pytest.skip(f"the machine is busy ({base:.1f} of 2 CPUs used by other processes)")
    stranger = subprocess.Popen([sys.executable, "-c", SPIN.format(s=3)])
    try:
        time.sleep(0.3)  # started
        busy = others(1.0)
    finally:
        stranger.kill()
        stranger.wait()
    child = multiprocessing.get_context("spawn").Process(target=_spin, args=(3,))
    child.start()
    try:
        time.sleep(0.5)
        mine = others(1.0)
    finally:
        child.kill()
        child.join()
    assert busy - base > 0.6
    assert mine - base < 0.4


def test_train_without_threads_uses_the_automatic_count_and_logs_it(tmp_path, monkeypatch):
    from metarl.train import read_metrics
    from tests.cli_run import run

    monkeypatch.delenv("METARL_THREADS")
    m = FakeMachine()
    # the machine as measured: another job on one of two CPUs
    gov = m.governor(cpus=2)
    monkeypatch.setattr(threads, "Governor", lambda: gov)
    monkeypatch.setattr(threads.time, "sleep", lambda s: m.run(s, others=1.0))
    r = run("train", "--family", "sinusoid", "--iterations", 2, "--log-every", 1,
            "--out", tmp_path / "run", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert threads.current() is not None
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["time/threads"] for row in rows] == [1, 1]
    monkeypatch.setenv("METARL_THREADS", "1")
    r = run("train", "--family", "sinusoid", "--iterations", 1, "--out", tmp_path / "r2",
            "--device", "cpu")
    assert r.exit_code == 0 and threads.current() is None
