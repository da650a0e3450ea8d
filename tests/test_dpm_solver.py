"""DPM-Solver++ (fastddpm.DPMSolverMultistepScheduler) against diffusers' own scheduler run in
float64 (its float32 run is off by up to ~1e-3 near t = 0, where 1 - alpha_bar cancels): the
coefficient rows in float64 over whole timestep sequences for every option combination, then the
fused step with its x0 history on every CPU backend (float32, the bound of tests/_stepkit.py's
step tolerance: max abs <= 1e-5 on unit-scale inputs), then whole sampling runs."""
import itertools
from unittest import mock

import numpy as np
import pytest

import fastddpm
from _stepkit import CPU_BACKENDS, STEP_RTOL, using

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only oracle of the schedulers")
dpm_module = pytest.importorskip("diffusers.schedulers.scheduling_dpmsolver_multistep")


class _Float64:
    """A stand-in for a module in which float32 means float64: diffusers' scheduler casts its
    sigmas and samples to float32; with this it keeps float64 and its own maths is the truth."""

    def __init__(self, module, f64):
        self._module, self._f64 = module, f64

    def __getattr__(self, name):
        return self._f64 if name == "float32" else getattr(self._module, name)


def diffusers_float64(cfg: dict, steps: int):
    """diffusers' DPMSolverMultistepScheduler for cfg with fastddpm's float64 alpha_bar (the same
    betas formulas, kept in float64), set to `steps`, whose steps run in float64."""
    ours = fastddpm.DPMSolverMultistepScheduler(**cfg)
    ref = diffusers.DPMSolverMultistepScheduler(**cfg)
    ab = torch.from_numpy(ours.alphas_cumprod.copy())
    ref.alphas_cumprod = ab
    ref.alpha_t, ref.sigma_t = ab.sqrt(), (1 - ab).sqrt()
    ref.lambda_t = ref.alpha_t.log() - ref.sigma_t.log()
    ref.sigmas = ((1 - ab) / ab) ** 0.5
    with _float64_diffusers():
        ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    return ours, ref


def _float64_diffusers():
    return mock.patch.multiple(dpm_module, np=_Float64(np, np.float64), torch=_Float64(torch, torch.float64))


OPTIONS = dict(
    solver_order=[1, 2, 3], algorithm_type=["dpmsolver++", "sde-dpmsolver++"], solver_type=["midpoint", "heun"],
    prediction_type=["epsilon", "sample", "v_prediction"], final_sigmas_type=["zero", "sigma_min"],
    lower_order_final=[True, False], timestep_spacing=["linspace", "leading", "trailing"])


def _grid():
    """Every value of every option at least once, and every pair of the central ones (order x
    algorithm x solver x final sigmas), on a few beta schedules and step counts."""
    cases = []
    for order, algo, solver, final in itertools.product(*(OPTIONS[k] for k in (
            "solver_order", "algorithm_type", "solver_type", "final_sigmas_type"))):
        cases.append(dict(solver_order=order, algorithm_type=algo, solver_type=solver, final_sigmas_type=final))
    for key in ("prediction_type", "lower_order_final", "timestep_spacing"):
        for v in OPTIONS[key]:
            cases.append({key: v, "solver_order": 3})
    cases += [dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, solver_order=3, algorithm_type="sde-dpmsolver++"),
              # diffusers keeps cosine Karras times fractional until its int64 timesteps truncate them
              dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"),
              dict(use_karras_sigmas=True, timestep_spacing="trailing", prediction_type="v_prediction"),
              dict(use_lu_lambdas=True), dict(use_lu_lambdas=True, beta_schedule="squaredcos_cap_v2"),
              dict(use_lu_lambdas=True, solver_order=3, algorithm_type="sde-dpmsolver++"),
              dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
              dict(beta_schedule="squaredcos_cap_v2", solver_order=3),
              dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
              dict(euler_at_final=True, final_sigmas_type="sigma_min"), dict(lambda_min_clipped=-5.1),
              dict(timestep_spacing="leading", steps_offset=1), dict(thresholding=True, solver_order=3),
              dict(thresholding=True, algorithm_type="sde-dpmsolver++", prediction_type="sample")]
    return cases


GRID = _grid()


def _inputs(rng, shape=(2, 1, 5, 7)):
    return (rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(shape))


