"""The numba backend: the fused step and noise kernels (numba_cpu.py) and the U-Net engine
(numba_engine.py). Used where the compiled core is missing; no torch anywhere."""
from __future__ import annotations

from . import numba_engine
from .numba_cpu import NumbaStepBackend


class NumbaBackend(NumbaStepBackend):
    def make_engine(self, config, weights, batch, height, width, options=None):
        """The numba U-Net engine, or None without SciPy's BLAS (the pipeline then runs the
        reference U-Net with this backend's step)."""
        if not numba_engine.can_run():
            return None
        return numba_engine.NumbaEngine(config, weights, batch, height, width, options, step_backend=self)

    def loop_description(self) -> str:
        return "whole loop in the engine" if numba_engine.can_run() else super().loop_description()

    def describe(self) -> dict:
        info = super().describe()
        if info:
            info.update(numba_engine.compile_info())
        return info


BACKEND = NumbaBackend()
