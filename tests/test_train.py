"""The training loop's callbacks: they see every iteration, and stop a run early with a
checkpoint that resumes as if it had never stopped (one process and two)."""

import subprocess
import sys
import textwrap

import torch

from metarl import checkpoint
from metarl.config import TrainConfig
from metarl.train import Step, train

CFG = TrainConfig.from_dict({"family": "sinusoid", "family_options": {"hidden": [4]},
                             "meta_batch": 3, "iterations": 8, "log_every": 4,
                             "dtype": "float64", "device": "cpu"})


class Recorder:
    def __init__(self, stop_at=None):
        self.steps: list[Step] = []
        self.thetas: list[dict] = []
        self.stop_at = stop_at

    def on_iteration(self, step):
        self.steps.append(step)
        self.thetas.append({k: v.detach().clone() for k, v in step.theta.items()})
        return None if step.iteration != self.stop_at else False


def test_callbacks_see_every_iteration_in_order(tmp_path):
    rec, other = Recorder(), Recorder()
    result = train(CFG, tmp_path / "r", callbacks=[rec, other])
    assert [s.iteration for s in rec.steps] == list(range(1, 9)) == [s.iteration
                                                                     for s in other.steps]
    assert result.iterations == 8 and rec.steps[0].out == tmp_path / "r"
    # metrics on the iterations that show them (every min(log_every, 10) and the last)
    assert [s.iteration for s in rec.steps if s.metrics is not None] == [4, 8]
    assert "outer/loss" in rec.steps[3].metrics
    # theta as updated by that iteration: the final one is the checkpoint's
    assert not torch.equal(rec.thetas[0]["l0.w"], rec.thetas[1]["l0.w"])
    final = checkpoint.load(tmp_path / "r").theta
    assert all(torch.equal(final[k], rec.thetas[-1][k]) for k in final)


def test_a_callback_stops_the_run_and_the_checkpoint_resumes_it(tmp_path):
    whole = train(CFG, tmp_path / "whole")
    stopper = Recorder(stop_at=3)
    early = train(CFG, tmp_path / "early", callbacks=[stopper, Recorder()])
    assert early.iterations == 3 and [s.iteration for s in stopper.steps] == [1, 2, 3]
    assert checkpoint.load(tmp_path / "early").iteration == 3
    rest = train(CFG, tmp_path / "early", resume=True)
    assert rest.iterations == 5 and whole.iterations == 8
    a, b = checkpoint.load(tmp_path / "whole").theta, checkpoint.load(tmp_path / "early").theta
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: nothing of the stop remains


SCRIPT = '''
import sys
from metarl.config import TrainConfig
from metarl.distributed import current
from metarl.train import train

class StopOnRank1:
    def on_iteration(self, step):
        return False if current().rank == 1 and step.iteration == 2 else None

cfg = TrainConfig.from_dict({"family": "sinusoid", "family_options": {"hidden": [4]},
                             "meta_batch": 4, "iterations": 6, "device": "cpu"})
result = train(cfg, sys.argv[1], callbacks=[StopOnRank1()])
# one file per rank: the ranks share torchrun's stdout, where their lines can interleave
with open(f"{sys.argv[2]}/rank{current().rank}.txt", "w") as f:
    f.write(f"rank {current().rank} ran {result.iterations}")
'''


def test_any_rank_stopping_stops_every_rank(tmp_path):
    (tmp_path / "stop.py").write_text(textwrap.dedent(SCRIPT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", str(tmp_path / "stop.py"), str(tmp_path / "run"),
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [(tmp_path / f"rank{k}.txt").read_text() for k in (0, 1)] == [
        "rank 0 ran 2", "rank 1 ran 2"]
    assert checkpoint.load(tmp_path / "run").iteration == 2
