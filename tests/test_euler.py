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
from _stepkit import CPU_BACKEND_NAMES, CPU_BACKENDS, assert_step_sequence

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
    ours, ref = ours_cls(**cfg), ref_cls(**cfg)
    ab = torch.from_numpy(ours.alphas_cumprod.copy())
    ref.alphas_cumprod = ab
    with _patched(module):
        ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    # diffusers' (float64) timesteps are the model's; Karras timesteps come from a log-sigma
    # interpolation that fastddpm evaluates one sigma at a time (the same float64 maths)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-9)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-12)
    rng = np.random.default_rng(seed)
    out = []
    for k, t in enumerate(ref.timesteps):
        x, m, z = (rng.standard_normal((2, 1, 5, 7)) for _ in range(3))
        s, n = float(ref.sigmas[k]), float(ref.sigmas[k + 1])
        with _patched(module, torch.from_numpy(z)):
            prev = ref.step(torch.from_numpy(m), t, torch.from_numpy(x * math.sqrt(s * s + 1))).prev_sample
        out.append((x, m, z, prev.numpy() / math.sqrt(n * n + 1)))
    return ours, out


SPACINGS = ("linspace", "trailing", "leading")
GRID = [("euler", {}), ("euler", dict(prediction_type="v_prediction")), ("euler", dict(prediction_type="sample")),
        ("euler", dict(final_sigmas_type="sigma_min")), ("euler", dict(beta_schedule="squaredcos_cap_v2")),
        ("euler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")),
        ("euler", dict(steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                       timestep_spacing="leading")),
        ("euler-a", {}), ("euler-a", dict(prediction_type="v_prediction")),
        ("euler-a", dict(beta_schedule="squaredcos_cap_v2", steps_offset=1, timestep_spacing="leading")),
        ("euler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", timestep_spacing="leading")),
        ("euler", dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")),
        ("euler", dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=20.0))]
# every spacing, with and without Karras sigmas (Euler), on both samplers
GRID += [(kind, dict(timestep_spacing=sp, **karras)) for sp in SPACINGS for kind, karras in (
    ("euler", {}), ("euler", dict(use_karras_sigmas=True)), ("euler-a", {}))]


def _id(kind, cfg):
    return f"{kind}-" + ",".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("kind,cfg", GRID, ids=[_id(*c) for c in GRID])
