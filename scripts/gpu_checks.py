"""The measurements genrl owes a GPU, in one invocation: MuJoCo Warp's GPU throughput and its agreement
with C MuJoCo, and Flow-GRPO on an SD3.5-Medium-architecture transformer at 512 px (images/s, peak
memory and the on-policy log-ratio drift per precision), next to genrl.memory's estimate.

    python scripts/gpu_checks.py --out gpu_out                 # on a CUDA machine (a few minutes)
    python scripts/gpu_checks.py --small --device cpu --out /tmp/gpu_small   # the same code paths, tiny, on CPU

The SD3.5-Medium weights cannot be downloaded here, so the pipeline is built from its published
architecture with random weights (``scripts/sd35_memory.py``'s configs): the full-size MMDiT-X
transformer and VAE; the three text encoders keep their output widths (CLIP-L 768, OpenCLIP-bigG
1280, T5-XXL 4096) but have one layer each (stand-ins: their cost is a fixed per-prompt encoding,
and the rewards of random images mean nothing), with the digits model's tokenizers. Flow-GRPO runs
genrl's own ``GRPO`` (the flow-grpo preset's sampler, LoRA r 32, CFG 4.5, 10 SDE steps) with the
jpeg-compressibility reward, two iterations per precision; the second one is reported:

- fp32: float32 weights, no autocast; bf16 / fp16: weights in that dtype and ``grpo.autocast``
  alike (LoRA adapters stay float32);
- ``train/onpolicy_log_ratio_max``: max |log pi_train - log pi_sample| before the first optimiser
  step, where it must be 0 (Flow-GRPO's FAQ prefers fp16 for it);
- peak memory: ``torch.cuda.max_memory_allocated`` over the iteration, and genrl.memory's estimate of
  the transformer's share (weights + LoRA state + activations + rollout) for the same settings.

Writes ``<out>/gpu_checks.json`` and ``<out>/gpu_checks.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

PROMPTS = ["a red cube on a table", "a photo of a cat", "a mountain lake at dawn", "an astronaut riding a horse"]


def warp_checks(device: str, worlds: list[int], seconds: float) -> dict[str, Any]:
    """Raw Hopper-v5 steps/s on ``device`` for each world count (random actions, terminated worlds
    reset in the same step, CUDA graphs), and 4 worlds against C MuJoCo over 100 steps."""
    from genrl_envs.warp_sim import WarpSim, compare_with_gymnasium, warp_task

    out: dict[str, Any] = {"device": device, "steps_per_s": {}}
    for n in worlds:
        sim = WarpSim(warp_task("Hopper-v5"), n, device=device)
        sim.reset(0)
        gen = torch.Generator(device=sim.device).manual_seed(0)
        action = lambda: torch.rand(n, sim.action_dim, generator=gen, device=sim.device) * 2 - 1  # noqa: E731
        for _ in range(20):  # warm-up: kernels, graph capture
            _, _, terminated, _ = sim.step(action())
            sim.reset_done(terminated)
        if sim.device.type == "cuda":
            torch.cuda.synchronize()
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            _, _, terminated, _ = sim.step(action())
            sim.reset_done(terminated)
            steps += 1
        if sim.device.type == "cuda":
            torch.cuda.synchronize()
        out["steps_per_s"][str(n)] = steps * n / (time.perf_counter() - t0)
        print(f"warp Hopper-v5 {n} worlds on {device}: {out['steps_per_s'][str(n)]:,.0f} env steps/s", flush=True)
        sim.close()
    sim = WarpSim(warp_task("Hopper-v5"), 4, device=device)
    obs_err, rew_err, terminations, mismatched = compare_with_gymnasium(sim, 100, resync=False)
    sim.close()
    out["agreement_100_steps"] = {"max_obs_error": obs_err, "max_reward_error": rew_err, "terminations": terminations, "termination_mismatches": mismatched}
    print(f"warp vs C MuJoCo, 4 worlds x 100 steps: obs error {obs_err:.2e}, reward error {rew_err:.2e}, terminations {terminations}, mismatches {mismatched}")
    return out


def architecture_pipeline(folder: Path, dtype: torch.dtype, device: str) -> Any:
    """An SD3 pipeline with ``folder``'s transformer and VAE configs at full size and random weights,
    one-layer text encoders of the configured widths, and the digits model's tokenizers."""
    import diffusers
    import transformers

    from genrl_envs.t2i import DIGITS_MODEL_DIR

    def config(name: str) -> dict[str, Any]:
        return json.loads((folder / name / "config.json").read_text())

    torch.manual_seed(0)
    with torch.device(device):
        transformer = diffusers.SD3Transformer2DModel.from_config(config("transformer")).to(dtype)
        vae = diffusers.AutoencoderKL.from_config(config("vae")).to(dtype)
        toks = [transformers.AutoTokenizer.from_pretrained(str(DIGITS_MODEL_DIR / t)) for t in ("tokenizer", "tokenizer_2", "tokenizer_3")]
        encoders = []
        for name, tok in zip(("text_encoder", "text_encoder_2"), toks[:2], strict=True):
            c = {k: v for k, v in config(name).items() if k not in ("architectures", "model_type")}
            c.update(num_hidden_layers=1, vocab_size=max(len(tok), c.get("vocab_size", 0)))
            encoders.append(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**c)).to(dtype))
        c = {k: v for k, v in config("text_encoder_3").items() if k not in ("architectures", "model_type")}
        c.update(num_layers=1, vocab_size=max(len(toks[2]), c.get("vocab_size", 0)))
        encoders.append(transformers.T5EncoderModel(transformers.T5Config(**c)).to(dtype))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=encoders[0], tokenizer=toks[0],
        text_encoder_2=encoders[1], tokenizer_2=toks[1], text_encoder_3=encoders[2], tokenizer_3=toks[2],
    )  # fmt: skip


