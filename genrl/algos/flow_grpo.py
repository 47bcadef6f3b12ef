"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470; reference ``yifan123/flow_grpo``).

Sample G images per prompt with the SDE sampler (``genrl_policies.t2i.sde_step``), store every
step's (x_t, x_t+1, log pi_old), score the images, take group-relative advantages per prompt,
broadcast them to every trained step, and minimise the clipped surrogate (clip 1e-4: log-probs
are per-element means) plus an optional KL to the frozen reference (LoRA disabled). Options:
same initial noise per group, SDE on a subset of steps (MixGRPO-style ``sde_steps``),
``updates_per_epoch`` optimiser steps per pass, the zero-advantage filter, an EMA of the weights.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from genrl.advantages import aggregate_advantages
from genrl.algos.grpo import GRPO, _Timer, kept_samples, trained_steps
from genrl.losses import clipped_surrogate
from genrl_policies.t2i import Conditioning


class FlowGRPO(GRPO):
    """Flow-GRPO on a ``TextToImageEnv`` (see the module docstring)."""

    name = "flow-grpo"

    @torch.no_grad()
    def collect(self, timer: _Timer) -> dict[str, Any]:
        """SDE-sample P*G images, store the trained steps' transitions, score, advantages."""
        cfg, env, G = self.cfg, self.env, self.cfg.group_size
        t0 = time.perf_counter()
        prompts = self._prompts()
        cond = Conditioning(*env.encode(prompts)).repeat_interleave(G)
        if cfg.same_initial_noise:
            x = env.initial_noise(len(prompts), self.shared).repeat_interleave(G, dim=0)
        else:
            x = env.initial_noise(len(prompts) * G, self.shared)
        flat_prompts = [p for p in prompts for _ in range(G)]
        mine = self._share(len(flat_prompts))  # data-parallel: this rank's images (a group may span ranks)
        if self.dist.world_size > 1:
            cond, x, flat_prompts = cond.index(mine), x[mine], flat_prompts[mine]
        train = trained_steps(cfg)
        stochastic = set(cfg.sde_steps) if cfg.sde_steps else set(range(cfg.n_steps))
        xs, nexts, lps, means = [], [], [], []
        for i in range(cfg.n_steps):
            st = self._step(x, i, cond, cfg.noise_level if i in stochastic else 0.0, generator=self.generator)
            if i in train:
                xs.append(x)
                nexts.append(st.x_next)
                lps.append(st.log_prob)
                means.append(st.mean)
            x = st.x_next
        timer.add("sample", t0)
        t0 = time.perf_counter()
        images = env.decode(x)
        scores = env.score(images, flat_prompts)  # rewards where the images are
        timer.add("reward", t0)
        scores = {k: self._gather(v.to(self.device)) for k, v in scores.items()}  # every rank's, so groups are whole
        grouped = {k: v.reshape(len(prompts), G) for k, v in scores.items()}
        adv = aggregate_advantages(grouped, env.rewards.weights, mode=self.aggregation, std_scope=cfg.std_scope, ddof=self.ddof, eps=self.eps)
        adv = adv.reshape(-1).clamp(-cfg.adv_clip, cfg.adv_clip)[mine]
        return {
            "prompts": prompts, "cond": cond, "steps": train, "x": torch.stack(xs, 1), "x_next": torch.stack(nexts, 1),
            "log_prob": torch.stack(lps, 1), "mean": torch.stack(means, 1), "advantages": adv, "scores": scores, "images": images,
        }  # fmt: skip

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """Clipped surrogate (+ KL) over the stored steps; gradients accumulate over steps."""
        cfg = self.cfg
        n = batch["advantages"].shape[0]
        steps = batch["steps"]
        stats: dict[str, list[float]] = {"loss": [], "clip_fraction": [], "approx_kl": [], "kl_ref": [], "ratio_mean": [], "grad_norm": []}
        keep = torch.arange(n)
        if cfg.drop_zero_advantage:
            keep = kept_samples(batch["advantages"], cfg.updates_per_epoch, self.generator)
            stats["kept_fraction"] = [keep.numel() / n]
            if keep.numel() == 0:
                return {f"train/{k}": sum(v) / len(v) for k, v in stats.items() if v}
        first_step, drift = self.optimizer_steps, 0.0
        for _ in range(cfg.n_epochs):
            order = keep[torch.randperm(keep.numel(), generator=self.generator)] if cfg.updates_per_epoch > 1 else keep
            for mb in order.chunk(cfg.updates_per_epoch):
                self.optimizer.zero_grad(set_to_none=True)
                total = torch.zeros(())
                # micro-batches: the minibatch's forward in pieces, gradients accumulated (the same step)
                pieces = [mb] if cfg.micro_batch is None or cfg.micro_batch >= mb.numel() else list(mb.split(cfg.micro_batch))
                for piece in pieces:
                    w = piece.numel() / mb.numel()  # each piece's share of the minibatch mean
                    cond, adv = batch["cond"].index(piece), batch["advantages"][piece]
                    for j, i in enumerate(steps):
                        x, x_next = batch["x"][piece, j], batch["x_next"][piece, j]
                        with self._saving():
                            new = self._step(x, i, cond, cfg.noise_level, x_next=x_next)
                            log_ratio = self._log_ratio(new, batch["log_prob"][piece, j], batch["mean"][piece, j])
                            loss, st = clipped_surrogate(log_ratio, adv, cfg.clip_coef)
                            if cfg.kl_coef > 0:
                                kl = self._kl(new, x, i, cond).mean()
                                loss = loss + cfg.kl_coef * kl
                                stats["kl_ref"].append(kl.item())
                        if len(pieces) > 1:
                            loss = loss * w
                        (loss / len(steps)).backward()
                        total = total + loss.detach() / len(steps)
                        stats["clip_fraction"].append(float(st["clip_fraction"]))
                        stats["approx_kl"].append(float(st["approx_kl"]))
                        stats["ratio_mean"].append(float(log_ratio.detach().exp().mean()))
                        if self.optimizer_steps == first_step:  # on-policy: sampling vs training log-probs (precision drift)
                            drift = max(drift, float(log_ratio.detach().abs().max()))
                stats["grad_norm"].append(self._finish(total))
                stats["loss"].append(float(total))
        stats["onpolicy_log_ratio_max"] = [drift]
        return {f"train/{k}": sum(v) / len(v) for k, v in stats.items() if v}

    collect_flow_grpo = collect
    update_flow_grpo = update
