"""TRPO's fast path: the Fisher on a subsample of the steps or trajectories, the line
search's one-forward scoring, s^T F s read off CG, and the exact path it must leave
unchanged."""

import math

import pytest
import torch

from metarl import config as C
from metarl import families
from metarl import params as P
from metarl.algorithms import meta_grad
from metarl.bench import Case, run_trpo_paths
from metarl.linalg import cg
from metarl.rl.batch import Trajectories, masked_task_mean
from metarl.rl.sampler import Rollouts
from metarl.rl.trpo import TRPOConfig
from metarl.types import ConfigError

F64 = torch.float64


def setup(share, *, k=1, hidden=(8, 8), rollouts=4, horizon=10, T=3, dtype=F64, **trpo):
    fam = families.make("navigation2d", rollouts=rollouts, hidden=list(hidden), horizon=horizon)
    g = torch.Generator().manual_seed(0)
    theta = P.clone_leaf(fam.init_params(g, torch.device("cpu"), dtype))
    cfg = C.resolve(fam, {"iterations": 1, "device": "cpu", "dtype": str(dtype).split(".")[-1],
                          "inner_steps": k, "meta_batch": T, "family_options": fam.options(),
                          "trpo": {"fisher_subsample": share, **trpo}})
    trpo_opt = fam.make_outer(cfg, theta)
    batch = fam.sample_batch(T, g, dtype=dtype)
    return fam, cfg, theta, trpo_opt, batch


def head(d: Trajectories, n: int) -> Trajectories:
    """The first n episodes of every task, sliced by hand (independent of RLBatch.subsample)."""
    return pick(d, lambda v: v[:, :n])


def strided(d: Trajectories, s: int) -> Trajectories:
    """Every s-th step of every episode, episode e from step e mod s, built by hand with a
    loop (independent of RLBatch.subsample): padding past H is a masked-out copy of step
    H - 1."""
    E, H = d.rollouts.n_episodes, d.rollouts.horizon
    m = -(-H // s)
    cols = [[min(e % s + s * j, H - 1) for j in range(m)] for e in range(E)]
    out = pick(d, lambda v: torch.stack([v[:, e, cols[e]] for e in range(E)], 1))
    valid = torch.tensor([[float(e % s + s * j < H) for j in range(m)] for e in range(E)],
                         dtype=d.rollouts.mask.dtype)
    r = out.rollouts
    roll = Rollouts(obs=r.obs, actions=r.actions, rewards=r.rewards, mask=r.mask * valid,
                    log_probs=r.log_probs, flags=r.flags)
    return Trajectories(roll, out.advantages, out.discounted_rewards, out.values)


def pick(d: Trajectories, f) -> Trajectories:
    r = d.rollouts
    roll = Rollouts(obs=f(r.obs), actions=f(r.actions), rewards=f(r.rewards), mask=f(r.mask),
                    log_probs=f(r.log_probs), flags=r.flags)
    return Trajectories(roll, f(d.advantages), f(d.discounted_rewards), f(d.values))


def test_fisher_subsample_is_checked():
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="fisher_subsample must be in \\(0, 1\\]"):
            TRPOConfig(fisher_subsample=bad)
    assert TRPOConfig().fisher_subsample == 1.0  # the exact path stays the default
    with pytest.raises(ConfigError, match="fisher_unit must be steps or trajectories"):
        TRPOConfig(fisher_unit="episodes")  # type: ignore[arg-type]


def test_subsample_by_trajectories_keeps_the_first_trajectories_of_every_task():
    _, _, theta, _, batch = setup(0.5, rollouts=5)
    d = batch.sample(P.expand(theta, batch.n_tasks))
    s = batch.subsample(d, 0.5, "trajectories")  # ceil(2.5) = 3 of 5
    for a, b in ((s.rollouts.obs, d.rollouts.obs), (s.rollouts.actions, d.rollouts.actions),
                 (s.rollouts.mask, d.rollouts.mask), (s.rollouts.log_probs, d.rollouts.log_probs),
                 (s.advantages, d.advantages), (s.values, d.values),
                 (s.discounted_rewards, d.discounted_rewards)):
        assert a.shape[:2] == (3, 3) and torch.equal(a, b[:, :3])
    assert batch.subsample(d, 1.0, "trajectories") is d
    assert batch.subsample(d, 0.01, "trajectories").rollouts.n_episodes == 1  # at least one
    assert batch.subsample(batch.sample(P.expand(theta, 3)), 0.4,
                           "trajectories").rollouts.n_episodes == 2
    with pytest.raises(ValueError, match="share of trajectories must be in"):
        batch.subsample(d, 0.0)
    with pytest.raises(ValueError, match="unknown subsample unit 'episodes'"):
        batch.subsample(d, 0.5, "episodes")


