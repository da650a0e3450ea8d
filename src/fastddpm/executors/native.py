"""The compiled backends: native-cpu (fastddpm._C, C++ with runtime ISA dispatch) and native-cuda
(fastddpm._C_cuda, see native_cuda.py). Either may be missing; each then says why."""
from __future__ import annotations

import os

import numpy as np

from .base import Backend, per_sample_timesteps
from .engine_options import cpu_engine_options

def _missing_reason(exc: ImportError) -> str:
    """Why fastddpm._C cannot run: the build's own record if it was not built, else the import error."""
    from ..info import build_info
    cpu = build_info().get("cpu") or {}
    if cpu.get("built") is False:
        return (f"fastddpm._C (the C++ core) was not built: {cpu.get('reason', 'no reason recorded')}; "
                "the numba backend runs instead (install the binary wheel, or rebuild with a C++17 compiler)")
    return f"fastddpm._C is not importable ({exc}); build it with `make build`"


try:
    from .. import _C
    _C_ERROR = None
except ImportError as exc:  # not built (no compiler at install time), or built for another Python
    _C, _C_ERROR = None, _missing_reason(exc)


def _threads_from_env() -> None:
    value = os.environ.get("FASTDDPM_NUM_THREADS")
    if value is None or _C is None:
        return
    try:
        n = int(value)
        if n < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"FASTDDPM_NUM_THREADS must be a positive integer, got {value!r}") from None
    _C.set_num_threads(n)


_threads_from_env()


class NativeCpuBackend(Backend):
    """C++ fused step: vectorised (AVX-512 / AVX2 / generic, chosen at run time), OpenMP, GIL released."""

    name = "native-cpu"
    devices = ("cpu",)

    def unavailable(self) -> list[str]:
        return [_C_ERROR] if _C is None else []

    def step(self, x, m, out, table, row, seed, noise_step, first_index, noise) -> None:
        # x, m, out, noise: [N, ...] float32 C-contiguous; table: float32 [S, 8], row: this step's
        _C.fused_step(x, m, out, table, seed, noise_step, first_index, noise, row)

    def noise(self, seed, shape, step, first_index=0, device="cpu"):
        shape = tuple(shape)
        batch = shape[0]
        per_sample = int(np.prod(shape[1:], dtype=np.int64))
        return _C.normals(seed, batch, per_sample, step, first_index).reshape(shape)

    def philox_uint32(self, seed, batch, per_sample, step, first_index=0):
        return _C.philox_uint32(seed, batch, per_sample, step, first_index)

    # Test and benchmark hooks: force one ISA path, set the thread count.
    def set_isa(self, name: str) -> None:
        _C.set_isa(name)

    def isa(self) -> str:
        return _C.isa()

    def supported_isas(self) -> list[str]:
        return list(_C.supported_isas())

    def set_num_threads(self, n: int) -> None:
        _C.set_num_threads(int(n))

    def describe(self) -> dict:
        return {"isa": _C.isa(), "isas_supported": list(_C.supported_isas()), "threads": _C.num_threads()}

    def make_engine(self, cfg, weights, batch: int, height: int, width: int) -> "NativeCpuEngine":
        """The C++ U-Net engine for one (batch, height, width): whole loops in one native call."""
        if _C is None:
            raise RuntimeError(_C_ERROR)
        return NativeCpuEngine(cfg, weights, batch, height, width)


class NativeCpuEngine:
    """The plan of (cfg, batch, height, width) executed by fastddpm._C.Engine.

    ``forward(x, timestep)``: one U-Net forward (float32 NumPy [N, C, H, W] in and out).
    ``run(sched, shape, *, seed, eta, first_index, keep, callback)``: the whole sampling loop
    (U-Net, fused step, Philox noise) in one call with the GIL released; returns
    (x0 [N, C, H, W] float32, {position: frame}). One call at a time runs per engine (others wait).
    """

    def __init__(self, cfg, weights, batch: int, height: int, width: int, *, callback_every: int = 1):
        from ..plan import build_plan
        from ..unet_config import UNetConfig, weight_shapes
        from ..weights import check_weights
        cfg = cfg if isinstance(cfg, UNetConfig) else UNetConfig.from_dict(cfg)
        self.config = cfg
        self.plan = build_plan(cfg, batch, height, width)
        checked = check_weights(weights, weight_shapes(cfg))   # names every missing/extra/bad key
        arrays = self.plan.arrays()
        self.batch, self.height, self.width = self.plan.batch, self.plan.height, self.plan.width
        self.callback_every = int(callback_every)
        self._engine = _C.Engine(arrays["ints"], arrays["floats"], arrays["slot_sizes"],
                                 [(n, checked[n]) for n in self.plan.weight_names], self.batch,
                                 cfg.in_channels, cfg.out_channels, self.height, self.width,
                                 **cpu_engine_options())

    def _timesteps(self, timestep) -> np.ndarray:
        return per_sample_timesteps(timestep, self.batch)   # [batch] float32

    def forward(self, x, timestep) -> np.ndarray:
        shape = (self.batch, self.config.in_channels, self.height, self.width)
        if not isinstance(x, np.ndarray) or x.shape != shape:
            raise ValueError(f"sample must be a NumPy array of shape {shape}, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != np.float32:
            raise TypeError(f"sample must be float32, got {x.dtype}")
        return self._engine.forward(np.ascontiguousarray(x), self._timesteps(timestep))

    def run(self, sched, shape, *, seed, eta=0.0, first_index=0, keep=(), callback=None):
        from ..schedulers import DDIMScheduler
        shape = tuple(int(s) for s in shape)
        want = (self.batch, self.config.in_channels, self.height, self.width)
        if shape != want:
            raise ValueError(f"this engine samples shape {want}, got {shape}")
        opts = {"eta": float(eta)} if isinstance(sched, DDIMScheduler) else {}
        coef = np.ascontiguousarray(sched.coefficients(**opts), dtype=np.float32)
        ts = np.ascontiguousarray(np.asarray(sched.timesteps), dtype=np.int64)
        keep = sorted(set(int(k) for k in keep))
        x, frames = self._engine.run(coef, ts, int(seed), int(first_index), keep, callback,
                                     self.callback_every)
        return x, dict(zip(keep, frames))


CPU_BACKEND = NativeCpuBackend()

try:
    from .native_cuda import CUDA_BACKEND
except ImportError as _exc:  # the CUDA module's own file is missing: report it, never fail the CPU side
    _CUDA_IMPORT_ERROR = f"fastddpm.executors.native_cuda failed to import: {_exc}"

    class _MissingCuda(Backend):
        name = "native-cuda"
        devices = ("cuda",)

        def unavailable(self):
            return [_CUDA_IMPORT_ERROR]

    CUDA_BACKEND = _MissingCuda()
