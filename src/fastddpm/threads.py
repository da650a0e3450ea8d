"""The process-wide thread budget: how many threads fastddpm's CPU engines compute on, all calls
together.

Each call draws min(what it asks for, what is free) from the budget when it starts (the C++ loop:
at every step, so concurrent runs rebalance as they come and go), at least one thread (its own),
and gives it back at the end. Several pipelines sampling at once thus share the cores instead of
each taking all of them. The budget defaults to the CPUs this process may use (or OMP_NUM_THREADS,
or FASTDDPM_NUM_THREADS); ``fastddpm.set_num_threads(n)`` changes it. A call asks for fewer with
``threads=`` (``sample``, ``Pipeline.__call__``, ``Pipeline.sampler``, ``Pipeline.unet``, or
``load(..., threads=)`` for a pipeline's default). The number of threads never changes a result.

One budget for every executor: the C++ core keeps it (``_C.acquire_threads``); without the core
this module keeps it, for the numba engine.
"""
from __future__ import annotations

import contextvars
import os
import threading
from contextlib import contextmanager

from . import validate

try:   # the names, not the module: `from . import _C` would make this module import the package
    from ._C import acquire_threads as _c_acquire, num_threads as _c_budget, release_threads as _c_release
    from ._C import set_num_threads as _c_set_budget, threads_in_use as _c_in_use
    _NATIVE = True
except ImportError:   # no C++ core: the numba engine runs, and the budget lives here
    _NATIVE = False

# The threads= of the call in progress on this thread (None: the whole budget). A context
# variable, not an argument through every executor: each Python thread has its own.
_REQUEST: contextvars.ContextVar = contextvars.ContextVar("fastddpm_threads", default=None)


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _PyBudget:
    """The budget where there is no C++ core (the same arithmetic as csrc/cpu/thread_pool.cpp)."""

    def __init__(self):
        self.total: int | None = None
        self.in_use = 0
        self.lock = threading.Lock()

    def budget(self) -> int:
        return self.total if self.total is not None else _cpus()

    def acquire(self, requested: int) -> int:
        with self.lock:
            total = self.budget()
            take = max(1, min(requested or total, total, total - self.in_use))
            self.in_use += take
            return take

    def release(self, n: int) -> None:
        with self.lock:
            self.in_use -= n


_PY = _PyBudget()


def set_num_threads(n: int) -> None:
    """Set the process-wide thread budget: at most ``n`` threads compute at once across every
    fastddpm call of this process (an int >= 1)."""
    n = validate.count("num_threads", n)
    if _NATIVE:
        _c_set_budget(n)
    else:
        _PY.total = n


def get_num_threads() -> int:
    """The process-wide thread budget (see ``set_num_threads``)."""
    return _c_budget() if _NATIVE else _PY.budget()


def threads_in_use() -> int:
    """Threads held by fastddpm calls in flight right now."""
    return _c_in_use() if _NATIVE else _PY.in_use


def check(threads) -> int | None:
    """A threads= argument: None (the whole budget) or an int >= 1."""
    return None if threads is None else validate.count("threads", threads)


@contextmanager
def request(threads):
    """Calls on this thread inside the block ask the budget for ``threads`` (None: all of it)."""
    token = _REQUEST.set(check(threads))
    try:
        yield
    finally:
        _REQUEST.reset(token)


def requested() -> int | None:
    """The threads= in force on this thread (None: the whole budget)."""
    return _REQUEST.get()


@contextmanager
def grant(requested_threads: int | None):
    """Draw threads from the budget for one call of an executor outside C++ (the numba engine);
    yields how many it got (>= 1)."""
    want = requested_threads or 0
    if _NATIVE:
        n = _c_acquire(want)
        release = _c_release
    else:
        n = _PY.acquire(want)
        release = _PY.release
    try:
        yield n
    finally:
        release(n)


def _from_env() -> str | None:
    """Apply FASTDDPM_NUM_THREADS; a bad value is returned as a reason (the backends report it as
    why they cannot run) instead of breaking every import."""
    value = os.environ.get("FASTDDPM_NUM_THREADS")
    if value is None:
        return None
    try:
        n = int(value)
        if n < 1:
            raise ValueError
    except ValueError:
        return f"FASTDDPM_NUM_THREADS must be a positive integer, got {value!r}"
    set_num_threads(n)
    return None


ENV_ERROR = _from_env()