def test_rows_are_diffusers_float64(kind, cfg, steps):
    ours, seq = _sequence(kind, cfg, steps)
    rows = ours.coefficients_float64()
    for k, (x, m, z, want) in enumerate(seq):
        ax, am, cx0, dx, dm, sigma = rows[k][:6]
        got = cx0 * (ax * x + am * m) + dx * x + dm * m + sigma * z
        assert np.abs(got - want).max() <= 1e-9 * (np.abs(want).max() + 1.0), f"step {k}"


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("kind,cfg", GRID, ids=[_id(*c) for c in GRID])
def test_schedule_is_what_diffusers_feeds_the_model(kind, cfg, steps):
    """The model's float32 times are diffusers' own (float32) scheduler's timesteps; x_T's scale is
    diffusers' init_noise_sigma over the model-input scaling of the first step, 1 for "leading";
    the noise keys are distinct, descending and the timesteps themselves where those are integers."""
    ours_cls, ref_cls, _ = CLASSES[kind]
    ours, ref = ours_cls(**cfg), ref_cls(**cfg)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    sched = ours.schedule()
    assert sched.model_t.dtype == np.float32
    if cfg.get("use_karras_sigmas"):
        # diffusers' float32 alpha_bar moves a Karras time by up to ~2e-4 relative; its float64 run gives
        # fastddpm's float64 times to 1e-9 (_sequence), which the model sees rounded to float32
        np.testing.assert_array_equal(sched.model_t, sched.model_timesteps.astype(np.float32))
        np.testing.assert_allclose(sched.model_t, ref.timesteps.numpy(), rtol=1e-3, atol=1e-3)
    else:
        np.testing.assert_array_equal(sched.model_t, ref.timesteps.numpy())
    s0 = float(ours._sigmas[0])
    # diffusers' float32 sigmas are off by up to ~1e-5 where alpha_bar is tiny (cosine); _sequence
    # checks init_noise_sigma against its float64 run to 1e-12
    assert ours.x_scale == pytest.approx(float(ref.init_noise_sigma) / math.sqrt(s0 * s0 + 1), rel=1e-4)
    if ours.config["timestep_spacing"] == "leading":
        assert sched.x_scale == 1.0
    keys = sched.timesteps
    assert keys.dtype == np.int64 and np.all(np.diff(keys) < 0) and keys[-1] >= 0
    if sched.model_timesteps is None:
        np.testing.assert_array_equal(keys, ours.timesteps)
    else:
        rounded = np.round(sched.model_timesteps).astype(np.int64)   # half to even
        want = [rounded[0]]
        for r in rounded[1:]:
            want.append(min(r, want[-1] - 1))   # a repeated rounding: one below the previous key
        np.testing.assert_array_equal(keys, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,cfg", GRID, ids=[_id(*c) for c in GRID])
def test_fused_step_on_every_backend(backend, kind, cfg):
    """Every step of whole 10-, 25- and 50-step sequences in float32, fed diffusers' own timestep
    values: max abs <= 1e-5 of diffusers' float64 step where the terms are unit-scale. A cosine
    schedule's first "linspace" / "trailing" step starts at sigma ~1e4, where x' ~ (sigma / sigma_next)
    (x - m) reaches ~1e3 on independent random x and m: there the float32 bound of _stepkit (16
    units of 2**-24 of the terms' size) is the honest one (measured: up to 1.0e-3 absolute on
    outputs up to 2.2e3, at most 2.4 units; every other case <= 1.5e-6)."""
    for steps in (10, 25, 50):
        ours, seq = _sequence(kind, cfg, steps)
        assert_step_sequence(ours, seq, backend, f"{steps} steps,")


def test_float32_timesteps_find_their_row():
    """diffusers' loop passes its float32 timesteps to step: they find the same row as the float64 ones."""
    ours, ref = fastddpm.EulerDiscreteScheduler(), diffusers.EulerDiscreteScheduler()
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    for k, t in enumerate(ref.timesteps):
        assert ours.row_index(t) == k == ours.row_index(float(ours.timesteps[k])) == ours.row_index(int(ours.noise_steps[k]))
    with pytest.raises(ValueError, match="not one of"):
        ours.row_index(500.25)


RUN_BACKENDS = [n for n in ("native-cpu", "numba") if fastddpm.backends()[n]["available"]]


def _digits_with(cls, **overrides):
    """The bundled digits model with a scheduler of class cls built from its config (and overrides)."""
    pipe = fastddpm.load("digits")
    pipe.scheduler = cls.from_compatible_config({**pipe.scheduler.config, **overrides})
    return pipe


# (sampler, class, config, bound). digits' schedule is cosine with T = 200: "linspace" and
# "trailing" start at t = 199, sigma = 4058, where Euler's first step weighs the model output by
# ~330 (x_1 = 330 x - 329 m): the float32 model outputs of the engine and of the reference U-Net
# (3.8e-6 apart) already differ by ~1.3e-3 after that step, whatever the step kernel does (both
# steps are within 9e-5 of the float64 step on the same output). Measured after 20 steps:
# <= 1.99e-3 (native-cpu), 1.65e-3 (numba); the bound is 2x that. DPM++ Karras: 2.1e-6.
WHOLE_RUNS = [("euler", fastddpm.EulerDiscreteScheduler, dict(timestep_spacing=sp), 4e-3) for sp in ("linspace", "trailing")]
WHOLE_RUNS += [("euler-a", fastddpm.EulerAncestralDiscreteScheduler, dict(timestep_spacing=sp), 4e-3)
               for sp in ("linspace", "trailing")]
WHOLE_RUNS += [("dpm++2m", fastddpm.DPMSolverMultistepScheduler, dict(use_karras_sigmas=True, solver_order=2), 1e-3)]


@pytest.mark.parametrize("backend", RUN_BACKENDS)
@pytest.mark.parametrize("sampler,cls,cfg,bound", WHOLE_RUNS, ids=[_id(s, c) for s, _, c, _ in WHOLE_RUNS])
def test_whole_run_matches_the_reference_sampler(backend, sampler, cls, cfg, bound):
    """20 steps on the digits model: the engine against the reference sampler (the papers'
    formulas in torch, the same noise, x_T scaled alike), max abs <= bound (1e-3 but where the
    schedule amplifies float32 noise, WHOLE_RUNS); batch invariance and first_index hold on the
    fractional, scaled schedules too."""
    pipe = _digits_with(cls, **cfg)
    got = pipe(3, sampler=sampler, steps=20, seed=5, backend=backend, output="float")
    want = pipe(3, sampler=sampler, steps=20, seed=5, backend="torch", output="float")
    err = float(np.abs(got - want).max())
    print(f"{sampler} {cfg} on {backend}: max abs {err:.2e} after 20 steps")
    assert err <= bound
    np.testing.assert_array_equal(pipe(2, sampler=sampler, steps=20, seed=5, backend=backend, output="float"), got[:2])
    np.testing.assert_array_equal(pipe(2, sampler=sampler, steps=20, seed=5, backend=backend, output="float",
                                       first_index=1), got[1:])


@pytest.mark.parametrize("backend", RUN_BACKENDS)
@pytest.mark.parametrize("sampler", ["euler", "euler-a"])
def test_default_sampler_runs_match_the_reference_sampler(backend, sampler):
    """sample(sampler=...) from the DDPM-trained digits model ("leading": integer timesteps, x_T unscaled)."""
    pipe = fastddpm.load("digits")
    got = pipe(3, sampler=sampler, steps=20, seed=5, backend=backend, output="float")
    want = pipe(3, sampler=sampler, steps=20, seed=5, backend="torch", output="float")
    assert float(np.abs(got - want).max()) <= 1e-3
    np.testing.assert_array_equal(pipe(2, sampler=sampler, steps=20, seed=5, backend=backend, output="float"), got[:2])


def test_trajectory_position_0_is_the_scaled_x_t():
    pipe = _digits_with(fastddpm.EulerDiscreteScheduler, timestep_spacing="linspace")
    r = pipe(2, sampler="euler", steps=5, seed=3, trajectory=[0, 2], output="float", backend="native-cpu"
             if "native-cpu" in RUN_BACKENDS else "torch")
    sched = pipe.scheduler_for("euler", 5).schedule()
    assert sched.x_scale < 1.0
    assert r.timesteps == [-1, float(sched.model_timesteps[1])]   # the (fractional) time of the step made it
    want = np.clip(fastddpm.noise(3, (2, 1, 16, 16), -1) * np.float32(sched.x_scale), -1, 1)
    np.testing.assert_allclose(np.clip(r.trajectory[0], -1, 1), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,bad,match", [
    ("euler", dict(interpolation_type="log_linear"), "interpolation_type"),
    ("euler", dict(use_exponential_sigmas=True), "use_exponential_sigmas"),
    ("euler", dict(use_beta_sigmas=True), "use_beta_sigmas"),
    ("euler", dict(timestep_type="continuous"), "timestep_type"),
    ("euler", dict(sigma_min=-1.0, use_karras_sigmas=True), "sigma_min"),
    ("euler-a", dict(use_karras_sigmas=True), "use_karras_sigmas"),
    ("euler-a", dict(prediction_type="sample"), "prediction_type"), ("euler", dict(final_sigmas_type="max"), "final_sigmas_type")])
