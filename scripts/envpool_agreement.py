"""EnvPool's MuJoCo -v5 tasks against gymnasium's: same start, same actions, step by step.

For every task both simulators start from the same state (reset noise 0 on both sides; Reacher
and Pusher: EnvPool's reset noise 0 or fixed, gymnasium's state set to EnvPool's first state) and
take the same seeded uniform random actions until either episode ends (or for 1000 steps with
``terminate_when_unhealthy=False``, ``--no-termination``). EnvPool runs through
``genrl_envs.envpool_sim.EnvPoolSim`` (float64 rewards rebuilt from EnvPool's terms) and raw
(float32 rewards). The table gives, per task: steps compared, the first step where
max |Δobs| > 1e-6, max |Δobs|, max |Δreward| (EnvPool's float32 reward, EnvPoolSim's), whether
both episodes ended on the same step, and the facts that explain the rest: whether EnvPool's
XML is gymnasium's, whether EnvPool's task constants are gymnasium's, and the MuJoCo releases.

``--mujoco DIR`` also runs gymnasium on the ``mujoco`` package installed in DIR (e.g.
``pip install --target DIR mujoco==3.6.0``, the release EnvPool links) in a subprocess, and
compares its compiled model with this process's; ``--speed`` measures steps per second.

    python scripts/envpool_agreement.py
    python scripts/envpool_agreement.py --no-termination --mujoco /tmp/mujoco360
    python scripts/envpool_agreement.py --speed
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

TASKS = (
    "Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Ant-v5", "Humanoid-v5", "HumanoidStandup-v5",
    "Swimmer-v5", "InvertedPendulum-v5", "InvertedDoublePendulum-v5", "Reacher-v5", "Pusher-v5",
)  # fmt: skip
#: tasks with a ``terminate_when_unhealthy`` option
TERMINATING = ("Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5")
#: EnvPool options that give a start gymnasium can be put in (Reacher's goal stays EnvPool's draw)
ENVPOOL_START = {
    "Reacher-v5": {"reset_qpos_scale": 0.0, "reset_qvel_scale": 0.0},
    "Pusher-v5": {"reset_qvel_scale": 0.0, "cylinder_x_min": -0.25, "cylinder_x_max": -0.25, "cylinder_y_min": 0.1, "cylinder_y_max": 0.1},
}
#: what the study found beyond the table's columns (printed under the table)
NOTES = {
    "Humanoid-v5": 'humanoid.xml sets <option solver="PGS" iterations="50">: the solve stops before convergence, and MuJoCo 3.6.0 and '
    "3.17.0 stop at states ~3e-8 apart after one step (run to convergence, or with Newton, the releases agree to 1e-14); the "
    "compiled body_inertia / body_iquat also differ by ~5e-16",
    "HumanoidStandup-v5": "same model and PGS option as Humanoid-v5",
    "HalfCheetah-v5": 'half_cheetah.xml has settotalmass="14" and inertiafromgeom: the compiled body_inertia / body_iquat differ between '
    "the releases by <= 6e-16; with 3.6.0's compiled inertias copied into the 3.17.0 model the first difference moves from step 1 to step 44",
}


# -- facts: engine, XML, constants ----------------------------------------------------------------
def envpool_mujoco_version() -> str:
    """The MuJoCo release EnvPool's C++ MuJoCo tasks are linked with (``mj_versionString``)."""
    import envpool.mujoco.gym  # noqa: F401  loads the extension

    lib = ctypes.CDLL(str(Path(envpool.mujoco.gym.__file__).parents[1] / "mujoco_gym_envpool.so"))
    lib.mj_versionString.restype = ctypes.c_char_p
    return lib.mj_versionString().decode()


def envpool_xml(task: str) -> Path:
    """The XML EnvPool loads for ``task``: ``<xml_file stem>_envpool.xml`` in its asset folder."""
    import envpool

    config = envpool.make_spec(task).config
    return Path(config.base_path) / "mujoco" / "assets_gym" / (Path(config.xml_file).stem + "_envpool.xml")


def _model_text(path: Path) -> str:
    """The XML from its ``<mujoco`` element on (EnvPool's copies add a licence comment on top)."""
    text = path.read_text()
    return text[text.index("<mujoco") :]


def same_xml(task: str) -> bool:
    import gymnasium as gym

    return _model_text(envpool_xml(task)) == _model_text(Path(gym.make(task).unwrapped.fullpath))


#: EnvPool option -> gymnasium attribute, where the names differ
_ATTR = {"ctrl_cost_weight": ("_ctrl_cost_weight", "_reward_control_weight"), "dist_cost_weight": ("_reward_dist_weight",),
         "near_cost_weight": ("_reward_near_weight",), "contact_cost_weight": ("_contact_cost_weight", "_impact_cost_weight"),
         "forward_reward_weight": ("_forward_reward_weight", "_uph_cost_weight"), "use_contact_force": ("_include_cfrc_ext_in_observation",)}  # fmt: skip


