"""The compiled engines' tuning switches, read from the environment when an engine is made.

fastddpm._C.Engine and fastddpm._C_cuda.Engine take them as keyword arguments (their defaults
are the tuned behaviour); these functions turn the FASTDDPM_* variables into those arguments, so
that a variable set or changed at run time applies to the next engine made.

FASTDDPM_WINOGRAD        0 (direct convs only), 1 (F(2x2) and F(4x4), the default), 2 (F(2x2) only),
                         force (Winograd wherever a conv's shape allows, whatever the cost model says)
FASTDDPM_COMPACT_GRID    1 (default) / 0: 3x3 conv columns skip the pad columns where the width allows
FASTDDPM_SAMPLE_PARALLEL 1 (default) / 0: one sample per thread for whole multiples of the threads
FASTDDPM_CUDA_SPLITK     1 (default; also when empty) / 0: split the K of small GEMMs on the GPU
"""
from __future__ import annotations

import os

_WINOGRAD = {"0": (0, False), "1": (4, False), "2": (2, False), "force": (4, True)}


def _switch(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got '{value}'")
    return value == "1"


def cpu_engine_options() -> dict:
    """Keyword arguments of fastddpm._C.Engine from FASTDDPM_WINOGRAD, FASTDDPM_COMPACT_GRID and
    FASTDDPM_SAMPLE_PARALLEL; ValueError for a value they do not take."""
    winograd = os.environ.get("FASTDDPM_WINOGRAD", "1")
    if winograd not in _WINOGRAD:
        raise ValueError(f"FASTDDPM_WINOGRAD must be 0, 1, 2 or force, got '{winograd}'")
    max_m, force = _WINOGRAD[winograd]
    return {"winograd_max_m": max_m, "winograd_force": force,
            "compact_grid": _switch("FASTDDPM_COMPACT_GRID", True),
            "sample_parallel": _switch("FASTDDPM_SAMPLE_PARALLEL", True)}


def cuda_engine_options() -> dict:
    """Keyword arguments of fastddpm._C_cuda.Engine from FASTDDPM_CUDA_SPLITK; ValueError for a
    value it does not take."""
    value = os.environ.get("FASTDDPM_CUDA_SPLITK") or "1"   # empty counts as unset
    if value not in ("0", "1"):
        raise ValueError(f"FASTDDPM_CUDA_SPLITK must be 0 or 1, got '{value}'")
    return {"split_k": value == "1"}
