"""Text-to-image back end, Flow-GRPO / G2RPO training and the run folder, on tiny local pipelines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from genrl.algos.grpo import GRPO, GRPOConfig  # noqa: E402
from genrl.losses import clipped_surrogate  # noqa: E402
from genrl_envs.base import EnvError  # noqa: E402
from genrl_envs.digits import build_digits_pipeline  # noqa: E402
from genrl_envs.rewards import RewardError, RewardSet  # noqa: E402
from genrl_envs.t2i import TextToImageEnv, load_pipeline, read_prompts  # noqa: E402
from genrl_policies.t2i import Conditioning, FlowImagePolicy, LoraSpec, sde_step  # noqa: E402

PROMPTS = [f"a handwritten {d}" for d in range(10)]
SIDE = {"resolution": 8, "max_sequence_length": 0, "guidance_scale": 1.0, "num_inference_steps": 4, "prompts": "digits"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    build_digits_pipeline(seed=0, num_layers=2).save_pretrained(str(path))
    (path / "genrl_t2i.json").write_text(json.dumps(SIDE))
    return path


@pytest.fixture(scope="module")
def vae_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_vae") / "pipe"
    build_digits_pipeline(seed=1, num_layers=2, with_vae=True).save_pretrained(str(path))
    (path / "genrl_t2i.json").write_text(json.dumps(dict(SIDE, resolution=8)))
    return path


def make(model_dir: Path, algo: str = "flow-grpo", reward: str = "brightness", seed: int = 0, **kw: object) -> GRPO:
    env = TextToImageEnv(model_dir, rewards=reward)
    policy = FlowImagePolicy(env.transformer, guidance_scale=env.guidance_scale, lora=LoraSpec(rank=4, alpha=8))
    cfg = GRPOConfig(**{"n_steps": 4, "group_size": 4, "prompts_per_iter": 2, **kw})  # type: ignore[arg-type]
    return GRPO(policy, env, cfg, algo=algo, seed=seed, total_images=64)


def test_pipeline_round_trip_through_the_loading_path(vae_model_dir: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(vae_model_dir)
    assert pipe.vae is not None and pipe.text_encoder_3 is None
    pipe.save_pretrained(str(tmp_path / "again"))
    again = load_pipeline(tmp_path / "again")
    for a, b in zip(pipe.transformer.state_dict().values(), again.transformer.state_dict().values()):
        assert torch.equal(a, b)
    env = TextToImageEnv(vae_model_dir, rewards="brightness")
    assert env.latent_shape == (4, 4, 4)  # VAE path: 4 latent channels, downsampling 2
    images = env.decode(env.initial_noise(3, torch.Generator().manual_seed(0)))
    assert images.shape == (3, 1, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_encode_is_cached_and_matches_the_pipeline(model_dir: Path) -> None:
    env = TextToImageEnv(model_dir, rewards="brightness")
    pe, pooled, neg, negp = env.encode(["a handwritten 3", "a handwritten 5", "a handwritten 3"])
    assert neg is None and negp is None  # guidance 1: no negatives
    ref = env.pipe.encode_prompt(["a handwritten 3"], None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=0)
    assert torch.equal(pe[0], ref[0][0])
    assert torch.equal(pooled[0], ref[2][0])
    assert torch.equal(pe[2], pe[0])
    cfg_env = TextToImageEnv(model_dir, rewards="brightness", guidance_scale=3.0)
    assert cfg_env.encode(["a handwritten 1"])[2] is not None


def test_stored_log_probs_give_ratio_one_at_unchanged_parameters(model_dir: Path) -> None:
    algo = make(model_dir, guidance_scale=None)
    from genrl.algos.grpo import _Timer

    batch = algo.collect_flow_grpo(_Timer())
    for j, i in enumerate(batch["steps"]):
        new = algo._step(batch["x"][:, j], i, batch["cond"], algo.cfg.noise_level, x_next=batch["x_next"][:, j])
        assert torch.equal(new.log_prob, batch["log_prob"][:, j])  # same batch: bitwise
        loss, st = clipped_surrogate(new.log_prob - batch["log_prob"][:, j], batch["advantages"], algo.cfg.clip_coef)
        torch.testing.assert_close(loss, -batch["advantages"].mean())
    # advantages: zero mean per prompt group (Flow-GRPO's global std keeps group means at 0)
    adv = batch["advantages"].reshape(2, 4)
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(2), atol=1e-6, rtol=0)


def test_batched_branch_forward_equals_repeated_single_forwards(model_dir: Path) -> None:
    algo = make(model_dir, algo="g2rpo")
    env = algo.env
    cond = Conditioning(*env.encode(["a handwritten 4"]))
    x = env.initial_noise(1, torch.Generator().manual_seed(3))
    s = algo.sigmas
    with torch.no_grad():
        v1 = algo.policy.velocity(x, s[1].expand(1), cond)
        vG = algo.policy.velocity(x.repeat(4, 1, 1, 1), s[1].expand(4), cond.repeat_interleave(4))
    torch.testing.assert_close(vG, v1.repeat(4, 1, 1, 1), atol=1e-6, rtol=1e-5)


def test_g2rpo_one_step_one_granularity_equals_single_sde_step_flow_grpo(model_dir: Path) -> None:
    """G2RPO with M = {0}, Lambda = {1} is Flow-GRPO with only step 0 stochastic and trained, one
    initial noise per group and G2RPO's std convention: same samples, advantages, loss, gradient."""
    from genrl.algos.grpo import _Timer

    common = dict(std_scope="group", std_ddof=1, adv_eps=1e-8, granularities=(1,), g2rpo_steps=1)
    g2 = make(model_dir, algo="g2rpo", **common)
    fg = GRPO(g2.policy, g2.env, GRPOConfig(n_steps=4, group_size=4, prompts_per_iter=2, sde_steps=(0,), same_initial_noise=True, **common), algo="flow-grpo", seed=0)
    b2 = g2.collect_g2rpo(_Timer())
    bf = fg.collect_flow_grpo(_Timer())
    assert b2["prompts"] == bf["prompts"] and bf["steps"] == [0]
    torch.testing.assert_close(b2["x_next"][0], bf["x_next"][:, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b2["advantages"][0], bf["advantages"], atol=1e-4, rtol=1e-4)

    def loss_and_grad(algo: GRPO, new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        algo.optimizer.zero_grad(set_to_none=True)
        loss, _ = clipped_surrogate(new_lp - old_lp, adv, algo.cfg.clip_coef)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in algo.policy.trainable_parameters()]

    s = g2.sigmas
    xk = b2["anchors"][0]
    v = g2.policy.velocity(xk, s[0].expand(2), b2["cond_p"]).repeat_interleave(4, dim=0)
    new2 = sde_step(v, xk.repeat_interleave(4, dim=0), s[0], s[1], 0.7, x_next=b2["x_next"][0], sigma_guard=s[1])
    l2, g2grad = loss_and_grad(g2, new2.log_prob, b2["log_prob"][0], b2["advantages"][0])
    newf = fg._step(bf["x"][:, 0], 0, bf["cond"], 0.7, x_next=bf["x_next"][:, 0])
    lf, gfgrad = loss_and_grad(fg, newf.log_prob, bf["log_prob"][:, 0], bf["advantages"])
    torch.testing.assert_close(l2, lf, atol=1e-5, rtol=1e-4)
    for a, b in zip(g2grad, gfgrad):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_g2rpo_counts_and_granularity_sum(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from genrl.algos.grpo import _Timer

    algo = make(model_dir, algo="g2rpo", granularities=(1, 2), g2rpo_steps=2, adv_clip=1e9)
    calls: list[int] = []
    inner = algo.env.rewards.fns["brightness"]
    monkeypatch.setitem(algo.env.rewards.fns, "brightness", lambda im, pr: calls.append(im.shape[0]) or inner(im, pr))
    steps: list[int] = []
    orig = algo.optimizer.step
    monkeypatch.setattr(algo.optimizer, "step", lambda *a, **k: steps.append(1) or orig(*a, **k))
    metrics = algo.iterate()
    assert sum(calls) == 2 * 4 * 2 * 2  # P * G * |M| * |Lambda| reward evaluations
    assert len(steps) == 2  # one optimiser step per optimised step k
    assert metrics["reward/brightness"] > 0
    # Lambda = {1, 1} doubles the advantages of Lambda = {1} (summed, not averaged)
    one = make(model_dir, algo="g2rpo", granularities=(1,), g2rpo_steps=2, adv_clip=1e9, seed=5).collect_g2rpo(_Timer())
    two = make(model_dir, algo="g2rpo", granularities=(1, 1), g2rpo_steps=2, adv_clip=1e9, seed=5).collect_g2rpo(_Timer())
    torch.testing.assert_close(two["advantages"], 2 * one["advantages"])
    for k in range(2):  # each (prompt, k) column is normalised on its own: zero mean over branches
        torch.testing.assert_close(one["advantages"][k].reshape(2, 4).mean(1), torch.zeros(2), atol=1e-5, rtol=0)
    # all G branches at step k start from the same anchor latent, one per prompt
    assert one["anchors"].shape[1] == 2


def test_lora_training_leaves_base_weights_unchanged(model_dir: Path) -> None:
    algo = make(model_dir, kl_coef=0.05, updates_per_epoch=2, learning_rate=1e-2)
    base = {k: v.clone() for k, v in algo.policy.transformer.state_dict().items() if "lora_" not in k}
    lora = {k: v.clone() for k, v in algo.policy.adapter_state_dict().items()}
    m = algo.iterate()
    assert m["train/kl_ref"] >= 0
    now = algo.policy.transformer.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items())
    assert any(not torch.equal(algo.policy.adapter_state_dict()[k], v) for k, v in lora.items())


def test_full_finetuning_with_reference_copy(model_dir: Path) -> None:
    env = TextToImageEnv(model_dir, rewards="brightness")
    policy = FlowImagePolicy(env.transformer, finetune="full")
    algo = GRPO(policy, env, GRPOConfig(n_steps=3, group_size=2, prompts_per_iter=2, kl_coef=0.1, learning_rate=1e-3), seed=0)
    before = {k: v.clone() for k, v in policy.transformer.state_dict().items()}
    algo.iterate()
    assert any(not torch.equal(policy.transformer.state_dict()[k], v) for k, v in before.items())
    with policy.reference():  # the reference is the frozen copy of the starting weights
        assert all(torch.equal(policy.transformer.state_dict()[k], v) for k, v in before.items())


def test_guard_and_gdpo_options_run(model_dir: Path) -> None:
    m = make(model_dir, ratio="guard", reward="brightness=1,jpeg_compressibility=0.1", reward_aggregation="gdpo", updates_per_epoch=2).iterate()
    assert {"reward/brightness", "reward/jpeg_compressibility", "reward/total"} <= set(m)
    m = make(model_dir, algo="g2rpo", ratio="guard", g2rpo_steps=1, reward="brightness,jpeg_incompressibility", reward_aggregation="gdpo").iterate()
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())


