"""One guard for every numba parallel region of the process.

numba's `workqueue` threading layer (the one it falls back to without TBB or a usable OpenMP, or
when NUMBA_THREADING_LAYER=workqueue) aborts the whole process when two Python threads launch
parallel regions at once. `tbb` and `omp` are thread-safe. So every launch goes through
`parallel_region()`: it serialises launches process-wide until numba has picked its layer, and
for good once that layer turns out to be `workqueue`; on a thread-safe layer it costs one check.
"""
from __future__ import annotations

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


class _ParallelRegion:
    """The context manager (a class, not a generator: it wraps every kernel launch)."""

    __slots__ = ("_held",)

    def __enter__(self):
        self._held = not _THREAD_SAFE
        if self._held:
            _LOCK.acquire()
        return self

    def __exit__(self, *exc):
        if self._held:
            try:
                if _THREAD_SAFE is None:
                    _learn_layer()
            finally:
                _LOCK.release()
        return False


def parallel_region() -> _ParallelRegion:
    """Wrap every call of a numba parallel=True function (the GIL may be released inside)."""
    return _ParallelRegion()
