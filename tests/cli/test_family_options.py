"""Bad family options on the command line: one `error:` line naming the option, exit code 2,
no traceback, and nothing trained (the checks run before the family is built)."""

import pytest

from tests.cli_run import one_line_error, run


@pytest.mark.parametrize("family, opt, fragments", [
    ("navigation2d", "rollouts=abc", [("family 'navigation2d' option rollouts='abc': expected an "
                                       "integer (e.g. --family-opt rollouts=20)")]),
    ("navigation2d", "hidden=5", ["option hidden=5", "a list of integers", "hidden=[64,64]"]),
    ("navigation2d", 'hidden="64"', ["option hidden='64'", "a list of integers"]),
    ("navigation2d", "hidden=[8.5]", ["option hidden=[8.5]", "a list of integers"]),
    ("navigation2d", "hidden=[0]", ["hidden must be a list of one or more layer sizes >= 1",
                                    "got [0]"]),
    ("navigation2d", "horizon=-3", ["family 'navigation2d': horizon must be >= 1", "got -3"]),
    ("navigation2d", "horizon=0", ["horizon must be >= 1", "got 0"]),
    ("navigation2d", "gamma=2", ["gamma must be in (0, 1]", "got 2"]),
    ("navigation2d", 'gamma="x"', ["option gamma='x': expected a number"]),
    ("navigation2d", "gae_lambda=-1", ["gae_lambda must be in [0, 1]", "got -1"]),
    ("navigation2d", "init_std=0", ["init_std must be a finite number > 0", "got 0"]),
    ("navigation2d", "estimator=foo", ["option estimator='foo'",
                                       "one of 'reinforce', 'lvc', 'dice'"]),
    ("navigation2d", "activation=foo", ["option activation='foo'", "one of 'relu', 'tanh'"]),
    ("navigation2d", "normalize_actions=yes", ["option normalize_actions='yes'",
                                               "true or false"]),
    ("navigation2d", "workers=true", ["option workers=True", "expected an integer"]),
    ("navigation2d", "rollout=5", ["does not take options named 'rollout'",
                                   "did you mean 'rollouts'?", "it takes activation, estimator"]),
    ("navigation2d", "shots=1.5", ["does not take options named 'shots'"]),
    ("sinusoid", "shots=1.5", [("family 'sinusoid' option shots=1.5: expected an integer "
                                "(e.g. --family-opt shots=10)")]),
    ("sinusoid", "shots=true", ["option shots=True", "expected an integer"]),
    ("sinusoid", 'hidden="40"', ["option hidden='40'", "a list of integers"]),
    ("sinusoid", "hidden=[0]", ["hidden must be a list of layer sizes >= 1", "got [0]"]),
    ("sinusoid", "eval_query=0", ["family 'sinusoid': eval_query must be >= 1, got 0"]),
    ("sinusoid", "shot=5", ["'shot' (did you mean 'shots'?)"]),
    ("omniglot", "ways=2.5", ["family 'omniglot' option ways=2.5: expected an integer"]),
    ("omniglot", "shots=abc", ["option shots='abc'", "expected an integer"]),
    ("omniglot", "split=foo", ["option split='foo'", "one of 'character', 'alphabet'"]),
    ("omniglot", "transductive=1", ["option transductive=1", "true or false"]),
    ("omniglot", "data=5", ["option data=5", "a string or a list of strings"]),
    ("omniglot", "way=5", ["'way' (did you mean 'ways'?)"]),
    ("halfcheetah-vel", "oracle=yes", ["option oracle='yes'", "true or false"]),  # before MuJoCo
    ("halfcheetah-vel", "rollout=5", ["'rollout' (did you mean 'rollouts'?)"]),
])
def test_bad_family_opt(family, opt, fragments, tmp_path):
    out = tmp_path / "run"
    one_line_error(run("train", "--family", family, "--iterations", 1, "--out", out,
                       "--family-opt", opt), *fragments)
    assert not out.exists()


def test_bad_shortcut_and_config_file(tmp_path):
    out = tmp_path / "run"
    one_line_error(run("train", "--family", "sinusoid", "--ways", 3, "--iterations", 1,
                       "--out", out), "family 'sinusoid' does not take options named 'ways'")
    cfg = tmp_path / "c.toml"
    cfg.write_text('family = "navigation2d"\n[family_options]\nrollouts = 2.5\n')
    one_line_error(run("train", "--config", cfg, "--iterations", 1, "--out", out),
                   "option rollouts=2.5: expected an integer")
    assert not out.exists()
