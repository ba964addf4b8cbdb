"""Returns, GAE, normalisation, the linear feature baseline and the policies' math,
checked against plain-loop / numpy / torch.distributions references in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metarl.params import expand
from metarl.rl.baseline import LinearFeatureBaseline
from metarl.rl.policies import CategoricalMLPPolicy, GaussianMLPPolicy
from metarl.rl.returns import discounted_returns, gae, normalize

T, E, H = 3, 4, 17


def _data(seed=0, obs_dim=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, H + 1, (T, E), generator=g)  # [T, E]
    lengths[0, 0] = H  # at least one full episode
    mask = (torch.arange(H) < lengths.unsqueeze(-1)).double()  # [T, E, H]
    rewards = torch.randn(T, E, H, generator=g, dtype=torch.float64) * mask
    values = torch.randn(T, E, H, generator=g, dtype=torch.float64)
    obs = torch.randn(T, E, H, obs_dim, generator=g, dtype=torch.float64) * 4
    return rewards, values, mask, lengths, obs


def _loop_returns(rewards, lengths, gamma):
    out = torch.zeros_like(rewards)
    for t in range(T):
        for e in range(E):
            acc = 0.0
            for h in reversed(range(int(lengths[t, e]))):
                acc = float(rewards[t, e, h]) + gamma * acc
                out[t, e, h] = acc
    return out


def _loop_gae(rewards, values, lengths, gamma, lam):
    out = torch.zeros_like(rewards)
    for t in range(T):
        for e in range(E):
            n = int(lengths[t, e])
            acc = 0.0
            for h in reversed(range(n)):
                v_next = float(values[t, e, h + 1]) if h + 1 < n else 0.0
                delta = float(rewards[t, e, h]) + gamma * v_next - float(values[t, e, h])
                acc = delta + gamma * lam * acc
                out[t, e, h] = acc
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.9, 0.99, 1.0])
def test_discounted_returns_by_hand(gamma):
    rewards, _, mask, lengths, _ = _data()
    got = discounted_returns(rewards, mask, gamma)
    torch.testing.assert_close(got, _loop_returns(rewards, lengths, gamma), rtol=1e-12, atol=1e-12)


def test_discounted_returns_ignores_rewards_after_the_end():
    rewards, _, mask, lengths, _ = _data()
    noisy = rewards + 100.0 * (1 - mask)
    torch.testing.assert_close(discounted_returns(noisy, mask, 0.99),
                               discounted_returns(rewards, mask, 0.99))


@pytest.mark.parametrize("gamma, lam", [(0.99, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae_by_hand(gamma, lam):
    rewards, values, mask, lengths, _ = _data(1)
    got = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(got, _loop_gae(rewards, values, lengths, gamma, lam),
                               rtol=1e-10, atol=1e-10)


def test_gae_lambda_one_is_returns_minus_values():
    rewards, values, mask, _, _ = _data(2)
    adv = gae(rewards, values, mask, 0.97, 1.0)
    torch.testing.assert_close(adv + values * mask, discounted_returns(rewards, mask, 0.97),
                               rtol=1e-10, atol=1e-10)


def test_shape_and_range_errors():
    rewards, values, mask, _, _ = _data()
    with pytest.raises(ValueError, match="expected"):
        gae(rewards, values[:, :, :-1], mask, 0.99, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(rewards, mask, 1.5)


@pytest.mark.parametrize("per_task", [True, False])
def test_normalize_statistics(per_task):
    rewards, _, mask, _, _ = _data(3)
    adv = rewards * 5 + torch.arange(T, dtype=torch.float64).reshape(T, 1, 1) * 10
    out = normalize(adv, mask, per_task=per_task)
    assert torch.all(out[mask == 0] == 0)
    groups = [mask[t] == 1 for t in range(T)] if per_task else [mask == 1]
    for t, valid in enumerate(groups):
        x = out[t][valid] if per_task else out[valid]
        ref = (adv[t][valid] if per_task else adv[valid]).numpy()
        assert abs(float(x.mean())) < 1e-10
        assert float(x.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(x.numpy(), (ref - ref.mean()) / (ref.std() + 1e-8), rtol=1e-10)


def _numpy_baseline(obs, returns, lengths, reg):
    """rllab's LinearFeatureBaseline, one task at a time."""
    values = np.zeros(returns.shape)
    for t in range(T):
        feats, targets = [], []
        for e in range(E):
            n = int(lengths[t, e])
            o = np.clip(obs[t, e, :n], -10, 10)
            al = np.arange(n).reshape(-1, 1) / 100.0
            feats.append(np.concatenate([o, o**2, al, al**2, al**3, np.ones((n, 1))], axis=1))
            targets.append(returns[t, e, :n])
        f, y = np.concatenate(feats), np.concatenate(targets)
        w = np.linalg.lstsq(f.T @ f + reg * np.eye(f.shape[1]), f.T @ y, rcond=None)[0]
        for e in range(E):
            n = int(lengths[t, e])
            values[t, e, :n] = feats[e] @ w
    return values


