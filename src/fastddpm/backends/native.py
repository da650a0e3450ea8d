"""The compiled backends: native-cpu (fastddpm._C, C++ with runtime ISA dispatch) and native-cuda
(fastddpm._C_cuda, see native_cuda.py). Either may be missing; each then says why."""
from __future__ import annotations

import os

import numpy as np

from .base import Backend

try:
    from .. import _C
    _C_ERROR = None
except ImportError as exc:  # not built, or built for another Python
    _C, _C_ERROR = None, f"fastddpm._C is not importable ({exc}); build it with `make build`"


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
        # x, m, out, noise: [N, ...] float32 C-contiguous; table[row]: 8 float32 coefficients
        _C.fused_step(x, m, out, table[row], seed, noise_step, first_index, noise)

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


CPU_BACKEND = NativeCpuBackend()

try:
    from .native_cuda import CUDA_BACKEND
except ImportError as _exc:  # the CUDA module's own file is missing: report it, never fail the CPU side
    _CUDA_IMPORT_ERROR = f"fastddpm.backends.native_cuda failed to import: {_exc}"

    class _MissingCuda(Backend):
        name = "native-cuda"
        devices = ("cuda",)

        def unavailable(self):
            return [_CUDA_IMPORT_ERROR]

    CUDA_BACKEND = _MissingCuda()
