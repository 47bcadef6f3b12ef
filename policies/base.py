"""The policy contract every family fits, and the save/load format they share.

Shapes used in every policy module: B batch, A action dim, K chain steps, M experts.

What a PPO/GRPO loss needs from a policy, and nothing more:

* ``act(obs) -> (action, record)``: sample (or, with ``deterministic=True``, pick) an action and
  return a *record* of the sampling: a frozen dataclass of detached, batch-first tensors holding
  whatever the family needs later to score that action again (the action itself, its log-prob,
  noises, latents, time steps, a denoising chain ...).
* ``log_ratio(obs, record) -> Tensor``: log pi_theta(action | obs) - log pi_old(action | obs) for
  the current parameters against the behaviour record, shape (B,) or (B, K) for per-step chains.
  It is exactly 0 when the parameters have not changed since ``act``.
* ``regularizer(obs, record) -> Tensor | None``: a per-sample bonus the loss *maximises* with a
  weight (the entropy for a Gaussian; a family's own regulariser otherwise), shape (B,).
* ``auxiliary_loss(obs, record, returns) -> (loss, stats) | None``: a loss of the family's own
  that is minimised alongside the policy loss (e.g. PMOE's mixing-weight loss), or None;
  ``auxiliary_parameters()`` lists parameters that only this loss trains (clipped apart).
* ``begin_update()``: a hook before each update's first minibatch (no-op by default).

Optional, for the generative families (diffusion and flow policies): ``bc_loss(obs, actions)``,
their denoising objective for behaviour cloning (then ``finish_bc()`` once), and ``denoiser()``,
what test-time composition (``policies.compose``) queries. The others raise a one-line error.

The trainer never branches on the family: it stores records blindly (``record_map``), and asks
the policy for these quantities. Policies are ``torch.nn.Module``s; ``save_pretrained`` writes
``config.json`` + ``model.safetensors`` (no pickle), ``load_pretrained`` rebuilds any family.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

FORMAT_VERSION = 1

#: family name -> "module:Class". The CLI names are the keys.
POLICY_FAMILIES: dict[str, str] = {
    "gaussian": "genrl_policies.gaussian:GaussianPolicy",
    "pmoe": "genrl_policies.pmoe:PMOEPolicy",
    "policyflow": "genrl_policies.policyflow:PolicyFlowPolicy",
    "fpo": "genrl_policies.fpo:FPOPolicy",
    "diffusion": "genrl_policies.diffusion:DiffusionPolicy",
    "gorl": "genrl_policies.gorl:GoRLPolicy",
}

R = TypeVar("R")


class PolicyLoadError(ValueError):
    """A saved policy is missing, corrupt, or of a foreign family or format."""


def record_map(fn: Callable[[Tensor], Tensor], record: R) -> R:
    """Apply ``fn`` to every tensor field of a record dataclass and return a new record."""
    return dataclasses.replace(record, **{f.name: fn(getattr(record, f.name)) for f in dataclasses.fields(record)})


def check_detached(record: Any) -> None:
    """Raise if a record tensor carries gradient: an old log-prob must be a constant."""
    for f in dataclasses.fields(record):
        if getattr(record, f.name).requires_grad:
            raise RuntimeError(f"record field '{f.name}' requires grad; behaviour records must be detached")


def resolve_family(name: str) -> type[PolicyModule]:
    """Import the policy class registered under ``name``; a miss lists the valid names."""
    if name not in POLICY_FAMILIES:
        raise ValueError(f"unknown policy '{name}'; valid choices: {', '.join(sorted(POLICY_FAMILIES))}")
    module, cls = POLICY_FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


@dataclasses.dataclass
class Terms:
    """What one minibatch's loss needs from a policy (``PolicyModule.evaluate``)."""

    log_ratio: Tensor
    """(B,) or (B, K): log pi_theta - log pi_old of the recorded actions."""
    regularizer: Tensor | None = None
    """(B,) bonus the loss maximises (entropy), or None."""
    aux_loss: Tensor | None = None
    """A loss of the family's own, minimised alongside (e.g. PMOE's mixing-weight loss), or None."""
    stats: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    """Detached scalars to log."""
    chain: bool = False
    """True when a (B, K) log-ratio is per step of one sequential chain (DPPO's denoising steps:
    the algorithm weighs and clips steps by its chain schedule); False when the K are independent
    estimates (FPO's per-pair ratios: one clip, averaged)."""


