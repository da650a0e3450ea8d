"""The interface every backend implements. Arrays reaching a backend are already validated."""
from __future__ import annotations

import threading

import numpy as np


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


def per_sample_timesteps(timestep, batch: int) -> np.ndarray:
    """An engine's timestep argument (a number, or a 0-d / [1] / [batch] array or torch tensor)
    -> float32 [batch], checked: real, finite, of a shape that broadcasts to the batch."""
    if isinstance(timestep, (bool, np.bool_)):
        raise TypeError("timestep must be a number, not a bool")
    if hasattr(timestep, "detach"):  # a torch tensor (torch not imported here)
        timestep = timestep.detach().cpu().numpy()
    t = np.asarray(timestep)
    if t.dtype.kind not in "iuf":
        raise TypeError(f"timestep must be a real number, got dtype {t.dtype}")
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"timestep must be a scalar or have shape [1] or [{batch}] "
                         f"(one per sample), got shape {t.shape}")
    t = np.broadcast_to(t.reshape(-1), (batch,)).astype(np.float32)   # astype: a contiguous copy
    if not np.all(np.isfinite(t)):
        raise ValueError("timestep must be finite")
    return t


class Backend:
    """One executor of the fused step (and, later, of the U-Net plan).

    ``step`` receives arrays that dispatch has already checked: x, m, out (and noise, if not None)
    are float32, C-contiguous, of one shape [N, ...] and on one device (NumPy arrays for "cpu",
    torch CUDA tensors for "cuda"); ``out`` may be ``x``. ``table`` is the scheduler's float32
    [S, 8] coefficient table (NumPy, read-only, finite) and ``row`` the row of this step.
    """

    name: str = "?"
    devices: tuple[str, ...] = ("cpu",)

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
             first_index: int, noise) -> None:
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
