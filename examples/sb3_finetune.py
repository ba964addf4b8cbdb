"""Fine-tune an adapted metarl policy with Stable-Baselines3 PPO on the task's Gymnasium id.

    metarl adapt runs/hc-vel --task '{"velocity": 1.5}' --steps 1 --out runs/hc-vel/adapted.pt
    metarl export runs/hc-vel/adapted.pt --format sb3 --out policy.zip
    python examples/sb3_finetune.py policy.zip 200000
"""

from __future__ import annotations

import sys

import gymnasium
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

import metarl.envs  # noqa: F401  (registers metarl/HalfCheetahVel-v0, ...)


def main(model_path: str = "policy.zip", timesteps: int = 200_000,
         **ppo: float) -> tuple[float, float]:
    """Evaluate the exported policy, train it further with PPO, evaluate it again: the mean
    return over 10 episodes (SB3's deterministic evaluation: the policy's mean action)."""
    info = PPO.load(model_path).metarl  # what metarl export recorded: the id and the task
    env = Monitor(gymnasium.make(info["env_id"], task=info["task"],
                                 max_episode_steps=info["max_episode_steps"]))
    model = PPO.load(model_path, env=env, **ppo)  # the same action distribution as metarl's
    before, _ = evaluate_policy(model, env, n_eval_episodes=10)
    model.learn(total_timesteps=timesteps)
    after, _ = evaluate_policy(model, env, n_eval_episodes=10)
    print(f"{info['env_id']} {info['task']}: return {before:.1f} -> {after:.1f} after "
          f"{timesteps} PPO steps")
    return float(before), float(after)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "policy.zip",
         int(sys.argv[2]) if len(sys.argv) > 2 else 200_000)
