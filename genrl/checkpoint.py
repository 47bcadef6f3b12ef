"""Checkpoints: one folder per env step, written atomically, no pickle anywhere.

    <run>/checkpoints/<step>/
        policy/config.json, policy/model.safetensors   the policy (loadable on its own)
        trainer.safetensors    critic weights, next observation, RNG states
        optimizer.pt           optimizer state, loaded with ``weights_only=True``
        env.safetensors        simulator, normaliser and episode-accumulator arrays
        state.json             counters, family, algo, env meta (RNG states of the sub-envs)

Tensor files hold at most ``CHUNK_BYTES`` each (``write_tensors``): a larger state (a replay
buffer) continues in ``trainer-001.safetensors``, ``trainer-002.safetensors``, ..., a tensor
larger than that cut into flat pieces, so writing never copies more than one chunk at a time;
state.json's ``"tensor_chunks"`` says how to put them together again (absent: one file each).

A checkpoint is first written to ``checkpoints/.tmp-<step>-<pid>/`` and renamed into place, so
any folder whose name is a number is complete.
"""

from __future__ import annotations

import json
import math
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
CHUNK_BYTES = 64 * 2**20
"""Most tensor bytes one safetensors file of a checkpoint holds (safetensors copies a file's
tensors into one buffer as it writes them)."""


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
    ``state_dict()``) and ``<name>.safetensors`` for each of ``tensor_files`` when given; tensor
    files beyond ``CHUNK_BYTES`` continue in ``<name>-001.safetensors``, ... (module docstring)."""
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
        chunks: dict[str, Any] = {}
        for name, tensors in {**(tensor_files or {}), "trainer": trainer_tensors}.items():
            layout = write_tensors(tensors, tmp, name)
            if layout is not None:
                chunks[name] = layout
        if chunks:
            meta["tensor_chunks"] = chunks
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


def write_tensors(tensors: dict[str, torch.Tensor], folder: Path, name: str, limit: int | None = None) -> dict[str, Any] | None:
    """Write ``tensors`` as ``<name>.safetensors`` and, beyond ``limit`` bytes, ``<name>-001``,
    ``<name>-002``, ... (in key order, each file up to ``limit`` bytes); a tensor larger than
    ``limit`` is cut into flat pieces ``KEY@OFFSET`` (a non-contiguous one is copied first).
    Returns None when one file holds everything as it is, else {"files": n, "split": {key: shape}}
    for ``read_tensors_chunked``. On CUDA only one file's tensors are in host memory at a time.
    ``limit``: default ``CHUNK_BYTES``."""
    limit = CHUNK_BYTES if limit is None else limit
    files: list[dict[str, torch.Tensor]] = [{}]
    split: dict[str, list[int]] = {}
    used = 0
    for key, value in tensors.items():
        value = value.detach()
        nbytes = value.numel() * value.element_size()
        pieces = [(key, value)]
        if nbytes > limit:
            flat, step = value.contiguous().reshape(-1), max(1, limit // value.element_size())
            split[key] = list(value.shape)
            pieces = [(f"{key}@{start}", flat[start : start + step]) for start in range(0, flat.numel(), step)]
        for piece_key, piece in pieces:
            size = piece.numel() * piece.element_size()
            if files[-1] and used + size > limit:
                files.append({})
                used = 0
            files[-1][piece_key] = piece
            used += size
    for i, group in enumerate(files):
        save_file({k: v.contiguous().cpu() for k, v in group.items()}, str(folder / f"{_chunk_name(name, i)}.safetensors"))
    return None if len(files) == 1 and not split else {"files": len(files), "split": split}


def read_tensors_chunked(folder: Path, name: str, layout: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors ``write_tensors`` wrote as ``layout``, each cut tensor put together in a fresh
    tensor (one file's pieces in memory at a time); CheckpointError if a file or piece is missing."""
    split = {k: tuple(int(d) for d in shape) for k, shape in layout.get("split", {}).items()}
    out: dict[str, torch.Tensor] = {}
    filled = dict.fromkeys(split, 0)
    for i in range(int(layout.get("files", 1))):
        file = folder / f"{_chunk_name(name, i)}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{folder} is not a complete genrl checkpoint (missing {file.name})")
        for key, piece in read_tensors(file).items():
            base, _, offset = key.rpartition("@")
            if base not in split:
                out[key] = piece
                continue
            if base not in out:
                out[base] = torch.empty(split[base], dtype=piece.dtype)
            start = int(offset)
            out[base].view(-1)[start : start + piece.numel()].copy_(piece)
            filled[base] += piece.numel()
    short = [k for k, shape in split.items() if filled[k] != math.prod(shape)]
    if short:
        raise CheckpointError(f"corrupt {folder / name}.safetensors chunks: tensor '{short[0]}' is incomplete")
    return out


def _chunk_name(name: str, index: int) -> str:
    return name if index == 0 else f"{name}-{index:03d}"


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
    chunks = state.pop("tensor_chunks", {})
    trainer = read_tensors_chunked(path, "trainer", chunks["trainer"]) if "trainer" in chunks else read_tensors(path / "trainer.safetensors")
    shapes = state.pop("env_shapes", {})
    env = None
    if (path / "env.safetensors").is_file():
        env_arrays = {k: v.numpy().reshape(shapes.get(k, v.shape)) for k, v in read_tensors(path / "env.safetensors").items()}
        env = {"arrays": env_arrays, "meta": state.pop("env_meta", None)}
    parts = {_chunk_name(n, i) for n, layout in chunks.items() for i in range(1, int(layout.get("files", 1)))}
    others = {
        f.stem: read_tensors_chunked(path, f.stem, chunks[f.stem]) if f.stem in chunks else read_tensors(f)
        for f in sorted(path.glob("*.safetensors"))
        if f.stem not in ("trainer", "env") and f.stem not in parts
    }
    return {
        "trainer": trainer,
        "optimizer": read_optimizer(path / "optimizer.pt") if optimizer else None,
        "env": env,
        "tensors": others,
        "state": state,
    }
