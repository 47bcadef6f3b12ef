"""SAC (``--algo sac``): its arithmetic, the squashed Gaussian, the replay buffer, bootstrapping at
episode ends, config errors, chunked checkpoints, bitwise resume and (slow) learning Pendulum."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from compare import assert_same_nested, assert_same_tensors
from torch import nn
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

import genrl.checkpoint as checkpoint
from genrl import cli
from genrl.agent import Agent
from genrl.algos.sac import SAC, ReplayBuffer, SACConfig, soft_q_target, soft_update, temperature_loss
from genrl.checkpoint import checkpoint_steps, load_checkpoint, read_tensors_chunked, write_tensors
from genrl.config import config_from_dict
from genrl.errors import ConfigError
from genrl.logger import read_csv
from genrl.trainer import train
from genrl_envs.base import EnvSpec, StepResult
from genrl_policies.base import load_pretrained
from genrl_policies.gaussian import GaussianConfig, GaussianPolicy, tanh_log_det_jacobian

GEN = torch.Generator


# -- arithmetic ------------------------------------------------------------------------------------
def test_soft_update_matches_hand_computed_values() -> None:
    source, target = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        source.weight.fill_(1.0), source.bias.fill_(-2.0), target.weight.zero_(), target.bias.fill_(4.0)
    soft_update(target, source, 0.1)
    torch.testing.assert_close(target.weight, torch.full((1, 2), 0.1))  # 0 + 0.1 (1 - 0)
    torch.testing.assert_close(target.bias, torch.tensor([3.4]))  # 4 + 0.1 (-2 - 4)
    soft_update(target, source, 0.1)
    torch.testing.assert_close(target.weight, torch.full((1, 2), 0.19))  # 0.1 + 0.1 (1 - 0.1)
    torch.testing.assert_close(source.weight, torch.ones(1, 2))  # the source is untouched


def test_temperature_loss_matches_hand_computed_value_and_gradient() -> None:
    log_alpha = torch.tensor([math.log(0.5)], requires_grad=True)
    log_prob = torch.tensor([-1.0, -3.0], requires_grad=True)
    loss = temperature_loss(log_alpha, log_prob, target_entropy=-2.0)
    # log pi + H = [-3, -5], mean -4: loss = -log(0.5) * (-4) = 4 log 0.5; d loss / d log alpha = 4
    torch.testing.assert_close(loss, torch.tensor(4 * math.log(0.5)))
    loss.backward()
    torch.testing.assert_close(log_alpha.grad, torch.tensor([4.0]))
    assert log_prob.grad is None  # the policy's log-prob is a constant here


def test_soft_q_target_bootstraps_only_through_the_discount() -> None:
    reward = torch.tensor([1.0, 1.0, -2.0])
    discount = torch.tensor([0.99, 0.0, 0.5])  # truncated / terminated / a 1-step gamma of 0.5
    q1, q2 = torch.tensor([2.0, 5.0, 1.0]), torch.tensor([3.0, 4.0, 3.0])
    log_prob = torch.tensor([-1.0, 2.0, 0.0])
    y = soft_q_target(reward, discount, q1, q2, torch.tensor(0.5), log_prob)
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.99 * (2.0 + 0.5), 1.0, -2.0 + 0.5 * 1.0]))


# -- the squashed Gaussian ---------------------------------------------------------------------------
def squashed_policy(dtype: torch.dtype = torch.float64) -> GaussianPolicy:
    torch.manual_seed(3)
    policy = GaussianPolicy(4, 3, GaussianConfig(hidden_sizes=(16,), state_dependent_std=True, squash="tanh")).to(dtype)
    policy.set_action_box(np.array([-2.0, -1.0, 0.0]), np.array([2.0, 3.0, 1.0]))
    with torch.no_grad():  # means of order 1, stds around 0.5: samples spread over the box
        policy.net[-1].weight.normal_(0.0, 0.5)
        policy.net[-1].bias[3:] = -0.7
    return policy


def test_squashed_log_prob_matches_torch_distributions() -> None:
    policy = squashed_policy()
    obs = torch.randn(64, 4, generator=GEN().manual_seed(1), dtype=torch.float64)
    action, log_prob = policy.rsample(obs, generator=GEN().manual_seed(2))
    mean, log_std = policy.distribution(obs)
    scale, offset = policy.action_scale, policy.action_offset
    ref = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform(), AffineTransform(offset, scale)])
    # genrl's log-prob is that of tanh(u) in [-1, 1]^A: the box's constant log-scale is left out
    expected = ref.log_prob(action).sum(-1) + scale.log().sum()
    assert (action >= -2.0).all() and (action <= 3.0).all() and not torch.equal(action[:, 0], action[:, 1])
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(policy.log_prob(obs, action), expected, rtol=0, atol=1e-5)  # through the inverse squash
    out, record = policy.act(obs, generator=GEN().manual_seed(2))  # the same sample, as the env gets it
    torch.testing.assert_close(out, action.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(record.log_prob, log_prob.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(policy.log_ratio(obs, record), torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-9)


def test_tanh_jacobian_is_stable_where_the_naive_form_is_not() -> None:
    u = torch.tensor([-30.0, -3.0, 0.0, 0.5, 3.0, 30.0])
    got = tanh_log_det_jacobian(u)
    naive = torch.log(1 - torch.tanh(u.double()) ** 2).float()
    torch.testing.assert_close(got[1:5], naive[1:5], rtol=0, atol=1e-5)
    assert torch.isfinite(got).all() and not torch.isfinite(torch.log(1 - torch.tanh(u) ** 2)).all()
    torch.testing.assert_close(got[[0, 5]], torch.full((2,), 2 * (math.log(2) - 30.0)))


def test_rsample_is_differentiable_and_the_squash_is_saved_with_the_policy(tmp_path: Path) -> None:
    policy = squashed_policy(torch.float32)
    obs = torch.randn(8, 4)
    action, log_prob = policy.rsample(obs, generator=GEN().manual_seed(0))
    (action.sum() + log_prob.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    policy.save_pretrained(tmp_path / "p")
    loaded = load_pretrained(tmp_path / "p")
    assert torch.equal(loaded.action_scale, torch.tensor([2.0, 2.0, 0.5])) and torch.equal(loaded.action_offset, torch.tensor([0.0, 1.0, 0.5]))
    a, _ = policy.act(obs, deterministic=True)
    b, _ = loaded.act(obs, deterministic=True)
    assert torch.equal(a, b)


def test_default_gaussian_keeps_its_state_layout() -> None:
    policy = GaussianPolicy(4, 3)
    assert set(policy.state_dict()) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias", "log_std"}
    with pytest.raises(ValueError, match="squash = 'tanh'"):
        policy.set_action_box([-1.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match="squash must be one of"):
        GaussianConfig(squash="sigmoid")


# -- replay buffer ----------------------------------------------------------------------------------
def fill(buffer: ReplayBuffer, steps: int, start: int = 0) -> None:
    """Step t stores obs (t, env), reward t and next obs (t + 0.5, env) in every env."""
    n = buffer.n_envs
    for t in range(start, start + steps):
        ids = torch.arange(n, dtype=torch.float32)
        obs = torch.stack([torch.full((n,), float(t)), ids], 1)
        buffer.add(obs, torch.zeros(n, 1), torch.full((n,), float(t)), obs + torch.tensor([0.5, 0.0]), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))


def test_buffer_wraps_around() -> None:
    buffer = ReplayBuffer(capacity=11, n_envs=2, obs_dim=2, action_dim=1, device=torch.device("cpu"))
    assert buffer.rows == 5 and len(buffer) == 0
    fill(buffer, 3)
    assert len(buffer) == 6 and buffer.pos == 3 and not buffer.full
    assert buffer.state_dict()["obs"].shape == (3, 2, 2)  # only the written rows are saved
    fill(buffer, 4, start=3)  # 7 steps into 5 rows: steps 5 and 6 overwrite rows 0 and 1
    assert len(buffer) == 10 and buffer.pos == 2 and buffer.full
    assert buffer.obs[:, 0, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert buffer.reward[:, 1].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    assert buffer.state_dict()["obs"].shape == (5, 2, 2)


def test_buffer_samples_every_transition_uniformly() -> None:
    buffer = ReplayBuffer(capacity=20, n_envs=2, obs_dim=2, action_dim=1, device=torch.device("cpu"))
    fill(buffer, 13)  # wrapped: 20 transitions of steps 3..12
    gen = GEN().manual_seed(0)
    counts = torch.zeros(13, 2)
    for _ in range(200):
        b = buffer.sample(256, 0.99, 1, gen)
        counts.index_put_((b.obs[:, 0].long(), b.obs[:, 1].long()), torch.ones(256), accumulate=True)
        assert torch.equal(b.next_obs, b.obs + torch.tensor([0.5, 0.0])) and torch.equal(b.reward, b.obs[:, 0])
    assert counts[:3].sum() == 0  # overwritten steps are gone
    expected = 200 * 256 / 20
    chi2 = float(((counts[3:] - expected) ** 2 / expected).sum())
    assert chi2 < 43.8, chi2  # 99.9% quantile of chi-square with 19 degrees of freedom


def test_n_step_returns_stop_at_episode_ends_and_the_newest_step() -> None:
    buffer = ReplayBuffer(capacity=10, n_envs=1, obs_dim=1, action_dim=1, device=torch.device("cpu"))
    ends = {2: "terminated", 4: "truncated"}  # episodes: steps 0-2 (terminated), 3-4 (truncated), 5-6
    for t in range(7):
        term, trunc = torch.tensor([ends.get(t) == "terminated"]), torch.tensor([ends.get(t) == "truncated"])
        buffer.add(torch.tensor([[float(t)]]), torch.zeros(1, 1), torch.tensor([2.0**t]), torch.tensor([[t + 0.5]]), term, trunc)
    b = buffer.sample(512, 0.5, 3, GEN().manual_seed(0))
    got = {int(o): (float(r), float(n), float(d)) for o, r, n, d in zip(b.obs[:, 0], b.reward, b.next_obs[:, 0], b.discount)}
    assert got == {
        0: (1 + 0.5 * 2 + 0.25 * 4, 2.5, 0.0),  # three steps, the last one terminates
        1: (2 + 0.5 * 4, 2.5, 0.0),
        2: (4, 2.5, 0.0),
        3: (8 + 0.5 * 16, 4.5, 0.25),  # truncated after two steps: bootstrap with gamma^2
        4: (16, 4.5, 0.5),
        5: (32 + 0.5 * 64, 6.5, 0.25),  # the newest step ends the window
        6: (64, 6.5, 0.5),
    }


# -- bootstrapping at episode ends (scripted env) --------------------------------------------------
class ScriptedEnv:
    """Two envs, obs (t, env): env 0 terminates at t = 3, env 1 is truncated at t = 2; the true last
    observation is (100 + t, env), the next episode starts at (0, env)."""

    def __init__(self) -> None:
        low, high = np.full(1, -1.0, np.float32), np.full(1, 1.0, np.float32)
        self.spec = EnvSpec("scripted", 2, 2, 1, low, high, max_episode_steps=None, backend="test")
        self.t = torch.zeros(2)

    def _obs(self) -> torch.Tensor:
        return torch.stack([self.t, torch.arange(2.0)], 1)

    def reset(self, seed: int | None = None) -> torch.Tensor:
        self.t = torch.zeros(2)
        return self._obs()

    def step(self, action: torch.Tensor) -> StepResult:
        self.t = self.t + 1
        terminated = torch.tensor([bool(self.t[0] == 3), False])
        truncated = torch.tensor([False, bool(self.t[1] == 2)])
        final = self._obs() + 100 * torch.stack([terminated | truncated, torch.zeros(2, dtype=torch.bool)], 1)
        self.t = torch.where(terminated | truncated, 0.0, self.t)
        return StepResult(self._obs(), torch.ones(2), terminated, truncated, final)

    def state_dict(self) -> dict[str, Any]:
        return {"arrays": {}, "meta": {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def test_truncation_bootstraps_from_the_final_obs_and_termination_does_not() -> None:
    env = ScriptedEnv()
    policy = GaussianPolicy(2, 1, GaussianConfig(hidden_sizes=(8,)))
    sac = SAC(policy, env, SACConfig(steps_per_iter=8, learning_starts=100, batch_size=4, buffer_size=16), total_steps=8, seed=0)  # type: ignore[arg-type]
    sac.iterate()  # 4 steps of 2 envs, random actions
    buf = sac.buffer
    assert len(buf) == 8 and sac.global_step == 8 and sac.n_updates == 0
    # env 0: (0 -> 1), (1 -> 2), (2 -> final 103, terminated), (0 -> 1)
    assert buf.obs[:4, 0, 0].tolist() == [0, 1, 2, 0] and buf.next_obs[:4, 0, 0].tolist() == [1, 2, 103, 1]
    assert buf.terminated[:4, 0].tolist() == [False, False, True, False]
    # env 1: (0 -> 1), (1 -> final 102, truncated), (0 -> 1), (1 -> final 102, truncated)
    assert buf.next_obs[:4, 1, 0].tolist() == [1, 102, 1, 102] and buf.truncated[:4, 1].tolist() == [False, True, False, True]
    assert not buf.terminated[:4, 1].any()
    b = buf.sample(256, 0.9, 1, GEN().manual_seed(0))
    ended_by_termination = b.next_obs[:, 0] == 103
    assert ended_by_termination.any() and (b.discount[ended_by_termination] == 0).all()
    assert (b.discount[~ended_by_termination] == torch.tensor(0.9)).all()  # truncation bootstraps from (102, 1)
    # the sampled actions were uniform in the box and stored as sent
    assert (buf.action[:4].abs() <= 1).all() and buf.action[:4].std() > 0.1
    # the policy SAC trains is the squashed one, acting in the box
    assert sac.policy.config.squash == "tanh" and sac.policy.config.state_dependent_std


# -- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("algo_config", "match"),
    [
        ({"buffer_size": 100, "batch_size": 256}, "buffer_size = 100 is smaller than algo_config.batch_size"),
        ({"tau": -0.1}, "tau"),
        ({"tau": 0.0}, "tau"),
        ({"gamma": 1.5}, "gamma"),
        ({"n_step": 0}, "n_step"),
        ({"utd_ratio": 0.0}, "utd_ratio"),
        ({"learning_starts": -1}, "learning_starts"),
        ({"alpha": "autox"}, "alpha"),
        ({"alpha": -0.2}, "alpha"),
        ({"alpha": "auto_0"}, "alpha"),
        ({"critic_activation": "sigmoid"}, "critic_activation"),
        ({"critic_dtype": "float16"}, "critic_dtype"),
        ({"q_lr": 0.0}, "q_lr"),
        ({"tua": 0.1}, "did you mean 'tau'"),
    ],
)
def test_bad_sac_configs_are_one_line_errors(algo_config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        config_from_dict({"algo": "sac", "env": {"env_id": "Pendulum-v1"}, "algo_config": algo_config})
    assert "\n" not in str(info.value)


def test_sac_temperature_spellings() -> None:
    assert SACConfig().temperature() == (True, 1.0)
    assert SACConfig(alpha="auto_0.1").temperature() == (True, 0.1)
    assert SACConfig(alpha=0.2).temperature() == (False, 0.2)  # type: ignore[arg-type]
    cfg = config_from_dict({"algo": "sac", "env": {"env_id": "Pendulum-v1"}, "algo_config": {"alpha": 0.05}})
    assert cfg.algo_config_object().temperature() == (False, 0.05)


@pytest.mark.parametrize(
    ("policy", "policy_config", "match"),
    [
        ("policyflow", {}, "--policy gaussian or pmoe"),
        ("pmoe", {"squash": "none"}, "squash = 'tanh'"),
        ("gaussian", {"state_dependent_std": False}, "state_dependent_std = true"),
        ("gaussian", {"squash": "none"}, "squash = 'tanh'"),
    ],
)
def test_sac_refuses_a_policy_it_cannot_train(policy: str, policy_config: dict[str, Any], match: str, tmp_path: Path) -> None:
    cfg = config_from_dict({"algo": "sac", "env": {"env_id": "Pendulum-v1"}, "policy": policy, "policy_config": policy_config,
                            "run": {"out": str(tmp_path / "r")}})  # fmt: skip
    with pytest.raises(ConfigError, match=match) as info:
        train(cfg)
    assert "\n" not in str(info.value) and not (tmp_path / "r").exists()


# -- chunked checkpoint files ---------------------------------------------------------------------------
def test_tensor_files_are_written_in_chunks_and_read_back(tmp_path: Path) -> None:
    tensors = {
        "small": torch.arange(4, dtype=torch.float32),  # 16 bytes
        "big": torch.randn(10, 3, generator=GEN().manual_seed(0)),  # 120 bytes: cut into pieces
        "flags": torch.tensor([True, False, True]),
        "view": torch.arange(40, dtype=torch.int64).view(10, 4)[:5],  # 160 bytes, a contiguous view
    }
    layout = write_tensors(tensors, tmp_path, "trainer", limit=64)
    assert layout is not None and layout["files"] > 1 and set(layout["split"]) == {"big", "view"}
    assert all((tmp_path / f"trainer{'' if i == 0 else f'-{i:03d}'}.safetensors").is_file() for i in range(layout["files"]))
    back = read_tensors_chunked(tmp_path, "trainer", layout)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert write_tensors(tensors, tmp_path / ".", "one", limit=10**6) is None  # all in one file, as before
    (tmp_path / "trainer-001.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="missing trainer-001.safetensors"):
        read_tensors_chunked(tmp_path, "trainer", layout)


# -- runs: exact resume, CLI, batched back end ------------------------------------------------------------
def tiny(out: Path, **over: Any) -> Any:
    data = {
        "algo": "sac", "env": {"env_id": "Pendulum-v1", "n_envs": 2}, "policy_config": {"hidden_sizes": [16, 16]},
        "algo_config": {"steps_per_iter": 200, "learning_starts": 300, "batch_size": 32, "buffer_size": 500,
                        "critic_hidden": [32, 32], "utd_ratio": 0.5, "n_step": 2},
        "run": {"total_steps": 1200, "seed": 3, "out": str(out), "save_every": 200, "keep_checkpoints": 0, "eval_episodes": 1, "progress": False},
    }  # fmt: skip
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value}
    return config_from_dict(data)


def test_resume_from_every_checkpoint_is_bitwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffer wraps (500 transitions, 1200 steps) and, with 4 KiB chunks, is written over many files."""
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4096)
    full = train(tiny(tmp_path / "full"))
    steps = checkpoint_steps(full)
    assert steps == [200, 400, 600, 800, 1000, 1200]
    last = full / "checkpoints" / "1200"
    assert (last / "trainer-001.safetensors").is_file()
    state = load_checkpoint(last)
    assert state["trainer"]["buffer.obs"].shape == (250, 2, 3) and state["state"]["algo_state"]["buffer_full"]
    assert read_csv(full / "progress.csv")["train/n_updates"][-1] == 100  # 200 steps x 0.5 gradient steps
    for step in steps[:-1]:
        run = tmp_path / f"from-{step}"
        shutil.copytree(full, run)
        for later in steps:
            if later > step:
                shutil.rmtree(run / "checkpoints" / str(later))
        junk = [np.empty(n) for n in (1, 3, 5, 7, 11, 13)]  # move numpy's next allocations
        train(resume=run)
        del junk
        got = run / "checkpoints" / "1200"
        names = sorted(str(f.relative_to(last)) for f in last.rglob("*.safetensors"))
        assert names == sorted(str(f.relative_to(got)) for f in got.rglob("*.safetensors"))
        for name in names:
            assert_same_tensors(last / name, got / name)
        opt_a = torch.load(last / "optimizer.pt", weights_only=True)
        opt_b = torch.load(got / "optimizer.pt", weights_only=True)
        assert_same_nested(opt_a, opt_b, f"optimizer (resumed from {step})")


