"""Why Ant episodes end: length and cause of termination under zero-mean Gaussian actions.

A Gaussian policy whose mean does not matter much yet (a meta-policy early in training, or
one whose std stays near its start of 1) acts like zero-mean noise; this script measures
how long its Ant-v5 episodes last and why they end (the torso's z above or below the
healthy range, or the horizon), for a few noise levels and any ``healthy_z_range``:

    python scripts/ant_terminations.py --family ant-dir --episodes 60
    python scripts/ant_terminations.py --family ant-dir --healthy-z-range 0.2 inf
    python scripts/ant_terminations.py --family ant-dir --frame-skip 2 --horizon 200

One line per std: mean episode length, episodes ended above / below the range, episodes
that reached the horizon, mean return.
"""

from __future__ import annotations

import argparse

import numpy as np

from metarl import families


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="ant-dir", choices=["ant-dir", "ant-vel"])
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--std", type=float, nargs="+", default=[1.0, 0.5, 0.0])
    ap.add_argument("--healthy-z-range", type=float, nargs=2, default=None)
    ap.add_argument("--frame-skip", type=int, default=None,
                    help="MuJoCo steps of 0.01 s per action (default 5; rllab's Ant: 2)")
    ap.add_argument("--horizon", type=int, default=None, help="actions per episode (100)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    given = {"healthy_z_range": args.healthy_z_range, "frame_skip": args.frame_skip,
             "horizon": args.horizon}
    opts = {k: v for k, v in given.items() if v is not None}
    fam = families.make(args.family, **opts)
    task = fam.sample_tasks(1, np.random.default_rng(args.seed))[0]
    for std in args.std:
        env = fam.make_env(task)
        low, high = env.unwrapped.robot.healthy_z
        rng = np.random.default_rng(args.seed)
        lengths, returns, above, below, full = [], [], 0, 0, 0
        for ep in range(args.episodes):
            env.reset(seed=args.seed + ep)
            total, t = 0.0, 0
            while True:
                a = np.clip(std * rng.standard_normal(env.action_space.shape), -1, 1)
                _, r, terminated, truncated, _ = env.step(a.astype(np.float32))
                total, t = total + r, t + 1
                if terminated:
                    z = float(env.unwrapped.sim.data.qpos[2])
                    above, below = above + (z > high), below + (z < low)
                if terminated or truncated:
                    full += bool(truncated and not terminated)
                    break
            lengths.append(t)
            returns.append(total)
        env.close()
        print(f"{args.family} z in [{low:g}, {high:g}], {env.unwrapped.dt:g} s per action, "
              f"action std {std:g}: mean length {np.mean(lengths):.1f} of {fam.rl.horizon} "
              f"({np.mean(lengths) * env.unwrapped.dt:.2f} s); ended above the range {above}, "
              f"below {below}, at the horizon {full} of {args.episodes}; mean return "
              f"{np.mean(returns):.2f}")


if __name__ == "__main__":
    main()