def _truth_and_rows(cfg, steps, seed=0):
    """Per step: (inputs x, m, z; diffusers' float64 result) over the whole sequence."""
    ours, ref = diffusers_float64(cfg, steps)
    rng = np.random.default_rng(seed)
    out = []
    with _float64_diffusers():
        for t in ref.timesteps:
            x, m, z = _inputs(rng)
            want = ref.step(torch.from_numpy(m), t, torch.from_numpy(x), variance_noise=torch.from_numpy(z)).prev_sample
            out.append((x, m, z, want.numpy()))
    return ours, ref, out


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("cfg", GRID, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in GRID])
def test_rows_are_diffusers_float64(cfg, steps):
    """The float64 rows applied in float64 reproduce diffusers' float64 step at every step."""
    ours, ref, seq = _truth_and_rows(cfg, steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    rows = ours.coefficients_float64()
    x0s = []
    for k, (x, m, z, want) in enumerate(seq):
        ax, am, cx0, dx, dm, sigma, clip, _, h1, h2 = rows[k][:10]
        x0 = ax * x + am * m
        if clip > 0:
            x0 = np.clip(x0, -clip, clip)
        got = cx0 * x0 + dx * x + dm * m + sigma * z
        if len(x0s) >= 1:
            got = got + h1 * x0s[-1]
        if len(x0s) >= 2:
            got = got + h2 * x0s[-2]
        x0s.append(x0)
        scale = np.abs(want).max() + 1.0
        assert np.abs(got - want).max() <= 1e-9 * scale, f"step {k} (t={int(ours.timesteps[k])})"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", [dict(), dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++"),
                                 dict(solver_order=3, algorithm_type="sde-dpmsolver++", solver_type="heun",
                                      prediction_type="v_prediction"),
                                 dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False),
                                 dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2"),
                                 dict(use_lu_lambdas=True, beta_schedule="squaredcos_cap_v2")],
                         ids=["2m", "3m", "2m-sde", "3m-sde-heun-v", "2m-karras-sigma-min", "2m-karras", "2m-karras-cos",
                              "2m-lu-cos"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_fused_step_with_history_on_every_backend(backend, cfg, steps):
    """Scheduler.step (stateful, as diffusers') through the fused kernel in float32 with the x0
    history: max abs <= 1e-5 of diffusers' float64 step, on unit-scale inputs, every step."""
    ours, _, seq = _truth_and_rows(cfg, steps)
    rows, x0s = ours.coefficients_float64(), []
    with using(backend):
        for k, (x, m, z, want) in enumerate(seq):
            got = ours.step(m.astype(np.float32), int(ours.timesteps[k]), x.astype(np.float32),
                            noise=z.astype(np.float32), backend=backend[0])
            err = np.abs(got.astype(np.float64) - want).max()
            # 1e-5 where the terms are unit-scale; cosine Karras steps convert x0 with weights up
            # to ~1e2 (independent random x and m do not cancel as a real pair does), where the
            # float32 bound of _stepkit (16 units of 2**-24 of the terms' size) is the honest one
            ax, am, cx0, dx, _, sigma, _, _, h1, h2 = rows[k][:10]
            x0s.append(np.abs(ax * x) + np.abs(am * m))
            size = np.abs(cx0) * x0s[-1] + np.abs(dx * x) + np.abs(sigma * z) + sum(
                abs(h) * p for h, p in zip((h1, h2), x0s[-2::-1]))
            assert err <= max(1e-5, STEP_RTOL * size.max()), f"step {k}: {err:.3g}"


SAMPLER_NAMES = ["dpm++2m", "dpm++3m", "dpm++2m-sde"]
ENGINE_BACKENDS = [n for n in ("native-cpu", "numba") if fastddpm.backends()[n]["available"]]


@pytest.fixture(scope="module")
def digits():
    return fastddpm.load("digits")


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_whole_run_matches_the_reference_sampler(digits, backend, sampler):
    """The native loop (engine + fused step with history) against the PyTorch reference sampler
    (diffusers' formulas on the reference U-Net) with the same noise: <= 1e-3 after 20 steps."""
    got = digits(3, sampler=sampler, steps=20, seed=5, backend=backend, output="float")
    want = digits(3, sampler=sampler, steps=20, seed=5, backend="torch", output="float")
    err = float(np.abs(got - want).max())
    print(f"{sampler} on {backend}: max abs {err:.2e} after 20 steps")
    assert err <= 1e-3


@pytest.mark.parametrize("backend", ENGINE_BACKENDS + ["torch"])
def test_batch_invariance_and_first_index(digits, backend):
    a = digits(4, sampler="dpm++2m-sde", steps=8, seed=2, backend=backend, output="float")
    b = digits(2, sampler="dpm++2m-sde", steps=8, seed=2, backend=backend, output="float")
    c = digits(2, sampler="dpm++2m-sde", steps=8, seed=2, backend=backend, output="float", first_index=2)
    np.testing.assert_array_equal(a[:2], b)
    np.testing.assert_array_equal(a[2:], c)


def test_trajectory_and_result_shape(digits):
    r = digits(2, sampler="dpm++3m", steps=6, seed=1, trajectory=[0, 3, -1])
    assert r.images.shape == (2, 16, 16, 1) and r.trajectory.shape == (3, 2, 16, 16, 1)
    assert r.timesteps[0] == -1 and r.trajectory_steps == [0, 3, 6]


def test_config_round_trips_with_diffusers(tmp_path):
    cfg = dict(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, timestep_spacing="trailing")
    ours = fastddpm.DPMSolverMultistepScheduler(**cfg)
    ours.save_config(tmp_path / "ours")
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(
        diffusers.DPMSolverMultistepScheduler.load_config(tmp_path / "ours"))
    for k, v in cfg.items():
        assert theirs.config[k] == v
    diffusers.DPMSolverMultistepScheduler(**cfg).save_pretrained(tmp_path / "theirs")
    back = fastddpm.DPMSolverMultistepScheduler.from_config(tmp_path / "theirs")
    assert {k: back.config[k] for k in cfg} == cfg


@pytest.mark.parametrize("bad,match", [
    (dict(solver_order=4), "solver_order"), (dict(algorithm_type="dpmsolver"), "algorithm_type"),
    (dict(solver_type="bh2"), "solver_type"), (dict(final_sigmas_type="max"), "final_sigmas_type"),
    (dict(thresholding=True, sample_max_value=2.0), "sample_max_value"), (dict(use_lu_lambdas="yes"), "use_lu_lambdas"),
    (dict(use_lu_lambdas=True, use_karras_sigmas=True), "exclusive"),
    (dict(variance_type="learned"), "variance_type"), (dict(prediction_type="flow_prediction"), "prediction_type"),
    (dict(use_exponential_sigmas=True), "use_exponential_sigmas"), (dict(colour=1), "colour")])
def test_unsupported_keys_and_values_are_named(bad, match):
    with pytest.raises(fastddpm.SchedulerConfigError, match=match):
        fastddpm.DPMSolverMultistepScheduler(**bad)


def test_steps_run_in_order_and_set_timesteps_starts_over():
    s = fastddpm.DPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(np.zeros((1, 4), np.float32), 999, np.zeros((1, 4), np.float32))
    s.set_timesteps(5)
    x = np.zeros((1, 4), np.float32)
    s.step(x, int(s.timesteps[0]), x)
    with pytest.raises(ValueError, match="in order"):
        s.step(x, int(s.timesteps[2]), x)
    s.set_timesteps(5)
    s.step(x, int(s.timesteps[0]), x)


def test_sampler_names_errors_and_loading(digits, tmp_path):
    with pytest.raises(ValueError, match="eta is a DDIM parameter"):
        digits(1, sampler="dpm++2m", steps=5, eta=0.5)
    with pytest.raises(ValueError, match="sampler must be one of"):
        digits(1, sampler="dpm++4m", steps=5)
    sched = fastddpm.DPMSolverMultistepScheduler.from_compatible_config(digits.scheduler.config)
    pipe = fastddpm.Pipeline(digits.unet_config, digits.weights, sched, name="digits-dpm")
    pipe.save(tmp_path / "m")
    loaded = fastddpm.load(tmp_path / "m")
    assert isinstance(loaded.scheduler, fastddpm.DPMSolverMultistepScheduler)
    assert loaded(1, sampler="dpm++2m", steps=5, seed=0).shape == (1, 16, 16, 1)


def test_auto_backend_runs_multistep_samplers():
    from fastddpm.executors import sampling_backend
    assert sampling_backend("auto", history=2).max_history >= 2
