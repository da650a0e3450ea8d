"""The fused step on each backend next to the reference step (plain torch ops + torch.randn).

Bytes per element: 3 x 4 (read x and the model output, write the result). The machine's copy
bandwidth is measured in the same run (2 x 4 bytes per element) as the ceiling: np.copyto on one
thread and torch's copy_ on the step's threads; report.py takes the faster.
Every implementation's answer is checked before it is timed; a wrong answer fails the row.
"""
import numpy as np
import pytest

import fastddpm
from fastddpm.philox import noise as noise_spec
from _stepcheck import check_step, expected_step  # benchmarks/ is on sys.path under pytest

SIZES = {"1x1x32x32": (1, 1, 32, 32), "16x3x32x32": (16, 3, 32, 32), "64x3x256x256": (64, 3, 256, 256)}
# the "torch" backend is the reference step with spec noise (float64 NumPy): far slower than torch-ref
FAST = [n for n, e in fastddpm.backends().items()
        if e["available"] and "cpu" in e.get("devices", []) and n != "torch"]


def _setup(shape):
    sched = fastddpm.DDPMScheduler(clip_sample=True)
    t = 500
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    m = rng.standard_normal(shape, dtype=np.float32)
    return sched, t, x, m




def _record(benchmark, shape, impl, baseline="torch-ref"):
    n = int(np.prod(shape))
    benchmark.group = "step " + "x".join(map(str, shape))
    benchmark.extra_info.update(kind="step", impl=impl, elements=n, bytes=12 * n, baseline=baseline)


@pytest.mark.parametrize("size", SIZES)
def test_copy_ceiling(benchmark, size):
    """np.copyto of one array (one thread): a copy-bandwidth ceiling for a streaming kernel."""
    shape = SIZES[size]
    src = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    assert np.array_equal(dst, src)
    n = int(np.prod(shape))
    benchmark.group = "step " + "x".join(map(str, shape))
    benchmark.extra_info.update(kind="copy", impl="copy (np.copyto, 1 thread)", elements=n, bytes=8 * n)
    benchmark(np.copyto, dst, src)


@pytest.mark.parametrize("size", SIZES)
def test_copy_ceiling_threads(benchmark, size):
    """torch's Tensor.copy_ on the step's thread count: it splits a large copy over the threads,
    as the step does, so it is the higher ceiling there (report.py takes the fastest copy row)."""
    torch = pytest.importorskip("torch")
    from fastddpm import _C
    prev = torch.get_num_threads()
    torch.set_num_threads(_C.num_threads())
    try:
        shape = SIZES[size]
        src = torch.from_numpy(np.random.default_rng(1).standard_normal(shape, dtype=np.float32))
        dst = torch.empty_like(src)
        dst.copy_(src)
        assert torch.equal(dst, src)
        n = int(np.prod(shape))
        benchmark.group = "step " + "x".join(map(str, shape))
        benchmark.extra_info.update(kind="copy", impl=f"copy (torch copy_, {_C.num_threads()} threads)",
                                    elements=n, bytes=8 * n)
        benchmark(dst.copy_, src)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("size", SIZES)
def test_reference_step(benchmark, size):
    """The baseline: the same maths in plain torch ops, noise from torch.randn."""
    torch = pytest.importorskip("torch")
    from fastddpm.executors.torch_ref import reference_step_randn
    shape = SIZES[size]
    sched, t, x, m = _setup(shape)
    row = sched.coefficients()[sched.row_index(t)]
    xt, mt = torch.from_numpy(x), torch.from_numpy(m)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    got = reference_step_randn(xt, mt, row, torch.Generator().manual_seed(0))
    check_step(got.numpy(), expected_step(sched, t, x, m, z.numpy().astype(np.float64)), "torch-ref")
    _record(benchmark, shape, "torch-ref")
    benchmark(reference_step_randn, xt, mt, row, gen)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("size", SIZES)
def test_fused_step(benchmark, size, backend):
    """scheduler.step(...) through the public path, in-kernel Philox noise, into a preallocated out."""
    shape = SIZES[size]
    sched, t, x, m = _setup(shape)
    out = np.empty_like(x)
    # the answer first: given noise against float64, then in-kernel noise against the spec (2 samples)
    z = noise_spec(3, shape[:1] and (min(shape[0], 2),) + shape[1:], t).astype(np.float64)
    sched.step(m, t, x, seed=3, out=out, backend=backend)
    check_step(out[:2], expected_step(sched, t, x[:2], m[:2], z), backend + " (in-kernel noise)")
    zg = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)
    check_step(sched.step(m, t, x, noise=zg, backend=backend), expected_step(sched, t, x, m, zg.astype(np.float64)),
           backend + " (given noise)")
    _record(benchmark, shape, backend)
    benchmark(sched.step, m, t, x, seed=3, out=out, backend=backend)
