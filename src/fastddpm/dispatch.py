"""Validate the arrays of one fused step, pick the backend, run it. Kept thin: it is on the hot path.

Accepts NumPy arrays and torch tensors (CPU or CUDA) and returns the kind it was given. Every check
happens here, before any kernel runs; the compiled entry points check again.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import executors as _backends
from . import validate

_F32 = np.dtype(np.float32)
_MAX_INDEX = validate.MAX_SAMPLE_INDEX


def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch") and hasattr(a, "is_cuda")


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"numpy {a.dtype} {a.shape}"
    if _is_torch(a):
        return f"torch {a.dtype} {tuple(a.shape)} on {a.device}"
    return type(a).__name__


def _check_numpy(name: str, a, shape) -> np.ndarray:
    if type(a) is not np.ndarray:
        if _is_torch(a):
            raise TypeError(f"{name} is a torch tensor but sample is a NumPy array; pass one kind")
        raise TypeError(f"{name} must be a NumPy array or torch tensor, got {_describe(a)}")
    if a.dtype != _F32:
        raise TypeError(f"{name} must be float32, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape} (the shape of sample)")
    return a


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def fused_step(sample, model_output, table: np.ndarray, row: int, noise_step: int, noise=None,
               seed=None, first_index=0, backend="auto", out=None, history=None, uncond_output=None,
               guidance_scale=None):
    """One sampler step over every element; see fastddpm.schedulers for the maths. history: None,
    or (h1, h2, x0_out) of a multistep solver: the previous x0 predictions (None where there is
    none yet) and the array that receives this step's x0 (the kind and shape of sample).

    Classifier-free guidance: ``uncond_output`` (the null-class model output, the kind, dtype and
    shape of model_output) and ``guidance_scale`` w, given together: the step uses the model output
    uncond + w (model_output - uncond), formed in the same pass (float32, in that order)."""
    guide = None
    if uncond_output is not None or guidance_scale is not None:
        guide = (uncond_output, _guidance_scale(uncond_output, guidance_scale))
    if type(sample) is np.ndarray:
        return _step_numpy(sample, model_output, table, row, noise_step, noise, seed, first_index, backend, out,
                           history, guide)
    if _is_torch(sample):
        return _step_torch(sample, model_output, table, row, noise_step, noise, seed, first_index, backend, out,
                           history, guide)
    raise TypeError(f"sample must be a NumPy array or a torch tensor, got {_describe(sample)}")


def _guidance_scale(uncond_output, guidance_scale) -> float:
    if uncond_output is None or guidance_scale is None:
        raise ValueError("uncond_output and guidance_scale go together: pass both for a guided step, or neither")
    if isinstance(guidance_scale, (bool, np.bool_)) or not isinstance(guidance_scale, numbers.Real):
        raise TypeError(f"guidance_scale must be a number, got {type(guidance_scale).__name__}")
    w = float(guidance_scale)
    if not np.isfinite(w):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    return w


def _step_numpy(x, m, table, row, noise_step, noise, seed, first_index, backend, out, history=None, guide=None):
    shape = x.shape
    if x.dtype != _F32:
        raise TypeError(f"sample must be float32, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("sample must have a batch dimension: shape (N, ...)")
    _check_numpy("model_output", m, shape)
    if noise is not None:
        noise = _contiguous(_check_numpy("noise", noise, shape))
        if seed is None:
            seed = 0                       # unused: the given noise replaces the kernel's
    if type(seed) is not int or not 0 <= seed < 2**64:
        seed = validate.seed(seed, fresh_if_none=True)
    if first_index or type(first_index) is not int or shape[0] >= _MAX_INDEX:
        first_index = validate.first_index(first_index, shape[0])
    be = _backends.select(backend, "cpu")
    xc = x if x.flags.c_contiguous else np.ascontiguousarray(x)
    mc = m if m.flags.c_contiguous else np.ascontiguousarray(m)
    extra = (noise,) if history is None else (noise, _numpy_history(history, shape))
    kw = {}
    if guide is not None:   # only then: a backend's step without guidance support is called as before
        guide = (_contiguous(_check_numpy("uncond_output", guide[0], shape)), guide[1])
        kw["guide"] = guide
    if out is None:
        result = np.empty(shape, dtype=_F32)
        be.step(xc, mc, result, table, row, seed, noise_step, first_index, *extra, **kw)
        return result
    _check_numpy("out", out, shape)
    out_flags = out.flags
    if not out_flags.writeable:
        raise ValueError("out is read-only")
    # in place (out is sample) is the common case and safe: each element is read before it is
    # written. Any other overlap, or a strided out, goes through a temporary.
    direct = out is xc or (out_flags.c_contiguous and _disjoint(out, xc, mc, noise))
    if direct and guide is not None and out is not xc:
        direct = not np.may_share_memory(out, guide[0])
    if direct:
        be.step(xc, mc, out, table, row, seed, noise_step, first_index, *extra, **kw)
    else:
        tmp = np.empty(shape, dtype=_F32)
        be.step(xc, mc, tmp, table, row, seed, noise_step, first_index, *extra, **kw)
        np.copyto(out, tmp)
    return out


def _numpy_history(history, shape):
    """(h1, h2, x0_out) checked: float32 arrays of the sample's shape (h1, h2 may be None;
    x0_out C-contiguous and writable)."""
    h1, h2, x0_out = history
    if h2 is not None and h1 is None:
        raise ValueError("history: h2 without h1")
    h1, h2 = (None if h is None else _contiguous(_check_numpy(name, h, shape)) for name, h in (("h1", h1), ("h2", h2)))
    _check_numpy("x0_out", x0_out, shape)
    if not (x0_out.flags.c_contiguous and x0_out.flags.writeable):
        raise ValueError("x0_out must be C-contiguous and writable")
    return h1, h2, x0_out


def _disjoint(out: np.ndarray, x: np.ndarray, m: np.ndarray, noise) -> bool:
    """True when out shares no memory with x, m or noise (None)."""
    # distinct arrays that own their memory cannot overlap: the cheap, common case (hot path)
    if out.base is None and x.base is None and m.base is None and out is not m and (
            noise is None or (noise.base is None and noise is not out)):
        return True
    return not (np.may_share_memory(out, x) or np.may_share_memory(out, m)
                or (noise is not None and np.may_share_memory(out, noise)))


def _step_torch(x, m, table, row, noise_step, noise, seed, first_index, backend, out, history=None, guide=None):
    import torch

    shape = tuple(x.shape)
    mu = None if guide is None else guide[0]
    for name, a in (("model_output", m), ("uncond_output", mu), ("noise", noise), ("out", out)):
        if a is None:
            continue
        if not _is_torch(a):
            raise TypeError(f"{name} is {_describe(a)} but sample is a torch tensor; pass one kind")
        if a.device != x.device:
            raise ValueError(f"{name} is on {a.device} but sample is on {x.device}")
        if tuple(a.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {shape} (the shape of sample)")
        if a.dtype != torch.float32:
            raise TypeError(f"{name} must be torch.float32, got {a.dtype}")
    if x.dtype != torch.float32:
        raise TypeError(f"sample must be torch.float32, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("sample must have a batch dimension: shape (N, ...)")
    if not x.is_cuda:
        # CPU tensors share memory with NumPy views: run the NumPy path on them, no copy.
        arrays = [None if a is None else a.detach().numpy() for a in (x, m, noise, out)]
        hist = None if history is None else tuple(None if h is None else h.detach().numpy() for h in history)
        result = _step_numpy(arrays[0], arrays[1], table, row, noise_step, arrays[2], seed, first_index,
                             backend, arrays[3], hist, None if guide is None else (mu.detach().numpy(), guide[1]))
        return out if out is not None else torch.from_numpy(result)
    seed = 0 if noise is not None and seed is None else validate.seed(seed, fresh_if_none=True)
    first_index = validate.first_index(first_index, shape[0])
    be = _backends.select(backend, "cuda")
    with torch.no_grad():
        xc, mc = x.detach().contiguous(), m.detach().contiguous()
        nc = None if noise is None else noise.detach().contiguous()
        extra = (nc,) if history is None else (nc, history)
        kw = {} if guide is None else {"guide": (mu.detach().contiguous(), guide[1])}
        uc = None if guide is None else kw["guide"][0]
        if out is not None and out.is_contiguous() and (out.data_ptr() == xc.data_ptr() or not any(
                _overlaps(out, a) for a in (xc, mc, nc, uc) if a is not None)):
            be.step(xc, mc, out, table, row, seed, noise_step, first_index, *extra, **kw)
            return out
        result = torch.empty(shape, dtype=torch.float32, device=x.device)
        be.step(xc, mc, result, table, row, seed, noise_step, first_index, *extra, **kw)
        if out is None:
            return result
        out.copy_(result)
        return out


def _overlaps(a, b) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * 4 and b0 < a0 + a.numel() * 4
