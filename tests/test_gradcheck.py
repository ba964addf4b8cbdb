"""``metarl gradcheck`` says when I + H/lam is indefinite (CG cannot converge there)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from metarl import families
from metarl import params as P
from metarl.algorithms import imaml
from metarl.cli.main import app
from metarl.gradcheck import gradcheck
from metarl.inner import InnerConfig

F64 = torch.float64
# sinusoid with a 61-parameter MLP, 2 tasks, k = 2: lambda_min(H) = -6.1 on one task, so
# lam = 3 leaves I + H/lam indefinite there and lam = 10 makes it positive definite
SETUP = dict(steps=2, n_tasks=2, seed=0, family_options={"hidden": [6, 6]})


def explicit_min_eigs(lam):
    """Smallest eigenvalue of I + H_t/lam per task, H_t formed one task at a time by
    ``torch.autograd.functional.hessian`` at the iMAML phi* that gradcheck sees."""
    fam = families.make("sinusoid", **SETUP["family_options"])
    g = torch.Generator().manual_seed(SETUP["seed"])
    theta = fam.init_params(g, torch.device("cpu"), F64)
    batch = fam.sample_batch(SETUP["n_tasks"], g, split="train", device="cpu", dtype=F64)
    inner = InnerConfig(steps=SETUP["steps"], lr=fam.defaults.train.inner.lr)
    im = imaml.meta_grad(theta, batch, inner, imaml.IMAMLConfig(lam=lam, cg_iters=1))
    data = im.inner_data[-1] if im.inner_data else batch.support
    flat = P.flatten_tasks(im.phi)  # [T, P]
    eigs = []
    for t in range(batch.n_tasks):
        def loss_t(x, t=t):
            rows = [x if i == t else flat[i] for i in range(batch.n_tasks)]
            return batch.inner_loss(P.unflatten_tasks(torch.stack(rows), im.phi), data)[t]

        H = torch.autograd.functional.hessian(loss_t, flat[t])  # [P, P]
        A = torch.eye(H.shape[0], dtype=F64) + H / lam
        eigs.append(float(torch.linalg.eigvalsh(A)[0]))
    return eigs


@pytest.fixture(scope="module", params=[3.0, 10.0], ids=["lam3-indefinite", "lam10-pd"])
def case(request):
    lam = request.param
    res = gradcheck("sinusoid", lam=lam, cg_iters=(1, 100), fd=False, **SETUP)
    return lam, res, explicit_min_eigs(lam)


def test_min_eigenvalue_matches_explicit_matrix(case):
    lam, res, eigs = case
    spec = res["imaml"]
    assert spec["min_eig_T"] == pytest.approx(eigs, rel=1e-9, abs=1e-12)
    assert spec["min_eig"] == pytest.approx(min(eigs), rel=1e-9, abs=1e-12)
    for n in (1, 100):  # every iMAML row reports the min over tasks
        row = res["methods"][f"imaml_cg{n}"]
        assert row["min_eig"] == spec["min_eig"]
        assert row["indefinite"] is (min(eigs) <= 0)
    assert spec["indefinite_tasks"] == sum(e <= 0 for e in eigs)
    # lambda_min(H) = lam (min eig - 1); positive definite iff lam > -lambda_min(H)
    assert spec["hessian_min_eig"] == pytest.approx(lam * (min(eigs) - 1.0), rel=1e-9)
    assert spec["lam_pd"] == pytest.approx(max(0.0, -spec["hessian_min_eig"]))
    assert (lam > spec["lam_pd"]) is (min(eigs) > 0)
    assert "min_eig" not in res["methods"]["maml"]


def test_indefinite_case_is_flagged_and_cg_does_not_converge(case):
    lam, res, eigs = case
    cg100 = res["methods"]["imaml_cg100"]
    if lam == 3.0:
        assert min(eigs) < 0 < max(eigs)  # one task indefinite, the other not
        assert res["imaml"]["indefinite_tasks"] == 1 and cg100["indefinite"] is True
        assert cg100["rel_error"] > 1e-2  # CG stopped at negative curvature
    else:
        assert min(eigs) > 0 and res["imaml"]["indefinite_tasks"] == 0
        assert cg100["indefinite"] is False
        assert cg100["rel_error"] < 1e-8  # positive definite: CG reaches the dense solve


@pytest.mark.parametrize("lam", [3.0, 10.0])
def test_cli_table_json_and_advice(tmp_path, lam):
    path = tmp_path / "g.json"
    r = CliRunner().invoke(app, ["gradcheck", "--steps", "2", "--tasks", "2", "--family-opt",
                                 "hidden=[6,6]", "--cg-iters", "1", "--no-fd", "--lam", str(lam),
                                 "--json", str(path)])
    assert r.exit_code == 0, r.output
    d = json.loads(path.read_text())
    lib = gradcheck("sinusoid", lam=lam, cg_iters=(1,), fd=False, **SETUP)
    assert d["imaml"]["min_eig_T"] == pytest.approx(lib["imaml"]["min_eig_T"], rel=1e-12)
    assert d["imaml"]["lam_pd"] == pytest.approx(lib["imaml"]["lam_pd"], rel=1e-12)
    row = d["methods"]["imaml_cg1"]
    assert set(row) == {"rel_error", "cosine", "seconds", "peak_mb", "min_eig", "indefinite"}
    assert set(d["methods"]["maml"]) == {"rel_error", "cosine", "seconds", "peak_mb"}
    imaml_line = next(ln for ln in r.output.splitlines() if "imaml_cg1" in ln)
    advice = f"lam > {d['imaml']['lam_pd']:.3g} (= -lambda_min(H)"
    if lam == 3.0:
        assert row["indefinite"] is True and row["min_eig"] < 0
        assert f"{row['min_eig']:.3g} indefinite" in imaml_line
        assert "not positive definite at lam=3 for 1 of 2 tasks" in r.output
        assert advice in r.output
    else:
        assert row["indefinite"] is False and row["min_eig"] > 0
        assert "indefinite" not in imaml_line and advice not in r.output
