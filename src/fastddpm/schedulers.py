"""DDPM and DDIM schedulers: diffusers' config keys, float64 tables, one fused-step row per timestep.

Every step of either sampler is the same affine map, evaluated by the fused kernel per element:

    x0     = a_x * x_t + a_m * m                       # m: the model output
    x0     = clip(x0, -r, r)        if r > 0           # clip_sample_range, 0 = no clipping
    x_prev = c_x0 * x0 + d_x * x_t + d_m * m + sigma * z

(the row's h1, h2 history weights, coefficients.py, stay 0 for these single-step samplers).
The scheduler computes the row (a_x, a_m, c_x0, d_x, d_m, sigma, r, 0, 0, 0, 0, 0) of every timestep in float64
and stores it as float32 [steps, COEF_WIDTH = 12]; the kernels only multiply and add.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._files import ModelFileError, errors_name, read_json_object
from . import validate
from .coefficients import A_M, A_X, C_X0, CLIP, COEF_COLUMNS, COEF_WIDTH, D_M, D_X, SIGMA  # noqa: F401
from .dispatch import fused_step
from .loop import empty_like

__all__ = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "CMStochasticIterativeScheduler", "COEF_WIDTH", "SchedulerConfigError",
           "StepSchedule", "SAMPLERS", "BETA_SCHEDULE_SAMPLERS",
           "scheduler_for"]


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclass(frozen=True, eq=False)
class StepSchedule:
    """Everything an engine needs to run a scheduler's loop, and nothing scheduler-specific:
    step k evaluates the model at ``timesteps[k]`` and applies row k of ``table`` in the fused
    step, drawing the noise of (seed, sample, ``timesteps[k]``).

    ``history``: previous x0 predictions a step reads (0 here; a multistep solver sets it and adds
    the columns that weigh them). ``model_outputs``: model outputs a step combines (1; classifier-
    free guidance reads 2). Engines refuse a schedule whose inputs they cannot provide."""

    timesteps: np.ndarray        # int64 [S], descending: the noise step keys (and the model's times unless below)
    table: np.ndarray            # float32 [S, COEF_WIDTH], read-only
    history: int = 0
    model_outputs: int = 1
    scheduler: Any = None        # where the rows came from (the reference sampler's formulas read it)
    options: tuple = ()          # the step options of the rows, as sorted (name, value) pairs
    # A fractional schedule (Euler with "linspace" spacing or Karras sigmas): the model's time input
    # of each step, float64 [S], read-only; None: the model sees ``timesteps``. The noise of step k
    # stays keyed by the integer ``timesteps[k]`` (schedulers.noise_keys).
    model_timesteps: np.ndarray | None = None
    # x_T = x_scale * the normals of noise step -1 (Euler's init_noise_sigma written in the model's
    # input space); 1.0 for every schedule that starts from unit normals. Engines multiply in float32.
    x_scale: float = 1.0

    def __len__(self) -> int:
        return len(self.timesteps)

    @functools.cached_property
    def model_t(self) -> np.ndarray:
        """float32 [S]: the time input the model gets at each step, rounded as diffusers rounds it
        (its scheduler holds float32 timesteps, which the U-Net's time projection reads)."""
        src = self.timesteps if self.model_timesteps is None else self.model_timesteps
        out = np.ascontiguousarray(src, dtype=np.float32)
        out.setflags(write=False)
        return out

    def position_timesteps(self, positions) -> list:
        """The timestep each loop position shows (-1 for position 0, the initial static): that of
        the step that made it, a float model time for a fractional schedule (as its scheduler's
        ``timesteps``), else an int."""
        if self.model_timesteps is not None:
            return [-1 if k == 0 else float(self.model_timesteps[k - 1]) for k in positions]
        return [-1 if k == 0 else int(self.timesteps[k - 1]) for k in positions]


class SchedulerConfigError(ValueError):
    """A scheduler config key or value that fastddpm does not know or cannot honour."""


# Far beyond any trained model (diffusers' default is 1000): the tables are O(num_train_timesteps)
# and are built when the scheduler is, so an absurd value must be refused before that.
MAX_TRAIN_TIMESTEPS = 1_000_000


# Keys diffusers writes that fastddpm accepts only at the value that changes nothing.
_INERT_KEYS = {"thresholding": False}
# Keys that only matter when an inert key is switched on; any value is harmless.
_IGNORED_KEYS = ("dynamic_thresholding_ratio", "sample_max_value")


def _betas(cfg: dict) -> np.ndarray:
    """beta_t in float64, exactly as diffusers defines each schedule (diffusers then rounds to float32)."""
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise SchedulerConfigError("trained_betas must be a non-empty 1-D list of floats")
        return betas
    b0, b1 = float(cfg["beta_start"]), float(cfg["beta_end"])
    schedule = cfg["beta_schedule"]
    if schedule == "linear":
        return np.linspace(b0, b1, n, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    if schedule == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, n))) * (b1 - b0) + b0
    raise SchedulerConfigError(f"beta_schedule={schedule!r} is not one of {BETA_SCHEDULES}")


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' rescale_zero_terminal_snr (Lin et al. 2023), in float64."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    s0, sT = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - sT) * (s0 / (s0 - sT))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def _is_float(v) -> bool:
    """A real, non-integer-typed timestep: a Python or NumPy float, or a one-element float array/tensor."""
    if isinstance(v, (float, np.floating)):
        return True
    dtype = getattr(v, "dtype", None)
    return dtype is not None and "float" in str(dtype)


