"""metarl.options.check_options: the type rules, unknown keys, **kwargs, and make()'s use of it."""

from __future__ import annotations  # every hint below is a string, resolved by get_type_hints

import functools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from metarl import families
from metarl.options import check_options, require
from metarl.types import ConfigError


class Toy:
    """One parameter per type rule."""

    default_depth = 3

    def __init__(self, n: int = 2, lr: float = 0.1, flag: bool = False, name: str = "toy",
                 mode: Literal["fast", "slow"] = "fast", depth: int | None = None,
                 sizes: Sequence[int] = (4, 4), pair: tuple[int, float] = (1, 0.5),
                 widths: tuple[int, ...] = (), tags: list[str] | None = None,
                 paths: str | Sequence[str] | None = None, table: dict[str, float] | None = None,
                 anything=None, lying: int = None) -> None:
        self.kw = dict(locals())


def check(**options: Any) -> dict[str, Any]:
    return check_options(Toy, options, family="toy")


def rejects(match: str, **options: Any) -> None:
    with pytest.raises(ConfigError, match=match):
        check(**options)


def test_valid_values_pass_and_are_converted_to_the_annotated_type():
    out = check(n=5.0, lr=1, flag=True, name="x", mode="slow", depth=None, sizes=[8, 8.0],
                pair=[2, 3], widths=[1, 2], tags=["a"], paths="a.zip", table={"a": 1})
    assert out == {"n": 5, "lr": 1.0, "flag": True, "name": "x", "mode": "slow", "depth": None,
                   "sizes": [8, 8], "pair": (2, 3.0), "widths": (1, 2), "tags": ["a"],
                   "paths": "a.zip", "table": {"a": 1.0}}
    assert type(out["n"]) is int and type(out["lr"]) is float and type(out["sizes"][1]) is int
    assert list(out) == ["n", "lr", "flag", "name", "mode", "depth", "sizes", "pair", "widths",
                         "tags", "paths", "table"]
    assert check(sizes=(8,))["sizes"] == (8,)  # a tuple stays a tuple
    assert check(n=1e3)["n"] == 1000  # integral floats are integers (JSON/TOML writers emit them)
    assert check(name=Path("a") / "b")["name"] == str(Path("a") / "b")
    assert check(paths=["a.zip", "b.zip"])["paths"] == ["a.zip", "b.zip"]
    assert check() == {}


def test_the_input_is_not_modified():
    options = {"n": 5.0}
    check_options(Toy, options, family="toy")
    assert options == {"n": 5.0} and type(options["n"]) is float


@pytest.mark.parametrize("value", [True, 1.5, "5", "abc", None, math.inf, [5]])
def test_int(value):
    rejects(rf"^family 'toy' option n={re.escape(repr(value))}: expected an integer "
            r"\(e.g. --family-opt n=2\)$", n=value)


@pytest.mark.parametrize("value", [True, "x", None, [0.1]])
def test_float(value):
    rejects(r"option lr=.*: expected a number \(e.g. --family-opt lr=0.1\)$", lr=value)


@pytest.mark.parametrize("value", [1, 0, "yes", "true", None])
def test_bool_is_strict(value):
    rejects(r"option flag=.*: expected true or false \(e.g. --family-opt flag=false\)$", flag=value)


def test_str():
    rejects(r"option name=5: expected a string \(e.g. --family-opt name=toy\)$", name=5)


def test_literal_names_the_choices():
    rejects(r"option mode='medium': expected one of 'fast', 'slow' \(e.g. --family-opt mode=fast\)",
            mode="medium")
    rejects("expected one of 'fast', 'slow'", mode=1)


def test_optional_and_the_class_default_as_example():
    assert check(depth=7) == {"depth": 7}
    rejects(r"option depth='x': expected an integer, or null \(e.g. --family-opt depth=3\)$",
            depth="x")


@pytest.mark.parametrize("value", ["64", 5, [1.5], [True], ["8"]])
def test_sequence_of_int_is_checked_item_by_item_and_never_a_string(value):
    rejects(r"option sizes=.*: expected a list of integers \(e.g. --family-opt sizes=\[4,4\]\)$",
            sizes=value)


def test_tuples():
    rejects(r"expected a list of 2 items \(an integer, a number\)", pair=[1])
    rejects(r"expected a list of 2 items", pair=[1, "x"])
    rejects(r"option widths=\[0.5\]: expected a list of integers", widths=[0.5])


