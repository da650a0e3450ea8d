"""The fused sampler step on every available CPU backend (native-cpu once per ISA path).

Each step is checked against (a) the float64 DDPM / DDIM formulas of tests/_stepkit.py, computed
from the scheduler's float64 alphas_cumprod, and (b) diffusers' own DDPMScheduler.step /
DDIMScheduler.step with the same noise. Tolerances: see tests/_stepkit.py (16 units of 2**-24 of the
size of the terms; float32 evaluation cannot be closer, and a wrong formula is far further).
"""
from __future__ import annotations

import functools
import itertools
import math
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest

import fastddpm
from fastddpm import DDIMScheduler, DDPMScheduler
from fastddpm.coefficients import COEF_WIDTH
from fastddpm.executors import get as get_backend
from fastddpm.philox import noise as spec_noise

from _stepkit import (CPU_BACKENDS, NORMAL_ATOL, STEP_RTOL, assert_step_close, backend,  # noqa: F401
                      ddim_reference, ddpm_reference, random_inputs, using)

PREDICTIONS = ("epsilon", "sample", "v_prediction")
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
SPACINGS = ("leading", "linspace", "trailing")
VARIANCES = ("fixed_small", "fixed_large")
CLIPS = (None, 1.0, 0.5)          # clip_sample=False; True with clip_sample_range 1.0; True with 0.5
OFFSETS = (0, 1)
N_STEPS = 10

# 2 x 3 x 5 x 7: 105 elements per sample, not a multiple of 4, 8 or 16 (every kernel's tail path).
SHAPE = (2, 3, 5, 7)
X, M, Z = random_inputs(SHAPE, seed=1)


def _clip_cfg(clip):
    return {"clip_sample": False} if clip is None else {"clip_sample": True, "clip_sample_range": clip}


