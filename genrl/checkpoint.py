"""Checkpoints: one folder per env step, written atomically, no pickle anywhere.

    <run>/checkpoints/<step>/
        policy/config.json, policy/model.safetensors   the policy (loadable on its own)
        trainer.safetensors    critic weights, next observation, RNG states
        optimizer.pt           optimizer state, loaded with ``weights_only=True``
        env.safetensors        simulator, normaliser and episode-accumulator arrays
        state.json             counters, family, algo, env meta (RNG states of the sub-envs)

A checkpoint is first written to ``checkpoints/.tmp-<step>-<pid>/`` and renamed into place, so
any folder whose name is a number is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from genrl.errors import CheckpointError

FORMAT_VERSION = 2
"""2: the algorithm's own state under state.json's "algo_state" (any registered algorithm);
1 (read, converted on restore): PPO / GoRL keys at the top level of state.json."""
READABLE_VERSIONS = (1, 2)
_FILES = ("policy/config.json", "policy/model.safetensors", "trainer.safetensors", "optimizer.pt", "env.safetensors", "state.json")


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints of a run, ascending."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint folder; CheckpointError if there is none."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    return Path(run_dir) / "checkpoints" / str(steps[-1])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    trainer_tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    policy: Any = None,
    env_state: dict[str, Any] | None = None,
    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically (every algorithm uses this one writer) and
    return its folder: ``trainer.safetensors``, ``optimizer.pt``, ``state.json``, plus
    ``policy/`` (a module with ``save_pretrained``), ``env.safetensors`` (an env's
    ``state_dict()``) and ``<name>.safetensors`` for each of ``tensor_files`` when given."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        meta = dict(state, format_version=FORMAT_VERSION)
        if policy is not None:
            policy.save_pretrained(tmp / "policy")
        for name, tensors in (tensor_files or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        save_file({k: v.detach().contiguous().cpu() for k, v in trainer_tensors.items()}, str(tmp / "trainer.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        if env_state is not None:
            env_arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in env_state["arrays"].items()}
            save_file(env_arrays, str(tmp / "env.safetensors"))
            # safetensors does not keep 0-d shapes: record every array's shape beside it
            meta.update(env_meta=env_state["meta"], env_shapes={k: list(np.shape(v)) for k, v in env_state["arrays"].items()})
        (tmp / "state.json").write_text(json.dumps(meta))
        return publish_dir(tmp, root / str(step))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def normal_permissions(folder: Path) -> None:
    """Give every file under ``folder`` the permissions of a plain ``open`` (0666 less the umask):
    safetensors and ``tempfile`` write 0600, which other accounts cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def publish_dir(tmp: Path, final: Path) -> Path:
    """Atomically move a fully written ``tmp`` folder to ``final`` (swapping out an older one)."""
    normal_permissions(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def atomic_dir(final: str | Path, write: Any) -> Path:
    """Fill a temporary sibling folder with ``write(tmp)`` and publish it as ``final`` atomically."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        return publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_state_json(path: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint folder; CheckpointError if corrupt or not a mapping."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt {path / 'state.json'}: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"corrupt {path / 'state.json'}: not a mapping")
    return state


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; CheckpointError if corrupt."""
    try:
        return load_file(str(file))
    except PermissionError:
        raise CheckpointError(f"cannot read {file}: permission denied") from None
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"corrupt {file}: {exc}") from None


def read_optimizer(file: Path) -> dict[str, Any]:
    """An optimizer state saved with torch.save, loaded with ``weights_only=True`` (no unpickling of globals)."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except PermissionError:
        raise CheckpointError(f"cannot read {file}: permission denied") from None
    except Exception as exc:  # a pickled payload with globals is refused here
        # PyTorch's own message advises weights_only=False, i.e. running the file's code: not here
        text = str(exc)
        why = "it holds Python objects beyond tensors (refused: genrl never unpickles)" if "Weights only load failed" in text else text.splitlines()[0]
        raise CheckpointError(f"corrupt or foreign {file}: {why}") from None


def load_checkpoint(path: str | Path, *, optimizer: bool = True, files: tuple[str, ...] = _FILES) -> dict[str, Any]:
    """Read a checkpoint folder (policy excluded: use ``policies.load_pretrained(path/'policy')``).

    Returns {"trainer": tensors, "optimizer": state, "env": {"arrays", "meta"} or None,
    "tensors": {name: tensors} of the other safetensors files, "state": json};
    with ``optimizer=False`` the optimizer file is neither needed nor read ("optimizer": None).
    Raises CheckpointError on missing files, corrupt content or a foreign format.
    """
    path = Path(path)
    missing = [f for f in files if not (path / f).is_file() and (optimizer or f != "optimizer.pt")]
    if missing:
        raise CheckpointError(f"{path} is not a complete genrl checkpoint (missing {', '.join(missing)})")
    state = read_state_json(path)
    if state.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format_version')}, this genrl reads {', '.join(map(str, READABLE_VERSIONS))}")
    trainer = read_tensors(path / "trainer.safetensors")
    shapes = state.pop("env_shapes", {})
    env = None
    if (path / "env.safetensors").is_file():
        env_arrays = {k: v.numpy().reshape(shapes.get(k, v.shape)) for k, v in read_tensors(path / "env.safetensors").items()}
        env = {"arrays": env_arrays, "meta": state.pop("env_meta", None)}
    others = {f.stem: read_tensors(f) for f in sorted(path.glob("*.safetensors")) if f.stem not in ("trainer", "env")}
    return {
        "trainer": trainer,
        "optimizer": read_optimizer(path / "optimizer.pt") if optimizer else None,
        "env": env,
        "tensors": others,
        "state": state,
    }
