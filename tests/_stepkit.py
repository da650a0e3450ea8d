"""Shared pieces of the step, noise and scheduler tests: the CPU backends to parametrise over, and
the float64 reference formulas of one DDPM / DDIM step, written here from the papers and diffusers'
code (independently of fastddpm.schedulers, which factors the same maths into coefficient rows).

Tolerances
----------
The fused step runs in float32 with float32-rounded coefficients. Every coefficient is rounded once
(<= 2**-24 relative) and the kernel does about eight multiplies and adds, each rounded once; every
rounding error is at most 2**-24 of the magnitude of the quantity rounded, and no intermediate is
larger than the sum of the absolute values of the terms of the formula (``scale`` below, computed
from the *unclipped* x0 terms, since clipping is 1-Lipschitz and cannot enlarge an error). So
|kernel - exact| <= ~16 * 2**-24 * scale; we assert STEP_RTOL = 16 units of 2**-24 times scale, i.e.
about 1e-6 of the size of the terms (measured worst: 3.3 units on every config of the grid). A wrong
coefficient, a wrong previous timestep or a missing clip changes the result by a sizeable fraction
of ``scale``, far above this bound.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

import fastddpm
from fastddpm.executors import get as get_backend

EPS32 = 2.0**-24          # float32 unit roundoff
STEP_ULPS = 16            # see the module docstring
STEP_RTOL = STEP_ULPS * EPS32

# The largest |normal| the spec can make: u >= 2**-24 so sqrt(-2 ln u) <= sqrt(48 ln 2) ~ 5.77.
# float32 log, sqrt and sin/cos each contribute a few units of 2**-24 relative error (the kernels
# use Cephes-style polynomials of about 1 ulp and an exact reduction of 2*pi*u); 5.77 * 8 * 2**-24
# ~ 2.8e-6, rounded up to NORMAL_ATOL. Measured on 1.2M normals: 5.2e-7 (native, numba), 2.3e-7
# (torch, which rounds the float64 spec).
NORMAL_ATOL = 4e-6


def cpu_backend_params():
    """One pytest.param per available CPU backend, and per ISA path for native-cpu."""
    params = []
    for name, entry in fastddpm.backends().items():
        if not (entry["available"] and "cpu" in entry.get("devices", [])):
            continue
        if name == "native-cpu":
            for isa in get_backend(name).supported_isas():
                params.append(pytest.param((name, isa), id=f"{name}-{isa}"))
        else:
            params.append(pytest.param((name, None), id=name))
    return params


CPU_BACKENDS = cpu_backend_params()
CPU_BACKEND_NAMES = sorted({p.values[0][0] for p in CPU_BACKENDS})


@contextlib.contextmanager
def using(spec):
    """Select backend ``spec = (name, isa)``: sets the native ISA path and restores it afterwards."""
    name, isa = spec
    if isa is None:
        yield name
        return
    be = get_backend(name)
    old = be.isa()
    be.set_isa(isa)
    try:
        assert be.isa() == isa, f"set_isa({isa!r}) left the backend on {be.isa()!r}"
        yield name
    finally:
        be.set_isa(old)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """The name of a CPU backend to pass as ``backend=`` (native-cpu once per ISA path)."""
    with using(request.param) as name:
        yield name


# -- the float64 reference formulas ------------------------------------------------------------

def pred_x0_eps(prediction_type, abar, x, m):
    """(x0, |x0 terms|, eps, |eps terms|) from the model output m, as diffusers derives them."""
    sa, sb = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        x0 = (x - sb * m) / sa
        return x0, (np.abs(x) + sb * np.abs(m)) / sa, m, np.abs(m)
    if prediction_type == "sample":
        return m, np.abs(m), (x - sa * m) / sb, (np.abs(x) + sa * np.abs(m)) / sb
    if prediction_type == "v_prediction":
        return sa * x - sb * m, sa * np.abs(x) + sb * np.abs(m), sa * m + sb * x, sa * np.abs(m) + sb * np.abs(x)
    raise AssertionError(prediction_type)


def _f64(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


def ddpm_reference(sched, t, x, m, z):
    """x_{t-1} of DDPM (Ho et al. eq. 6-7, diffusers' DDPMScheduler.step) in float64.

    Returns (x_prev, scale, sigma): scale bounds the float32 evaluation error (module docstring).
    """
    x, m, z = _f64(x, m, z)
    cfg = sched.config
    ts = [int(v) for v in sched.timesteps]
    i = ts.index(int(t))
    prev = ts[i + 1] if i + 1 < len(ts) else -1
    abar = float(sched.alphas_cumprod[t])
    abar_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else 1.0
    alpha_t = abar / abar_prev
    beta_t = 1.0 - alpha_t
    x0, x0_mag, _, _ = pred_x0_eps(cfg["prediction_type"], abar, x, m)
    if cfg["clip_sample"]:
        r = cfg["clip_sample_range"]
        x0 = np.clip(x0, -r, r)
    c_x0 = math.sqrt(abar_prev) * beta_t / (1.0 - abar)
    c_xt = math.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar)
    out = c_x0 * x0 + c_xt * x
    sigma = 0.0
    if t > 0:
        variance = max((1.0 - abar_prev) / (1.0 - abar) * beta_t, 1e-20)
        if cfg["variance_type"] == "fixed_large":
            variance = beta_t
        sigma = math.sqrt(variance)
        out = out + sigma * z
    scale = abs(c_x0) * x0_mag + abs(c_xt) * np.abs(x) + (sigma * np.abs(z) if sigma else 0.0)
    return out, scale, sigma


def ddim_reference(sched, t, x, m, z, eta):
    """x_prev of DDIM (Song et al. eq. 12 and 16, diffusers' DDIMScheduler.step) in float64."""
    x, m, z = _f64(x, m, z)
    cfg = sched.config
    T = sched.num_train_timesteps
    prev = int(t) - T // sched.num_inference_steps
    abar = float(sched.alphas_cumprod[t])
    if prev >= 0:
        abar_prev = float(sched.alphas_cumprod[prev])
    else:
        abar_prev = 1.0 if cfg["set_alpha_to_one"] else float(sched.alphas_cumprod[0])
    x0, x0_mag, eps, eps_mag = pred_x0_eps(cfg["prediction_type"], abar, x, m)
    if cfg["clip_sample"]:
        r = cfg["clip_sample_range"]
        x0 = np.clip(x0, -r, r)
    variance = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
    std = eta * math.sqrt(variance)
    c_eps = math.sqrt(max(1.0 - abar_prev - std**2, 0.0))
    out = math.sqrt(abar_prev) * x0 + c_eps * eps
    if eta > 0:
        out = out + std * z
    scale = math.sqrt(abar_prev) * x0_mag + c_eps * eps_mag + (std * np.abs(z) if eta > 0 else 0.0)
    return out, scale, std


def assert_step_close(got, ref, scale, what="", rtol=STEP_RTOL, extra=0.0):
    """|got - ref| <= rtol * scale + extra, elementwise, with the worst element reported."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    bound = rtol * np.asarray(scale, dtype=np.float64) + extra
    err = np.abs(got - ref)
    bad = ~(err <= bound)   # NaN counts as bad
    if bad.any():
        i = np.unravel_index(int(np.argmax(np.where(bad, err - bound, -np.inf))), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} elements outside the float32 bound; worst at {i}: "
            f"got {got[i]!r}, expected {ref[i]!r}, |diff| {err[i]:.3e} > bound {bound[i]:.3e} "
            f"(scale {np.broadcast_to(scale, err.shape)[i]:.3e})")


def assert_step_sequence(scheduler, seq, backend, what=""):
    """A scheduler's fused step over a whole float64 sequence [(x, m, z, want)] (its rows' terms
    and diffusers' float64 results) on ``backend``: max abs <= 1e-5 where the terms are
    unit-scale, else STEP_RTOL times the terms' size."""
    rows = scheduler.coefficients_float64()
    with using(backend):
        for k, (x, m, z, want) in enumerate(seq):
            got = scheduler.step(m.astype(np.float32), scheduler.timesteps[k], x.astype(np.float32),
                                 noise=z.astype(np.float32), backend=backend[0])
            err = float(np.abs(got.astype(np.float64) - want).max())
            ax, am, cx0, dx, dm, sigma = rows[k][:6]
            size = np.abs(cx0) * (np.abs(ax * x) + np.abs(am * m)) + np.abs(dx * x) + np.abs(dm * m) + np.abs(sigma * z)
            assert err <= max(1e-5, STEP_RTOL * size.max()), f"{what} step {k}: {err:.2e}"


def random_inputs(shape, seed=0, x_std=1.0, m_std=1.0):
    """float32 (x, m, z): sample, model output and given noise."""
    rng = np.random.default_rng(seed)
    x = (x_std * rng.standard_normal(shape)).astype(np.float32)
    m = (m_std * rng.standard_normal(shape)).astype(np.float32)
    z = rng.standard_normal(shape).astype(np.float32)
    return x, m, z


# -- the step with the multistep history (tests/test_step_history.py, tests/test_cuda_step.py) ------
#
# y = c_x0 x0 + d_x x + d_m m + h1 H1 + h2 H2 + sigma z, x0 = clip(a_x x + a_m m); x0_out receives x0.

def history_row(clip=0.0, sigma=0.3, h1=-0.4, h2=0.15):
    """A float32 coefficient row with every term of the step with history non-zero (but clip / sigma)."""
    from fastddpm.coefficients import A_M, A_X, C_X0, CLIP, COEF_WIDTH, D_M, D_X, H1, H2, SIGMA
    row = np.zeros(COEF_WIDTH, np.float32)
    row[[A_X, A_M, C_X0, D_X, D_M, SIGMA, CLIP, H1, H2]] = [1.7, -0.9, 0.6, 0.35, -0.2, sigma, clip, h1, h2]
    return row


def history_inputs(shape, seed):
    """float32 (x, m, z, a, b): sample, model output, given noise and two previous x0 predictions."""
    rng = np.random.default_rng(seed)
    x, m, z, a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(5))
    return x, m, z, a, b


def history_reference(row, x, m, z, hs, m_mag=None):
    """float64 (y, scale of y, x0, scale of x0); hs: [(H, weight)] of the history terms given.
    m_mag: a bound on |m| and on the terms it is made of (default |m|)."""
    from fastddpm.coefficients import A_M, A_X, C_X0, CLIP, D_M, D_X, SIGMA
    r = row.astype(np.float64)
    x, m, z = (np.asarray(v, np.float64) for v in (x, m, z))
    mag = np.abs(m) if m_mag is None else m_mag
    x0 = r[A_X] * x + r[A_M] * m
    x0_scale = np.abs(r[A_X] * x) + abs(r[A_M]) * mag
    if r[CLIP] > 0:
        x0 = np.clip(x0, -r[CLIP], r[CLIP])
    y = r[C_X0] * x0 + r[D_X] * x + r[D_M] * m + r[SIGMA] * z
    scale = abs(r[C_X0]) * x0_scale + np.abs(r[D_X] * x) + abs(r[D_M]) * mag + np.abs(r[SIGMA] * z)
    for h, w in hs:
        y = y + float(w) * h.astype(np.float64)
        scale = scale + np.abs(float(w) * h.astype(np.float64))
    return y, scale, x0, x0_scale


def guided_reference(row, x, m_c, m_u, w, z, hs=()):
    """float64 (y, scale, x0, x0 scale) of a classifier-free guided step: the step with history
    whose model output is m = m_u + w (m_c - m_u). The scale bounds m by |m_u| + |w| (|m_c| + |m_u|),
    which covers the float32 rounding of m (three operations) as well as its use in the step."""
    m_c, m_u = (np.asarray(v, np.float64) for v in (m_c, m_u))
    w = float(np.float32(w))
    m = m_u + w * (m_c - m_u)
    return history_reference(row, x, m, z, hs, m_mag=np.abs(m_u) + abs(w) * (np.abs(m_c) + np.abs(m_u)))


X0_ALONE_NOISE = ["given", "philox", "sigma0"]


def x0_out_alone_case(noise):
    """(x, m, given noise or None, row) of the check that a step with x0_out alone (no history term)
    gives the single-step kernel's bits: noise "given", "philox" (made in the kernel) or "sigma0"."""
    x, m, z, _, _ = history_inputs((3, 1031), seed=3)
    row = history_row(clip=1.5, sigma=0.0 if noise == "sigma0" else 0.3)
    return x, m, (z if noise == "given" else None), row
