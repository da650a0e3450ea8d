"""The fused step on each backend next to the reference step (plain torch ops + torch.randn).

Bytes per element: 3 x 4 (read x and the model output, write the result). The machine's copy
bandwidth is measured in the same run (np.copyto, 2 x 4 bytes per element) as the ceiling.
Every implementation's answer is checked before it is timed; a wrong answer fails the row.
"""
import numpy as np
import pytest

import fastddpm
from fastddpm.noise import noise as noise_spec

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


def _expected(sched, t, x, m, z):
    """float64 formula of the fused step (the DDPM row), z given."""
    row = sched.coefficients_float64()[sched.row_index(t)]
    x64, m64 = x.astype(np.float64), m.astype(np.float64)
    x0 = np.clip(row[0] * x64 + row[1] * m64, -row[6], row[6])
    return row[2] * x0 + row[3] * x64 + row[4] * m64 + row[5] * z


def _check(got, want, what):
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    if not err <= 1e-4:
        pytest.fail(f"FAIL {what}: max abs error {err:.3g} against the float64 formula")


def _record(benchmark, shape, impl, baseline="torch-ref"):
    n = int(np.prod(shape))
    benchmark.group = "step " + "x".join(map(str, shape))
    benchmark.extra_info.update(kind="step", impl=impl, elements=n, bytes=12 * n, baseline=baseline)


@pytest.mark.parametrize("size", SIZES)
def test_copy_ceiling(benchmark, size):
    """np.copyto of one array: this machine's copy bandwidth, the ceiling for a streaming kernel."""
    shape = SIZES[size]
    src = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    assert np.array_equal(dst, src)
    n = int(np.prod(shape))
    benchmark.group = "step " + "x".join(map(str, shape))
    benchmark.extra_info.update(kind="copy", impl="copy", elements=n, bytes=8 * n)
    benchmark(np.copyto, dst, src)


@pytest.mark.parametrize("size", SIZES)
def test_reference_step(benchmark, size):
    """The baseline: the same maths in plain torch ops, noise from torch.randn."""
    torch = pytest.importorskip("torch")
    from fastddpm.backends.torch_ref import reference_step_randn
    shape = SIZES[size]
    sched, t, x, m = _setup(shape)
    row = sched.coefficients()[sched.row_index(t)]
    xt, mt = torch.from_numpy(x), torch.from_numpy(m)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    got = reference_step_randn(xt, mt, row, torch.Generator().manual_seed(0))
    _check(got.numpy(), _expected(sched, t, x, m, z.numpy().astype(np.float64)), "torch-ref")
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
    _check(out[:2], _expected(sched, t, x[:2], m[:2], z), backend + " (in-kernel noise)")
    zg = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)
    _check(sched.step(m, t, x, noise=zg, backend=backend), _expected(sched, t, x, m, zg.astype(np.float64)),
           backend + " (given noise)")
    _record(benchmark, shape, backend)
    benchmark(sched.step, m, t, x, seed=3, out=out, backend=backend)
