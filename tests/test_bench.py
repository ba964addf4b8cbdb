"""``metarl bench``: every section runs end to end through the command line (``--tiny``:
toy sizes, each case still in its own process) and reports finite, positive timings."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from metarl import bench
from metarl.cli import bench as cli_bench
from metarl.cli.main import app

TIMINGS = ("sec_per_iter", "env_steps_per_sec", "raw_mj_step_per_sec")
KEYS = {  # (section, algo) -> the keys of its rows
    ("sinusoid", "maml"): {"algo", "k", "impl", "sec_per_iter", "peak_mb"},
    ("rl", "sampler"): {"algo", "impl", "T", "E", "H", "sec_per_iter", "env_steps_per_sec"},
    ("rl", "maml"): {"algo", "impl", "T", "E", "H", "sec_per_iter", "peak_mb", "outer", "k"},
    ("omniglot", "maml"): {"algo", "k", "impl", "sec_per_iter", "peak_mb"},
    ("locomotion", "sampler"): {"algo", "impl", "T", "E", "H", "sec_per_iter",
                                "env_steps_per_sec", "raw_mj_step_per_sec", "overhead"},
    ("metaworld", "sampler"): {"algo", "impl", "T", "E", "H", "sec_per_iter",
                               "env_steps_per_sec", "bare_metaworld_steps_per_sec", "overhead"},
    ("distributed", "maml"): {"algo", "impl", "family", "T", "procs", "params",
                              "sec_per_iter_1", "sec_per_iter_n", "speedup", "sample_sec_1",
                              "sample_sec_n", "collectives_per_iter", "collective_bytes_per_iter",
                              "collective_sec_per_iter"},
}


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "cache"))  # never ~/.cache
    monkeypatch.delenv("METARL_OMNIGLOT", raising=False)


def tiny_omniglot(root):
    """5 characters x 20 drawings in the official layout: 4 meta-train characters, 16
    classes with rotations, enough for 5-way tasks."""
    rng = np.random.default_rng(0)
    for c in range(1, 6):
        folder = root / "images_background" / "Alpha" / f"character{c:02d}"
        folder.mkdir(parents=True)
        for d in range(1, 21):
            a = np.ones((105, 105), dtype=bool)
            r, col = rng.integers(0, 80, size=2)
            a[r:r + 20, col:col + 20] = False  # one ink block
            Image.fromarray(a).save(folder / f"{c:04d}_{d:02d}.png")
    return root


def run_section(name, tmp_path, *extra):
    path = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "--tiny", "--section", name, "--json", str(path),
                                 *map(str, extra)])
    assert r.exit_code == 0, r.output
    assert f"bench: {name}" in r.output
    d = json.loads(path.read_text())
    assert set(d) == {"machine", name} and d["machine"]["device"] == "cpu"
    return d[name]


def check_rows(name, rows, expected_algos):
    assert [r["algo"] for r in rows] == expected_algos
    for r in rows:
        assert "error" not in r, r
        assert set(r) == KEYS[name, r["algo"]], r
        for key in TIMINGS:
            if key in r:
                assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        if "peak_mb" in r:
            assert math.isfinite(r["peak_mb"]) and r["peak_mb"] > 0, r
        if "env_steps_per_sec" in r:  # T x E x H steps in sec_per_iter seconds
            steps = r["T"] * r["E"] * r["H"]
            assert r["env_steps_per_sec"] == pytest.approx(steps / r["sec_per_iter"])


def test_sinusoid_section(tmp_path):
    rows = run_section("sinusoid", tmp_path)
    check_rows("sinusoid", rows, ["maml"])
    assert (rows[0]["k"], rows[0]["impl"]) == (1, "batched")


def test_rl_section(tmp_path):
    rows = run_section("rl", tmp_path)
    check_rows("rl", rows, ["sampler", "maml"])
    assert all((r["T"], r["E"], r["H"]) == (2, 2, 5) for r in rows)
    assert rows[1]["outer"] == "trpo"


def test_omniglot_section(tmp_path):
    data = tiny_omniglot(tmp_path / "omniglot")
    rows = run_section("omniglot", tmp_path, "--data", data)
    check_rows("omniglot", rows, ["maml"])
    assert rows[0]["impl"] == "chunked-1"


def test_locomotion_section(tmp_path):
    pytest.importorskip("mujoco")
    rows = run_section("locomotion", tmp_path)
    check_rows("locomotion", rows, ["sampler"])
    r = rows[0]
    assert r["impl"] == "in-process" and r["overhead"] == pytest.approx(
        r["raw_mj_step_per_sec"] / r["env_steps_per_sec"] - 1.0)


def mlp_params(n_in, hidden, n_out):
    """Weights and biases of an MLP n_in -> hidden -> n_out."""
    sizes = [n_in, *hidden, n_out]
    return sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))


def test_distributed_section(tmp_path):
    import importlib.util

    rows = run_section("distributed", tmp_path)
    names = ["sinusoid", "navigation2d"]
    if importlib.util.find_spec("mujoco") is not None:
        names.append("halfcheetah-vel")
    check_rows("distributed", rows, ["maml"] * len(names))
    assert [r["family"] for r in rows] == names
    for r in rows:
        assert (r["procs"], r["T"]) == (2, 2), r  # one task per rank
        for key in ("sec_per_iter_1", "sec_per_iter_n", "speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["speedup"] == pytest.approx(r["sec_per_iter_1"] / r["sec_per_iter_n"])
        assert r["collective_bytes_per_iter"] > 0 and r["collective_sec_per_iter"] >= 0
    sin, *trpo = rows
    # one task per rank, float32 rows. Sinusoid, MAML + Adam: one all-gather of the task's
    # meta-gradient
    n = mlp_params(1, [8, 8], 1)
    assert sin["params"] == n
    assert (sin["collectives_per_iter"], sin["collective_bytes_per_iter"]) == (1, 4 * n)
    # MAML-TRPO (2 CG iterations, 2 line-search steps): the task's meta-gradient, the task
    # counts (one int64), its rows of the 2 Fisher-vector products and of s^T F s, its loss
    # at theta, its loss and KL of each line-search candidate
    spaces = {"navigation2d": (2, 2), "halfcheetah-vel": (17, 6)}
    for r in trpo:
        obs, act = spaces[r["family"]]
        assert r["params"] == mlp_params(obs, [8, 8], act) + act  # + the log-std
        candidates = r["collectives_per_iter"] - 6
        assert candidates in (1, 2), r
        assert r["collective_bytes_per_iter"] == 4 * 4 * r["params"] + 8 + 4 + 8 * candidates


def test_distributed_cases():
    pytest.importorskip("mujoco")  # halfcheetah-vel's case
    tiny, quick, full = (list(bench.distributed_cases("cpu", s)) for s in ("tiny", "quick", "full"))
    assert len(tiny) == len(quick) == len(full)
    assert all(c.repeats == 1 and c.warmup == 0 and c.meta_batch == 2 for c in tiny)
    assert all(c.repeats > 1 and c.options["procs"] == 2 for c in quick + full)
    assert {c.options["family"]: c.meta_batch for c in full} == {
        "sinusoid": 25, "navigation2d": 20, "halfcheetah-vel": 40}
    assert [c.meta_batch for c in quick] == [25, 20, 8]
    assert full[1].options["family_options"] == {"hidden": [100, 100]}  # the paper's policy
    assert list(bench.distributed_cases("cuda", "full")) == []  # gloo ranks on the CPU only


def test_metaworld_section(tmp_path):
    pytest.importorskip("metaworld")
    rows = run_section("metaworld", tmp_path)
    check_rows("metaworld", rows, ["sampler"])
    r = rows[0]
    assert (r["impl"], r["T"], r["E"], r["H"]) == ("in-process", 1, 2, 5)
    assert r["overhead"] == pytest.approx(
        r["bare_metaworld_steps_per_sec"] / r["env_steps_per_sec"] - 1.0)


def test_omniglot_without_data_is_skipped_with_a_message(tmp_path):
    r = CliRunner().invoke(app, ["bench", "--tiny", "--section", "omniglot"])
    assert r.exit_code == 0 and "bench omniglot: skipped (no data" in r.output


def test_a_failed_case_fails_the_command(tmp_path, monkeypatch):
    def failing(case, timeout=900):
        return {"algo": case.algo, "k": case.k, "impl": case.impl, "error": "RuntimeError: boom"}

    monkeypatch.setattr(cli_bench, "run_in_subprocess", failing)
    path = tmp_path / "b.json"
    r = CliRunner().invoke(app, ["bench", "--tiny", "--section", "sinusoid", "--json", str(path)])
    assert r.exit_code == 1
    assert "bench sinusoid: maml batched failed: RuntimeError: boom" in r.output
    assert json.loads(path.read_text())["sinusoid"][0]["error"] == "RuntimeError: boom"


@pytest.mark.parametrize("name, n_tiny", [("sinusoid", 1), ("rl", 2), ("omniglot", 1),
                                          ("locomotion", 1)])
def test_scales_shrink_the_case_lists(name, n_tiny):
    make_cases, _ = bench.SECTIONS[name]
    extra = ("data",) if name == "omniglot" else ()
    full, quick, tiny = (list(make_cases("cpu", s, *extra)) for s in ("full", "quick", "tiny"))
    assert len(tiny) == n_tiny < len(quick) <= len(full)
    assert all(c.repeats == 1 and c.warmup == 0 and c.meta_batch <= 2 for c in tiny)
    assert all(c.repeats > 1 for c in quick + full)


def test_threads_section_measures_the_automatic_count_beside_a_busy_process(tmp_path):
    """The tiny case runs the automatic policy with a spinning process beside it: the row
    names the policy, the count it chose and the load it measured (about one CPU)."""
    rows = run_section("threads", tmp_path)
    assert len(rows) == 1 and "error" not in rows[0], rows
    r = rows[0]
    assert (r["workload"], r["load"], r["policy"]) == ("sinusoid", "busy", "auto")
    assert r["sec_per_iter"] > 0 and r["threads"] >= 1 and r["chosen"]
    assert r["others"] is not None and r["others"] > 0.5
    full = list(bench.threads_cases("cpu", "full"))
    assert {(c.impl, c.options["policy"]) for c in full} == {
        ("loop", "one"), ("batched", "one"), ("batched", "torch-default"), ("batched", "auto")}