#: EnvPool options about the pool, not the task
_POOL_OPTIONS = ("num_envs", "batch_size", "num_threads", "max_num_players", "thread_affinity_offset", "seed", "reward_threshold", "frame_stack")
#: EnvPool options whose gymnasium counterpart is a number in gymnasium's code, not an attribute
GYM_CODE: dict[str, dict[str, float]] = {
    "Hopper-v5": {"velocity_min": -10.0, "velocity_max": 10.0},  # the observation clips qvel to [-10, 10]
    "Walker2d-v5": {"velocity_min": -10.0, "velocity_max": 10.0},
    "HumanoidStandup-v5": {"healthy_reward": 1.0},  # reward = uph - ctrl - impact + 1
    "InvertedPendulum-v5": {"healthy_reward": 1.0, "healthy_z_min": -0.2, "healthy_z_max": 0.2},  # |qpos[1]| <= 0.2
    "InvertedDoublePendulum-v5": {"healthy_z_max": 1.0, "observation_min": -10.0, "observation_max": 10.0},  # y <= 1 ends; qfrc_constraint clipped
    "Reacher-v5": {"reset_qpos_scale": 0.1, "reset_qvel_scale": 0.005, "reset_goal_scale": 0.2},
    "Pusher-v5": {"reset_qvel_scale": 0.005, "cylinder_x_min": -0.3, "cylinder_x_max": 0.0, "cylinder_y_min": -0.2, "cylinder_y_max": 0.2, "cylinder_dist_min": 0.17},
}


def constants(task: str) -> tuple[list[str], list[str], list[str]]:
    """(equal, differing, unchecked) numeric EnvPool options of ``task`` against gymnasium's
    attributes (or ``GYM_CODE``); EnvPool's switches (bools) select gymnasium v5's behaviour and are
    checked by the trajectories."""
    import envpool
    import gymnasium as gym

    env = gym.make(task)
    u = env.unwrapped
    equal, differ, unchecked = [], [], []
    for key, value in envpool.make_spec(task).config._asdict().items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key in _POOL_OPTIONS:
            continue
        if key in GYM_CODE.get(task, {}):
            theirs: Any = GYM_CODE[task][key]
        elif key == "frame_skip":
            theirs = u.frame_skip
        elif key == "max_episode_steps":
            theirs = env.spec.max_episode_steps
        elif key.endswith(("_min", "_max")) and hasattr(u, f"_{key[:-4]}_range"):
            theirs = getattr(u, f"_{key[:-4]}_range")[key.endswith("_max")]
        elif key == "contact_cost_max" and (bounds := getattr(u, "_contact_cost_range", getattr(u, "_impact_cost_range", None))) is not None:
            theirs = bounds[1]
        else:
            names = [n for n in (*_ATTR.get(key, ()), f"_{key}") if hasattr(u, n)]
            if not names:
                unchecked.append(key)
                continue
            theirs = getattr(u, names[0])
        (equal if theirs == value else differ).append(key if theirs == value else f"{key} {value} vs {theirs}")
    env.close()
    return equal, differ, unchecked


# -- trajectories ---------------------------------------------------------------------------------
def actions(task: str, steps: int, seed: int = 0) -> np.ndarray:
    import gymnasium as gym

    space = gym.make(task).action_space
    return np.random.default_rng(seed).uniform(space.low, space.high, size=(steps, space.shape[0])).astype(np.float32)