def test_rewards_registry_and_plugins(tmp_path: Path) -> None:
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a handwritten 1", "the digit seven", "a handwritten 3"]
    rs = RewardSet("digit,digit_correct,brightness=2,jpeg_compressibility", "cpu")
    scores = rs(images, prompts)
    assert set(scores) == {"digit", "digit_correct", "brightness", "jpeg_compressibility"}
    assert all(v.shape == (3,) for v in scores.values())
    assert ((scores["digit"] >= 0) & (scores["digit"] <= 1)).all()
    torch.testing.assert_close(rs.total(scores), scores["digit"] + scores["digit_correct"] + 2 * scores["brightness"] + scores["jpeg_compressibility"])
    plug = tmp_path / "myreward.py"
    plug.write_text("def score(images, prompts):\n    return [len(p) for p in prompts]\n")
    out = RewardSet(f"{plug}:score")(images, prompts)
    assert out[f"{plug}:score"].tolist() == [float(len(p)) for p in prompts]
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        RewardSet("nope")
    with pytest.raises(RewardError, match="names no digit"):
        RewardSet("digit")(images[:1], ["a cat"])
    with pytest.raises(RewardError, match="not a number"):
        RewardSet("digit=abc")
    with pytest.raises(RewardError, match="not a transformers model folder"):
        RewardSet(f"clip:{tmp_path}")