def test_list_of_str_and_paths():
    rejects(r"option tags='a': expected a list of strings, or null", tags="a")
    rejects(r"option paths=\['a', 3\]: expected a string or a list of strings, or null "
            r"\(e.g. --family-opt paths=PATH\)", paths=["a", 3])
    rejects(r"option table=\{'a': 'x'\}: expected an object of numbers", table={"a": "x"})


def test_unannotated_parameters_and_a_lying_none_default_pass_through():
    marker = object()
    assert check(anything=marker)["anything"] is marker
    assert check(lying=None) == {"lying": None}  # `int = None`: None is what the default is
    rejects("option lying='x': expected an integer", lying="x")


def test_unknown_key_gets_the_closest_name_and_the_accepted_options():
    with pytest.raises(ConfigError) as e:
        check(size=[8])
    msg = str(e.value)
    assert msg.startswith("family 'toy' does not take options named 'size' "
                          "(did you mean 'sizes'?): it takes anything, depth, flag,")
    assert "\n" not in msg
    rejects(r"named 'zzz', 'modee' \(did you mean 'mode'\?\)", zzz=1, modee="fast")


def test_kwargs_factory_accepts_any_key_but_still_checks_its_own():
    def factory(n: int = 1, **kwargs: Any) -> Any:
        return None

    assert check_options(factory, {"n": 2.0, "whatever": "x"}, family="f") == {"n": 2,
                                                                               "whatever": "x"}
    with pytest.raises(ConfigError, match="option n='x': expected an integer"):
        check_options(factory, {"n": "x"}, family="f")


class Base:
    def __init__(self, rollouts: int = 20) -> None:
        self.rollouts = rollouts


class Forwarding(Base):
    def __init__(self, oracle: bool = False, **options: Any) -> None:
        super().__init__(**options)


class Keeps:
    def __init__(self, **options: Any) -> None:
        self.options = options


def test_class_kwargs_passed_to_the_base_are_checked_against_the_base():
    assert check_options(Forwarding, {"oracle": True, "rollouts": 5.0}, family="f") == {
        "oracle": True, "rollouts": 5}
    with pytest.raises(ConfigError, match="option rollouts='abc': expected an integer"):
        check_options(Forwarding, {"rollouts": "abc"}, family="f")
    with pytest.raises(ConfigError, match=r"'rollout' \(did you mean 'rollouts'\?\): it takes "
                                          "oracle, rollouts$"):
        check_options(Forwarding, {"rollout": 5}, family="f")
    assert check_options(Keeps, {"any": 1}, family="f") == {"any": 1}  # nothing rejects it


def test_other_factories():
    def make_toy(n: int, *, mode: Literal["a", "b"] = "a") -> Any:
        return None

    with pytest.raises(ConfigError, match=r"family 'f' needs option n: give --family-opt n=\.\.\."):
        check_options(make_toy, {}, family="f")
    with pytest.raises(ConfigError, match="expected one of 'a', 'b'"):
        check_options(functools.partial(make_toy, 1), {"mode": "c"}, family="f")

    class Callable_:
        def __call__(self, width: int = 3) -> Any:
            return None

    with pytest.raises(ConfigError, match="option width=1.5: expected an integer"):
        check_options(Callable_(), {"width": 1.5}, family="f")

    class NoInit:
        pass

    with pytest.raises(ConfigError, match="does not take options named 'x': it takes no options"):
        check_options(NoInit, {"x": 1}, family="f")

    class OwnNew:
        def __new__(cls, **options: Any) -> OwnNew:
            return super().__new__(cls)

    class InheritsNew(OwnNew):
        pass

    for factory in (OwnNew, InheritsNew):  # a __new__ of its own is not read: nothing checked
        assert check_options(factory, {"x": 1}, family="f") == {"x": 1}


def test_unresolvable_hints_are_not_checked():
    def factory(n: NotImported = 1) -> Any:  # noqa: F821 (resolving it fails)
        return None

    assert check_options(factory, {"n": "anything"}, family="f") == {"n": "anything"}
    with pytest.raises(ConfigError, match="does not take options named 'm'"):
        check_options(factory, {"m": 1}, family="f")  # the names are still known


