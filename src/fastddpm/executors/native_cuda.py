"""native-cuda: the CUDA fused step (fastddpm._C_cuda) on torch CUDA tensors.

_C_cuda knows no torch: this module hands it device pointers, sizes, the current torch stream and
the device index. torch is needed only because CUDA arrays arrive as torch tensors.

The scheduler's float32 [S, COEF_WIDTH] coefficient table is uploaded once per table object and device, and
each step passes the address of its row: the kernel reads the row when it runs, so a step captured
in a CUDA graph replays correctly. The first step with a table (the upload) must not happen inside
a graph capture: warm up first, as torch.cuda.graph requires anyway.
"""
from __future__ import annotations

import importlib.util
import weakref

import numpy as np

from .. import validate
from .base import Backend, Engine, EngineLock
from .engine_options import cuda_engine_options

try:
    from .. import _C_cuda
    _IMPORT_ERROR = None
except ImportError as exc:  # not built (no nvcc, FASTDDPM_CUDA=0), or built for another Python
    _C_cuda, _IMPORT_ERROR = None, exc

from ..coefficients import CLIP as _CLIP
from ..coefficients import COEF_WIDTH as _COEF_WIDTH

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
    dtypes = ("tf32", "fp32", "bf16", "fp16")   # the first is the default

    def __init__(self):
        self._reasons: list[str] | None = None
        # id(table) -> (weakref to the table, {torch.device: float32 [S, COEF_WIDTH] CUDA tensor})
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
        """The float32 [S, COEF_WIDTH] table on ``device``, uploaded once per table object (weakly cached)."""
        key = id(table)
        entry = self._tables.get(key)
        if entry is None or entry[0]() is not table:
            if table.ndim != 2 or table.shape[1] != _COEF_WIDTH or table.dtype != np.float32:
                raise ValueError(f"coefficient table must be float32 [S, {_COEF_WIDTH}], got {table.dtype} {table.shape}")
            if not (np.isfinite(table).all() and (table[:, _CLIP] >= 0).all()):
                raise ValueError("coefficient table must be finite with clip range >= 0")

            def forget(ref, key=key, tables=self._tables):
                if tables.get(key, (None,))[0] is ref:  # an id reused by a newer table stays
                    tables.pop(key, None)

            entry = (weakref.ref(table, forget), {})
            self._tables[key] = entry
        on_device = entry[1].get(device)
        if on_device is None:
            import torch
            on_device = torch.tensor(np.ascontiguousarray(table), dtype=torch.float32, device=device)  # [S, COEF_WIDTH]
            entry[1][device] = on_device
        return on_device

    max_history = 2   # previous x0 predictions the fused step reads (h1, h2): DPM-Solver++ 2M / 3M

    def step(self, x, m, out, table, row, seed, noise_step, first_index, noise, history=None, guide=None) -> None:
        # x, m, out, noise: [N, ...] float32 contiguous CUDA tensors on one device (dispatch checked)
        # history: None or (h1, h2, x0_out): h1, h2 None or CUDA tensors shaped like x, x0_out one
        # guide: None or (m_u, w): the null-class model output (a CUDA tensor shaped like x) and the scale
        import torch
        device = x.device
        m_u, w = (None, 1.0) if guide is None else guide
        if guide is not None:
            m_u = _history_tensor("m_u", m_u, x, what="guide").contiguous()
            w = float(w)
            if not np.isfinite(w):
                raise ValueError(f"guidance must be finite, got {guide[1]!r}")
        coef = self._table_on(table, device)  # [S, COEF_WIDTH] float32 on device
        if not 0 <= row < coef.shape[0]:
            raise IndexError(f"coefficient row {row} out of range for a table of {coef.shape[0]} rows")
        batch = int(x.shape[0])
        per_sample = x.numel() // batch if batch else 0
        index = device.index if device.index is not None else torch.cuda.current_device()
        h1 = h2 = x0_out = x0_direct = None
        if history is not None:
            h1, h2, x0_out = (_history_tensor(name, h, x) for name, h in zip(("h1", "h2", "x0_out"), history))
            if h2 is not None and h1 is None:
                raise ValueError("history: h2 without h1")
            # the kernel writes x0 through a contiguous array that shares no memory with the rest;
            # anything else goes through a temporary, copied back after the step
            x0_direct = x0_out
            if x0_out is not None and (not x0_out.is_contiguous() or any(
                    _shares_memory(x0_out, a) for a in (x, m, out, noise, h1, h2, m_u) if a is not None)):
                x0_direct = torch.empty_like(x, memory_format=torch.contiguous_format)
            h1, h2 = (None if h is None else h.contiguous() for h in (h1, h2))
        _C_cuda.fused_step(x.data_ptr(), m.data_ptr(), out.data_ptr(), coef.data_ptr() + row * _ROW_BYTES,
                           0 if noise is None else noise.data_ptr(), batch, per_sample, seed, noise_step,
                           first_index, torch.cuda.current_stream(device).cuda_stream, index,
                           h1=_ptr(h1), h2=_ptr(h2), x0_out=_ptr(x0_direct), m_uncond=_ptr(m_u), guidance=w)
        if x0_direct is not None and x0_direct is not x0_out:
            x0_out.copy_(x0_direct)

    # -- noise ------------------------------------------------------------------------------------
    def noise(self, seed, shape, step, first_index=0, device="cuda"):
        """float32 CUDA tensor of ``shape`` (N, ...): philox.py's normals, made on the GPU."""
        import torch
        seed, step = validate.seed(seed), validate.noise_step(step)
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
        seed, step = validate.seed(seed), validate.noise_step(step)
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        padded = -(-int(per_sample) // 4) * 4
        out = torch.empty((int(batch), padded), dtype=torch.int32, device=dev)  # uint32 bits
        _C_cuda.philox_uint32(out.data_ptr(), int(batch), int(per_sample), seed, step, first_index,
                              torch.cuda.current_stream(dev).cuda_stream, dev.index)
        return out.cpu().numpy().view(np.uint32)

    # -- the U-Net engine -------------------------------------------------------------------------
    def loop_description(self) -> str:
        return "whole loop in the engine, a CUDA graph per step"

    def make_engine(self, config, weights, batch, height, width, options=None) -> "NativeCudaEngine":
        """The CUDA U-Net engine for one (batch, height, width): the whole loop as a CUDA graph.
        options.dtype: "tf32" (default), "fp32" (no TF32), "bf16" or "fp16" (GEMM operands; fp32
        accumulation); options.device: the GPU."""
        if options is not None:
            self.check_dtype(options.dtype)   # a bad dtype is refused before anything else
        reasons = self.engine_unavailable()
        if reasons:
            raise RuntimeError("the CUDA engine cannot run here: " + "; ".join(reasons))
        return NativeCudaEngine(config, weights, batch, height, width, options)

    def engine_unavailable(self) -> list[str]:
        """Why the CUDA engine cannot run (it needs the extension and a GPU, not torch)."""
        if _C_cuda is None:
            return [_import_reason()]
        count, why = _C_cuda.device_count()
        return [f"no usable CUDA device: {why}"] if count == 0 else []

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


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _history_tensor(name, h, x, what="history"):
    """h (None or a torch tensor) checked against the sample x: float32, x's device and shape."""
    import torch
    if h is None:
        return None
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{what} {name} must be a torch tensor like the sample, got {type(h).__name__}")
    if h.device != x.device:
        raise ValueError(f"{what} {name} is on {h.device} but sample is on {x.device}")
    if tuple(h.shape) != tuple(x.shape):
        raise ValueError(f"{what} {name} has shape {tuple(h.shape)}, expected {tuple(x.shape)} (the shape of sample)")
    if h.dtype != torch.float32:
        raise TypeError(f"{what} {name} must be torch.float32, got {h.dtype}")
    return h.detach()


def _shares_memory(a, b) -> bool:
    """True when the storage spans of tensors a and b intersect (conservative for strided views)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    lo_a, lo_b = a.data_ptr(), b.data_ptr()
    span_a = (sum((n - 1) * s for n, s in zip(a.shape, a.stride())) + 1) * a.element_size()
    span_b = (sum((n - 1) * s for n, s in zip(b.shape, b.stride())) + 1) * b.element_size()
    return lo_a < lo_b + span_b and lo_b < lo_a + span_a


class NativeCudaEngine(Engine):
    """The plan executed by fastddpm._C_cuda.Engine on one GPU.

    ``forward``: NumPy in -> NumPy out; a torch CUDA tensor in -> a torch CUDA tensor out (device
    pointers, no host copy, on torch's current stream, capturable in a CUDA graph). ``run``: one
    captured step graph replayed per step; the callback runs at chunk boundaries. Weights live on
    the device from creation; a schedule is uploaded when it differs from the last one.
    """

    default_callback_every = 50   # the GPU keeps a chunk of steps queued between host reports
    history = 2                   # multistep solvers: a device ring of 3 x0 buffers, slots picked on the GPU
    supports_conditioning = True  # the class slot uploaded per call; guided runs: graphs of their own
    model_outputs = 2             # a guided step combines the conditional and null-class outputs

    def __init__(self, config, weights, batch, height, width, options=None):
        if _C_cuda is None:
            raise RuntimeError(_import_reason())
        super().__init__(config, weights, batch, height, width, options)
        arrays = self.plan.arrays()
        self._schedule = None   # the StepSchedule whose tables are on the device
        # a run is (tables, loop): one lock over both, so that two threads sampling with different
        # schedules on this engine never run one another's tables (a callback re-entering: RuntimeError)
        self._run_lock = EngineLock("CUDA engine")
        self._engine = _C_cuda.Engine(arrays["ints"], arrays["floats"], arrays["slot_sizes"],
                                      [(n, self.weights[n]) for n in self.plan.weight_names], self.batch,
                                      self.config.in_channels, self.config.out_channels, self.height, self.width,
                                      CUDA_BACKEND.check_dtype(self.options.dtype), int(self.options.device),
                                      **cuda_engine_options())

    @property
    def dtype(self) -> str:
        """The precision the GEMMs run in (tf32 becomes fp32 on GPUs older than sm_80)."""
        return self._engine.dtype

    @property
    def device(self) -> int:
        return self._engine.device

    def _device_timesteps(self, timestep, device):
        """float32 [N] timesteps on ``device`` for the device-pointer forward. A CUDA tensor stays on
        the device (broadcast there, so the call can be captured in a CUDA graph); host values are
        copied, which a graph capture forbids (torch refuses pageable copies while capturing)."""
        import torch
        if isinstance(timestep, torch.Tensor) and timestep.is_cuda:
            if timestep.device != device:
                raise ValueError(f"timestep is on {timestep.device} but the sample is on {device}")
            if timestep.dtype.is_complex or timestep.dtype == torch.bool:
                raise TypeError(f"timestep must be a real number, got dtype {timestep.dtype}")
            if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, self.batch)):
                raise ValueError(f"timestep must be a scalar or have shape [1] or [{self.batch}], "
                                 f"got shape {tuple(timestep.shape)}")
            t = timestep.reshape(-1).to(torch.float32).expand(self.batch).contiguous()  # [N]
            if not torch.cuda.is_current_stream_capturing() and not bool(torch.isfinite(t).all()):
                raise ValueError("timestep must be finite")   # (a sync; inside a capture nothing can be read)
            return t
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("inside a CUDA graph capture, pass the timestep as a CUDA tensor (a host value "
                             "would need a host-to-device copy, which the capture cannot record)")
        return torch.from_numpy(validate.per_sample_timesteps(timestep, self.batch)).to(device)

    def forward(self, x, timestep, class_emb=None):
        if hasattr(x, "is_cuda") and x.is_cuda:
            return self._forward_device(x, timestep, self.input_shape, class_emb)
        return super().forward(x, timestep, class_emb)

    def _forward(self, x, t, class_emb=None):
        return self._engine.forward(x, t, class_emb)

    def _device_class_emb(self, class_emb, device):
        """class_emb for the device-pointer forward: None for an unconditional model, else float32
        [batch, time_embed_dim] on ``device`` (a CUDA tensor stays there; a NumPy array is checked as
        Engine.forward checks it and copied, which a graph capture forbids)."""
        import torch
        if not (isinstance(class_emb, torch.Tensor) and class_emb.is_cuda):
            if class_emb is not None and torch.cuda.is_current_stream_capturing():
                raise ValueError("inside a CUDA graph capture, pass class_emb as a CUDA tensor (a host array "
                                 "would need a host-to-device copy, which the capture cannot record)")
            class_emb = self._class_emb(class_emb)   # None / NumPy: the host checks
            return None if class_emb is None else torch.from_numpy(class_emb).to(device)
        if not self.conditional:
            raise ValueError("class_emb was given but this engine's U-Net has no class embedding")
        shape = (self.batch, self.config.time_embed_dim)
        if tuple(class_emb.shape) != shape or class_emb.dtype != torch.float32:
            raise ValueError(f"class_emb must be float32 of shape {shape}, got {class_emb.dtype} "
                             f"{tuple(class_emb.shape)}")
        if class_emb.device != device:
            raise ValueError(f"class_emb is on {class_emb.device} but the sample is on {device}")
        return class_emb.detach().contiguous()

    def _forward_device(self, x, timestep, shape, class_emb=None):
        """A torch CUDA tensor in: stays on the device, on torch's current stream (capturable)."""
        import torch
        if tuple(x.shape) != shape or x.dtype != torch.float32:
            raise ValueError(f"sample must be float32 of shape {shape}, got {x.dtype} {tuple(x.shape)}")
        if x.device.index != self.device:
            raise ValueError(f"sample is on {x.device} but this engine runs on cuda:{self.device}")
        x = x.contiguous()
        tt = self._device_timesteps(timestep, x.device)  # [N] float32 on the device
        ce = self._device_class_emb(class_emb, x.device)  # [N, D] float32 on the device, or None
        out = torch.empty((self.batch, self.config.out_channels, self.height, self.width),
                          dtype=torch.float32, device=x.device)
        self._engine.forward_ptr(x.data_ptr(), tt.data_ptr(), out.data_ptr(),
                                 torch.cuda.current_stream(x.device).cuda_stream, _ptr(ce))
        return out

    def _set_schedule(self, schedule) -> None:
        prev = self._schedule
        if prev is schedule or (prev is not None and np.array_equal(prev.table, schedule.table)
                                and np.array_equal(prev.timesteps, schedule.timesteps)
                                and np.array_equal(prev.model_t, schedule.model_t)):
            return
        frac = schedule.model_timesteps is not None   # the model's float32 times, else the timesteps'
        self._engine.set_schedule(schedule.table, schedule.timesteps, schedule.model_t if frac else None)
        self._schedule = schedule

    def _run(self, schedule, seed, first_index, keep, callback, class_emb=None, guidance=None):
        with self._run_lock:
            self._set_schedule(schedule)
            x, frames = self._engine.run(seed, first_index, keep, callback,
                                         self.callback_every if callback is not None else 0, schedule.history,
                                         class_emb, guidance, schedule.x_scale)
        return x, dict(zip(keep, frames))


CUDA_BACKEND = NativeCudaBackend()