def test_clip_reward_from_a_local_folder(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from genrl_envs.digits import load_clip_tokenizer, write_clip_bpe_tokenizer

    write_clip_bpe_tokenizer(tmp_path / "tok")
    tok = load_clip_tokenizer(tmp_path / "tok")
    v = len(tok)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1,
        ),  # fmt: skip
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(tmp_path / "clip"))
    proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(str(tmp_path / "clip"))
    rs = RewardSet(f"clip:{tmp_path / 'clip'}")
    out = rs(torch.rand(2, 1, 8, 8), ["a handwritten 1", "a handwritten 2"])
    assert out[f"clip:{tmp_path / 'clip'}"].shape == (2,)


def test_clear_errors_for_bad_inputs(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EnvError, match="does not exist"):
        TextToImageEnv(tmp_path / "nowhere")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(EnvError, match="no model_index.json"):
        TextToImageEnv(tmp_path / "empty_dir")
    with pytest.raises(EnvError, match="prompts file .* does not exist"):
        TextToImageEnv(model_dir, prompts=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(EnvError, match="no prompts"):
        read_prompts(str(empty))
    bad_json = tmp_path / "p.json"
    bad_json.write_text('{"a": 1}')
    with pytest.raises(EnvError, match="JSON list of strings"):
        read_prompts(str(bad_json))
    with pytest.raises(RewardError, match="unknown reward"):
        TextToImageEnv(model_dir, rewards="aesthetics")
    good = tmp_path / "prompts.txt"
    good.write_text("a handwritten 1\n# skip\n\na handwritten 2\n")
    assert read_prompts(str(good)) == ["a handwritten 1", "a handwritten 2"]


def test_cli_run_resume_export_and_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from genrl.cli import main
    from genrl.image_trainer import load_finetuned

    common = ["train", "--env", "t2i", "--model", str(model_dir), "--reward", "brightness", "--no-progress",
              "--set", "grpo.n_steps=3", "--set", "grpo.group_size=2", "--set", "grpo.prompts_per_iter=2",
              "--set", "grpo.lora_rank=2", "--set", "run.eval_episodes=2"]  # fmt: skip
    full = tmp_path / "full"
    assert main([*common, "--steps", "12", "--out", str(full), "--save-every", "4"]) == 0
    for f in ("progress.csv", "config.json", "curves.png", "images/grid-0.png", "images/grid-12.png", "final/pytorch_lora_weights.safetensors"):
        assert (full / f).is_file(), f
    # resume from the middle reproduces the uninterrupted run's adapter weights bitwise
    part = tmp_path / "part"
    assert main([*common, "--steps", "12", "--out", str(part), "--save-every", "4"]) == 0
    import shutil

    for step in ("8", "12"):
        shutil.rmtree(part / "checkpoints" / step)
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    from safetensors.torch import load_file

    a = load_file(str(full / "checkpoints" / "12" / "adapter.safetensors"))
    b = load_file(str(part / "checkpoints" / "12" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the exported LoRA loads into the base pipeline with diffusers' own loader
    pipe = load_finetuned(full)
    env = TextToImageEnv(model_dir, rewards="brightness")
    policy = FlowImagePolicy(env.transformer, lora=LoraSpec(rank=2, alpha=64.0))
    policy.load_adapter_state_dict(a)
    cond = Conditioning(*env.encode(["a handwritten 2"]))
    x = env.initial_noise(1, torch.Generator().manual_seed(0))
    sig = torch.tensor([0.5])
    with torch.no_grad():
        ours = policy.velocity(x, sig, cond)
        theirs = pipe.transformer(hidden_states=x, timestep=sig * 1000, encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled).sample
    torch.testing.assert_close(ours, theirs)
    # errors: one line, exit 2, nothing written
    capsys.readouterr()
    assert main(["train", "--env", "t2i", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*common, "--reward", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "unknown reward" in capsys.readouterr().err
    assert main([*common, "--prompts", str(tmp_path / "nofile.txt"), "--out", str(tmp_path / "z")]) == 2
    assert "prompts file" in capsys.readouterr().err
    assert main([*common, "--algo", "ppo", "--out", str(tmp_path / "w")]) == 2
    assert "flow-grpo" in capsys.readouterr().err
    assert main([*common, "--policy", "gaussian", "--out", str(tmp_path / "v")]) == 2


def test_nonfinite_loss_stops_with_a_message(model_dir: Path) -> None:
    from genrl.errors import NonFiniteLossError

    algo = make(model_dir)
    velocity = algo.policy.velocity

    def poisoned(*args: object) -> torch.Tensor:  # finite while sampling, NaN in the update
        v = velocity(*args)  # type: ignore[arg-type]
        return v * float("nan") if algo.policy.training else v

    algo.policy.velocity = poisoned  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        algo.iterate()


@pytest.mark.skipif(not os.path.isfile(Path(__file__).resolve().parents[1] / "assets" / "digits-sd3" / "model_index.json"), reason="digits model not built")
def test_digits_model_loads_through_the_model_id() -> None:
    env = TextToImageEnv("digits", rewards="digit")
    assert env.prompts and env.latent_shape == (1, 8, 8)
    assert env.max_sequence_length == 8 and env.pipe.vae is not None and env.pipe.text_encoder_3 is not None


def test_half_precision_model_keeps_float32_latents_and_adapters(model_dir: Path) -> None:
    env = TextToImageEnv(model_dir, rewards="brightness", dtype=torch.bfloat16)
    policy = FlowImagePolicy(env.transformer, lora=LoraSpec(rank=2, alpha=4))
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert env.transformer.dtype == torch.bfloat16
    algo = GRPO(policy, env, GRPOConfig(n_steps=3, group_size=2, prompts_per_iter=2), seed=0)
    m = algo.iterate()
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    assert env.initial_noise(1).dtype == torch.float32


def test_ema_and_zero_advantage_runs_resume_bitwise_and_export_the_ema(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file

    from genrl.cli import main

    common = ["train", "--env", "t2i", "--model", str(model_dir), "--reward", "brightness", "--no-progress", "--steps", "16",
              "--save-every", "4", "--set", "grpo.n_steps=3", "--set", "grpo.group_size=2", "--set", "grpo.prompts_per_iter=2",
              "--set", "grpo.lora_rank=2", "--set", "run.eval_episodes=1", "--set", "grpo.ema=true", "--set", "grpo.ema_interval=2",
              "--set", "grpo.drop_zero_advantage=true", "--set", "grpo.updates_per_epoch=2"]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*common, "--out", str(full)]) == 0
    assert main([*common, "--out", str(part)]) == 0
    for step in ("12", "16"):
        shutil.rmtree(part / "checkpoints" / step)
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    for name in ("adapter.safetensors", "trainer.safetensors"):
        a = load_file(str(full / "checkpoints" / "16" / name))
        b = load_file(str(part / "checkpoints" / "16" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    trainer = load_file(str(full / "checkpoints" / "16" / "trainer.safetensors"))
    adapter = load_file(str(full / "checkpoints" / "16" / "adapter.safetensors"))
    ema = [trainer[f"ema.{i}"] for i in range(len([k for k in trainer if k.startswith("ema.")]))]
    assert ema and not all(torch.equal(e, a) for e, a in zip(ema, adapter.values()))  # the EMA lags the weights
    exported = load_file(str(full / "final" / "pytorch_lora_weights.safetensors"))
    assert sorted(t.sum().item() for t in exported.values()) == pytest.approx(sorted(e.sum().item() for e in ema), rel=1e-6)
