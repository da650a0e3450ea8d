"""Bounds on what one request may hold, checked before anything is allocated.

A server that sees arbitrary requests must not be taken down by one of them: a sampling request
whose buffers would exceed FASTDDPM_MAX_BYTES (default: half the machine's physical memory) is
refused with the sizes named, and each pipeline keeps at most FASTDDPM_ENGINE_CACHE compiled
engines (default 4, least recently used dropped first), whatever batch sizes it sees.
"""
from __future__ import annotations

import functools
import os


class ResourceLimitError(ValueError):
    """A request whose buffers would exceed FASTDDPM_MAX_BYTES; nothing was allocated."""


def _positive_int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


@functools.lru_cache(maxsize=None)   # asked on every sampling call; it does not change
def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def max_request_bytes() -> int:
    return _positive_int_env("FASTDDPM_MAX_BYTES", physical_memory_bytes() // 2)


def engine_cache_size() -> int:
    return _positive_int_env("FASTDDPM_ENGINE_CACHE", 4)


def check_request(what: str, nbytes: int) -> None:
    """ResourceLimitError if ``what`` would need more than the limit."""
    limit = max_request_bytes()
    if nbytes > limit:
        raise ResourceLimitError(f"{what} would need {nbytes / 2**30:.2f} GiB of buffers, over the limit of "
                                 f"{limit / 2**30:.2f} GiB (FASTDDPM_MAX_BYTES; default half the physical "
                                 f"memory): sample fewer images per call")
