"""The gymnasium back end (``envs.make_env``): shapes, errors, truncation, observation
normalisation, action clipping and exact state save/restore."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from genrl_envs import EnvError, StepResult, make_env

SPECS = {"Hopper-v5": (11, 3), "Pendulum-v1": (3, 1)}


def fixed_actions(n_steps: int, n_envs: int, action_dim: int, seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(n_envs, action_dim, generator=g) for _ in range(n_steps)]


# ----------------------------------------------------------------------------------------------
# shapes and errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", list(SPECS))
def test_reset_and_step_shapes(env_id: str) -> None:
    obs_dim, act_dim = SPECS[env_id]
    env = make_env(env_id, 2)
    try:
        assert env.spec.n_envs == 2 and env.spec.obs_dim == obs_dim and env.spec.action_dim == act_dim
        obs = env.reset(seed=0)
        assert isinstance(obs, torch.Tensor) and obs.dtype == torch.float32 and obs.shape == (2, obs_dim)
        out = env.step(torch.zeros(2, act_dim))
        assert isinstance(out, StepResult)
        assert out.obs.shape == out.final_obs.shape == (2, obs_dim) and out.obs.dtype == torch.float32
        assert out.reward.shape == (2,) and out.reward.dtype == torch.float32
        for flag in (out.terminated, out.truncated):
            assert flag.shape == (2,) and flag.dtype == torch.bool
        assert torch.isfinite(out.obs).all() and torch.isfinite(out.reward).all()
    finally:
        env.close()


@pytest.mark.parametrize("env_id", list(SPECS))
def test_wrong_action_shape_names_expected_shape(env_id: str) -> None:
    _, act_dim = SPECS[env_id]
    env = make_env(env_id, 2)
    try:
        env.reset(seed=0)
        for bad in (torch.zeros(act_dim), torch.zeros(1, act_dim), torch.zeros(2, act_dim + 1)):
            with pytest.raises(ValueError, match=rf"expected \(2, {act_dim}\)"):
                env.step(bad)
    finally:
        env.close()


def test_unknown_id_suggests_close_match() -> None:
    with pytest.raises(EnvError, match=r"unknown env id 'Hoper-v5'.*Hopper-v5"):
        make_env("Hoper-v5", 1)


def test_discrete_action_env_is_refused() -> None:
    with pytest.raises(EnvError, match=r"CartPole-v1.*Discrete.*Box"):
        make_env("CartPole-v1", 1)


@pytest.mark.parametrize("n_envs", [0, -1])
def test_nonpositive_n_envs_is_refused(n_envs: int) -> None:
    with pytest.raises(EnvError, match="n_envs"):
        make_env("Pendulum-v1", n_envs)


# ----------------------------------------------------------------------------------------------
# truncation, raw returns
# ----------------------------------------------------------------------------------------------
def plain_pendulum(seed: int, actions: list[np.ndarray]) -> tuple[list[np.ndarray], list[float], list[bool]]:
    """Reference rollout with plain gymnasium: observations (reset first), rewards, truncations."""
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=seed)
    observations, rewards, truncs = [obs], [], []
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        assert not term
        observations.append(obs)
        rewards.append(float(r))
        truncs.append(trunc)
    env.close()
    return observations, rewards, truncs


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalised"])
def test_pendulum_truncation_and_raw_return(normalize: bool) -> None:
    seed, n = 7, 2
    actions = fixed_actions(200, n, 1, seed=1, scale=1.5)
    env = make_env("Pendulum-v1", n, normalize_obs=normalize, normalize_reward=normalize)
    assert env.spec.max_episode_steps == 200
    first = env.reset(seed=seed).clone()  # clone: see test_returned_observations_are_not_overwritten
    for t, a in enumerate(actions):
        out = env.step(a)
        if t < 199:
            assert not out.truncated.any() and not out.terminated.any() and not out.episode_returns
    env.close()
    assert out.truncated.tolist() == [True, True] and out.terminated.tolist() == [False, False]
    assert len(out.episode_returns) == 2 and out.episode_lengths == [200, 200]
    assert not torch.equal(out.final_obs, out.obs)
    for i in range(n):
        assert not torch.equal(out.final_obs[i], out.obs[i])  # final obs vs. the next episode's reset obs
        ref_obs, ref_rewards, ref_trunc = plain_pendulum(seed + i, [a[i].numpy() for a in actions])
        assert ref_trunc[-1] and not any(ref_trunc[:-1])
        # the raw return, whatever the normalisation
        assert out.episode_returns[i] == pytest.approx(sum(ref_rewards), rel=1e-9, abs=1e-9)
        if not normalize:
            assert torch.equal(first[i], torch.from_numpy(ref_obs[0]))
            assert torch.equal(out.final_obs[i], torch.from_numpy(np.asarray(ref_obs[-1], dtype=np.float32)))
            assert out.reward[i].item() == pytest.approx(ref_rewards[-1], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# observation normalisation
# ----------------------------------------------------------------------------------------------
def test_obs_normalisation_statistics_and_final_obs() -> None:
    seed, n, steps = 3, 2, 260
    actions = fixed_actions(steps, n, 1, seed=2, scale=1.5)
    norm = make_env("Pendulum-v1", n, normalize_obs=True, normalize_reward=False)
    raw = make_env("Pendulum-v1", n, normalize_obs=False, normalize_reward=False)
    seen = [raw.reset(seed=seed).numpy().astype(np.float64)]
    norm.reset(seed=seed)
    checked_final = 0
    for a in actions:
        before = norm.obs_normalizer_state()
        o_norm, o_raw = norm.step(a), raw.step(a)
        seen.append(o_raw.obs.numpy().astype(np.float64))  # includes the reset obs after autoreset
        done = o_raw.truncated | o_raw.terminated
        assert torch.equal(done, o_norm.truncated | o_norm.terminated)
        for i in torch.nonzero(done).flatten().tolist():
            # final_obs of an ended episode: the raw final observation normalised with the statistics
            # that normalised the previous observations (the final obs is not itself in them)
            expect = np.clip((o_raw.final_obs[i].numpy() - before["mean"]) / np.sqrt(before["var"] + 1e-8), -10, 10)
            np.testing.assert_allclose(o_norm.final_obs[i].numpy(), expect, rtol=1e-5, atol=1e-5)
            assert not np.allclose(o_norm.final_obs[i].numpy(), o_raw.final_obs[i].numpy(), atol=1e-2)
            checked_final += 1
        state = norm.obs_normalizer_state()
        expect_obs = np.clip((o_raw.obs.numpy() - state["mean"]) / np.sqrt(state["var"] + 1e-8), -10, 10)
        np.testing.assert_allclose(o_norm.obs.numpy(), expect_obs, rtol=1e-5, atol=1e-5)
    norm.close()
    raw.close()
    assert checked_final == 2  # both sub-envs truncated at step 200
    data = np.concatenate(seen)
    assert data.shape == ((steps + 1) * n, 3)
    state = norm.obs_normalizer_state()
    assert float(state["count"]) == pytest.approx(data.shape[0], abs=1e-3)
    np.testing.assert_allclose(state["mean"], data.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state["var"], data.var(0), rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# action clipping
# ----------------------------------------------------------------------------------------------
def test_actions_are_clipped_to_the_box() -> None:
    # Hopper's reward includes a control cost computed on the action it receives, so an
    # unclipped 1e6 action would show up as a huge negative reward
    def rollout(actions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        env = make_env("Hopper-v5", 1, normalize_obs=False, normalize_reward=False)
        env.reset(seed=0)
        outs = [env.step(a) for a in actions]
        env.close()
        # clone each obs on receipt, see test_returned_observations_are_not_overwritten
        return torch.stack([o.obs.clone() for o in outs]), torch.stack([o.reward.clone() for o in outs])

    sign = torch.tensor([[1.0, -1.0, 1.0]])
    huge_obs, huge_rew = rollout([1e6 * sign] * 5)
    tiny_obs, _ = rollout([0.01 * sign] * 5)
    assert not torch.equal(huge_obs, tiny_obs)  # the action matters at all
    bound_obs, bound_rew = rollout([1.0 * sign] * 5)
    assert torch.equal(huge_obs, bound_obs)
    assert torch.equal(huge_rew, bound_rew)
    assert huge_rew.abs().max() < 10


# ----------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# ----------------------------------------------------------------------------------------------
def _trace(env, actions: list[torch.Tensor]) -> list[tuple]:
    rows = []
    for a in actions:
        o = env.step(a)
        tensors = (o.obs, o.reward, o.terminated, o.truncated, o.final_obs)
        rows.append((*(x.clone() for x in tensors), tuple(o.episode_returns), tuple(o.episode_lengths)))
    return rows


def _assert_same_trace(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for t, (ra, rb) in enumerate(zip(a, b)):
        for x, y in zip(ra, rb):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f"step {t}"
            else:
                assert x == y, f"step {t}"


@pytest.mark.parametrize(
    ("env_id", "n_envs", "vectorization", "warmup", "k"),
    [
        ("Hopper-v5", 1, "sync", 15, 80),  # random actions: Hopper falls within k steps, so a reset (RNG) is replayed
        ("Pendulum-v1", 1, "sync", 190, 30),  # crosses the 200-step time limit
        ("Hopper-v5", 2, "async", 15, 80),
        ("Pendulum-v1", 2, "async", 190, 30),
    ],
    ids=["hopper-sync", "pendulum-sync", "hopper-async-2", "pendulum-async-2"],
)
def test_state_dict_roundtrip_replays_bitwise(env_id: str, n_envs: int, vectorization: str, warmup: int, k: int) -> None:
    act_dim = SPECS[env_id][1]
    kwargs = dict(vectorization=vectorization, normalize_obs=True, normalize_reward=True)
    warm = fixed_actions(warmup, n_envs, act_dim, seed=10)
    actions = fixed_actions(k, n_envs, act_dim, seed=11)

    env = make_env(env_id, n_envs, **kwargs)
    try:
        env.reset(seed=5)
        for a in warm:
            env.step(a)
        snapshot = env.state_dict()
        expected = _trace(env, actions)
    finally:
        env.close()
    ends = sum(bool((row[2] | row[3]).any()) for row in expected)
    assert ends >= 1, "the replay window should contain an episode end"

    fresh = make_env(env_id, n_envs, **kwargs)
    try:
        first = fresh.reset(seed=999).clone()  # a different start, overwritten by the snapshot
        fresh.load_state_dict(snapshot)
        got = _trace(fresh, actions)
    finally:
        fresh.close()
    assert not torch.equal(first, expected[0][0])
    _assert_same_trace(expected, got)


def test_load_state_dict_rejects_other_n_envs() -> None:
    env = make_env("Pendulum-v1", 2)
    env.reset(seed=0)
    state = env.state_dict()
    env.close()
    other = make_env("Pendulum-v1", 1)
    other.reset(seed=0)
    with pytest.raises(EnvError, match="2 sub-envs"):
        other.load_state_dict(state)
    other.close()


# ----------------------------------------------------------------------------------------------
# returned tensors are snapshots
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_returned_observations_are_not_overwritten(vectorization: str) -> None:
    env = make_env("Pendulum-v1", 2, vectorization=vectorization, normalize_obs=False, normalize_reward=False)
    try:
        first = env.reset(seed=0)
        first_copy = first.clone()
        out = env.step(torch.ones(2, 1))
        obs_copy = out.obs.clone()
        env.step(torch.ones(2, 1))
        env.step(-torch.ones(2, 1))
    finally:
        env.close()
    assert torch.equal(first, first_copy), "the reset observation changed after later steps"
    assert torch.equal(out.obs, obs_copy), "a step's observation changed after later steps"


def test_reward_normaliser_matches_gymnasium() -> None:
    """NormalizeRewardSameStep reproduces gymnasium's vector NormalizeReward under SAME_STEP."""
    import gymnasium as gym
    import numpy as np
    from gymnasium.vector import AutoresetMode, SyncVectorEnv
    from gymnasium.wrappers import vector as vw

    from genrl_envs.normalize import NormalizeRewardSameStep

    def mk() -> gym.Env:
        return gym.make("Pendulum-v1", max_episode_steps=60)  # several episode ends in the run

    ref = vw.NormalizeReward(SyncVectorEnv([mk] * 2, autoreset_mode=AutoresetMode.SAME_STEP), gamma=0.9)
    ours = NormalizeRewardSameStep(SyncVectorEnv([mk] * 2, autoreset_mode=AutoresetMode.SAME_STEP), gamma=0.9)
    ref.reset(seed=0)
    ours.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        action = rng.uniform(-2, 2, (2, 1)).astype(np.float32)
        r_ref = ref.step(action)[1]
        r_ours = ours.step(action)[1]
        # gymnasium accumulates the return in float32, genrl in float64
        np.testing.assert_allclose(r_ours, r_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.return_rms.var, ref.return_rms.var, rtol=1e-5)
    ref.close()
    ours.close()
