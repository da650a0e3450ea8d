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
    # The tests check answers, not speed. torch's intra-op threads spin at every barrier, so on a
    # small machine with any other load a multi-threaded reference forward can be many times slower
    # than a one-thread one: the torch oracle runs on one thread.
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def _cuda_reasons():
    """(why the CUDA engine cannot run, why torch CUDA tensors cannot be used): None where they can.

    Engine tests need only fastddpm._C_cuda and a device; tests marked `torch_cuda` also need a
    CUDA build of torch (the pinned dev torch is a CPU build, so those skip on a machine that has
    a GPU but that torch)."""
    try:
        from fastddpm.executors import reasons
        from fastddpm.executors.native_cuda import CUDA_BACKEND
    except Exception as exc:  # noqa: BLE001
        why = f"fastddpm does not import: {exc}"
        return why, why
    engine = CUDA_BACKEND.engine_unavailable()
    full = reasons("native-cuda")
    return ("; ".join(engine) or None), ("; ".join(full) or None)


def _gpu_required() -> bool:
    """FASTDDPM_REQUIRE_GPU=1 (benchmarks/gpu_check.sh sets it): a skipped cuda test is a failure."""
    return os.environ.get("FASTDDPM_REQUIRE_GPU", "0") == "1"


def pytest_collection_modifyitems(config, items):
    engine_why, torch_why = _cuda_reasons()
    for item in items:
        if "cuda" not in item.keywords:
            continue
        why = torch_why if "torch_cuda" in item.keywords else engine_why
        if why is not None:
            item.add_marker(pytest.mark.skip(reason=f"no usable GPU: {why}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a GPU check, a cuda test that skipped for any reason (no device, a CPU-only torch, a
    missing extension, a skip inside the test) fails: a green run must mean the tests ran."""
    outcome = yield
    report = outcome.get_result()
    if _gpu_required() and report.skipped and "cuda" in item.keywords:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"FASTDDPM_REQUIRE_GPU=1 but this cuda test was skipped: {reason}"


@pytest.fixture(scope="session")
def app_server_session():
    """One web-app server (``python -m fastddpm.app`` on 127.0.0.1, a free port) for every app test,
    stopped at the end of the session; it must leave no temporary files behind. One training run
    at a time (the busy test relies on it), each ended by the server after 120 s at the most."""
    from _app_server import app_server
    with app_server("--max-runs", "1", "--max-seconds", "120", "--quiet") as s:
        yield s
    assert s.proc.returncode is not None
    assert not os.path.exists(s.temp_root), "the app server left its temporary directory behind"