def test_refused_options_are_named(kind, bad, match):
    with pytest.raises(fastddpm.SchedulerConfigError, match=match):
        CLASSES[kind][0](**bad)


@pytest.mark.parametrize("kind", ["euler", "euler-a"])
def test_diffusers_default_config_loads_and_runs(kind, tmp_path):
    """diffusers' own default Euler configs ("linspace", fractional timesteps, scaled x_T) load and run."""
    ours_cls, ref_cls, _ = CLASSES[kind]
    ref_cls().save_pretrained(tmp_path)
    s = ours_cls.from_config(tmp_path)
    assert s.config["timestep_spacing"] == "linspace"
    s.set_timesteps(10)
    assert s.schedule().model_timesteps is not None and s.schedule().x_scale < 1.0
    # a model directory with that scheduler config loads with it and samples with it
    from test_pipeline import tiny_pipeline
    pipe = tiny_pipeline()
    pipe.scheduler = s
    loaded = fastddpm.load(pipe.save(tmp_path / "model"))
    assert type(loaded.scheduler) is ours_cls and loaded.scheduler.config == s.config
    for backend in CPU_BACKEND_NAMES:
        x = loaded(2, sampler=kind, steps=6, seed=1, backend=backend, output="float")
        assert x.shape == (2, 1, 8, 8) and np.isfinite(x).all()


