"""Every package in the source tree ships: pyproject lists them all, envs/ and cli/ under metarl;
the distribution is installed under its own name, metarl-toolkit."""

import importlib.metadata
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    inits = (ROOT / "metarl").rglob("__init__.py")
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in inits}
    assert found <= listed, f"missing from pyproject packages: {sorted(found - listed)}"
    assert cfg["package-dir"] == {"metarl": "metarl", "metarl.envs": "envs", "metarl.cli": "cli"}
    assert {"metarl.envs", "metarl.cli"} <= listed and not {"envs", "cli"} & listed


def test_distribution_name_is_not_the_taken_one():
    """The distribution is `metarl-toolkit` (`metarl` on PyPI is an unrelated project); the
    import, the command and the entry-point group stay `metarl`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "metarl-toolkit"
    try:
        dist = importlib.metadata.distribution(project["name"])
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("metarl-toolkit is not installed: pip uninstall -y metarl; "
                    "pip install -c constraints.txt --no-deps -e .")
    assert dist.version == project["version"]
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"metarl": "metarl.cli.main:main"}
    assert {ep.name for ep in dist.entry_points if ep.group == "metarl.families"} >= {
        "sinusoid", "navigation2d", "omniglot"}
    owners = set(importlib.metadata.packages_distributions().get("metarl", []))
    assert owners == {"metarl-toolkit"}, (
        f"the `metarl` module is claimed by distributions {sorted(owners)}: "
        "pip uninstall -y metarl (the unrelated PyPI project, or this one under its old name) "
        "and delete a stale metarl.egg-info")
