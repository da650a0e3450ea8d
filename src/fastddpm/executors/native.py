"""native-cpu: fastddpm._C, the C++ core (runtime ISA dispatch, OpenMP). When it is missing this
module still imports and says why (native_cuda.py is the CUDA side)."""
from __future__ import annotations

import os

import numpy as np

from .base import Backend, Engine
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


# FASTDDPM_NUM_THREADS sets the process-wide thread budget (threads.py) when this module loads.
from .. import threads as _threads  # noqa: E402

class NativeCpuBackend(Backend):
    """C++ fused step: vectorised (AVX-512 / AVX2 / generic, chosen at run time), OpenMP, GIL released."""

    name = "native-cpu"
    devices = ("cpu",)

    def unavailable(self) -> list[str]:
        return [_C_ERROR] if _C is None else [_threads.ENV_ERROR] if _threads.ENV_ERROR else []

    def step(self, x, m, out, table, row, seed, noise_step, first_index, noise, history=None, guide=None) -> None:
        # x, m, out, noise: [N, ...] float32 C-contiguous; table: float32 [S, COEF_WIDTH], row: this step's
        # guide: None or (m_u, w): the null-class output (like m) and the guidance scale
        if guide is not None:   # the guided overload of _C.fused_step (keyword-only m_uncond, guidance)
            h1, h2, x0_out = (None, None, None) if history is None else history
            m_u, w = guide
            _C.fused_step(x, m, out, table, seed, noise_step, first_index, noise, row, h1=h1, h2=h2,
                          x0_out=x0_out, m_uncond=m_u, guidance=float(w))
        elif history is None:
            _C.fused_step(x, m, out, table, seed, noise_step, first_index, noise, row)
        else:
            h1, h2, x0_out = history
            _C.fused_step(x, m, out, table, seed, noise_step, first_index, noise, row, h1=h1, h2=h2, x0_out=x0_out)

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

    def loop_description(self) -> str:
        return "whole loop in the engine"

    def make_engine(self, config, weights, batch, height, width, options=None) -> "NativeCpuEngine":
        """The C++ U-Net engine for one (batch, height, width): whole loops in one native call."""
        if _C is None:
            raise RuntimeError(_C_ERROR)
        return NativeCpuEngine(config, weights, batch, height, width, options)


class NativeCpuEngine(Engine):
    """The plan executed by fastddpm._C.Engine: forward and the whole loop (U-Net, fused step,
    Philox noise, a multistep solver's x0 ring, class conditioning and classifier-free guidance) in
    one native call each, the GIL released."""

    history = 2
    supports_conditioning = True
    model_outputs = 2          # a guided step combines the conditional and null-class outputs

    def __init__(self, config, weights, batch, height, width, options=None):
        super().__init__(config, weights, batch, height, width, options)
        self.dtype = CPU_BACKEND.check_dtype(self.options.dtype)
        arrays = self.plan.arrays()
        self._engine = _C.Engine(arrays["ints"], arrays["floats"], arrays["slot_sizes"],
                                 [(n, self.weights[n]) for n in self.plan.weight_names], self.batch,
                                 self.config.in_channels, self.config.out_channels, self.height, self.width,
                                 **cpu_engine_options())

    def _forward(self, x, t, class_emb=None):
        return self._engine.forward(x, t, class_emb, threads=_threads.requested() or 0)

    def _run(self, schedule, seed, first_index, keep, callback, class_emb=None, guidance=None):
        frac = schedule.model_timesteps is not None   # the model's float32 times, else the timesteps'
        x, frames = self._engine.run(schedule.table, schedule.timesteps, seed, first_index, keep, callback,
                                     self.callback_every, schedule.history, class_emb, guidance,
                                     schedule.model_t if frac else None, schedule.x_scale,
                                     threads=_threads.requested() or 0)
        return x, dict(zip(keep, frames))


CPU_BACKEND = NativeCpuBackend()
