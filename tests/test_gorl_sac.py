"""GoRL over SAC (``--algo sac --policy gorl``, genrl.algos.gorl_sac): stage 0 is SAC on the latent
through the frozen decoder, the boundary refines the decoder and resets the agent, refinement data
come from the latest encoder, the CLI run exports an agent that evaluates, exact resume before and
after a boundary, the preset, and one-line config errors. Tiny nets, a toy linear env for the
algorithm-level tests, short Pendulum runs through the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from compare import assert_same_nested, assert_same_tensors

from genrl import cli
from genrl.agent import Agent
from genrl.algos import gorl_sac
from genrl.algos.gorl import GoRLTrainConfig
from genrl.algos.gorl_sac import GoRLSAC
from genrl.algos.sac import SAC, SACConfig
from genrl.checkpoint import checkpoint_steps, load_checkpoint
from genrl.config import config_from_dict
from genrl.errors import ConfigError
from genrl.logger import read_csv
from genrl.trainer import build, load_run_config, train
from genrl_envs.base import EnvSpec, StepResult
from genrl_policies.gaussian import GaussianConfig, GaussianPolicy
from genrl_policies.gorl import GoRLConfig, GoRLPolicy

OBS, ACT = 3, 2


class LinearEnv:
    """A toy batched env: x' = 0.9 x + 0.3 W a, reward -|x|^2; truncated after 10 steps. Records
    every action it receives."""

    def __init__(self, n_envs: int = 2) -> None:
        one = torch.ones(ACT).numpy()
        self.spec = EnvSpec("linear", n_envs, OBS, ACT, -one, one, 10)
        self.w = torch.randn(ACT, OBS, generator=torch.Generator().manual_seed(5))
        self.actions: list[torch.Tensor] = []

    def reset(self, seed: int | None = None) -> torch.Tensor:
        self.rng = torch.Generator().manual_seed(seed or 0)
        self.x = torch.randn(self.spec.n_envs, OBS, generator=self.rng)
        self.t = torch.zeros(self.spec.n_envs, dtype=torch.long)
        return self.x.clone()

    def step(self, action: torch.Tensor) -> StepResult:
        self.actions.append(action.clone())
        x = 0.9 * self.x + 0.3 * action.clamp(-1, 1) @ self.w
        reward = -x.square().sum(-1)
        self.t += 1
        truncated = self.t >= 10
        final = x.clone()
        if truncated.any():
            x[truncated] = torch.randn(int(truncated.sum()), OBS, generator=self.rng)
            self.t[truncated] = 0
        self.x = x
        return StepResult(x.clone(), reward, torch.zeros_like(truncated), truncated, final, [], [])

    def obs_normalizer_state(self) -> None:
        return None

    def close(self) -> None:
        pass


SAC_TINY = SACConfig(steps_per_iter=20, learning_starts=10, batch_size=8, buffer_size=200, critic_hidden=(16,), utd_ratio=0.5)
GORL_TINY = GoRLTrainConfig(stage_fractions=(0.5, 0.5), refine_steps=40, decoder_epochs=2, decoder_batch_size=16)


def tiny_policy(**kw: Any) -> GoRLPolicy:
    base = dict(encoder_hidden=(16,), encoder_activation="relu", state_dependent_std=True, encoder_squash="tanh", latent_reg="none",
                decoder_hidden=(16,), decoder_embed_dim=8, decoder_steps=3)  # fmt: skip
    return GoRLPolicy(OBS, ACT, GoRLConfig(**{**base, **kw}))


def make(total_steps: int = 80, seed: int = 0, **gorl: Any) -> GoRLSAC:
    """4 iterations of 20 steps; one boundary after iteration 2."""
    torch.manual_seed(seed)
    cfg = GoRLTrainConfig(**{**GORL_TINY.__dict__, **gorl})
    return GoRLSAC(tiny_policy(), LinearEnv(), SAC_TINY, cfg, total_steps=total_steps, seed=seed, env_factory=LinearEnv)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- stage 0: SAC on the latent, the env action the decoder's ------------------------------------------
def test_stage0_is_sac_on_the_latent_through_the_frozen_decoder() -> None:
    algo = make(total_steps=160)
    policy, env, sac = algo.policy, algo.env, algo.sac
    decoder0 = state(policy.decoder)
    assert sac.policy is policy.encoder and sac.critic.q1[0].in_features == OBS + ACT  # Q(s, eps)
    assert not {id(p) for p in policy.decoder_parameters()} & {id(p) for g in sac.actor_opt.param_groups for p in g["params"]}
    for _ in range(2):  # stage 0: 40 steps, 30 of them after learning_starts
        algo.iterate()
    assert algo.stage == 0 and sac.n_updates == 15
    rows = sac.buffer.pos
    eps, obs = sac.buffer.action[:rows], sac.buffer.obs[:rows]
    assert eps.abs().max() <= 3.0 and eps.abs().max() > 1.0  # the latent box [-3, 3], not the action box
    executed = torch.stack(env.actions)
    assert torch.equal(executed, torch.tanh(eps))  # the zero decoder is the identity: env action = tanh(eps), bitwise
    assert torch.equal(executed, policy.squash(policy.decode(obs.flatten(0, 1), eps.flatten(0, 1))).view_as(executed))
    assert same(state(policy.decoder), decoder0) and all(p.grad is None and not p.requires_grad for p in policy.decoder_parameters())

    # the same run as plain SAC with a tanh-squashed Gaussian over a [-3, 3] latent, the env stepped with tanh(eps)
    class TanhEnv(LinearEnv):
        def __init__(self) -> None:
            super().__init__()
            self.spec = EnvSpec("tanh", 2, OBS, ACT, -3 * torch.ones(ACT).numpy(), 3 * torch.ones(ACT).numpy(), 10)

        def step(self, action: torch.Tensor) -> StepResult:
            return super().step(torch.tanh(action))

    ref_algo = make(total_steps=160)
    actor = GaussianPolicy(OBS, ACT, GaussianConfig(hidden_sizes=(16,), activation="relu", state_dependent_std=True, squash="tanh"))
    ref = SAC(actor, TanhEnv(), SAC_TINY, total_steps=160, seed=0)
    actor.load_state_dict(ref_algo.policy.encoder.state_dict())
    ref.critic.load_state_dict(ref_algo.sac.critic.state_dict())
    ref.critic_target.load_state_dict(ref_algo.sac.critic_target.state_dict())
    for _ in range(2):
        ref.iterate()
    assert torch.equal(ref.buffer.action[:rows], eps) and same(state(actor), state(policy.encoder)) and same(state(ref.critic), state(sac.critic))


# -- the boundary ------------------------------------------------------------------------------------------
def test_boundary_refines_the_decoder_and_resets_the_agent() -> None:
    algo = make()
    sac, policy = algo.sac, algo.policy
    encoder0, critic0, alpha0 = state(policy.encoder), state(sac.critic), sac.log_alpha.detach().clone()
    assert algo.boundaries == [2]
    algo.iterate()
    decoder0, trained = state(policy.decoder), state(policy.encoder)
    assert not same(trained, encoder0) and not torch.equal(sac.log_alpha, alpha0)
    metrics = algo.iterate()  # the boundary
    assert algo.stage == 1 and metrics["gorl/stage"] == 0 and metrics["gorl/refinement_steps"] == 40
    assert math.isfinite(metrics["gorl/decoder_loss"]) and metrics["gorl/decoder_epochs"] == 2
    assert not same(state(policy.decoder), decoder0) and all(not p.requires_grad for p in policy.decoder_parameters())
    assert same(state(policy.encoder), encoder0)  # the actor back to its initial weights (box buffers included)
    assert same(state(sac.critic), critic0) and same(state(sac.critic_target), critic0)
    assert torch.equal(sac.log_alpha, alpha0)
    assert all(len(opt.state) == 0 for opt in (sac.actor_opt, sac.critic_opt, sac.alpha_opt))
    assert len(sac.buffer) == 0 and sac.n_updates == 0 and sac.learning_from == 40
    metrics = algo.iterate()  # learning_starts (10) applies again: 10 random steps, then 10 x 0.5 updates
    assert metrics["gorl/stage"] == 1 and metrics["train/n_updates"] == 5 and len(sac.buffer) == 20  # 10 rows x 2 envs
    assert not same(state(policy.encoder), encoder0)
    first = torch.stack(algo.env.actions[-10:-5])  # uniform latents in [-3, 3] through the refined decoder
    eps = sac.buffer.action[:5]
    assert torch.allclose(first, policy.squash(policy.decode(sac.buffer.obs[:5].flatten(0, 1), eps.flatten(0, 1))).view_as(first))


def test_reset_encoder_false_keeps_the_actor_and_temperature() -> None:
    algo = make(reset_encoder=False)
    algo.iterate()
    algo.iterate()
    critic = state(algo.sac.critic)
    algo.sac.iterate()  # trained further, then the (stage-1) reset would apply at a later boundary: none here
    assert algo.stage == 1 and not same(state(algo.sac.critic), critic)
    algo2 = make(reset_encoder=False)
    algo2.iterate()
    before = state(algo2.policy.encoder), algo2.sac.log_alpha.detach().clone()
    seen = {}
    real = algo2.sac.iterate

    def spy() -> dict[str, float]:
        out = real()
        seen["encoder"], seen["alpha"] = state(algo2.policy.encoder), algo2.sac.log_alpha.detach().clone()
        return out

    algo2.sac.iterate = spy
    algo2.iterate()
    assert same(state(algo2.policy.encoder), seen["encoder"]) and torch.equal(algo2.sac.log_alpha, seen["alpha"])
    assert not same(seen["encoder"], before[0]) and len(algo2.sac.buffer) == 0


def test_refinement_data_come_from_the_latest_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    algo = make()
    seen: dict[str, Any] = {}
    real_iterate, real_collect = algo.sac.iterate, gorl_sac.collect_refinement_data

    def iterate() -> dict[str, float]:
        out = real_iterate()
        seen["after_sac"] = state(algo.policy.encoder)
        return out

    def collect(policy: GoRLPolicy, *args: Any, **kw: Any) -> Any:
        seen["collected_with"] = state(policy.encoder)
        seen["decoder"] = state(policy.decoder)
        return real_collect(policy, *args, **kw)

    monkeypatch.setattr(algo.sac, "iterate", iterate)
    monkeypatch.setattr(gorl_sac, "collect_refinement_data", collect)
    algo.iterate()
    algo.iterate()
    assert same(seen["collected_with"], seen["after_sac"])  # the stage's last weights ...
    assert not same(seen["collected_with"], state(algo.policy.encoder))  # ... not the re-initialised ones
    assert all(torch.count_nonzero(v) == 0 for v in seen["decoder"].values())  # with the stage's decoder


def test_squashed_encoder_acts_in_the_latent_box_and_round_trips() -> None:
    policy = tiny_policy(latent_bound=2.0).double()  # float64: atanh of a saturated tanh is exact enough to round-trip
    obs = torch.randn(64, OBS, dtype=torch.float64)
    with torch.no_grad():
        for p in policy.encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    action, rec = policy.act(obs, generator=torch.Generator().manual_seed(1))
    assert rec.eps.abs().max() <= 2.0 and torch.equal(action, torch.tanh(policy.decode(obs, rec.eps)))
    assert torch.allclose(policy.log_ratio(obs, rec), torch.zeros(64, dtype=torch.float64), atol=1e-3)
    det, rec_det = policy.act(obs, deterministic=True)
    assert torch.allclose(rec_det.eps, 2.0 * torch.tanh(policy.encoder.distribution(obs)[0]))
    policy.reset_encoder(seed=3)
    assert torch.equal(policy.encoder.action_scale, torch.full((ACT,), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="encoder_squash"):
        GoRLConfig(encoder_squash="clip")
    with pytest.raises(ValueError, match="latent_bound"):
        GoRLConfig(latent_bound=0.0)


# -- through the trainer: CLI, export, exact resume --------------------------------------------------------
CLI_TINY = [
    "--env", "Pendulum-v1", "--policy", "gorl", "--algo", "sac", "--seed", "0", "--steps", "1200",
    "--set", "algo_config.steps_per_iter=200", "--set", "algo_config.learning_starts=100", "--set", "algo_config.batch_size=32",
    "--set", "algo_config.critic_hidden=[32, 32]", "--set", "algo_config.n_step=2", "--set", "algo_config.utd_ratio=0.5",
    "--set", "policy_config.encoder_hidden=[16, 16]", "--set", "policy_config.decoder_hidden=[16, 16]",
    "--set", "policy_config.decoder_embed_dim=8", "--set", "policy_config.decoder_steps=4",
    "--set", "gorl.stage_fractions=[0.5, 0.25, 0.25]", "--set", "gorl.refine_steps=200", "--set", "gorl.decoder_epochs=3",
    "--set", "gorl.decoder_batch_size=64", "--save-every", "200", "--set", "run.keep_checkpoints=0", "--eval-episodes", "1", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def sac_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 iterations of 200 steps; boundaries after iterations 3 and 5 (steps 600, 1000)."""
    out = tmp_path_factory.mktemp("gorl_sac") / "full"
    assert cli.main(["train", *CLI_TINY, "--out", str(out)]) == 0
    return out


