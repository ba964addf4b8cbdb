"""The typed configuration: layering, checks of every key and value, legacy layouts."""

import json

import pytest
from typer.testing import CliRunner

from metarl import config as C
from metarl import families
from metarl.cli.main import app
from metarl.cli.settings import settings
from metarl.config import Defaults, EvalDefaults, InnerOverride, TrainConfig
from metarl.inner import InnerConfig
from metarl.types import ConfigError

runner = CliRunner()


def toml(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def train_error(*args):
    r = runner.invoke(app, ["train", *map(str, args)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_misspelt_extra_key_is_refused_with_the_close_name(tmp_path):
    # this used to train with max_kl = 0.01 silently
    file = toml(tmp_path, "[extra]\nmaxkl = 0.5\n")
    line = train_error("--config", file, "--out", tmp_path / "o")
    assert "unknown setting 'maxkl'" in line and "did you mean 'max_kl'?" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, fragments", [
    ("[inner]\nstep = 3\n", ["unknown setting 'inner.step'", "did you mean 'inner.steps'?"]),
    ("[trpo]\nmax_kll = 0.1\n", ["'trpo.max_kll'", "did you mean 'trpo.max_kl'?"]),
    ("iterations = 'ten'\n", ["iterations", "'ten' is not an integer"]),
    ("keep_checkpoints = 1\n", ["keep_checkpoints", "is not true or false"]),
    ("algo = "
     "'mamal'\n", ["'mamal' is not one of maml, fomaml, reptile, imaml", "did you mean 'maml'?"]),
    ("inner = 3\n", ["inner in config file", "is a table of settings"]),
    ("[outer]\nlr = -1.0\n", ["outer-lr must be > 0"]),
    ("[inner]\noptimizer = 'adam'\n", ["--inner-optimizer adam is first order",
                                        "--algo maml differentiates through",
                                        "use --algo reptile or fomaml"]),
    ("algo = 'imaml'\n[inner]\noptimizer = 'adam'\n", ["--algo imaml solves"]),
    ("[inner]\noptimizer = 'rmsprop'\n", ["'rmsprop' is not one of sgd, adam"]),
    ("[outer]\nlr_final = -0.5\n", ["outer-lr-final must be >= 0"]),
])
def test_config_file_keys_and_values_are_checked(tmp_path, text, fragments):
    line = train_error("--family", "sinusoid", "--config", toml(tmp_path, text), "--out",
                       tmp_path / "o")
    for f in fragments:
        assert f in line, line


def test_nested_tables_and_the_legacy_flat_layout_both_set_settings(tmp_path):
    nav = families.make("navigation2d")
    nested = C.read_config_file(toml(tmp_path, "[trpo]\nmax_kl = 0.5\n[inner]\nlr = 0.2\n"))
    legacy = C.read_config_file(toml(tmp_path, "inner_lr = 0.2\nouter = "
                                "'trpo'\n[extra]\nmax_kl = 0.5\n"))
    for layer in (nested, legacy):
        cfg = C.resolve(nav, layer)
        assert (cfg.trpo.max_kl, cfg.inner.lr, cfg.outer.optimizer) == (0.5, 0.2, "trpo")
        assert cfg.trpo.cg_iters == nav.defaults.train.trpo.cg_iters  # untouched: the family's


def test_max_kl_from_a_file_reaches_the_trained_run(tmp_path):
    out = tmp_path / "nav"
    r = runner.invoke(app, ["train", "--config", str(toml(tmp_path, "[trpo]\nmax_kl = 0.5\n")),
                            "--iterations", "1", "--meta-batch", "2", "--rollouts", "2",
                            "--horizon", "5", "--family-opt", "hidden=[4]", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["trpo"]["max_kl"] == 0.5


def test_precedence_defaults_then_file_then_flags_and_per_algorithm_inner_loops(tmp_path):
    sin = families.make("sinusoid")
    file = {"algo": "imaml", "iterations": 7}
    assert C.resolve(sin, file).inner.steps == 10           # iMAML's own inner loop on sinusoid
    assert C.resolve(sin, file, {"inner": {"steps": 2}}).inner.steps == 2  # a flag wins
    assert C.resolve(sin, file, {"iterations": None}).iterations == 7      # None is not given
    assert C.resolve(sin, {"algo": "reptile"}).inner == InnerConfig(steps=5, lr=0.01)
    with pytest.raises(ConfigError, match="unknown setting 'inner_step'"):
        C.resolve(sin, {"inner_step": 3})


def test_family_defaults_are_a_typed_config():
    d = Defaults(train=TrainConfig(iterations=9, inner=InnerConfig(steps=2, lr=0.3)),
                 per_algo={"imaml": InnerOverride(steps=8)}, eval=EvalDefaults(tasks=5))
    assert d.for_algo("imaml") == InnerConfig(steps=8, lr=0.3)
    assert d.for_algo("maml") == InnerConfig(steps=2, lr=0.3)
    changed = d.with_(train={"meta_batch": 40}, pretrain_iterations=3)
    assert (changed.train.meta_batch, changed.train.iterations) == (40, 9)
    assert (changed.eval.pretrain_iterations, changed.eval.tasks) == (3, 5)
    with pytest.raises(ConfigError, match="unknown algorithms \\['mamal'\\]"):
        Defaults(per_algo={"mamal": InnerOverride(steps=1)})
    with pytest.raises(ConfigError, match="unknown setting 'meta_bach'.*did you mean 'meta_batch'"):
        d.with_(train={"meta_bach": 4})


def test_config_round_trips_through_json():
    cfg = TrainConfig(algo="imaml", inner=InnerConfig(steps=3, lr=(0.1, 0.05)), task_chunk=4)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.inner.lr, tuple)


def test_every_setting_has_a_flag_with_its_docstring_as_help():
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    text = " ".join(r.output.replace("│", " ").split())
    for s in settings():
        assert s.doc, f"{'.'.join(s.path)} has no docstring"
        assert f"--{s.flag}" in text
        assert " ".join(s.doc.split()[:4]) in text, s.doc
    # one flag per leaf setting, no two alike
    flags = [s.flag for s in settings()]
    assert len(flags) == len(set(flags))
    assert {"inner-steps", "lam", "max-kl", "trpo-cg-iters", "outer"} <= set(flags)


def test_an_unwritable_run_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = train_error("--family", "sinusoid", "--iterations", 1, "--out", blocker / "run")
    assert "cannot write the run folder" in line and "choose another --out" in line


def test_the_readme_config_example_reads(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[inner]" in b]
    assert blocks, "the README shows a config file"
    text = "\n".join(line.strip() for line in blocks[0].splitlines())
    cfg = C.resolve(families.make("navigation2d"), C.read_config_file(toml(tmp_path, text)))
    assert (cfg.iterations, cfg.inner.lr, cfg.trpo.max_kl) == (500, 0.1, 0.01)


def test_the_shipped_example_configs_read():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples" / "configs"
    two = C.resolve(families.make("navigation2d"),
                    C.read_config_file(folder / "navigation2d-two-steps.toml"))
    assert (two.inner.steps, two.inner.lr, two.iterations) == (2, (0.1, 0.05), 500)
    assert two.keep_checkpoints and two.checkpoint_every == 25
    floor = C.resolve(families.make("navigation2d"),
                      C.read_config_file(folder / "navigation2d-std-floor.toml"))
    assert floor.family_options["min_std"] == 0.25 and floor.inner.steps == 1
    assert families.make("navigation2d", **floor.family_options).policy().min_std == 0.25


def test_task_chunk_is_an_integer_or_auto(tmp_path):
    assert C.TrainConfig(task_chunk="auto").task_chunk == "auto"
    for bad in (0, "fast", 2.5):
        with pytest.raises(ConfigError, match="task-chunk must be an integer >= 1 or auto"):
            C.TrainConfig(task_chunk=bad)
    layer = C.read_config_file(toml(tmp_path, 'task_chunk = "auto"'))
    cfg = C.resolve(families.make("sinusoid"), layer)
    assert cfg.task_chunk == "auto"
    assert C.resolve(families.make("sinusoid")).task_chunk is None  # whole batch by default
    omni = families.make("omniglot", data="unused")
    assert C.resolve(omni).task_chunk == "auto"  # the conv net: timed on the machine
    line = train_error("--family", "sinusoid", "--task-chunk", "fast", "--out", tmp_path / "r")
    assert "task_chunk in settings = 'fast' is not an integer, auto or none" in line
