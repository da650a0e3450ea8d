"""Bounded resources: requests too large for the machine are refused before any allocation, the
per-pipeline engine cache is an LRU of FASTDDPM_ENGINE_CACHE engines, and RSS stays flat over
hundreds of calls and dozens of batch sizes."""
from __future__ import annotations

import gc

import numpy as np
import pytest

import fastddpm
from fastddpm.executors import reasons
from fastddpm.limits import ResourceLimitError

NATIVE = "native-cpu" if not reasons("native-cpu") else "numba"


def _rss_mib() -> float:
    """Resident memory after a collection and, on glibc, after handing freed heap pages back (what
    stays is what is still held, not the allocator's cache of freed blocks)."""
    import ctypes
    import os
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_huge_request_is_refused_before_anything_is_allocated():
    before = _rss_mib()
    with pytest.raises(ResourceLimitError, match=r"sampling n=100000000 images of 16x16 would need [\d.]+ GiB"):
        fastddpm.sample(n=10**8, steps=2)
    assert _rss_mib() - before < 50   # nothing of the terabytes was touched
    pipe = fastddpm.load("digits")
    with pytest.raises(ResourceLimitError, match="FASTDDPM_MAX_BYTES"):
        pipe(10**7, steps=1)


def test_the_limit_is_configurable_and_checked(monkeypatch):
    pipe = fastddpm.load("digits")
    monkeypatch.setenv("FASTDDPM_MAX_BYTES", str(1 << 20))   # 1 MiB: a few images of 16x16 at most
    pipe(1, steps=1, backend=NATIVE)
    with pytest.raises(ResourceLimitError, match="over the limit of 0.00 GiB"):
        pipe(64, steps=1, backend=NATIVE)
    with pytest.raises(ResourceLimitError, match="U-Net forward of batch 64"):
        pipe.unet(np.zeros((64, 1, 16, 16), np.float32), 10, backend=NATIVE)
    monkeypatch.setenv("FASTDDPM_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="FASTDDPM_MAX_BYTES must be a positive integer"):
        pipe(1, steps=1, backend=NATIVE)


def test_the_engine_cache_is_a_bounded_lru(monkeypatch):
    monkeypatch.setenv("FASTDDPM_ENGINE_CACHE", "3")
    pipe = fastddpm.load("digits")
    for n in (1, 2, 3, 1, 4):
        pipe(n, steps=1, backend=NATIVE)
    keys = [(k[0], k[1]) for k in pipe._engines]
    assert keys == [(NATIVE, 3), (NATIVE, 1), (NATIVE, 4)]   # 1 was used again, so 2 went (FIFO: 2, 3, 4)
    monkeypatch.setenv("FASTDDPM_ENGINE_CACHE", "0")
    with pytest.raises(ValueError, match="FASTDDPM_ENGINE_CACHE must be a positive integer"):
        pipe(6, steps=1, backend=NATIVE)


@pytest.mark.slow
def test_rss_stays_flat_over_500_calls_and_50_batch_sizes():
    pipe = fastddpm.load("digits")
    for n in (1, 2):   # warm: the engines, the first-call allocations of numpy and the allocator
        pipe(n, sampler="ddim", steps=2, seed=0, backend=NATIVE)
    start = _rss_mib()
    for i in range(500):
        pipe(1 + i % 2, sampler="ddim", steps=2, seed=i, backend=NATIVE)
    after_calls = _rss_mib()
    sizes = []
    for _ in range(2):   # 50 batch sizes, twice: the LRU keeps 4 engines, evicted ones are freed
        for n in range(1, 51):
            pipe(n, sampler="ddim", steps=1, seed=n, backend=NATIVE)
        sizes.append(_rss_mib())
    print(f"{NATIVE}: RSS {start:.1f} MiB -> {after_calls:.1f} after 500 calls -> {sizes[0]:.1f} after 50 "
          f"batch sizes -> {sizes[1]:.1f} after the 50 again; {len(pipe._engines)} engines cached")
    assert len(pipe._engines) <= 4
    assert after_calls - start < 8
    assert sizes[1] - sizes[0] < 8   # the second pass over 50 sizes allocates nothing that stays
