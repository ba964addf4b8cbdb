"""``metarl evaluate``: meta-test a run on fresh tasks."""

from __future__ import annotations

import enum
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from metarl import checkpoint, distributed
from metarl.checkpoint import atomic_write
from metarl.cli.common import (
    FAMILY_OPT_HELP,
    THREADS_HELP,
    UserError,
    err,
    out,
    parse_options,
    set_threads,
    user_errors,
)
from metarl.cli.settings import DEVICE_HELP, Device
from metarl.evaluate import Curve, Evaluation, check_procs, evaluate_checkpoint
from metarl.plots import adaptation_curves
from metarl.rl.family import RLFamily
from metarl.sb3 import SampleEfficiency
from metarl.types import RunError

log = logging.getLogger(__name__)


def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder (its checkpoint.pt) or a checkpoint file.")],
    tasks: Annotated[Optional[int], typer.Option(min=1, help="Number of test tasks. \\[default: the family's, 600 supervised / 40 RL]")] = None,
    steps: Annotated[Optional[int], typer.Option(min=0, help="Report the metric after 0..K adaptation steps. \\[default: the family's]")] = None,
    lr: Annotated[Optional[list[float]], typer.Option(help="Test-time inner learning rate; repeat for one per step, the last repeated (--lr 0.1 --lr 0.05). \\[default: the family's, else the training inner lr]")] = None,
    shots: Annotated[Optional[int], typer.Option(min=1, help="Test-time support size (supervised families), e.g. 5 for the paper's 5-shot sinusoid numbers.")] = None,
    query: Annotated[Optional[int], typer.Option(min=1, help="Test-time query size per task/class (supervised families).")] = None,
    data: Annotated[Optional[list[Path]], typer.Option(help="Meta-test on another data set (repeatable), all of whose classes are test classes, e.g. Omniglot's images_evaluation.zip after training on images_background.zip.")] = None,
    rollouts: Annotated[Optional[int], typer.Option(min=1, help="RL: trajectories per task for each adaptation step and score (the published navigation protocol used 20-40). \\[default: the run's]")] = None,
    family_opt: Annotated[Optional[list[str]], typer.Option(help=FAMILY_OPT_HELP)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Test seed; test tasks never come from the training stream. \\[default: 0]")] = None,
    validation: Annotated[bool, typer.Option("--validation", help="Adapt on the validation tasks of `metarl train --validate-every` instead of the test tasks (held-out tasks of the training split, from the run's seed), with the run's validation tasks, steps and rollouts unless given: the curve is the validation row the checkpoint's iteration logged. No baselines.")] = False,
    device: Annotated[Device, typer.Option(help=DEVICE_HELP)] = Device.auto,
    baselines: Annotated[bool, typer.Option(help="Also evaluate the family's baselines (RL: random init, pretrained, oracle).")] = True,
    proximal: Annotated[bool, typer.Option(help="iMAML models adapt on their proximal objective L + lam/2 |phi - theta|^2, as in training; --no-proximal uses plain gradient steps.")] = True,
    pretrained: Annotated[Optional[Path], typer.Option(help="RL: the pretrained baseline's run or checkpoint. \\[default: RUN/pretrained, trained on first use]")] = None,
    pretrain_iterations: Annotated[Optional[int], typer.Option(min=1, help="RL: iterations of the pretrained baseline when it must be trained. \\[default: the family's]")] = None,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP)] = None,
    procs: Annotated[Optional[int], typer.Option(min=1, help="Processes on this machine, each adapting its share of the test tasks (baselines included; a missing pretrained baseline is trained on all of them together); process 0 prints and writes, and the result equals one process's. Across machines run this command under torchrun instead. \\[default: 1]")] = None,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="With --procs: the rendezvous port on 127.0.0.1. \\[default: a free one]")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON here.")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option(help="Another baseline, repeatable: ppo trains Stable-Baselines3 PPO from scratch on the first --ppo-tasks test tasks and reports the environment steps it needs to reach this model's return after each adaptation step.", rich_help_panel="PPO baseline")] = None,
    ppo_steps: Annotated[int, typer.Option(min=1, help="PPO's budget of environment steps per task (--baseline ppo).", rich_help_panel="PPO baseline")] = 200_000,
    ppo_tasks: Annotated[int, typer.Option(min=1, help="Test tasks PPO trains on (the first of --tasks).", rich_help_panel="PPO baseline")] = 3,
    ppo_plot: Annotated[Optional[Path], typer.Option(help="Write PPO's learning curves against this model's adapted returns as a PNG here.", rich_help_panel="PPO baseline")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of the metric versus steps with 95% CI bands here (and a panel per extra metric, e.g. Meta-World's success rate).")] = None,
) -> None:
    """Adapt to fresh test tasks and report the metric after 0..K steps (mean and 95% CI).

    A family whose batches report more metrics (Meta-World: the success rate) gets a
    table of each too, in the JSON under extra_metrics and as a panel of the plot.

    Example: metarl evaluate runs/sinusoid-maml --shots 5 --steps 10 --plot curve.png

    Example: metarl evaluate runs/cheetah-vel --family-opt workers=2 --family-opt oracle_run=runs/cheetah-vel-oracle

    Example: metarl evaluate runs/cheetah-vel --procs 8 --threads 1 --json eval.json
    """
    with user_errors():
        set_threads(threads)
        unknown = sorted(set(baseline or ()) - {"ppo"})
        if unknown:
            raise UserError(f"unknown --baseline {unknown[0]!r}: use ppo (random init, "
                            "pretrained and the oracle come with --baselines)")
        if validation and seed is not None:
            raise UserError("--validation adapts on the run's validation tasks, drawn from its "
                            "training seed: drop --seed")
        options = parse_options(family_opt)
        if rollouts and not validation:  # --validation: an override of the run's own
            options["rollouts"] = rollouts
        if data:
            options["eval_data"] = [str(p) for p in data]
        run_ = checkpoint.load(run).with_family_options(options)
        overrides: dict[str, Any] = {k: v for k, v in (("shots", shots), ("query", query))
                                     if v is not None}
        if validation and rollouts:
            overrides["rollouts"] = rollouts
        if baseline and validation:
            raise UserError("--baseline ppo trains on test tasks; --validation adapts on "
                            "validation tasks: drop one of them")
        if baseline:
            check_ppo_baseline(run_, steps)  # before the evaluation, not after it
        if procs is not None and procs > 1 and not distributed.launched():
            check_procs(run_, procs,
                        n_tasks=tasks or (run_.config.validate.tasks if validation else None),
                        baselines=baselines and not validation, pretrained=pretrained,
                        pretrain_iterations=pretrain_iterations)
            if port is not None:
                distributed.check_port(port)
            args = rank_args(run, tasks=tasks, steps=steps, lr=lr, shots=shots, query=query,
                             data=data, rollouts=rollouts, family_opt=family_opt, seed=seed,
                             validation=validation or None, device=device, baselines=baselines,
                             proximal=proximal,
                             pretrained=pretrained, pretrain_iterations=pretrain_iterations,
                             threads=threads, json=json_path, baseline=baseline,
                             ppo_steps=ppo_steps, ppo_tasks=ppo_tasks, ppo_plot=ppo_plot,
                             plot=plot)
            _launch(args, procs=procs, port=port, threads=threads)
            return
        ev = evaluate_checkpoint(run_, n_tasks=tasks, steps=steps, lr=tuple(lr) if lr else None,
                                 seed=seed or 0, device=device.value, baselines=baselines,
                                 pretrained=pretrained, pretrain_iterations=pretrain_iterations,
                                 proximal=proximal, notify=lambda m: err.print(m, markup=False),
                                 validation=validation, **overrides)
        main = distributed.current().is_main
        distributed.shutdown()  # the collectives are over (no-op for one process)
        if not main:
            return  # rank 0 prints and writes
        curves = [ev.curve, *ev.baselines]
        which = "validation" if validation else "test"
        digits = decimals([v for c in curves for v in c.ci95])
        out.print(curve_table(f"{ev.family} / {ev.algo}: {ev.metric} after k adaptation steps "
                              f"({ev.curve.n_tasks} {which} tasks, mean +- 95% CI)", curves, digits))
        extra = ev.extra_metrics()  # e.g. Meta-World's success rate, in the same layout
        for name, extra_curves in extra.items():
            out.print(curve_table(f"{ev.family} / {ev.algo}: {name} after k adaptation steps "
                                  f"({ev.curve.n_tasks} {which} tasks, mean +- 95% CI)",
                                  extra_curves, decimals([v for c in extra_curves for v in c.ci95])))
        for label, y in ev.hlines.items():
            out.print(f"{label}: {y:.{digits}f}")
        gap = ev.gap_closed()
        if gap is not None:
            out.print("fraction of the gap to the oracle closed after k steps: "
                      + ", ".join(f"k={j}: {g:.2f}" for j, g in enumerate(gap) if j))
        ppo = ppo_baseline(run_, ev, steps=ppo_steps, n_tasks=ppo_tasks, seed=seed or 0,
                           plot=ppo_plot) if baseline else None
        if json_path:
            text = json.dumps({**ev.to_json(), **({"ppo_baseline": ppo.to_json()} if ppo else {})},
                              indent=2) + "\n"
            atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
            err.print(f"wrote {json_path}", markup=False)
        if plot:
            adaptation_curves([ev.curve, *ev.baselines], plot, metric=ev.metric,
                              title=f"{ev.family}: {ev.algo}", hlines=ev.hlines, panels=extra)
            err.print(f"wrote {plot}", markup=False)


def rank_args(run: Path, **options: Any) -> list[str]:
    """The ``evaluate`` command line each launched rank runs: ``run`` and every option that
    was given (None: left out; a bool: ``--name`` or ``--no-name``; a list: repeated)."""
    args = ["evaluate", str(run)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
            continue
        for v in value if isinstance(value, list) else [value]:
            args += [flag, str(v.value if isinstance(v, enum.Enum) else v)]
    return args


def _launch(args: list[str], *, procs: int, port: int | None, threads: int | None) -> None:
    """Evaluate on ``procs`` ranks of this machine (``distributed.launch``, as ``metarl
    train --procs``): rank 0 prints and writes; one line if any rank fails."""
    t0 = time.perf_counter()
    try:
        distributed.launch(args, procs, port=port, threads=threads)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        raise typer.Exit(code=130) from None
    except RunError as e:
        err.print(f"error: {' '.join(str(e).split())}", markup=False)
        raise typer.Exit(code=e.exit_code) from None
    log.info("%d processes finished in %.1f s", procs, time.perf_counter() - t0)


def curve_table(title: str, curves: Sequence[Curve], digits: int) -> Table:
    """One row per adaptation step k, one column per curve: mean +- 95% CI."""
    table = Table(title=title)
    table.add_column("k", justify="right")
    for c in curves:
        table.add_column(c.label, justify="right")
    for j in curves[0].steps:
        table.add_row(str(j), *[f"{c.mean[j]:.{digits}f} +- {c.ci95[j]:.{digits}f}"
                                for c in curves])
    return table


def check_ppo_baseline(run: checkpoint.Run, steps: int | None) -> None:
    """What ``--baseline ppo`` needs, checked before anything is evaluated: an RL family,
    adapted returns to compare with, and Stable-Baselines3."""
    from metarl import sb3

    family = run.family()
    if not isinstance(family, RLFamily):
        raise UserError(f"--baseline ppo is for RL families; {family.name!r} is {family.kind}")
    if steps == 0:
        raise UserError("--baseline ppo compares with adapted returns: give --steps 1 or more")
    sb3.require_sb3()


def ppo_baseline(run: checkpoint.Run, ev: Evaluation, *, steps: int, n_tasks: int, seed: int,
                 plot: Path | None) -> SampleEfficiency:
    """``--baseline ppo``: PPO from scratch on the first test tasks of ``ev``, its table
    printed (and its plot written)."""
    from metarl import sb3

    family = run.family()
    if not isinstance(family, RLFamily) or ev.curve.per_task is None:
        raise UserError(f"--baseline ppo is for RL families; {family.name!r} is {family.kind}")
    n = min(n_tasks, ev.curve.n_tasks)
    ks = [k for k in ev.curve.steps if k > 0]
    if not ks:
        raise UserError("--baseline ppo compares with adapted returns: give --steps 1 or more")
    tasks = sb3.evaluation_tasks(family, ev.curve.n_tasks, seed)[:n]
    err.print(f"PPO baseline: training from scratch on {n} test tasks, up to {steps} "
              "environment steps each", markup=False)
    se = sb3.ppo_sample_efficiency(family, ev.curve.per_task[:n], tasks, ks=ks, max_steps=steps,
                                   seed=seed)
    table = Table(title=f"{ev.family}: environment steps PPO from scratch needs to reach "
                        f"{ev.algo}'s return after k adaptation steps ({se.rollouts} "
                        f"trajectories of {se.horizon} steps per adaptation step)")
    table.add_column("task")
    for k in ks:
        table.add_column(f"{ev.algo}, k={k} ({se.meta_steps(k)} steps)", justify="right")
        table.add_column("PPO steps to reach it", justify="right")
    for c in se.curves:
        row = [json.dumps(c.task)]
        for k in ks:
            got = c.reached[k]
            row += [f"{c.thresholds[k]:.1f}", f"> {c.total_steps}" if got is None else str(got)]
        table.add_row(*row)
    out.print(table)
    if plot:
        sb3.plot_sample_efficiency(se, plot, title=f"{ev.family}: PPO from scratch vs "
                                                   f"{ev.algo} adaptation")
        err.print(f"wrote {plot}", markup=False)
    return se


def decimals(ci95: list[float]) -> int:
    """One precision for a whole table: enough decimals to show two significant digits
    of the smallest nonzero confidence half-width (at most 6, at least 1)."""
    widths = [w for w in ci95 if w > 0 and math.isfinite(w)]
    if not widths:
        return 3
    return max(1, min(6, 1 - math.floor(math.log10(min(widths)))))