def test_cli_run_crosses_boundaries_and_exports_an_agent(sac_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    algo = build(load_run_config(sac_run))
    try:
        assert isinstance(algo, GoRLSAC) and algo.boundaries == [3, 5] and algo.cfg.refine_steps == 200
    finally:
        algo.env.close()
    log = read_csv(sac_run / "progress.csv")
    assert log["gorl/stage"] == [0, 0, 0, 1, 1, 2] and log["gorl/refinement_steps"] == [0, 0, 200, 200, 400, 400]
    assert [i for i, v in enumerate(log["gorl/decoder_loss"]) if not math.isnan(v)] == [2, 4]
    assert log["train/n_updates"] == [50, 100, 100, 50, 100, 50]  # learning_starts again after each boundary
    states = {s: load_checkpoint(sac_run / "checkpoints" / str(s))["state"]["algo_state"] for s in (600, 800)}
    assert states[600]["gorl"] == {"stage": 1, "refinement_steps": 200} and states[600]["buffer_pos"] == 0 and states[600]["n_updates"] == 0
    assert states[800]["n_updates"] == 50
    agent = Agent.load(sac_run / "final")
    assert isinstance(agent.policy, GoRLPolicy) and agent.policy.config.encoder_squash == "tanh"
    assert any(torch.count_nonzero(p) > 0 for p in agent.policy.decoder_parameters())
    assert abs(agent.predict(torch.zeros(3).numpy())).max() <= 1.0
    assert cli.main(["eval", str(sac_run / "final"), "--episodes", "1"]) == 0
    assert "gorl step 1200: return" in capsys.readouterr().out


@pytest.mark.parametrize("step", [600, 800])  # right after the first boundary; mid-stage 1, before the second
def test_resume_is_bitwise_before_and_after_a_boundary(sac_run: Path, tmp_path: Path, step: int) -> None:
    part = tmp_path / "part"
    shutil.copytree(sac_run, part)
    for later in checkpoint_steps(sac_run):
        if later > step:
            shutil.rmtree(part / "checkpoints" / str(later))
    assert cli.main(["train", "--resume", str(part), "--no-progress"]) == 0
    a, b = sac_run / "checkpoints" / "1200", part / "checkpoints" / "1200"
    names = sorted(str(f.relative_to(a)) for f in a.rglob("*.safetensors"))
    assert names == sorted(str(f.relative_to(b)) for f in b.rglob("*.safetensors"))
    for name in names:
        assert_same_tensors(a / name, b / name)
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert_same_nested(ca["optimizer"], cb["optimizer"], "optimizer")
    assert ca["state"] == cb["state"]
    pa, pb = read_csv(sac_run / "progress.csv"), read_csv(part / "progress.csv")
    for key in pa:
        if not key.startswith("time/"):
            assert all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(pa[key], pb[key], strict=True)), key


