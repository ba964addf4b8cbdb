"""Rollout videos: one episode before adaptation and after each step, titled with its return.

MuJoCo families render offscreen with MuJoCo's own OpenGL contexts: EGL (GPU or
Mesa's software EGL) or OSMesa, chosen by ``MUJOCO_GL`` (``egl`` when unset).
No display is needed. Navigation2d (and any family whose observation starts with
a 2-D position, flagged by :func:`is_planar`) is drawn as a matplotlib
trajectory plot, which needs no OpenGL at all.

Episodes are sampled as metarl samples them (actions drawn from the policy with
a seeded generator, mapped onto the action Box with ``normalize_actions``),
one per policy, from the same start state seed. Frames are composed side by
side (one panel per policy, all playing at once) or in sequence, and written
as ``.gif`` (Pillow), ``.mp4`` (imageio-ffmpeg, the ``video`` extra) or
``.png`` (a contact sheet: a row per policy, a few frames each).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gymnasium
import numpy as np
import torch

from metarl import checkpoint
from metarl import params as P
from metarl.evaluate import eval_rates, score_while_adapting
from metarl.inner import InnerConfig
from metarl.rl.family import RLFamily
from metarl.types import ConfigError, Params

__all__ = ["GL_HINT", "VIDEO_HINT", "Episode", "Rendered", "offscreen_error", "record",
           "render_adaptation", "write"]

GL_HINT = ("install EGL (Debian/Ubuntu: apt-get install libegl1; Mesa's software EGL works "
           "without a GPU) or OSMesa (apt-get install libosmesa6) and set MUJOCO_GL=egl or "
           "MUJOCO_GL=osmesa")
"""What a machine needs to render MuJoCo offscreen."""
VIDEO_HINT = 'pip install -c constraints.txt -e ".[video]"'
"""The fix printed when .mp4 output lacks imageio-ffmpeg."""
FORMATS = (".gif", ".mp4", ".png")
Layout = Literal["side-by-side", "sequence"]


@dataclass
class Episode:
    """One recorded episode of one policy."""

    label: str
    """E.g. "before adaptation", "after step 1"."""
    ret: float
    """Undiscounted return."""
    frames: list[np.ndarray] = field(default_factory=list)
    """``[h, w, 3]`` uint8 images, one per step (the start state first)."""
    positions: np.ndarray | None = None
    """Planar families: ``[n_steps + 1, 2]`` positions."""


# --- MuJoCo offscreen rendering -------------------------------------------------------------


def _backend() -> str:
    return os.environ.get("MUJOCO_GL", "").strip().lower() or "egl"


def _gl_context(width: int, height: int) -> Any:
    """An offscreen OpenGL context of the ``MUJOCO_GL`` backend, made current.

    Raises:
        ConfigError: neither usable (one line: what is missing and how to get it).
    """
    backend = _backend()
    if backend not in ("egl", "osmesa", "glfw"):
        raise ConfigError(f"MUJOCO_GL={backend!r} cannot render offscreen: set MUJOCO_GL=egl "
                          "or MUJOCO_GL=osmesa")
    try:
        module = importlib.import_module(f"mujoco.{backend}")
        ctx = module.GLContext(width, height)
        ctx.make_current()
    except Exception as e:  # ImportError, EGL/OSMesa errors, AttributeError of a missing lib
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise ConfigError(f"MuJoCo cannot render offscreen with MUJOCO_GL={backend} ({reason}): "
                          f"{GL_HINT}") from None
    return ctx


def offscreen_error() -> str | None:
    """None when MuJoCo can render offscreen here, else the one-line reason (tests skip
    with it)."""
    try:
        import mujoco
    except ImportError as e:
        return f"MuJoCo is missing ({e})"
    try:
        ctx = _gl_context(16, 16)
    except ConfigError as e:
        return str(e)
    model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='1'/></worldbody>"
                                           "</mujoco>")
    try:
        with _Camera(model, 16, 16, ctx=ctx) as cam:
            cam.render(mujoco.MjData(model))
    except Exception as e:
        return f"MuJoCo's offscreen rendering failed ({type(e).__name__}: {e}): {GL_HINT}"
    return None


class _Camera:
    """Renders a MuJoCo model's state to ``[height, width, 3]`` uint8 images, offscreen,
    with a camera tracking body 1 (the robot's root) from the side."""

    def __init__(self, model: Any, width: int, height: int, *, ctx: Any = None,
                 distance: float = 4.0, elevation: float = -15.0, azimuth: float = 90.0) -> None:
        import mujoco

        self.mj, self.model, self.width, self.height = mujoco, model, width, height
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), width)
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), height)
        self.ctx = ctx or _gl_context(width, height)
        self.ctx.make_current()
        self.scene = mujoco.MjvScene(model, maxgeom=2000)
        self.option, self.pert = mujoco.MjvOption(), mujoco.MjvPerturb()
        self.cam = mujoco.MjvCamera()
        if model.nbody > 1:
            self.cam.type = mujoco.mjtCamera.mjCAMERA_TRACKING
            self.cam.trackbodyid = 1
        self.cam.distance, self.cam.elevation, self.cam.azimuth = distance, elevation, azimuth
        self.con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self.con)
        self.rect = mujoco.MjrRect(0, 0, width, height)
        self.rgb = np.empty((height, width, 3), dtype=np.uint8)

    def render(self, data: Any) -> np.ndarray:
        mj = self.mj
        self.ctx.make_current()
        mj.mjv_updateScene(self.model, data, self.option, self.pert, self.cam,
                           mj.mjtCatBit.mjCAT_ALL, self.scene)
        mj.mjr_render(self.rect, self.scene, self.con)
        mj.mjr_readPixels(self.rgb, None, self.rect, self.con)
        return np.flipud(self.rgb).copy()  # OpenGL's rows run bottom-up

    def close(self) -> None:
        self.con.free()
        free = getattr(self.ctx, "free", None)
        if free is not None:
            free()

    def __enter__(self) -> _Camera:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _mujoco_sim(env: gymnasium.Env) -> Any | None:
    """The object holding ``model`` and ``data`` of a MuJoCo env (metarl's locomotion envs
    keep Gymnasium's as ``sim``), or None."""
    try:
        import mujoco
    except ImportError:
        return None
    u = env.unwrapped
    for obj in (getattr(u, "sim", None), u):
        if obj is not None and isinstance(getattr(obj, "model", None), mujoco.MjModel):
            return obj
    return None


