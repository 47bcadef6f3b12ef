"""GoRL (policies.gorl + genrl.algos.gorl): the checks of design notes §9.1.

Identity decoder and its Gaussian-PPO equivalence, latent-only likelihood, decoder determinism,
fresh-noise decoder refinement, latent regularisers, a frozen decoder under PPO, the two-timescale
schedule, exact resume across a stage boundary, and config validation. Tiny nets, a toy linear env
for the algorithm-level tests, and one short InvertedPendulum run through the CLI.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from compare import assert_same_nested, assert_same_tensors
from torch.distributions import Normal, kl_divergence

from genrl import cli
from genrl.algos.gorl import GoRL, GoRLTrainConfig, stage_boundaries
from genrl.algos.ppo import PPO, PPOConfig
from genrl.checkpoint import checkpoint_steps, load_checkpoint
from genrl.config import TrainConfig, config_from_dict
from genrl.errors import ConfigError
from genrl.logger import read_csv
from genrl_envs.base import EnvSpec, StepResult
from genrl_policies.base import load_pretrained, record_map, resolve_family
from genrl_policies.gaussian import GaussianConfig, GaussianPolicy, GaussianRecord
from genrl_policies.gorl import GoRLConfig, GoRLPolicy, diffusion_alpha_bars, gaussian_kl_to_prior

OBS, ACT, B = 4, 2, 7


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(**kw) -> GoRLConfig:
    base = dict(encoder_hidden=(16, 16), decoder_hidden=(16, 16), decoder_embed_dim=8, decoder_steps=5)
    return GoRLConfig(**{**base, **kw})


def randomise_(params, seed: int, scale: float = 0.3) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def trained_like(policy: GoRLPolicy, seed: int = 3) -> GoRLPolicy:
    """A non-identity decoder and a moved encoder."""
    policy.reset_decoder(seed)
    randomise_(policy.decoder_parameters(), seed + 1)
    randomise_(policy.encoder_parameters(), seed + 2, scale=0.1)
    return policy


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_column(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


class LinearEnv:
    """A toy batched env (no simulator): x' = 0.9 x + 0.3 W a, reward -|x|^2 - 0.1 |a|^2,
    episodes truncated after ``horizon`` steps, terminated when |x|_inf > 4."""

    def __init__(self, n_envs: int = 2, horizon: int = 12) -> None:
        one = torch.ones(ACT).numpy()
        self.spec = EnvSpec("linear", n_envs, OBS, ACT, -one, one, horizon)
        self.w = torch.randn(ACT, OBS, generator=gen(123))
        self.horizon = horizon

    def reset(self, seed: int | None = None) -> torch.Tensor:
        self.rng = gen(seed or 0)
        n = self.spec.n_envs
        self.x = torch.randn(n, OBS, generator=self.rng)
        self.t = torch.zeros(n, dtype=torch.long)
        self.ret = torch.zeros(n)
        return self.x.clone()

    def step(self, action: torch.Tensor) -> StepResult:
        a = action.clamp(-1, 1)
        x = 0.9 * self.x + 0.3 * a @ self.w
        reward = -(x.square().sum(-1)) - 0.1 * a.square().sum(-1)
        self.t += 1
        self.ret += reward
        terminated = (x.abs() > 4).any(-1)
        truncated = (self.t >= self.horizon) & ~terminated
        done = terminated | truncated
        final = x.clone()
        returns = [float(r) for r in self.ret[done]]
        lengths = [int(n) for n in self.t[done]]
        if done.any():
            x[done] = torch.randn(int(done.sum()), OBS, generator=self.rng)
            self.t[done] = 0
            self.ret[done] = 0
        self.x = x
        return StepResult(x.clone(), reward, terminated, truncated, final, returns, lengths)

    def obs_normalizer_state(self) -> None:
        return None

    def close(self) -> None:
        pass


PPO_TINY = PPOConfig(n_steps=16, n_minibatches=4, n_epochs=2, ent_coef=0.01, critic_hidden=(16, 16))


# ----------------------------------------------------------------------------------------------
# the identity decoder and stage 0 = Gaussian PPO
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_decoder_is_exact(dtype: torch.dtype) -> None:
    policy = GoRLPolicy(OBS, ACT, GoRLConfig(squash="none")).to(dtype)
    assert all(torch.count_nonzero(p) == 0 for p in policy.decoder_parameters())
    obs = torch.randn(B, OBS, generator=gen(1), dtype=dtype)
    eps = 3.0 * torch.randn(B, ACT, generator=gen(2), dtype=dtype)
    assert torch.equal(policy.decode(obs, eps), eps)
    action, record = policy.act(obs, generator=gen(3))
    assert torch.equal(action, record.eps) and torch.equal(record.pre_action, record.eps)


def test_stage0_update_equals_gaussian_ppo() -> None:
    """§9.1: identity decoder, squash and latent regulariser off => one GoRL encoder update is one
    Gaussian-PPO update on the (pre-tanh) actions: same rollouts, losses, gradients and weights."""
    torch.manual_seed(0)
    gauss = GaussianPolicy(OBS, ACT, GaussianConfig(hidden_sizes=(16, 16), log_std_init=-0.3))
    gorl = GoRLPolicy(OBS, ACT, tiny(latent_reg="none", squash="none", log_std_init=-0.3))
    gorl.encoder.load_state_dict(gauss.state_dict())  # same keys: net.*, log_std
    algos = []
    for policy in (gauss, gorl):
        torch.manual_seed(1)  # same critic init
        algos.append(PPO(policy, LinearEnv(), PPO_TINY, total_steps=10 * 32, seed=5))
    pg, pr = algos
    for a in algos:
        a.collect()
    sg, sr = pg._storage, pr._storage
    for key in ("obs", "reward", "terminated", "truncated", "next_obs"):
        assert torch.equal(sg[key], sr[key]), key
    assert torch.equal(sg["record"].action, sr["record"].eps)
    assert torch.equal(sr["record"].pre_action, sr["record"].eps)
    assert torch.equal(sg["record"].log_prob, sr["record"].log_prob)

    # one minibatch: identical loss terms and gradients w.r.t. the mean network and log sigma
    idx = torch.arange(0, 32, 3)
    obs = sg["obs"].view(32, -1)[idx]
    adv = torch.randn(idx.numel(), generator=gen(7))
    ret, old_v = torch.randn(idx.numel(), generator=gen(8)), torch.randn(idx.numel(), generator=gen(9))
    flat = lambda x: x.reshape(32, *x.shape[2:])[idx]  # noqa: E731  (T, N, ...) -> minibatch
    rec_g, rec_r = record_map(flat, sg["record"]), record_map(flat, sr["record"])
    assert isinstance(rec_g, GaussianRecord)
    with torch.no_grad():  # move the encoders (identically) so the ratios are not all 1
        for p, q in zip(gauss.parameters(), gorl.encoder.parameters()):
            d = 0.05 * torch.randn(p.shape, generator=gen(p.numel()))
            p.add_(d)
            q.add_(d)
    losses = []
    for algo, rec in ((pg, rec_g), (pr, rec_r)):
        algo.optimizer.zero_grad(set_to_none=True)
        loss, stats = algo.ppo_loss(obs, rec, adv, ret, old_v)
        loss.backward()
        losses.append((loss.detach(), {k: v.detach() for k, v in stats.items()}))
    assert torch.equal(losses[0][0], losses[1][0])
    assert losses[0][1].keys() == losses[1][1].keys()
    for k in losses[0][1]:
        assert torch.equal(losses[0][1][k], losses[1][1][k]), k
    assert losses[0][1]["clip_fraction"] > 0 or losses[0][1]["approx_kl"] > 0
    for (name, p), q in zip(gauss.named_parameters(), gorl.encoder.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert all(p.grad is None for p in gorl.decoder_parameters())

    # full updates and a second iteration agree bitwise as well
    with torch.no_grad():
        gorl.encoder.load_state_dict(gauss.state_dict())
    ug, ur = pg.update(), pr.update()
    assert ug == ur
    assert same_state(clone_state(gauss), clone_state(gorl.encoder))
    mg, mr = pg.iterate(), pr.iterate()
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    assert drop(mg) == drop(mr)
    assert same_state(clone_state(gauss), clone_state(gorl.encoder))
    assert same_state(clone_state(pg.critic), clone_state(pr.critic))


# ----------------------------------------------------------------------------------------------
# likelihood, determinism, squashing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_dependent_std", [False, True])
def test_log_prob_is_latent_gaussian_only(state_dependent_std: bool) -> None:
    torch.manual_seed(0)
    policy = trained_like(GoRLPolicy(OBS, ACT, tiny(state_dependent_std=state_dependent_std))).double()
    obs = torch.randn(B, OBS, generator=gen(1), dtype=torch.float64)
    _, record = policy.act(obs, generator=gen(2))
    mean, log_std = policy.distribution(obs)
    expected = Normal(mean, log_std.exp().expand_as(mean)).log_prob(record.eps).sum(-1)
    torch.testing.assert_close(record.log_prob, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(record.pre_action, record.eps)  # the decoder is not the identity here
    # the decoder plays no part in the ratio: changing it leaves log_ratio at exactly 0
    randomise_(policy.decoder_parameters(), 9)
    assert torch.equal(policy.log_ratio(obs, record), torch.zeros(B, dtype=torch.float64))
    # and the ratio's graph reaches no decoder parameter
    randomise_(policy.encoder_parameters(), 10, scale=0.05)
    lr = policy.log_ratio(obs, record)
    lr.sum().backward()
    assert all(p.grad is None for p in policy.decoder_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.encoder_parameters())


def test_decoder_is_deterministic() -> None:
    torch.manual_seed(0)
    policy = trained_like(GoRLPolicy(OBS, ACT, tiny()))
    obs = torch.randn(B, OBS, generator=gen(1))
    eps = torch.randn(B, ACT, generator=gen(2))
    first = policy.decode(obs, eps)
    assert not torch.equal(first, eps)
    for _ in range(3):
        assert torch.equal(policy.decode(obs, eps), first)  # same call, same result
    # across batch sizes (float64: rounding of the matmuls may differ with B, nothing else does)
    p64 = policy.double()
    o64, e64 = obs.double(), eps.double()
    full = p64.decode(o64, e64)
    rows = torch.cat([p64.decode(o64[i : i + 1], e64[i : i + 1]) for i in range(B)])
    torch.testing.assert_close(rows, full, rtol=0, atol=1e-12)
    # act: the decoder draws nothing; deterministic acting uses eps = mu
    a1, r1 = p64.act(o64, generator=gen(5))
    a2, r2 = p64.act(o64, generator=gen(5))
    assert torch.equal(a1, a2) and torch.equal(r1.pre_action, r2.pre_action)
    torch.testing.assert_close(r1.pre_action, p64.decode(o64, r1.eps), rtol=0, atol=0)
    _, rd = p64.act(o64, deterministic=True, generator=gen(6))
    assert torch.equal(rd.eps, p64.distribution(o64)[0])


@pytest.mark.parametrize("squash", ["tanh", "none"])
def test_pre_action_squashes_to_executed_action(squash: str) -> None:
    torch.manual_seed(0)
    policy = trained_like(GoRLPolicy(OBS, ACT, tiny(squash=squash)))
    obs = torch.randn(64, OBS, generator=gen(1))
    action, record = policy.act(obs, generator=gen(2))
    if squash == "tanh":
        assert torch.equal(torch.tanh(record.pre_action), action)
        assert action.abs().max() < 1
    else:
        assert torch.equal(record.pre_action, action)


# ----------------------------------------------------------------------------------------------
# the decoder loss
# ----------------------------------------------------------------------------------------------
def test_decoder_loss_takes_state_action_only_and_learns() -> None:
    assert list(inspect.signature(GoRLPolicy.decoder_loss).parameters) == ["self", "obs", "pre_actions", "generator"]
    torch.manual_seed(0)
    policy = GoRLPolicy(OBS, ACT, tiny(decoder_pairs=4))
    policy.reset_decoder(seed=1)
    obs = torch.randn(128, OBS, generator=gen(1))
    target = torch.stack([torch.sin(obs[:, 0]) + obs[:, 1], 0.5 * obs[:, 2] * obs[:, 3]], dim=-1)  # pre-tanh
    # fresh N(0, I) noise: the encoder's latents never enter (changing the encoder changes nothing)
    before = policy.decoder_loss(obs, target, gen(3))
    check_decoder_loss_ignores_encoder_and_learns(policy, obs, target, before)


# ----------------------------------------------------------------------------------------------
# latent regularisers
# ----------------------------------------------------------------------------------------------
def test_latent_kl_value_zero_and_gradient() -> None:
    g = gen(0)
    mean = torch.randn(B, ACT, generator=g, dtype=torch.float64, requires_grad=True)
    log_std = (0.5 * torch.randn(B, ACT, generator=g, dtype=torch.float64)).requires_grad_(True)
    kl = gaussian_kl_to_prior(mean, log_std)
    assert kl.shape == (B,) and (kl >= 0).all()
    ref = kl_divergence(Normal(mean, log_std.exp()), Normal(torch.zeros_like(mean), torch.ones_like(mean))).sum(-1)
    torch.testing.assert_close(kl, ref, rtol=0, atol=1e-12)
    kl.sum().backward()
    torch.testing.assert_close(mean.grad, mean.detach(), rtol=0, atol=1e-12)  # dKL/dmu = mu
    torch.testing.assert_close(log_std.grad, (2 * log_std.detach()).exp() - 1, rtol=0, atol=1e-12)  # sigma^2 - 1
    zero = torch.zeros(3, ACT, dtype=torch.float64)
    assert torch.equal(gaussian_kl_to_prior(zero, zero), torch.zeros(3, dtype=torch.float64))
    # the policy's regulariser is exactly 0 at mu = 0, sigma = 1
    policy = GoRLPolicy(OBS, ACT, tiny()).double()
    with torch.no_grad():
        policy.encoder.net[-1].weight.zero_()
    obs = torch.randn(B, OBS, generator=gen(1), dtype=torch.float64)
    assert torch.equal(policy.latent_regularizer(obs), torch.zeros(B, dtype=torch.float64))


@pytest.mark.parametrize("state_dependent_std", [False, True])
def test_latent_reg_variants_and_auxiliary_loss(state_dependent_std: bool) -> None:
    torch.manual_seed(0)
    obs = torch.randn(B, OBS, generator=gen(1), dtype=torch.float64)
    policies = {}
    for kind in ("kl", "l2_params", "none"):
        torch.manual_seed(0)
        p = GoRLPolicy(OBS, ACT, tiny(latent_reg=kind, latent_reg_coef=0.25, state_dependent_std=state_dependent_std)).double()
        randomise_(p.encoder_parameters(), 2)
        policies[kind] = p
    _, record = policies["kl"].act(obs, generator=gen(3))
    mean, log_std = policies["l2_params"].distribution(obs)
    sigma2 = (2 * log_std).exp().expand_as(mean)
    code = mean.square().mean() + sigma2.mean()  # the official code's mean(mu^2) + mean(sigma^2)
    got = policies["l2_params"].latent_regularizer(obs)
    torch.testing.assert_close(got.mean(), code, rtol=0, atol=1e-12)
    loss, stats = policies["l2_params"].auxiliary_loss(obs, record, torch.zeros(B))
    torch.testing.assert_close(loss, 0.25 * code, rtol=0, atol=1e-12)
    kl_loss, _ = policies["kl"].auxiliary_loss(obs, record, torch.zeros(B))
    torch.testing.assert_close(kl_loss, 0.25 * gaussian_kl_to_prior(mean, log_std.expand_as(mean)).mean(), rtol=0, atol=1e-12)
    assert policies["none"].auxiliary_loss(obs, record, torch.zeros(B)) is None
    assert GoRLPolicy(OBS, ACT, tiny(latent_reg_coef=0.0)).auxiliary_loss(obs.float(), record, torch.zeros(B)) is None
    # the regularizer PPO maximises is the latent entropy
    ent = Normal(mean, sigma2.sqrt()).entropy().sum(-1)
    torch.testing.assert_close(policies["l2_params"].regularizer(obs, record), ent, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# the decoder under PPO; the two-timescale schedule
# ----------------------------------------------------------------------------------------------
def test_ppo_update_leaves_decoder_bitwise_unchanged() -> None:
    torch.manual_seed(0)
    policy = trained_like(GoRLPolicy(OBS, ACT, tiny()))
    decoder0, encoder0 = clone_state(policy.decoder), clone_state(policy.encoder)
    algo = PPO(policy, LinearEnv(), PPO_TINY, total_steps=4 * 32, seed=0)
    for _ in range(2):
        algo.iterate()
    assert same_state(clone_state(policy.decoder), decoder0)
    assert not same_state(clone_state(policy.encoder), encoder0)
    assert all(not p.requires_grad and p.grad is None for p in policy.decoder_parameters())
    assert all(p not in algo.optimizer.state for p in policy.decoder_parameters())


def make_gorl(fractions: tuple[float, ...], n_iter: int, **ppo_kw) -> GoRL:
    torch.manual_seed(0)
    policy = GoRLPolicy(OBS, ACT, tiny())
    cfg = GoRLTrainConfig(stage_fractions=fractions, refine_steps=50, decoder_epochs=3, decoder_batch_size=16, patience=0)
    ppo_cfg = dataclasses.replace(PPO_TINY, **ppo_kw)
    return GoRL(policy, LinearEnv(), ppo_cfg, cfg, total_steps=n_iter * 32, seed=0, env_factory=LinearEnv)


@pytest.mark.parametrize(
    ("fractions", "n_iter", "bounds"),
    [((0.5, 0.5), 6, [3]), ((0.25, 0.25, 0.5), 8, [2, 4])],
    ids=["two-stages", "three-stages"],
)
def test_schedule_refines_exactly_at_boundaries(fractions: tuple[float, ...], n_iter: int, bounds: list[int]) -> None:
    algo = make_gorl(fractions, n_iter, stage_clip_coefs=tuple(0.1 * (i + 1) for i in range(len(fractions))))
    policy = algo.policy
    assert algo.boundaries == bounds and algo.n_iterations == n_iter
    encoder_init = clone_state(policy.encoder)
    decoder = clone_state(policy.decoder)
    assert algo.ppo.clip_coef == pytest.approx(0.1)
    while algo.iteration < algo.n_iterations:
        metrics = algo.iterate()
        it, now = algo.iteration, clone_state(policy.decoder)
        assert algo.global_step == it * algo.steps_per_iter  # refinement steps are not run steps
        if it in bounds:
            k = bounds.index(it) + 1
            assert not same_state(now, decoder), f"decoder not refined after iteration {it}"
            assert same_state(clone_state(policy.encoder), encoder_init), "encoder not re-initialised"
            assert all(p not in algo.optimizer.state for p in policy.encoder_parameters())
            assert all(p in algo.optimizer.state for p in algo.critic.parameters())
            assert algo.stage == k and metrics["gorl/stage"] == k - 1
            assert algo.ppo.clip_coef == pytest.approx(0.1 * (k + 1))
            assert "gorl/decoder_loss" in metrics and math.isfinite(metrics["gorl/decoder_loss"])
            assert metrics["gorl/refinement_steps"] == k * 50  # 25 steps x 2 envs per refinement
            assert all(not p.requires_grad for p in policy.decoder_parameters())
        else:
            assert same_state(now, decoder), f"decoder changed at iteration {it}"
            assert "gorl/decoder_loss" not in metrics
            assert not same_state(clone_state(policy.encoder), encoder_init)
        decoder = now
    assert algo.stage == len(bounds) and algo.refinement_steps == 50 * len(bounds)


def test_refinement_leaves_training_state_alone() -> None:
    """The refinement phase runs on its own env and generators: the PPO env, PPO generator and the
    global RNG are untouched, so checkpoints on either side of it resume exactly."""
    algo = make_gorl((0.5, 0.5), 4)
    algo.ppo.iterate()
    obs, gen_state, rng = algo.ppo.next_obs.clone(), algo.ppo.generator.get_state(), torch.get_rng_state()
    x = algo.env.x.clone()
    stats = algo.refine()
    assert torch.equal(algo.ppo.next_obs, obs) and torch.equal(algo.env.x, x)
    assert torch.equal(algo.ppo.generator.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), rng)
    assert stats["gorl/refinement_collected"] == 50 and algo.stage == 1
    # the data: tanh(pre) is what the refinement env executed, M = ceil(50 / 2) * 2 samples
    o, pre, _ = algo.collect_refinement_data(seed=11)
    assert o.shape == (50, OBS) and pre.shape == (50, ACT) and not o.is_inference()


def test_stage_boundaries_rounding_and_empty_stage() -> None:
    assert stage_boundaries((1 / 3, 1 / 3, 1 / 6, 1 / 6), 180) == [60, 120, 150]  # the paper's 60/60/30/30
    assert stage_boundaries((1 / 3, 1 / 3, 1 / 6, 1 / 6), 12) == [4, 8, 10]
    with pytest.raises(ConfigError, match="without PPO iterations"):
        stage_boundaries((1 / 3, 1 / 3, 1 / 6, 1 / 6), 4)


# ----------------------------------------------------------------------------------------------
# through the trainer: exact resume across a stage boundary
# ----------------------------------------------------------------------------------------------
GORL_TINY = [
    "--env", "InvertedPendulum-v5", "--policy", "gorl", "--algo", "ppo", "--seed", "0",
    "--set", "ppo.n_steps=256", "--set", "ppo.n_minibatches=4", "--set", "ppo.n_epochs=2",
    "--set", "policy_config.encoder_hidden=[16, 16]", "--set", "policy_config.decoder_hidden=[16, 16]",
    "--set", "policy_config.decoder_embed_dim=8", "--set", "gorl.stage_fractions=[0.25, 0.25, 0.5]",
    "--set", "gorl.refine_steps=300", "--set", "gorl.decoder_epochs=3", "--set", "gorl.decoder_batch_size=64",
    "--set", "ppo.stage_clip_coefs=[0.15, 0.3, 0.3]",
    "--eval-episodes", "2", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def gorl_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2048 steps = 8 iterations; refinements after iterations 2 and 4; checkpoints every 512."""
    out = tmp_path_factory.mktemp("gorl") / "full"
    assert cli.main(["train", *GORL_TINY, "--steps", "2048", "--out", str(out), "--save-every", "512"]) == 0
    return out


