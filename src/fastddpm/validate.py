"""One validator per argument kind, used by every entry point (sample, Pipeline, Scheduler.step,
noise, the engines, the shard driver). Each returns the canonical value or raises TypeError (wrong
kind: a float where an int belongs is refused, never truncated) or ValueError (out of range).

NumPy only: the native and numba paths import this with no torch installed.
"""
from __future__ import annotations

import os

import numpy as np

INITIAL_STEP = 0xFFFFFFFF   # the noise step of the starting static x_T (csrc/include/fastddpm/philox.h)
MAX_SAMPLE_INDEX = 2**32    # sample indices are one 32-bit Philox counter word


def integer(value, what: str) -> int:
    """An int (Python or NumPy, not bool)."""
    if type(value) is int:   # the common case, first (per-step hot path)
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def fresh_seed() -> int:
    """A new 64-bit seed from the OS entropy pool (for seed=None)."""
    return int.from_bytes(os.urandom(8), "little")


def seed(value, *, fresh_if_none: bool = False) -> int:
    """A 64-bit seed; None draws a fresh one from the OS where the entry point allows it."""
    if type(value) is int and 0 <= value < 2**64:   # hot path
        return value
    if value is None and fresh_if_none:
        return fresh_seed()
    value = integer(value, "seed")
    if not 0 <= value < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {value}")
    return value


def noise_step(value) -> int:
    """A noise step: a timestep in [0, 2**32), or -1 (= INITIAL_STEP) for the initial static."""
    value = integer(value, "noise step")
    if value == -1:
        return INITIAL_STEP
    if not 0 <= value <= INITIAL_STEP:
        raise ValueError(f"noise step must be in [0, 2**32) or -1 for the initial noise, got {value}")
    return value


def first_index(value, batch: int) -> int:
    """The global index of a call's first sample: samples first_index .. first_index + batch - 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"first_index must be an int, got {type(value).__name__}")
    value = int(value)
    if value < 0 or value + batch > MAX_SAMPLE_INDEX:
        raise ValueError(f"sample indices first_index..first_index+N-1 must lie in [0, 2**32), "
                         f"got first_index={value}, N={batch}")
    return value


def count(name: str, value) -> int:
    """A count (n, batch, shard_size, threads, callback_every): an int >= 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def timestep(value) -> int:
    """A scheduler timestep: an int, or a 0-d / one-element integer array or tensor. Strings, bools
    and floats are refused: int() would silently truncate 999.5 or parse '999'."""
    if type(value) is int:   # hot path
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    dtype = getattr(value, "dtype", None)
    size = getattr(value, "numel", getattr(value, "size", None))
    size = size() if callable(size) else size
    if dtype is not None and "int" in str(dtype) and size == 1:
        return int(value.item() if hasattr(value, "item") else value)
    raise TypeError(f"timestep must be an integer (or a one-element integer array/tensor), "
                    f"got {type(value).__name__}{'' if dtype is None else ' of dtype ' + str(dtype)}")


def per_sample_timesteps(value, batch: int) -> np.ndarray:
    """A U-Net forward's timestep (a number, or a 0-d / [1] / [batch] array or torch tensor) ->
    float32 [batch]: real, finite, of a shape that broadcasts to the batch."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("timestep must be a number, not a bool")
    if hasattr(value, "detach"):   # a torch tensor (torch is not imported here)
        value = value.detach().cpu().numpy()
    t = np.asarray(value)
    if t.dtype.kind not in "iuf":
        raise TypeError(f"timestep must be a real number, got dtype {t.dtype}")
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"timestep must be a scalar or have shape [1] or [{batch}] "
                         f"(one per sample), got shape {t.shape}")
    t = np.broadcast_to(t.reshape(-1), (batch,)).astype(np.float32)   # astype: a contiguous copy
    if not np.all(np.isfinite(t)):
        raise ValueError("timestep must be finite")
    return t


def dtype(value, allowed: tuple[str, ...], default: str, where: str) -> str:
    """A compute precision among ``allowed`` (None = ``default``)."""
    if value is None:
        return default
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"dtype must be one of {allowed} on {where} (or None for {default!r}), got {value!r}"
                         + ("" if len(allowed) > 1 else "; the lower precisions (tf32, bf16, fp16) need backend='native-cuda'"))
    return value


def eta(value) -> float:
    """DDIM's eta: a finite number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"eta must be a number, got {type(value).__name__}") from None
    if not (np.isfinite(v) and v >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {value!r}")
    return v


def positions(trajectory, total: int) -> list[int]:
    """Loop positions to keep: sorted, unique, in [0, total]; negative ones count from the end
    (-1 = the finished image). 0 is the initial static, k the sample after k steps."""
    if trajectory is None:
        return []
    if isinstance(trajectory, (str, bytes)) or not hasattr(trajectory, "__iter__"):
        raise TypeError("trajectory must be a list of step indices (0 = the initial static, "
                        f"{total} = the finished image)")
    out = set()
    for k in trajectory:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"trajectory entries must be integers, got {k!r}")
        k = int(k)
        if not -(total + 1) <= k <= total:
            raise ValueError(f"trajectory step {k} is outside [0, {total}] (steps of this run)")
        out.add(k % (total + 1))
    return sorted(out)
