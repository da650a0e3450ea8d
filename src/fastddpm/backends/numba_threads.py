"""One guard for every numba parallel region of the process.

numba's `workqueue` threading layer (the one it falls back to without TBB or a usable OpenMP, or
when NUMBA_THREADING_LAYER=workqueue) aborts the whole process when two Python threads launch
parallel regions at once. `tbb` and `omp` are thread-safe. So every launch goes through
`parallel_region()`: it serialises launches process-wide until numba has picked its layer, and
for good once that layer turns out to be `workqueue`; on a thread-safe layer it costs nothing.
"""
from __future__ import annotations

import contextlib
import threading

_LOCK = threading.RLock()   # re-entrant: an engine's loop may launch the step kernel inside its own region
_THREAD_SAFE: bool | None = None   # None until numba has chosen its threading layer
_SAFE_LAYERS = ("tbb", "omp")


def _learn_layer() -> None:
    global _THREAD_SAFE
    try:
        import numba
        layer = numba.threading_layer()   # ValueError until a parallel region has run
    except (ImportError, ValueError):
        return
    _THREAD_SAFE = layer in _SAFE_LAYERS


@contextlib.contextmanager
def parallel_region():
    """Wrap every call of a numba parallel=True function (the GIL may be released inside)."""
    if _THREAD_SAFE:
        yield
        return
    with _LOCK:
        try:
            yield
        finally:
            if _THREAD_SAFE is None:
                _learn_layer()


def layer_is_thread_safe() -> bool | None:
    """True / False once numba has chosen its threading layer (None before the first launch)."""
    return _THREAD_SAFE
