"""The inner KL penalty (``--inner-kl-penalty``): the adaptation's KL in the meta-objective,
its exact meta-gradient, TRPO's line search on the penalised objective, and its refusals."""

import json

import pytest
import torch
from typer.testing import CliRunner

from metarl import config as C
from metarl import families
from metarl import params as P
from metarl.algorithms import exact, maml, meta_grad
from metarl.cli.main import app
from metarl.inner import InnerConfig, adapt
from metarl.types import ConfigError

F64 = torch.float64


def nav(dtype=F64, **opts):
    fam = families.make("navigation2d", **{"rollouts": 4, "hidden": [8, 8], "horizon": 10, **opts})
    g = torch.Generator().manual_seed(0)
    return fam, fam.init_params(g, torch.device("cpu"), dtype), g


def test_adaptation_kl_is_the_kl_of_each_step_on_its_own_trajectories():
    fam, theta, g = nav()
    batch = fam.sample_batch(3, g, dtype=F64)
    ad = adapt(P.expand(theta, 3), batch, InnerConfig(steps=2, lr=0.1, kl_penalty=1.0),
               create_graph=False)
    got = batch.adaptation_kl(ad.path, ad.phi, ad.data)
    assert len(ad.path) == 2 and torch.equal(ad.path[0]["l0.w"], P.expand(theta, 3)["l0.w"])
    want = (batch.kl(ad.path[0], ad.path[1], ad.data[0])
            + batch.kl(ad.path[1], ad.phi, ad.data[1]))
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert bool((got > 0).all())
    assert torch.equal(batch.adaptation_kl([], ad.phi, []), torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("k", [1, 2])
def test_penalised_meta_gradient_equals_finite_differences_on_fixed_trajectories(k):
    """The gradient flows through both policies of every step's KL (theta's own and the
    adapted one): central differences of mean_t [L_out + eta KL] in float64."""
    fam, theta, g = nav()
    batch = fam.sample_batch(3, g, dtype=F64)
    eta = 3.0
    inner = InnerConfig(steps=k, lr=0.1, kl_penalty=eta)
    mg = maml.meta_grad(theta, batch, inner)

    def objective(th):
        ad = adapt(P.expand(th, 3), batch, inner, create_graph=False, data=mg.inner_data)
        pen = batch.adaptation_kl(ad.path, ad.phi, ad.data)
        return (batch.outer_loss(ad.phi, mg.outer_data) + eta * pen).mean().detach()

    fd = exact.central_diff(objective, theta)
    assert exact.rel_error(mg.grad, fd) <= 1e-6
    plain = maml.meta_grad(theta, batch, InnerConfig(steps=k, lr=0.1))
    assert exact.rel_error(plain.grad, fd) > 1e-3  # the penalty's term is not negligible here
    assert mg.extra["inner/kl"] > 0
    assert float(objective(theta)) == pytest.approx(float(mg.outer_loss.mean()), rel=1e-12)


def test_trpo_step_improves_the_penalised_objective_within_the_kl_bound():
    fam, theta, g = nav(torch.float32, hidden=[16, 16])
    cfg = C.resolve(fam, {"iterations": 1, "meta_batch": 4, "device": "cpu",
                          "inner": {"kl_penalty": 5.0}, "family_options": fam.options(),
                          "trpo": {"max_kl": 0.005}})
    theta = P.clone_leaf(theta)
    trpo = fam.make_outer(cfg, theta)
    batch = fam.sample_batch(4, g)
    mg = trpo.step(theta, batch, lambda th, b: meta_grad("maml", th, b, cfg.inner))
    assert mg.extra["trpo/accepted"] == 1.0
    ad = trpo.readapt(P.detach(theta), batch, mg.inner_data, False)
    with torch.no_grad():
        new = (batch.outer_loss(ad.phi, mg.outer_data)
               + 5.0 * batch.adaptation_kl(ad.path, ad.phi, ad.data)).mean()
        kl = batch.kl(mg.phi, ad.phi, mg.outer_data).mean()
    assert float(new) < float(mg.outer_loss.mean())  # the penalised objective improved
    assert float(mg.outer_loss.mean()) - float(new) == pytest.approx(
        mg.extra["trpo/improvement"], rel=1e-4)
    assert 0 < float(kl) <= 0.005 * (1 + 1e-4)


def test_the_penalty_is_refused_where_it_cannot_be_differentiated():
    with pytest.raises(ConfigError, match="inner-kl-penalty"):
        InnerConfig(kl_penalty=-1.0)
    fam, theta, g = nav()
    with pytest.raises(ConfigError, match="use --algo maml"):
        C.resolve(fam, {"algo": "fomaml", "inner": {"kl_penalty": 1.0},
                        "family_options": fam.options()})
    batch = fam.sample_batch(2, g, dtype=F64)
    with pytest.raises(ConfigError, match="--algo maml on an RL family"):
        maml.meta_grad(theta, batch, InnerConfig(kl_penalty=1.0), first_order=True)
    sin = families.make("sinusoid")
    sg = torch.Generator().manual_seed(0)
    sb = sin.sample_batch(2, sg)
    with pytest.raises(ConfigError, match="--algo maml on an RL family"):
        maml.meta_grad(sin.init_params(sg, torch.device("cpu"), torch.float32), sb,
                       InnerConfig(kl_penalty=1.0))


def test_cli_trains_with_the_penalty_and_logs_the_adaptation_kl(tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(app, [
        "train", "--family", "navigation2d", "--iterations", "2", "--meta-batch", "2",
        "--rollouts", "2", "--family-opt", "horizon=5", "--inner-kl-penalty", "0.5",
        "--log-every", "1", "--threads", "1", "--out", str(run)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(row["inner/kl"] > 0 for row in rows)
    assert json.loads((run / "config.json").read_text())["inner"]["kl_penalty"] == 0.5
    r = CliRunner().invoke(app, [
        "train", "--family", "sinusoid", "--algo", "reptile", "--iterations", "1",
        "--inner-kl-penalty", "0.5", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "use --algo maml" in r.output


def test_the_adaptive_coefficient_follows_promps_rule_within_its_range():
    from metarl.inner import KL_PENALTY_RANGE, KLPenaltySchedule

    s = KLPenaltySchedule(start=0.01, target=10.0)
    assert s.eta == 0.01
    assert s.update(15.1) == 0.02  # above 1.5 x target: doubled
    assert s.update(15.0) == 0.02 and s.update(6.67) == 0.02  # inside the band: kept
    assert s.update(6.6) == 0.01  # below target / 1.5: halved
    for _ in range(30):
        s.update(0.0)
    assert s.eta == 0.01 / KL_PENALTY_RANGE  # the floor: ten doublings bring it back
    for _ in range(10):
        s.update(1e9)
    assert s.eta == 0.01
    for _ in range(30):
        s.update(1e9)
    assert s.eta == 0.01 * KL_PENALTY_RANGE
    with pytest.raises(ValueError, match="adaptation KL is nan"):
        s.update(float("nan"))
    assert KLPenaltySchedule.of(InnerConfig(kl_penalty=0.5)) is None
    assert KLPenaltySchedule.of(InnerConfig(kl_penalty=0.5, kl_target=3.0)) == \
        KLPenaltySchedule(0.5, 3.0, 0.5)
    with pytest.raises(ConfigError, match="give --inner-kl-penalty ETA > 0"):
        InnerConfig(kl_target=3.0)
    with pytest.raises(ConfigError, match="inner-kl-target must be"):
        InnerConfig(kl_penalty=0.5, kl_target=-1.0)


def test_trpo_scores_candidates_with_the_coefficient_the_meta_gradient_carries():
    """The trainer changes the coefficient between iterations: TRPO's line search must
    score the objective the meta-gradient is the gradient of, whatever its own config."""
    fam, theta, g = nav(torch.float32, hidden=[16, 16])
    cfg = C.resolve(fam, {"iterations": 1, "meta_batch": 4, "device": "cpu",
                          "inner": {"kl_penalty": 1e-6}, "family_options": fam.options(),
                          "trpo": {"max_kl": 0.005}})
    theta = P.clone_leaf(theta)
    trpo = fam.make_outer(cfg, theta)  # built with 1e-6, stepped with 5.0
    batch = fam.sample_batch(4, g)
    inner = InnerConfig(steps=1, lr=cfg.inner.lr, kl_penalty=5.0)
    mg = trpo.step(theta, batch, lambda th, b: meta_grad("maml", th, b, inner))
    assert mg.kl_penalty == 5.0 and mg.extra["inner/kl_penalty"] == 5.0
    assert mg.extra["trpo/accepted"] == 1.0
    ad = trpo.readapt(P.detach(theta), batch, mg.inner_data, False)
    with torch.no_grad():
        new = (batch.outer_loss(ad.phi, mg.outer_data)
               + 5.0 * batch.adaptation_kl(ad.path, ad.phi, ad.data)).mean()
    assert float(mg.outer_loss.mean()) - float(new) == pytest.approx(
        mg.extra["trpo/improvement"], rel=1e-4)


def test_training_adapts_the_coefficient_and_resume_continues_it(tmp_path):
    """A target far above any KL halves the coefficient every iteration, one far below
    doubles it; the checkpoint holds it and --resume goes on from it, the same run as
    one without a stop."""
    from metarl import checkpoint
    from tests.cli_run import run

    base = ("train", "--family", "navigation2d", "--meta-batch", 2, "--rollouts", 2,
            "--family-opt", "horizon=5", "--inner-kl-penalty", 0.5, "--log-every", 1,
            "--threads", 1)

    def etas(out):
        return [json.loads(x)["inner/kl_penalty"]
                for x in (out / "metrics.jsonl").read_text().splitlines()]

    calm, busy = tmp_path / "calm", tmp_path / "busy"  # KL far below / above the target
    assert run(*base, "--iterations", 3, "--inner-kl-target", 1e6, "--out", calm).exit_code == 0
    assert etas(calm) == [0.5, 0.25, 0.125]  # the coefficient each iteration trained with
    assert checkpoint.load(calm).kl_penalty == 0.0625
    assert run(*base, "--iterations", 3, "--inner-kl-target", 1e-9, "--out", busy).exit_code == 0
    assert etas(busy) == [0.5, 1.0, 2.0] and checkpoint.load(busy).kl_penalty == 4.0
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    target = ("--inner-kl-target", 1e-9)
    assert run(*base, *target, "--iterations", 4, "--out", whole).exit_code == 0
    assert run(*base, *target, "--iterations", 2, "--out", halves).exit_code == 0
    r = run("train", "--out", halves, "--resume", "--iterations", 4, "--threads", 1)
    assert r.exit_code == 0, r.output
    assert etas(halves) == etas(whole) == [0.5, 1.0, 2.0, 4.0]
    a, b = checkpoint.load(whole), checkpoint.load(halves)
    assert a.kl_penalty == b.kl_penalty == 8.0
    assert all(torch.equal(a.theta[k], b.theta[k]) for k in a.theta)
    assert json.loads((whole / "config.json").read_text())["inner"]["kl_target"] == 1e-9
