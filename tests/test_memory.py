"""``genrl train --dry-run`` and ``genrl.memory``: exact parameter counts from configs alone
(meta device), the estimate's arithmetic, and nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from genrl import cli
from genrl.config import config_from_dict
from genrl.memory import estimate_image_memory


def _cfg(**grpo: object) -> object:
    return config_from_dict({"env": "t2i", "algo": "flow-grpo", "model": "digits", "grpo": {"lora_rank": 4, **grpo}, "run": {"progress": False}})


def test_parameter_counts_are_those_of_the_loaded_model() -> None:
    from genrl.image_trainer import build_image

    cfg = _cfg()
    est = estimate_image_memory(cfg)
    algo = build_image(cfg)
    pipe_counts = {"transformer": sum(p.numel() for n, p in algo.policy.transformer.named_parameters() if "lora_" not in n)}
    assert est["params"]["transformer"] == pipe_counts["transformer"]
    assert est["trainable_params"] == sum(p.numel() for p in algo.params)  # the LoRA genrl actually trains
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert est["params"][name] == sum(p.numel() for p in getattr(algo.env.pipe, name).parameters()), name
    b = est["bytes"]
    assert b["total"] == b["weights"] + b["trainable_state"] + b["activations"] + b["rollout"]
    assert b["weights"] == 4 * sum(est["params"].values()) and b["trainable_state"] == 16 * est["trainable_params"]


def test_the_estimate_follows_the_settings() -> None:
    base = estimate_image_memory(_cfg())
    assert base["micro_batch_rows"] == 4 * 8  # prompts_per_iter x group_size, one minibatch, CFG 1
    two = estimate_image_memory(_cfg(), world_size=2)
    assert two["micro_batch_rows"] == 16 and two["bytes"]["activations"] * 2 == base["bytes"]["activations"]
    ckpt = estimate_image_memory(_cfg(gradient_checkpointing=True))
    assert ckpt["bytes"]["activations"] < base["bytes"]["activations"]
    half = estimate_image_memory(_cfg(autocast="bfloat16"))
    assert half["bytes"]["activations"] * 2 == base["bytes"]["activations"]
    cfg_guided = estimate_image_memory(_cfg(guidance_scale=4.5))
    assert cfg_guided["micro_batch_rows"] == 64  # conditional and unconditional rows


def test_fsdp_holds_a_shard_of_the_transformer_and_its_state_plus_the_gathered_units() -> None:
    full = estimate_image_memory(_cfg(finetune="full"), world_size=4)
    sharded = estimate_image_memory(_cfg(finetune="full", fsdp=True), world_size=4)
    n, wb = sharded["params"]["transformer"], 4
    assert sharded["bytes"]["trainable_state"] * 4 == full["bytes"]["trainable_state"]  # gradients + AdamW moments: 1/4 each
    saved = full["bytes"]["weights"] - sharded["bytes"]["weights"]
    assert 0 < saved < n * wb * 3 // 4  # 3/4 of the transformer, less the units gathered for the forward
    from diffusers import SD3Transformer2DModel

    from genrl_envs.t2i import DIGITS_MODEL_DIR

    tr = SD3Transformer2DModel.from_pretrained(DIGITS_MODEL_DIR / "transformer")
    block = sum(p.numel() for p in tr.transformer_blocks[0].parameters())
    root = n - sum(p.numel() for b in tr.transformer_blocks for p in b.parameters())
    assert saved == n * wb - (n * wb // 4 + (root + 2 * block) * wb)


def test_a_folder_with_configs_and_no_weights_is_enough(tmp_path: Path) -> None:
    from genrl_envs.t2i import DIGITS_MODEL_DIR

    folder = tmp_path / "arch"
    shutil.copytree(DIGITS_MODEL_DIR, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(folder.rglob("*.safetensors"))
    cfg = config_from_dict({"env": "t2i", "algo": "g2rpo", "model": str(folder), "grpo": {"lora_rank": 4}, "run": {"progress": False}})
    assert estimate_image_memory(cfg)["params"] == estimate_image_memory(_cfg())["params"]


def test_dry_run_prints_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--env", "t2i", "--dry-run", "--set", "grpo.gradient_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak memory per device" in out and "transformer 0.6M" in out
    assert cli.main(["train", "--env", "Pendulum-v1", "--algo", "sac", "--dry-run", "--set", "algo_config.buffer_size=100000"]) == 0
    out = capsys.readouterr().out
    assert "replay buffer: 100,000 rows x 1 envs" in out and "critic" in out
    assert list(tmp_path.iterdir()) == []
