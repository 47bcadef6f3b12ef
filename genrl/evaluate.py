"""Evaluation episodes with frozen observation statistics, and rgb_array video capture."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrl.config import EnvConfig
from genrl_envs import make_env


def evaluate(
    policy: Any,
    env_config: EnvConfig,
    obs_normalizer: dict[str, np.ndarray] | None,
    *,
    episodes: int = 10,
    seed: int = 0,
    deterministic: bool = True,
    video_path: str | Path | None = None,
    max_video_frames: int = 1000,
) -> dict[str, float]:
    """Run ``episodes`` full episodes on a fresh single env and return raw-return statistics.

    The env normalises observations with the training run's statistics, frozen; rewards are
    reported unscaled. With ``video_path`` the first episode is rendered to an mp4.
    Returns {"eval/return_mean", "eval/return_std", "eval/length_mean", "eval/terminated_rate"}; the
    last is the share of episodes that ended by termination, the success rate of goal tasks
    (PointMaze, MultiGoal, OGBench's cube tasks end at the goal).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env = make_env(
        env_config.env_id,
        1,
        normalize_obs=env_config.normalize_obs,
        normalize_reward=False,
        clip_obs=env_config.clip_obs,
        render_mode="rgb_array" if video_path is not None else None,
        env_kwargs=env_config.env_kwargs,
        **env_config.wrapper_kwargs,
    )
    env.set_obs_normalizer(obs_normalizer, frozen=True)
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    returns: list[float] = []
    lengths: list[int] = []
    terminated: list[bool] = []
    frames: list[np.ndarray] = []
    obs = env.reset(seed=seed)
    was_training = policy.training
    policy.eval()
    try:
        with torch.inference_mode():
            while len(returns) < episodes:
                if video_path is not None and not returns and len(frames) < max_video_frames:
                    frames.append(env.render())
                action, _ = policy.act(obs.to(device), deterministic=deterministic, generator=generator)
                out = env.step(action.cpu())
                returns += out.episode_returns
                lengths += out.episode_lengths
                if out.episode_returns:
                    terminated.append(bool(out.terminated[0]))
                obs = out.obs
    finally:
        policy.train(was_training)
        env.close()
    if video_path is not None and frames:
        write_video(video_path, frames, fps=int(env_fps(env_config.env_id)))
    returns = returns[:episodes]
    return {
        "eval/return_mean": float(np.mean(returns)),
        "eval/return_std": float(np.std(returns)),
        "eval/length_mean": float(np.mean(lengths[:episodes])),
        "eval/terminated_rate": float(np.mean(terminated[:episodes])),
    }


def env_fps(env_id: str) -> float:
    import gymnasium as gym

    env = gym.make(env_id)
    fps = env.metadata.get("render_fps") or 30
    env.close()
    return fps if math.isfinite(fps) else 30


def write_video(path: str | Path, frames: list[np.ndarray], fps: int = 30) -> Path:
    """Write RGB frames (H, W, 3) uint8 to an mp4 (or a gif if the suffix says so)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=1.0 / fps)
    else:
        imageio.mimsave(path, frames, fps=fps, macro_block_size=1)
    return path