def is_planar(family: RLFamily) -> bool:
    """Families drawn as 2-D trajectories (navigation2d: the observation is the position)."""
    return family.name == "navigation2d"


# --- episodes ----------------------------------------------------------------------------------


def record(family: RLFamily, phis: Sequence[Params], labels: Sequence[str],
           task: Mapping[str, Any], *, seed: int = 0, width: int = 320,
           height: int = 240) -> list[Episode]:
    """One episode of ``family``'s task with each policy (parameters without a task
    dimension), from the same start-state seed, actions drawn with ``seed``.

    MuJoCo environments record a frame per step (start state first); planar families
    record positions (frames are drawn by :func:`write`).

    Raises:
        ConfigError: the family's environment can be neither rendered nor drawn, or
        offscreen rendering is not available (with what to install).
    """
    policy = family.policy()
    scale_offset = None
    act_space = family._spaces()[1]
    if family.normalize_actions and isinstance(act_space, gymnasium.spaces.Box):
        low = torch.as_tensor(act_space.low, dtype=torch.float64)
        high = torch.as_tensor(act_space.high, dtype=torch.float64)
        scale_offset = ((high - low) / 2, (high + low) / 2)
    planar = is_planar(family)
    episodes = []
    env = family.make_env(dict(task))
    camera: _Camera | None = None
    try:
        sim: Any = None if planar else _mujoco_sim(env)
        if not planar and sim is None:
            raise ConfigError(f"metarl render draws MuJoCo families and navigation2d; family "
                              f"{family.name!r}'s environment ({type(env.unwrapped).__name__}) "
                              "is neither")
        if sim is not None:
            camera = _Camera(sim.model, width, height)
        for phi, label in zip(phis, labels):
            obs, _ = env.reset(seed=seed)  # the same start state for every policy
            gen = torch.Generator().manual_seed(seed)
            th = P.expand(P.to(P.detach(phi), torch.device("cpu"), torch.float32), 1)
            ep = Episode(label=label, ret=0.0)
            pos = [np.asarray(obs, dtype=np.float64)[:2]]
            if camera is not None:
                ep.frames.append(camera.render(sim.data))
            for _ in range(family.rl.horizon):
                o = torch.as_tensor(np.asarray(obs, dtype=np.float64)).float().view(1, 1, -1)
                with torch.no_grad():
                    a = policy.dist(th, o).sample(gen)[0, 0].double()  # [act]
                if scale_offset is not None:
                    a = a * scale_offset[0] + scale_offset[1]
                obs, reward, term, trunc, _ = env.step(a.numpy().astype(act_space.dtype))
                ep.ret += float(reward)
                pos.append(np.asarray(obs, dtype=np.float64)[:2])
                if camera is not None:
                    ep.frames.append(camera.render(sim.data))
                if term or trunc:
                    break
            if planar:
                ep.positions = np.stack(pos)
            episodes.append(ep)
    finally:
        if camera is not None:
            camera.close()
        env.close()
    return episodes


