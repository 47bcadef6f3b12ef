"""Reading run configurations: strict building of typed dataclasses from plain data, config files,
merging, the upgrade of configs written by earlier releases, and ``genrl config``'s listing.

``genrl.config`` holds the dataclasses themselves and re-exports these helpers.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path
from typing import Any, get_type_hints

import tomllib

from genrl.algos.grpo import ALGOS as IMAGE_ALGOS
from genrl.errors import ConfigError


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Strictly build dataclass ``cls`` from ``data``; nested dataclasses recurse."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table/mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{key}' in [{where}]{hint} valid: {', '.join(fields)}")
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t):
            factory = fields[key].default_factory
            if factory is not dataclasses.MISSING and isinstance(value, dict):  # keep the field's own defaults
                value = merge(dataclasses.asdict(factory()), value)  # type: ignore[misc]
            kwargs[key] = _build(hint_t, value, f"{where}.{key}" if where else key)
        else:
            f = fields[key]
            default = f.default if f.default is not dataclasses.MISSING or f.default_factory is dataclasses.MISSING else f.default_factory()
            kwargs[key] = _coerce(value, default, f"{where}.{key}" if where else key, hint_t)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"[{where}]: {exc}") from None


_EXEMPLARS = {float: 0.0, int: 0, str: "", bool: False, tuple: (), dict: {}}


def _exemplar(hint: Any) -> Any:
    """A value of the non-None type of an ``X | None`` hint (None if there is no single one)."""
    import types
    import typing

    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            base = typing.get_origin(args[0]) or args[0]
            return _EXEMPLARS.get(base)
    return None


def _coerce(value: Any, default: Any, name: str, hint: Any = None) -> Any:
    """Check a value against its default's type (or, for a None default, its ``X | None`` hint);
    lists become tuples where tuples are expected, scalars become text where text is expected."""
    if default is None and hint is not None:
        if value is None:
            return None
        default = _exemplar(hint)
    if (
        isinstance(default, str)
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        or (isinstance(default, str) and type(value).__name__ in ("date", "datetime", "time"))
    ):
        return str(value)  # --set run.out=123 or =2024-06-01: TOML parsed a number or date, a name was meant
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true/false, got {value!r}")
    elif isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value):
            raise ConfigError(f"{name} must not be NaN")
    elif isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        value = tuple(value)
    elif isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table/mapping, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


_IMAGE_KEYS = ("model", "prompts", "reward", "dtype")


def image_layout(data: dict[str, Any]) -> dict[str, Any]:
    """``env = "t2i"`` (a text-to-image run: algo defaults to flow-grpo) with flat image keys
    moved into the ``t2i`` section; other data unchanged."""
    if data.get("env") != "t2i":
        return data
    out = {k: v for k, v in data.items() if k != "env" and k not in _IMAGE_KEYS}
    out.setdefault("algo", "flow-grpo")
    moved = {k: data[k] for k in _IMAGE_KEYS if k in data}
    if moved:
        out["t2i"] = merge(out.get("t2i", {}) if isinstance(out.get("t2i"), dict) else {}, moved)
    if out["algo"] not in IMAGE_ALGOS:
        raise ConfigError(f"unknown algo '{out['algo']}' for --env t2i; valid choices: {', '.join(IMAGE_ALGOS)}")
    return out


#: config keys renamed since the first release: old -> new, per section (runs written before still resume)
RENAMED = {"grpo": {"num_steps": "n_steps", "eval_num_steps": "eval_n_steps", "clip_range": "clip_coef", "epochs": "n_epochs"}}


#: settings that moved from one section to another: (old section, old key) -> (new section, new key)
MOVED = {
    ("policy_config", "clip_coef_base"): ("ppo", "clip_coef"),
    ("policy_config", "clip_coef_final"): ("ppo", "clip_coef_final"),
    ("policy_config", "clip_rate"): ("ppo", "clip_rate"),
    ("policy_config", "gamma_denoising"): ("ppo", "denoising_gamma"),
    ("gorl", "clip_coefs"): ("ppo", "stage_clip_coefs"),
    ("gorl", "max_grad_norms"): ("ppo", "stage_max_grad_norms"),
}


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A saved run config with renamed or moved keys brought to today's names (``RENAMED``,
    ``MOVED``), so runs written by earlier releases still resume with the same settings."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in image_layout(data).items()}
    for section, names in RENAMED.items():
        if isinstance(out.get(section), dict):
            out[section] = {names.get(k, k): v for k, v in out[section].items()}
    if isinstance(out.get("env"), dict) and "backend" not in out["env"]:
        out["env"]["backend"] = "gymnasium"  # runs written before back ends existed stepped gymnasium
    if out.get("policy") == "diffusion" and "clip_coef_base" in out.get("policy_config", {}):
        ppo = out.get("ppo", {})
        old_clip = ppo.get("clip_coef", 0.2)
        if ppo.get("clip_vloss") and old_clip != out["policy_config"]["clip_coef_base"]:
            raise ConfigError(
                "this diffusion run clipped its value loss with ppo.clip_coef and its policy loss with "
                "policy_config.clip_coef_base; both are ppo.clip_coef now, so it cannot resume unchanged"
            )
    for (old_sec, old_key), (new_sec, new_key) in MOVED.items():
        if isinstance(out.get(old_sec), dict) and old_key in out[old_sec]:
            value = out[old_sec].pop(old_key)
            if not (new_sec == "ppo" and new_key.startswith("stage_") and value in ((), [])):
                out.setdefault(new_sec, {})[new_key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file of TrainConfig fields into plain data."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            return data or {}
        if path.suffix == ".json":
            return json.loads(text)
    except Exception as exc:  # parse errors of three libraries
        raise ConfigError(f"cannot parse {path}: {exc}") from None
    raise ConfigError(f"unsupported config file type '{path.suffix}' (use .toml, .yaml, .yml or .json)")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``override`` wins."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field), by field."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
