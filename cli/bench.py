"""``metarl bench``: speed and memory of the engine, each case in its own process."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.progress import Progress
from rich.table import Table

from metarl.bench import SECTIONS, Row, Scale, run_in_subprocess
from metarl.checkpoint import atomic_write
from metarl.cli.common import UserError, err, is_tty, out, user_errors
from metarl.cli.settings import DEVICE_HELP, Device
from metarl.types import resolve_device


def bench(
    section: Annotated[Optional[list[str]], typer.Option(help="Sections to run (repeatable). \\[default: all]")] = None,
    device: Annotated[Device, typer.Option(help=DEVICE_HELP)] = Device.cpu,
    threads: Annotated[int, typer.Option(min=1, help="Torch CPU threads per case.")] = 1,
    quick: Annotated[bool, typer.Option(help="Fewer cases and repeats (a shorter run).")] = False,
    tiny: Annotated[bool, typer.Option(help="One toy-sized case per section (two for rl), one timed repeat: checks in seconds that every section runs; its numbers mean nothing. Overrides --quick.")] = False,
    data: Annotated[Optional[Path], typer.Option(help="Omniglot data for the omniglot section. \\[default: $METARL_OMNIGLOT; the section is skipped without data]")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write all rows as JSON here.")] = None,
) -> None:
    """Seconds per meta-iteration (median after warm-up) and peak memory per case.

    Each case runs in its own process. The sinusoid section compares the batched
    engine with a per-task loop for every algorithm at meta-batch 25 and
    k = 1, 5, 10, 20, 40. The distributed section times a training iteration of
    sinusoid, navigation2d and halfcheetah-vel on 1 process and on 2 gloo ranks (one
    thread each, alternating) and counts the collectives' bytes per iteration. The
    threads section times the automatic thread count (a run without --threads) against
    one thread, torch's default and the per-task loop, quiet and beside a busy process
    (it ignores --threads). Exit
    code 1 when a case failed (its row holds the error).
    Example: metarl bench --json bench.json
    """
    with user_errors():
        names = section or list(SECTIONS)
        unknown = [s for s in names if s not in SECTIONS]
        if unknown:
            raise UserError(f"unknown bench section(s) {unknown}: choose from {', '.join(SECTIONS)}")
        scale: Scale = "tiny" if tiny else "quick" if quick else "full"
        dev = str(resolve_device(device.value))
        torch.set_num_threads(threads)
        results: dict[str, object] = {"machine": {"device": dev, "threads": threads,
                                                  "torch": torch.__version__,
                                                  "cpu": platform.processor() or platform.machine()}}
        failed: list[tuple[str, Row]] = []
        for name in names:
            make_cases, _ = SECTIONS[name]
            if name == "omniglot":
                source = str(data) if data else os.environ.get("METARL_OMNIGLOT")
                if not source:
                    err.print("bench omniglot: skipped (no data: pass --data or set "
                              "METARL_OMNIGLOT)", markup=False)
                    continue
                cases = list(make_cases(dev, scale, source))
            else:
                cases = list(make_cases(dev, scale))
            rows = []
            with Progress(console=err, disable=not is_tty()) as bar:
                task = bar.add_task(f"bench {name}", total=len(cases))
                for case in cases:
                    rows.append(run_in_subprocess(case))
                    bar.advance(task)
            results[name] = rows
            failed += [(name, r) for r in rows if "error" in r]
            paired = all(r.get("impl") in ("batched", "loop") or str(r.get("impl")).startswith("chunked")
                         for r in rows)
            if name == "distributed" and not any("error" in r for r in rows):
                out.print(_distributed_table(rows))
            elif name == "threads" and not any("error" in r for r in rows):
                out.print(_threads_table(rows))
            else:
                out.print(_table(name, rows) if paired else _plain_table(name, rows))
        if json_path:
            text = json.dumps(results, indent=2) + "\n"
            atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
            err.print(f"wrote {json_path}", markup=False)
        for name, r in failed:
            err.print(f"bench {name}: {r['algo']} {r['impl']} failed: {r['error']}", markup=False)
        if failed:
            raise typer.Exit(code=1)


def _plain_table(name: str, rows: list[Row]) -> Table:
    """One row per case, every field as a column."""
    table = Table(title=f"bench: {name}")
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    for k in keys:
        table.add_column(k, justify="left" if k in ("algo", "impl", "error") else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(k)) for k in keys])
    return table


def _distributed_table(rows: list[Row]) -> Table:
    """One row per family: seconds per iteration on 1 process and on N, the speed-up, the
    sampling part of each, and what every rank hands to collectives per iteration."""
    n = rows[0]["procs"] if rows else 2
    table = Table(title=f"bench: distributed (1 vs {n} processes, one thread each; a "
                        "training iteration: sampling and update)")
    for head in ("family", "T", "params", "1 proc s/it", f"{n} procs s/it", "speed-up",
                 "sampling 1 / n s", "collectives/it", "KB/it", "in collectives s/it"):
        table.add_column(head, justify="left" if head == "family" else "right")
    for r in rows:
        table.add_row(r["family"], str(r["T"]), str(r["params"]), f"{r['sec_per_iter_1']:.4g}",
                      f"{r['sec_per_iter_n']:.4g}", f"{r['speedup']:.2f}x",
                      f"{r['sample_sec_1']:.3g} / {r['sample_sec_n']:.3g}",
                      f"{r['collectives_per_iter']:g}",
                      f"{r['collective_bytes_per_iter'] / 1e3:.1f}",
                      f"{r['collective_sec_per_iter']:.3g}")
    return table


def _threads_table(rows: list[Row]) -> Table:
    """One row per (workload, load): ms per iteration of the per-task loop (one thread)
    and of the batched engine at each thread policy; the automatic count's choice and
    its speed against the loop and against the best fixed count."""
    table = Table(title="bench: threads (sinusoid MAML k=5, meta-batch 25; 'busy': a "
                        "spinning process beside the case)")
    for head in ("workload", "load", "loop 1 thread ms", "batched 1 thread ms",
                 "batched torch default ms", "batched auto ms", "auto threads",
                 "auto vs loop", "auto vs best fixed"):
        table.add_column(head, justify="left" if head in ("workload", "load") else "right")
    groups: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        key = "loop" if r["impl"] == "loop" else r["policy"]
        groups.setdefault((r["workload"], r["load"]), {})[key] = r
    for (workload, load), g in groups.items():
        def ms(k: str, g: dict[str, Row] = g) -> str:
            return f"{1e3 * g[k]['sec_per_iter']:.2f}" if k in g else ""

        auto = g.get("auto")
        fixed = [g[k]["sec_per_iter"] for k in ("one", "torch-default") if k in g]
        vs_loop = (f"{g['loop']['sec_per_iter'] / auto['sec_per_iter']:.1f}x faster"
                   if auto and "loop" in g else "")
        vs_best = f"{min(fixed) / auto['sec_per_iter']:.2f}x" if auto and fixed else ""
        table.add_row(workload, load, ms("loop"), ms("one"), ms("torch-default"), ms("auto"),
                      str(auto["threads"]) if auto else "", vs_loop, vs_best)
    return table


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return "" if v is None else str(v)


def _table(name: str, rows: list[Row]) -> Table:
    """One row per (algo, k), the implementations side by side, each against the loop."""
    table = Table(title=f"bench: {name}")
    keys = [k for k in rows[0] if k not in ("impl", "sec_per_iter", "peak_mb", "error", "chunk")
            ] if rows else []
    impls: list[str] = []
    for r in rows:
        if r.get("impl", "batched") not in impls:
            impls.append(r.get("impl", "batched"))
    impls.sort(key=lambda i: (i == "loop", i != "batched"))  # batched, chunked-*, loop
    for k in keys:
        table.add_column(k)
    for i in impls:
        table.add_column(f"{i} ms/it", justify="right")
        if i != "loop" and "loop" in impls:
            table.add_column("speed-up", justify="right")
    for i in impls:
        table.add_column(f"{i} peak MB", justify="right")
    groups: dict[tuple[Any, ...], dict[str, Row]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), {})[r.get("impl", "batched")] = r

    def ms(r: Row) -> str:  # "auto" rows: the chunk it chose in brackets
        if "error" in r:
            return str(r["error"])[:30]
        return (f"{1e3 * r['sec_per_iter']:.2f}" + (f" [{r['chunk']}]" if "chunk" in r else "")
                if r else "")

    def mb(r: Row) -> str:
        return f"{r['peak_mb']:.1f}" if r and "peak_mb" in r else ""

    for key, g in groups.items():
        lo = g.get("loop", {})
        cells = [str(v) for v in key]
        for i in impls:
            r = g.get(i, {})
            cells.append(ms(r))
            if i != "loop" and "loop" in impls:
                cells.append(f"{lo['sec_per_iter'] / r['sec_per_iter']:.1f}x"
                             if "sec_per_iter" in r and "sec_per_iter" in lo else "")
        cells += [mb(g.get(i, {})) for i in impls]
        table.add_row(*cells)
    return table
