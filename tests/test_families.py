"""Family registry: built-ins, Python registration, entry points, module:Factory, errors."""

import sys
import textwrap

import pytest
import torch

from metarl import families
from metarl.tasks.sinusoid import SinusoidFamily
from metarl.types import ConfigError


def test_builtin_sinusoid_is_registered_and_matches_reference():
    assert "sinusoid" in families.names()
    fam = families.make("sinusoid")
    g = torch.Generator().manual_seed(0)
    b = fam.sample_batch(2000, g, split="train", dtype=torch.float64)
    assert b.support.x.shape == (2000, 10, 1) and b.query.x.shape == (2000, 10, 1)
    x = torch.cat([b.support.x, b.query.x], 1)
    y = torch.cat([b.support.y, b.query.y], 1)
    assert x.min() >= -5 and x.max() <= 5
    amp = y.abs().amax(1).squeeze(-1)  # a lower bound of each amplitude
    assert amp.max() <= 5.0 and amp.max() > 4.5
    # recover A, p per task from two points: y = A sin(x + p)
    theta = fam.init_params(g, "cpu", torch.float64)
    assert sum(v.numel() for v in theta.values()) == 1 * 40 + 40 + 40 * 40 + 40 + 40 + 1
    ev = fam.sample_batch(3, g, split="test", shots=5, dtype=torch.float64)
    assert ev.support.x.shape == (3, 5, 1) and ev.query.x.shape == (3, 100, 1)


def test_sinusoid_function_values():
    fam = families.make("sinusoid")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    b = fam.sample_batch(4, g1, dtype=torch.float64)
    u = torch.rand(4, 2, generator=g2, dtype=torch.float64)
    A, p = 0.1 + 4.9 * u[:, :1], torch.pi * u[:, 1:]
    assert torch.allclose(b.support.y.squeeze(-1), A * torch.sin(b.support.x.squeeze(-1) + p))


def test_unknown_family_suggests_closest():
    with pytest.raises(ConfigError, match="unknown family 'sinusiod': did you mean 'sinusoid'"):
        families.make("sinusiod")


def test_register_with_python_call():
    class Tiny(SinusoidFamily):
        name = "tiny-sin"

    families.register("tiny-sin", lambda **kw: Tiny(hidden=(4,), **kw))
    try:
        assert "tiny-sin" in families.names()
        assert families.make("tiny-sin").hidden == (4,)
        with pytest.raises(ValueError, match="already registered"):
            families.register("tiny-sin", lambda **kw: Tiny(**kw))
    finally:
        families._registry.pop("tiny-sin")


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user's package on sys.path with a family and a metarl.families entry point."""
    pkg = tmp_path / "userfam"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from metarl.tasks.sinusoid import SinusoidFamily

        class WideSinusoid(SinusoidFamily):
            name = "wide-sinusoid"
            description = "sinusoid with x in [-10, 10]"
            x_range = (-10.0, 10.0)
    """))
    dist = tmp_path / "userfam-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userfam\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[metarl.families]\nwide-sinusoid = userfam:WideSinusoid\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(families, "_loaded_entry_points", False)
    yield
    families._registry.pop("wide-sinusoid", None)
    sys.modules.pop("userfam", None)


def test_entry_point_registration(user_package):
    assert "wide-sinusoid" in families.names()
    fam = families.make("wide-sinusoid")
    b = fam.sample_batch(500, torch.Generator().manual_seed(0))
    assert b.support.x.min() < -5


def test_module_factory_spec(user_package):
    fam = families.make("userfam:WideSinusoid", shots=3)
    assert fam.x_range == (-10.0, 10.0) and fam.shots == 3
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        families.make("userfam:Nope")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.mod'"):
        families.make("no_such_pkg.mod:F")


def test_bad_family_options():
    with pytest.raises(ConfigError, match="does not take options"):
        families.make("sinusoid", wings=3)
    with pytest.raises(ConfigError, match="shots must be >= 1"):
        families.make("sinusoid", shots=0)
