"""G2RPO (Zhou et al. 2025, arXiv 2510.01982; reference ``bcmi/Granular-GRPO``).

Singular Stochastic Sampling: one initial noise and one deterministic anchor trajectory per
prompt; at each optimised step k the G branches differ only by that step's SDE noise and continue
deterministically, so the reward is attributable to step k. Multi-Granularity Advantage
Integration: each branch is continued under several step strides lambda (the released loop's
rule, ``continuation_indices``), every (prompt, k, lambda) column is normalised over its G
branches, and the advantages are summed over lambda. One optimiser step per k.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from genrl.advantages import aggregate_advantages, batch_normalize
from genrl.algos.grpo import GRPO, _Timer, continuation_indices
from genrl.losses import clipped_surrogate
from genrl_policies.t2i import Conditioning, sde_step


class G2RPO(GRPO):
    """G2RPO on a ``TextToImageEnv`` (see the module docstring)."""

    name = "g2rpo"

    @torch.no_grad()
    def collect(self, timer: _Timer) -> dict[str, Any]:
        """Anchor ODE trajectory per prompt, G single-step SDE branches per optimised step k,
        each continued deterministically under every granularity; rewards per (k, lambda)."""
        cfg, env, G, T = self.cfg, self.env, self.cfg.group_size, self.cfg.n_steps
        t0 = time.perf_counter()
        prompts = self._prompts()
        x = env.initial_noise(len(prompts), self.shared)
        mine = self._share(len(prompts))  # data-parallel: this rank's whole prompts (groups stay on one rank)
        if self.dist.world_size > 1:
            prompts, x = prompts[mine], x[mine]
        P = len(prompts)
        cond_p = Conditioning(*env.encode(prompts))
        cond = cond_p.repeat_interleave(G)
        anchors = []
        for k in range(self.m_steps):  # the anchor only needs to reach the last optimised step
            anchors.append(x)
            x = self._ode(x, cond_p, [k, k + 1])
        branches, lps, means, finals = [], [], [], []
        for k in range(self.m_steps):
            xk = anchors[k]
            s = self.sigmas
            v = self.policy.velocity(xk, s[k].expand(P), cond_p).repeat_interleave(G, dim=0)  # one forward per prompt
            st = sde_step(v, xk.repeat_interleave(G, dim=0), s[k], s[k + 1], cfg.noise_level, sigma_guard=s[1], generator=self.generator)
            branches.append(st.x_next)
            lps.append(st.log_prob)
            means.append(st.mean)
            finals.append([self._ode(st.x_next, cond, continuation_indices(k, lam, T, cfg.continuation)) for lam in cfg.granularities])
        timer.add("sample", t0)
        t0 = time.perf_counter()
        L = len(cfg.granularities)
        latents = torch.stack([torch.stack(f) for f in finals])  # (M, L, N, C, H, W)
        images = env.decode(latents.reshape(-1, *latents.shape[3:]))
        flat_prompts = [p for p in prompts for _ in range(G)] * (self.m_steps * L)
        scores = env.score(images, flat_prompts)
        timer.add("reward", t0)
        grouped = {k: self._gather(v.to(self.device).reshape(self.m_steps, L, P, G), dim=2) for k, v in scores.items()}  # every rank's prompts
        inner = "per_reward" if self.aggregation == "gdpo" else self.aggregation
        adv = aggregate_advantages(grouped, env.rewards.weights, mode=inner, std_scope="group", ddof=self.ddof, eps=self.eps).sum(dim=1)
        if self.aggregation == "gdpo":  # GDPO over the lambda-summed advantages (of the global batch)
            adv = batch_normalize(adv, ddof=self.ddof, eps=self.eps)
        adv = adv[:, mine].reshape(self.m_steps, P * G).clamp(-cfg.adv_clip, cfg.adv_clip)
        scores = {k: v.reshape(-1) for k, v in grouped.items()}
        return {
            "prompts": prompts, "cond_p": cond_p, "anchors": torch.stack(anchors), "x_next": torch.stack(branches),
            "log_prob": torch.stack(lps), "mean": torch.stack(means), "advantages": adv, "scores": scores, "images": images,
        }  # fmt: skip

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimiser step per optimised step k: only the step-k transition enters the ratio."""
        cfg, G = self.cfg, self.cfg.group_size
        s = self.sigmas
        stats: dict[str, list[float]] = {"loss": [], "clip_fraction": [], "approx_kl": [], "kl_ref": [], "ratio_mean": [], "grad_norm": []}
        cond_p = batch["cond_p"]
        for _ in range(cfg.n_epochs):
            for k in range(self.m_steps):
                self.optimizer.zero_grad(set_to_none=True)
                xk = batch["anchors"][k]
                P = xk.shape[0]
                with self._saving():
                    v = self.policy.velocity(xk, s[k].expand(P), cond_p).repeat_interleave(G, dim=0)
                new = sde_step(v, xk.repeat_interleave(G, dim=0), s[k], s[k + 1], cfg.noise_level, x_next=batch["x_next"][k], sigma_guard=s[1])
                log_ratio = self._log_ratio(new, batch["log_prob"][k], batch["mean"][k])
                loss, st = clipped_surrogate(log_ratio, batch["advantages"][k], cfg.clip_coef)
                if cfg.kl_coef > 0:
                    kl = self._kl(new, xk, k, cond_p, velocity_rows=G).mean()
                    loss = loss + cfg.kl_coef * kl
                    stats["kl_ref"].append(kl.item())
                loss.backward()
                stats["grad_norm"].append(self._finish(loss.detach()))
                stats["loss"].append(loss.item())
                stats["clip_fraction"].append(float(st["clip_fraction"]))
                stats["approx_kl"].append(float(st["approx_kl"]))
                stats["ratio_mean"].append(float(log_ratio.detach().exp().mean()))
                if "onpolicy_log_ratio_max" not in stats:  # before the first optimiser step: sampling vs training (precision drift)
                    stats["onpolicy_log_ratio_max"] = [float(log_ratio.detach().abs().max())]
        return {f"train/{k}": sum(v) / len(v) for k, v in stats.items() if v}

    collect_g2rpo = collect
    update_g2rpo = update
