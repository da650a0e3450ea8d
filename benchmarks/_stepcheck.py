"""The answer check shared by the CPU and CUDA step benchmarks: the float64 DDPM-row formula."""
import numpy as np
import pytest


def expected_step(sched, t, x, m, z):
    """float64 formula of the fused step (the scheduler's row for timestep t), z given."""
    row = sched.coefficients_float64()[sched.row_index(t)]
    x64, m64 = x.astype(np.float64), m.astype(np.float64)
    x0 = np.clip(row[0] * x64 + row[1] * m64, -row[6], row[6])
    return row[2] * x0 + row[3] * x64 + row[4] * m64 + row[5] * z


def check_step(got, want, what):
    """Fail the benchmark row (FAIL ...) unless got is within 1e-4 of the float64 answer."""
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    if not err <= 1e-4:
        pytest.fail(f"FAIL {what}: max abs error {err:.3g} against the float64 formula")
