"""genrl: reinforcement learning with generative policies.

Python API: ``genrl.train(TrainConfig(...))``, ``genrl.Agent.load(run)`` (a trained policy that
acts on raw observations: ``predict``, ``evaluate``, ``save``), ``genrl.evaluate``,
``genrl.plot_runs``; the command line ``genrl train|eval|plot|presets`` wraps the same functions.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Agent", "EnvConfig", "PPOConfig", "RunConfig", "TrainConfig", "__version__", "evaluate", "load", "plot_runs", "train"]


def __getattr__(name: str) -> Any:  # lazy: `import genrl` stays cheap
    if name in ("Agent", "load"):
        from genrl import agent

        return getattr(agent, name)
    if name == "train":
        from genrl.trainer import train

        return train
    if name in ("TrainConfig", "EnvConfig", "RunConfig"):
        from genrl import config

        return getattr(config, name)
    if name == "PPOConfig":
        from genrl.algos.ppo import PPOConfig

        return PPOConfig
    if name == "evaluate":
        from genrl.evaluate import evaluate

        return evaluate
    if name == "plot_runs":
        from genrl.plot import plot_runs

        return plot_runs
    raise AttributeError(f"module 'genrl' has no attribute '{name}'")
