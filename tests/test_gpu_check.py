"""The plumbing of ``make gpu-check`` (scripts/gpu_check.sh and scripts/gpu_report.py),
checked without CUDA: the time-limited steps, the report (table last, full JSON), and
the refusal to run without CUDA unless asked for a dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_report():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "scripts" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_without_cuda_it_stops_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_ALLOW_CPU"}
    env.update(PYTHON=sys.executable, GPU_CHECK_JSON=str(tmp_path / "r.json"))
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sees no CUDA device" in lines[0]
    assert "GPU_CHECK_ALLOW_CPU=1" in lines[0]
    assert not (tmp_path / "r.json").exists()


def test_step_records_status_and_stops_the_whole_process_group(tmp_path, capsys):
    g = gpu_report()
    steps = tmp_path / "steps.json"
    assert g.step("ok", 30, steps, [sys.executable, "-c", "print('hello')"]) == 0
    assert g.step("fails", 30, steps, [sys.executable, "-c", "raise SystemExit(3)"]) == 1
    # a child that starts a grandchild which would outlive a plain kill of the child
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid)); "
            "time.sleep(60)")
    t0 = time.monotonic()
    assert g.step("slow", 2, steps, [sys.executable, "-c", code, str(pid_file)]) == 1
    assert time.monotonic() - t0 < 20
    record = json.loads(steps.read_text())
    assert record["ok"]["status"] == "ok" and record["fails"]["status"] == "exit 3"
    assert record["slow"]["status"] == "timed out after 2s"
    out = capsys.readouterr().out
    assert "[ok] hello" in out and "== slow: timed out after 2s" in out
    grandchild = Path(f"/proc/{int(pid_file.read_text())}/status")
    time.sleep(0.5)
    if grandchild.exists():  # gone, or a zombie waiting for whoever inherited it to reap it
        state = next(ln for ln in grandchild.read_text().splitlines() if ln.startswith("State"))
        assert "zombie" in state, state


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest"
 errors="0" failures="1" skipped="1" tests="4"><testcase classname="tests.test_gpu" name="a"/>
<testcase classname="tests.test_gpu" name="b"/><testcase classname="tests.test_gpu" name="c">
<failure message="assert 1 == 2">trace</failure></testcase><testcase classname="tests.test_gpu"
 name="d"><skipped message="needs CUDA"/></testcase></testsuite></testsuites>"""


def test_report_prints_the_table_last_and_writes_everything(tmp_path, capsys):
    g = gpu_report()
    (tmp_path / "tests.xml").write_text(JUNIT)
    (tmp_path / "steps.json").write_text(json.dumps(
        {"install": {"status": "ok", "seconds": 20.0},
         "bench-rl": {"status": "timed out after 9s", "seconds": 9.0}}))
    sin = [{"algo": "maml", "k": 5, "impl": impl, "sec_per_iter": s, "peak_mb": 1.0}
           for impl, s in (("batched", 0.0031), ("loop", 0.04))]
    om = [{"algo": "maml", "k": 1, "impl": impl, "sec_per_iter": s, "peak_mb": 1.0}
          for impl, s in (("batched", 0.05), ("chunked-4", 0.06), ("loop", 0.09))]
    rl = [{"algo": "sampler", "impl": "tensor", "T": 20, "E": 20, "H": 100,
           "sec_per_iter": 0.01, "env_steps_per_sec": 4.0e6},
          {"algo": "maml", "impl": "batched", "T": 20, "sec_per_iter": 0.2}]
    for name, rows in (("sinusoid", sin), ("omniglot", om), ("rl", rl)):
        (tmp_path / f"bench-{name}.json").write_text(json.dumps({"machine": {"device": "cpu"},
                                                                 name: rows}))
    (tmp_path / "graphs.json").write_text(json.dumps({"eager_ms": 3.1, "graph_ms": 1.4,
                                                      "graph_under_2ms": True}))
    out = tmp_path / "gpu-check.json"
    rc = g.report(out, tmp_path / "steps.json", tmp_path / "tests.xml",
                  sorted(tmp_path.glob("bench-*.json")), tmp_path / "graphs.json")
    assert rc == 1  # a failed test and a step that ran out of time
    result = json.loads(out.read_text())
    assert set(result) == {"machine", "steps", "tests", "bench", "cuda_graphs"}
    assert result["tests"]["passed"] == 2 and result["tests"]["failed"][0]["test"].endswith("::c")
    assert set(result["bench"]) == {"machine", "sinusoid", "omniglot", "rl"}
    text = capsys.readouterr().out.strip().splitlines()
    table = "\n".join(text)
    assert "2 passed, 1 failed, 1 skipped" in table
    assert "3.10 ms batched, 40.00 ms loop" in table
    assert "3.10 ms / 1.40 ms (< 2 ms)" in table
    assert "50.00 ms grouped, 90.00 ms loop" in table
    assert "4,000,000 env-steps/s" in table and "200.00 ms" in table
    assert text[-1].split()[0] == "steps" and "bench-rl (timed out after 9s)" in text[-1]


def test_synthetic_omniglot_loads_as_omniglot(tmp_path, monkeypatch):
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "cache"))
    gpu_report().synthetic_omniglot(tmp_path / "data", alphabets=2, chars=4, drawers=20)
    from metarl import families

    fam = families.make("omniglot", data=str(tmp_path / "data"))
    import torch

    batch = fam.sample_batch(2, torch.Generator().manual_seed(0))
    assert batch.support.x.shape == (2, 5, 1, 28, 28) and batch.query.x.shape == (2, 75, 1, 28, 28)
