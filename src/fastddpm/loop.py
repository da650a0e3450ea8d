"""The loop contract, defined once: what every engine's ``run`` means (C++, CUDA, numba, and the
reference-U-Net engines alike; tests/test_loop_contract.py holds every engine to it), and the one
Python implementation of it.

For a schedule of S steps (schedulers.StepSchedule), seed s and first_index f:
- x_T is the Philox noise of (s, sample f + i, INITIAL_STEP) for sample i, times the schedule's
  x_scale (float32 multiply; 1.0 for every schedule but Euler's "linspace" / "trailing");
- step k (0-based) evaluates the model at model_t[k] (float32: the integer timesteps[k], or a
  fractional schedule's model_timesteps[k]) and applies the fused step with the noise of
  (s, sample f + i, timesteps[k]) (the integer noise key);
- ``keep``: loop positions (0 = x_T, scaled, k = after k steps, S = the result) whose samples
  come back as frames: {position: float32 array [N, C, H, W]};
- ``callback(k)`` runs after step k when ``reports(k, every, S)``: every ``every`` steps and after
  the last. An exception it raises stops the loop between steps and propagates (cancel); Ctrl-C
  stops it between steps too. The engine stays usable either way.

Class conditioning and classifier-free guidance (conditioning.py; Engine.run's class_emb and
guidance):
- ``class_emb`` [rows, D] is fixed for the whole call: every U-Net evaluation adds row r to the
  time embedding of batch row r. It changes nothing above: x_T, the noise and ``first_index``
  are keyed by the samples, not by their labels.
- ``guidance = w``: a run makes n = batch // 2 samples. Everything above is that of an unguided
  run of n samples (x_T, the noise of each step, first_index, the frames and the x0 history are
  n rows). Each step evaluates the U-Net once on the 2n rows [x, x], with class_emb rows [0, n)
  (the labels) and [n, 2n) (the null class), and the fused step reads both halves of the output:
  m_c = rows [0, n), m_u = rows [n, 2n), model output m_u + w (m_c - m_u) formed in the step's
  own pass (float32, that order: step.h step_guided_output), never stored.
- ``guidance = None`` (w = 1 included: the pipeline never guides with w = 1): the unguided loop, a
  conditional one if class_emb is given; its code path and bits are those of an unconditional run.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def reports(k: int, every: int, total: int) -> bool:
    """Whether the callback runs after step k (1-based count of steps done)."""
    return k == total or k % every == 0


def run_loop(timesteps, x, forward: Callable, step: Callable, *, keep=(), callback: Callable | None = None,
             every: int = 1, model_t=None, x_scale: float = 1.0):
    """The sampling loop in Python. x: the unscaled x_T (any array type with .copy() or .clone()),
    scaled here in place by float32(x_scale) (torch tensor or NumPy array).

    forward(x, t) -> model output at time t: the int timesteps[k], or model_t[k] (float32 [S],
    a fractional schedule's) when given; step(k, t, x, m) -> the sample after step k with the
    noise of int t = timesteps[k] (the same array, updated in place, or a new one).
    Returns (x_0, {position: frame})."""
    copy = _copier(x)
    total = len(timesteps)
    if x_scale != 1.0:
        x *= float(np.float32(x_scale))   # float32 x float32: the engines' multiply
    frames = {0: copy(x)} if 0 in keep else {}
    for k, t in enumerate(int(t) for t in timesteps):
        m = forward(x, t if model_t is None else model_t[k])
        x = step(k, t, x, m)
        if k + 1 in keep:
            frames[k + 1] = copy(x)
        if callback is not None and reports(k + 1, every, total):
            callback(k + 1)
    return x, frames


def _copier(x) -> Callable:
    clone = getattr(x, "clone", None)   # a torch tensor
    return (lambda a: a.clone()) if clone is not None else (lambda a: a.copy())


class History:
    """The x0 predictions of a multistep solver's last steps, in a ring of three buffers like x:
    step k writes its x0 to one and reads the previous one or two (none before there are any)."""

    def __init__(self, depth: int, like):
        self.depth = depth
        self._ring = [empty_like(like) for _ in range(3)] if depth else []

    def for_step(self, k: int):
        """(h1, h2, x0_out) for step k, or None without history."""
        if not self.depth:
            return None
        ring = self._ring
        h1 = ring[(k - 1) % 3] if k >= 1 else None
        h2 = ring[(k - 2) % 3] if self.depth >= 2 and k >= 2 else None
        return h1, h2, ring[k % 3]


def empty_like(a):
    """An uninitialised array of a's shape and dtype: a torch tensor for a tensor, else NumPy."""
    return a.new_empty(a.shape) if hasattr(a, "new_empty") else np.empty(a.shape, dtype=a.dtype)


def schedule_loop(schedule) -> dict:
    """run_loop's keyword arguments for a StepSchedule's model times and x_T scale."""
    return {"model_t": None if schedule.model_timesteps is None else schedule.model_t, "x_scale": schedule.x_scale}


def fused_steps(backend, schedule, seed: int, first_index: int, x, guidance: float | None = None):
    """step(k, t, x, m) for run_loop: the backend's fused step in place, with the x0 ring of a
    multistep schedule (buffers like x). With ``guidance`` w, m holds 2n rows for the n rows of x
    (the conditional outputs, then the null class's) and the step is guided (module docstring)."""
    history = History(schedule.history, x)

    def step(k, t, x, m):
        hist = history.for_step(k)
        if hist is None:
            backend.step(x, m, x, schedule.table, k, seed, t, first_index, None)
        else:
            backend.step(x, m, x, schedule.table, k, seed, t, first_index, None, hist)
        return x

    if guidance is None:
        return step
    n = x.shape[0]

    def guided_step(k, t, x, m):
        backend.step(x, m[:n], x, schedule.table, k, seed, t, first_index, None, history.for_step(k),
                     guide=(m[n:], guidance))
        return x
    return guided_step
