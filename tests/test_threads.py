"""The process-wide thread budget (threads.py, csrc/cpu/thread_pool.cpp): its arithmetic, the
threads= arguments and their errors, and results that equal the serial ones bit for bit whatever
the thread count, with calls in flight at once and with a busy process beside them."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

import fastddpm
from fastddpm import threads as budget
from fastddpm.executors import reasons

NATIVE = not reasons("native-cpu")
needs_native = pytest.mark.skipif(not NATIVE, reason="the C++ core is not built here")


@pytest.fixture
def budget_of():
    """Set the budget for a test, and put the previous one back. The pool's oversubscription
    fallback (one thread per call for a while after a stall, which a loaded test machine may
    trigger at any time) is off meanwhile, so that the counts are exact."""
    from fastddpm.executors.native import _C
    before = fastddpm.get_num_threads()
    if _C is not None:
        _C._set_solo_fallback(False)
    yield fastddpm.set_num_threads
    fastddpm.set_num_threads(before)
    if _C is not None:
        _C._set_solo_fallback(True)


def test_budget_arithmetic(budget_of):
    budget_of(3)
    assert fastddpm.get_num_threads() == 3
    assert budget.threads_in_use() == 0
    with budget.grant(None) as a:          # the whole budget
        assert a == 3 and budget.threads_in_use() == 3
        with budget.grant(2) as b:         # none free: the caller's own thread only
            assert b == 1 and budget.threads_in_use() == 4
    assert budget.threads_in_use() == 0
    with budget.grant(2) as a, budget.grant(5) as b, budget.grant(1) as c:
        assert (a, b, c) == (2, 1, 1)      # 2 of 3, then the 1 left, then at least one
    with budget.grant(7) as a:             # never more than the budget
        assert a == 3
    assert budget.threads_in_use() == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_set_num_threads_refuses(bad):
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        fastddpm.set_num_threads(bad)


@pytest.mark.parametrize("bad", [0, -2, 2.0, False, "1"])
def test_threads_arguments_refuse(bad):
    pipe = fastddpm.load("digits")
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        fastddpm.sample("digits", 1, steps=2, threads=bad)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        pipe(1, steps=2, threads=bad)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        pipe.sampler(1, steps=2, threads=bad)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        pipe.unet(np.zeros((1, 1, 16, 16), np.float32), 10, threads=bad)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        pipe.threads = bad
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        fastddpm.load("digits", threads=bad)


@needs_native
@pytest.mark.parametrize("asked,expected", [(None, 2), (1, 1), (2, 2), (5, 2)])
def test_a_run_holds_its_grant_per_step(budget_of, asked, expected):
    # the C++ loop draws its threads at every step; a progress callback runs inside the step's grant
    budget_of(2)
    seen = []
    s = fastddpm.load("digits", threads=asked).sampler(1, sampler="ddim", steps=3, backend="native-cpu")
    s(seed=0, callback=lambda k: seen.append(budget.threads_in_use()))
    assert seen == [expected] * 3
    assert budget.threads_in_use() == 0


def _reference():
    pipe = fastddpm.load("bench-small")
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32), dtype=np.float32)
    return pipe, x


BACKENDS = [pytest.param("native-cpu", marks=needs_native), "numba"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_count_changes_no_bit(backend, budget_of):
    why = reasons(backend)
    if why:
        pytest.skip("; ".join(why))
    budget_of(2)
    pipe, x = _reference()
    forwards = [pipe.unet(x, 500, backend=backend, threads=t) for t in (1, 2, None)]
    runs = [pipe(3, sampler="ddim", steps=3, seed=4, backend=backend, output="float", threads=t) for t in (1, 2)]
    for f in forwards[1:]:
        assert np.array_equal(f, forwards[0])
    assert np.array_equal(runs[0], runs[1])


def _concurrent(calls):
    out, errors = [None] * len(calls), []

    def go(i):
        try:
            out[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    ths = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert errors == []
    return out


@needs_native
def test_concurrent_requests_and_a_busy_process_change_no_bit(budget_of):
    # 4 requests at once (more than the budget: each gets what is free, at least one thread),
    # twice: on an otherwise quiet machine and with a busy process taking a core
    budget_of(2)
    pipe, x = _reference()
    digits = fastddpm.load("digits")
    calls = [lambda: pipe.unet(x, 500, backend="native-cpu"),
             lambda: pipe.unet(x[:1], 10, backend="native-cpu"),
             lambda: digits(2, sampler="ddim", steps=4, seed=1, backend="native-cpu", output="float"),
             lambda: digits(1, sampler="ddim", steps=4, seed=2, backend="native-cpu", output="float", threads=1)]
    serial = [c() for c in calls]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for _ in range(2):
            for got, want in zip(_concurrent(calls), serial):
                assert np.array_equal(got, want)
    finally:
        busy.kill()
        busy.wait()
    for got, want in zip(_concurrent(calls), serial):
        assert np.array_equal(got, want)
    assert budget.threads_in_use() == 0