def test_cli_trains_sac_with_defaults_and_exports_a_squashed_agent(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = cli.main(["train", "--algo", "sac", "--policy", "gaussian", "--env", "Pendulum-v1", "--steps", "400", "--out", str(out),
                     "--eval-episodes", "1", "--no-progress", "--set", "algo_config.learning_starts=200",
                     "--set", "algo_config.batch_size=16", "--set", "algo_config.steps_per_iter=200"])  # fmt: skip
    assert code == 0
    agent = Agent.load(out / "final")
    assert agent.policy.config.squash == "tanh" and torch.equal(agent.policy.action_scale, torch.tensor([2.0]))
    log = read_csv(out / "progress.csv")
    assert log["train/n_updates"][-1] == 200 and 0 < log["train/alpha"][-1] < 1


def test_sac_on_the_batched_torch_back_end(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "torch", env={"env_id": "genrl/PointMaze-v0", "n_envs": 8, "backend": "torch"},
               algo_config={"steps_per_iter": 80, "learning_starts": 200, "buffer_size": 400, "utd_ratio": 0.25},
               run={"total_steps": 400, "save_every": 0})  # fmt: skip
    run = train(cfg)
    state = load_checkpoint(run / "checkpoints" / "400")
    assert state["trainer"]["buffer.obs"].shape[:2] == (50, 8)  # 400 transitions: 8 per env step
    assert read_csv(run / "progress.csv")["train/n_updates"][-1] == 20  # 80 steps x 0.25


# -- learning --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sac_learns_pendulum(tmp_path: Path) -> None:
    cfg = config_from_dict({
        "algo": "sac", "env": {"env_id": "Pendulum-v1", "normalize_obs": False, "normalize_reward": False},
        "run": {"total_steps": 15_000, "seed": 1, "out": str(tmp_path / "run"), "eval_episodes": 10, "progress": False},
    })  # fmt: skip
    run = train(cfg)
    final = read_csv(run / "progress.csv")["eval/return_mean"][-1]
    assert final > -400, final


def test_bfloat16_critics_autocast_the_matmuls_and_keep_float32_weights_and_outputs() -> None:
    from genrl.algos.sac import TwinQ

    torch.manual_seed(0)
    full = TwinQ(5, 2, (64, 64), "relu")
    half = TwinQ(5, 2, (64, 64), "relu", "bfloat16")
    half.load_state_dict(full.state_dict())
    obs, action = torch.randn(32, 5), torch.rand(32, 2) * 2 - 1
    (a1, a2), (b1, b2) = full(obs, action), half(obs, action)
    assert b1.dtype == b2.dtype == torch.float32 and all(p.dtype == torch.float32 for p in half.parameters())
    assert not torch.equal(a1, b1)  # the matmuls did run in bfloat16
    assert torch.allclose(a1, b1, atol=2e-2, rtol=2e-2) and torch.allclose(a2, b2, atol=2e-2, rtol=2e-2)
    (b1.sum() + b2.sum()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in half.parameters())
