"""metarl train --tensorboard: the metrics.jsonl rows as TensorBoard scalars (read back with
TensorBoard's event reader), the RL diagnostics in both, and a one-line error without the
extra."""

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from metarl.cli.main import app
from metarl.rl.diagnostics import explained_variance

runner = CliRunner()
DIAGNOSTICS = {"policy/std", "policy/entropy", "baseline/explained_variance",
               "rollout/episode_length", "time/env_steps_per_s", "adapt/kl"}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny_nav(out, *extra):
    return run("train", "--family", "navigation2d", "--iterations", 4, "--log-every", 2,
               "--meta-batch", 2, "--rollouts", 2, "--horizon", 20, "--device", "cpu",
               "--family-opt", "hidden=[8]", "--out", out, *extra)


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_logged_rows(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    r = tiny_nav(out, "--tensorboard")
    assert r.exit_code == 0, r.output
    assert list(out.glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert DIAGNOSTICS <= set(rows[0])
    board = scalars(out)
    assert set(board) == set(rows[0]) - {"iteration"}  # the same keys, seconds included
    for key in rows[0]:
        if key == "iteration":
            continue
        steps, values = zip(*board[key])
        assert list(steps) == [r["iteration"] for r in rows]
        assert np.allclose(values, [r[key] for r in rows], rtol=1e-6)  # float32 in the file
    # resume continues the same files; --overwrite starts them afresh
    r = tiny_nav(out, "--tensorboard", "--resume", "--iterations", 6)
    assert r.exit_code == 0, r.output
    assert [s for s, _ in scalars(out)["return/post"]] == [2, 4, 6]
    r = tiny_nav(out, "--tensorboard", "--overwrite")
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("events.out.tfevents.*"))) == 1


def test_diagnostics_without_tensorboard_and_plausible(tmp_path):
    out = tmp_path / "run"
    assert tiny_nav(out).exit_code == 0
    assert not list(out.glob("events.out.tfevents.*"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < row["policy/std"] < 2 and row["rollout/episode_length"] == 20
    # entropy of a diagonal Gaussian: sum(log std) + d/2 log(2 pi e); d = 2 here
    per_dim = np.log(row["policy/std"]) + 0.5 * np.log(2 * np.pi * np.e)
    assert row["policy/entropy"] <= 2 * per_dim + 1e-6
    assert row["baseline/explained_variance"] <= 1 and row["time/env_steps_per_s"] > 0


def test_explained_variance_matches_numpy():
    g = torch.Generator().manual_seed(0)
    ret = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    val = ret + 0.3 * torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 4, 5, generator=g) > 0.2).double()
    ev = explained_variance(ret, val, mask)
    for t in range(3):
        m = mask[t].bool().numpy()
        r, v = ret[t].numpy()[m], val[t].numpy()[m]
        assert ev[t].item() == pytest.approx(1 - np.var(r - v) / np.var(r), rel=1e-12)
    assert torch.allclose(explained_variance(ret, ret, mask), torch.ones(3, dtype=torch.float64))


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    r = tiny_nav(tmp_path / "run", "--tensorboard")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --tensorboard needs the tensorboard")
    assert ".[tensorboard]" in lines[0]
