"""metarl render: an episode before adaptation and after each step, written as .gif, .mp4 or
a .png contact sheet; MuJoCo offscreen (skipped, with the reason, where it cannot render),
navigation2d as a trajectory plot everywhere; bad input gets one line."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before MuJoCo is first imported in this process

import numpy as np
import pytest
from PIL import Image, ImageSequence

from metarl import checkpoint, render
from tests.cli_run import one_line_error, run


def gif_frames(path):
    with Image.open(path) as im:
        return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]


@pytest.fixture(scope="module")
def nav_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nav") / "run"
    r = run("train", "--family", "navigation2d", "--iterations", 1, "--meta-batch", 2,
            "--rollouts", 2, "--horizon", 30, "--device", "cpu", "--family-opt", "hidden=[8]",
            "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_navigation_gif_side_by_side_frames_differ_after_adaptation(nav_run, tmp_path):
    out = tmp_path / "nav.gif"
    r = run("render", nav_run, "--task", '{"goal": [0.3, -0.2]}', "--steps", 1, "--out", out,
            "--lr", 1.0, "--width", 160, "--height", 120)
    assert r.exit_code == 0, r.output
    assert "before adaptation" in r.output and "after step 1" in r.output
    frames = gif_frames(out)
    assert len(frames) >= 2
    last = frames[-1]
    w = last.shape[1] // 2  # two panels side by side: before | after
    left, right = last[:, :w], last[:, w:2 * w]
    assert render.frame_difference(left, right) > 0.5


def test_navigation_episodes_differ_and_sequence_layout(nav_run, tmp_path):
    done = render.render_adaptation(checkpoint.load(nav_run), {"goal": [0.3, -0.2]},
                                    tmp_path / "seq.gif", steps=2, lr=(1.0,), layout="sequence",
                                    width=160, height=120)
    before, after = done.episodes[0], done.episodes[2]
    assert not np.allclose(before.positions, after.positions)
    assert len(done.episodes) == 3 and len(done.adapt_returns) == 3
    assert done.n_frames == sum(len(e.positions) for e in done.episodes)
    done = render.render_adaptation(checkpoint.load(nav_run), {"goal": [0.3, -0.2]},
                                    tmp_path / "sheet.png", steps=1, frames=3, width=160,
                                    height=120)
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.size[0] == 3 * 160 and im.size[1] == 2 * (120 + 26)  # 2 rows x 3 frames


@pytest.fixture(scope="module")
def cheetah_run(tmp_path_factory):
    pytest.importorskip("mujoco")
    out = tmp_path_factory.mktemp("hc") / "run"
    r = run("train", "--family", "halfcheetah-dir", "--iterations", 1, "--meta-batch", 2,
            "--rollouts", 2, "--horizon", 12, "--device", "cpu", "--family-opt", "hidden=[8]",
            "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_mujoco_render_frames_differ_before_and_after(cheetah_run, tmp_path):
    reason = render.offscreen_error()
    if reason is not None:
        pytest.skip(reason)
    fmt = ".mp4"
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        fmt = ".gif"
    out = tmp_path / f"rollouts{fmt}"
    r = run("render", cheetah_run, "--task", '{"direction": -1}', "--steps", 1, "--out", out,
            "--lr", 1.0, "--width", 96, "--height", 64)
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 0
    done = render.render_adaptation(checkpoint.load(cheetah_run), {"direction": -1},
                                    tmp_path / "f.gif", steps=1, lr=(1.0,), width=96, height=64)
    before, after = done.episodes
    assert len(before.frames) == 13 and before.frames[0].shape == (64, 96, 3)
    assert render.frame_difference(before.frames[0], before.frames[-1]) > 0  # it moves
    assert render.frame_difference(before.frames[-1], after.frames[-1]) > 0  # adapted differs
    assert before.ret != after.ret
    frames = gif_frames(tmp_path / "f.gif")
    w = frames[-1].shape[1] // 2
    assert render.frame_difference(frames[-1][:, :w], frames[-1][:, w:2 * w]) > 0


def test_offscreen_unavailable_is_one_line(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "wgl")  # no such offscreen backend here
    reason = render.offscreen_error()
    if reason is not None and "MuJoCo is missing" in reason:
        pytest.skip(reason)
    assert reason is not None and "\n" not in reason and "MUJOCO_GL=egl" in reason


def test_render_bad_input_one_line(nav_run, tmp_path):
    task = '{"goal": [0.3, -0.2]}'
    one_line_error(run("render", nav_run, "--task", '{"velocity": 1}', "--out",
                       tmp_path / "a.gif"), "bad task for family 'navigation2d'")
    one_line_error(run("render", nav_run, "--task", "{goal", "--out", tmp_path / "a.gif"),
                   "--task is not valid JSON")
    one_line_error(run("render", nav_run, "--task", task, "--out", tmp_path / "a.avi"),
                   ".gif, .mp4, .png")
    one_line_error(run("render", nav_run, "--task", task, "--layout", "grid", "--out",
                       tmp_path / "a.gif"), "--layout 'grid'")
    sin = tmp_path / "sin"
    r = run("train", "--family", "sinusoid", "--iterations", 1, "--out", sin,
            "--family-opt", "hidden=[4]", "--device", "cpu")
    assert r.exit_code == 0, r.output
    one_line_error(run("render", sin, "--task", task, "--out", tmp_path / "a.gif"),
                   "is for RL families")
