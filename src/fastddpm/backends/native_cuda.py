"""native-cuda: the CUDA fused step (fastddpm._C_cuda) on torch CUDA tensors.

_C_cuda knows no torch: this module hands it device pointers, sizes, the current torch stream and
the device index. torch is needed only because CUDA arrays arrive as torch tensors.

The scheduler's float32 [S, 8] coefficient table is uploaded once per table object and device, and
each step passes the address of its row: the kernel reads the row when it runs, so a step captured
in a CUDA graph replays correctly. The first step with a table (the upload) must not happen inside
a graph capture: warm up first, as torch.cuda.graph requires anyway.
"""
from __future__ import annotations

import importlib.util
import weakref

import numpy as np

from .. import noise as _spec
from .base import Backend

try:
    from .. import _C_cuda
    _IMPORT_ERROR = None
except ImportError as exc:  # not built (no nvcc, FASTDDPM_CUDA=0), or built for another Python
    _C_cuda, _IMPORT_ERROR = None, exc

_COEF_WIDTH = 8
_ROW_BYTES = _COEF_WIDTH * 4


def _import_reason() -> str:
    from ..info import build_info
    cuda = build_info().get("cuda") or {}
    if cuda and not cuda.get("built", False):
        return f"fastddpm._C_cuda was not built: {cuda.get('reason', 'no reason recorded')}"
    return f"fastddpm._C_cuda is not importable ({_IMPORT_ERROR}); rebuild with FASTDDPM_CUDA=1 `make build`"


class NativeCudaBackend(Backend):
    """CUDA fused step: one pass per element, Philox noise in registers, float4 loads where aligned."""

    name = "native-cuda"
    devices = ("cuda",)

    def __init__(self):
        self._reasons: list[str] | None = None
        # id(table) -> (weakref to the table, {torch.device: float32 [S, 8] CUDA tensor})
        self._tables: dict[int, tuple[weakref.ref, dict]] = {}

    # -- availability -----------------------------------------------------------------------------
    def unavailable(self) -> list[str]:
        if self._reasons is None:  # the answer cannot change within a process: work it out once
            self._reasons = self._find_reasons()
        return list(self._reasons)

    def _find_reasons(self) -> list[str]:
        reasons = []
        if _C_cuda is None:
            reasons.append(_import_reason())
        has_torch = importlib.util.find_spec("torch") is not None
        if not has_torch:
            reasons.append("torch is not installed (CUDA arrays are passed as torch tensors)")
        if _C_cuda is not None:
            count, why = _C_cuda.device_count()
            if count == 0:
                reasons.append(f"no usable CUDA device: {why}")
            elif has_torch:
                import torch
                if torch.version.cuda is None:
                    reasons.append(f"torch {torch.__version__} is a CPU-only build: it cannot make CUDA tensors")
        return reasons

    # -- the step ---------------------------------------------------------------------------------
    def _table_on(self, table: np.ndarray, device):
        """The float32 [S, 8] table on ``device``, uploaded once per table object (weakly cached)."""
        key = id(table)
        entry = self._tables.get(key)
        if entry is None or entry[0]() is not table:
            if table.ndim != 2 or table.shape[1] != _COEF_WIDTH or table.dtype != np.float32:
                raise ValueError(f"coefficient table must be float32 [S, {_COEF_WIDTH}], got {table.dtype} {table.shape}")
            if not (np.isfinite(table).all() and (table[:, 6] >= 0).all()):
                raise ValueError("coefficient table must be finite with clip range >= 0")

            def forget(ref, key=key, tables=self._tables):
                if tables.get(key, (None,))[0] is ref:  # an id reused by a newer table stays
                    tables.pop(key, None)

            entry = (weakref.ref(table, forget), {})
            self._tables[key] = entry
        on_device = entry[1].get(device)
        if on_device is None:
            import torch
            on_device = torch.tensor(np.ascontiguousarray(table), dtype=torch.float32, device=device)  # [S, 8]
            entry[1][device] = on_device
        return on_device

    def step(self, x, m, out, table, row, seed, noise_step, first_index, noise) -> None:
        # x, m, out, noise: [N, ...] float32 contiguous CUDA tensors on one device (dispatch checked)
        import torch
        device = x.device
        coef = self._table_on(table, device)  # [S, 8] float32 on device
        if not 0 <= row < coef.shape[0]:
            raise IndexError(f"coefficient row {row} out of range for a table of {coef.shape[0]} rows")
        batch = int(x.shape[0])
        per_sample = x.numel() // batch if batch else 0
        index = device.index if device.index is not None else torch.cuda.current_device()
        _C_cuda.fused_step(x.data_ptr(), m.data_ptr(), out.data_ptr(), coef.data_ptr() + row * _ROW_BYTES,
                           0 if noise is None else noise.data_ptr(), batch, per_sample, seed, noise_step,
                           first_index, torch.cuda.current_stream(device).cuda_stream, index)

    # -- noise ------------------------------------------------------------------------------------
    def noise(self, seed, shape, step, first_index=0, device="cuda"):
        """float32 CUDA tensor of ``shape`` (N, ...): noise.py's normals, made on the GPU."""
        import torch
        seed, step = _spec._check_seed(seed), _spec._check_step(step)
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"native-cuda makes noise on CUDA devices, not {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or any(s < 0 for s in shape):
            raise ValueError(f"noise shape must be (N, ...) with non-negative sizes, got {shape}")
        out = torch.empty(shape, dtype=torch.float32, device=dev)  # [N, ...]
        batch = shape[0]
        per_sample = int(np.prod(shape[1:], dtype=np.int64))
        _C_cuda.normals(out.data_ptr(), batch, per_sample, seed, step, first_index,
                        torch.cuda.current_stream(dev).cuda_stream, dev.index)
        return out

    def philox_uint32(self, seed, batch, per_sample, step, first_index=0, device="cuda"):
        """uint32 [batch, ceil(per_sample/4)*4] made on the GPU, copied back to NumPy."""
        import torch
        seed, step = _spec._check_seed(seed), _spec._check_step(step)
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        padded = -(-int(per_sample) // 4) * 4
        out = torch.empty((int(batch), padded), dtype=torch.int32, device=dev)  # uint32 bits
        _C_cuda.philox_uint32(out.data_ptr(), int(batch), int(per_sample), seed, step, first_index,
                              torch.cuda.current_stream(dev).cuda_stream, dev.index)
        return out.cpu().numpy().view(np.uint32)

    def describe(self) -> dict:
        from ..info import build_info
        count, _ = _C_cuda.device_count()
        devices = []
        for i in range(count):
            d = _C_cuda.device_info(i)
            devices.append(f"{d['name']} (sm_{d['capability'][0]}{d['capability'][1]}, "
                           f"{d['multiprocessors']} SMs, {d['memory_bytes'] / 2**30:.0f} GiB)")
        cuda = build_info().get("cuda") or {}
        return {"devices": devices, "cuda_runtime": _C_cuda.runtime_version(), "archs": cuda.get("archs")}


CUDA_BACKEND = NativeCudaBackend()
