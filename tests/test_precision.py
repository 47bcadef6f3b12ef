"""Mixed precision for text-to-image GRPO (``grpo.autocast``): the transformer's forward runs
under torch.autocast, the trained LoRA stays float32, and the on-policy log-prob drift between
sampling and training is logged (``train/onpolicy_log_ratio_max``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from genrl.config import config_from_dict
from genrl.errors import ConfigError
from genrl_policies.t2i import Conditioning


def _algo(algo: str = "flow-grpo", **grpo: Any) -> Any:
    """A tiny run on the digits model (2 prompts x 4 images, 3 steps, LoRA rank 2) with ``grpo`` on top."""
    from genrl.image_trainer import build_image

    return build_image(config_from_dict({
        "env": "t2i", "algo": algo, "model": "digits", "reward": "digit",
        "grpo": {"n_steps": 3, "group_size": 4, "prompts_per_iter": 2, "lora_rank": 2, **grpo},
        "run": {"total_steps": 16, "seed": 1, "progress": False},
    }))  # fmt: skip


def _update_grads(algo: Any) -> list[torch.Tensor]:
    """The gradients of every optimiser step of one collected batch's update (steps skipped)."""
    from genrl.algos.grpo import _Timer

    batch = algo.collect(_Timer())
    grads: list[torch.Tensor] = []
    algo.optimizer.step = lambda *a, **k: grads.extend(p.grad.clone() for p in algo.params)
    algo.update(batch)
    return grads


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_changes_the_forward_and_keeps_float32_outputs_and_weights(dtype: str) -> None:
    algo = _algo(autocast=dtype)
    policy = algo.policy
    assert policy.autocast is getattr(torch, dtype) and all(p.dtype == torch.float32 for p in algo.params)
    x = algo.env.initial_noise(4, torch.Generator().manual_seed(0))
    cond = Conditioning(*algo.env.encode(["a handwritten 3"] * 4))
    sigma = algo.sigmas[1].expand(4)
    mixed = policy.velocity(x, sigma, cond)
    policy.autocast = None
    full = policy.velocity(x, sigma, cond)
    assert mixed.dtype == torch.float32 and not torch.equal(mixed, full)
    assert torch.allclose(mixed, full, atol=0.1)  # a low-precision forward, not another function


@pytest.mark.parametrize("algo", ["flow-grpo", "g2rpo"])
@pytest.mark.parametrize("autocast", ["off", "bfloat16", "float16"])
def test_onpolicy_log_ratio_drift_is_logged_and_zero_on_cpu(algo: str, autocast: str) -> None:
    metrics = _algo(algo, autocast=autocast, **({"updates_per_epoch": 2} if algo == "flow-grpo" else {})).iterate()
    # the same dtype, weights and batch-independent CPU kernels in sampling and training: ratio exactly 1
    assert metrics["train/onpolicy_log_ratio_max"] == 0.0


def test_invalid_autocast_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="invalid grpo.autocast = 'fp8'; valid: off, bfloat16, float16"):
        config_from_dict({"env": "t2i", "algo": "flow-grpo", "grpo": {"autocast": "fp8"}})


def test_gradient_checkpointing_leaves_the_gradients_unchanged() -> None:
    grads = []
    for ckpt in (False, True):
        algo = _algo(gradient_checkpointing=ckpt)
        assert algo.policy.transformer.gradient_checkpointing is ckpt
        x = algo.env.initial_noise(4, torch.Generator().manual_seed(0))
        cond = Conditioning(*algo.env.encode(["a handwritten 7"] * 4))
        algo.policy.train()
        algo.policy.velocity(x, algo.sigmas[1].expand(4), cond).square().mean().backward()
        grads.append([p.grad.clone() for p in algo.params])
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # a deterministic recompute: bit for bit


def test_micro_batches_accumulate_the_same_gradient() -> None:
    whole, pieces = _update_grads(_algo(micro_batch=None)), _update_grads(_algo(micro_batch=3))  # 8 rows as 3 + 3 + 2
    assert len(whole) == len(pieces)
    for a, b in zip(whole, pieces):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)  # float summation order
    with pytest.raises(ConfigError, match="invalid grpo.micro_batch = 0"):
        config_from_dict({"env": "t2i", "algo": "flow-grpo", "grpo": {"micro_batch": 0}})


def test_activation_offload_is_accepted_and_a_no_op_on_cpu() -> None:
    off, on = _update_grads(_algo(activation_offload=False)), _update_grads(_algo(activation_offload=True))
    assert len(off) == len(on) > 0 and all(torch.equal(a, b) for a, b in zip(off, on))
