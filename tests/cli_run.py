"""Running the command line in tests: ``run(...)`` and the one-line usage-error check."""

from typer.testing import CliRunner

from metarl.cli.main import app

runner = CliRunner()


def run(*args):
    """``metarl ARGS`` in this process; every argument is turned into a string. The
    terminal is 200 columns wide, so that a help table's columns never wrap a word."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def one_line_error(result, *fragments):
    """A usage error: exit 2, one ``error:`` line holding every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]