def test_linear_baseline_matches_per_task_numpy_ridge():
    rewards, _, mask, lengths, obs = _data(4)
    obs[0, 0, 0, 0] = 50.0  # exercises the clip at 10
    returns = discounted_returns(rewards, mask, 0.99)
    bl = LinearFeatureBaseline()
    values = bl.fit_predict(obs, returns, mask)
    assert values.shape == (T, E, H) and torch.all(values[mask == 0] == 0)
    ref = _numpy_baseline(obs.numpy(), returns.numpy(), lengths, 1e-5)
    np.testing.assert_allclose(values.numpy(), ref, rtol=1e-7, atol=1e-8)
    # float32 inputs: values in float32, still the float64 solution
    v32 = bl.fit_predict(obs.float(), returns.float(), mask.float())
    assert v32.dtype == torch.float32
    np.testing.assert_allclose(v32.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_linear_baseline_fit_predict_is_fit_then_predict_bitwise():
    rewards, _, mask, _, obs = _data(6)
    returns = discounted_returns(rewards, mask, 0.99)
    bl = LinearFeatureBaseline()
    for o, r, m in ((obs, returns, mask), (obs.float(), returns.float(), mask.float())):
        assert torch.equal(bl.fit_predict(o, r, m), bl.predict(o, bl.fit(o, r, m), m))
    with pytest.raises(ValueError, match="must have shape"):
        bl.fit_predict(obs, returns[:, :, :-1], mask)


def test_linear_baseline_failed_task_is_isolated():
    rewards, _, mask, _, obs = _data(5)
    returns = discounted_returns(rewards, mask, 0.99)
    obs[1] = float("nan")  # task 1's system is never solvable; task 0 and 2 are unaffected
    coeffs = LinearFeatureBaseline(max_tries=3).fit(obs, returns, mask)
    assert torch.all(coeffs[1] == 0) and torch.isfinite(coeffs).all()
    good = [0, 2]
    clean = LinearFeatureBaseline().fit(obs[good], returns[good], mask[good])
    torch.testing.assert_close(coeffs[good], clean)


def _policy_params(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = policy.init(g, dtype=torch.float64)
    return {k: v + 0.1 * torch.randn(T, *v.shape, dtype=torch.float64, generator=g)
            for k, v in params.items()}  # distinct parameters per task


def test_gaussian_policy_matches_torch_normal_per_task():
    pol = GaussianMLPPolicy(3, 2, hidden=(8, 8), init_std=0.7)
    theta = pol.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    expected_log_std = torch.full((2,), math.log(0.7), dtype=torch.float64)
    torch.testing.assert_close(theta["log_std"], expected_log_std)
    params_T = _policy_params(pol)
    _, _, _, _, obs = _data(6)  # [T, E, H, 3]
    d = pol.dist(params_T, obs)
    act = d.sample(torch.Generator().manual_seed(1))
    assert d.mean.shape == act.shape == (T, E, H, 2)
    assert d.log_prob(act).shape == d.entropy().shape == (T, E, H)
    for t in range(T):
        one = {k: v[t:t + 1] for k, v in params_T.items()}
        mean_t = pol.dist(one, obs[t:t + 1].reshape(1, -1, 3)).mean.reshape(E, H, 2)
        torch.testing.assert_close(d.mean[t], mean_t)  # batched == one task at a time
        ref = torch.distributions.Normal(mean_t, params_T["log_std"][t].exp())
        torch.testing.assert_close(d.log_prob(act)[t], ref.log_prob(act[t]).sum(-1))
        torch.testing.assert_close(d.entropy()[t], ref.entropy().sum(-1))


def test_gaussian_std_floor():
    """With ``min_std`` the std is ``min_std + exp(log_std)``: it starts at ``init_std``, never
    goes below the floor, the distribution is that Normal, and the parameter maps back."""
    pol = GaussianMLPPolicy(3, 2, hidden=(8,), init_std=0.7, min_std=0.2)
    theta = pol.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    F64 = torch.float64
    torch.testing.assert_close(theta["log_std"], torch.full((2,), math.log(0.5), dtype=F64))
    params_T = _policy_params(pol)
    params_T["log_std"] = torch.tensor([[-30.0, 0.3], [-1.0, 2.0], [0.0, -5.0]], dtype=F64)
    _, _, _, _, obs = _data(10)
    d = pol.dist(params_T, obs)
    std = 0.2 + params_T["log_std"].exp()  # [T, act]
    assert float(d.std.min()) >= 0.2 and abs(float(d.std[0, 0, 0, 0]) - 0.2) < 1e-12
    act = d.sample(torch.Generator().manual_seed(2))
    for t in range(T):
        ref = torch.distributions.Normal(d.mean[t], std[t])
        torch.testing.assert_close(d.log_prob(act)[t], ref.log_prob(act[t]).sum(-1))
        torch.testing.assert_close(d.entropy()[t], ref.entropy().sum(-1))
    raw = params_T["log_std"][1:]
    torch.testing.assert_close(pol.param_log_std(pol.std_log(raw)), raw)
    with pytest.raises(ValueError, match="not above the policy's min_std=0.2"):
        pol.param_log_std(torch.tensor([math.log(0.2)], dtype=torch.float64))
    free = GaussianMLPPolicy(3, 2, init_std=0.7)  # no floor: the parameter is the log-std
    assert free.std_log(raw) is raw and free.param_log_std(raw) is raw
    with pytest.raises(ValueError, match=r"min_std must be in \[0, init_std=0.7\)"):
        GaussianMLPPolicy(3, 2, init_std=0.7, min_std=0.7)


def test_gaussian_kl_closed_form_and_gradients():
    pol = GaussianMLPPolicy(3, 2, hidden=(8,))
    old = _policy_params(pol, 0)
    new = {k: v.detach().clone().requires_grad_(True) for k, v in _policy_params(pol, 1).items()}
    _, _, _, _, obs = _data(7)
    kl = pol.kl(old, new, obs)  # [T, E, H]
    assert kl.shape == (T, E, H)
    d_old, d_new = pol.dist(old, obs), pol.dist(new, obs)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(d_old.mean, d_old.std.expand_as(d_old.mean)),
        torch.distributions.Normal(d_new.mean, d_new.std.expand_as(d_new.mean))).sum(-1)
    torch.testing.assert_close(kl, ref)
    kl.sum().backward()
    assert all(new[k].grad is not None and new[k].grad.abs().sum() > 0 for k in new)
    # at new == old: KL 0 and zero gradient
    same = {k: v.detach().clone().requires_grad_(True) for k, v in old.items()}
    kl0 = pol.kl(old, same, obs)
    assert float(kl0.detach().abs().max()) < 1e-12
    g = torch.autograd.grad(kl0.sum(), list(same.values()))
    assert max(float(x.abs().max()) for x in g) < 1e-10


def test_gaussian_kl_does_not_differentiate_the_old_policy():
    pol = GaussianMLPPolicy(3, 2, hidden=(8,))
    theta = pol.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = {k: v.requires_grad_(True) for k, v in theta.items()}
    params_T = expand(theta, T)
    _, _, _, _, obs = _data(8)
    kl = pol.kl(params_T, params_T, obs)
    (g,) = torch.autograd.grad(kl.sum(), [theta["l0.w"]], create_graph=True)
    assert float(g.detach().abs().max()) < 1e-10  # gradient of KL(sg(pi) || pi) at pi is 0
    # ... but its Hessian (the Fisher information, used by TRPO) is not
    (fv,) = torch.autograd.grad((g * torch.ones_like(g)).sum(), [theta["l0.w"]])
    assert float(fv.abs().max()) > 1e-6


def test_categorical_policy_matches_torch():
    pol = CategoricalMLPPolicy(3, 4, hidden=(8,))
    params_T = _policy_params(pol)
    _, _, _, _, obs = _data(9)
    d = pol.dist(params_T, obs)
    act = d.sample(torch.Generator().manual_seed(0))
    assert act.shape == (T, E, H) and act.dtype == torch.long
    logits = pol._forward(params_T, obs)
    ref = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(d.log_prob(act), ref.log_prob(act))
    torch.testing.assert_close(d.entropy(), ref.entropy())
    other = pol.dist(_policy_params(pol, 3), obs)
    ref_o = torch.distributions.Categorical(logits=other.logits)
    torch.testing.assert_close(d.kl(other), torch.distributions.kl_divergence(ref, ref_o))
    assert act.min() >= 0 and act.max() < 4


def test_policy_input_errors():
    pol = GaussianMLPPolicy(3, 2)
    params_T = expand(pol.init(torch.Generator().manual_seed(0)), 2)
    with pytest.raises(ValueError, match="obs_dim=3"):
        pol.dist(params_T, torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="T=2"):
        pol.dist(params_T, torch.zeros(3, 5, 3))
    with pytest.raises(ValueError, match="init_std"):
        GaussianMLPPolicy(3, 2, init_std=0.0)
    with pytest.raises(ValueError, match="activation"):
        GaussianMLPPolicy(3, 2, activation="gelu")