def test_require():
    require(True, "f", "gamma", 0.5, "in (0, 1]")
    with pytest.raises(ConfigError, match=r"^family 'f': gamma must be in \(0, 1\], got 2$"):
        require(False, "f", "gamma", 2, "in (0, 1]")


# --- through families.make ----------------------------------------------------------

def test_make_checks_before_building_and_converts():
    with pytest.raises(ConfigError, match="family 'sinusoid' option shots=1.5: expected an "
                       "integer"):
        families.make("sinusoid", shots=1.5)
    assert families.make("sinusoid", shots=5.0).shots == 5


@pytest.mark.parametrize("name, options, match", [
    ("navigation2d", {"rollouts": 0}, r"family 'navigation2d': rollouts must be >= 1"),
    ("navigation2d", {"horizon": 0}, r"horizon must be >= 1 \(steps per trajectory\), got 0"),
    ("navigation2d", {"gamma": 0}, r"gamma must be in \(0, 1\]"),
    ("navigation2d", {"gamma": math.nan}, r"gamma must be in \(0, 1\]"),
    ("navigation2d", {"gae_lambda": 1.5}, r"gae_lambda must be in \[0, 1\], got 1.5"),
    ("navigation2d", {"init_std": -1}, r"init_std must be a finite number > 0"),
    ("navigation2d", {"init_std": math.inf}, r"init_std must be a finite number > 0"),
    ("navigation2d", {"min_std": 1.0}, r"min_std must be in \[0, init_std=1\)"),
    ("navigation2d", {"min_std": -0.1}, r"min_std must be in \[0, init_std=1\)"),
    ("navigation2d", {"hidden": [64, 0]}, r"hidden must be a list of one or more layer sizes >= 1"),
    ("navigation2d", {"hidden": []}, r"hidden must be .*got \[\]"),
    ("navigation2d", {"workers": -1}, r"workers must be an integer >= 0"),
    ("sinusoid", {"eval_query": 0}, r"family 'sinusoid': eval_query must be >= 1, got 0"),
    ("sinusoid", {"hidden": [40, -1]}, r"hidden must be a list of layer sizes >= 1"),
    ("omniglot", {"ways": 1, "data": "unused"}, r"family 'omniglot': ways must be >= 2, got 1"),
    ("omniglot", {"query": 0, "data": "unused"}, r"query must be >= 1, got 0"),
    ("omniglot", {"filters": 0, "data": "unused"}, r"filters must be >= 1, got 0"),
])
def test_ranges_are_checked_by_the_constructors(name, options, match):
    with pytest.raises(ConfigError, match=match):
        families.make(name, **options)


def test_range_checks_hold_without_make_too():
    from metarl.envs.navigation import Navigation2DFamily
    from metarl.tasks.sinusoid import SinusoidFamily

    with pytest.raises(ConfigError, match="estimator must be one of reinforce, lvc, dice"):
        Navigation2DFamily(estimator="foo")
    with pytest.raises(ConfigError, match="activation must be one of relu, tanh"):
        Navigation2DFamily(activation="foo")
    with pytest.raises(ConfigError, match="activation must be relu or tanh"):
        SinusoidFamily(activation="foo")


def test_valid_options_are_unchanged():
    """``options()`` (what checkpoints record) is what it was for the defaults, and
    rebuilding a family from its own options gives the same options."""
    nav = families.make("navigation2d")
    assert nav.options() == {"rollouts": 20, "horizon": 100, "gamma": 0.99, "gae_lambda": 1.0,
                             "estimator": "reinforce", "hidden": [64, 64], "activation": "tanh",
                             "init_std": 1.0, "min_std": 0.0, "normalize_actions": True,
                             "workers": 0}
    assert families.make("sinusoid").options() == {"shots": 10, "query": 10, "eval_query": 100,
                                                   "hidden": [40, 40], "activation": "relu"}
    assert families.make("sinusoid", hidden=[]).hidden == ()  # a linear model, as before
    for name, options in [("navigation2d", {"gamma": 1, "hidden": (8,), "horizon": 5.0}),
                          ("sinusoid", {"shots": 5, "hidden": [16]}),
                          ("omniglot", {"data": ["a.zip", "b.zip"], "ways": 20, "shots": 5})]:
        fam = families.make(name, **options)
        assert families.make(name, **fam.options()).options() == fam.options()