def test_diffusers_config_loads(tmp_path):
    diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="leading").save_pretrained(tmp_path)
    s = fastddpm.EulerAncestralDiscreteScheduler.from_config(tmp_path)
    assert s.config["timestep_spacing"] == "leading"


@pytest.mark.parametrize("sampler,cfg", [("euler", dict(timestep_spacing="linspace")),
                                         ("euler", dict(timestep_spacing="trailing", use_karras_sigmas=True)),
                                         ("euler-a", dict(timestep_spacing="linspace")),
                                         ("euler-a", dict(timestep_spacing="trailing"))],
                         ids=["euler-linspace", "euler-trailing-karras", "euler-a-linspace", "euler-a-trailing"])
def test_sampling_matches_a_diffusers_loop_with_the_same_noise(sampler, cfg):
    """fastddpm.sample against diffusers' own loop (DDPMPipeline's, with init_noise_sigma and
    scale_model_input as its Euler pipelines use them): UNet2DModel (float32, fed diffusers'
    float32 timesteps) and its Euler scheduler in float64, driven with fastddpm's noise (x_T at
    noise step -1, each step's at fastddpm's noise key)."""
    from test_pipeline import TINY, tiny_pipeline
    from fastddpm.philox import noise as spec_noise
    kind = sampler
    ours_cls, ref_cls, module = CLASSES[kind]
    pipe = tiny_pipeline()
    pipe.scheduler = ours_cls(**cfg)
    unet = diffusers.UNet2DModel(**TINY)
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in pipe.weights.items()})
    steps, seed, shape = 12, 11, (3, 1, 8, 8)
    ref = ref_cls(**cfg)
    ref.alphas_cumprod = torch.from_numpy(pipe.scheduler.alphas_cumprod.copy())
    with _patched(module):
        ref.set_timesteps(steps)
    keys = pipe.scheduler_for(sampler, steps).schedule().timesteps
    sample = torch.from_numpy(spec_noise(seed, shape, -1).astype(np.float64)) * ref.init_noise_sigma
    for k, t in enumerate(ref.timesteps):
        z = torch.from_numpy(spec_noise(seed, shape, int(keys[k])).astype(np.float64))
        with _patched(module, z), torch.no_grad():
            x = ref.scale_model_input(sample, t)
            m = unet(x.float(), t.float()).sample.double()      # diffusers' float32 timestep
            sample = ref.step(m, t, sample).prev_sample
    want = np.clip(sample.numpy(), -1, 1)
    for backend in CPU_BACKEND_NAMES:
        got = pipe(3, steps=steps, sampler=sampler, seed=seed, backend=backend, output="float")
        err = float(np.abs(got - want).max())
        print(f"{sampler} {cfg} on {backend}: max abs {err:.2e} against diffusers' loop")
        assert err <= 1e-4, (backend, err)
