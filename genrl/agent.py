"""Use what you trained: a control policy that acts on **raw** observations.

``Agent.load(path)`` reads a run folder (its newest checkpoint, or ``step=``), one checkpoint
folder, or an exported agent folder, and returns an object that applies the run's saved
observation normalisation and action bounds around the policy (any family, GoRL included)::

    agent = Agent.load("runs/ip")                  # or Agent.load("runs/ip", step=10240)
    action = agent.predict(obs)                     # numpy or torch, one observation or a batch
    agent.evaluate(episodes=10, seed=0)             # the same numbers as `genrl eval`
    agent.save("exported/ip")                       # policy + normaliser + bounds, no optimiser

An exported agent folder is self-contained and pickle-free::

    agent.json                 format, env id, family, dims, action bounds, normaliser settings
    normalizer.safetensors     running mean / var / count of the observations (if normalised)
    policy/config.json, policy/model.safetensors   the policy (``policies.load_pretrained``)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from genrl.checkpoint import atomic_dir, latest_checkpoint, load_checkpoint
from genrl.errors import CheckpointError

AGENT_FORMAT = "genrl-agent"
AGENT_FORMAT_VERSION = 1
_EPS = 1e-8  # the observation normaliser's epsilon (envs.normalize.NormalizeObservationSameStep)


class Agent:
    """A trained policy with its observation normaliser and action bounds.

    Args:
        policy: any ``policies`` family module.
        env_id: the gymnasium id it was trained on (the default for ``evaluate``).
        obs_normalizer: {"mean", "var", "count"} arrays, or None if observations were not normalised.
        clip_obs: the normaliser's clip.
        action_low / action_high: the env's action box; actions are clipped to it, as in training.
        obs_resolution: the policy's observation view ({dimension: step}, ``envs.views``), applied
            to raw observations before the normaliser, as the training env did.
    """

    def __init__(
        self,
        policy: Any,
        *,
        env_id: str,
        obs_normalizer: dict[str, np.ndarray] | None,
        clip_obs: float,
        action_low: np.ndarray,
        action_high: np.ndarray,
        step: int | None = None,
        env_kwargs: dict[str, Any] | None = None,
        chunking: dict[str, int] | None = None,
        obs_resolution: dict[Any, float] | None = None,
        algo: str | None = None,
    ) -> None:
        from genrl_envs.views import parse_resolution

        self.policy = policy.eval()
        self.env_id = env_id
        self.obs_normalizer = obs_normalizer
        self.clip_obs = float(clip_obs)
        self.action_low = np.asarray(action_low, dtype=np.float32)
        self.action_high = np.asarray(action_high, dtype=np.float32)
        self.step = step
        self.env_kwargs = dict(env_kwargs or {})
        self.chunking = dict(chunking) if chunking else None
        """{"horizon", "n_obs_steps", "n_action_steps"} when the policy acts on stacked
        observations and predicts action chunks (``envs.chunking``), else None."""
        self.obs_resolution = parse_resolution(obs_resolution)
        self.algo = algo
        """The algorithm that trained it ("ppo", "bc", "sac", ...), None when unknown."""
        self._low, self._high = torch.from_numpy(self.action_low), torch.from_numpy(self.action_high)

    @property
    def family(self) -> str:
        return str(self.policy.family)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, step: int | None = None, device: str = "cpu") -> "Agent":
        """An agent from a run folder (newest checkpoint or ``step``), a checkpoint folder, or an
        exported agent folder. CheckpointError (one line) for anything else."""
        from genrl_policies.base import PolicyLoadError, load_pretrained

        path = Path(path)
        if (path / "agent.json").is_file():
            if step is not None:
                raise CheckpointError(f"{path} is an exported agent (one step); step= applies to run folders")
            return cls._load_exported(path, device)
        if (path / "state.json").is_file() and (path / "policy").is_dir():  # one checkpoint folder
            ckpt, run = path, path.parent.parent
        elif (path / "config.json").is_file():
            run = path
            ckpt = run / "checkpoints" / str(step) if step is not None else latest_checkpoint(run)
            if not ckpt.is_dir():
                from genrl.checkpoint import checkpoint_steps

                raise CheckpointError(f"{run} has no checkpoint at step {step}; steps: {checkpoint_steps(run)}")
        else:
            raise CheckpointError(f"{path} is not a genrl run, checkpoint or exported agent")
        from genrl.runs import load_run_config

        cfg = load_run_config(run)
        if not hasattr(cfg, "policy"):
            raise CheckpointError(f"{run} is a text-to-image run: use `genrl eval {run}` or genrl.image_trainer.load_finetuned")
        data = load_checkpoint(ckpt, optimizer=False)
        try:
            policy = load_pretrained(ckpt / "policy").to(device)
        except PolicyLoadError as exc:
            raise CheckpointError(str(exc)) from None
        arrays = data["env"]["arrays"]
        norm = {k: np.asarray(arrays[f"obs_rms.{k}"]) for k in ("mean", "var", "count")} if "obs_rms.mean" in arrays else None
        low, high = _action_box(cfg.env.env_id, cfg.env.env_kwargs, cfg.env.chunking)
        return cls(policy, env_id=cfg.env.env_id, obs_normalizer=norm, clip_obs=cfg.env.clip_obs, action_low=low,
                   action_high=high, step=int(data["state"]["global_step"]), env_kwargs=cfg.env.env_kwargs,
                   chunking=cfg.env.chunking, obs_resolution=cfg.env.obs_resolution, algo=cfg.algo)  # fmt: skip

    @classmethod
    def _load_exported(cls, path: Path, device: str) -> "Agent":
        from genrl_policies.base import PolicyLoadError, load_pretrained

        try:
            meta = json.loads((path / "agent.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"corrupt {path / 'agent.json'}: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != AGENT_FORMAT:
            raise CheckpointError(f"{path / 'agent.json'} is not a genrl agent file")
        if meta.get("format_version") != AGENT_FORMAT_VERSION:
            raise CheckpointError(f"{path} has agent format {meta.get('format_version')}, this genrl reads {AGENT_FORMAT_VERSION}")
        try:
            policy = load_pretrained(path / "policy").to(device)
        except PolicyLoadError as exc:
            raise CheckpointError(str(exc)) from None
        norm = None
        if meta["normalize_obs"]:
            try:
                t = load_file(str(path / "normalizer.safetensors"))
                norm = {"mean": t["mean"].numpy(), "var": t["var"].numpy(), "count": t["count"].numpy().reshape(())}
            except Exception as exc:  # safetensors' own error types on corrupt or missing files
                raise CheckpointError(f"unreadable {path / 'normalizer.safetensors'}: {str(exc).splitlines()[0]}") from None
        return cls(policy, env_id=meta["env_id"], obs_normalizer=norm, clip_obs=meta["clip_obs"],
                   action_low=np.array(meta["action_low"]), action_high=np.array(meta["action_high"]), step=meta.get("step"),
                   env_kwargs=meta.get("env_kwargs"), chunking=meta.get("chunking"), obs_resolution=meta.get("obs_resolution"), algo=meta.get("algo"))  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Export this agent (policy, normaliser, bounds; no optimiser) to a folder, atomically."""
        import genrl

        path = Path(path)
        meta = {
            "format": AGENT_FORMAT, "format_version": AGENT_FORMAT_VERSION, "genrl_version": genrl.__version__,
            "env_id": self.env_id, "env_kwargs": self.env_kwargs, "family": self.family, "step": self.step,
            "obs_dim": int(self.policy.obs_dim), "action_dim": int(self.policy.action_dim),
            "normalize_obs": self.obs_normalizer is not None, "clip_obs": self.clip_obs, "obs_epsilon": _EPS,
            "action_low": self.action_low.tolist(), "action_high": self.action_high.tolist(), "chunking": self.chunking,
            "obs_resolution": {str(k): v for k, v in self.obs_resolution.items()}, "algo": self.algo,
        }  # fmt: skip

        def write(tmp: Path) -> None:
            self.policy.save_pretrained(tmp / "policy")
            if self.obs_normalizer is not None:
                n = self.obs_normalizer
                save_file({k: torch.from_numpy(np.ascontiguousarray(np.asarray(n[k], dtype=np.float64))).reshape(-1 if k != "count" else 1)
                           for k in ("mean", "var", "count")}, str(tmp / "normalizer.safetensors"))  # fmt: skip
            (tmp / "agent.json").write_text(json.dumps(meta, indent=2))

        return atomic_dir(path, write)

    # -- acting --------------------------------------------------------------------------------
    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """The training env's observation transform (the view, then the frozen statistics), float32."""
        if self.obs_resolution:
            from genrl_envs.views import apply_view

            frames = self.chunking["n_obs_steps"] if self.chunking else 1
            obs = apply_view(np.asarray(obs), self.obs_resolution, self.policy.obs_dim // frames)
        if self.obs_normalizer is None:
            return np.asarray(obs, dtype=np.float32)
        n = self.obs_normalizer
        out = (obs - n["mean"].reshape(-1)) / np.sqrt(n["var"].reshape(-1) + _EPS)
        return np.clip(out, -self.clip_obs, self.clip_obs).astype(np.float32)

    def predict(self, obs: Any, *, deterministic: bool = True, generator: torch.Generator | None = None) -> Any:
        """Actions for raw observations: one (O,) or a batch (B, O), numpy or torch; the result
        has the same kind and batch shape, clipped to the action box. With ``chunking`` an
        observation is the stacked history (n_obs_steps * O) and an action the flattened chunk."""
        is_torch = isinstance(obs, Tensor)
        raw = obs.detach().cpu().numpy() if is_torch else np.asarray(obs)
        if raw.dtype.kind not in "fiu":
            raise TypeError(f"observations must be numbers, got dtype {raw.dtype}")
        single = raw.ndim == 1
        batch = raw[None] if single else raw
        o = self.policy.obs_dim
        if batch.ndim != 2 or batch.shape[1] != o:
            raise ValueError(f"observation has shape {tuple(raw.shape)}, expected ({o},) or (B, {o}) for {self.env_id}")
        x = torch.tensor(self.normalize(batch.astype(np.float64)), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            action, _ = self.policy.act(x, deterministic=deterministic, generator=generator)
        action = torch.maximum(torch.minimum(action.cpu(), self._high), self._low)
        action = action[0] if single else action
        return action.clone() if is_torch else action.numpy().copy()

    __call__ = predict

    def evaluate(
        self, env_id: str | None = None, *, episodes: int = 10, seed: int = 0, deterministic: bool = True,
        video_path: str | Path | None = None,
    ) -> dict[str, float]:  # fmt: skip
        """Mean / std return over ``episodes`` on ``env_id`` (default: the training env), the same
        loop and numbers as ``genrl eval``."""
        from genrl.config import EnvConfig
        from genrl.evaluate import evaluate

        kwargs = self.env_kwargs if env_id in (None, self.env_id) else {}
        env_config = EnvConfig(env_id=env_id or self.env_id, env_kwargs=kwargs, normalize_obs=self.obs_normalizer is not None,
                               clip_obs=self.clip_obs, obs_resolution={str(k): v for k, v in self.obs_resolution.items()} if kwargs is self.env_kwargs else {},
                               **(self.chunking or {}))  # fmt: skip
        return evaluate(self.policy, env_config, self.obs_normalizer, episodes=episodes, seed=seed,
                        deterministic=deterministic, video_path=video_path)  # fmt: skip


def _action_box(env_id: str, env_kwargs: dict[str, Any] | None = None, chunking: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    from genrl_envs import make_env

    extra = {"chunking": chunking} if chunking else {}
    env = make_env(env_id, 1, normalize_obs=False, normalize_reward=False, env_kwargs=env_kwargs, **extra)
    try:
        return env.spec.action_low, env.spec.action_high
    finally:
        env.close()


def load(path: str | Path, *, step: int | None = None, device: str = "cpu") -> Agent:
    """``Agent.load``: a run, checkpoint or exported agent folder as an agent on raw observations."""
    return Agent.load(path, step=step, device=device)