def grpo_checks(folder: Path, device: str, resolution: int, group: int, prompts: int, precisions: list[str], max_sequence_length: int) -> dict[str, Any]:
    """Two Flow-GRPO iterations per precision; the second one's images/s, drift and peak memory."""
    from genrl.algos.grpo import GRPO
    from genrl.algos.grpo_config import GRPOConfig
    from genrl_envs.t2i import TextToImageEnv
    from genrl_policies.t2i import FlowImagePolicy, LoraSpec

    out: dict[str, Any] = {}
    cuda = device.startswith("cuda")
    for precision in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        pipe = architecture_pipeline(folder, dtype, device)
        env = TextToImageEnv("sd3.5-architecture", prompts=PROMPTS, rewards="jpeg_compressibility", resolution=resolution, guidance_scale=4.5,
                             max_sequence_length=max_sequence_length, device=device, dtype=dtype, pipeline=pipe)  # fmt: skip
        policy = FlowImagePolicy(env.transformer, guidance_scale=env.guidance_scale, finetune="lora", lora=LoraSpec(rank=32, alpha=64.0), noise_level=0.7)
        cfg = GRPOConfig(n_steps=10, group_size=group, prompts_per_iter=prompts, updates_per_epoch=1, eval_n_steps=10, kl_coef=0.0,
                         autocast={"fp32": "off", "bf16": "bfloat16", "fp16": "float16"}[precision], gradient_checkpointing=cuda,
                         micro_batch=4, drop_zero_advantage=False)  # fmt: skip
        algo = GRPO(policy, env, cfg, algo="flow-grpo", seed=0, total_images=10 * group * prompts)
        algo.iterate()  # warm-up: kernels, autotuning
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        metrics = algo.iterate()
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if cuda else None
        row = {"images_per_s": metrics["time/images_per_s"], "onpolicy_log_ratio_max": metrics.get("train/onpolicy_log_ratio_max"),
               "ratio_mean": metrics.get("train/ratio_mean"), "peak_memory_gib": None if peak is None else peak / 2**30,
               "transformer_params": sum(p.numel() for n, p in env.transformer.named_parameters() if "lora_" not in n)}  # fmt: skip
        out[precision] = row
        print(f"flow-grpo {precision}: {row['images_per_s']:.2f} images/s, on-policy max |log ratio| {row['onpolicy_log_ratio_max']}, peak "
              f"{'n/a' if peak is None else f'{peak / 2**30:.1f} GiB'}", flush=True)  # fmt: skip
        del algo, policy, env, pipe
        if cuda:
            torch.cuda.empty_cache()
    return out