def test_resume_rejects_an_inconsistent_stage(sac_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    part = tmp_path / "part"
    shutil.copytree(sac_run, part)
    for later in checkpoint_steps(sac_run):
        if later > 800:
            shutil.rmtree(part / "checkpoints" / str(later))
    for s in (200, 400, 600):
        shutil.rmtree(part / "checkpoints" / str(s))
    path = part / "checkpoints" / "800" / "state.json"
    data = json.loads(path.read_text())
    data["algo_state"]["gorl"]["stage"] = 0
    path.write_text(json.dumps(data))
    assert cli.main(["train", "--resume", str(part), "--no-progress"]) == 2
    assert "stage 0 does not match" in capsys.readouterr().err


# -- preset and configuration errors -----------------------------------------------------------------------
def test_paper_preset_and_sac_defaults_for_the_gorl_family() -> None:
    cfg = config_from_dict({"algo": "sac", "policy": "gorl", "preset": "paper"})
    sac, pc = cfg.algo_config_object(), cfg.policy_config_object()
    assert cfg.preset == "gorl-sac" and cfg.gorl.stage_fractions == (0.5, 0.25, 0.25)
    assert (sac.utd_ratio, sac.policy_lr, sac.batch_size, sac.gamma, sac.tau) == (20.0, 3e-4, 256, 0.99, 0.005)
    assert pc.decoder == "diffusion" and pc.encoder_squash == "tanh" and pc.state_dependent_std and pc.encoder_hidden == (256, 256)
    assert config_from_dict({"policy": "gorl", "preset": "paper"}).preset == "gorl"  # PPO keeps its own


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"gorl": {"stage_fractions": [0.9, 0.1]}}, "give stage 1 100 env steps, not more than algo_config.learning_starts = 100"),
        ({"gorl": {"stage_fractions": [0.5, 0.25, 0.25]}, "run": {"total_steps": 200}}, "without SAC iterations"),
        ({"policy_config": {"encoder_squash": "none"}}, "encoder_squash = 'tanh'"),
        ({"policy_config": {"state_dependent_std": False}}, "state_dependent_std = true"),
        ({"policy_config": {"latent_reg": "kl"}}, "latent_reg = 'none'"),
    ],
)
def test_bad_gorl_sac_configs_are_one_line_errors(over: dict[str, Any], match: str, tmp_path: Path) -> None:
    data: dict[str, Any] = {
        "algo": "sac", "policy": "gorl", "env": {"env_id": "Pendulum-v1"}, "algo_config": {"steps_per_iter": 100, "learning_starts": 100},
        "run": {"total_steps": 1000, "out": str(tmp_path / "r"), "progress": False},
    }  # fmt: skip
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value}
    with pytest.raises(ConfigError, match=match) as info:
        train(config_from_dict(data))
    assert "\n" not in str(info.value) and not (tmp_path / "r").exists()