def test_trainer_builds_gorl_and_checkpoints_stage(gorl_run: Path) -> None:
    from genrl.trainer import build, load_run_config

    cfg = load_run_config(gorl_run)
    algo = build(cfg)
    try:
        assert isinstance(algo, GoRL) and algo.boundaries == [2, 4]
    finally:
        algo.env.close()
    assert checkpoint_steps(gorl_run) == [512, 1024, 1536, 2048]
    stages = [load_checkpoint(gorl_run / "checkpoints" / str(s))["state"]["algo_state"]["gorl"] for s in (512, 1024, 1536, 2048)]
    assert [s["stage"] for s in stages] == [1, 2, 2, 2]
    assert [s["refinement_steps"] for s in stages] == [300, 600, 600, 600]
    log = read_csv(gorl_run / "progress.csv")
    assert log["gorl/stage"] == [0, 0, 1, 1, 2, 2, 2, 2]
    refined = [i for i, v in enumerate(log["gorl/decoder_loss"]) if not math.isnan(v)]
    assert refined == [1, 3]
    loaded = load_pretrained(gorl_run / "checkpoints" / "2048" / "policy", family="gorl")
    assert isinstance(loaded, GoRLPolicy) and all(not p.requires_grad for p in loaded.decoder_parameters())
    assert any(torch.count_nonzero(p) > 0 for p in loaded.decoder_parameters())  # refined, not identity


