"""README examples are tested: the example files run at tiny size, and every
`metarl ...` command line in the README parses with the real command line."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from metarl.cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def test_sinusoid_example_runs_and_learns():
    from examples.sinusoid_maml import main

    curve = main(iterations=300)
    assert curve.n_tasks == 600 and len(curve.mean) == 11
    assert curve.mean[1] < curve.mean[0]  # one adaptation step already helps


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    fenced = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)  # every block, any language
    blocks = [body for lang, body in fenced if lang in ("", "bash", "sh", "console")]
    lines, buf = [], ""
    for block in blocks:
        for raw in block.splitlines():
            line = raw.strip()
            if buf:
                buf += " " + line.rstrip("\\").strip()
                if not line.endswith("\\"):
                    lines.append(buf)
                    buf = ""
            elif line.startswith("metarl "):
                if line.endswith("\\"):
                    buf = line.rstrip("\\").strip()
                else:
                    lines.append(line)
    return [ln.split(" #")[0].strip() for ln in lines]


def test_readme_has_commands():
    cmds = readme_commands()
    assert len(cmds) >= 20  # every block is read, not only those before the first python block
    assert {c.split()[1] for c in cmds} >= {"train", "evaluate", "adapt", "gradcheck", "bench",
                                            "families"}


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line):
    args = shlex.split(line)[1:]
    group = typer.main.get_command(app)
    cmd, rest = group.commands[args[0]], args[1:]
    if hasattr(cmd, "commands") and rest and rest[0] in cmd.commands:  # `families show NAME`
        cmd, rest = cmd.commands[rest[0]], rest[1:]
    cmd.make_context(args[0], list(rest))  # raises on unknown options or bad values


def test_early_stopping_example_stops_after_patience_checks_without_progress(tmp_path):
    from examples.early_stopping import main
    from metarl import checkpoint

    result, stopper = main(str(tmp_path / "run"), iterations=300, every=10, patience=2)
    its = [it for it, _ in stopper.history]
    assert its == list(range(10, result.iterations + 1, 10)) and its[-1] == result.iterations
    assert checkpoint.load(tmp_path / "run").iteration == result.iterations
    losses = [loss for _, loss in stopper.history]
    if result.iterations < 300:  # it stopped: the last two checks did not beat the best before
        assert min(losses[-2:]) >= min(losses[:-2])
    else:
        assert stopper.bad < 2
