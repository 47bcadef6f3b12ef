"""genrl_envs.envpool_sim: EnvPool's worlds behind TensorVectorEnv, and their agreement with gymnasium.

The agreement helpers are those of scripts/envpool_agreement.py (same start, same seeded actions).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

envpool = pytest.importorskip("envpool")

from genrl_envs.base import EnvError  # noqa: E402
from genrl_envs.envpool_sim import EnvPoolSim, make_envpool_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*settotalmass.*", "ignore:.*precision lowered.*")


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("envpool_agreement", ROOT / "scripts" / "envpool_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_both(study, task: str, steps: int, no_termination: bool = False) -> dict:
    acts = study.actions(task, steps)
    ep = study.envpool_run(task, acts, no_termination)
    return study.compare(ep, study.gym_run(task, acts, no_termination, ep["obs"][0]))


# -- agreement ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "steps", "no_termination", "min_steps"),
    [
        ("Walker2d-v5", 300, True, 300),  # rounding differences (from step 5) stay < 1e-9 for 300 steps
        ("Hopper-v5", 1000, False, 27),  # a whole episode (terminates at step 27)
        ("Ant-v5", 1000, False, 20),
        ("Swimmer-v5", 1000, False, 1000),
        ("Reacher-v5", 50, False, 50),  # gymnasium put in EnvPool's start (its goal draw)
        ("InvertedPendulum-v5", 1000, False, 5),
    ],
)
def test_agrees_with_gymnasium(study, task: str, steps: int, no_termination: bool, min_steps: int) -> None:
    r = run_both(study, task, steps, no_termination)
    assert r["steps"] == min_steps and r["same_end"]
    assert r["obs"] < 1e-8
    assert r["rew32"] < 1e-6  # EnvPool's float32 reward
    assert r["rew"] < 1e-8 and r["rew"] <= r["rew32"] / 10  # EnvPoolSim's float64 rebuild


def test_documented_differences(study) -> None:
    """Same XMLs and constants everywhere; the differences come from the MuJoCo release."""
    import mujoco

    for task in study.TASKS:
        assert study.envpool_xml(task).name.endswith("_envpool.xml")
        assert study.same_xml(task), task
        assert study.constants(task)[1] == [], task
    assert study.envpool_mujoco_version() == "3.6.0" != mujoco.__version__
    # HalfCheetah: rounding differences from the first steps, above 1e-6 before step 100, O(1) by step 300
    r = run_both(study, "HalfCheetah-v5", 300)
    assert r["nonzero"] is not None and r["nonzero"] <= 5 and 20 <= r["first"] <= 100 and r["obs"] > 1e-2
    assert 'settotalmass="14"' in study.envpool_xml("HalfCheetah-v5").read_text()
    # Humanoid: the unconverged PGS solve differs above 1e-6 within 10 steps
    r = run_both(study, "Humanoid-v5", 15, no_termination=True)
    assert r["first"] is not None and r["first"] <= 10
    model = mujoco.MjModel.from_xml_path(str(study.envpool_xml("Humanoid-v5")))
    assert model.opt.solver == mujoco.mjtSolver.mjSOL_PGS and model.opt.iterations == 50


# -- SAME_STEP episodes ---------------------------------------------------------------------------
def test_same_step_autoreset_matches_a_manual_loop() -> None:
    """Episode lengths and returns, final_obs and the next episode's first obs equal N one-world
    pools stepped by hand (explicit reset at each end): no dead step, no lost action."""
    n, steps, seed, limit = 3, 120, 5, 40
    env = make_envpool_env("Hopper-v5", n, normalize_obs=False, normalize_reward=False, env_kwargs={"max_episode_steps": limit})
    acts = np.random.default_rng(0).uniform(-1, 1, (steps, n, 3)).astype(np.float32)
    obs = env.reset(seed=seed)
    got_obs, got_final, got_eps = [obs], [], []
    for t in range(steps):
        res = env.step(torch.from_numpy(acts[t]))
        got_obs.append(res.obs)
        got_final.append(res.final_obs)
        got_eps += sorted(zip(res.episode_lengths, res.episode_returns))
    env.close()
    want_eps, trunc_seen = [], False
    for i in range(n):
        pool = envpool.make("Hopper-v5", env_type="gymnasium", num_envs=1, seed=seed + i, max_episode_steps=limit)
        o, _ = pool.reset()
        torch.testing.assert_close(got_obs[0][i], torch.tensor(o[0], dtype=torch.float32), rtol=0, atol=0)
        ret, length = 0.0, 0
        for t in range(steps):
            o, r, te, tr, _ = pool.step(acts[t, i : i + 1].astype(np.float64))
            ret, length = ret + float(r[0]), length + 1
            torch.testing.assert_close(got_final[t][i], torch.tensor(o[0], dtype=torch.float32), rtol=0, atol=0)
            if te[0] or tr[0]:
                trunc_seen |= bool(tr[0] and not te[0])
                want_eps.append((length, ret))
                ret, length = 0.0, 0
                o, _ = pool.reset()
            torch.testing.assert_close(got_obs[t + 1][i], torch.tensor(o[0], dtype=torch.float32), rtol=0, atol=0)
    assert len(want_eps) >= 2 * n and trunc_seen
    assert sorted(length for length, _ in got_eps) == sorted(length for length, _ in want_eps)
    np.testing.assert_allclose(sorted(r for _, r in got_eps), sorted(r for _, r in want_eps), rtol=1e-6)


def test_truncation_at_the_time_limit() -> None:
    env = make_envpool_env("HalfCheetah-v5", 2, normalize_obs=False, normalize_reward=False, env_kwargs={"max_episode_steps": 5, "reset_noise_scale": 0.0})
    assert env.spec.max_episode_steps == 5
    first = env.reset(seed=0)
    for t in range(1, 11):
        res = env.step(torch.full((2, 6), 0.5))
        ended = t % 5 == 0
        assert res.truncated.tolist() == [ended] * 2 and not res.terminated.any()
        assert res.episode_lengths == ([5, 5] if ended else [])
        if ended:  # the next episode starts at the (noise-free) initial state; final_obs is the last one
            torch.testing.assert_close(res.obs, first, rtol=0, atol=0)
            assert not torch.equal(res.final_obs, res.obs)
        else:
            assert torch.equal(res.final_obs, res.obs)
    env.close()


def test_async_send_recv_equals_sync() -> None:
    results = []
    for asynchronous in (False, True):
        env = make_envpool_env("Hopper-v5", 4, asynchronous=asynchronous, threads=2)
        assert env.can_step_async is asynchronous
        gen = torch.Generator().manual_seed(0)
        out = [env.reset(seed=3)]
        for _ in range(60):
            env.step_async(torch.rand(4, 3, generator=gen) * 2 - 1)
            res = env.step_wait()
            out += [res.obs, res.reward, res.terminated, res.truncated, res.final_obs, torch.tensor(res.episode_lengths), torch.tensor(res.episode_returns)]
        results.append(out)
        env.close()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_seeding_and_no_snapshot() -> None:
    sim = EnvPoolSim("Hopper-v5", 3)
    a, b = sim.reset(7), sim.reset(7)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(sim.reset(8), a)
    one = EnvPoolSim("Hopper-v5", 1)
    torch.testing.assert_close(one.reset(9)[0], a[2], rtol=0, atol=0)  # world i of seed s is world 0 of seed s + i
    assert sim.reset(10**12).shape == (3, 11)  # seeds beyond int32 wrap
    assert not sim.has_snapshot and sim.state_dict() == {}
    env = make_envpool_env("Hopper-v5", 2)
    env.reset(seed=1)
    env.step(torch.zeros(2, 3))
    env.load_state_dict(env.state_dict())
    assert env.restarted_obs is not None and "restarts" in env.resume_note
    sim.close()
    one.close()
    env.close()


def test_rows_are_put_in_world_order() -> None:
    """EnvPool may hand rows back in any order; EnvPoolSim sorts them by info["env_id"]."""
    sims = [EnvPoolSim("Hopper-v5", 3) for _ in range(2)]
    real_recv = sims[1]._env._recv

    def reversed_recv():  # EnvPool's flat state list (every field has one row per world)
        return [x[::-1] for x in real_recv()]

    sims[1]._env._recv = reversed_recv
    action = torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = [(sim.reset(0), *sim.step(action)) for sim in sims]
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for sim in sims:
        sim.close()


def test_dict_observations_are_flattened() -> None:
    """A Dict of Boxes becomes one row per world in the space's key order, as EnvPool's own
    gymnasium API returns it (genrl reads EnvPool's flat state list directly)."""
    sim = EnvPoolSim("CheetahRun-v1", 2)
    assert sim.obs_dim == 17 and sim.action_dim == 6  # position 8 + velocity 9
    pool = envpool.make("CheetahRun-v1", env_type="gymnasium", num_envs=2, batch_size=2, num_threads=1, seed=0, env_seed=[0, 1])
    want, _ = pool.reset()
    flat = lambda o: torch.tensor(np.concatenate([o["position"], o["velocity"]], axis=1), dtype=torch.float32)  # noqa: E731
    torch.testing.assert_close(sim.reset(0), flat(want), rtol=0, atol=0)
    action = np.random.default_rng(0).uniform(-1, 1, (2, 6)).astype(np.float32)
    obs, reward, terminated, truncated = sim.step(torch.from_numpy(action))
    o, r, te, tr, info = pool.step(action.astype(np.float64))
    order = np.argsort(info["env_id"])
    assert obs.shape == (2, 17) and obs.dtype == torch.float32 and reward.shape == (2,)
    torch.testing.assert_close(obs, flat({k: v[order] for k, v in o.items()}), rtol=0, atol=0)
    np.testing.assert_array_equal(reward.numpy(), r[order].astype(np.float64))
    assert terminated.tolist() == te[order].tolist() and truncated.tolist() == tr[order].tolist()
    sim.close()
    pool.close()


# -- errors ---------------------------------------------------------------------------------------
def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EnvError) as exc:
        EnvPoolSim("Hoper-v5", 2)
    assert "unknown EnvPool env id 'Hoper-v5'; did you mean Hopper-v5" in one_line(exc)
    with pytest.raises(EnvError) as exc:
        EnvPoolSim("Hopper-v5", 2, env_kwargs={"ctrl_cost_weigth": 0.1})
    assert "no option 'ctrl_cost_weigth'; did you mean ctrl_cost_weight" in one_line(exc)
    with pytest.raises(EnvError, match="may not set num_envs"):
        EnvPoolSim("Hopper-v5", 2, env_kwargs={"num_envs": 3})
    with pytest.raises(EnvError, match="Discrete action space; genrl's control back end needs Box actions"):
        EnvPoolSim("CartPole-v1", 2)
    env = make_envpool_env("Hopper-v5", 2)
    env.reset(seed=0)
    with pytest.raises(ValueError) as exc:
        env.step(torch.zeros(3, 3))
    assert "action has shape (3, 3), expected (2, 3) for Hopper-v5" in one_line(exc)
    with pytest.raises(ValueError) as exc:
        env.step(torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]))
    assert "contains NaN or inf" in one_line(exc)
    env.close()
    sim = EnvPoolSim("HalfCheetah-v5", 1, env_kwargs={"max_episode_steps": 1})
    sim.reset(0)
    sim.step(torch.zeros(1, 6))
    with pytest.raises(RuntimeError, match=r"worlds \[0\] ended and were not reset"):
        sim.step(torch.zeros(1, 6))
    sim.close()
    monkeypatch.setitem(sys.modules, "envpool", None)
    with pytest.raises(EnvError) as exc:
        EnvPoolSim("Hopper-v5", 2)
    assert one_line(exc).endswith("pip install envpool")
