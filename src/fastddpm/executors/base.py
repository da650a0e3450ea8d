"""The interface every backend implements. Arrays reaching a backend are already validated."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .. import validate


class EngineLock:
    """One call at a time on an engine (its buffers are shared); a call from the thread already
    inside one (a progress callback calling back into its engine) raises instead of deadlocking,
    as the C++ engines do (fastddpm/call_lock.h)."""

    def __init__(self, engine: str):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._engine = engine

    def __enter__(self):
        if self._owner == threading.get_ident():
            raise RuntimeError(f"this {self._engine} is already running a call on this thread: a progress "
                               "callback must not call back into the engine that reports to it")
        self._lock.acquire()
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc):
        self._owner = None
        self._lock.release()


@dataclass(frozen=True)
class EngineOptions:
    """How to build an engine, beyond the model and the shape. None = the backend's default."""

    dtype: str | None = None            # compute precision (Backend.dtypes)
    device: int = 0                     # the GPU, for engines that run on one
    callback_every: int | None = None   # steps between progress callbacks (Engine.default_callback_every)


class Engine:
    """The plan of (config, batch, height, width) on one executor. The shared set-up (config,
    plan, weight checks) happens here, once; subclasses build their executor from ``self.plan``
    and ``self.weights`` and implement ``_forward`` and ``_run``.

    ``forward(x, timestep, class_emb=None)``: one U-Net forward, float32 NumPy [N, C, H, W] in and
    out (N = batch).
    ``run(schedule, *, seed, first_index, keep, callback, class_emb=None, guidance=None)``: the whole
    sampling loop as loop.py defines it; returns (x_0 float32 [n, C, H, W], {position: frame}). One
    call at a time per engine; a callback calling back into its own engine raises instead of
    deadlocking.

    Conditioning (``self.conditional``: the plan has a class embedding): ``class_emb`` float32
    [batch, time_embed_dim] (conditioning.class_embedding) is required, and refused otherwise.
    ``guidance=None``: n = batch samples, row i conditioned on class_emb[i]. ``guidance=w`` (a
    float; classifier-free guidance): n = batch // 2 samples; the U-Net runs all batch rows on
    [x, x] (the n samples twice), class_emb rows [0, n) conditional and [n, 2n) the null class, and
    the fused step reads model output m_c = rows [0, n), m_u = rows [n, 2n) and steps the n samples
    with m = m_u + w (m_c - m_u) (the step's arithmetic: step.h step_guided_output). x_T, the noise
    and first_index are those of the n samples, exactly as an unguided run of n.
    """

    default_callback_every = 1
    history = 0            # previous x0 predictions a step may read (StepSchedule.history)
    model_outputs = 1      # model outputs a step may combine (StepSchedule.model_outputs)
    supports_conditioning = False   # class embeddings and guidance (run's class_emb / guidance)

    def __init__(self, config, weights, batch: int, height: int, width: int, options: EngineOptions | None = None):
        from ..plan import build_plan
        from ..unet_config import UNetConfig, weight_shapes
        from ..weights import check_weights
        self.options = options if options is not None else EngineOptions()
        self.config = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
        self.plan = build_plan(self.config, batch, height, width)
        self.weights = check_weights(weights, weight_shapes(self.config))   # names every missing/extra/bad key
        self.batch, self.height, self.width = self.plan.batch, self.plan.height, self.plan.width
        self.conditional = self.plan.conditional
        if self.conditional and not self.supports_conditioning:
            raise NotImplementedError(f"{type(self).__name__} does not run class-conditional U-Nets yet")
        every = self.options.callback_every
        self.callback_every = validate.count("callback_every", self.default_callback_every if every is None else every)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.config.in_channels, self.height, self.width)

    def forward(self, x, timestep, class_emb=None):
        shape = self.input_shape
        if not isinstance(x, np.ndarray) or x.shape != shape:
            raise ValueError(f"sample must be a NumPy array of shape {shape}, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != np.float32:
            raise TypeError(f"sample must be float32, got {x.dtype}")
        t = validate.per_sample_timesteps(timestep, self.batch)
        self._check_times(t)
        return self._forward(np.ascontiguousarray(x), t, self._class_emb(class_emb))

    def run(self, schedule, *, seed, first_index=0, keep=(), callback=None, class_emb=None, guidance=None):
        if schedule.history > self.history or schedule.model_outputs > self.model_outputs:
            raise ValueError(f"{type(self).__name__} cannot run this schedule: it reads {schedule.history} "
                             f"previous predictions and {schedule.model_outputs} model outputs per step")
        self._check_times(schedule.model_t)
        class_emb = self._class_emb(class_emb)
        guidance = self._guidance(guidance)
        seed = validate.seed(seed)
        first_index = validate.first_index(first_index, self.samples(guidance))
        keep = validate.positions(keep, len(schedule))
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        return self._run(schedule, seed, first_index, keep, callback, class_emb, guidance)

    def _check_times(self, t: np.ndarray) -> None:
        """The model times this U-Net's time embedding takes: > 0 for "fourier" (it embeds ln t),
        integers in [0, num_train_timesteps) for "learned" (a table's rows); any for "positional"."""
        kind = self.config.time_embedding_type
        if kind == "fourier":
            bad, what = t[~(t > 0)], "timesteps > 0 (its Fourier time embedding takes ln t)"
        elif kind == "learned":
            rows = self.config.num_train_timesteps
            bad = t[~((t >= 0) & (t < rows) & (t == np.floor(t)))]
            what = (f"integer timesteps in [0, {rows}) (its learned time embedding is a table; a sampler "
                    f"with fractional model times cannot run it)")
        else:
            return
        if bad.size:
            raise ValueError(f"this U-Net takes {what}, got {float(bad[0])!r}")

    def samples(self, guidance) -> int:
        """Images a run makes: batch, or batch // 2 with guidance."""
        return self.batch if guidance is None else self.batch // 2

    def _class_emb(self, class_emb):
        if not self.conditional:
            if class_emb is not None:
                raise ValueError("class_emb was given but this engine's U-Net has no class embedding")
            return None
        shape = (self.batch, self.config.time_embed_dim)
        if class_emb is None:
            raise ValueError(f"this engine's U-Net is class-conditional: class_emb [{shape[0]}, {shape[1]}] is required")
        if not isinstance(class_emb, np.ndarray) or class_emb.shape != shape or class_emb.dtype != np.float32:
            raise ValueError(f"class_emb must be a float32 NumPy array of shape {shape}, got "
                             f"{getattr(class_emb, 'dtype', type(class_emb).__name__)} {getattr(class_emb, 'shape', '')}")
        if not np.isfinite(class_emb).all():
            raise ValueError("class_emb must be finite")
        return np.ascontiguousarray(class_emb)

    def _guidance(self, guidance):
        if guidance is None:
            return None
        if not self.conditional:
            raise ValueError("guidance needs a class-conditional U-Net")
        if self.batch % 2:
            raise ValueError(f"a guided run needs an even engine batch (n conditional + n null rows), got {self.batch}")
        w = float(guidance)
        if not np.isfinite(w):
            raise ValueError(f"guidance must be finite, got {guidance!r}")
        return w

    def _forward(self, x: np.ndarray, t: np.ndarray, class_emb: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _run(self, schedule, seed: int, first_index: int, keep: list, callback, class_emb, guidance):
        raise NotImplementedError


class Backend:
    """One executor of the fused step (and, later, of the U-Net plan).

    ``step`` receives arrays that dispatch has already checked: x, m, out (and noise, if not None)
    are float32, C-contiguous, of one shape [N, ...] and on one device (NumPy arrays for "cpu",
    torch CUDA tensors for "cuda"); ``out`` may be ``x``. ``table`` is the scheduler's float32
    [S, COEF_WIDTH] coefficient table (NumPy, read-only, finite) and ``row`` the row of this step.
    """

    name: str = "?"
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = ("fp32",)   # engine precisions; the first is the default
    max_history = 2   # previous x0 predictions its fused step can read (StepSchedule.history)

    def check_dtype(self, dtype) -> str:
        """An engine precision of this backend (None = its default)."""
        return validate.dtype(dtype, self.dtypes, self.dtypes[0], self.name)

    def loop_description(self) -> str:
        """What runs a sampling loop on this backend (for the CLI's report)."""
        return f"U-Net: torch reference; step: {self.name}"

    def make_engine(self, config, weights, batch: int, height: int, width: int,
                    options: EngineOptions | None = None) -> Engine | None:
        """The engine that runs whole loops for (config, batch, height, width), or None where this
        backend has none (then the pipeline runs the reference U-Net with this backend's step)."""
        return None

    def unavailable(self) -> list[str]:
        """Why this backend cannot run at all on this machine; [] when it can."""
        return []

    def supports(self, device: str) -> list[str]:
        """Every reason this backend cannot run a step on arrays living on ``device``."""
        reasons = list(self.unavailable())
        if device not in self.devices:
            reasons.append(f"{self.name} does not run on {device} arrays (it runs on {', '.join(self.devices)})")
        return reasons

    def step(self, x, m, out, table: np.ndarray, row: int, seed: int, noise_step: int,
             first_index: int, noise, history=None, guide=None) -> None:
        """history: None, or (h1, h2, x0_out) as dispatch.fused_step describes. guide: None, or
        (m_u, w): classifier-free guidance, the step uses m_u + w (m - m_u) for its model output
        (m_u: the null-class output, like m; w a float)."""
        raise NotImplementedError

    def noise(self, seed: int, shape: tuple, step: int, first_index: int = 0, device: str = "cpu"):
        """float32 normals of philox.py's spec (NumPy for cpu)."""
        raise NotImplementedError

    def philox_uint32(self, seed: int, batch: int, per_sample: int, step: int, first_index: int = 0) -> np.ndarray:
        """uint32 [batch, ceil(per_sample/4)*4]: the raw stream, for tests against philox.py."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Extra facts for `python -m fastddpm.info` (ISA chosen, threads, devices, ...)."""
        return {}
