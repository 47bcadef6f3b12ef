"""Data parallelism over processes with ``torch.distributed``: torchrun launches, genrl's config decides.

``run.distributed``: "auto" (data-parallel when torchrun started WORLD_SIZE > 1 processes, one
process otherwise), "ddp" (the same, but refuses to run without a launcher) or "off". Backend:
gloo for ``run.device = "cpu"``, NCCL for "cuda" (rank r on ``cuda:LOCAL_RANK``). Collectives
time out after ``run.distributed_timeout_s``; a failed or timed-out one raises
``DistributedError`` (one line: which rank, which collective; the last checkpoint is intact).
World size 1 takes none of these paths: a one-process run is bitwise what it was before.

What a rank does in on-policy control (PPO with every family, GoRL) and behaviour cloning:

* **seeds**: the network is initialised from ``run.seed`` on every rank (and broadcast from
  rank 0); rank r's envs are envs r*N ... r*N+N-1 of a one-process run with W*N envs (env seed
  ``run.seed + r * n_envs``); its sampling generator and global RNGs start from
  ``run.seed + r * RANK_SEED_STRIDE`` (rank 0: ``run.seed``).
* **budget**: ``run.total_steps`` counts the env steps of all ranks; one iteration is W rollouts
  of ``n_steps * n_envs`` (BC: a gradient step is one global batch of ``batch_size``, a 1/W
  shard per rank, drawn by ``ShardedSampler``).
* **advantages**: scope "batch" normalises with the mean / std of the global batch; scope
  "minibatch": rank r's minibatch is its share of the global minibatch (1/W of it, from its own
  shuffle of its own rollout) and is normalised with the global minibatch's mean / std.
* **gradients**: averaged over ranks (one all-reduce of the flat gradients, before clipping and
  the optimiser step), so the replicas stay identical and the step is the one-process step on the
  concatenated minibatch (up to float summation order). Minibatch statistics (approx-KL for the
  early stop and the adaptive learning rate, the logged losses) are averaged likewise.
* **normalisers**: once per iteration every rank's new data since the last merge (recovered from
  its running count / mean / var and the shared base) are gathered and folded in rank order with
  the parallel-variance formula: every rank then holds the same statistics.
* **episodes**: returns and lengths are gathered, so rank 0 logs the global ones.

Checkpoints (``genrl.trainer.save_state``) are written by rank 0 alone: the one-process layout
(its own state) plus ``rank<r>.safetensors`` per other rank (``rank_state``).

SAC (``genrl.algos.sac``): per-rank envs and buffers, the global batch split into per-rank shards,
critic / actor / temperature gradients averaged. Flow-GRPO / G2RPO (``genrl.algos.grpo``): prompts
and initial noise from a stream every rank shares, each rank samples and scores its share of the
images (Flow-GRPO: consecutive image rows, so a group may span ranks; G2RPO: whole prompts), the
rewards are gathered so group advantages are those of one process, the LoRA (or full) gradients
are averaged.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genrl.errors import CheckpointError, ConfigError, DistributedError, GenrlError

MODES = ("auto", "off", "ddp")
SUPPORTED = ("ppo", "bc", "sac", "flow-grpo", "g2rpo")
"""Algorithms that run data-parallel (ppo: every policy family, GoRL included; sac: Gaussian and PMOE)."""
RANK_SEED_STRIDE = 1_000_000_007
RANK_LOCAL_KEYS = ("next_obs", "rng.generator")
"""Entries of an algorithm's ``state_dict()`` that differ between ranks (its place in its envs,
its sampling stream); the rest is replicated and saved once, from rank 0. An algorithm may
declare its own as ``rank_local_keys``."""


def check_supported(algo: str, policy: str = "") -> None:
    if algo not in SUPPORTED:
        raise ConfigError(f"run.distributed: data-parallel training supports --algo ppo (every policy family and GoRL), sac, bc, flow-grpo and g2rpo, not {algo}")
    if algo == "sac" and policy == "gorl":
        raise ConfigError("run.distributed: GoRL over SAC runs in one process (data-parallel SAC takes --policy gaussian or pmoe; GoRL is data-parallel with --algo ppo)")


class Replica:
    """This process's place in the run (rank, world size, device of the collectives) and the
    collectives the algorithms call. With ``world_size`` 1 every method is the local computation."""

    def __init__(self, rank: int = 0, world_size: int = 1, *, device: str | torch.device = "cpu", timeout_s: float = 0.0) -> None:
        self.rank, self.world_size, self.device, self.timeout_s = rank, world_size, torch.device(device), timeout_s

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """This rank's seed of its sampling streams (rank 0: ``seed`` itself)."""
        return seed if self.rank == 0 else (seed + RANK_SEED_STRIDE * self.rank) % 2**63

    # -- collectives ----------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as exc:  # gloo / NCCL report a dead peer or a timeout as RuntimeError (DistBackendError)
            why = (str(exc).strip().splitlines() or ["no detail"])[0][:200]
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed: another process stopped or did not answer within {self.timeout_s:g} s (run.distributed_timeout_s) [{why}]"
            ) from None

    def all_reduce(self, tensor: Tensor, what: str = "all-reduce") -> Tensor:
        """Sum ``tensor`` over ranks, in place (on this replica's device); returns it."""
        import torch.distributed as dist

        if self.world_size > 1:
            self._call(what, dist.all_reduce, tensor)
        return tensor

    def all_gather_rows(self, tensor: Tensor, what: str = "all-gather") -> list[Tensor]:
        """Every rank's ``tensor`` (same trailing shape and dtype, any number of rows), by rank."""
        import torch.distributed as dist

        if self.world_size == 1:
            return [tensor]
        local = tensor.to(self.device)
        sizes = torch.tensor([local.shape[0]], dtype=torch.long, device=self.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(self.world_size)]
        self._call(what, dist.all_gather, all_sizes, sizes)
        n = [int(s) for s in all_sizes]
        padded = torch.zeros((max(n), *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._call(what, dist.all_gather, out, padded)
        return [o[:k].to(tensor.device) for o, k in zip(out, n)]

    def all_gather_bytes(self, data: bytes, what: str = "all-gather") -> list[bytes]:
        if self.world_size == 1:
            return [data]
        t = torch.tensor(list(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        return [bytes(p.cpu().numpy().tobytes()) for p in self.all_gather_rows(t, what)]

    def all_gather_json(self, obj: Any, what: str = "all-gather") -> list[Any]:
        """Every rank's JSON-able ``obj``, by rank (no pickle: JSON bytes travel)."""
        return [json.loads(b) for b in self.all_gather_bytes(json.dumps(obj).encode(), what)]

    def any(self, *flags: bool) -> list[bool]:
        """Each flag set on any rank (one all-reduce): every rank takes the same branch."""
        t = torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64, device=self.device)
        return [bool(v > 0) for v in self.all_reduce(t, "agreeing on the next step").tolist()]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on rank 0 only (e.g. a check that may delete files); its JSON-able result,
        or its GenrlError, reaches every rank."""
        result: Any = None
        if self.is_main:
            try:
                result = {"ok": fn()}
            except GenrlError as exc:
                result = {"error": type(exc).__name__, "message": str(exc)}
        result = self.all_gather_json(result, "sharing rank 0's result")[0]
        if "error" in result:
            kinds = {c.__name__: c for c in (ConfigError, CheckpointError, DistributedError)}
            raise kinds.get(result["error"], GenrlError)(result["message"])
        return result["ok"]

    def broadcast_modules(self, modules: Iterable[torch.nn.Module]) -> None:
        """Rank 0's parameters and buffers into every rank's ``modules`` (identical replicas)."""
        import torch.distributed as dist

        if self.world_size == 1:
            return
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                buf = t.detach().to(self.device, copy=True)
                self._call("broadcasting rank 0's weights", dist.broadcast, buf, 0)
                with torch.no_grad():
                    t.copy_(buf)

    # -- what the algorithms call ---------------------------------------------------------------
    def average_grads(self, params: Iterable[torch.nn.Parameter], stats: dict[str, Tensor] | None = None) -> dict[str, Tensor] | None:
        """Replace each gradient by its mean over ranks and return ``stats`` (scalar minibatch
        means) averaged likewise, all in one all-reduce per gradient dtype. Parameters without a
        gradient are skipped: every rank runs the same graph, so they agree."""
        if self.world_size == 1:
            return stats
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        keys = list(stats or {})
        if not by_dtype:
            return self.mean_stats(stats) if stats else stats
        out = dict(stats or {})
        for i, (dtype, grads) in enumerate(by_dtype.items()):
            extra = [out[k].detach().reshape(1).to(grads[0].device, dtype) for k in keys] if i == 0 else []  # ride along with the first
            flat = self.all_reduce(torch.cat([g.reshape(-1) for g in grads] + extra).to(self.device), "averaging gradients")
            flat.div_(self.world_size)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            for j, k in enumerate(keys if i == 0 else []):
                out[k] = flat[offset + j].to(out[k].device, out[k].dtype)
        return out if stats is not None else None

    def normalize_slices(self, x: Tensor, size: int, eps: float = 1e-8) -> Tensor:
        """Each consecutive ``size`` values of ``x`` normalised with the mean and std of that slice
        over every rank (one all-reduce for all slices): PPO's global minibatches of an epoch."""
        s = x.double().reshape(-1, size)
        m = torch.stack([torch.full((s.shape[0],), float(size), dtype=torch.float64, device=s.device), s.sum(1), s.square().sum(1)], 1)
        n, total, sq = self.all_reduce(m.to(self.device), "normalising advantages").to(s.device).unbind(1)
        mean = total / n
        std = ((sq - n * mean * mean).clamp_min(0.0) / (n - 1.0).clamp_min(1.0)).sqrt()
        return ((s - mean[:, None]) / (std[:, None] + eps)).to(x.dtype).reshape(-1)

    def mean_stats(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Scalar statistics (minibatch means) averaged over ranks."""
        if self.world_size == 1 or not stats:
            return stats
        keys = list(stats)
        values = torch.stack([stats[k].detach().to(self.device, torch.float64).reshape(()) for k in keys])
        values = self.all_reduce(values, "averaging minibatch statistics") / self.world_size
        return {k: values[i].to(stats[k].device, stats[k].dtype) for i, k in enumerate(keys)}

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and unbiased std of the concatenation of every rank's ``x`` (float64 sums)."""
        s = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.double().sum(), x.double().square().sum()])
        n, total, sq = self.all_reduce(s.to(self.device), "normalising advantages").tolist()
        mean = total / n
        var = max(sq - n * mean * mean, 0.0) / max(n - 1.0, 1.0)
        return torch.tensor(mean, dtype=x.dtype, device=x.device), torch.tensor(math.sqrt(var), dtype=x.dtype, device=x.device)

    def normalize(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """(x - mean) / (std + eps) with the global batch's mean and std (one process: ``x``'s own)."""
        if self.world_size == 1:
            return (x - x.mean()) / (x.std() + eps)
        mean, std = self.moments(x)
        return (x - mean) / (std + eps)

    def explained_variance(self, pred: Tensor, target: Tensor) -> float:
        """1 - Var[target - pred] / Var[target] over every rank's batch."""
        if self.world_size == 1:
            from genrl.losses import explained_variance

            return explained_variance(pred, target)
        var = float(self.moments(target)[1]) ** 2
        return float("nan") if var == 0 else 1.0 - float(self.moments(target - pred)[1]) ** 2 / var

    def gather_episodes(self, returns: list[float], lengths: list[int]) -> tuple[list[float], list[int]]:
        """The episodes every rank finished, by rank."""
        if self.world_size == 1:
            return returns, lengths
        rows = torch.tensor([[float(r), float(n)] for r, n in zip(returns, lengths)], dtype=torch.float64).reshape(-1, 2)
        cat = torch.cat(self.all_gather_rows(rows, "gathering episode statistics")).tolist()
        return [r for r, _ in cat], [int(n) for _, n in cat]

    # -- running normalisers --------------------------------------------------------------------
    def normalizer_stats(self, env: Any) -> dict[str, dict[str, np.ndarray]] | None:
        """The env's running statistics (the base of the next merge); None in one process."""
        if self.world_size == 1 or not hasattr(env, "running_stats"):
            return None
        return env.running_stats()

    def merge_normalizers(self, env: Any, base: dict[str, dict[str, np.ndarray]] | None) -> dict[str, dict[str, np.ndarray]] | None:
        """Fold every rank's data since ``base`` into ``base`` (rank order), set the result in the
        env and return it (the next base). Every rank computes the same numbers bitwise."""
        if base is None or not base:
            return base
        local = env.running_stats()
        names = sorted(base)
        packed = np.concatenate([pack(delta_stats(base[k], local[k])) for k in names])
        rows = self.all_gather_rows(torch.from_numpy(packed)[None], "merging normaliser statistics")
        merged = {k: dict(base[k]) for k in names}
        for row in rows:
            offset = 0
            for k in names:
                size = 1 + 2 * int(np.prod(np.shape(base[k]["mean"])))
                merged[k] = fold_stats(merged[k], unpack(row[0, offset : offset + size].numpy(), np.shape(base[k]["mean"])))
                offset += size
        env.set_running_stats(merged)
        return merged

    def sync_normalizers(self, env: Any) -> dict[str, dict[str, np.ndarray]] | None:
        """Rank 0's statistics into every rank's env (after a resume); returns them."""
        local = self.normalizer_stats(env)
        if not local:
            return local
        names = sorted(local)
        packed = torch.from_numpy(np.concatenate([pack(local[k]) for k in names]))[None]
        row = self.all_gather_rows(packed, "sharing rank 0's normaliser statistics")[0][0].numpy()
        out, offset = {}, 0
        for k in names:
            size = 1 + 2 * int(np.prod(np.shape(local[k]["mean"])))
            out[k] = unpack(row[offset : offset + size], np.shape(local[k]["mean"]))
            offset += size
        env.set_running_stats(out)
        return out


def pack(s: dict[str, Any]) -> np.ndarray:
    return np.concatenate([np.asarray(s["count"], np.float64).reshape(1), np.asarray(s["mean"], np.float64).reshape(-1), np.asarray(s["var"], np.float64).reshape(-1)])


def unpack(v: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    k = int(np.prod(shape))
    return {"count": np.asarray(v[0]), "mean": v[1 : 1 + k].reshape(shape).copy(), "var": v[1 + k : 1 + 2 * k].reshape(shape).copy()}


def delta_stats(base: dict[str, Any], now: dict[str, Any]) -> dict[str, np.ndarray]:
    """Count, mean and (population) variance of the data folded into ``base`` to reach ``now``:
    the parallel-variance update (Chan et al.) solved for the batch."""
    c0, c1 = float(base["count"]), float(now["count"])
    m0, m1 = np.asarray(base["mean"], np.float64), np.asarray(now["mean"], np.float64)
    n = c1 - c0
    if n <= 0:
        return {"count": np.asarray(0.0), "mean": np.zeros_like(m0), "var": np.zeros_like(m0)}
    mean = m0 + (m1 - m0) * c1 / n
    m2 = np.asarray(now["var"], np.float64) * c1 - np.asarray(base["var"], np.float64) * c0 - np.square(mean - m0) * c0 * n / c1
    return {"count": np.asarray(n), "mean": mean, "var": np.maximum(m2, 0.0) / n}


def fold_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, np.ndarray]:
    """``a`` updated with a batch of moments ``b`` (gymnasium's ``update_mean_var_count_from_moments``)."""
    ca, cb = float(a["count"]), float(b["count"])
    if cb <= 0:
        return {k: np.asarray(v, np.float64).copy() for k, v in a.items()}
    delta = np.asarray(b["mean"], np.float64) - a["mean"]
    tot = ca + cb
    m2 = np.asarray(a["var"], np.float64) * ca + np.asarray(b["var"], np.float64) * cb + np.square(delta) * ca * cb / tot
    return {"count": np.asarray(tot), "mean": a["mean"] + delta * cb / tot, "var": m2 / tot}


class ShardedSampler:
    """Each global batch's rows drawn from a generator that every rank holds in the same state;
    rank r keeps the r-th contiguous 1/W slice, so the shards are disjoint and their union is
    the batch one process would draw from that generator."""

    def __init__(self, replica: Replica, seed: int, device: str | torch.device = "cpu") -> None:
        self.replica = replica
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def rows(self, n_items: int, batch_size: int) -> Tensor:
        w, r = self.replica.world_size, self.replica.rank
        if batch_size % w:
            raise ConfigError(f"a global batch of {batch_size} does not split into {w} equal shards")
        rows = torch.randint(n_items, (batch_size,), generator=self.generator, device=self.generator.device)
        k = batch_size // w
        return rows[r * k : (r + 1) * k]


def shard_transformer(module: torch.nn.Module, rep: Replica) -> None:
    """FSDP2 in place (``torch.distributed.fsdp.fully_shard`` over all ``rep``'s processes): every
    transformer block (diffusers' ``transformer_blocks`` / ``single_transformer_blocks``) its own
    unit, then the root with what is left (embeddings, norms, projections). Parameters become
    DTensors sharded on dim 0 (and stay registered so outside forwards: an EMA swap or a loaded
    state reaches the next forward); a forward all-gathers one unit at a time, a backward reduce-scatters
    its gradients averaged over the ranks (the gradient of the global batch's mean loss)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(rep.device.type, (rep.world_size,))
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(module, name, None) or []:
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)  # the root too: between forwards every parameter is its shard


def unsharded_class(module: torch.nn.Module) -> type:
    """The module's own class under FSDP2's wrapper class (``FSDP<cls>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if issubclass(c, torch.nn.Module) and not issubclass(c, FSDPModule))


LOCAL = Replica()
_current = LOCAL


def replica() -> Replica:
    """This process's replica (world size 1 unless ``session`` joined a process group)."""
    return _current


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or 1)


@contextmanager
def session(mode: str, algo: str, device: str, timeout_s: float) -> Iterator[Replica]:
    """Join the process group torchrun described (env:// rendezvous) when ``mode`` asks for it,
    leave it afterwards. One process (world size 1): ``LOCAL``, nothing initialised."""
    global _current
    world = launched_world_size()
    if mode == "off" and world > 1:
        raise ConfigError(f"run.distributed = 'off', but this is one of {world} processes torchrun started; use 'auto' or launch one process")
    if mode == "ddp" and "WORLD_SIZE" not in os.environ:
        raise ConfigError("run.distributed = 'ddp' needs a launcher: torchrun --nproc_per_node N -m genrl train ...")
    if world == 1 or mode == "off":
        yield LOCAL
        return
    import torch.distributed as dist

    check_supported(algo)
    if device.startswith("cuda:"):
        raise ConfigError(f"run.device = {device!r}: under torchrun each process takes cuda:LOCAL_RANK; set run.device = 'cuda'")
    backend, dev = "gloo", torch.device("cpu")
    if device == "cuda":
        backend, dev = "nccl", torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    rank = int(os.environ.get("RANK", "0"))
    probe = Replica(rank, world, device=dev, timeout_s=timeout_s)
    probe._call("joining the process group", dist.init_process_group, backend, timeout=timedelta(seconds=timeout_s))
    _current = Replica(dist.get_rank(), dist.get_world_size(), device=dev, timeout_s=timeout_s)
    try:
        yield _current
        _current._call("waiting for rank 0 to finish the run", dist.barrier)  # leave together: no rank tears down under another
    finally:
        _current = LOCAL
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  a group whose peer died may not close cleanly
            pass


__all__ = ["LOCAL", "MODES", "Replica", "ShardedSampler", "SUPPORTED", "replica", "session", "shard_transformer", "unsharded_class"]
