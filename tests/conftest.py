import os

import pytest


@pytest.fixture
def sigint_handled():
    """SIGINT raises KeyboardInterrupt during the test, as in an interactive Python, even when the
    run inherited SIGINT ignored (a background job of a non-interactive shell: `make test &`)."""
    import signal
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def pytest_configure(config):
    # The tests check answers, not speed. torch's intra-op threads spin at every barrier: on a
    # 2-core machine with any other load a 2-thread reference forward was measured 17x slower than
    # a 1-thread one (4.9 s vs 0.28 s per bench-small step), so the torch oracle runs on one thread.
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def _cuda_reason():
    """Why the cuda tests cannot run here, or None if a GPU and the CUDA extension are present."""
    try:
        from fastddpm.backends import reasons
    except Exception as exc:  # noqa: BLE001
        return f"fastddpm does not import: {exc}"
    why = reasons("native-cuda")
    return "; ".join(why) if why else None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"no usable GPU: {reason}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


