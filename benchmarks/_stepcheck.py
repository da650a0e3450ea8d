"""The answer check shared by the CPU and CUDA step benchmarks: the float64 DDPM-row formula."""
import numpy as np
import pytest

from fastddpm.coefficients import A_M, A_X, C_X0, CLIP, D_M, D_X, SIGMA


def expected_step(sched, t, x, m, z):
    """float64 formula of the fused step (the scheduler's row for timestep t), z given."""
    row = sched.coefficients_float64()[sched.row_index(t)]
    x64, m64 = x.astype(np.float64), m.astype(np.float64)
    x0 = np.clip(row[A_X] * x64 + row[A_M] * m64, -row[CLIP], row[CLIP])
    return row[C_X0] * x0 + row[D_X] * x64 + row[D_M] * m64 + row[SIGMA] * z


def check_step(got, want, what):
    """Fail the benchmark row (FAIL ...) unless got is within 1e-4 of the float64 answer."""
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    if not err <= 1e-4:
        pytest.fail(f"FAIL {what}: max abs error {err:.3g} against the float64 formula")
