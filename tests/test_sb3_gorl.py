"""genrl.sb3: GoRL's latent MDP wrapper and decoder-refinement callback around SB3 PPO / SAC.

Env checkers, the identity decoder's equivalence with tanh actions, the refinement buffer's
pre-tanh pairs, refinement exactly at the stage boundary with the agent reset there (PPO), and a
tiny SAC run end to end. Tiny nets, InvertedPendulum-v5, a few hundred steps.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")

from stable_baselines3 import PPO, SAC  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback, CallbackList  # noqa: E402
from stable_baselines3.common.env_checker import check_env as sb3_check_env  # noqa: E402

from genrl.sb3 import (  # noqa: E402
    GoRLDecoderCallback,
    GoRLLatentWrapper,
    GoRLSB3Config,
    RefinementBuffer,
)
from genrl_policies.gorl import GoRLConfig, GoRLPolicy  # noqa: E402

ENV = "InvertedPendulum-v5"  # obs 4, action 1 in [-3, 3]


def tiny_policy(obs_dim: int = 4, act_dim: int = 1) -> GoRLPolicy:
    cfg = GoRLConfig(encoder_hidden=(8,), decoder_hidden=(16, 16), decoder_embed_dim=8, decoder_steps=4, decoder_pairs=2)
    return GoRLPolicy(obs_dim, act_dim, cfg)


def wrapped(policy: GoRLPolicy, **kw) -> GoRLLatentWrapper:
    return GoRLLatentWrapper(gym.make(ENV), policy, **kw)


def decoder_state(policy: GoRLPolicy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.decoder.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wrapper_passes_gymnasium_and_sb3_env_checkers() -> None:
    from gymnasium.utils.env_checker import check_env

    env = wrapped(tiny_policy())
    assert env.action_space == gym.spaces.Box(-3.0, 3.0, (1,), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "wrapped env" / "unbounded obs" notes are not failures
        check_env(env, skip_render_check=True)
        sb3_check_env(wrapped(tiny_policy(), latent_bound=1.0))
        sb3_check_env(env)  # warns only that [-3, 3] is not the recommended [-1, 1]


def test_identity_decoder_equals_tanh_of_latent_bitwise() -> None:
    policy = tiny_policy()
    assert all(float(p.abs().max()) == 0.0 for p in policy.decoder_parameters())  # stage-0 identity
    env, ref = wrapped(policy), gym.make(ENV)
    obs, _ = env.reset(seed=7)
    obs_ref, _ = ref.reset(seed=7)
    assert np.array_equal(obs, obs_ref)
    rng = np.random.default_rng(0)
    for _ in range(80):
        eps = rng.normal(0, 1, 1).astype(np.float32)
        obs, r, term, trunc, info = env.step(eps)
        action = torch.tanh(torch.from_numpy(eps)).numpy()
        obs_ref, r_ref, term_ref, trunc_ref, _ = ref.step(action)
        assert np.array_equal(obs, obs_ref) and r == r_ref and (term, trunc) == (term_ref, trunc_ref)
        assert np.array_equal(info["gorl_pre_action"], eps)  # g(s, eps) = eps exactly
        assert np.array_equal(info["gorl_action"], action)
        np.testing.assert_allclose(info["gorl_action"], np.tanh(eps), rtol=1e-6)
        if term or trunc:
            obs, _ = env.reset(seed=8)
            ref.reset(seed=8)


def test_refinement_buffer_stores_pre_tanh_of_executed_action() -> None:
    policy = tiny_policy()
    policy.reset_decoder(3)  # a non-identity decoder
    with torch.no_grad():
        for p in policy.decoder_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    env = wrapped(policy, buffer_size=25)
    obs, _ = env.reset(seed=0)
    seen_obs, executed = [], []
    for _ in range(40):
        seen_obs.append(np.asarray(obs, np.float32))
        obs, _, term, trunc, info = env.step(env.action_space.sample())
        executed.append(info["gorl_action"])
        assert not np.array_equal(info["gorl_pre_action"], info["gorl_action"])
        if term or trunc:
            obs, _ = env.reset()
    b_obs, b_pre = env.buffer.arrays()
    assert len(env.buffer) == 25 and env.buffer.total_added == 40  # bounded: newest 25 kept, oldest first
    assert np.array_equal(b_obs, np.stack(seen_obs[-25:]))
    assert np.array_equal(torch.tanh(torch.from_numpy(b_pre)).numpy(), np.stack(executed[-25:]))
    env.buffer.clear()
    assert len(env.buffer) == 0
    assert len(wrapped(policy, record=False).buffer) == 0


def test_ring_buffer_order() -> None:
    buf = RefinementBuffer(3, 1, 1)
    for i in range(5):
        buf.add(np.array([i]), np.array([-i]))
    obs, pre = buf.arrays()
    assert obs[:, 0].tolist() == [2, 3, 4] and pre[:, 0].tolist() == [-2, -3, -4]
    with pytest.raises(ValueError):
        RefinementBuffer(0, 1, 1)


class Recorder(BaseCallback):
    """After the GoRL callback: notes decoder changes, policy and optimiser state at every hook."""

    def __init__(self, gorl: GoRLDecoderCallback) -> None:
        super().__init__()
        self.gorl = gorl
        self.changes: list[tuple[int, str]] = []  # (num_timesteps, hook) where the decoder changed
        self.reset_checks: list[dict[str, bool]] = []

    def _on_training_start(self) -> None:
        self.last = decoder_state(self.gorl.gorl_policy)
        self.init = {k: v.clone() for k, v in self.model.policy.state_dict().items()}

    def _check(self, hook: str) -> None:
        now = decoder_state(self.gorl.gorl_policy)
        if not same(now, self.last):
            self.changes.append((self.num_timesteps, hook))
            policy = self.model.policy
            state = policy.state_dict()
            actor = [k for k in state if not k.startswith(("mlp_extractor.value_net", "value_net"))]
            critic = [k for k in state if k.startswith(("mlp_extractor.value_net", "value_net"))]
            opt_state = policy.optimizer.state
            named = dict(policy.named_parameters())
            self.reset_checks.append({
                "actor_reset": all(torch.equal(state[k], self.init[k]) for k in actor),
                "critic_kept": any(not torch.equal(state[k], self.init[k]) for k in critic),
                "actor_adam_cleared": all(named[k] not in opt_state for k in actor if k in named),
                "critic_adam_kept": all(named[k] in opt_state for k in critic if k in named),
                "buffer_cleared": len(self.gorl.wrappers[0].buffer) == 0,
            })  # fmt: skip
        self.last = now

    def _on_rollout_start(self) -> None:
        self._check("rollout_start")

    def _on_step(self) -> bool:
        self._check("step")
        return True

    def _on_rollout_end(self) -> None:
        self._check("rollout_end")


def test_ppo_refines_exactly_at_the_boundary_and_resets_the_agent() -> None:
    policy = tiny_policy()
    env = wrapped(policy, buffer_size=1000)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, seed=0, device="cpu",
                policy_kwargs={"net_arch": [16]})  # fmt: skip
    gorl = GoRLDecoderCallback(policy, GoRLSB3Config(stage_fractions=(0.5, 0.5), decoder_epochs=3, decoder_batch_size=64))
    rec = Recorder(gorl)
    model.learn(total_timesteps=512, callback=CallbackList([gorl, rec]))
    assert gorl.boundaries == [256]
    assert rec.changes == [(256, "rollout_start")]  # once, at the boundary, before the next collection
    assert rec.reset_checks == [{
        "actor_reset": True, "critic_kept": True, "actor_adam_cleared": True, "critic_adam_kept": True,
        "buffer_cleared": True,
    }]  # fmt: skip
    assert [h["num_timesteps"] for h in gorl.history] == [256.0] and gorl.stage == 1
    assert gorl.history[0]["n_pairs"] == 256.0  # the whole first stage, nothing else
    assert any(float(p.abs().max()) > 0 for p in policy.decoder_parameters())  # no longer the identity
    assert all(not p.requires_grad for p in policy.decoder_parameters())
    assert len(env.buffer) == 256  # the second stage's pairs


def test_sac_runs_end_to_end_through_the_wrapper() -> None:
    policy = tiny_policy()
    env = wrapped(policy, buffer_size=500)
    model = SAC("MlpPolicy", env, learning_starts=50, batch_size=32, seed=0, device="cpu",
                policy_kwargs={"net_arch": [16]})  # fmt: skip
    gorl = GoRLDecoderCallback(policy, GoRLSB3Config(stage_fractions=(0.5, 0.5), decoder_epochs=2, decoder_batch_size=64))
    init = {k: v.clone() for k, v in model.policy.state_dict().items()}
    init_ent = model.log_ent_coef.detach().clone()

    class AtRefine(BaseCallback):
        def _on_rollout_start(self) -> None:
            if gorl.history and not hasattr(self, "seen"):
                self.seen = {
                    "steps": self.num_timesteps,
                    "all_reset": all(torch.equal(v, init[k]) for k, v in model.policy.state_dict().items()),
                    "ent_reset": torch.equal(model.log_ent_coef.detach(), init_ent),
                    "replay_size": model.replay_buffer.size(),
                }

        def _on_step(self) -> bool:
            return True

    at = AtRefine()
    model.learn(total_timesteps=200, callback=CallbackList([gorl, at]))
    assert model.num_timesteps == 200
    assert [h["num_timesteps"] for h in gorl.history] == [100.0]  # train_freq=1: exactly at the boundary
    assert at.seen == {"steps": 100, "all_reset": True, "ent_reset": True, "replay_size": 0}
    assert len(env.buffer) == 100
    assert gorl.reset_keys() and all(k.startswith(("actor.", "critic.", "critic_target.")) for k in gorl.reset_keys())


def test_config_validation_and_boundaries() -> None:
    assert GoRLSB3Config().boundaries(180) == [60, 120, 150]
    assert GoRLSB3Config(stage_fractions=(0.5, 0.5)).boundaries(512) == [256]
    with pytest.raises(ValueError):
        GoRLSB3Config(stage_fractions=(0.5, 0.4))
    with pytest.raises(ValueError):
        GoRLSB3Config(stage_fractions=(1.0, 0.0))
    with pytest.raises(ValueError):
        GoRLSB3Config(stage_fractions=(0.5, 0.5)).boundaries(1)
    with pytest.raises(ValueError):
        wrapped(tiny_policy(obs_dim=5))
    with pytest.raises(TypeError):
        GoRLLatentWrapper(gym.make(ENV), object())  # type: ignore[arg-type]