def test_resume_across_stage_boundary_is_bitwise_exact(gorl_run: Path, tmp_path: Path) -> None:
    """Resume from the 512 checkpoint (written right after the first refinement) and cross the
    second boundary (iteration 4) in the resumed process: everything matches the full run."""
    part = tmp_path / "part"
    shutil.copytree(gorl_run, part)
    for step in (1024, 1536, 2048):
        shutil.rmtree(part / "checkpoints" / str(step))
    assert cli.main(["train", "--resume", str(part), "--no-progress"]) == 0
    for step in (1024, 2048):
        a, b = gorl_run / "checkpoints" / str(step), part / "checkpoints" / str(step)
        for name in ("policy/model.safetensors", "trainer.safetensors", "env.safetensors"):
            assert_same_tensors(a / name, b / name)
        ca, cb = load_checkpoint(a), load_checkpoint(b)
        assert_same_nested(ca["optimizer"], cb["optimizer"], "optimizer")
        assert ca["state"] == cb["state"]
    pa, pb = read_csv(gorl_run / "progress.csv"), read_csv(part / "progress.csv")
    assert pa.keys() == pb.keys()
    for key in pa:
        if not key.startswith("time/"):
            assert same_column(pa[key], pb[key]), key


def test_resume_rejects_missing_or_inconsistent_stage(gorl_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for mutate, needle in (
        (lambda s: s["algo_state"].pop("gorl"), "does not match this run"),
        (lambda s: s["algo_state"]["gorl"].update(stage=0), "stage 0 does not match"),
    ):
        part = tmp_path / f"part-{needle[:5]}"
        shutil.copytree(gorl_run, part)
        for step in (1024, 1536, 2048):
            shutil.rmtree(part / "checkpoints" / str(step))
        path = part / "checkpoints" / "512" / "state.json"
        state = json.loads(path.read_text())
        mutate(state)
        path.write_text(json.dumps(state))
        assert cli.main(["train", "--resume", str(part), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert needle in err, err


# ----------------------------------------------------------------------------------------------
# configuration errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"latent_reg": "kld"}, "latent_reg"),
        ({"decoder": "ddim"}, "unknown decoder"),
        ({"decoder": "gan"}, "unknown decoder"),
        ({"squash": "clip"}, "squash"),
        ({"decoder_steps": 0}, "decoder_steps"),
        ({"decoder_pairs": 0}, "decoder_pairs"),
        ({"latent_reg_coef": -1.0}, "latent_reg_coef"),
        ({"latent_reg_coef": math.nan}, "latent_reg_coef"),
        ({"encoder_hidden": ()}, "encoder_hidden"),
        ({"decoder_hidden": (16, 0)}, "decoder_hidden"),
        ({"decoder_embed_dim": 3}, "decoder_embed_dim"),
        ({"encoder_activation": "gelu"}, "encoder_activation"),
    ],
)
def test_bad_policy_config_raises(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        GoRLConfig(**kwargs)


def test_stage_schedule_must_fit_the_stages() -> None:
    from genrl.config import config_from_dict

    with pytest.raises(ConfigError, match="stage_clip_coefs has 1 values for 4"):
        config_from_dict({"policy": "gorl", "ppo": {"stage_clip_coefs": [0.2]}})
    with pytest.raises(ConfigError, match="invalid ppo.stage_max_grad_norms"):
        config_from_dict({"policy": "gorl", "ppo": {"stage_max_grad_norms": [0.5, 1.0, 1.0, -1.0]}})
    with pytest.raises(ConfigError, match="per-stage schedule for policy 'gorl'"):
        config_from_dict({"policy": "gaussian", "ppo": {"stage_clip_coefs": [0.2]}})
    with pytest.raises(ConfigError, match="2 values for 3 GoRL stages"):
        make_gorl((0.25, 0.25, 0.5), 8, stage_clip_coefs=(0.1, 0.2))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"stage_fractions": (0.5, 0.4)}, "sum to 1"),
        ({"stage_fractions": (1.5, -0.5)}, "stage_fractions"),
        ({"stage_fractions": ()}, "stage_fractions"),
        ({"refine_steps": 0}, "refine_steps"),
        ({"decoder_epochs": 0}, "decoder_epochs"),
        ({"decoder_batch_size": 0}, "decoder_batch_size"),
        ({"patience": -1}, "patience"),
        ({"decoder_lr": 0.0}, "decoder_lr"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_train_config_raises(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        GoRLTrainConfig(**kwargs)


def test_config_section_is_strict_and_gorl_only() -> None:
    assert resolve_family("gorl") is GoRLPolicy
    cfg = config_from_dict({"policy": "gorl", "gorl": {"stage_fractions": [0.5, 0.5], "refine_steps": 1000}})
    assert cfg.gorl.stage_fractions == (0.5, 0.5) and cfg.gorl.refine_steps == 1000
    back = config_from_dict(cfg.to_dict())  # round-trips through config.json (which holds the resolved policy config)
    assert back.to_dict() == cfg.to_dict() and back.policy_config_object() == cfg.policy_config_object() and back.gorl == cfg.gorl
    with pytest.raises(ConfigError, match="did you mean 'refine_steps'"):
        config_from_dict({"policy": "gorl", "gorl": {"refine_step": 10}})
    with pytest.raises(ConfigError, match="only to policy 'gorl'"):
        config_from_dict({"policy": "gaussian", "gorl": {"refine_steps": 10}})
    assert TrainConfig().gorl == GoRLTrainConfig()  # other families: the section stays default
    assert TrainConfig(policy="gorl", policy_config={"decoder": "diffusion"}).policy_config_object().decoder == "diffusion"
    with pytest.raises(ConfigError, match="unknown decoder"):
        TrainConfig(policy="gorl", policy_config={"decoder": "ddpm"}).policy_config_object()


def test_cli_reports_bad_gorl_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", *GORL_TINY, "--out", str(tmp_path / "r")]
    assert cli.main([*base, "--steps", "512"]) == 2  # 2 iterations cannot hold 3 stages
    assert "stage_fractions" in capsys.readouterr().err
    assert cli.main([*base, "--steps", "2048", "--set", "gorl.refine_steps=0"]) == 2
    assert "gorl.refine_steps" in capsys.readouterr().err
    assert cli.main([*base, "--steps", "2048", "--set", 'policy_config.decoder="ddim"']) == 2
    assert "unknown decoder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------
# GoRL-Diff: the DDIM (eta = 0) decoder
# ----------------------------------------------------------------------------------------------
#: 1 / sqrt(abar_9) of the stage-0 linear schedule (betas = linspace(1e-4, 0.02, 10)):
#: abar_9 = prod_k (1 - beta_k) = 0.9037394161512371. With an all-zero eps-net each DDIM step is
#: x <- sqrt(abar_{k-1} / abar_k) x, and the product telescopes to x / sqrt(abar_9).
LINEAR_IDENTITY_FACTOR = 1.051909525569616


def diff(**kw) -> GoRLConfig:
    return tiny(decoder="diffusion", decoder_steps=10, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diffusion_stage0_decoder_is_scaled_identity(dtype: torch.dtype) -> None:
    policy = GoRLPolicy(OBS, ACT, diff(squash="none")).to(dtype)
    assert all(torch.count_nonzero(p) == 0 for p in policy.decoder_parameters())
    assert policy.diffusion_schedule == "linear"
    abar = diffusion_alpha_bars(10, "linear")
    assert abar[-1].item() == pytest.approx(0.9037394161512371, rel=1e-15, abs=0)
    c = 1.0 / math.sqrt(abar[-1].item())
    assert c == pytest.approx(LINEAR_IDENTITY_FACTOR, rel=1e-15, abs=0)
    obs = torch.randn(B, OBS, generator=gen(1), dtype=dtype)
    eps = 3.0 * torch.randn(B, ACT, generator=gen(2), dtype=dtype)
    tol = 1e-14 if dtype == torch.float64 else 1e-6  # a product of 10 rounded step factors
    torch.testing.assert_close(policy.decode(obs, eps), eps * c, rtol=tol, atol=0)
    action, record = policy.act(obs, generator=gen(3))
    torch.testing.assert_close(record.pre_action, record.eps * c, rtol=tol, atol=0)
    assert torch.equal(action, record.pre_action)


def test_diffusion_sampler_is_ddim_eta0_over_all_levels() -> None:
    """decode = the textbook DDIM step x0 = (x - sqrt(1 - abar_k) e) / sqrt(abar_k),
    x <- sqrt(abar_{k-1}) x0 + sqrt(1 - abar_{k-1}) e, k = T-1..0, e = eps_phi(x, k / T | s)."""
    torch.manual_seed(0)
    policy = trained_like(GoRLPolicy(OBS, ACT, diff())).double()
    assert policy.diffusion_schedule == "cosine"
    obs = torch.randn(B, OBS, generator=gen(1), dtype=torch.float64)
    eps = torch.randn(B, ACT, generator=gen(2), dtype=torch.float64)
    abar = diffusion_alpha_bars(10, "cosine").tolist()
    x = eps
    for k in range(9, -1, -1):
        e = policy.decoder(x, torch.full((B,), k / 10, dtype=torch.float64), obs)
        x0 = (x - math.sqrt(1 - abar[k]) * e) / math.sqrt(abar[k])
        prev = abar[k - 1] if k > 0 else 1.0
        x = math.sqrt(prev) * x0 + math.sqrt(1 - prev) * e
    torch.testing.assert_close(policy.decode(obs, eps), x, rtol=1e-10, atol=1e-10)
    # the cosine levels: decreasing, none degenerate (the clipped zero-SNR level is dropped)
    ab = diffusion_alpha_bars(10, "cosine")
    assert (ab[1:] < ab[:-1]).all() and 0.015 < ab[-1] < 0.025 and ab[0] < 1


def test_diffusion_decoder_is_deterministic() -> None:
    torch.manual_seed(0)
    policy = trained_like(GoRLPolicy(OBS, ACT, diff()))
    obs = torch.randn(B, OBS, generator=gen(1))
    eps = torch.randn(B, ACT, generator=gen(2))
    first = policy.decode(obs, eps)
    assert not torch.allclose(first, eps)
    for _ in range(3):
        assert torch.equal(policy.decode(obs, eps), first)
    p64 = policy.double()
    o64, e64 = obs.double(), eps.double()
    full = p64.decode(o64, e64)
    rows = torch.cat([p64.decode(o64[i : i + 1], e64[i : i + 1]) for i in range(B)])
    torch.testing.assert_close(rows, full, rtol=0, atol=1e-12)
    a1, r1 = p64.act(o64, generator=gen(5))
    a2, r2 = p64.act(o64, generator=gen(5))
    assert torch.equal(a1, a2) and torch.equal(r1.pre_action, r2.pre_action)
    torch.testing.assert_close(r1.pre_action, p64.decode(o64, r1.eps), rtol=0, atol=0)
    assert torch.equal(torch.tanh(r1.pre_action), a1)


def test_diffusion_decoder_loss_takes_state_action_only_and_learns() -> None:
    torch.manual_seed(0)
    policy = GoRLPolicy(OBS, ACT, diff(decoder_pairs=4))
    policy.reset_decoder(seed=1)
    obs = torch.randn(128, OBS, generator=gen(1))
    target = torch.stack([torch.sin(obs[:, 0]) + obs[:, 1], 0.5 * obs[:, 2] * obs[:, 3]], dim=-1)
    before = policy.decoder_loss(obs, target, gen(3))
    # zero last layer: eps_phi = 0, so the loss is E||xi||^2 = A (up to sampling noise)
    assert abs(float(before) - ACT) < 0.5
    check_decoder_loss_ignores_encoder_and_learns(policy, obs, target, before)


def test_diffusion_reset_switches_to_cosine_and_persists(tmp_path: Path) -> None:
    torch.manual_seed(0)
    policy = GoRLPolicy(OBS, ACT, diff())
    assert policy.diffusion_schedule == "linear" and "decoder_schedule" in policy.state_dict()
    stage0 = tmp_path / "stage0"
    policy.save_pretrained(stage0)
    assert load_pretrained(stage0, family="gorl").diffusion_schedule == "linear"
    policy.reset_decoder(seed=2)
    assert policy.diffusion_schedule == "cosine"
    assert all(not p.requires_grad for p in policy.decoder_parameters())
    obs = torch.randn(B, OBS, generator=gen(1))
    eps = torch.randn(B, ACT, generator=gen(2))
    # zero last layer under cosine: eps / sqrt(abar_{T-1}) until trained
    c = 1.0 / diffusion_alpha_bars(10, "cosine")[-1].sqrt().item()
    torch.testing.assert_close(policy.decode(obs, eps), eps * c, rtol=1e-5, atol=0)
    randomise_(policy.decoder_parameters(), 3)
    policy.save_pretrained(tmp_path / "refined")
    loaded = load_pretrained(tmp_path / "refined", family="gorl")
    assert isinstance(loaded, GoRLPolicy) and loaded.diffusion_schedule == "cosine"
    assert same_state(clone_state(policy), clone_state(loaded))
    assert torch.equal(loaded.decode(obs, eps), policy.decode(obs, eps))
    # a fresh (linear) policy takes the schedule from the state dict, as a resume does
    fresh = GoRLPolicy(OBS, ACT, diff())
    fresh.load_state_dict(policy.state_dict())
    assert fresh.diffusion_schedule == "cosine" and torch.equal(fresh.decode(obs, eps), policy.decode(obs, eps))
    # the flow policy's state dict is unchanged (no schedule buffer) and it has no schedule
    flow = GoRLPolicy(OBS, ACT, tiny())
    assert "decoder_schedule" not in flow.state_dict()
    with pytest.raises(AttributeError):
        flow.diffusion_schedule  # noqa: B018


def test_diffusion_refinement_through_train_decoder() -> None:
    from genrl.algos.gorl import train_decoder

    torch.manual_seed(0)
    policy = GoRLPolicy(OBS, ACT, diff())
    obs = torch.randn(96, OBS, generator=gen(1))
    pre = torch.tanh(obs[:, :ACT]) + 0.5 * obs[:, 2:]
    stats = train_decoder(policy, obs, pre, epochs=3, batch_size=32, lr=1e-3, val_fraction=0.1, patience=0, seed=4)
    assert policy.diffusion_schedule == "cosine"
    assert math.isfinite(stats["decoder_loss"]) and math.isfinite(stats["decoder_val_loss"])
    assert all(not p.requires_grad for p in policy.decoder_parameters())


CONTRACT_CHECKS = (
    "test_act_shapes_and_record", "test_log_ratio_is_exactly_zero_after_act", "test_generator_reproducibility",
    "test_save_load_roundtrip", "test_log_ratio_rejects_record_with_grad", "test_record_map_indexes_every_field",
    "test_bad_obs_shape_raises",
)  # fmt: skip


@pytest.mark.parametrize("check", CONTRACT_CHECKS)
def test_diffusion_gorl_passes_policy_contract(check: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The generic policy-contract checks (tests/test_policy_contract.py), on a GoRL-Diff policy
    with a cosine (refined-like) decoder: log_ratio exactly 0 after act, detached records, ..."""
    import test_policy_contract as contract

    def make(family: str, seed: int = 0) -> GoRLPolicy:
        torch.manual_seed(seed)
        policy = GoRLPolicy(contract.OBS, contract.ACT, GoRLConfig(decoder="diffusion"))
        policy.reset_decoder(seed)
        contract.randomise_(policy, seed + 100)
        return policy

    monkeypatch.setattr(contract, "make", make)
    fn = getattr(contract, check)
    kwargs: dict = {"family": "gorl"}
    params = inspect.signature(fn).parameters
    if "tmp_path" in params:
        kwargs["tmp_path"] = tmp_path
    cases = [{}]
    if "deterministic" in params:
        cases = [{"deterministic": False}, {"deterministic": True}]
    if "shape" in params:
        cases = [{"shape": (contract.B, contract.OBS + 1)}, {"shape": (contract.OBS,)}]
    for extra in cases:
        fn(**kwargs, **extra)


def check_decoder_loss_ignores_encoder_and_learns(policy, obs, target, before) -> None:
    """The decoder loss takes (s, a) only, has no gradient path outside refinement, and 40 Adam
    steps inside ``decoder_training()`` lower it by more than 15% on a fixed batch."""
    randomise_(policy.encoder_parameters(), 4)
    assert torch.equal(policy.decoder_loss(obs, target, gen(3)), before)
    with pytest.raises(ValueError, match="pre_actions"):
        policy.decoder_loss(obs, target[:, :1], gen(3))
    # outside refinement the decoder has no gradient path at all
    assert not policy.decoder_loss(obs, target, gen(3)).requires_grad
    with policy.decoder_training() as params:
        opt = torch.optim.Adam(params, lr=3e-3)
        g = gen(5)
        for _ in range(40):
            loss = policy.decoder_loss(obs, target, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all(not p.requires_grad for p in policy.decoder_parameters())
    with torch.no_grad():
        after = policy.decoder_loss(obs, target, gen(3))
    assert after < 0.85 * before, (float(before), float(after))
