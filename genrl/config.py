"""Typed run configuration: frozen dataclasses, strict loading from dicts, TOML and YAML.

``TrainConfig`` is the one root for every algorithm, keyed by ``algo``: the task's section (``env``
for control, ``t2i`` for text-to-image), the policy's (``policy`` + its typed ``policy_config``),
the algorithm's (``ppo`` [+ ``gorl``], ``grpo``, or a registered algorithm's ``algo_config``) and
``run``. Sections another algorithm uses must stay at their defaults. It is written to
``<out>/config.json`` (only the sections the algorithm uses) and read back on resume. Unknown keys
are errors that suggest the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from genrl.algos.gorl import GoRLTrainConfig
from genrl.algos.grpo import ALGOS as IMAGE_ALGOS
from genrl.algos.grpo import GRPOConfig
from genrl.algos.ppo import PPOConfig
from genrl.config_tools import (  # noqa: F401  re-exported: genrl.config is where users look
    MOVED,
    RENAMED,
    _build,
    _coerce,
    field_docs,
    image_layout,
    load_config_file,
    merge,
    upgrade_config,
)
from genrl.errors import ConfigError
from genrl.presets import resolve_preset

ALGOS = ("ppo",)
"""Built-in control algorithms; ``genrl.algos.base.register_control_algorithm`` adds more."""


def control_algos() -> tuple[str, ...]:
    from genrl.algos.base import CONTROL_ALGORITHMS

    return ALGOS + tuple(CONTROL_ALGORITHMS)


@dataclass(frozen=True)
class EnvConfig:
    env_id: str = "Hopper-v5"
    """Any registered gymnasium id with Box observations and actions, or "module:EnvId" (the
    module is imported first and registers the id, gymnasium's own convention)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``gymnasium.make`` (e.g. {"ctrl_cost_weight": 0.1})."""
    n_envs: int = 1
    backend: str = "auto"
    """Simulator back end: "gymnasium", "torch" (genrl/MultiGoal-v0, genrl/PointMaze-v0 as batched
    torch tasks), "envpool" (C++ thread pool), "warp" (MuJoCo Warp, GPU), or "auto" ("torch" where
    the id has a torch-native version, else "gymnasium"). Worlds of "torch" / "warp" live on
    run.device."""
    vectorization: str = "sync"
    """"sync" or "async": gymnasium, one subprocess per env; envpool, send/recv so the simulator
    runs while the algorithm stores the step."""
    normalize_obs: bool = True
    normalize_reward: bool = True
    clip_obs: float = 10.0
    clip_reward: float = 10.0
    reward_scale: float = 1.0
    """Training rewards are multiplied by this after normalisation (GoRL / Brax: 10, unnormalised)."""
    horizon: int = 1
    """Action chunk the policy predicts per decision (Diffusion Policy's horizon); 1: one action."""
    n_obs_steps: int = 1
    """Observations stacked as the policy's input (oldest first)."""
    n_action_steps: int = 1
    """Actions of each chunk executed before the next decision (<= horizon)."""
    obs_resolution: dict[str, float] = field(default_factory=dict)
    """The policy's observation view (``envs.views``): {"dimension index": step}, each listed
    dimension rounded to a multiple of its step (a coarse sensor), e.g. {"19": 0.5}; gymnasium
    back end. GPC composes parents with different views."""

    @property
    def chunking(self) -> dict[str, int] | None:
        """{"horizon", "n_obs_steps", "n_action_steps"}, or None for one action per observation."""
        c = {"horizon": self.horizon, "n_obs_steps": self.n_obs_steps, "n_action_steps": self.n_action_steps}
        return None if set(c.values()) == {1} else c

    @property
    def wrapper_kwargs(self) -> dict[str, Any]:
        """``make_env`` keyword arguments of the gymnasium wrappers this config asks for
        (``chunking``, ``obs_resolution``); empty when it asks for none."""
        out: dict[str, Any] = {}
        if self.chunking:
            out["chunking"] = self.chunking
        if self.obs_resolution:
            out["obs_resolution"] = dict(self.obs_resolution)
        return out

    def __post_init__(self) -> None:
        if not (math.isfinite(self.reward_scale) and self.reward_scale > 0):
            raise ConfigError(f"invalid env.reward_scale = {self.reward_scale} (must be > 0)")
        if self.n_envs < 1:
            raise ConfigError(f"invalid env.n_envs = {self.n_envs} (must be >= 1)")
        from genrl_envs import BACKENDS, EnvError, resolve_backend

        if self.backend not in BACKENDS:
            raise ConfigError(f"invalid env.backend = {self.backend!r}; valid: {', '.join(BACKENDS)}")
        try:  # an optional back end that is not installed is refused here, with its pip command
            from genrl_envs.chunking import check_chunking
            from genrl_envs.views import parse_resolution

            check_chunking(self.horizon, self.n_obs_steps, self.n_action_steps)
            parse_resolution(self.obs_resolution)
            resolve_backend(self.env_id, self.backend, chunked=self.chunking is not None, viewed=bool(self.obs_resolution))
        except EnvError as exc:
            raise ConfigError(str(exc)) from None
        if self.vectorization not in ("sync", "async"):
            raise ConfigError(f"invalid env.vectorization = {self.vectorization!r}; valid: sync, async")
        if not (self.clip_obs > 0 and self.clip_reward > 0):
            raise ConfigError("env.clip_obs and env.clip_reward must be positive")


@dataclass(frozen=True)
class RunConfig:
    total_steps: int = 1_000_000
    """Environment steps (summed over envs); rounded up to whole iterations."""
    seed: int = 1
    out: str | None = None
    """Run folder; default: a new ``runs/<env>__<policy or algo>__<seed>__<time>``."""
    save_every: int | None = None
    """Write a checkpoint every this many env steps (t2i: images); default: a tenth of the run;
    0: only at the end (and on SIGINT / SIGTERM)."""
    save_minutes: float = 30.0
    """Also write a checkpoint when this many minutes passed since the last one (0: off)."""
    keep_checkpoints: int = 5
    """Keep the newest N checkpoints (0: keep all); the final one is always the newest."""
    eval_every: int = 0
    """Evaluate every this many env steps (0: only at the end)."""
    eval_episodes: int = 10
    progress: bool = True
    """Show a progress bar."""
    torch_threads: int = 1
    """Intra-op threads; 1 is fastest for small MLPs and avoids oversubscription."""
    device: str = "cpu"
    wandb: bool = False
    """Also log metrics and the config to Weights & Biases (``pip install genrl[wandb]``)."""
    wandb_project: str = "genrl"
    distributed: str = "auto"
    """Data parallelism over processes (``genrl.distributed``; torchrun launches them): "auto"
    (on when torchrun started WORLD_SIZE > 1 processes), "ddp" (the same, but refuses to run
    without torchrun) or "off". run.total_steps counts the env steps of all processes."""
    distributed_timeout_s: float = 1800.0
    """Seconds a collective waits for the other processes; then (or when one dies) every rank
    stops with one line, and the last checkpoint stays intact."""

    def __post_init__(self) -> None:
        if self.distributed not in ("auto", "off", "ddp"):
            raise ConfigError(f"invalid run.distributed = {self.distributed!r}; valid: auto, off, ddp")
        if not (math.isfinite(self.distributed_timeout_s) and self.distributed_timeout_s > 0):
            raise ConfigError(f"invalid run.distributed_timeout_s = {self.distributed_timeout_s!r} (seconds > 0)")
        if self.total_steps < 1:
            raise ConfigError(f"invalid run.total_steps = {self.total_steps} (must be >= 1)")
        if self.seed < 0 or self.seed >= 2**63:
            raise ConfigError(f"invalid run.seed = {self.seed} (must be in [0, 2^63))")
        if self.out is not None and (not isinstance(self.out, str) or not self.out.strip()):
            raise ConfigError(f"invalid run.out = {self.out!r} (a folder path)")
        if self.save_every is not None and (not isinstance(self.save_every, int) or isinstance(self.save_every, bool) or self.save_every < 0):
            raise ConfigError(f"invalid run.save_every = {self.save_every!r} (an integer >= 0)")
        if self.eval_every < 0:
            raise ConfigError("run.eval_every must be >= 0")
        if not (math.isfinite(self.save_minutes) and self.save_minutes >= 0) or self.keep_checkpoints < 0:
            raise ConfigError("run.save_minutes and run.keep_checkpoints must be >= 0")
        if self.eval_episodes < 1:
            raise ConfigError(f"invalid run.eval_episodes = {self.eval_episodes} (must be >= 1)")
        if self.torch_threads < 1:
            raise ConfigError(f"invalid run.torch_threads = {self.torch_threads}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"invalid run.device = {self.device!r}; valid: cpu, cuda, cuda:N")


@dataclass(frozen=True)
class ImageTaskConfig:
    """The ``[t2i]`` section: the text-to-image "environment" (``--algo flow-grpo | g2rpo``)."""

    model: str = "digits"
    """"digits" (the shipped digits model) or a local diffusers pipeline folder (e.g. SD3.5)."""
    prompts: str | None = None
    """A prompts file (one per line, or a JSON list) or a built-in set; default: the model's."""
    reward: str = "digit"
    """Reward spec: "digit", "digit=1,jpeg_compressibility=0.1", "clip:DIR", "module:fn" ..."""
    dtype: str = "float32"
    """Model weights' dtype: "float32", or "bfloat16" / "float16" for large models on a GPU
    (latents, SDE log-probs and LoRA weights stay float32)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"invalid t2i.dtype {self.dtype!r}; valid: float32, bfloat16, float16")
        if not self.model.strip() or not self.reward.strip():
            raise ConfigError("t2i.model and t2i.reward must not be empty")


#: ``run`` defaults of text-to-image runs (``total_steps`` counts scored images; ``eval_episodes``
#: is the number of seeds per prompt in the evaluation grid)
IMAGE_RUN_DEFAULTS = {"total_steps": 2048, "eval_episodes": 4}


@dataclass(frozen=True)
class TrainConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: str = "gaussian"
    """Policy family: a key of policies.POLICY_FAMILIES."""
    policy_config: dict[str, Any] = field(default_factory=dict)
    """Fields of the family's config dataclass (e.g. hidden_sizes, n_experts)."""
    algo: str = "ppo"
    ppo: PPOConfig = field(default_factory=PPOConfig)
    run: RunConfig = field(default_factory=RunConfig)
    gorl: GoRLTrainConfig = field(default_factory=GoRLTrainConfig)
    """GoRL's stage schedule and decoder refinement; only for ``policy = "gorl"``."""
    algo_config: dict[str, Any] = field(default_factory=dict)
    """Fields of a registered algorithm's config dataclass (``--algo`` other than ppo)."""
    t2i: ImageTaskConfig = field(default_factory=ImageTaskConfig)
    """The text-to-image task; only for ``algo = "flow-grpo" | "g2rpo"``."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Flow-GRPO / G2RPO settings; only for those algorithms."""
    preset: str | None = None
    """The preset laid under this config (``genrl.presets``), recorded for reference."""
    init_from: str | None = None
    """A run, checkpoint or exported agent folder whose policy weights (and observation
    normaliser) this run starts from, e.g. a behaviour-cloning run fine-tuned with PPO; the family
    and dims must match. Recorded as an absolute path."""

    @property
    def is_image(self) -> bool:
        """A text-to-image run (Flow-GRPO / G2RPO), not a control run."""
        return self.algo in IMAGE_ALGOS

    def unused_sections(self) -> tuple[str, ...]:
        """The root's fields this run's algorithm does not read (left out of ``config.json``)."""
        if self.is_image:
            return ("env", "policy", "policy_config", "ppo", "gorl", "algo_config", "init_from")
        return ("t2i", "grpo")

    def __post_init__(self) -> None:
        from genrl_policies.base import POLICY_FAMILIES

        if self.policy not in POLICY_FAMILIES:
            raise ConfigError(f"unknown policy '{self.policy}'; valid choices: {', '.join(sorted(POLICY_FAMILIES))}")
        if self.algo not in control_algos() + IMAGE_ALGOS:
            raise ConfigError(f"unknown algo '{self.algo}'; valid choices: {', '.join(control_algos() + IMAGE_ALGOS)}")
        defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory() for f in dataclasses.fields(self)}
        if self.init_from is not None:
            path = Path(self.init_from).expanduser()
            if not path.exists():
                raise ConfigError(f"init_from: {self.init_from} does not exist (a run, checkpoint or exported agent folder)")
            object.__setattr__(self, "init_from", str(path.resolve()))
        for name in self.unused_sections():
            if getattr(self, name) != defaults[name]:
                kind = "control algorithms (--env ID)" if self.is_image else "text-to-image algorithms (--env t2i)"
                raise ConfigError(f"[{name}] settings apply to {kind}, not --algo {self.algo}")
        if self.run.distributed == "ddp":
            from genrl.distributed import check_supported

            check_supported(self.algo, self.policy)
        if self.is_image:
            return
        if self.policy != "gorl" and self.gorl != GoRLTrainConfig():
            raise ConfigError(f"[gorl] settings apply only to policy 'gorl', not '{self.policy}'")
        for name in ("stage_clip_coefs", "stage_max_grad_norms"):
            values = getattr(self.ppo, name)
            if values and self.policy != "gorl":
                raise ConfigError(f"ppo.{name} is a per-stage schedule for policy 'gorl', not '{self.policy}'")
            if values and len(values) != self.gorl.n_stages:
                raise ConfigError(f"ppo.{name} has {len(values)} values for {self.gorl.n_stages} stages (gorl.stage_fractions): one per stage, or empty")
        self.policy_config_object()  # the family's keys and types are checked when the config is parsed
        self.algo_config_object()

    def policy_config_object(self) -> Any:
        """The family's config dataclass built (strictly) from ``policy_config``."""
        from genrl_policies.base import config_from_dict, resolve_family

        cls = resolve_family(self.policy).config_class
        defaults, hints = cls(), get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        data = {
            k: _coerce(v, getattr(defaults, k), f"policy_config.{k}", hints[k]) if k in names else v for k, v in self.policy_config.items()
        }  # names the field in type errors; unknown keys are refused below with the valid names
        try:
            return config_from_dict(cls, data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid policy_config for '{self.policy}': {exc}") from None

    def algo_config_object(self) -> Any:
        """A registered algorithm's config dataclass built from ``algo_config`` (None for ppo)."""
        from genrl.algos.base import CONTROL_ALGORITHMS

        spec = CONTROL_ALGORITHMS.get(self.algo)
        if spec is None or spec.config_class is None:
            if self.algo_config:
                raise ConfigError(f"algo_config is for registered algorithms; '{self.algo}' takes its settings from its own section")
            return None
        cls = spec.config_class
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in self.algo_config if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(names), n=1)
            raise ConfigError(f"unknown key '{unknown[0]}' in [algo_config]{f'; did you mean {close[0]!r}?' if close else ''} valid: {', '.join(names)}")
        defaults, hints = cls(), get_type_hints(cls)
        return cls(**{k: _coerce(v, getattr(defaults, k), f"algo_config.{k}", hints[k]) for k, v in self.algo_config.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain data of the sections the algorithm uses; ``policy_config`` resolved to every
        field of the family's config."""
        from genrl_policies.base import config_to_dict

        data = json.loads(json.dumps(dataclasses.asdict(self)))
        for name in self.unused_sections():
            del data[name]
        if self.is_image:
            return data
        data["policy_config"] = config_to_dict(self.policy_config_object())
        algo_cfg = self.algo_config_object()
        if algo_cfg is not None:
            data["algo_config"] = config_to_dict(algo_cfg)
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def image_config(
    *, algo: str = "flow-grpo", model: str = "digits", prompts: str | None = None, reward: str = "digit", dtype: str = "float32",
    grpo: GRPOConfig | None = None, run: RunConfig | None = None, preset: str | None = None,
) -> TrainConfig:  # fmt: skip
    """A text-to-image ``TrainConfig`` with the image run defaults (``IMAGE_RUN_DEFAULTS``)."""
    return TrainConfig(
        algo=algo, t2i=ImageTaskConfig(model=model, prompts=prompts, reward=reward, dtype=dtype),
        grpo=grpo or GRPOConfig(), run=run or RunConfig(**IMAGE_RUN_DEFAULTS), preset=preset,
    )  # fmt: skip


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from nested plain data, rejecting unknown keys and bad types. A
    ``preset`` key lays that preset's values under ``data``; text-to-image runs get the image run
    defaults; ``env = "t2i"`` with flat ``model`` / ``prompts`` / ``reward`` / ``dtype`` (the CLI's
    and earlier releases' spelling) is read as the ``t2i`` section."""
    from genrl.algos.base import CONTROL_ALGORITHMS

    data = apply_preset(image_layout(data))
    if data.get("algo") in IMAGE_ALGOS:
        data = merge({"run": IMAGE_RUN_DEFAULTS}, data)
    registered = CONTROL_ALGORITHMS.get(data.get("algo", "ppo"))
    if registered is not None and registered.defaults:  # the algorithm's own defaults, under the user's values
        defaults = dict(registered.defaults)
        per_family = defaults.pop("policy_config_for", {})
        if data.get("policy", "gaussian") in per_family:
            defaults["policy_config"] = per_family[data.get("policy", "gaussian")]
        data = merge(defaults, data)
    return _build(TrainConfig, data, "")


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its ``preset`` (if any, ``genrl.presets``) laid underneath: the user's values
    win; the name is recorded as the resolved one ("paper" becomes the family's preset)."""
    name = data.get("preset")
    if name is None:
        return data
    if not isinstance(name, str):
        raise ConfigError(f"preset must be a name, got {name!r}")
    preset = resolve_preset(name, data)
    return merge(merge(preset.values, data), {"preset": preset.name})


def describe_config(algo: str = "ppo", policy: str = "gaussian") -> str:
    """Every config key (dotted, as ``--set`` takes it) with its type, default and docstring."""
    from genrl.algos.base import CONTROL_ALGORITHMS
    from genrl_policies.base import resolve_family

    image = algo in IMAGE_ALGOS
    if not image and algo not in control_algos():
        raise ConfigError(f"unknown algo '{algo}'; valid choices: {', '.join(control_algos() + IMAGE_ALGOS)}")
    root = config_from_dict({"algo": algo} if image else {"algo": algo, "policy": policy})
    registered = CONTROL_ALGORITHMS.get(algo)
    skip = set(root.unused_sections()) | ({"gorl"} if policy != "gorl" else set())
    if registered is not None:  # its settings are algo_config; ppo's and gorl's sections are PPO's
        skip |= {"ppo", "gorl"}
    lines = [f"# genrl config for --algo {algo}" + ("" if image else f" --policy {policy}"), "# key: type = default  (meaning)"]

    def walk(cls: type, prefix: str, instance: Any) -> None:
        docs = field_docs(cls)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not prefix and f.name in skip:
                continue
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.", value)
                continue
            if f.name == "policy_config":
                family = resolve_family(policy)
                pcfg = family.config_class()
                pdocs = field_docs(family.config_class)
                for pf in dataclasses.fields(pcfg):
                    t = getattr(get_type_hints(family.config_class)[pf.name], "__name__", str(get_type_hints(family.config_class)[pf.name]))
                    lines.append(f"policy_config.{pf.name}: {t} = {getattr(pcfg, pf.name)!r}" + (f"  ({pdocs[pf.name]})" if pf.name in pdocs else ""))
                continue
            if f.name == "algo_config":
                if registered is not None and registered.config_class is not None:
                    acls = registered.config_class
                    adocs, ahints, acfg = field_docs(acls), get_type_hints(acls), acls()
                    for af in dataclasses.fields(acls):
                        t = getattr(ahints[af.name], "__name__", str(ahints[af.name]))
                        lines.append(f"algo_config.{af.name}: {t} = {getattr(acfg, af.name)!r}" + (f"  ({adocs[af.name]})" if af.name in adocs else ""))
                continue
            t = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"{prefix}{f.name}: {t} = {value!r}" + (f"  ({docs[f.name]})" if f.name in docs else ""))

    walk(TrainConfig, "", root)
    return "\n".join(lines)