def _gym_kwargs(task: str, no_termination: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {} if task in ENVPOOL_START else {"reset_noise_scale": 0.0}
    if no_termination and task in TERMINATING:
        kwargs["terminate_when_unhealthy"] = False
    return kwargs


def envpool_run(task: str, acts: np.ndarray, no_termination: bool) -> dict[str, np.ndarray]:
    """EnvPool raw (float64 obs, float32 reward) and through EnvPoolSim (float64 reward, ends)."""
    import envpool
    import torch

    from genrl_envs.envpool_sim import EnvPoolSim

    kwargs = {**_gym_kwargs(task, no_termination), **ENVPOOL_START.get(task, {})}
    sim = EnvPoolSim(task, 1, env_kwargs=kwargs)
    raw = envpool.make(task, env_type="gymnasium", num_envs=1, seed=0, **kwargs)
    sim.reset(0)
    first, _ = raw.reset()
    obs = [first[0]]
    rew, rew32, end = [], [], []
    for a in acts:
        _, r, te, tr = sim.step(torch.from_numpy(a[None]))
        o, r32, *_ = raw.step(a[None].astype(np.float64))
        obs.append(o[0])
        rew.append(float(r[0]))
        rew32.append(float(r32[0]))
        end.append(bool(te[0] or tr[0]))
        if end[-1]:
            break
    sim.close()
    return {"obs": np.array(obs), "rew": np.array(rew), "rew32": np.array(rew32), "end": np.array(end)}


def gym_start(task: str, first_obs: np.ndarray, qpos0: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The (qpos, qvel) that puts gymnasium where EnvPool started (Reacher, Pusher), else None."""
    if task == "Reacher-v5":  # qpos = arm angles 0, goal as EnvPool drew it (obs[4:6]); qvel 0
        qpos = qpos0.copy()
        qpos[2:] = first_obs[4:6]
        return qpos, np.zeros_like(qpos)
    if task == "Pusher-v5":  # cylinder at EnvPool's fixed draw, goal at 0, qvel 0
        qpos = qpos0.copy()
        qpos[-4:-2] = (-0.25, 0.1)
        qpos[-2:] = 0.0
        return qpos, np.zeros_like(qpos)
    return None


def gym_run(task: str, acts: np.ndarray, no_termination: bool, first_obs: np.ndarray) -> dict[str, np.ndarray]:
    """gymnasium's ``task`` from the shared start with ``acts`` (float64 rewards)."""
    import gymnasium as gym

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make(task, **_gym_kwargs(task, no_termination))
        o, _ = env.reset(seed=0)
    start = gym_start(task, first_obs, env.unwrapped.init_qpos)
    if start is not None:
        env.unwrapped.set_state(*start)
        o = env.unwrapped._get_obs()
    obs, rew, end = [o], [], []
    for a in acts:
        o, r, te, tr, _ = env.step(a)
        obs.append(o)
        rew.append(float(r))
        end.append(bool(te or tr))
        if end[-1]:
            break
    m = env.unwrapped.model
    return {"obs": np.array(obs), "rew": np.array(rew), "end": np.array(end), "body_inertia": m.body_inertia.copy(), "body_iquat": m.body_iquat.copy()}


def gym_run_elsewhere(mujoco_dir: str, task: str, acts: np.ndarray, no_termination: bool, first_obs: np.ndarray) -> dict[str, np.ndarray]:
    """``gym_run`` in a subprocess that imports ``mujoco`` from ``mujoco_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, acts=acts, first_obs=first_obs)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([mujoco_dir, os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, __file__, "--child", task, str(src), str(dst)] + (["--no-termination"] if no_termination else [])
        subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
        with np.load(dst) as out:
            return dict(out)


def compare(ep: dict[str, np.ndarray], gy: dict[str, np.ndarray]) -> dict[str, Any]:
    n = min(len(ep["rew"]), len(gy["rew"]))
    d_obs = np.abs(ep["obs"][: n + 1] - gy["obs"][: n + 1]).max(1)
    over, nonzero = np.flatnonzero(d_obs > 1e-6), np.flatnonzero(d_obs > 0)
    return {
        "steps": n,
        "nonzero": int(nonzero[0]) if nonzero.size else None,
        "first": int(over[0]) if over.size else None,
        "obs": float(d_obs.max()),
        "rew32": float(np.abs(ep["rew32"][:n] - gy["rew"][:n]).max()),
        "rew": float(np.abs(ep["rew"][:n] - gy["rew"][:n]).max()),
        "same_end": len(ep["rew"]) == len(gy["rew"]),
    }


def study(tasks: tuple[str, ...], no_termination: bool, mujoco_dir: str | None, steps: int = 1000) -> list[dict[str, Any]]:
    import mujoco

    rows = []
    for task in tasks:
        acts = actions(task, steps)
        ep = envpool_run(task, acts, no_termination)
        gy = gym_run(task, acts, no_termination, ep["obs"][0])
        row = {"task": task, **compare(ep, gy), "xml": same_xml(task), "constants": constants(task), "mujoco": mujoco.__version__}
        if mujoco_dir:
            other = gym_run_elsewhere(mujoco_dir, task, acts, no_termination, ep["obs"][0])
            row["other"] = compare(ep, other)
            row["inertia"] = max(float(np.abs(gy[k] - other[k]).max()) for k in ("body_inertia", "body_iquat"))
        rows.append(row)
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else ("0" if x == 0 else f"{x:.1e}")


def print_table(rows: list[dict[str, Any]], engine: str, other_version: str | None) -> None:
    print("| task | steps | first step Δobs≠0 | first step max|Δobs|>1e-6 | max |Δobs| | max |Δr| float32 | max |Δr| EnvPoolSim | same end | cause |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        equal, differ, _ = r["constants"]
        facts = ["same XML" if r["xml"] else "XML differs", f"{len(equal)} constants equal" + (f", differ: {'; '.join(differ)}" if differ else "")]
        if r["nonzero"] is None:
            facts.append(f"bitwise equal on MuJoCo {engine} (EnvPool) and {r['mujoco']}")
        elif r["first"] is None:
            facts.append(f"MuJoCo {engine} (EnvPool) vs {r['mujoco']}: rounding differences stay < 1e-6 until the episode ends")
        else:
            facts.append(f"MuJoCo {engine} (EnvPool) vs {r['mujoco']}: rounding differences from step {r['nonzero']} grow with the dynamics")
        if "other" in r:
            o = r["other"]
            facts.append(f"gymnasium on {other_version}: max|Δobs| {_fmt(o['obs'])}, max|Δr| {_fmt(o['rew'])} over {o['steps']} steps; compiled inertia Δ {_fmt(r['inertia'])}")
        print(
            f"| {r['task']} | {r['steps']} | {r['nonzero'] if r['nonzero'] is not None else 'never'} | {r['first'] if r['first'] is not None else 'never'} | {_fmt(r['obs'])} | {_fmt(r['rew32'])} | "
            f"{_fmt(r['rew'])} | {'yes' if r['same_end'] else 'NO'} | {'; '.join(facts)} |"
        )
    for r in rows:
        if r["task"] in NOTES:
            print(f"\n{r['task']}: {NOTES[r['task']]}")
        unchecked = r["constants"][2]
        if unchecked:
            print(f"\n{r['task']}: EnvPool options not compared: {', '.join(unchecked)}")


# -- speed ----------------------------------------------------------------------------------------
def speed(sizes: tuple[int, ...] = (1, 8, 64, 1024), threads: int = 2, env_steps: int = 10_000) -> None:
    """Hopper-v5 env steps per second, random actions: raw EnvPool and TensorVectorEnv, sync/async."""
    import envpool
    import torch

    from genrl_envs.envpool_sim import make_envpool_env

    torch.set_num_threads(1)
    print(f"Hopper-v5, random actions, {threads} EnvPool threads, env steps/s")
    print("| N | raw sync | raw async | TensorVectorEnv sync | TensorVectorEnv async |")
    print("|---|---|---|---|---|")
    for n in sizes:
        iters = max(20, env_steps // n)
        rng = np.random.default_rng(0)
        raw = envpool.make("Hopper-v5", env_type="gymnasium", num_envs=n, batch_size=n, num_threads=threads, seed=0)
        raw.reset()
        rates = []
        for mode in ("sync", "async"):
            a = rng.uniform(-1, 1, (n, 3))
            t = time.perf_counter()
            for _ in range(iters):
                if mode == "sync":
                    raw.step(a)
                    a = rng.uniform(-1, 1, (n, 3))
                else:  # the next actions are drawn while EnvPool steps
                    raw.send(a)
                    a = rng.uniform(-1, 1, (n, 3))
                    raw.recv()
            rates.append(n * iters / (time.perf_counter() - t))
        raw.close()
        for asynchronous in (False, True):
            env = make_envpool_env("Hopper-v5", n, threads=threads, asynchronous=asynchronous)
            env.reset(seed=0)
            gen = torch.Generator().manual_seed(0)
            a = torch.rand(n, 3, generator=gen) * 2 - 1
            t = time.perf_counter()
            for _ in range(iters):
                env.step_async(a)
                a = torch.rand(n, 3, generator=gen) * 2 - 1
                env.step_wait()
            rates.append(n * iters / (time.perf_counter() - t))
            env.close()
        print(f"| {n} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--no-termination", action="store_true", help="terminate_when_unhealthy=False: 1000 steps of Hopper, Walker2d, Ant, Humanoid")
    parser.add_argument("--mujoco", metavar="DIR", help="also run gymnasium on the mujoco package installed in DIR (pip install --target DIR mujoco==X)")
    parser.add_argument("--speed", action="store_true", help="measure steps per second instead")
    parser.add_argument("--child", nargs=3, metavar=("TASK", "IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        task, src, dst = args.child
        with np.load(src) as inp:
            out = gym_run(task, inp["acts"], args.no_termination, inp["first_obs"])
        np.savez(dst, **out)
        return
    if args.speed:
        speed()
        return
    warnings.filterwarnings("ignore")
    engine = envpool_mujoco_version()
    rows = study(tuple(args.tasks), args.no_termination, args.mujoco)
    other = None
    if args.mujoco:
        out = subprocess.run([sys.executable, "-c", "import mujoco; print(mujoco.__version__)"], env={**os.environ, "PYTHONPATH": args.mujoco}, capture_output=True, text=True)
        other = "mujoco " + out.stdout.strip()
    mode = "1000 steps, terminate_when_unhealthy=False" if args.no_termination else "until either episode ends (at most 1000 steps)"
    print(f"EnvPool (MuJoCo {engine}) vs gymnasium (mujoco {rows[0]['mujoco']}), seeded uniform actions, {mode}\n")
    print_table(rows, engine, other)


if __name__ == "__main__":
    main()