def _first_middle_last(timesteps):
    ts = [int(t) for t in timesteps]
    return [ts[i] for i in sorted({0, len(ts) // 2, len(ts) - 1})]


# -- diffusers as the second oracle -------------------------------------------------------------

def _diffusers_table(cfg, ours):
    """float64 alphas_cumprod for diffusers' step maths: ours, except that a zero-SNR rescale is done
    by diffusers' own rescale_zero_terminal_snr (in float64, on the unrescaled float64 betas)."""
    import torch
    if not cfg.get("rescale_betas_zero_snr"):
        return torch.from_numpy(ours.alphas_cumprod.copy())
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    base = DDPMScheduler(**{k: v for k, v in cfg.items()
                            if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}).betas
    return torch.cumprod(1.0 - rescale_zero_terminal_snr(torch.from_numpy(base.copy())), dim=0)


def _diffusers64(kind, cfg, n, ours):
    """diffusers' scheduler for ``cfg`` with its step maths run in float64.

    diffusers keeps alphas_cumprod in float32, where 1 - alphas_cumprod near t = 0 (about 1e-4) has
    only ~11 significant bits and DDIM's sqrt(1 - abar_prev - std**2) cancels catastrophically at
    eta = 1: its float32 steps differ from the exact maths by up to ~7e-4 of the result (measured).
    So the semantics (previous timestep, clipping, variance, prediction types, final alpha) are
    compared with diffusers' code on a float64 table; the tables themselves are compared with
    diffusers' in test_schedulers.py, and the as-shipped float32 step in
    test_step_matches_diffusers_float32_as_shipped.
    """
    diffusers = pytest.importorskip("diffusers")
    import torch
    if kind == "ddim" and cfg.get("beta_schedule") == "sigmoid":
        return None  # diffusers' DDIMScheduler has no sigmoid schedule (NotImplementedError)
    d = (diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler)(**cfg)
    d.set_timesteps(n)
    assert [int(t) for t in d.timesteps] == [int(t) for t in ours.timesteps], cfg
    d.alphas_cumprod = _diffusers_table(cfg, ours)
    if kind == "ddim":  # diffusers' choice (1 or alphas_cumprod[0]), on the float64 table
        final32 = float(d.final_alpha_cumprod)
        d.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if final32 == 1.0 else d.alphas_cumprod[0]
    return d


def _diffusers_step(kind, d, t, x, m, z, eta=0.0):
    """diffusers' step on float64 tensors; DDPM's noise is injected by patching its randn_tensor."""
    import torch
    from diffusers.schedulers import scheduling_ddpm
    xt, mt, zt = (torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (x, m, z))
    if kind == "ddpm":
        def fake_randn(shape, *args, **kwargs):
            assert tuple(shape) == tuple(zt.shape)
            return zt
        with mock.patch.object(scheduling_ddpm, "randn_tensor", fake_randn):
            out = d.step(mt, t, xt).prev_sample
    else:
        out = d.step(mt, t, xt, eta=eta, variance_noise=zt).prev_sample
    assert out.dtype == torch.float64
    return out.numpy()


@functools.lru_cache(maxsize=None)
def _schedulers(kind, items, n):
    cfg = dict(items)
    ours = (DDPMScheduler if kind == "ddpm" else DDIMScheduler)(**cfg)
    ours.set_timesteps(n)
    return ours, _diffusers64(kind, cfg, n, ours)


@functools.lru_cache(maxsize=None)
def _expected(kind, items, n, t, eta=0.0):
    """(float64 formula, its scale, diffusers float64 or None) for the module's X, M, Z."""
    ours, d = _schedulers(kind, items, n)
    if kind == "ddpm":
        ref, scale, _ = ddpm_reference(ours, t, X, M, Z)
    else:
        ref, scale, _ = ddim_reference(ours, t, X, M, Z, eta)
    dref = None
    if d is not None:
        dref = _diffusers_step(kind, d, t, X, M, Z, eta)
        # The formulas of _stepkit.py and diffusers' code, both in float64, agree to float64
        # rounding (amplified by at most ~1e3 in the cancellations noted above).
        assert_step_close(dref, ref, scale, f"diffusers float64 vs the float64 formula {kind} {items} t={t}",
                          rtol=1e-12)
    return ref, scale, dref


def _check(kind, cfg, n, t, backend, eta=0.0, x=X, m=M, z=Z):
    items = tuple(sorted(cfg.items()))
    ours, _ = _schedulers(kind, items, n)
    ref, scale, dref = _expected(kind, items, n, t, eta)
    kwargs = {"eta": eta} if kind == "ddim" else {}
    got = ours.step(m, t, x, noise=z, backend=backend, **kwargs)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == x.shape
    what = f"{backend} {kind} {cfg} n={n} t={t} eta={eta}"
    assert_step_close(got, ref, scale, what + ": vs the float64 formula")
    if dref is not None:
        assert_step_close(got, dref, scale, what + ": vs diffusers")
    return dref is not None


# -- (a) + (b): every config combination ----------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_every_config(backend, prediction_type, schedule):
    checked = 0
    for variance_type, clip, spacing, offset in itertools.product(VARIANCES, CLIPS, SPACINGS, OFFSETS):
        cfg = dict(beta_schedule=schedule, prediction_type=prediction_type, variance_type=variance_type,
                   timestep_spacing=spacing, steps_offset=offset, **_clip_cfg(clip))
        ours, _ = _schedulers("ddpm", tuple(sorted(cfg.items())), N_STEPS)
        for t in _first_middle_last(ours.timesteps):
            checked += _check("ddpm", cfg, N_STEPS, t, backend)
    assert checked == len(VARIANCES) * len(CLIPS) * len(SPACINGS) * len(OFFSETS) * 3


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_every_config(backend, prediction_type, eta):
    with_diffusers = 0
    for schedule, clip, spacing, offset, one in itertools.product(SCHEDULES, CLIPS, SPACINGS, OFFSETS,
                                                                   (True, False)):
        cfg = dict(beta_schedule=schedule, prediction_type=prediction_type, timestep_spacing=spacing,
                   steps_offset=offset, set_alpha_to_one=one, **_clip_cfg(clip))
        ours, _ = _schedulers("ddim", tuple(sorted(cfg.items())), N_STEPS)
        for t in _first_middle_last(ours.timesteps):
            with_diffusers += _check("ddim", cfg, N_STEPS, t, backend, eta=eta)
    # every schedule but sigmoid (which diffusers' DDIM lacks) was also compared with diffusers
    assert with_diffusers == 3 * len(CLIPS) * len(SPACINGS) * len(OFFSETS) * 2 * 3


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_every_timestep_of_various_step_counts(backend, kind):
    """1 step, odd counts (3, 7: diffusers' spacing quirks), 50, 999 and 1000 (consecutive timesteps,
    t = 1 and t = 0), every spacing; the last timestep of each schedule is always covered."""
    checked = 0
    for n, spacing in itertools.product((1, 2, 3, 7, 50, 999, 1000), SPACINGS):
        cfg = dict(timestep_spacing=spacing, clip_sample=False)
        ours, _ = _schedulers(kind, tuple(sorted(cfg.items())), n)
        ts = [int(t) for t in ours.timesteps]
        assert len(ts) == n
        chosen = ts if n <= 50 else sorted(set(ts[:2] + ts[n // 2 - 1:n // 2 + 1] + ts[-3:]), reverse=True)
        for t in chosen:
            checked += _check(kind, cfg, n, t, backend, eta=0.5 if kind == "ddim" else 0.0)
    assert checked > 3 * (1 + 2 + 3 + 7 + 50)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "epsilon"])
def test_rescale_betas_zero_snr(backend, kind, prediction_type):
    """Zero terminal SNR (alphas_cumprod[T-1] = 0): trailing spacing starts at t = 999. There, epsilon
    prediction is undefined (x0 = (x - eps) / 0: diffusers returns inf), so it is checked at the
    other timesteps only; v and sample prediction are defined everywhere and checked everywhere."""
    checked = skipped = 0
    for spacing, clip in itertools.product(SPACINGS, (None, 1.0)):
        cfg = dict(rescale_betas_zero_snr=True, prediction_type=prediction_type, timestep_spacing=spacing,
                   **_clip_cfg(clip))
        ours, _ = _schedulers(kind, tuple(sorted(cfg.items())), N_STEPS)
        assert ours.alphas_cumprod[-1] == 0.0   # zero terminal SNR, exactly (as diffusers' DDPM and DDIM)
        for t in [int(t) for t in ours.timesteps]:
            if prediction_type == "epsilon" and t == ours.num_train_timesteps - 1:
                skipped += 1
                continue
            checked += _check(kind, cfg, N_STEPS, t, backend, eta=1.0 if kind == "ddim" else 0.0)
    assert checked + skipped == 2 * len(SPACINGS) * N_STEPS
    # linspace and trailing start at t = 999: the terminal step itself is covered for v and sample
    assert skipped == (4 if prediction_type == "epsilon" else 0)


def test_rescale_zero_snr_epsilon_terminal_step_is_finite(backend):
    """Where diffusers divides by sqrt(alphas_cumprod[999]) = 0, fastddpm floors it at 2**-24: a
    finite result, equal to diffusers' wherever diffusers' clipped x0 is finite."""
    s = DDPMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=True)
    s.set_timesteps(10)
    assert int(s.timesteps[0]) == 999
    got = s.step(M, 999, X, noise=Z, backend=backend)
    assert np.isfinite(got).all()
    # x0 = 4096 (x - m) clipped: +-1 wherever |x - m| > 1/4096, as diffusers' clamp(+-inf)
    prev = int(s.timesteps[1])
    sa_prev = math.sqrt(s.alphas_cumprod[prev])
    sigma = math.sqrt((1 - s.alphas_cumprod[prev]) * 1.0)   # fixed_small at abar = 0: (1 - abar_prev) * beta_t, beta_t = 1
    ref = sa_prev * np.sign(X.astype(np.float64) - M) + sigma * Z
    assert_step_close(got, ref, np.abs(ref) + sigma * np.abs(Z) + sa_prev, f"{backend} terminal epsilon")


def test_step_matches_diffusers_float32_as_shipped(backend):
    """Plain diffusers (float32 tables and float32 maths) on the configs of real checkpoints, every
    timestep of a 50-step run.

    diffusers' own float32 result is not exact: its alphas_cumprod is a float32 cumprod, and near
    t = 0 the terms 1 - alphas_cumprod (1e-4 .. 1e-3) and 1 - abar_t / abar_prev are known only to
    ~1e-4 relative; it differs from the exact maths by up to 1.7e-4 absolute on unit-scale data
    (measured). Both parts of that are computed here rather than guessed: ``table_difference`` (the
    float64 formula on diffusers' float32 table minus on ours) and ``their_rounding`` (diffusers'
    code in float32 minus the same code in float64, on its own table). What is left must be our
    float32 rounding (STEP_RTOL) plus float64 noise: a semantic difference would show far above it.
    """
    import torch
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers import scheduling_ddpm
    configs = [
        ("ddpm", dict()),  # google/ddpm-cifar10-32
        ("ddpm", dict(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", prediction_type="sample")),
        ("ddim", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1, beta_schedule="scaled_linear",
                      beta_start=0.00085, beta_end=0.012)),  # stable-diffusion-v1-5's DDIM
        ("ddim", dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)),
        ("ddim", dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2")),
    ]
    for kind, cfg in configs:
        ours = (DDPMScheduler if kind == "ddpm" else DDIMScheduler)(**cfg)
        cls = diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler
        d32, d64 = cls(**cfg), cls(**cfg)
        for d in (ours, d32, d64):
            d.set_timesteps(50)
        d64.alphas_cumprod = d32.alphas_cumprod.double()      # diffusers' own table, float64 maths
        if kind == "ddim":
            d64.final_alpha_cumprod = d32.final_alpha_cumprod.double()
        on_their_table = SimpleNamespace(config=ours.config, timesteps=ours.timesteps,
                                         alphas_cumprod=d32.alphas_cumprod.double().numpy(),
                                         num_train_timesteps=ours.num_train_timesteps, num_inference_steps=50)
        eta = 0.5 if kind == "ddim" else 0.0
        reference = ddpm_reference if kind == "ddpm" else functools.partial(ddim_reference, eta=eta)
        for t in [int(t) for t in ours.timesteps]:
            ref, scale, _ = reference(ours, t, X, M, Z)
            theirs, _, _ = reference(on_their_table, t, X, M, Z)
            kwargs = {"eta": eta} if kind == "ddim" else {}
            got = ours.step(M, t, X, noise=Z, backend=backend, **kwargs)
            if kind == "ddpm":
                with mock.patch.object(scheduling_ddpm, "randn_tensor", lambda *a, **k: torch.from_numpy(Z)):
                    want = d32.step(torch.from_numpy(M), t, torch.from_numpy(X)).prev_sample.numpy()
            else:
                want = d32.step(torch.from_numpy(M), t, torch.from_numpy(X), eta=eta,
                                variance_noise=torch.from_numpy(Z)).prev_sample.numpy()
            assert want.dtype == np.float32
            their_rounding = np.abs(want - _diffusers_step(kind, d64, t, X, M, Z, eta))
            table_difference = np.abs(ref - theirs)
            assert_step_close(got, want, scale, f"{backend} {kind} {cfg} t={t} vs float32 diffusers",
                              extra=table_difference + their_rounding)


def test_last_ddpm_step_adds_no_noise(backend):
    """t = 0 has sigma 0: the noise (given or seeded) must not reach the result."""
    s = DDPMScheduler(variance_type="fixed_large")
    s.set_timesteps(10)
    assert int(s.timesteps[-1]) == 0
    assert s.coefficients()[-1][5] == 0.0
    a = s.step(M, 0, X, noise=Z, backend=backend)
    b = s.step(M, 0, X, noise=np.zeros_like(Z), backend=backend)
    c = s.step(M, 0, X, seed=1, backend=backend)
    d = s.step(M, 0, X, seed=2, backend=backend)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, d)
    # ... but the step before does add it
    t1 = int(s.timesteps[-2])
    assert not np.array_equal(s.step(M, t1, X, seed=1, backend=backend), s.step(M, t1, X, seed=2, backend=backend))


def test_ddim_eta0_is_deterministic_and_eta_changes_the_result(backend):
    s = DDIMScheduler()
    s.set_timesteps(10)
    t = int(s.timesteps[3])
    a = s.step(M, t, X, eta=0.0, seed=1, backend=backend)
    np.testing.assert_array_equal(a, s.step(M, t, X, eta=0.0, seed=2, backend=backend))
    assert not np.array_equal(s.step(M, t, X, eta=0.5, seed=1, backend=backend),
                              s.step(M, t, X, eta=0.5, seed=2, backend=backend))
    assert not np.allclose(a, s.step(M, t, X, eta=0.5, noise=np.zeros_like(Z), backend=backend))


# -- in-kernel noise ------------------------------------------------------------------------------

def _seeded_bound(scale, sigma):
    # the formula's float32 bound, plus sigma times the normals' bound against the float64 spec
    return dict(rtol=STEP_RTOL, extra=abs(sigma) * NORMAL_ATOL)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_seeded_step_uses_spec_noise(backend, kind):
    shape = (3, 4, 9, 11)   # 396 per sample
    x, m, _ = random_inputs(shape, seed=2)
    s = DDPMScheduler() if kind == "ddpm" else DDIMScheduler()
    s.set_timesteps(20)
    for seed, first_index in ((0, 0), (12345, 7), (2**64 - 1, 2**32 - 3), (2**40 + 3, 1000)):
        for t in [int(t) for t in s.timesteps[:3]] + [int(s.timesteps[-2])]:
            z = spec_noise(seed, shape, t, first_index, dtype=np.float64)
            if kind == "ddpm":
                ref, scale, sigma = ddpm_reference(s, t, x, m, z)
                got = s.step(m, t, x, seed=seed, first_index=first_index, backend=backend)
            else:
                ref, scale, sigma = ddim_reference(s, t, x, m, z, 1.0)
                got = s.step(m, t, x, eta=1.0, seed=seed, first_index=first_index, backend=backend)
            assert sigma > 0
            assert_step_close(got, ref, scale, f"{backend} seed={seed} first_index={first_index} t={t}",
                              **_seeded_bound(scale, sigma))


def test_first_index_offsets_and_batch_invariance(backend):
    """Sample i of a batch is the single-sample call with first_index + i, bit for bit."""
    shape = (5, 3, 6, 5)
    x, m, _ = random_inputs(shape, seed=3)
    s = DDPMScheduler()
    s.set_timesteps(10)
    t = int(s.timesteps[2])
    for first_index in (0, 11, 2**32 - 5):
        batch = s.step(m, t, x, seed=99, first_index=first_index, backend=backend)
        for i in range(5):
            one = s.step(m[i:i + 1], t, x[i:i + 1], seed=99, first_index=first_index + i, backend=backend)
            np.testing.assert_array_equal(batch[i:i + 1], one, err_msg=f"{backend} row {i} first_index={first_index}")
        # a split batch is the same batch
        head = s.step(m[:2], t, x[:2], seed=99, first_index=first_index, backend=backend)
        tail = s.step(m[2:], t, x[2:], seed=99, first_index=first_index + 2, backend=backend)
        np.testing.assert_array_equal(batch, np.concatenate([head, tail]))
    # and first_index really moves the noise
    a = s.step(m, t, x, seed=99, first_index=0, backend=backend)
    b = s.step(m, t, x, seed=99, first_index=1, backend=backend)
    np.testing.assert_array_equal(a[1:4], s.step(m[1:4], t, x[1:4], seed=99, first_index=1, backend=backend))
    assert not np.array_equal(a[1:], b[1:])


def test_different_seeds_and_steps_differ(backend):
    s = DDPMScheduler()
    s.set_timesteps(10)
    t = int(s.timesteps[1])
    results = [s.step(M, t, X, seed=seed, backend=backend) for seed in (0, 1, 2**32, 2**64 - 1)]
    for a, b in itertools.combinations(results, 2):
        assert np.mean(a != b) > 0.99
    # the noise step is the timestep: another timestep with the same coefficients would differ too
    z5 = spec_noise(0, SHAPE, t)
    z6 = spec_noise(0, SHAPE, int(s.timesteps[2]))
    assert np.mean(z5 != z6) > 0.99


def test_seed_none_draws_fresh_seeds(backend, monkeypatch):
    s = DDPMScheduler()
    s.set_timesteps(10)
    t = int(s.timesteps[1])
    a = s.step(M, t, X, backend=backend)
    b = s.step(M, t, X, backend=backend)
    assert np.mean(a != b) > 0.99
    # ... taken from validate.fresh_seed, so a patched source gives the seeded result
    import fastddpm.validate as validate
    monkeypatch.setattr(validate, "fresh_seed", lambda: 424242)
    np.testing.assert_array_equal(s.step(M, t, X, backend=backend), s.step(M, t, X, seed=424242, backend=backend))
    # given noise with seed=None draws nothing: the result is the given-noise one
    np.testing.assert_array_equal(s.step(M, t, X, noise=Z, backend=backend),
                                  s.step(M, t, X, noise=Z, seed=7, backend=backend))


# -- awkward shapes, threads ------------------------------------------------------------------------

AWKWARD_SHAPES = [
    (1, 1, 5, 7), (3, 1, 5, 7), (5, 3, 3, 3), (1, 4, 3, 5), (3, 3, 1, 1), (5, 1, 1, 1),
    (1, 1, 1, 15), (2, 1, 1, 17), (1, 2, 3, 11), (3, 4, 8, 8), (1, 3, 32, 32), (2, 63),
    (1, 3, 13, 29),   # 1131 per sample: several of the widest kernel block (4 * 16 * K) plus a tail
    (0, 3, 4, 4), (2, 0, 4, 4),
]


@pytest.mark.parametrize("shape", AWKWARD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_awkward_shapes(backend, shape):
    x, m, z = random_inputs(shape, seed=4)
    s = DDIMScheduler(prediction_type="v_prediction", clip_sample_range=0.5)
    s.set_timesteps(10)
    t = int(s.timesteps[2])
    got = s.step(m, t, x, eta=0.7, noise=z, backend=backend)
    ref, scale, _ = ddim_reference(s, t, x, m, z, 0.7)
    assert got.shape == shape
    assert_step_close(got, ref, scale, f"{backend} {shape} given noise")
    zs = spec_noise(5, shape, t, 3, dtype=np.float64)
    got = s.step(m, t, x, eta=0.7, seed=5, first_index=3, backend=backend)
    ref, scale, sigma = ddim_reference(s, t, x, m, zs, 0.7)
    assert_step_close(got, ref, scale, f"{backend} {shape} seeded", **_seeded_bound(scale, sigma))


def test_large_shape_parallel_multichunk(backend):
    """2 x 3 x 130 x 130 = 101400 elements (> 65536: the OpenMP path) and 50700 per sample (more
    than three 16384-element chunks, the last one partial)."""
    shape = (2, 3, 130, 130)
    x, m, z = random_inputs(shape, seed=5)
    s = DDPMScheduler(variance_type="fixed_large", prediction_type="sample")
    s.set_timesteps(25)
    t = int(s.timesteps[5])
    zs = spec_noise(77, shape, t, 9, dtype=np.float64)
    got = s.step(m, t, x, seed=77, first_index=9, backend=backend)
    ref, scale, sigma = ddpm_reference(s, t, x, m, zs)
    assert_step_close(got, ref, scale, f"{backend} large seeded", **_seeded_bound(scale, sigma))
    got = s.step(m, t, x, noise=z, backend=backend)
    ref, scale, _ = ddpm_reference(s, t, x, m, z)
    assert_step_close(got, ref, scale, f"{backend} large given noise")
    # sample 1 alone is sample 1 of the batch
    one = s.step(m[1:], t, x[1:], seed=77, first_index=10, backend=backend)
    np.testing.assert_array_equal(one, s.step(m, t, x, seed=77, first_index=9, backend=backend)[1:])


def test_large_output_streaming_stores(backend):
    """An output of >= 16 MiB is written with non-temporal stores (native-cpu); it must hold what
    the in-place step (plain stores) writes, bit for bit, with out 16-byte aligned (NumPy's large
    arrays) and misaligned by one float (plain stores again), and match the float64 formula."""
    shape = (2, 3, 768, 1000)            # 4.6M elements, 18.4 MB of output; 2.3M per sample
    x, m, _ = random_inputs((1,) + shape[1:], seed=8)
    x, m = np.concatenate([x, -x]), np.concatenate([m, 0.5 * m])
    s = DDPMScheduler(clip_sample=True)
    s.set_timesteps(10)
    t = int(s.timesteps[4])
    out = np.empty_like(x)
    s.step(m, t, x, seed=5, out=out, backend=backend)
    inplace = x.copy()
    s.step(m, t, inplace, seed=5, out=inplace, backend=backend)
    np.testing.assert_array_equal(out, inplace)
    buf = np.empty(x.size + 1, np.float32)
    shifted = buf[1:].reshape(shape)      # 4 bytes past an aligned start
    s.step(m, t, x, seed=5, out=shifted, backend=backend)
    np.testing.assert_array_equal(shifted, inplace)
    # every element against the formula (a missed store would leave np.empty's garbage)
    zs = spec_noise(5, shape, t, 0, dtype=np.float64)
    ref, scale, sigma = ddpm_reference(s, t, x, m, zs)
    assert_step_close(out, ref, scale, f"{backend} streamed", **_seeded_bound(scale, sigma))


def _thread_backends():
    out = []
    for p in CPU_BACKENDS:
        name = p.values[0][0]
        be = get_backend(name)
        if hasattr(be, "set_num_threads"):
            out.append(p)
    return out


@pytest.mark.parametrize("spec", _thread_backends())
def test_results_do_not_depend_on_thread_count(spec):
    name = spec[0]
    be = get_backend(name)
    shape = (3, 3, 130, 131)   # 51090 per sample: chunks do not divide it
    x, m, z = random_inputs(shape, seed=6)
    s = DDPMScheduler()
    s.set_timesteps(10)
    t = int(s.timesteps[1])
    if name == "native-cpu":
        from fastddpm import _C
        restore = _C.num_threads()
    else:
        import numba
        restore = numba.config.NUMBA_NUM_THREADS
    with using(spec):
        try:
            results = []
            for n in (1, 2, 1):
                be.set_num_threads(n)
                if name == "native-cpu":
                    assert _C.num_threads() == n
                results.append((s.step(m, t, x, seed=3, backend=name), s.step(m, t, x, noise=z, backend=name),
                                be.noise(3, shape, t, 2)))
        finally:
            be.set_num_threads(restore)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            np.testing.assert_array_equal(a, b)


# -- array kinds, out=, strides ----------------------------------------------------------------------

def _sched_and_row():
    s = DDIMScheduler(prediction_type="epsilon", clip_sample=True)
    s.set_timesteps(10)
    return s, int(s.timesteps[3])


def test_numpy_in_numpy_out(backend):
    s, t = _sched_and_row()
    got = s.step(M, t, X, eta=0.3, seed=4, backend=backend)
    assert type(got) is np.ndarray and got.dtype == np.float32 and got.shape == SHAPE
    assert got.flags.c_contiguous and got.flags.writeable
    assert not np.shares_memory(got, X) and not np.shares_memory(got, M)
    ref, scale, sigma = ddim_reference(s, t, X, M, spec_noise(4, SHAPE, t, dtype=np.float64), 0.3)
    assert_step_close(got, ref, scale, backend, **_seeded_bound(scale, sigma))


def test_torch_in_torch_out_without_copy(backend):
    torch = pytest.importorskip("torch")
    s, t = _sched_and_row()
    expect = s.step(M, t, X, eta=0.3, noise=Z, backend=backend)
    x, m, z = (torch.from_numpy(a.copy()) for a in (X, M, Z))
    got = s.step(m, t, x, eta=0.3, noise=z, backend=backend)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.device.type == "cpu"
    np.testing.assert_array_equal(got.numpy(), expect)
    # out= a tensor: written in place, same storage, returned
    out = torch.full(SHAPE, float("nan"))
    ptr = out.data_ptr()
    ret = s.step(m, t, x, eta=0.3, noise=z, backend=backend, out=out)
    assert ret is out and out.data_ptr() == ptr
    np.testing.assert_array_equal(out.numpy(), expect)
    # in place on the sample
    x2 = x.clone()
    ptr = x2.data_ptr()
    ret = s.step(m, t, x2, eta=0.3, noise=z, backend=backend, out=x2)
    assert ret is x2 and x2.data_ptr() == ptr
    np.testing.assert_array_equal(x2.numpy(), expect)
    # a tensor that requires grad is read, not refused
    xg = x.clone().requires_grad_(True)
    np.testing.assert_array_equal(s.step(m, t, xg, eta=0.3, noise=z, backend=backend).detach().numpy(), expect)
    # non-contiguous tensors
    xt = torch.from_numpy(np.ascontiguousarray(X.transpose(0, 1, 3, 2))).transpose(2, 3)
    assert not xt.is_contiguous()
    np.testing.assert_array_equal(s.step(m, t, xt, eta=0.3, noise=z, backend=backend).numpy(), expect)
    # a strided out tensor
    big = torch.zeros(SHAPE[0], SHAPE[1], SHAPE[2], 2 * SHAPE[3])
    view = big[..., ::2]
    ret = s.step(m, t, x, eta=0.3, noise=z, backend=backend, out=view)
    assert ret is view
    np.testing.assert_array_equal(big[..., ::2].numpy(), expect)
    assert not big[..., 1::2].any()


def test_out_in_place_and_aliasing(backend):
    s, t = _sched_and_row()
    expect = s.step(M, t, X, eta=0.3, noise=Z, backend=backend)
    # out is the sample
    x = X.copy()
    ret = s.step(M, t, x, eta=0.3, noise=Z, backend=backend, out=x)
    assert ret is x
    np.testing.assert_array_equal(x, expect)
    # out is the model output
    m = M.copy()
    ret = s.step(m, t, X, eta=0.3, noise=Z, backend=backend, out=m)
    assert ret is m
    np.testing.assert_array_equal(m, expect)
    # out is the noise
    z = Z.copy()
    s.step(M, t, X, eta=0.3, noise=z, backend=backend, out=z)
    np.testing.assert_array_equal(z, expect)
    # out overlaps the model output shifted by one sample (same buffer, different offsets)
    n = SHAPE[0]
    buf = np.concatenate([M, M[:1]])           # [n + 1, ...]: m = buf[:n], out = buf[1:]
    ret = s.step(buf[:n], t, X, eta=0.3, noise=Z, backend=backend, out=buf[1:])
    np.testing.assert_array_equal(buf[1:], expect)
    # a fresh, preallocated out
    out = np.full(SHAPE, np.nan, np.float32)
    ret = s.step(M, t, X, eta=0.3, noise=Z, backend=backend, out=out)
    assert ret is out
    np.testing.assert_array_equal(out, expect)


def test_strided_out_and_non_contiguous_inputs(backend):
    s, t = _sched_and_row()
    expect = s.step(M, t, X, eta=0.3, noise=Z, backend=backend)
    # out: every other column of a wider array
    big = np.zeros(SHAPE[:3] + (2 * SHAPE[3],), np.float32)
    view = big[..., ::2]
    assert not view.flags.c_contiguous
    ret = s.step(M, t, X, eta=0.3, noise=Z, backend=backend, out=view)
    assert ret is view
    np.testing.assert_array_equal(big[..., ::2], expect)
    assert not big[..., 1::2].any()          # nothing written beside the view
    # out: a transposed (Fortran-ordered) array
    fout = np.zeros(SHAPE, np.float32, order="F")
    s.step(M, t, X, eta=0.3, noise=Z, backend=backend, out=fout)
    np.testing.assert_array_equal(fout, expect)
    # inputs: transposed views, sliced views, reversed strides, Fortran order
    xt = np.ascontiguousarray(X.transpose(3, 2, 1, 0)).transpose(3, 2, 1, 0)
    ms = np.zeros(SHAPE[:3] + (3 * SHAPE[3],), np.float32)
    ms[..., 1::3] = M
    mv = ms[..., 1::3]
    zr = np.ascontiguousarray(Z[:, ::-1])[:, ::-1]
    assert not (xt.flags.c_contiguous or mv.flags.c_contiguous or zr.flags.c_contiguous)
    got = s.step(mv, t, xt, eta=0.3, noise=zr, backend=backend)
    np.testing.assert_array_equal(got, expect)
    got = s.step(np.asfortranarray(M), t, np.asfortranarray(X), eta=0.3, noise=np.asfortranarray(Z), backend=backend)
    np.testing.assert_array_equal(got, expect)
    # a non-contiguous sample stepped in place into itself
    xbuf = np.zeros(SHAPE[:3] + (2 * SHAPE[3],), np.float32)
    xbuf[..., ::2] = X
    xv = xbuf[..., ::2]
    s.step(M, t, xv, eta=0.3, noise=Z, backend=backend, out=xv)
    np.testing.assert_array_equal(xv, expect)
    assert not xbuf[..., 1::2].any()
    # the inputs were not written
    np.testing.assert_array_equal(mv, M)
    np.testing.assert_array_equal(xt, X)


def test_inputs_are_not_modified(backend):
    s, t = _sched_and_row()
    x, m, z = X.copy(), M.copy(), Z.copy()
    s.step(m, t, x, eta=0.3, noise=z, backend=backend)
    s.step(m, t, x, eta=0.3, seed=1, backend=backend)
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(m, M)
    np.testing.assert_array_equal(z, Z)


def test_nan_and_inf_inputs_propagate(backend):
    """A NaN or inf in the model output is not hidden: clipping keeps NaN (as torch.clamp does)."""
    t_row = 2
    for clip in (True, False):
        s = DDPMScheduler(clip_sample=clip)
        s.set_timesteps(10)
        t = int(s.timesteps[t_row])
        m = M.copy()
        m[0, 0, 0, 0] = np.nan
        m[1, 2, 4, 6] = np.inf
        got = s.step(m, t, X, noise=Z, backend=backend)
        assert np.isnan(got[0, 0, 0, 0]), clip
        assert not np.isfinite(got[1, 2, 4, 6]), clip
        mask = np.ones(SHAPE, bool)
        mask[0, 0, 0, 0] = mask[1, 2, 4, 6] = False
        assert np.isfinite(got[mask]).all(), clip


# -- bad input: a clear exception, before any kernel runs -------------------------------------------

@pytest.fixture
def no_kernel(monkeypatch):
    """Makes every CPU backend's step fail the test if it is reached."""
    for spec in CPU_BACKENDS:
        be = get_backend(spec.values[0][0])

        def refuse(*args, _name=be.name, **kwargs):
            raise AssertionError(f"{_name}.step ran on input that should have been refused")
        monkeypatch.setattr(be, "step", refuse)


def _ddpm10():
    s = DDPMScheduler()
    s.set_timesteps(10)
    return s, int(s.timesteps[1])


def test_bad_shapes(backend, no_kernel):
    s, t = _ddpm10()
    x = X
    with pytest.raises(ValueError, match="model_output has shape"):
        s.step(M[:1], t, x, seed=0, backend=backend)
    with pytest.raises(ValueError, match="model_output has shape"):
        s.step(M.reshape(2, 105), t, x, seed=0, backend=backend)       # same size, another shape
    with pytest.raises(ValueError, match="model_output has shape"):
        s.step(M[..., None], t, x, seed=0, backend=backend)
    with pytest.raises(ValueError, match="noise has shape"):
        s.step(M, t, x, noise=Z[:, :2], backend=backend)
    with pytest.raises(ValueError, match="out has shape"):
        s.step(M, t, x, seed=0, backend=backend, out=np.zeros((2, 3, 7, 5), np.float32))
    with pytest.raises(ValueError, match="batch dimension"):
        s.step(np.float32(1.0) * np.ones((), np.float32), t, np.ones((), np.float32), seed=0, backend=backend)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.bool_, np.complex64, np.dtype(">f4")],
                         ids=["float64", "float16", "int32", "bool", "complex64", "big-endian-f4"])
def test_bad_dtypes(backend, no_kernel, dtype):
    s, t = _ddpm10()
    bad = np.zeros(SHAPE, dtype=dtype)
    with pytest.raises(TypeError, match="sample must be float32"):
        s.step(M, t, bad, seed=0, backend=backend)
    with pytest.raises(TypeError, match="model_output must be float32"):
        s.step(bad, t, X, seed=0, backend=backend)
    with pytest.raises(TypeError, match="noise must be float32"):
        s.step(M, t, X, noise=bad, backend=backend)
    with pytest.raises(TypeError, match="out must be float32"):
        s.step(M, t, X, seed=0, backend=backend, out=bad)


def test_bad_kinds(backend, no_kernel):
    torch = pytest.importorskip("torch")
    s, t = _ddpm10()
    tx, tm = torch.from_numpy(X.copy()), torch.from_numpy(M.copy())
    with pytest.raises(TypeError, match="one kind"):
        s.step(tm, t, X, seed=0, backend=backend)
    with pytest.raises(TypeError, match="one kind"):
        s.step(M, t, tx, seed=0, backend=backend)
    with pytest.raises(TypeError, match="one kind"):
        s.step(tm, t, tx, noise=Z, backend=backend)
    with pytest.raises(TypeError, match="one kind"):
        s.step(M, t, X, seed=0, backend=backend, out=torch.empty(SHAPE))
    with pytest.raises(TypeError, match="one kind"):
        s.step(tm, t, tx, seed=0, backend=backend, out=np.empty(SHAPE, np.float32))
    with pytest.raises(TypeError, match="float32"):
        s.step(tm.double(), t, tx, seed=0, backend=backend)
    with pytest.raises(TypeError, match="float32"):
        s.step(tm, t, tx.half(), seed=0, backend=backend)
    with pytest.raises(TypeError, match="NumPy array or a torch tensor"):
        s.step(M, t, X.tolist(), seed=0, backend=backend)
    with pytest.raises(TypeError, match="model_output must be a NumPy array or torch tensor"):
        s.step(M.tolist(), t, X, seed=0, backend=backend)


def test_bad_timesteps(backend, no_kernel):
    torch = pytest.importorskip("torch")
    s, t = _ddpm10()
    for bad in (901, 1000, -1, 2**40, 10**30):
        with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
            s.step(M, bad, X, seed=0, backend=backend)
    for bad in (float(t), t + 0.5, np.float32(t), torch.tensor(float(t)), str(t), None, True, [t]):
        with pytest.raises(TypeError, match="timestep must be an integer"):
            s.step(M, bad, X, seed=0, backend=backend)


def test_bad_seeds_and_first_index(backend, no_kernel):
    s, t = _ddpm10()
    for bad in (-1, 2**64, 2**70, np.int64(-1)):
        with pytest.raises(ValueError, match="seed"):
            s.step(M, t, X, seed=bad, backend=backend)
    for bad in (1.0, np.float64(3), "3", True, np.bool_(True), 1 + 0j):
        with pytest.raises(TypeError, match="seed"):
            s.step(M, t, X, seed=bad, backend=backend)
    n = SHAPE[0]
    for bad in (-1, 2**32 - n + 1, 2**32, 2**64):
        with pytest.raises(ValueError, match="first_index"):
            s.step(M, t, X, seed=0, first_index=bad, backend=backend)
    for bad in (1.0, "1", True, None):
        with pytest.raises(TypeError, match="first_index"):
            s.step(M, t, X, seed=0, first_index=bad, backend=backend)


def test_bad_out_and_eta(backend, no_kernel):
    s, t = _ddpm10()
    ro = np.zeros(SHAPE, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        s.step(M, t, X, seed=0, backend=backend, out=ro)
    with pytest.raises(ValueError, match="read-only"):
        s.step(M, t, ro, seed=0, backend=backend, out=ro)       # in place on a read-only sample
    assert not ro.any()
    d = DDIMScheduler()
    d.set_timesteps(10)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eta"):
            d.step(M, int(d.timesteps[1]), X, eta=bad, seed=0, backend=backend)
    with pytest.raises((TypeError, ValueError), match="eta|float"):
        d.step(M, int(d.timesteps[1]), X, eta="much", seed=0, backend=backend)


def test_read_only_inputs_are_fine(backend):
    s, t = _ddpm10()
    x, m, z = X.copy(), M.copy(), Z.copy()
    for a in (x, m, z):
        a.setflags(write=False)
    np.testing.assert_array_equal(s.step(m, t, x, noise=z, backend=backend), s.step(M, t, X, noise=Z, backend=backend))


def test_unknown_and_unavailable_backends(no_kernel):
    s, t = _ddpm10()
    with pytest.raises(ValueError, match="unknown backend 'fastest'.*native-cpu"):
        s.step(M, t, X, seed=0, backend="fastest")
    with pytest.raises(TypeError, match="backend must be a string"):
        s.step(M, t, X, seed=0, backend=3)
    from fastddpm.executors import BackendUnavailableError, reasons
    refused = 0
    for name in fastddpm.backends():
        why = reasons(name, "cpu")
        if not why:
            continue
        with pytest.raises(BackendUnavailableError) as err:
            s.step(M, t, X, seed=0, backend=name)
        for reason in why:                 # every reason, not only the first
            assert reason in str(err.value), (name, reason)
        refused += 1
    assert refused >= 1                    # native-cuda never takes NumPy arrays


def test_failed_call_leaves_out_untouched(backend):
    s, t = _ddpm10()
    out = np.full(SHAPE, 7.0, np.float32)
    with pytest.raises(ValueError):
        s.step(M, t, X, seed=-5, backend=backend, out=out)
    with pytest.raises(ValueError):
        s.step(M, 901, X, seed=0, backend=backend, out=out)
    assert (out == 7.0).all()


def test_compiled_binding_refuses_a_nan_coefficient_row():
    from fastddpm.executors import reasons
    if reasons("native-cpu"):
        pytest.skip(f"native-cpu is unavailable: {reasons('native-cpu')}")
    from fastddpm import _C
    s, t = _ddpm10()
    out = np.full(SHAPE, 7.0, np.float32)
    for j in range(COEF_WIDTH):
        for bad in (np.nan, np.inf, -np.inf):
            row = s.coefficients()[1].copy()
            row[j] = bad
            with pytest.raises(ValueError, match="non-finite"):
                _C.fused_step(X, M, out, row, 0, t, 0, None)
            with pytest.raises(ValueError, match="non-finite"):
                _C.fused_step(X, M, out, row, 0, t, 0, Z)
    assert (out == 7.0).all()


_C_ABUSE = r'''
import sys
import numpy as np
from fastddpm import _C

x = np.ones((2, 3, 5, 7), np.float32)
m = np.ones_like(x)
out = np.zeros_like(x)
row = np.array([1, 0, 1, 0, 0, 0.5, 0, 0, 0, 0, 0, 0], np.float32)
table = np.stack([row] * 4)
ro = np.zeros_like(x)
ro.setflags(write=False)
nan_table = table.copy()
nan_table[2, 3] = np.nan
cases = [
    ("x float64", TypeError, lambda: _C.fused_step(x.astype(np.float64), m, out, row, 0, 1, 0, None)),
    ("m int32", TypeError, lambda: _C.fused_step(x, m.astype(np.int32), out, row, 0, 1, 0, None)),
    ("out big-endian", TypeError, lambda: _C.fused_step(x, m, out.astype(">f4"), row, 0, 1, 0, None)),
    ("out float16", TypeError, lambda: _C.fused_step(x, m, out.astype(np.float16), row, 0, 1, 0, None)),
    ("x None", TypeError, lambda: _C.fused_step(None, m, out, row, 0, 1, 0, None)),
    ("x list", TypeError, lambda: _C.fused_step(x.tolist(), m, out, row, 0, 1, 0, None)),
    ("x strided", ValueError, lambda: _C.fused_step(np.ones((2, 3, 5, 14), np.float32)[..., ::2], m, out, row, 0, 1, 0, None)),
    ("m transposed", ValueError, lambda: _C.fused_step(x, np.ones((7, 5, 3, 2), np.float32).T, out, row, 0, 1, 0, None)),
    ("out reversed", ValueError, lambda: _C.fused_step(x, m, np.zeros_like(x)[::-1], row, 0, 1, 0, None)),
    ("m shape", ValueError, lambda: _C.fused_step(x, m[:1], out, row, 0, 1, 0, None)),
    ("m same size other shape", ValueError, lambda: _C.fused_step(x, m.reshape(2, 105), out, row, 0, 1, 0, None)),
    ("out shape", ValueError, lambda: _C.fused_step(x, m, out[:, :2], row, 0, 1, 0, None)),
    ("out larger", ValueError, lambda: _C.fused_step(x, m, np.zeros((3, 3, 5, 7), np.float32), row, 0, 1, 0, None)),
    ("noise shape", ValueError, lambda: _C.fused_step(x, m, out, row, 0, 1, 0, m[:1])),
    ("noise float64", TypeError, lambda: _C.fused_step(x, m, out, row, 0, 1, 0, m.astype(np.float64))),
    ("noise list", TypeError, lambda: _C.fused_step(x, m, out, row, 0, 1, 0, [1.0])),
    ("noise str", (TypeError, RuntimeError), lambda: _C.fused_step(x, m, out, row, 0, 1, 0, "noise")),
    ("coef short", ValueError, lambda: _C.fused_step(x, m, out, row[:11], 0, 1, 0, None)),
    ("coef empty", ValueError, lambda: _C.fused_step(x, m, out, row[:0], 0, 1, 0, None)),
    ("coef float64", TypeError, lambda: _C.fused_step(x, m, out, row.astype(np.float64), 0, 1, 0, None)),
    ("coef strided", ValueError, lambda: _C.fused_step(x, m, out, np.repeat(row, 2)[::2], 0, 1, 0, None)),
    ("coef negative clip", ValueError, lambda: _C.fused_step(x, m, out, np.array([1, 0, 1, 0, 0, 0, -1, 0, 0, 0, 0, 0], np.float32), 0, 1, 0, None)),
    ("table row out of range", ValueError, lambda: _C.fused_step(x, m, out, table, 0, 1, 0, None, 4)),
    ("table too narrow", ValueError, lambda: _C.fused_step(x, m, out, table[:, :11].copy(), 0, 1, 0, None, 0)),
    ("table 1-d", ValueError, lambda: _C.fused_step(x, m, out, table.ravel(), 0, 1, 0, None, 1)),
    ("table NaN row", ValueError, lambda: _C.fused_step(x, m, out, nan_table, 0, 1, 0, None, 2)),
    ("out read-only", ValueError, lambda: _C.fused_step(x, m, ro, row, 0, 1, 0, None)),
    ("x 0-d", ValueError, lambda: _C.fused_step(np.ones((), np.float32), np.ones((), np.float32), np.zeros((), np.float32), row, 0, 1, 0, None)),
    ("seed negative", TypeError, lambda: _C.fused_step(x, m, out, row, -1, 1, 0, None)),
    ("seed 2**64", TypeError, lambda: _C.fused_step(x, m, out, row, 2**64, 1, 0, None)),
    ("seed float", TypeError, lambda: _C.fused_step(x, m, out, row, 1.5, 1, 0, None)),
    ("noise_step negative", TypeError, lambda: _C.fused_step(x, m, out, row, 0, -1, 0, None)),
    ("noise_step 2**32", TypeError, lambda: _C.fused_step(x, m, out, row, 0, 2**32, 0, None)),
    ("first_index negative", ValueError, lambda: _C.fused_step(x, m, out, row, 0, 1, -1, None)),
    ("first_index overflow", ValueError, lambda: _C.fused_step(x, m, out, row, 0, 1, 2**32 - 1, None)),
    ("first_index 2**63", (TypeError, ValueError), lambda: _C.fused_step(x, m, out, row, 0, 1, 2**63, None)),
    ("too few arguments", TypeError, lambda: _C.fused_step(x, m, out, row, 0, 1)),
    ("normals negative batch", ValueError, lambda: _C.normals(0, -1, 4, 0, 0)),
    ("normals negative size", ValueError, lambda: _C.normals(0, 1, -4, 0, 0)),
    ("normals first_index overflow", ValueError, lambda: _C.normals(0, 2, 4, 0, 2**32 - 1)),
    ("normals first_index negative", ValueError, lambda: _C.normals(0, 2, 4, 0, -1)),
    ("philox negative size", ValueError, lambda: _C.philox_uint32(0, 1, -1, 0, 0)),
    ("philox first_index overflow", ValueError, lambda: _C.philox_uint32(0, 3, 4, 0, 2**32 - 2)),
    ("philox step negative", TypeError, lambda: _C.philox_uint32(0, 1, 4, -1, 0)),
    ("set_isa unknown", ValueError, lambda: _C.set_isa("avx1024")),
    ("set_num_threads 0", ValueError, lambda: _C.set_num_threads(0)),
    ("set_num_threads negative", (ValueError, TypeError), lambda: _C.set_num_threads(-3)),
]
for isa in ("generic", "avx2", "avx512"):
    if isa not in _C.supported_isas():
        cases.append((f"set_isa {isa} unsupported here", ValueError, lambda isa=isa: _C.set_isa(isa)))
for name, expected, call in cases:
    before = out.copy()
    try:
        call()
    except expected:
        pass
    except BaseException as exc:
        print(f"WRONG {name}: {type(exc).__name__}: {exc}")
        continue
    else:
        print(f"WRONG {name}: no exception")
        continue
    if not np.array_equal(before, out, equal_nan=True):
        print(f"WRONG {name}: out was written")
        continue
    print(f"OK {name}")
# the good calls still work afterwards
_C.fused_step(x, m, out, row, 0, 1, 0, None)
_C.fused_step(x, m, out, table, 0, 1, 0, None, 3)
assert np.isfinite(out).all()
print("DONE", len(cases))
'''


def test_compiled_binding_abuse_never_crashes(tmp_path):
    """Wrong sizes, dtypes, strides, ranges straight into fastddpm._C, in a subprocess: each must be
    a TypeError or ValueError (never a segfault or an abort), and must not write out."""
    import os
    import subprocess
    import sys
    from fastddpm.executors import reasons
    if reasons("native-cpu"):
        pytest.skip(f"native-cpu is unavailable: {reasons('native-cpu')}")
    script = tmp_path / "abuse.py"
    script.write_text(_C_ABUSE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"returncode {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    wrong = [line for line in lines if line.startswith("WRONG")]
    assert not wrong, "\n".join(wrong)
    assert lines[-1].startswith("DONE")
    assert sum(line.startswith("OK ") for line in lines) == int(lines[-1].split()[1]) >= 45


def test_the_no_kernel_guard_works(backend, no_kernel):
    """The control of the tests above: a valid call under the guard does reach the (patched) kernel."""
    s, t = _ddpm10()
    with pytest.raises(AssertionError, match="should have been refused"):
        s.step(M, t, X, seed=0, backend=backend)
