"""genrl's samplers against diffusers' own pipelines: SD3 (the digits model) and a tiny FLUX.1.

With the noise level at 0, genrl's denoising loop (the policy's velocity + Euler steps over the
env's sigma schedule) must reproduce what ``pipeline(..., output_type="latent")`` returns from
the same initial latents, so the RL code path is the pipelines' path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from genrl.algos.grpo import GRPO, GRPOConfig  # noqa: E402
from genrl_envs.digits import build_digits_pipeline, load_clip_tokenizer, write_clip_bpe_tokenizer  # noqa: E402
from genrl_envs.t2i import TextToImageEnv  # noqa: E402
from genrl_policies.t2i import Conditioning, FlowImagePolicy, LoraSpec  # noqa: E402


def build_tiny_flux(path: Path, *, guidance_embeds: bool) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    write_clip_bpe_tokenizer(path / "tok")
    tok = load_clip_tokenizer(path / "tok")
    v = len(tok)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=16, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1))  # fmt: skip
    t5 = T5EncoderModel(T5Config(vocab_size=v, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, pad_token_id=v - 1, eos_token_id=v - 1, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))  # fmt: skip
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=1.2, shift_factor=0.1)  # fmt: skip
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok, transformer=transformer)
    out = path / "flux"
    pipe.save_pretrained(str(out))
    side = {"resolution": 16, "max_sequence_length": 8, "guidance_scale": 3.5, "num_inference_steps": 4, "prompts": "digits"}
    (out / "genrl_t2i.json").write_text(json.dumps(side))
    return out


def ode(policy: FlowImagePolicy, env: TextToImageEnv, x: torch.Tensor, cond: Conditioning, steps: int) -> torch.Tensor:
    sig = env.sigmas(steps)
    with torch.no_grad():
        for i in range(steps):
            x = x + (sig[i + 1] - sig[i]) * policy.velocity(x, sig[i].expand(x.shape[0]), cond)
    return x


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_path_matches_the_flux_pipeline(tmp_path: Path, guidance_embeds: bool) -> None:
    model = build_tiny_flux(tmp_path, guidance_embeds=guidance_embeds)
    env = TextToImageEnv(model, rewards="brightness", guidance_scale=3.5 if guidance_embeds else 2.0)
    assert env.flux and env.latent_shape == (4, 8, 8)
    assert env.true_cfg == (not guidance_embeds)
    policy = FlowImagePolicy(env.transformer, guidance_scale=env.guidance_scale, lora=LoraSpec(rank=2, alpha=4))
    assert policy.is_flux
    prompt = "a handwritten 3"
    x0 = env.initial_noise(1, torch.Generator().manual_seed(0))
    ours = ode(policy, env, x0, Conditioning(*env.encode([prompt])), 4)
    ours_sigmas = env.sigmas(4)
    pipe = env.pipe
    packed = pipe._pack_latents(x0, 1, 4, 8, 8)
    kwargs = {"guidance_scale": 3.5} if guidance_embeds else {"true_cfg_scale": 2.0, "negative_prompt": ""}
    theirs = pipe(prompt, height=16, width=16, num_inference_steps=4, latents=packed, output_type="latent", max_sequence_length=8, **kwargs).images
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), ours_sigmas)  # the resolution-dependent shift
    torch.testing.assert_close(pipe._unpack_latents(theirs, 16, 16, pipe.vae_scale_factor), ours, atol=1e-5, rtol=1e-4)
    # and GRPO trains on it
    algo = GRPO(policy, env, GRPOConfig(n_steps=3, group_size=2, prompts_per_iter=2), seed=0)
    m = algo.iterate()
    assert all(torch.isfinite(torch.tensor(val)) for val in m.values())
    assert algo.env.decode(ours).shape == (1, 1, 16, 16)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_sd3_path_matches_the_sd3_pipeline(tmp_path: Path, guidance: float) -> None:
    pipe_dir = tmp_path / "sd3"
    build_digits_pipeline(seed=0, num_layers=2).save_pretrained(str(pipe_dir))
    env = TextToImageEnv(pipe_dir, prompts="digits", rewards="brightness", resolution=8, guidance_scale=guidance, max_sequence_length=0)
    policy = FlowImagePolicy(env.transformer, guidance_scale=guidance, lora=LoraSpec(rank=2, alpha=4))
    prompt = "a handwritten 5"
    x0 = env.initial_noise(1, torch.Generator().manual_seed(1))
    ours = ode(policy, env, x0, Conditioning(*env.encode([prompt])), 5)
    theirs = env.pipe(prompt, num_inference_steps=5, latents=x0, guidance_scale=guidance, output_type="latent", max_sequence_length=0).images
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
