"""DeepMind Control Suite tasks as gymnasium envs (``dmc/HopperStand-v0`` and friends).

``DMCEnv(domain, task)`` adapts ``dm_control.suite.load(domain, task)`` to the gymnasium API:

* observation: the task's observation dict, each entry flattened and concatenated in the task's
  own (``OrderedDict``) key order, as ``float32`` (a ``Box(-inf, inf)``); ``obs_keys`` lists the
  order and ``obs_slices`` where each entry sits (HopperStand: position 6, velocity 7, touch 2);
* action: the task's bounded action spec as a float32 ``Box`` (``[-1, 1]`` for every suite task);
* reward: exactly dm_control's per-step reward, in ``[0, 1]``. The suite's tasks listed below run
  1000 control steps per episode, so an **episode return lies in [0, 1000]: this is the
  "normalised return" the GoRL paper (and the DMC literature) reports** -- no rescaling is done;
* episode end: dm_control's own time limit (``time_step.last()`` with discount 1) is reported as
  ``truncated=True`` exactly once, on the last step; an episode that dm_control ends with
  discount 0 is ``terminated=True`` (no suite task listed here ever does). No gymnasium
  ``TimeLimit`` is added (the ids are registered with ``max_episode_steps=None``), so truncation
  cannot be reported twice; ``max_episode_steps`` on the env says how long an episode is;
* seeding: ``reset(seed=s)`` seeds the env's own ``np_random`` (gymnasium's), and **every** reset
  re-seeds dm_control's task ``RandomState`` with an integer drawn from ``np_random``: the task's
  randomness (initial joint angles, targets) is a function of ``np_random`` alone;
* rendering: ``render_mode="rgb_array"`` returns ``physics.render(height, width, camera_id)``, an
  (H, W, 3) uint8 frame (headless: ``MUJOCO_GL=egl``, set by ``envs/__init__``).

Exact resume (``envs.snapshot._Snapshot``, which copies ``vars(env.unwrapped)`` arrays/scalars, the
``MjData`` arrays of ``env.unwrapped.data`` and ``np_random``): the adapter keeps all its state
where that generic snapshot looks, so ``GymVectorEnv.state_dict()`` / ``load_state_dict()``
continue a DMC episode bitwise with no change to ``envs/gym.py``:

* ``data`` is the raw ``mujoco.MjData`` of dm_control's physics (its arrays: qpos, qvel, act,
  ctrl, qacc_warmstart, time, ...);
* ``model_<field>`` attributes are writable views of the ``MjModel`` arrays that suite tasks
  re-randomise per episode (``MODEL_STATE_FIELDS``: FishSwim moves the target geom, FingerTurn the
  target site), so a restore writes them back in place;
* ``elapsed_steps`` / ``needs_reset`` are plain attributes (dm_control's step counter lives here:
  ``step`` runs dm_control's ``Environment.step`` logic itself on the task and physics);
* dm_control's task ``RandomState`` needs no snapshot: it is only used inside ``reset`` (by the
  tasks listed here) and is re-seeded from ``np_random`` at every reset;
* a restore may leave the contact/constraint-sized MjData arrays (``efc_*``, ``contact``) with
  the size of the state it overwrote (their sizes are read-only in the bindings, so a generic
  restore cannot set them). dm_control's "legacy" step relies on those position/velocity-derived
  fields being current, so ``step`` first calls ``mujoco.mj_step1``, which recomputes all of them
  from qpos/qvel/act. On an untouched trajectory that recomputation is bitwise neutral (same
  inputs, same function; tested); its cost is a few percent of a step.

Tasks whose ``before_step``/``after_step`` draw from the task ``RandomState``, or that keep Python
state between steps, are not covered by that argument; none of the registered ones does.
Never imports ``genrl`` or ``policies``; ``dm_control`` is imported lazily (only by ``DMCEnv``).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

#: gymnasium id -> (dm_control domain, task)
DMC_ENV_IDS: dict[str, tuple[str, str]] = {
    "dmc/HopperStand-v0": ("hopper", "stand"),
    "dmc/HopperHop-v0": ("hopper", "hop"),
    "dmc/CheetahRun-v0": ("cheetah", "run"),
    "dmc/WalkerWalk-v0": ("walker", "walk"),
    "dmc/FingerSpin-v0": ("finger", "spin"),
    "dmc/FingerTurnHard-v0": ("finger", "turn_hard"),
    "dmc/FishSwim-v0": ("fish", "swim"),
}

#: MjModel arrays exposed as ``model_<field>`` views so that a generic snapshot captures them
#: (the fields dm_control suite tasks write in ``initialize_episode``)
MODEL_STATE_FIELDS: tuple[str, ...] = (
    "body_pos",
    "body_quat",
    "geom_pos",
    "geom_quat",
    "geom_size",
    "geom_rgba",
    "site_pos",
    "site_quat",
    "site_size",
    "site_rgba",
    "dof_damping",
)


class DMCEnv(gym.Env):
    """One dm_control suite task behind the gymnasium API (see the module docstring).

    Args:
        domain, task: dm_control suite names, e.g. ``("hopper", "stand")``.
        render_mode: ``"rgb_array"`` or None.
        width, height: frame size of ``render()``.
        camera_id: dm_control camera (0: the task's first fixed camera; -1: the free camera).
        environment_kwargs: passed to ``suite.load`` (e.g. ``{"time_limit": 5}``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        domain: str,
        task: str,
        *,
        render_mode: str | None = None,
        width: int = 480,
        height: int = 480,
        camera_id: int = 0,
        environment_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import mujoco
        from dm_control import suite

        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.domain, self.task_name = domain, task
        self.render_mode = render_mode
        self.width, self.height, self.camera_id = int(width), int(height), int(camera_id)
        self._dm_env = suite.load(domain, task, task_kwargs={"random": 0}, environment_kwargs=environment_kwargs)
        self._physics = self._dm_env.physics
        self._task = self._dm_env.task
        control_dt = float(self._dm_env.control_timestep())
        self._n_sub_steps = int(getattr(self._dm_env, "_n_sub_steps", round(control_dt / self._physics.timestep())))
        self._step_limit = float(getattr(self._dm_env, "_step_limit", float("inf")))
        self.max_episode_steps = None if self._step_limit == float("inf") else int(np.ceil(self._step_limit))
        self.metadata = {**DMCEnv.metadata, "render_fps": int(round(1.0 / control_dt))}

        obs_spec = self._dm_env.observation_spec()
        self.obs_keys = tuple(obs_spec)
        self.obs_slices: dict[str, slice] = {}
        start = 0
        for key, spec in obs_spec.items():
            size = int(np.prod(spec.shape))
            self.obs_slices[key] = slice(start, start + size)
            start += size
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (start,), np.float32)
        act = self._dm_env.action_spec()
        self.action_space = gym.spaces.Box(
            np.asarray(act.minimum, np.float32) * np.ones(act.shape, np.float32),
            np.asarray(act.maximum, np.float32) * np.ones(act.shape, np.float32),
            act.shape,
            np.float32,
        )

        self._mj_step1 = mujoco.mj_step1
        self.data = self._physics.data.ptr  # the raw mujoco.MjData: what envs.snapshot._Snapshot copies
        model = self._physics.model.ptr
        for name in MODEL_STATE_FIELDS:
            value = getattr(model, name, None)
            if isinstance(value, np.ndarray) and value.size:
                setattr(self, f"model_{name}", value)  # a writable view: restores write in place
        self.elapsed_steps = 0
        self.needs_reset = True

    # -- gymnasium API ---------------------------------------------------------------------------
    def _flat(self, observation: dict[str, Any]) -> np.ndarray:
        return np.concatenate([np.asarray(observation[k], np.float64).ravel() for k in self.obs_keys]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        task_seed = int(self.np_random.integers(0, 2**32 - 1))
        self._task._random = np.random.RandomState(task_seed)
        time_step = self._dm_env.reset()  # reset_context: mj_resetData, initialize_episode, mj_forward
        self.elapsed_steps = 0
        self.needs_reset = False
        return self._flat(time_step.observation), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """dm_control's ``control.Environment.step``, with its step counter kept on this object."""
        if self.needs_reset:
            raise gym.error.ResetNeeded("DMCEnv.step called before reset() or after the episode ended")
        physics, task = self._physics, self._task
        self._mj_step1(physics.model.ptr, physics.data.ptr)  # re-derive pos/vel fields (restore-safe)
        task.before_step(np.asarray(action, np.float64), physics)
        physics.step(self._n_sub_steps)
        task.after_step(physics)
        reward = float(task.get_reward(physics))
        obs = self._flat(task.get_observation(physics))
        self.elapsed_steps += 1
        discount = 1.0 if self.elapsed_steps >= self._step_limit else task.get_termination(physics)
        terminated = truncated = False
        if discount is not None:
            self.needs_reset = True
            terminated = float(discount) == 0.0
            truncated = not terminated
        return obs, reward, terminated, truncated, {}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self._physics.render(height=self.height, width=self.width, camera_id=self.camera_id)

    def close(self) -> None:
        """Free the GL context that ``render()`` created (the physics itself stays usable)."""
        physics = getattr(self, "_physics", None)
        if physics is not None and getattr(physics, "_contexts", None):
            try:
                with physics._contexts_lock:
                    physics._free_rendering_contexts()
            except AttributeError:  # another dm_control layout: leave it to the garbage collector
                pass
        super().close()


def dmc_available() -> bool:
    """True when ``dm_control`` imports (the ``dmc/*`` ids are then registered)."""
    try:
        import dm_control  # noqa: F401
    except ImportError:
        return False
    return True


def register_dmc_envs() -> bool:
    """Register ``DMC_ENV_IDS`` with gymnasium if ``dm_control`` imports; returns whether it did.

    ``max_episode_steps=None``: dm_control's own time limit ends episodes (no ``TimeLimit``).
    """
    if not dmc_available():
        return False
    for env_id, (domain, task) in DMC_ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(
                id=env_id,
                entry_point="genrl_envs.dmc:DMCEnv",
                kwargs={"domain": domain, "task": task},
                max_episode_steps=None,
            )
    return True


__all__ = ["DMCEnv", "DMC_ENV_IDS", "MODEL_STATE_FIELDS", "dmc_available", "register_dmc_envs"]
