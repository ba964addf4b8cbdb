"""Every package in the source tree ships: pyproject lists them all, envs/ and cli/ under metarl."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "metarl").rglob("__init__.py")}
    assert found <= listed, f"missing from pyproject packages: {sorted(found - listed)}"
    assert cfg["package-dir"] == {"metarl": "metarl", "metarl.envs": "envs", "metarl.cli": "cli"}
    assert {"metarl.envs", "metarl.cli"} <= listed and not {"envs", "cli"} & listed
