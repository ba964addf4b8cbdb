"""Helpers of ``scripts/gpu_check.sh``: synthetic Omniglot data, the CUDA-graph timing of
the sinusoid MAML meta-iteration, and the final report (a short table and the full JSON).

    python scripts/gpu_report.py omniglot DIR        # Omniglot-shaped images for the bench
    python scripts/gpu_report.py graphs OUT.json     # eager vs CUDA-graph meta-iteration
    python scripts/gpu_report.py report OUT.json --steps STEPS.json --junit TESTS.xml \
        --graphs GRAPHS.json --bench BENCH-SECTION.json...
    python scripts/gpu_report.py step NAME SECONDS STEPS.json -- COMMAND...

The bench's Omniglot rows time the conv-4 on images of Omniglot's shape (28x28 after
resizing); the pixels do not change the arithmetic, so synthetic characters in the
official layout stand in where the data set is not on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def synthetic_omniglot(root: Path, alphabets: int = 4, chars: int = 10, drawers: int = 20) -> None:
    """``root/images_background/<Alphabet>/characterNN/<id>_<drawer>.png``, 105x105 mode-1
    images with a few ink blocks each (as tests/tasks/test_omniglot_data.py draws them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    char_id = 1
    for a in range(alphabets):
        for c in range(1, chars + 1):
            folder = root / "images_background" / f"Alphabet{a}" / f"character{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for d in range(1, drawers + 1):
                img = np.ones((105, 105), dtype=bool)
                for _ in range(3):
                    r, col = rng.integers(0, 75, size=2)
                    h, w = rng.integers(5, 30, size=2)
                    img[r:r + h, col:col + w] = False
                Image.fromarray(img).save(folder / f"{char_id:04d}_{d:02d}.png")
            char_id += 1


def graphs(device_name: str, repeats: int = 50) -> dict[str, Any]:
    """Sinusoid MAML meta-iteration (meta-batch 25, k = 5, the paper's MLP, Adam): eager
    (as ``metarl train`` runs it) against the same iteration captured once in a CUDA graph
    and replayed. Milliseconds are medians over ``repeats`` iterations, each timed with
    CUDA events. The graph skips the finiteness check (a host read cannot be captured)."""
    import torch

    from metarl import params as P
    from metarl.algorithms import maml
    from metarl.inner import InnerConfig
    from metarl.outer import GradientOuter
    from metarl.tasks.sinusoid import SinusoidFamily

    dev = torch.device(device_name)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # as the bench runs its cases
    fam = SinusoidFamily()
    g = torch.Generator().manual_seed(0)
    inner = InnerConfig(steps=5, lr=0.01)
    out: dict[str, Any] = {"case": "sinusoid MAML, meta-batch 25, k=5, 1-40-40-1 MLP, Adam",
                           "device": str(dev), "repeats": repeats}

    def timed(step: Any) -> float:
        if dev.type != "cuda":
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            return 1e3 * statistics.median(times)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    theta = P.clone_leaf(fam.init_params(g, dev, torch.float32))
    batch = fam.sample_batch(25, g, device=dev)
    outer = GradientOuter(theta, "adam", 1e-3)

    def eager() -> None:
        outer.step(theta, batch, lambda th, b: maml.meta_grad(th, b, inner))

    for _ in range(5):
        eager()
    out["eager_ms"] = timed(eager)
    if dev.type != "cuda":
        out["graph_ms"] = None
        out["graph_error"] = "CUDA graphs need CUDA"
        return out
    try:
        theta_g = P.clone_leaf(fam.init_params(torch.Generator().manual_seed(0), dev,
                                               torch.float32))
        opt = torch.optim.Adam(list(theta_g.values()), lr=1e-3, capturable=True)

        def step() -> None:
            mg = maml.meta_grad(theta_g, batch, inner)
            for k, p in theta_g.items():
                p.grad = mg.grad[k]
            opt.step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(5):
            graph.replay()
        out["graph_ms"] = timed(graph.replay)
        out["graph_finite"] = all(bool(torch.isfinite(v).all()) for v in theta_g.values())
        out["graph_under_2ms"] = out["graph_ms"] < 2.0
    except Exception as e:  # report, do not fail the check: capture is an experiment
        out["graph_ms"] = None
        out["graph_error"] = f"{type(e).__name__}: {e}"[:500]
    return out


def step(name: str, limit: float, steps: Path, cmd: list[str]) -> int:
    """Run ``cmd`` with its output prefixed by ``[name]``, in a process group of its own
    that is stopped whole (the bench's case processes too) after ``limit`` seconds; record
    ``{"status", "seconds"}`` under ``name`` in ``steps``. Returns the exit code."""
    import os
    import signal
    import subprocess
    import threading

    print(f"== {name} (at most {limit:.0f}s): {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            if proc.poll() is None and wait:
                time.sleep(wait)

    timer = threading.Timer(limit, stop)
    timer.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[{name}] {line}", end="", flush=True)
    rc = proc.wait()
    timer.cancel()
    status = f"timed out after {limit:.0f}s" if timed_out.is_set() else \
        "ok" if rc == 0 else f"exit {rc}"
    record = json.loads(steps.read_text()) if steps.exists() else {}
    record[name] = {"status": status, "seconds": round(time.monotonic() - start, 1)}
    steps.write_text(json.dumps(record, indent=2) + "\n")
    print(f"== {name}: {status}", flush=True)
    return 0 if status == "ok" else 1


def merge_bench(paths: list[Path]) -> dict[str, Any]:
    """One bench result from the per-section JSON files (``machine`` from the first)."""
    merged: dict[str, Any] = {}
    for p in paths:
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            merged.setdefault("errors", []).append(f"{p.name}: {type(e).__name__}")
            continue
        for k, v in d.items():
            merged.setdefault(k, v)
    return merged


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and failed test ids of a pytest junit XML file."""
    if not path.exists():
        return {"error": f"{path} not written (the test step did not finish)"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                                     "skipped")}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            failed.append({"test": name, "message": (node.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            skipped.append({"test": name, "reason": (case.find("skipped").get("message")
                                                     or "")[:200]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skipped_tests": skipped}


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    for name in ("numpy", "gymnasium", "mujoco", "stable_baselines3"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # a missing or broken package is a finding
            info[name] = f"missing ({type(e).__name__})"
    return info


def _rows(bench: dict[str, Any], section: str) -> list[dict[str, Any]]:
    rows = bench.get(section)
    return rows if isinstance(rows, list) else []


def _ms(row: dict[str, Any] | None) -> str:
    if not row:
        return "-"
    if "error" in row:
        return "error"
    return f"{1e3 * row['sec_per_iter']:.2f} ms"


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The short table's (what, value) lines."""
    m, t, b, g = (result.get(k) or {} for k in ("machine", "tests", "bench", "cuda_graphs"))
    lines = [("device", m.get("gpu", "no CUDA (dry run on CPU)")), ("torch", m.get("torch", "?"))]
    if "error" in t:
        lines.append(("gpu tests", t["error"]))
    elif t:
        lines.append(("gpu tests", f"{t['passed']} passed, {t['failures'] + t['errors']} failed, "
                                   f"{t['skipped']} skipped"))
    sin, om, rl = _rows(b, "sinusoid"), _rows(b, "omniglot"), _rows(b, "rl")
    lines.append(("sinusoid MAML T=25 k=5",
                  f"{_ms(_find(sin, algo='maml', k=5, impl='batched'))} batched, "
                  f"{_ms(_find(sin, algo='maml', k=5, impl='loop'))} loop"))
    if g:
        graph = f"{g['graph_ms']:.2f} ms" if g.get("graph_ms") is not None else \
            f"failed ({g.get('graph_error', '?')[:60]})"
        lines.append(("  eager / CUDA graph", f"{g.get('eager_ms', float('nan')):.2f} ms / {graph}"
                      + (" (< 2 ms)" if g.get("graph_under_2ms") else "")))
    lines.append(("omniglot 5w1s MAML T=32",
                  f"{_ms(_find(om, algo='maml', k=1, impl='batched'))} grouped, "
                  f"{_ms(_find(om, algo='maml', k=1, impl='loop'))} loop"))
    tensor = _find(rl, algo="sampler", impl="tensor")
    lines.append(("navigation2d sampler", f"{tensor['env_steps_per_sec']:,.0f} env-steps/s"
                  if tensor and "env_steps_per_sec" in tensor else _ms(tensor)))
    lines.append(("navigation2d MAML-TRPO", _ms(_find(rl, algo="maml", impl="batched"))))
    steps = result.get("steps") or {}
    total = sum(s.get("seconds", 0.0) for s in steps.values())
    bad = [f"{k} ({s['status']})" for k, s in steps.items() if s.get("status") != "ok"]
    lines.append(("steps", f"{total:.0f} s" + (f"; not ok: {', '.join(bad)}" if bad else "")))
    return lines


def report(out: Path, steps: Path, junit: Path, bench: list[Path], graphs_json: Path) -> int:
    def load(p: Path) -> dict[str, Any]:
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return {"error": f"{p}: {type(e).__name__}"}

    result = {"machine": machine(), "steps": load(steps), "tests": junit_summary(junit),
              "bench": merge_bench(bench), "cuda_graphs": load(graphs_json)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = table(result)
    width = max(len(k) for k, _ in lines)
    print(f"\nmetarl gpu-check (full results: {out})")
    for k, v in lines:
        print(f"  {k.ljust(width)}  {v}")
    t = result["tests"]
    failed = "error" in t or t.get("failures", 0) + t.get("errors", 0) > 0
    return 1 if failed or any(s.get("status") != "ok" for s in result["steps"].values()
                              if isinstance(s, dict)) else 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("omniglot")
    o.add_argument("dir", type=Path)
    gr = sub.add_parser("graphs")
    gr.add_argument("out", type=Path)
    gr.add_argument("--device", default="cuda")
    r = sub.add_parser("report")
    r.add_argument("out", type=Path)
    for name in ("steps", "junit", "graphs"):
        r.add_argument(f"--{name}", type=Path, required=True)
    r.add_argument("--bench", type=Path, nargs="*", default=[], help="per-section JSON files")
    st = sub.add_parser("step")
    st.add_argument("name")
    st.add_argument("limit", type=float)
    st.add_argument("steps", type=Path)
    st.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "step":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return step(args.name, args.limit, args.steps, command)
    if args.cmd == "omniglot":
        synthetic_omniglot(args.dir)
        return 0
    if args.cmd == "graphs":
        args.out.write_text(json.dumps(graphs(args.device), indent=2) + "\n")
        return 0
    return report(args.out, args.steps, args.junit, args.bench, args.graphs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