def estimate(folder: Path, resolution: int, group: int, prompts: int, precision: str) -> dict[str, float]:
    """genrl.memory's estimate of the transformer's share for the settings of ``grpo_checks``."""
    from genrl.config import config_from_dict
    from genrl.memory import GIB, estimate_image_memory

    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    cfg = config_from_dict({
        "env": "t2i", "algo": "flow-grpo", "model": str(folder), "dtype": dtype, "reward": "jpeg_compressibility",
        "grpo": {"n_steps": 10, "group_size": group, "prompts_per_iter": prompts, "guidance_scale": 4.5, "resolution": resolution,
                 "micro_batch": 4, "gradient_checkpointing": True, "kl_coef": 0.0, "drop_zero_advantage": False,
                 "autocast": {"fp32": "off", "bf16": "bfloat16", "fp16": "float16"}[precision]},
        "run": {"progress": False},
    })  # fmt: skip
    est = estimate_image_memory(cfg)
    b = est["bytes"]
    wbytes = {"fp32": 4, "bf16": 2, "fp16": 2}[precision]
    transformer = est["params"]["transformer"] * wbytes + b["trainable_state"] + b["activations"] + b["rollout"]
    return {"transformer_share_gib": transformer / GIB, "total_real_pipeline_gib": b["total"] / GIB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny sizes (the digits model's configs, 4 worlds): a smoke test of these code paths")
    p.add_argument("--parts", nargs="+", default=["warp", "t2i"], choices=["warp", "t2i"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--group", type=int, default=8, help="images per prompt (G)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per iteration")
    p.add_argument("--out", default="gpu_out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device, "torch": torch.__version__}
    if "warp" in args.parts:
        results["warp"] = warp_checks(args.device, [4] if args.small else [1024, 4096, 16384], 0.5 if args.small else 5.0)
    if "t2i" in args.parts:
        if args.small:
            from genrl_envs.t2i import DIGITS_MODEL_DIR

            folder, resolution, seq = DIGITS_MODEL_DIR, 8, 8
        else:
            import tempfile

            from sd35_memory import write_folder

            folder, resolution, seq = write_folder(Path(tempfile.mkdtemp()) / "sd35-medium"), 512, 256
        results["flow_grpo"] = grpo_checks(folder, args.device, resolution, args.group, args.prompts, args.precisions, seq)
        results["flow_grpo_settings"] = {"resolution": resolution, "group_size": args.group, "prompts_per_iter": args.prompts, "n_steps": 10,
                                         "micro_batch": 4, "lora_rank": 32, "guidance_scale": 4.5}  # fmt: skip
        if not args.small:
            results["memory_estimate"] = {pr: estimate(folder, resolution, args.group, args.prompts, pr) for pr in args.precisions}
    (out / "gpu_checks.json").write_text(json.dumps(results, indent=2))
    lines = [f"device: {results['device']}, torch {results['torch']}", ""]
    if "warp" in results:
        w = results["warp"]
        lines += ["| Warp Hopper-v5 worlds | env steps/s |", "|---|---|"] + [f"| {n} | {v:,.0f} |" for n, v in w["steps_per_s"].items()]
        lines += ["", f"agreement with C MuJoCo (4 worlds, 100 steps): {w['agreement_100_steps']}", ""]
    if "flow_grpo" in results:
        lines += ["| precision | images/s | on-policy max abs log ratio | peak memory | estimate (transformer share) |", "|---|---|---|---|---|"]
        for pr, r in results["flow_grpo"].items():
            est = results.get("memory_estimate", {}).get(pr, {}).get("transformer_share_gib")
            peak = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
            lines.append(f"| {pr} | {r['images_per_s']:.2f} | {r['onpolicy_log_ratio_max']} | {peak} | {'n/a' if est is None else f'{est:.1f} GiB'} |")
    (out / "gpu_checks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