def noise_keys(model_ts: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """int64 [S] noise step keys of a descending fractional schedule (float64 [S]), distinct, in
    [0, num_train_timesteps): each timestep rounded (half to even), lowered to one below the
    previous key where rounding repeats one, so every step draws its own noise. Key k is first held
    in [S-1-k, T-1-k], the keys still free for it: schedules crowded at t = 0 or at t = T - 1 (a
    uniform log-SNR one on a cosine schedule) fit too, and where the plain lowering fits, the
    window changes nothing. Integer schedules keep their own timesteps as keys (so every existing
    schedule draws the same noise as before); the keys depend on the schedule alone, so
    sample(n)[:k] == sample(k) and first_index hold as for any schedule."""
    S, T = len(model_ts), int(num_train_timesteps)
    if S > T:
        raise ValueError(f"{S} steps are too many for distinct noise steps over {T} timesteps: choose fewer steps")
    k = np.arange(S)
    keys = np.clip(np.round(model_ts).astype(np.int64), S - 1 - k, T - 1 - k)
    for i in range(1, S):
        keys[i] = min(keys[i], keys[i - 1] - 1)
    return keys


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """float64 [n], descending: Karras et al.'s sigmas (rho = 7), as diffusers' _convert_to_karras."""
    rho, ramp = 7.0, np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _finite(v) -> bool:
    """math.isfinite, and False for an int beyond float range (JSON allows 4300 digits)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _x0_eps_coefficients(prediction_type: str, abar: float) -> tuple[float, float, float, float]:
    """(a_x, a_m, b_x, b_m) with x0 = a_x x_t + a_m m and eps = b_x x_t + b_m m (unclipped x0)."""
    if prediction_type == "epsilon" and abar == 0.0:
        # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) is undefined at abar = 0 (the last timestep of a
        # rescale_betas_zero_snr schedule, where diffusers' DDPM and DDIM return inf or NaN): use
        # abar = 2**-24 here, and only here, so the row stays finite. Sample and v prediction are
        # defined at abar = 0 and use the exact table, as diffusers does.
        abar = 2.0**-24
    sa, sb = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return 1.0 / sa, -sb / sa, 0.0, 1.0
    if prediction_type == "sample":
        return 0.0, 1.0, 1.0 / sb, -sa / sb
    return sa, -sb, sb, sa  # v_prediction


class _Scheduler:
    """Shared config handling, tables and the step entry point. Subclasses define _DEFAULTS and _row."""

    _DEFAULTS: dict[str, Any] = {}
    _INERT: dict[str, Any] = {}      # a subclass's own keys accepted only at the value that changes nothing
    _IGNORED: tuple = ()             # a subclass's own keys that matter only with an inert key switched on
    history = 0                      # previous x0 predictions a step reads (StepSchedule.history)
    order = 1
    init_noise_sigma = 1.0
    x_scale = 1.0                    # StepSchedule.x_scale: x_T in the model's input space, over unit normals

    def __init__(self, **config):
        cfg = dict(self._DEFAULTS)
        inert = {**_INERT_KEYS, **self._INERT}
        for key, value in config.items():
            if key.startswith("_") or (key not in cfg and (key in _IGNORED_KEYS or key in self._IGNORED)):
                continue  # diffusers bookkeeping (_class_name, _diffusers_version) and inert knobs
            if key in inert and key not in cfg:
                want = inert[key]
                if (bool(value) != want) if isinstance(want, bool) else (value != want):
                    raise SchedulerConfigError(f"{key}={value!r} is not supported by fastddpm "
                                               f"(only {inert[key]!r})")
                continue
            if key not in cfg:
                raise SchedulerConfigError(
                    f"unknown {type(self).__name__} config key {key!r}; known keys: {sorted(cfg)}")
            cfg[key] = value
        self._validate(cfg)
        self.config = cfg
        self.num_inference_steps: int | None = None
        self._tables: dict = {}
        self._schedules: dict = {}
        self._init_noise_levels()
        self._set_timestep_array(np.arange(self.num_train_timesteps - 1, -1, -1, dtype=np.int64))

    def _init_noise_levels(self) -> None:
        """The variance-preserving tables of the beta schedule (the consistency scheduler has sigmas instead)."""
        cfg = self.config
        betas = _betas(cfg)
        if cfg["rescale_betas_zero_snr"]:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas                                  # [T] float64
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)       # [T] float64; [T-1] = 0 after a zero-SNR rescale
        self.num_train_timesteps = len(betas)

    # -- config -------------------------------------------------------------------------------
    def _validate(self, cfg: dict) -> None:
        def choice(key, allowed):
            if cfg[key] not in allowed:
                raise SchedulerConfigError(f"{key}={cfg[key]!r} is not one of {allowed}")
        choice("beta_schedule", BETA_SCHEDULES)
        choice("prediction_type", PREDICTION_TYPES)
        choice("timestep_spacing", TIMESTEP_SPACINGS)
        for key in ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr"):
            if key in cfg and not isinstance(cfg[key], (bool, np.bool_)):
                raise SchedulerConfigError(f"{key} must be true or false, got {cfg[key]!r}")
        n = cfg["num_train_timesteps"]
        if cfg["trained_betas"] is not None:
            given = cfg["trained_betas"]
            if hasattr(given, "__len__") and not isinstance(given, (str, bytes)) \
                    and len(given) > MAX_TRAIN_TIMESTEPS:
                raise SchedulerConfigError(f"trained_betas has {len(given)} entries, over the "
                                           f"limit of {MAX_TRAIN_TIMESTEPS}")
            try:
                trained = np.asarray(given, dtype=np.float64)
            except (TypeError, ValueError, OverflowError):
                trained = None
            if trained is None or trained.ndim != 1 or trained.size == 0:
                raise SchedulerConfigError("trained_betas must be a non-empty 1-D list of floats")
            cfg["num_train_timesteps"] = n = len(trained)
            source = "trained_betas"
        else:
            source = "beta_start, beta_end"
            for key in ("beta_start", "beta_end"):
                v = cfg[key]
                if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                    raise SchedulerConfigError(f"{key} must be a number, got {v!r}")
                if not (_finite(v) and 0 <= v < 1):
                    raise SchedulerConfigError(f"{key} must be a finite number in [0, 1), got {v!r}")
            if cfg["beta_start"] > cfg["beta_end"]:
                raise SchedulerConfigError(f"beta_start = {cfg['beta_start']!r} is greater than "
                                           f"beta_end = {cfg['beta_end']!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise SchedulerConfigError(f"num_train_timesteps must be a positive integer, got {n!r}")
        if n > MAX_TRAIN_TIMESTEPS:
            raise SchedulerConfigError(f"num_train_timesteps = {n} is over the limit of "
                                       f"{MAX_TRAIN_TIMESTEPS}")
        if cfg["rescale_betas_zero_snr"] and n < 2:
            raise SchedulerConfigError("rescale_betas_zero_snr needs num_train_timesteps >= 2")
        betas = _betas(cfg)
        if not (np.all(np.isfinite(betas)) and np.all(betas > 0) and np.all(betas < 1)):
            raise SchedulerConfigError(f"every beta must be finite and in (0, 1): check {source} "
                                       f"(beta_schedule={cfg['beta_schedule']!r})")
        r = cfg.get("clip_sample_range", 1.0)
        if isinstance(r, bool) or not (isinstance(r, (int, float)) and _finite(r) and r > 0):
            raise SchedulerConfigError(f"clip_sample_range must be a positive finite number, got {r!r}")
        off = cfg["steps_offset"]
        if isinstance(off, bool) or not isinstance(off, (int, np.integer)) or not 0 <= off < n:
            raise SchedulerConfigError(f"steps_offset must be an integer in [0, num_train_timesteps = "
                                       f"{n}), got {off!r}")

    @classmethod
    def from_config(cls, config: dict | str | os.PathLike, **overrides):
        """Build from a dict, a scheduler_config.json, or a directory holding one (or scheduler/ in it)."""
        if isinstance(config, dict):
            return cls(**{**config, **overrides})
        path = os.fspath(config)
        for candidate in (path, os.path.join(path, "scheduler_config.json"),
                          os.path.join(path, "scheduler", "scheduler_config.json")):
            if os.path.isfile(candidate):
                break
        else:
            raise FileNotFoundError(f"no scheduler_config.json at {path!r}")
        try:
            config = read_json_object(candidate)
        except ModelFileError as e:   # not a regular file, too large, not a JSON object
            raise SchedulerConfigError(str(e)) from None
        with errors_name(candidate, SchedulerConfigError):
            return cls(**{**config, **overrides})

    def save_config(self, directory: str | os.PathLike) -> str:
        """Write scheduler_config.json (diffusers' format) into directory; returns its path."""
        os.makedirs(directory, exist_ok=True)
        cfg = {"_class_name": type(self).__name__, **self.config}
        if cfg.get("trained_betas") is not None:
            cfg["trained_betas"] = [float(b) for b in cfg["trained_betas"]]
        path = os.path.join(os.fspath(directory), "scheduler_config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        return path

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    # -- timesteps ----------------------------------------------------------------------------
    def _spaced_timesteps(self, n: int) -> np.ndarray:
        T, spacing = self.num_train_timesteps, self.config["timestep_spacing"]
        if spacing == "linspace":
            return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        if spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64)
            return ts + int(self.config["steps_offset"])
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1   # trailing

    def _checked_timesteps(self, n) -> np.ndarray:
        """The spaced timesteps of n steps, n and the timesteps checked."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be an integer in [1, {self.num_train_timesteps}], got {n!r}")
        ts = self._spaced_timesteps(int(n))
        if ts.min() < 0 or ts.max() >= self.num_train_timesteps:
            raise ValueError(f"steps_offset={self.config['steps_offset']} puts timesteps outside "
                             f"[0, {self.num_train_timesteps}) for {n} steps")
        return ts

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        ts = self._checked_timesteps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._set_timestep_array(ts)

    def _set_timestep_array(self, ts: np.ndarray, model_ts: np.ndarray | None = None) -> None:
        """ts: int64 [S] descending, the noise step keys. model_ts: float64 [S], the model's time
        inputs where they are not ts (a fractional schedule); ``timesteps`` then shows them, as
        diffusers' (float) timesteps do, and ``step`` takes either."""
        self.noise_steps = ts                                # [S] int64, descending
        self.model_timesteps = model_ts                      # [S] float64, or None: ts
        self.timesteps = ts if model_ts is None else model_ts
        self._timestep_ints = [int(t) for t in ts]
        row_of = np.full(self.num_train_timesteps, -1, dtype=np.int64)
        row_of[ts] = np.arange(len(ts))
        self._row_of = row_of.tolist()   # a list: indexed once per step, faster than an array
        # a float timestep finds its row by value: the float64 one or diffusers' float32 rounding of it
        self._row_of_float = {}
        for i, t in enumerate(() if model_ts is None else model_ts):   # repeated times: the first row
            self._row_of_float.setdefault(float(t), i)
            self._row_of_float.setdefault(float(np.float32(t)), i)
        self._tables.clear()
        self._schedules.clear()

    def _prev_of_row(self, row: int) -> int:
        """The noise step after row's (-1 after the last); DDIM and DPM-Solver++ define their own."""
        return int(self.noise_steps[row + 1]) if row + 1 < len(self.noise_steps) else -1

    def previous_timestep(self, timestep: int) -> int:
        row = self.row_index(timestep)
        return self._prev_of_row(row)

    def row_index(self, timestep) -> int:
        """The row of the coefficient table for timestep (an int or a 0-d array); ValueError if none."""
        if self._row_of_float and _is_float(timestep):
            row = self._row_of_float.get(float(timestep), -1)
            if row < 0:
                raise ValueError(f"timestep {timestep!r} is not one of this scheduler's timesteps")
            return row
        t = validate.timestep(timestep)
        row = self._row_of[t] if 0 <= t < len(self._row_of) else -1
        if row < 0:
            raise ValueError(f"timestep {timestep!r} is not one of this scheduler's timesteps "
                             f"({len(self.timesteps)} in [0, {self.num_train_timesteps}))")
        return row

    # -- the coefficient table ------------------------------------------------------------------
    def coefficients(self, **step_options) -> np.ndarray:
        """float32 [len(timesteps), COEF_WIDTH]: the fused-step row of every timestep, in loop order."""
        key = tuple(sorted(step_options.items())) if step_options else ()
        table = self._tables.get(key)
        if table is None:
            rows = np.array([self._row(i, **step_options) for i in range(len(self.timesteps))],
                            dtype=np.float64).reshape(-1, COEF_WIDTH)
            table = np.ascontiguousarray(rows.astype(np.float32))
            table.setflags(write=False)
            self._tables[key] = table
        return table

    def schedule(self, eta: float = 0.0) -> StepSchedule:
        """This scheduler's loop as an engine runs it (cached per options; the arrays are read-only).
        ``eta``: DDIM's noise scale; the other schedulers take only its default."""
        opts = self._step_options(eta)
        key = tuple(sorted(opts.items()))
        found = self._schedules.get(key)
        if found is None:
            ts = np.array(self.noise_steps, dtype=np.int64)
            ts.setflags(write=False)
            mts = None
            if self.model_timesteps is not None:
                mts = np.array(self.model_timesteps, dtype=np.float64)
                mts.setflags(write=False)
            found = self._schedules[key] = StepSchedule(ts, self.coefficients(**opts), history=self.history,
                                                        scheduler=self, options=key, model_timesteps=mts,
                                                        x_scale=self.x_scale)
        return found

    def _step_options(self, eta) -> dict:
        """The options of this scheduler's rows, canonical (the cache key of its tables)."""
        if validate.eta(eta) != 0.0:
            raise ValueError("eta is a DDIM parameter; use sampler='ddim' (or eta=0)")
        return {}

    @classmethod
    def from_compatible_config(cls, config: dict):
        """This class from another scheduler's config: the keys it does not know are dropped."""
        return cls(**{k: v for k, v in config.items() if k in cls._DEFAULTS})

    @classmethod
    def default_steps(cls, num_train_timesteps: int) -> int:
        """Steps of a sample() call that names none."""
        return num_train_timesteps

    def coefficients_float64(self, **step_options) -> np.ndarray:
        """The same table before rounding to float32 (for the float64 reference)."""
        return np.array([self._row(i, **step_options) for i in range(len(self.timesteps))],
                        dtype=np.float64).reshape(-1, COEF_WIDTH)

    def _clip_range(self) -> float:
        return float(self.config["clip_sample_range"]) if self.config.get("clip_sample") else 0.0

    # -- step -----------------------------------------------------------------------------------
    def _step(self, model_output, timestep, sample, noise, seed, first_index, backend, out, history=None,
              row=None, **options):
        row = self.row_index(timestep) if row is None else row
        sched = self._schedules.get(()) if not options else None   # the common case without a call
        if sched is None:
            sched = self.schedule(**options)
        # the timestep of the row is the noise step (a plain int: this is the per-step hot path)
        return fused_step(sample, model_output, sched.table, row, self._timestep_ints[row], noise, seed, first_index,
                          backend, out, history)


class DDPMScheduler(_Scheduler):
    """DDPM (Ho et al. 2020) ancestral sampling; the same maths as diffusers' DDPMScheduler.step."""

    _DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, variance_type="fixed_small", clip_sample=True,
                     prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
                     steps_offset=0, rescale_betas_zero_snr=False)

    def _validate(self, cfg):
        super()._validate(cfg)
        if cfg["variance_type"] not in VARIANCE_TYPES:
            raise SchedulerConfigError(f"variance_type={cfg['variance_type']!r} is not one of {VARIANCE_TYPES}")

    def _row(self, row: int) -> list[float]:
        t = int(self.timesteps[row])
        prev = self._prev_of_row(row)
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else 1.0
        beta_prod, beta_prod_prev = 1.0 - abar, 1.0 - abar_prev
        alpha_t = abar / abar_prev
        beta_t = 1.0 - alpha_t
        a_x, a_m, _, _ = _x0_eps_coefficients(self.config["prediction_type"], abar)
        c_x0 = math.sqrt(abar_prev) * beta_t / beta_prod
        c_xt = math.sqrt(alpha_t) * beta_prod_prev / beta_prod
        if t > 0:
            variance = max(beta_prod_prev / beta_prod * beta_t, 1e-20)
            if self.config["variance_type"] == "fixed_large":
                variance = beta_t
            sigma = math.sqrt(variance)
        else:
            sigma = 0.0
        return [a_x, a_m, c_x0, c_xt, 0.0, sigma, self._clip_range(), 0.0, 0.0, 0.0, 0.0, 0.0]

    def step(self, model_output, timestep, sample, *, noise=None, seed=None, first_index=0,
             backend="auto", out=None):
        """x_{t-1} from x_t: diffusers' DDPMScheduler.step for the same config and noise.

        model_output, sample: [N, ...] float32 (NumPy or torch). Without ``noise`` the kernel draws
        the Philox noise of (seed, sample first_index + i, timestep); ``seed=None`` draws a fresh seed.
        Returns the next sample (``out`` if given; ``out`` may be ``sample`` for in place).
        """
        return self._step(model_output, timestep, sample, noise, seed, first_index, backend, out)


class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021), any eta; the same maths as diffusers' DDIMScheduler.step."""

    _DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                     prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
                     rescale_betas_zero_snr=False)

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        self._set_timestep_array(np.zeros(0, dtype=np.int64))   # diffusers: set_timesteps first

    def _step_options(self, eta) -> dict:
        return {"eta": validate.eta(eta)}

    @classmethod
    def default_steps(cls, num_train_timesteps: int) -> int:
        return min(50, num_train_timesteps)

    def _prev_of_row(self, row: int) -> int:
        # diffusers' DDIM steps back by T // n whatever the spacing
        return int(self.timesteps[row]) - self.num_train_timesteps // self.num_inference_steps

    def _row(self, row: int, eta: float = 0.0) -> list[float]:
        t = int(self.timesteps[row])
        prev = self._prev_of_row(row)
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        a_x, a_m, b_x, b_m = _x0_eps_coefficients(self.config["prediction_type"], abar)
        variance = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
        std = eta * math.sqrt(variance)
        c_eps = math.sqrt(max(1.0 - abar_prev - std**2, 0.0))
        return [a_x, a_m, math.sqrt(abar_prev), c_eps * b_x, c_eps * b_m, std, self._clip_range(), 0.0,
                0.0, 0.0, 0.0, 0.0]

    def step(self, model_output, timestep, sample, *, eta=0.0, noise=None, seed=None, first_index=0,
             backend="auto", out=None):
        """x_prev from x_t: diffusers' DDIMScheduler.step(eta=eta) for the same config and noise."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before DDIMScheduler.step")
        eta = validate.eta(eta)
        return self._step(model_output, timestep, sample, noise, seed, first_index, backend, out, eta=eta)


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver++ (Lu et al. 2022), multistep, orders 1-3, ODE (dpmsolver++) or SDE
    (sde-dpmsolver++); the same maths as diffusers' DPMSolverMultistepScheduler.step.

    Every step is affine in x_t, the model output and the two previous x0 predictions, so it is
    one fused pass: row k holds the x0 conversion (a_x, a_m), the weights of x_t (d_x), of this
    step's x0 (c_x0) and of the previous ones (h1, h2), and the noise scale of the SDE variant.
    Like diffusers' ``step`` it is stateful: the x0 predictions of the previous steps are kept
    between calls (``set_timesteps`` forgets them)."""

    _DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, solver_order=2, prediction_type="epsilon",
                     algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                     euler_at_final=False, use_karras_sigmas=False, use_lu_lambdas=False,
                     final_sigmas_type="zero", lambda_min_clipped=-math.inf, timestep_spacing="linspace",
                     steps_offset=0, rescale_betas_zero_snr=False, thresholding=False,
                     dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
    _INERT = dict(use_exponential_sigmas=False, use_beta_sigmas=False,
                  use_flow_sigmas=False, use_dynamic_shifting=False, variance_type=None)
    _IGNORED = ("flow_shift", "time_shift_type")
    ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
    SOLVER_TYPES = ("midpoint", "heun")
    FINAL_SIGMAS = ("zero", "sigma_min")

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2.0**-24   # as diffusers: the last timestep stays finite
        self.history = self.config["solver_order"] - 1
        self.order = self.config["solver_order"]
        self._sigmas = np.zeros(0)
        self._set_timestep_array(np.zeros(0, dtype=np.int64))   # diffusers: set_timesteps first
        self._x0_history: list = []
        self._step_index: int | None = None

    def _validate(self, cfg):
        super()._validate(cfg)
        def choice(key, allowed):
            if cfg[key] not in allowed:
                raise SchedulerConfigError(f"{key}={cfg[key]!r} is not one of {allowed}")
        choice("algorithm_type", self.ALGORITHMS)
        choice("solver_type", self.SOLVER_TYPES)
        choice("final_sigmas_type", self.FINAL_SIGMAS)
        order = cfg["solver_order"]
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise SchedulerConfigError(f"solver_order must be 1, 2 or 3, got {order!r}")
        for key in ("lower_order_final", "euler_at_final", "use_karras_sigmas", "use_lu_lambdas"):
            if not isinstance(cfg[key], (bool, np.bool_)):
                raise SchedulerConfigError(f"{key} must be true or false, got {cfg[key]!r}")
        if cfg["use_karras_sigmas"] and cfg["use_lu_lambdas"]:
            # diffusers takes the Karras branch and silently ignores use_lu_lambdas: refuse instead
            raise SchedulerConfigError("use_karras_sigmas and use_lu_lambdas are exclusive: set one of them")
        lam = cfg["lambda_min_clipped"]
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or math.isnan(lam):
            raise SchedulerConfigError(f"lambda_min_clipped must be a number, got {lam!r}")
        if not isinstance(cfg["thresholding"], (bool, np.bool_)):
            raise SchedulerConfigError(f"thresholding must be true or false, got {cfg['thresholding']!r}")
        if cfg["thresholding"] and cfg["sample_max_value"] != 1.0:
            # dynamic thresholding clamps x0 to [-s, s] and divides by s, s = a per-sample quantile
            # of |x0| clamped to [1, sample_max_value]: at 1.0 that is the fused clip to [-1, 1]
            raise SchedulerConfigError(f"thresholding=True is supported with sample_max_value=1.0 (a clip of x0 to "
                                       f"[-1, 1]), got sample_max_value={cfg['sample_max_value']!r}")

    @classmethod
    def default_steps(cls, num_train_timesteps: int) -> int:
        return min(20, num_train_timesteps)

    # -- timesteps and sigmas (diffusers' set_timesteps, in float64) ----------------------------
    def _all_sigmas(self) -> np.ndarray:
        return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)     # [T], by timestep

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        T, spacing = self.num_train_timesteps, self.config["timestep_spacing"]
        abar = self.alphas_cumprod
        lambda_t = np.log(np.sqrt(abar)) - np.log(np.sqrt(1.0 - abar))
        clipped = int(np.searchsorted(lambda_t[::-1], self.config["lambda_min_clipped"]))
        last = T - clipped
        if spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(self.config["steps_offset"])
        return np.arange(last, 0, -T / n).round().astype(np.int64) - 1    # trailing

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be an integer in [1, {self.num_train_timesteps}], got {n!r}")
        all_sigmas = self._all_sigmas()
        ts = self._spaced_timesteps(int(n))
        sigma_spaced = self.config["use_karras_sigmas"] or self.config["use_lu_lambdas"]
        if sigma_spaced:
            log_sigmas = np.log(all_sigmas)
            if self.config["use_karras_sigmas"]:
                sigmas = _karras_sigmas(all_sigmas[0], all_sigmas[-1], int(n))
            else:   # Lu et al.'s uniform log-SNR: log sigma = -lambda linear over the whole range
                ramp = np.linspace(0, 1, int(n))                               # [S]
                sigmas = np.exp(log_sigmas[-1] + ramp * (log_sigmas[0] - log_sigmas[-1]))
            ts = np.array([_sigma_to_t(sg, log_sigmas) for sg in sigmas])
            # as diffusers: rounded, except for the cosine schedule, whose fractional timesteps its
            # int64 timestep tensor then truncates (the model never sees a fractional DPM++ timestep)
            if self.config["beta_schedule"] != "squaredcos_cap_v2":
                ts = ts.round()
            ts = ts.astype(np.int64)
        else:
            if len(ts) and (ts.min() < 0 or ts.max() >= self.num_train_timesteps):
                raise ValueError(f"steps_offset={self.config['steps_offset']} puts timesteps outside "
                                 f"[0, {self.num_train_timesteps}) for {n} steps")
            sigmas = all_sigmas[ts]
        model_ts = None
        if len(np.unique(ts)) != len(ts):
            if not sigma_spaced:
                raise ValueError(f"{n} steps repeat a timestep with timestep_spacing="
                                 f"{self.config['timestep_spacing']!r}: choose fewer steps")
            # Karras / log-SNR sigmas are distinct where their integer timesteps repeat (diffusers
            # runs them by step index): the model sees the repeated timesteps, the noise gets distinct keys
            model_ts, ts = ts.astype(np.float64), noise_keys(ts.astype(np.float64), self.num_train_timesteps)
        last = all_sigmas[0] if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self._sigmas = np.concatenate([sigmas, [last]])                 # [S + 1] float64
        self.num_inference_steps = len(ts)
        self._set_timestep_array(ts, model_ts)
        if model_ts is not None:
            self.timesteps = model_ts.astype(np.int64)   # diffusers' int64 timesteps, repeats and all

    def _set_timestep_array(self, ts: np.ndarray, model_ts: np.ndarray | None = None) -> None:
        super()._set_timestep_array(ts, model_ts)
        self._x0_history = []
        self._step_index = None

    def _prev_of_row(self, row: int) -> int:
        return int(self.timesteps[row + 1]) if row + 1 < len(self.timesteps) else -1

    # -- rows ----------------------------------------------------------------------------------
    def _step_options(self, eta) -> dict:
        if validate.eta(eta) != 0.0:
            raise ValueError("eta is a DDIM parameter; DPM-Solver++ takes none (use sampler='ddim' for eta)")
        return {}

    def _order_of_row(self, k: int) -> int:
        """The order diffusers' step uses at step k (its lower_order_nums is min(k, solver_order))."""
        cfg, S = self.config, len(self.timesteps)
        final = k == S - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and S < 15)
                                or cfg["final_sigmas_type"] == "zero")
        second = k == S - 2 and cfg["lower_order_final"] and S < 15
        if cfg["solver_order"] == 1 or k < 1 or final:
            return 1
        if cfg["solver_order"] == 2 or k < 2 or second:
            return 2
        return 3

    def _row(self, k: int) -> list[float]:
        cfg = self.config
        sigma = self._sigmas

        def alpha_sigma(sg):   # VP (alpha_t, sigma_t) of a k-diffusion sigma
            a = 1.0 / math.sqrt(sg * sg + 1.0)
            return a, sg * a

        def lam(k):            # log-SNR lambda = log alpha - log sigma
            a, s_ = alpha_sigma(sigma[k])
            return math.log(a) - math.log(s_) if s_ > 0 else math.inf

        a_cur, s_cur = alpha_sigma(sigma[k])
        a_next, s_next = alpha_sigma(sigma[k + 1])
        a_x, a_m = {"epsilon": (1.0 / a_cur, -s_cur / a_cur), "sample": (0.0, 1.0),
                    "v_prediction": (a_cur, -s_cur)}[cfg["prediction_type"]]
        h = lam(k + 1) - lam(k)
        sde = cfg["algorithm_type"] == "sde-dpmsolver++"
        em = math.exp(-h)                       # e^{-h}; 0 when the next sigma is 0
        if sde:
            dx = s_next / s_cur * em
            c = [a_next * (1.0 - em * em)]      # the weight of D0
            noise = s_next * math.sqrt(max(1.0 - em * em, 0.0))   # h ~ 0 (a repeated final sigma): no noise, not NaN
        else:
            dx = s_next / s_cur
            c = [-a_next * (em - 1.0)]
            noise = 0.0
        order = self._order_of_row(k)
        w = [c[0], 0.0, 0.0]                    # weights of x0 of this step, the previous, the one before
        if order == 2:                          # D1 = (m0 - m1) / r0
            r0 = (lam(k) - lam(k - 1)) / h
            if cfg["solver_type"] == "midpoint":
                c1 = 0.5 * a_next * (1.0 - em * em) if sde else -0.5 * a_next * (em - 1.0)
            else:
                c1 = a_next * ((1.0 - em * em) / (-2.0 * h) + 1.0) if sde else a_next * ((em - 1.0) / h + 1.0)
            w = [w[0] + c1 / r0, -c1 / r0, 0.0]
        elif order == 3:                        # D1 and D2 from three predictions
            r0, r1 = (lam(k) - lam(k - 1)) / h, (lam(k - 1) - lam(k - 2)) / h
            if sde:
                c1 = a_next * ((1.0 - em * em) / (-2.0 * h) + 1.0)
                c2 = a_next * ((1.0 - em * em - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            else:
                c1 = a_next * ((em - 1.0) / h + 1.0)
                c2 = -a_next * ((em - 1.0 + h) / h**2 - 0.5)
            ia, ib, q, p = 1.0 / r0, 1.0 / r1, r0 / (r0 + r1), 1.0 / (r0 + r1)
            w = [w[0] + c1 * ia * (1.0 + q) + c2 * p * ia,
                 c1 * (-ia - q * (ia + ib)) - c2 * p * (ia + ib),
                 c1 * q * ib + c2 * p * ib]
        clip = 1.0 if cfg["thresholding"] else 0.0
        return [a_x, a_m, w[0], dx, 0.0, noise, clip, 0.0, w[1], w[2], 0.0, 0.0]

    # -- step (stateful, as diffusers') --------------------------------------------------------
    def _next_row(self, timestep) -> int:
        """The row of timestep. Where Karras timesteps repeat, a timestep is a model time: the row
        due next if it is that row's, else (the first call) the first row of that value."""
        if self.model_timesteps is None:
            return self.row_index(timestep)
        value = float(timestep) if _is_float(timestep) else float(validate.timestep(timestep))
        k = self._step_index
        if k is not None and k < len(self.model_timesteps) and value == self.model_timesteps[k]:
            return k
        row = self._row_of_float.get(value, -1)
        if row < 0:
            raise ValueError(f"timestep {timestep!r} is not one of this scheduler's timesteps")
        return row

    def step(self, model_output, timestep, sample, *, noise=None, seed=None, first_index=0,
             backend="auto", out=None):
        """x_{t-1} from x_t: diffusers' DPMSolverMultistepScheduler.step for the same config and
        noise (the SDE variant's noise: ``noise``, or the Philox noise of (seed, sample, timestep)).
        Steps must come in the order of ``timesteps`` from the first one given, as in diffusers."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before DPMSolverMultistepScheduler.step")
        row = self._next_row(timestep)
        if self._step_index is None:
            self._step_index = row
        elif row != self._step_index:
            raise ValueError(f"timestep {timestep!r} is step {row} of the schedule, but step "
                             f"{self._step_index} comes next: a multistep solver runs its steps in order "
                             "(set_timesteps starts over)")
        prev = self._x0_history
        x0_out = empty_like(sample)
        history = (prev[-1] if len(prev) >= 1 else None, prev[-2] if len(prev) >= 2 else None, x0_out)
        result = self._step(model_output, timestep, sample, noise, seed, first_index, backend, out,
                            history=history, row=row)
        self._x0_history = (prev + [x0_out])[-max(self.history, 1):] if self.history else []
        self._step_index += 1
        return result


class _EulerBase(_Scheduler):
    """Shared by the Euler schedulers: diffusers' k-diffusion sigmas, run in the variance-preserving
    space the model sees. diffusers keeps sample_k = x * sqrt(sigma^2 + 1) and feeds the model
    x = scale_model_input(sample_k); fastddpm's loop keeps x itself, so each Euler update of sample_k
    becomes an affine row in x (divided by the next step's sqrt(sigma^2 + 1)).

    Every timestep spacing runs. "linspace" (diffusers' default) and Karras sigmas evaluate the
    model at fractional timesteps: ``timesteps`` holds them (float64; the model gets their float32
    rounding, as diffusers feeds it) and the noise of each step is keyed by ``noise_steps``
    (noise_keys). diffusers starts from sample_k = init_noise_sigma * normals: sigma_max for
    "linspace" and "trailing", sqrt(sigma_max^2 + 1) for "leading"; in x that is ``x_scale`` =
    init_noise_sigma / sqrt(sigma_0^2 + 1) times the normals (exactly 1 for "leading")."""

    PREDICTIONS = PREDICTION_TYPES

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2.0**-24   # as diffusers
        self._sigmas = np.zeros(0)
        self._set_timestep_array(np.zeros(0, dtype=np.int64))   # diffusers: set_timesteps first

    def _validate(self, cfg):
        super()._validate(cfg)
        if cfg["prediction_type"] not in self.PREDICTIONS:
            raise SchedulerConfigError(f"prediction_type={cfg['prediction_type']!r} is not one of {self.PREDICTIONS}")

    @classmethod
    def default_steps(cls, num_train_timesteps: int) -> int:
        return min(20, num_train_timesteps)

    def _model_timesteps(self, n: int) -> np.ndarray:
        """diffusers' Euler timesteps of n steps for the spacing, float64 [n] descending."""
        T, spacing = self.num_train_timesteps, self.config["timestep_spacing"]
        if spacing == "linspace":
            return np.linspace(0, T - 1, n)[::-1].copy()
        if spacing == "leading":
            return (np.arange(0, n) * (T // n)).round()[::-1] + float(self.config["steps_offset"])
        return np.arange(T, 0, -T / n).round() - 1.0    # trailing

    def _karras(self, sigmas: np.ndarray, n: int) -> np.ndarray:
        return sigmas   # Euler-ancestral has no Karras option

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = num_inference_steps
        T = self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {n!r}")
        ts = self._model_timesteps(int(n))
        if ts.min() < 0 or ts.max() > T - 1:
            raise ValueError(f"steps_offset={self.config['steps_offset']} puts timesteps outside "
                             f"[0, {T}) for {n} steps")
        all_sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)     # [T] float64
        sigmas = np.interp(ts, np.arange(T), all_sigmas)                            # [S] (diffusers: linear)
        karras = self._karras(sigmas, int(n))
        if karras is not sigmas:
            log_sigmas = np.log(all_sigmas)
            sigmas, ts = karras, np.array([_sigma_to_t(sg, log_sigmas) for sg in karras])
        self._sigmas = np.concatenate([sigmas, [self._final_sigma()]])   # [S + 1] float64
        init = self._sigmas.max()
        if self.config["timestep_spacing"] == "leading":
            init = math.sqrt(init * init + 1.0)
        # x_T in x = sample_k / sqrt(sigma_0^2 + 1); for "leading" the same float expression twice: 1.0
        self.init_noise_sigma = float(init)
        self.x_scale = float(init / math.sqrt(sigmas[0] * sigmas[0] + 1.0))
        self.num_inference_steps = int(n)
        if np.array_equal(ts, np.round(ts)):
            self._set_timestep_array(ts.astype(np.int64), ts)    # integer timesteps: their own noise keys
        else:
            self._set_timestep_array(noise_keys(ts, self.num_train_timesteps), ts)

    def _final_sigma(self) -> float:
        return 0.0

    def _step_options(self, eta) -> dict:
        if validate.eta(eta) != 0.0:
            raise ValueError(f"eta is a DDIM parameter; {type(self).__name__} takes none")
        return {}

    def step(self, model_output, timestep, sample, *, noise=None, seed=None, first_index=0,
             backend="auto", out=None):
        """The next x (the model's input at the next timestep) from x: diffusers' step on
        sample_k = x * sqrt(sigma^2 + 1), divided by the next sqrt(sigma^2 + 1). Euler-ancestral's
        noise: ``noise``, or the Philox noise of (seed, sample first_index + i, timestep)."""
        if self.num_inference_steps is None:
            raise ValueError(f"call set_timesteps(num_inference_steps) before {type(self).__name__}.step")
        return self._step(model_output, timestep, sample, noise, seed, first_index, backend, out)

    def _x0_row(self, sigma: float) -> tuple[float, float]:
        """(a_x, a_m): x0 from x (the model's input) and the model output."""
        c = math.sqrt(sigma * sigma + 1.0)
        return {"epsilon": (c, -sigma), "sample": (0.0, 1.0), "v_prediction": (1.0 / c, -sigma / c)}[
            self.config["prediction_type"]]

    def _row(self, k: int) -> list[float]:
        sigma, nxt = self._sigmas[k], self._sigmas[k + 1]
        target, noise = self._target(sigma, nxt)          # where the deterministic update goes, and its noise
        c, cn = math.sqrt(sigma * sigma + 1.0), math.sqrt(nxt * nxt + 1.0)
        a_x, a_m = self._x0_row(sigma)
        # sample_k' = sample_k * target / sigma + x0 * (1 - target / sigma) + noise * z; x' = sample_k' / cn
        return [a_x, a_m, (1.0 - target / sigma) / cn, c * target / (sigma * cn), 0.0, noise / cn, 0.0, 0.0,
                0.0, 0.0, 0.0, 0.0]


class EulerDiscreteScheduler(_EulerBase):
    """Euler's method on the probability-flow ODE (Karras et al. 2022); the same maths as diffusers'
    EulerDiscreteScheduler.step with s_churn = 0 (deterministic)."""

    _DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
                     rescale_betas_zero_snr=False, final_sigmas_type="zero", use_karras_sigmas=False,
                     sigma_min=None, sigma_max=None)
    # log_linear interpolation, exponential and beta sigmas and continuous timesteps are not built
    _INERT = dict(interpolation_type="linear", use_exponential_sigmas=False, use_beta_sigmas=False,
                  timestep_type="discrete")

    def _validate(self, cfg):
        super()._validate(cfg)
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise SchedulerConfigError(f"final_sigmas_type={cfg['final_sigmas_type']!r} is not one of ('zero', 'sigma_min')")
        if not isinstance(cfg["use_karras_sigmas"], (bool, np.bool_)):
            raise SchedulerConfigError(f"use_karras_sigmas must be true or false, got {cfg['use_karras_sigmas']!r}")
        for key in ("sigma_min", "sigma_max"):   # diffusers reads them only for Karras sigmas
            v = cfg[key]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v) or v <= 0):
                raise SchedulerConfigError(f"{key} must be a positive finite number or null, got {v!r}")

    def _karras(self, sigmas: np.ndarray, n: int) -> np.ndarray:
        """diffusers' _convert_to_karras (rho = 7) of the spaced sigmas (float64 [n], descending)."""
        if not self.config["use_karras_sigmas"]:
            return sigmas
        cfg = self.config
        lo = float(sigmas[-1]) if cfg["sigma_min"] is None else float(cfg["sigma_min"])
        hi = float(sigmas[0]) if cfg["sigma_max"] is None else float(cfg["sigma_max"])
        return _karras_sigmas(lo, hi, n)

    def _final_sigma(self) -> float:
        if self.config["final_sigmas_type"] == "sigma_min":
            return float(np.sqrt((1.0 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]))
        return 0.0

    def _target(self, sigma: float, nxt: float) -> tuple[float, float]:
        return nxt, 0.0


class EulerAncestralDiscreteScheduler(_EulerBase):
    """Euler's method with ancestral sampling; the same maths as diffusers'
    EulerAncestralDiscreteScheduler.step. Its noise is the Philox noise of (seed, sample, timestep)."""

    PREDICTIONS = ("epsilon", "v_prediction")   # diffusers: "sample" is not implemented
    _DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
                     rescale_betas_zero_snr=False)

    def _target(self, sigma: float, nxt: float) -> tuple[float, float]:
        up = math.sqrt(nxt * nxt * (sigma * sigma - nxt * nxt) / (sigma * sigma))
        return math.sqrt(nxt * nxt - up * up), up


class CMStochasticIterativeScheduler(_Scheduler):
    """Consistency-model sampling (Song et al. 2023, multistep Algorithm 1); the same maths as
    diffusers' CMStochasticIterativeScheduler, with its config keys.

    Step k at Karras sigma s_k denoises with the boundary-condition scalings
    x0 = c_skip(s_k) sample + c_out(s_k) m (clipped to [-1, 1] with clip_denoised) and, except at
    the last step, adds noise back to s_{k+1}: sample' = x0 + s_noise sqrt(s_{k+1}^2 - sigma_min^2) z.
    diffusers feeds the model sample / sqrt(s_k^2 + sigma_data^2) (scale_model_input) at the time
    250 ln(s_k); as fastddpm's Euler, the loop here keeps that model input x itself, so every update
    is an affine row in x divided by the next sqrt(s^2 + sigma_data^2), and ``step`` maps x to the
    next x (the last step returns the sample itself). x_T = ``x_scale`` normals, x_scale =
    sigma_max / sqrt(s_0^2 + sigma_data^2) (diffusers' init_noise_sigma = sigma_max in x).

    Timesteps: ``set_timesteps(n)`` or ``set_timesteps(timesteps=[22, 0])`` (indices of the
    num_train_timesteps-point Karras discretisation, descending), as diffusers. ``timesteps`` then
    holds the model's float times 250 ln(s_k); the noise of step k is keyed by the integer
    num_train_timesteps - 1 - (its ramp index), distinct and descending."""

    _DEFAULTS = dict(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, s_noise=1.0, rho=7.0,
                     clip_denoised=True)

    def __init__(self, **config):
        super().__init__(**config)
        self._sigmas = np.zeros(0)
        self._set_timestep_array(np.zeros(0, dtype=np.int64))   # diffusers: set_timesteps first

    def _validate(self, cfg):
        n = cfg["num_train_timesteps"]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 2 <= n <= MAX_TRAIN_TIMESTEPS:
            raise SchedulerConfigError(f"num_train_timesteps must be an integer in [2, {MAX_TRAIN_TIMESTEPS}], got {n!r}")
        for key, low in (("sigma_min", 0.0), ("sigma_max", 0.0), ("sigma_data", 0.0), ("rho", 0.0), ("s_noise", None)):
            v = cfg[key]
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not _finite(v) \
                    or (v <= low if low is not None else v < 0):
                raise SchedulerConfigError(f"{key} must be a finite number {'> 0' if low is not None else '>= 0'}, got {v!r}")
        if not cfg["sigma_min"] < cfg["sigma_max"]:
            raise SchedulerConfigError(f"sigma_min = {cfg['sigma_min']!r} must be below sigma_max = {cfg['sigma_max']!r}")
        if not isinstance(cfg["clip_denoised"], (bool, np.bool_)):
            raise SchedulerConfigError(f"clip_denoised must be true or false, got {cfg['clip_denoised']!r}")

    def _init_noise_levels(self) -> None:
        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        self.init_noise_sigma = float(self.config["sigma_max"])

    @classmethod
    def default_steps(cls, num_train_timesteps: int) -> int:
        return 1   # one network evaluation: what consistency models are for

    def _karras(self, ramp: np.ndarray) -> np.ndarray:
        """diffusers' _convert_to_karras(ramp) in float64."""
        cfg = self.config
        lo, hi = float(cfg["sigma_min"]) ** (1.0 / cfg["rho"]), float(cfg["sigma_max"]) ** (1.0 / cfg["rho"])
        return (hi + ramp * (lo - hi)) ** cfg["rho"]

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        T = self.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("exactly one of num_inference_steps and timesteps must be given")
        if timesteps is not None:
            ts = np.asarray(timesteps)
            if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
                raise ValueError(f"timesteps must be a non-empty list of integers, got {timesteps!r}")
            if np.any(np.diff(ts) >= 0):
                raise ValueError(f"timesteps must be in descending order, got {list(ts)}")
            if ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {T}), got {list(ts)}")
            ts = ts.astype(np.int64)
        else:
            n = num_inference_steps
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
                raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {n!r}")
            ts = (np.arange(0, int(n)) * (T // int(n))).round()[::-1].astype(np.int64)
        ramp_index = ts[::-1].copy()                                   # ascending: sigmas descend
        sigmas = self._karras(ramp_index / (T - 1))                    # [S] float64
        self._sigmas = np.concatenate([sigmas, [float(self.config["sigma_min"])]])
        self.num_inference_steps = len(ts)
        sd = float(self.config["sigma_data"])
        self.x_scale = float(self.config["sigma_max"]) / math.sqrt(sigmas[0] ** 2 + sd * sd)
        self._set_timestep_array(T - 1 - ramp_index, 250.0 * np.log(sigmas + 1e-44))

    def scale_model_input(self, sample, timestep=None):
        """The model's input: ``sample`` itself, since the loop state here is already what diffusers'
        scale_model_input makes of its sample (see the class docstring)."""
        return sample

    def step(self, model_output, timestep, sample, *, noise=None, seed=None, first_index=0,
             backend="auto", out=None):
        """The next x (the model's input at the next sigma) from x, or at the last step the sample.
        The noise: ``noise``, or the Philox noise of (seed, sample first_index + i, noise step)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps or timesteps) before CMStochasticIterativeScheduler.step")
        return self._step(model_output, timestep, sample, noise, seed, first_index, backend, out)

    def boundary_scalings(self, sigma: float) -> tuple[float, float]:
        """(c_skip, c_out) of diffusers' get_scalings_for_boundary_condition, float64."""
        lo, sd = float(self.config["sigma_min"]), float(self.config["sigma_data"])
        return sd * sd / ((sigma - lo) ** 2 + sd * sd), (sigma - lo) * sd / math.sqrt(sigma * sigma + sd * sd)

    def _row(self, k: int) -> list[float]:
        cfg = self.config
        sigma, nxt = self._sigmas[k], self._sigmas[k + 1]
        lo, hi, sd = float(cfg["sigma_min"]), float(cfg["sigma_max"]), float(cfg["sigma_data"])
        c_skip, c_out = self.boundary_scalings(sigma)
        last = k == len(self._sigmas) - 2
        # x = sample / r (r = sqrt(sigma^2 + sigma_data^2)); the next x divides by the next r, except
        # that the last step returns the sample; one-step sampling draws no noise (as diffusers)
        r, r_next = math.sqrt(sigma * sigma + sd * sd), 1.0 if last else math.sqrt(nxt * nxt + sd * sd)
        hat = min(max(nxt, lo), hi)
        noise = 0.0 if len(self._sigmas) == 2 else cfg["s_noise"] * math.sqrt(max(hat * hat - lo * lo, 0.0))
        clip = 1.0 if cfg["clip_denoised"] else 0.0
        return [c_skip * r, c_out, 1.0 / r_next, 0.0, 0.0, noise / r_next, clip, 0.0, 0.0, 0.0, 0.0, 0.0]


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """diffusers' _sigma_to_t: the (fractional) timestep of a sigma, by log-linear interpolation."""
    log_sigma = math.log(max(sigma, 1e-10))
    dists = log_sigma - log_sigmas
    low = int(np.clip(np.cumsum(dists >= 0).argmax(), None, len(log_sigmas) - 2))
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = float(np.clip((lo - log_sigma) / (lo - hi), 0, 1))
    return (1 - w) * low + w * (low + 1)


# The sampler names of sample(sampler=...) and the CLI, and the scheduler class each runs.
# sampler name -> (scheduler class, the options that define it, defaults when converting another
# scheduler's config). DPM-Solver++ converted from a DDPM/DDIM config takes the solver's own
# timestep spacing (diffusers' default, linspace) rather than a DDPM config's "leading", which
# starts a few-step run well below the noise level of x_T, and keeps the model's x0 clip to [-1, 1]
# (thresholding at sample_max_value 1.0 is exactly that clip): without it the first steps' x0
# predictions, divided by alpha_t ~ 0, run away. A DPM-Solver++ config keeps its own values.
def _dpm_from_others(config: dict) -> dict:
    clipped = bool(config.get("clip_sample")) and config.get("clip_sample_range", 1.0) == 1.0
    return {"timestep_spacing": "linspace", "steps_offset": 0, "thresholding": clipped}


SAMPLERS = {"ddpm": (DDPMScheduler, {}, None), "ddim": (DDIMScheduler, {}, None),
            "dpm++2m": (DPMSolverMultistepScheduler, {"solver_order": 2, "algorithm_type": "dpmsolver++"},
                        _dpm_from_others),
            "dpm++3m": (DPMSolverMultistepScheduler, {"solver_order": 3, "algorithm_type": "dpmsolver++"},
                        _dpm_from_others),
            "dpm++2m-sde": (DPMSolverMultistepScheduler, {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
                            _dpm_from_others),
            "euler": (EulerDiscreteScheduler, {}, lambda config: {"timestep_spacing": "leading"}),
            "euler-a": (EulerAncestralDiscreteScheduler, {}, lambda config: {"timestep_spacing": "leading"}),
            "cm": (CMStochasticIterativeScheduler, {}, None)}
# The samplers of a model trained with a beta schedule (every one but the consistency sampler).
BETA_SCHEDULE_SAMPLERS = tuple(name for name, (cls, _, _) in SAMPLERS.items() if cls is not CMStochasticIterativeScheduler)


def scheduler_for(sampler: str, config: dict, steps=None, source: type | None = None) -> _Scheduler:
    """A scheduler of the kind ``sampler`` names, built from a model's scheduler config (of class
    ``source``), with ``steps`` timesteps (None: the class's default, e.g. every training timestep
    for DDPM; for "cm" also a list: diffusers' explicit timesteps, e.g. [22, 0])."""
    found = SAMPLERS.get(sampler) if isinstance(sampler, str) else None
    if found is None:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
    cls, defining, converting = found
    # a consistency model's sigmas and a variance-preserving beta schedule are different models:
    # neither kind of sampler runs the other's (from_compatible_config would drop every key)
    if (cls is CMStochasticIterativeScheduler) != (source is CMStochasticIterativeScheduler) and source is not None:
        if cls is CMStochasticIterativeScheduler:
            raise ValueError(f"sampler 'cm' needs a consistency model (CMStochasticIterativeScheduler); "
                             f"this model's scheduler is {source.__name__}")
        raise ValueError(f"sampler {sampler!r} runs a beta-schedule model; this is a consistency model "
                         f"(CMStochasticIterativeScheduler): use sampler='cm'")
    base = config if source is cls or converting is None else {**config, **converting(config)}
    sched = cls.from_compatible_config({**base, **defining})
    if isinstance(steps, (list, tuple, np.ndarray)):   # diffusers' explicit CM timesteps, e.g. [22, 0]
        if cls is not CMStochasticIterativeScheduler:
            raise ValueError(f"explicit timesteps (steps={list(steps)!r}) are for sampler 'cm'; "
                             f"sampler {sampler!r} takes a number of steps")
        sched.set_timesteps(timesteps=list(steps))
    else:
        sched.set_timesteps(cls.default_steps(sched.num_train_timesteps) if steps is None else steps)
    return sched
