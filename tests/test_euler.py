"""Euler and Euler-ancestral (fastddpm.EulerDiscreteScheduler / EulerAncestralDiscreteScheduler)
against diffusers' own schedulers run in float64: the rows over whole timestep sequences for every
supported option, the fused step on every CPU backend (max abs <= 1e-5 of the float64 truth), whole
runs against the reference sampler, and the options fastddpm refuses, with their reason.

diffusers runs these in k-diffusion space (sample_k = x * sqrt(sigma^2 + 1)) and feeds the model
scale_model_input(sample_k) = x; fastddpm keeps x. So diffusers' step is fed sample_k and its
result is divided by sqrt(sigma_next^2 + 1) before it is compared."""
import math
from unittest import mock

import numpy as np
import pytest

import fastddpm
from _stepkit import CPU_BACKENDS, using

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only oracle of the schedulers")
import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_module  # noqa: E402
import diffusers.schedulers.scheduling_euler_discrete as e_module  # noqa: E402
from test_dpm_solver import _Float64  # noqa: E402

CLASSES = {"euler": (fastddpm.EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler, e_module),
           "euler-a": (fastddpm.EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler, ea_module)}


def _patched(module, z=None):
    patches = dict(np=_Float64(np, np.float64), torch=_Float64(torch, torch.float64))
    if z is not None:
        patches["randn_tensor"] = lambda *a, **k: z
    return mock.patch.multiple(module, **patches)


def _sequence(kind, cfg, steps, seed=0):
    ours_cls, ref_cls, module = CLASSES[kind]
    cfg = {"timestep_spacing": "leading", **cfg}
    ours, ref = ours_cls(**cfg), ref_cls(**cfg)
    ab = torch.from_numpy(ours.alphas_cumprod.copy())
    ref.alphas_cumprod = ab
    with _patched(module):
        ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.int64))
    rng = np.random.default_rng(seed)
    out = []
    for k, t in enumerate(ref.timesteps):
        x, m, z = (rng.standard_normal((2, 1, 5, 7)) for _ in range(3))
        s, n = float(ref.sigmas[k]), float(ref.sigmas[k + 1])
        with _patched(module, torch.from_numpy(z)):
            prev = ref.step(torch.from_numpy(m), t, torch.from_numpy(x * math.sqrt(s * s + 1))).prev_sample
        out.append((x, m, z, prev.numpy() / math.sqrt(n * n + 1)))
    return ours, out


GRID = [("euler", {}), ("euler", dict(prediction_type="v_prediction")), ("euler", dict(prediction_type="sample")),
        ("euler", dict(final_sigmas_type="sigma_min")), ("euler", dict(beta_schedule="squaredcos_cap_v2")),
        ("euler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")),
        ("euler", dict(steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        ("euler-a", {}), ("euler-a", dict(prediction_type="v_prediction")),
        ("euler-a", dict(beta_schedule="squaredcos_cap_v2", steps_offset=1))]


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("kind,cfg", GRID, ids=[f"{k}-{c}" for k, c in GRID])
def test_rows_are_diffusers_float64(kind, cfg, steps):
    ours, seq = _sequence(kind, cfg, steps)
    rows = ours.coefficients_float64()
    for k, (x, m, z, want) in enumerate(seq):
        ax, am, cx0, dx, dm, sigma = rows[k][:6]
        got = cx0 * (ax * x + am * m) + dx * x + dm * m + sigma * z
        assert np.abs(got - want).max() <= 1e-9 * (np.abs(want).max() + 1.0), f"step {k}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,cfg", [GRID[0], GRID[1], GRID[7], GRID[9]], ids=["euler", "euler-v", "euler-a", "euler-a-cos"])
def test_fused_step_on_every_backend(backend, kind, cfg):
    ours, seq = _sequence(kind, cfg, 25)
    with using(backend):
        for k, (x, m, z, want) in enumerate(seq):
            got = ours.step(m.astype(np.float32), int(ours.timesteps[k]), x.astype(np.float32),
                            noise=z.astype(np.float32), backend=backend[0])
            assert np.abs(got.astype(np.float64) - want).max() <= 1e-5, f"step {k}"


@pytest.mark.parametrize("backend", [n for n in ("native-cpu", "numba") if fastddpm.backends()[n]["available"]])
@pytest.mark.parametrize("sampler", ["euler", "euler-a"])
def test_whole_run_matches_the_reference_sampler(backend, sampler):
    pipe = fastddpm.load("digits")
    got = pipe(3, sampler=sampler, steps=20, seed=5, backend=backend, output="float")
    want = pipe(3, sampler=sampler, steps=20, seed=5, backend="torch", output="float")
    err = float(np.abs(got - want).max())
    print(f"{sampler} on {backend}: max abs {err:.2e} after 20 steps")
    assert err <= 1e-3
    np.testing.assert_array_equal(pipe(2, sampler=sampler, steps=20, seed=5, backend=backend, output="float"), got[:2])


@pytest.mark.parametrize("kind,bad,match", [
    ("euler", dict(timestep_spacing="linspace"), "fractional"), ("euler", dict(timestep_spacing="trailing"), "scales x_T"),
    ("euler", dict(use_karras_sigmas=True), "use_karras_sigmas"), ("euler", dict(interpolation_type="log_linear"), "interpolation_type"),
    ("euler-a", dict(prediction_type="sample"), "prediction_type"), ("euler", dict(final_sigmas_type="max"), "final_sigmas_type")])
def test_refused_options_are_named(kind, bad, match):
    with pytest.raises(fastddpm.SchedulerConfigError, match=match):
        CLASSES[kind][0](**{"timestep_spacing": "leading", **bad})


def test_diffusers_config_loads(tmp_path):
    diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="leading").save_pretrained(tmp_path)
    s = fastddpm.EulerAncestralDiscreteScheduler.from_config(tmp_path)
    assert s.config["timestep_spacing"] == "leading"
