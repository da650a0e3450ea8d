"""The interface every backend implements. Arrays reaching a backend are already validated."""
from __future__ import annotations

import numpy as np


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
        """float32 normals of noise.py's spec (NumPy for cpu)."""
        raise NotImplementedError

    def philox_uint32(self, seed: int, batch: int, per_sample: int, step: int, first_index: int = 0) -> np.ndarray:
        """uint32 [batch, ceil(per_sample/4)*4]: the raw stream, for tests against noise.py."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Extra facts for `python -m fastddpm.info` (ISA chosen, threads, devices, ...)."""
        return {}