@pytest.mark.parametrize("share,s", [(0.34, 2), (0.25, 4), (0.1, 10)])
def test_subsample_by_steps_keeps_every_sth_step_staggered_across_trajectories(share, s):
    """H = 10: s = floor(1 / share) divides H or not (padding past H masked out); every
    trajectory stays, trajectory e from step e mod s, so all s phases are covered."""
    _, _, theta, _, batch = setup(share, rollouts=5)
    d = batch.sample(P.expand(theta, batch.n_tasks))
    sub, ref = batch.subsample(d, share), strided(d, s)
    assert sub.rollouts.obs.shape == (3, 5, -(-10 // s), 2)
    for f in ("obs", "actions", "mask", "log_probs", "rewards"):
        assert torch.equal(getattr(sub.rollouts, f), getattr(ref.rollouts, f)), f
    for f in ("advantages", "values", "discounted_rewards"):
        assert torch.equal(getattr(sub, f), getattr(ref, f)), f
    # each kept step once: the masks of the s phases of trajectory e tile its H steps
    kept = sub.rollouts.mask.sum((1, 2))
    assert torch.equal(kept, ref.rollouts.mask.sum((1, 2)))
    assert float(kept.min()) >= 5 * (10 // s) * float(d.rollouts.mask.min())
    assert batch.subsample(d, 1.0) is d and batch.subsample(d, 0.6) is d  # s = 1
    dice = families.make("navigation2d", rollouts=2, hidden=[4], horizon=4, estimator="dice")
    dbatch = dice.sample_batch(1, torch.Generator().manual_seed(0), dtype=F64)
    dd = dbatch.sample(P.expand(P.clone_leaf(dice.init_params(
        torch.Generator().manual_seed(0), torch.device("cpu"), F64)), 1))
    with pytest.raises(ValueError, match="DiCE's inner loss couples the steps"):
        dbatch.subsample(dd, 0.5)
    assert dbatch.subsample(dd, 0.5, "trajectories").rollouts.n_episodes == 1


def test_line_search_score_equals_outer_loss_and_kl_bit_for_bit():
    _, cfg, theta, _, batch = setup(1.0, dtype=torch.float32)
    mg = meta_grad("maml", theta, batch, cfg.inner)
    new = P.add(mg.phi, P.scale(mg.phi, 0.01))
    L, kl = batch.line_search_score(mg.phi, mg.outer_data)(new)
    assert torch.equal(L, batch.outer_loss(new, mg.outer_data))
    assert torch.equal(kl, batch.kl(mg.phi, new, mg.outer_data))


@pytest.mark.parametrize("algo", ["maml", "fomaml"])
def test_line_search_takes_the_old_distribution_from_the_meta_gradients_forward(algo):
    """After a meta-gradient the line search needs no forward of the old policy: it reuses
    the outer loss's distribution at mg.phi, only for that data and those parameters."""
    _, cfg, theta, trpo, batch = setup(1.0, dtype=torch.float32)
    mg = meta_grad(algo, theta, batch, cfg.inner)
    calls = []
    dist = batch.policy.dist
    batch.policy.dist = lambda *a: calls.append(1) or dist(*a)
    new = P.add(mg.phi, P.scale(mg.phi, 0.01))
    remembered = batch.line_search_score(mg.phi, mg.outer_data)
    assert calls == []
    other = batch.outer_data(new)  # other trajectories: the old policy's forward is needed
    moved = P.add(mg.phi, P.scale(mg.phi, 1e-3))  # other parameters: so it is
    for old, data in ((mg.phi, other), (moved, mg.outer_data)):
        calls.clear()
        L, kl = batch.line_search_score(old, data)(new)
        assert len(calls) == 2  # the old policy once, the candidate once
        assert torch.equal(kl, batch.kl(old, new, data))
    batch.policy.dist = dist
    L, kl = remembered(new)
    assert torch.equal(L, batch.outer_loss(new, mg.outer_data))
    assert torch.equal(kl, batch.kl(mg.phi, new, mg.outer_data))


def test_trpo_step_is_the_same_with_or_without_the_remembered_distribution():
    """The exact path's step bit for bit whether the line search reuses the meta-gradient's
    forward or computes the old policy's distribution itself."""
    steps = []
    for forget in (False, True):
        _, cfg, theta, trpo, batch = setup(1.0, dtype=torch.float32)

        def compute(th, b, forget=forget, cfg=cfg):
            mg = meta_grad("maml", th, b, cfg.inner)
            if forget:
                b._scored = None
            return mg

        mg = trpo.step(theta, batch, compute)
        assert mg.extra["trpo/accepted"] == 1.0
        steps.append((P.flatten(P.detach(theta)), mg.extra["trpo/kl"]))
    assert torch.equal(steps[0][0], steps[1][0]) and steps[0][1] == steps[1][1]


@pytest.mark.parametrize("unit", ["trajectories", "steps"])
@pytest.mark.parametrize("k", [1, 2])
def test_subsampled_fisher_is_the_kl_hessian_through_the_adaptation_on_the_subsample(k, unit):
    """The chained J^T F J on the subsample equals the Hessian of the mean KL,
    differentiated through the re-adaptation on hand-sliced trajectories, translated to
    pass through the old adapted policy (so the KL's gradient vanishes at theta)."""
    _, cfg, theta, trpo, batch = setup(0.5, k=k, fisher_unit=unit)
    mg = meta_grad("maml", theta, batch, cfg.inner)
    v = torch.randn(P.n_params(theta), dtype=F64, generator=torch.Generator().manual_seed(1))
    fast = trpo.fisher_vector_product(theta, batch, mg)(v)
    assert float((fast - trpo.direct_fisher_vector_product(theta, batch, mg)(v)).norm()
                 / fast.norm()) < 1e-10
    # by hand: the first 2 of 4 episodes (or every other step) of every inner step's and
    # the outer trajectories
    cut = (lambda d: head(d, 2)) if unit == "trajectories" else (lambda d: strided(d, 2))
    inner, out = [cut(d) for d in mg.inner_data], cut(mg.outer_data)
    th = P.detach(theta, requires_grad=True)
    phi = trpo.readapt(th, batch, inner, True).phi
    phi = {key: p - p.detach() + mg.phi[key] for key, p in phi.items()}
    kl = masked_task_mean(batch.policy.kl(mg.phi, phi, out.rollouts.obs), out.rollouts.mask)
    grad_kl = P.flatten(P.grads(kl.mean(), th, create_graph=True))
    ref = P.flatten(P.grads(grad_kl @ v, th)) + cfg.trpo.damping * v
    assert float((fast - ref).norm() / ref.norm()) < 1e-10
    # and it is not the full batch's Fisher
    full = setup(1.0, k=k)[3].fisher_vector_product(theta, batch, mg)(v)
    assert float((fast - full).norm() / full.norm()) > 1e-3


def test_fast_step_is_the_scaled_solution_of_the_subsampled_fisher_system():
    """With CG run to convergence the step is frac * sqrt(2 max_kl / s^T F s) s with
    s = -F_sub^{-1} g (F_sub dense, from products on basis vectors), s^T F s read off
    CG equals the dense quadratic form, and the accepted KL on every trajectory is within
    the bound."""
    _, cfg, theta, trpo, batch = setup(0.5, hidden=(4, 4), cg_iters=500, damping=1e-3)
    theta0 = P.flatten(P.detach(theta)).clone()
    mg_box = {}

    def compute(th, b):
        mg_box["mg"] = meta_grad("maml", th, b, cfg.inner)
        return mg_box["mg"]

    mg = trpo.step(theta, batch, compute)
    assert mg.extra["trpo/accepted"] == 1.0
    n = P.n_params(theta)
    F = trpo.fisher_vector_product(P.unflatten(theta0, theta), batch, mg)
    dense = torch.stack([F(e) for e in torch.eye(n, dtype=F64)], 1)  # [n, n]
    assert torch.allclose(dense, dense.T, atol=1e-10 * dense.abs().max())
    g = P.flatten(mg.grad)
    s = torch.linalg.solve(dense, -g)
    sFs = float(s @ dense @ s)
    # CG's own s and its s^T F s = -s^T g
    s_cg, _ = cg(lambda u: P.unflatten(F(P.flatten(u)), theta), P.unflatten(-g, theta), 500,
                 per_task=False)
    s_cg = P.flatten(s_cg)
    assert float((s_cg - s).norm() / s.norm()) < 1e-6
    assert float(-(s_cg @ g)) == pytest.approx(sFs, rel=1e-8)
    step = P.flatten(P.detach(theta)) - theta0
    expected = mg.extra["trpo/step_frac"] * math.sqrt(2 * cfg.trpo.max_kl / sFs) * s
    assert float((step - expected).norm() / expected.norm()) < 1e-6
    phi_new = trpo.readapt(P.detach(theta), batch, mg.inner_data, False).phi
    assert float(batch.kl(mg.phi, phi_new, mg.outer_data).mean()) <= cfg.trpo.max_kl


def test_exact_path_takes_the_previous_codes_step_bit_for_bit():
    """fisher_subsample = 1: the same theta as the previous step (the line search scored
    with separate outer_loss and kl calls, s^T F s by one more product)."""
    _, cfg, theta, trpo, batch = setup(1.0, dtype=torch.float32)
    mg = meta_grad("maml", theta, batch, cfg.inner)
    # the previous code's step, written out
    F = trpo.fisher_vector_product(theta, batch, mg)
    s, _ = cg(lambda u: P.unflatten(F(P.flatten(u)), theta), P.scale(P.detach(mg.grad), -1.0),
              cfg.trpo.cg_iters, per_task=False)
    s = P.flatten(s)
    full = s * math.sqrt(2 * cfg.trpo.max_kl / float(s @ F(s)))
    theta0, L0, ref = P.flatten(P.detach(theta)), float(mg.outer_loss.mean()), None
    for i in range(cfg.trpo.ls_steps):
        cand = theta0 + cfg.trpo.ls_backtrack ** i * full
        phi = P.detach(trpo.readapt(P.unflatten(cand, theta), batch, mg.inner_data, False).phi)
        with torch.no_grad():
            L = float(batch.outer_loss(phi, mg.outer_data).mean())
            kl = float(batch.kl(mg.phi, phi, mg.outer_data).mean())
        if L < L0 and kl <= cfg.trpo.max_kl:
            ref = cand
            break
    assert ref is not None
    trpo.step(theta, batch, lambda th, b: mg)
    assert torch.equal(P.flatten(P.detach(theta)), ref)


def test_bench_compares_the_fast_and_exact_paths():
    case = Case(section="rl", algo="maml-trpo", k=1, impl="fast-vs-exact", meta_batch=2,
                repeats=1, warmup=0, options={"family": "navigation2d", "fisher_subsample": 0.5,
                                              "rollouts": 2, "horizon": 5})
    row = run_trpo_paths(case)
    assert (row["family"], row["T"], row["E"], row["H"]) == ("navigation2d", 2, 2, 5)
    assert (row["fisher_subsample"], row["fisher_unit"]) == (0.5, "steps")
    for prefix in ("", "ref_"):
        assert row[f"{prefix}sec_per_iter"] > row[f"{prefix}update_sec"] > 0
        assert row[f"{prefix}pg_equivalents"] == pytest.approx(
            row[f"{prefix}update_sec"] / row[f"{prefix}pg_sec"])
    assert row["speedup"] == pytest.approx(row["ref_sec_per_iter"] / row["sec_per_iter"])


def test_dice_with_a_step_subsample_is_refused_before_training():
    fam = families.make("navigation2d", rollouts=2, hidden=[4], horizon=4, estimator="dice")
    theta = P.clone_leaf(fam.init_params(torch.Generator().manual_seed(0), torch.device("cpu"),
                                         F64))

    def cfg(**trpo):
        return C.resolve(fam, {"iterations": 1, "device": "cpu", "family_options": fam.options(),
                               "trpo": trpo})

    with pytest.raises(ConfigError, match="add --trpo-fisher-unit trajectories"):
        fam.make_outer(cfg(fisher_subsample=0.1), theta)
    fam.make_outer(cfg(fisher_subsample=0.1, fisher_unit="trajectories"), theta)
    fam.make_outer(cfg(), theta)  # the exact path subsamples nothing
