"""What the run loop (``genrl.trainer``) does differently when several processes train one run
(``genrl.distributed``): rank 0 names and checks the run folder, logs and writes checkpoints; every
rank builds the same replica, resumes from the same checkpoint and its own state in it.

Checkpoint of a W-process run: rank 0's state in the one-process layout, plus for each rank r > 0
``rank<r>.safetensors`` (``algo.<key>``: its ``RANK_LOCAL_KEYS`` entries, a dict of tensors as
``algo.<key>.<name>``, ``env.<name>``: its env's
arrays, ``rng.torch_global``) and ``state.json``'s ``"distributed": {"world_size": W, "ranks":
{"r": {numpy_global, env_meta, env_shapes, algo}}}``. Resuming with W processes restores every
rank bitwise; with another number, ranks the checkpoint has continue exactly, new ranks start
fresh episodes and sampling streams, dropped ranks' episodes and streams end (one line says so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from genrl.checkpoint import checkpoint_steps
from genrl.distributed import RANK_LOCAL_KEYS, Replica, replica, session
from genrl.errors import CheckpointError, DistributedError
from genrl.runs import open_run, seed_everything


@contextmanager
def run_session(cfg: Any) -> Iterator[Replica]:
    """The process group ``cfg.run`` asks for (``genrl.distributed.session``); no config: one process."""
    if cfg is None:
        yield replica()
        return
    r = cfg.run
    with session(r.distributed, cfg.algo, r.device, r.distributed_timeout_s) as rep:
        yield rep


def open_shared(cfg: Any, resume: str | Path | None) -> tuple[Any, Path, list[Path]]:
    """``genrl.runs.open_run`` for every rank: a fresh run's folder is named and checked (which
    may clear a run that never started) by rank 0 alone; a resumed run is only read."""
    rep = replica()
    if rep.world_size == 1 or resume is not None:
        return open_run(cfg, resume)
    out = rep.on_main(lambda: str(open_run(cfg, None)[1]))
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=out)), Path(out), []


def adopt(algo: Any, seed: int) -> Any:
    """A freshly built algorithm as a replica: rank 0's weights everywhere, then each rank's own
    global RNG streams (``Replica.seed``)."""
    rep = replica()
    if rep.world_size > 1:
        rep.broadcast_modules(m for m in (getattr(algo, n, None) for n in ("policy", "critic", "critic_target", "model")) if isinstance(m, torch.nn.Module))
        if rep.rank > 0:
            seed_everything(rep.seed(seed))
    return algo


def agreed(restore: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """``restore`` that succeeds only when it succeeds on every rank, so all resume from one checkpoint."""
    rep = replica()
    if rep.world_size == 1:
        return restore

    def restore_everywhere(ckpt: Path) -> Any:
        out, err = None, None
        try:
            out = restore(ckpt)
        except CheckpointError as exc:
            err = str(exc)
        errors = rep.all_gather_json(err, "agreeing on the checkpoint to resume")
        bad = next(((r, e) for r, e in enumerate(errors) if e), None)
        if bad is not None:
            raise CheckpointError(bad[1] if bad[0] == 0 else f"rank {bad[0]}: {bad[1]}")
        return out

    return restore_everywhere


def gather_rank_states(algo: Any) -> dict[str, Any] | None:
    """Every rank's own state, to rank 0: {"files": {"rank<r>": tensors}, "state": {"distributed": ...}}
    on rank 0 ({} in one process), None on the other ranks (they write nothing)."""
    rep = replica()
    if rep.world_size == 1:
        return {}
    keys = getattr(algo, "rank_local_keys", RANK_LOCAL_KEYS)
    own = {k: v for k, v in algo.state_dict().items() if k in keys}
    groups = [k for k, v in own.items() if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values())]
    tensors = {f"algo.{k}": v.detach().contiguous().cpu() for k, v in own.items() if isinstance(v, torch.Tensor)}
    tensors.update({f"algo.{g}.{k}": v.detach().contiguous().cpu() for g in groups for k, v in own[g].items()})  # e.g. SAC's replay buffer
    tensors["rng.torch_global"] = torch.get_rng_state()
    env = algo.env.state_dict()
    tensors.update({f"env.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in env["arrays"].items()})
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "algo": {k: v for k, v in own.items() if not isinstance(v, torch.Tensor) and k not in groups}, "groups": groups, "env_meta": env["meta"],
        "env_shapes": {k: list(np.shape(v)) for k, v in env["arrays"].items()},
        "numpy_global": {"name": name, "keys": np_keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }  # fmt: skip
    files = rep.all_gather_bytes(save_bytes(tensors), "gathering every rank's state for the checkpoint")
    metas = rep.all_gather_json(meta, "gathering every rank's state for the checkpoint")
    if not rep.is_main:
        return None
    return {
        "files": {f"rank{r}": load_bytes(files[r]) for r in range(1, rep.world_size)},
        "state": {"distributed": {"world_size": rep.world_size, "ranks": {str(r): metas[r] for r in range(1, rep.world_size)}}},
    }


def own_state(data: dict[str, Any], algo: Any) -> dict[str, Any]:
    """This rank's part of a checkpoint read by ``load_checkpoint``: {"payload": entries for
    ``algo.load_state_dict`` beyond the shared ones, "env": env state or None (keep this env),
    "torch" / "numpy": global RNG states or None (keep them), "note": what is not exact or None}."""
    rep, state = replica(), data["state"]
    saved = int(state.get("distributed", {}).get("world_size", 1))
    payload: dict[str, Any] = {"world_size": saved} if saved != 1 else {}
    note = None
    if saved != rep.world_size:
        lo, hi = sorted((saved, rep.world_size))
        who = f"rank {lo}" if hi - lo == 1 else f"ranks {lo}-{hi - 1}"
        start = "starts" if hi - lo == 1 else "start"
        what = f"{who} {start} fresh episodes and RNG streams (seed + rank offsets)" if rep.world_size > saved else f"the episodes and RNG streams of {who} end"
        note = (f"resuming a {saved}-process checkpoint with {rep.world_size} process{'es' if rep.world_size > 1 else ''}: "
                f"the shared state and each kept rank's own continue exactly, {what}; not bitwise the uninterrupted run")  # fmt: skip
    if rep.rank == 0:
        return {"payload": payload, "env": data["env"], "torch": data["trainer"]["rng.torch_global"], "numpy": state["numpy_global"], "note": note}
    if rep.rank >= saved:  # new to this checkpoint: keep its fresh episodes and streams
        keys = getattr(algo, "rank_local_keys", RANK_LOCAL_KEYS)
        payload.update({k: v for k, v in algo.state_dict().items() if k in keys})
        return {"payload": payload, "env": None, "torch": None, "numpy": None, "note": note}
    meta, tensors = state["distributed"]["ranks"].get(str(rep.rank)), data["tensors"].get(f"rank{rep.rank}")
    if meta is None or tensors is None:
        raise CheckpointError(f"the checkpoint lacks rank {rep.rank}'s state (rank{rep.rank}.safetensors)")
    groups = meta.get("groups", [])
    for key, value in tensors.items():
        if key.startswith("algo."):
            group = next((g for g in groups if key.startswith(f"algo.{g}.")), None)
            if group is None:
                payload[key[5:]] = value
            else:
                payload.setdefault(group, {})[key[len(group) + 6 :]] = value
    payload.update(meta["algo"])
    shapes = meta["env_shapes"]
    arrays = {k[4:]: v.numpy().reshape(shapes.get(k[4:], v.shape)) for k, v in tensors.items() if k.startswith("env.")}
    return {"payload": payload, "env": {"arrays": arrays, "meta": meta["env_meta"]}, "torch": tensors["rng.torch_global"],
            "numpy": meta["numpy_global"], "note": note}  # fmt: skip


def stopped(exc: DistributedError, run_dir: Path) -> DistributedError:
    """``exc`` naming the last checkpoint, which a failed collective never touches."""
    steps = checkpoint_steps(run_dir)
    where = f"; the last checkpoint (step {steps[-1]}) is intact: genrl train --resume {run_dir}" if steps else "; no checkpoint was written yet"
    return DistributedError(f"{exc}{where}")


class QuietLogger:
    """What ranks other than 0 log: nothing (rank 0 logs the global metrics)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def hparams(self, config: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["QuietLogger", "adopt", "agreed", "gather_rank_states", "open_shared", "own_state", "run_session", "stopped"]