@dataclass
class Rendered:
    """What :func:`render_adaptation` wrote."""

    path: Path
    episodes: list[Episode]
    adapt_returns: list[float]
    """Average return of the adaptation trajectories before each step and after the last
    (what ``metarl adapt`` prints)."""
    n_frames: int


def adapted_policies(family: RLFamily, theta: Params, task: Mapping[str, Any], *, steps: int,
                     lr: Sequence[float], rollouts: int | None, seed: int,
                     rule: InnerConfig | None = None) -> tuple[list[Params], list[float]]:
    """phi_0 = theta, phi_1, ..., phi_K of adapting to ``task`` as ``metarl adapt`` does
    (trajectories resampled with each phi_j; ``rule``: the run's inner optimizer), and the
    average return before each step and after the last."""
    batch = family.batch_for([dict(task)], seed, rollouts=rollouts)
    phi = P.expand(P.to(P.detach(theta), torch.device("cpu"), torch.float32), 1)
    kept: list[Params] = []
    _, returns, _ = score_while_adapting(batch, phi, steps,
                                         (rule or InnerConfig()).with_steps(steps, tuple(lr)),
                                         keep=kept)
    return [{k: v[0] for k, v in p.items()} for p in kept], [float(r[0]) for r in returns]


def render_adaptation(run: checkpoint.Run, task: Mapping[str, Any], out: str | Path, *,
                      steps: int = 1, lr: Sequence[float] | None = None,
                      rollouts: int | None = None, seed: int = 0,
                      layout: Layout = "side-by-side", fps: float | None = None,
                      width: int = 320, height: int = 240, frames: int = 6) -> Rendered:
    """Adapt ``run``'s policy to ``task`` for ``steps`` steps and write one episode before
    adaptation and after each step (see the module docstring for the formats).

    Raises:
        ConfigError: not an RL run, an unknown output format, a task that does not fit,
        no offscreen rendering, or .mp4 without imageio-ffmpeg.
    """
    family = run.family()
    if not isinstance(family, RLFamily):
        raise ConfigError(f"metarl render is for RL families; {family.name!r} is "
                          f"{family.kind}")
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out {str(path)!r}: write a {', '.join(FORMATS)} file")
    if path.suffix.lower() == ".mp4":
        _require_ffmpeg()
    try:
        spec = family.check_task(dict(task) if isinstance(task, Mapping) else task)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"bad task for family {family.name!r}: {e}") from None
    rates = eval_rates(run, family, lr)
    phis, returns = adapted_policies(family, run.theta, spec, steps=steps, lr=rates,
                                     rollouts=rollouts, seed=seed, rule=run.config.inner)
    labels = ["before adaptation"] + [f"after step {j}" for j in range(1, steps + 1)]
    episodes = record(family, phis, labels, spec, seed=seed, width=width, height=height)
    dt = _env_dt(family, spec)
    n = write(episodes, path, layout=layout, fps=fps or (1.0 / dt if dt else 20.0),
              width=width, height=height, frames=frames, task=spec)
    return Rendered(path=path, episodes=episodes, adapt_returns=returns, n_frames=n)


def _env_dt(family: RLFamily, task: Mapping[str, Any]) -> float | None:
    env = family.make_env(dict(task))
    try:
        dt = getattr(env.unwrapped, "dt", None)
        return float(dt) if dt else None
    finally:
        env.close()


# --- composing and writing ------------------------------------------------------------------


def _require_ffmpeg() -> Any:
    try:
        import imageio.v2 as iio
        import imageio_ffmpeg  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"writing .mp4 needs imageio-ffmpeg ({e}): run {VIDEO_HINT}, or "
                          "write a .gif") from None
    return iio


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _titled(img: np.ndarray, title: str, bar: int = 26) -> np.ndarray:
    """``img`` with a white title bar above it."""
    from PIL import Image, ImageDraw

    h, w = img.shape[:2]
    canvas = Image.new("RGB", (w, h + bar), "white")
    canvas.paste(Image.fromarray(img), (0, bar))
    ImageDraw.Draw(canvas).text((6, 4), title, fill="black", font=_font(15))
    return np.asarray(canvas)