class PolicyModule(nn.Module):
    """The one base class of every policy family: input checks and the save/load format.

    Subclasses set ``family`` and ``config_class`` and take ``(obs_dim, action_dim, config)``.
    """

    family: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    chain_ratio: ClassVar[bool] = False
    """``log_ratio`` is (B, K) per step of a denoising chain (``Terms.chain``)."""
    retired_config_keys: ClassVar[frozenset[str]] = frozenset()
    """Config keys of older releases that no longer belong to the family; ignored on load."""

    def __init__(self, obs_dim: int, action_dim: int, config: Any) -> None:
        super().__init__()
        if obs_dim <= 0 or action_dim <= 0:
            raise ValueError(f"obs_dim and action_dim must be positive, got {obs_dim}, {action_dim}")
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.obs_dim = int(obs_dim)
        self.action_dim = int(action_dim)
        self.config = config

    # -- the contract (families override) ----------------------------------------------------
    def act(self, obs: Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def log_ratio(self, obs: Tensor, record: Any) -> Tensor:
        raise NotImplementedError

    def regularizer(self, obs: Tensor, record: Any) -> Tensor | None:
        return None

    def auxiliary_loss(self, obs: Tensor, record: Any, returns: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]] | None:
        return None

    def evaluate(self, obs: Tensor, record: Any, returns: Tensor, *, regularize: bool = True, generator: torch.Generator | None = None) -> Terms:
        """Everything the loss needs for one minibatch, in one call (the algorithm's only call
        per minibatch): the log-ratio, the regulariser (when ``regularize``), the family's own
        loss and its statistics. Families that share work between these terms (one path point
        for PolicyFlow's ratio and Brownian regulariser, FPO's clamp statistic) override it;
        by default it composes ``log_ratio``, ``regularizer`` and ``auxiliary_loss``. Any
        randomness (PolicyFlow's t, PMOE's expert samples) comes from ``generator``, the
        algorithm's own (checkpointed) generator; None: torch's global RNG."""
        log_ratio = self.log_ratio(obs, record)
        reg = self.regularizer(obs, record) if regularize else None
        aux = self.auxiliary_loss(obs, record, returns, generator=generator)
        if aux is None:
            return Terms(log_ratio, reg, chain=self.chain_ratio)
        return Terms(log_ratio, reg, aux[0], aux[1], chain=self.chain_ratio)

    def begin_update(self) -> None:
        """Called by the algorithm once per update, before the first minibatch.

        Families whose ratio needs the behaviour parameters (e.g. a frozen copy of a velocity
        field) snapshot them here; the parameters are still those that produced the rollout.
        """

    # -- optional: behaviour cloning and composition (generative families) ---------------------
    def bc_loss(self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The scalar behaviour-cloning loss on demonstrated (obs (B, O), actions (B, A)) pairs: the
        denoising objective the family's own sampler is consistent with. Families without one
        raise."""
        raise ValueError(f"the {self.family} policy cannot be behaviour-cloned: it has no denoising objective")

    def finish_bc(self) -> None:
        """Called once after behaviour cloning; families holding frozen copies of a trained
        network (DPPO's base net) refresh them here. No-op by default."""

    def denoiser(self) -> Any:
        """The family's denoiser for test-time composition (``genrl_policies.denoisers``)."""
        raise ValueError(f"the {self.family} policy has no denoiser: only diffusion and flow policies can be composed")

    def check_bc_batch(self, obs: Tensor, actions: Tensor) -> None:
        """Raise a one-line ValueError unless obs is (B, obs_dim) and actions (B, action_dim), finite."""
        self.check_obs(obs)
        if not isinstance(actions, Tensor):
            raise TypeError(f"actions must be a torch.Tensor, got {type(actions).__name__}")
        if actions.shape != (obs.shape[0], self.action_dim):
            raise ValueError(f"actions have shape {tuple(actions.shape)}, expected ({obs.shape[0]}, {self.action_dim}) for this {self.family} policy")
        if obs.shape[0] == 0:
            raise ValueError("a behaviour-cloning batch must hold at least one sample")
        if not bool(torch.isfinite(actions).all()):
            raise ValueError("actions contain NaN or infinite values")

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        """Parameters trained only by ``auxiliary_loss`` (e.g. an auxiliary critic).

        The algorithm clips their gradient norm separately from the policy's, so an auxiliary
        regression never shrinks the policy step.
        """
        return []

    # -- input checks ---------------------------------------------------------------------------
    def check_obs(self, obs: Tensor) -> None:
        """Raise a ValueError naming the expected shape when ``obs`` is not (B, obs_dim)."""
        if not isinstance(obs, Tensor):
            raise TypeError(f"obs must be a torch.Tensor, got {type(obs).__name__}")
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"obs has shape {tuple(obs.shape)}, expected (B, {self.obs_dim}) for this {self.family} policy")

    # -- save / load ----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The JSON written as config.json: family, format version, dims and the config."""
        return {
            "family": self.family,
            "format_version": FORMAT_VERSION,
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "config": config_to_dict(self.config),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic_write(directory / "model.safetensors", lambda p: save_file(state, str(p)))
        text = json.dumps(self.describe(), indent=2)
        _atomic_write(directory / "config.json", lambda p: Path(p).write_text(text))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a flat dataclass config strictly: unknown keys are an error."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        default = names[key].default
        kwargs[key] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    return cls(**kwargs)


def load_pretrained(directory: str | os.PathLike, family: str | None = None) -> PolicyModule:
    """Rebuild a policy saved by ``save_pretrained``.

    Args:
        directory: folder holding ``config.json`` and ``model.safetensors``.
        family: if given, the saved family must be this one.
    Raises:
        PolicyLoadError: missing files, corrupt content, a foreign family or format version.
    """
    directory = Path(directory)
    cfg_path, weights = directory / "config.json", directory / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise PolicyLoadError(f"no saved policy in {directory} (need config.json and model.safetensors)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyLoadError(f"corrupt {cfg_path}: {exc}") from None
    if not isinstance(meta, dict) or "family" not in meta:
        raise PolicyLoadError(f"{cfg_path} is not a genrl policy config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PolicyLoadError(f"{cfg_path} has format_version {meta.get('format_version')}, this genrl reads {FORMAT_VERSION}")
    if family is not None and meta["family"] != family:
        raise PolicyLoadError(f"{directory} holds a '{meta['family']}' policy, expected '{family}'")
    cls = resolve_family(meta["family"])
    saved = {k: v for k, v in meta["config"].items() if k not in cls.retired_config_keys}  # keys of older releases
    policy = cls(meta["obs_dim"], meta["action_dim"], config_from_dict(cls.config_class, saved))
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise PolicyLoadError(f"corrupt {weights}: {exc}") from None
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PolicyLoadError(f"{weights} does not match the saved config: {str(exc).splitlines()[0]}") from None
    return policy


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
