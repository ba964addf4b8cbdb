"""Typed checkpoints: the Run record, atomic saves, and checkpoints of older versions."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from metarl import checkpoint, families
from metarl.checkpoint import Run
from metarl.cli.main import app
from metarl.config import TrainConfig
from metarl.inner import InnerConfig
from metarl.types import ConfigError

DATA = Path(__file__).parent / "data"
V1_SINUSOID = DATA / "checkpoint-v1-sinusoid-imaml.pt"
"""Written by metarl before the configuration was nested: 2 iMAML iterations on sinusoid
(hidden [4], so inner_steps 10 and imaml_lam 10 from the family)."""
V1_NAVIGATION = DATA / "checkpoint-v1-navigation2d-trpo.pt"
"""Likewise: 2 MAML-TRPO iterations on navigation2d with ``extra = {"max_kl": 0.02}``."""

runner = CliRunner()


def test_v1_checkpoints_load_as_typed_runs():
    run = checkpoint.load(V1_SINUSOID)
    assert torch.load(V1_SINUSOID, weights_only=True)["format"] == "metarl-checkpoint-v1"
    assert run.iteration == 2 and run.config.algo == "imaml"
    assert run.config.inner == InnerConfig(steps=10, lr=0.01)
    assert (run.config.imaml.lam, run.config.outer.optimizer) == (10.0, "adam")
    assert run.config.family_options["hidden"] == [4] and run.task_rng is not None
    assert families.fits(run.family(), run.theta)
    nav = checkpoint.load(V1_NAVIGATION)
    assert (nav.config.outer.optimizer, nav.config.trpo.max_kl) == ("trpo", 0.02)
    assert nav.config.trpo.cg_iters == 10


def test_v1_checkpoints_evaluate_and_resume(tmp_path):
    r = runner.invoke(app, ["evaluate", str(V1_SINUSOID), "--tasks", "3", "--steps", "1"])
    assert r.exit_code == 0, r.output
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(V1_NAVIGATION.read_bytes())
    r = runner.invoke(app, ["train", "--out", str(run_dir), "--resume", "--iterations", "3"])
    assert r.exit_code == 0, r.output
    run = checkpoint.load(run_dir)
    assert run.iteration == 3 and run.config.trpo.max_kl == 0.02  # the run's own settings
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["format"] == checkpoint.FORMAT


def test_save_and_load_round_trip(tmp_path):
    theta = {"w": torch.randn(3, 2, dtype=torch.float64)}
    cfg = TrainConfig(algo="fomaml", inner=InnerConfig(steps=2, lr=(0.1, 0.05)))
    run = Run(theta=theta, config=cfg, iteration=7, optimizer={"state": {}}, task_rng=None)
    checkpoint.save(tmp_path / "c.pt", run)
    back = checkpoint.load(tmp_path / "c.pt")
    assert back == run and back.path == tmp_path / "c.pt"
    assert torch.equal(back.theta["w"], theta["w"]) and back.config.inner.lr == (0.1, 0.05)
    assert not list(tmp_path.glob(".*.tmp"))


def test_with_family_options_keeps_the_model_or_refuses():
    run = checkpoint.load(V1_NAVIGATION)
    assert run.with_family_options({"rollouts": 7}).config.family_options["rollouts"] == 7
    with pytest.raises(ConfigError, match="hidden=\\[8\\] change the model of this run"):
        run.with_family_options({"hidden": [8]})


def test_incomplete_or_foreign_files_are_one_line_errors(tmp_path):
    torch.save({"format": checkpoint.FORMAT, "theta": {}}, tmp_path / "half.pt")
    with pytest.raises(ConfigError, match="is incomplete .*not written by metarl train"):
        checkpoint.load(tmp_path / "half.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="is not a metarl checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