def _planar_frames(episodes: Sequence[Episode], task: Mapping[str, Any], width: int,
                   height: int) -> list[list[np.ndarray]]:
    """Per episode, a matplotlib drawing of its trajectory up to each step."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image, ImageDraw

    goal = task.get("goal")
    pts = np.concatenate([e.positions for e in episodes if e.positions is not None])
    lo = np.minimum(pts.min(0), goal if goal is not None else pts.min(0)) - 0.1
    hi = np.maximum(pts.max(0), goal if goal is not None else pts.max(0)) + 0.1
    out = []
    for ep in episodes:
        assert ep.positions is not None
        fig = Figure(figsize=(width / 80, height / 80), dpi=80)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_axes((0.12, 0.1, 0.84, 0.86))
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal", adjustable="box")
        ax.grid(alpha=0.3)
        ax.plot([0], [0], "ko", ms=4)
        if goal is not None:
            ax.plot([goal[0]], [goal[1]], "r*", ms=14)
        canvas.draw()  # type: ignore[no-untyped-call]  # the axes once; the trajectory is drawn onto copies of them
        rgba = np.asarray(canvas.buffer_rgba())  # type: ignore[no-untyped-call]
        background = Image.fromarray(rgba[..., :3].copy())
        xy = ax.transData.transform(ep.positions)  # [n, 2] pixels, origin bottom-left
        xy[:, 1] = background.height - xy[:, 1]
        points = [(float(x), float(y)) for x, y in xy]
        frames = []
        for t in range(len(points)):
            img = background.copy()
            draw = ImageDraw.Draw(img)
            if t:
                draw.line(points[: t + 1], fill=(31, 119, 180), width=2)
            x, y = points[t]
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(31, 119, 180))
            frames.append(np.asarray(img))
        out.append(frames)
    return out


def _even(img: np.ndarray) -> np.ndarray:
    """Pad to even height and width (H.264 needs both even)."""
    h, w = img.shape[:2]
    return np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)


def write(episodes: Sequence[Episode], path: str | Path, *, layout: Layout = "side-by-side",
          fps: float = 20.0, width: int = 320, height: int = 240, frames: int = 6,
          task: Mapping[str, Any] | None = None) -> int:
    """Compose the episodes' frames (each titled with its label and return) and write them.

    ``.gif``/``.mp4``: an animation, panels side by side (an episode that ended early
    holds its last frame) or one episode after another; ``.png``: a contact sheet, one
    row per episode, ``frames`` frames evenly spaced over it. Returns the number of
    frames written (rows for ``.png``).
    """
    path = Path(path)
    if layout not in ("side-by-side", "sequence"):
        raise ConfigError(f"layout {layout!r} is not side-by-side or sequence")
    if all(e.positions is not None for e in episodes):
        per_ep = _planar_frames(episodes, task or {}, width, height)
    else:
        per_ep = [list(e.frames) for e in episodes]
    titled = [[_titled(f, f"{e.label}: return {e.ret:.1f}") for f in fs]
              for e, fs in zip(episodes, per_ep)]
    suffix = path.suffix.lower()
    if suffix == ".png":
        rows = []
        for fs in titled:
            idx = np.linspace(0, len(fs) - 1, max(1, frames)).round().astype(int)
            rows.append(np.concatenate([fs[i] for i in idx], axis=1))
        sheet = np.concatenate(rows, axis=0)
        _save_png(sheet, path)
        return len(rows)
    if layout == "side-by-side":
        n = max(len(fs) for fs in titled)
        movie = [np.concatenate([fs[min(t, len(fs) - 1)] for fs in titled], axis=1)
                 for t in range(n)]
    else:
        movie = [f for fs in titled for f in fs]
    movie = [_even(f) for f in movie]
    if suffix == ".gif":
        _save_gif(movie, path, fps)
    else:
        _save_mp4(movie, path, fps)
    return len(movie)


def _save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    checkpoint.atomic_write(path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))


def _save_gif(movie: Sequence[np.ndarray], path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in movie]
    duration = max(20, int(round(1000.0 / fps / 10.0)) * 10)  # GIF delays are in 1/100 s
    checkpoint.atomic_write(path, lambda tmp: images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0))


def _save_mp4(movie: Sequence[np.ndarray], path: Path, fps: float) -> None:
    iio = _require_ffmpeg()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".mp4")
    os.close(fd)  # ffmpeg picks the container from the suffix, so the temporary file keeps it
    try:
        with iio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                            macro_block_size=1, ffmpeg_log_level="error") as w:
            for f in movie:
                w.append_data(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def frame_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference of two frames (0..255)."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())

