"""DDPMScheduler / DDIMScheduler: diffusers' config keys and values, tables and timesteps equal to
diffusers', from_config / save_config, and clear errors for what fastddpm cannot honour."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

import fastddpm
from fastddpm import DDIMScheduler, DDPMScheduler, SchedulerConfigError
from fastddpm.coefficients import COEF_WIDTH

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only oracle of the schedulers")
torch = pytest.importorskip("torch", reason="diffusers needs torch")

KINDS = {"ddpm": (DDPMScheduler, diffusers.DDPMScheduler), "ddim": (DDIMScheduler, diffusers.DDIMScheduler)}
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
SPACINGS = ("leading", "linspace", "trailing")

# Every key of diffusers' config with every value fastddpm honours (DESIGN.md).
VALUES = {
    "num_train_timesteps": [1000, 50, 7, 1],
    "beta_start": [0.0001, 0.00085],
    "beta_end": [0.02, 0.012],
    "beta_schedule": list(SCHEDULES),
    "trained_betas": [None, [0.1, 0.2, 0.3], np.linspace(1e-4, 0.02, 20)],
    "variance_type": ["fixed_small", "fixed_large"],
    "clip_sample": [True, False],
    "prediction_type": ["epsilon", "sample", "v_prediction"],
    "thresholding": [False],
    "dynamic_thresholding_ratio": [0.995, 0.9],
    "clip_sample_range": [1.0, 0.5, 2, 1e6],
    "sample_max_value": [1.0, 5.0],
    "timestep_spacing": list(SPACINGS),
    "steps_offset": [0, 1, 5],
    "rescale_betas_zero_snr": [False, True],
    "set_alpha_to_one": [True, False],
}

# float32 rounding in diffusers' tables (ours are float64):
# - betas: a handful of float32 operations each (linspace, square, sigmoid): <= 16 units of 2**-24
#   (measured 5 units, scaled_linear).
BETA_RTOL = 16 * 2.0**-24
# - alphas = 1 - betas in float32: the betas' error, plus one rounding (2**-24) where beta is small.
#   (Near beta = 0.999, the cosine schedule's cap, alpha = 0.001 is exact in float32 but inherits
#   beta's absolute error: 1.3e-5 relative. So this is an absolute bound, not a relative one.)
# - alphas_cumprod: a float32 cumprod; each product adds one rounding, errors of either sign grow
#   like sqrt(k) units of 2**-24 (measured <= 1 unit; bound 4 sqrt(k)), on top of the alphas'
#   errors, which propagate as the sum of their relative errors.


def assert_tables_match(ours, theirs):
    """ours: fastddpm scheduler (float64); theirs: diffusers scheduler (float32), same config."""
    betas, alphas, abar = (getattr(theirs, k).double().numpy() for k in ("betas", "alphas", "alphas_cumprod"))
    np.testing.assert_allclose(ours.betas, betas, rtol=BETA_RTOL, atol=0)
    alpha_bound = BETA_RTOL * ours.betas + 2.0**-24
    assert np.all(np.abs(ours.alphas - alphas) <= alpha_bound), np.max(np.abs(ours.alphas - alphas) / alpha_bound)
    k = np.arange(1, len(abar) + 1)
    propagated = np.cumsum(np.abs(ours.alphas - alphas) / alphas)
    rel = np.abs(ours.alphas_cumprod - abar) / ours.alphas_cumprod
    bound = propagated + 4 * np.sqrt(k) * 2.0**-24
    assert np.all(rel <= bound), f"alphas_cumprod: worst {np.max(rel / bound):.2f} x the bound at {np.argmax(rel / bound)}"
    # and the propagated part is small: the tables agree to ~1e-5 relative everywhere
    assert rel.max() < 2e-5, rel.max()


def _diffusers_keys(kind):
    return [k for k in KINDS[kind][1]().config if not k.startswith("_")]


def _pair(kind, **cfg):
    ours_cls, theirs_cls = KINDS[kind]
    return ours_cls(**cfg), theirs_cls(**cfg)


# -- config keys and values ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_diffusers_key_and_value_is_accepted(kind):
    keys = _diffusers_keys(kind)
    assert set(keys) <= set(VALUES), f"diffusers has config keys this test does not know: {set(keys) - set(VALUES)}"
    # diffusers' whole default config, as diffusers itself hands it over
    ours = KINDS[kind][0](**dict(KINDS[kind][1]().config))
    for key in keys:
        if key not in ("thresholding", "dynamic_thresholding_ratio", "sample_max_value"):  # inert, not kept
            assert key in ours.config, key
    for key in keys:
        for value in VALUES[key]:
            s = KINDS[kind][0](**{key: value})
            if key in s.config and key != "trained_betas":
                assert s.config[key] == value, (key, value)
            s.set_timesteps(min(7, s.num_train_timesteps))
            assert np.isfinite(s.coefficients(**({"eta": 0.5} if kind == "ddim" else {}))).all(), (key, value)


def test_ddpm_has_no_set_alpha_to_one_and_ddim_has_no_variance_type():
    # as in diffusers: each scheduler knows only its own keys
    with pytest.raises(SchedulerConfigError, match="set_alpha_to_one"):
        DDPMScheduler(set_alpha_to_one=True)
    with pytest.raises(SchedulerConfigError, match="variance_type"):
        DDIMScheduler(variance_type="fixed_small")


BAD_VALUES = [
    ("beta_schedule", "cosine"), ("beta_schedule", "laplace"), ("beta_schedule", None),
    ("prediction_type", "x0"), ("prediction_type", None),
    ("variance_type", "learned"), ("variance_type", "learned_range"), ("variance_type", "fixed_small_log"),
    ("timestep_spacing", "karras"),
    ("num_train_timesteps", 0), ("num_train_timesteps", -5), ("num_train_timesteps", 10.5),
    ("num_train_timesteps", True), ("num_train_timesteps", "1000"),
    ("clip_sample_range", 0), ("clip_sample_range", -1.0), ("clip_sample_range", float("nan")),
    ("clip_sample_range", float("inf")), ("clip_sample_range", "1.0"),
    ("steps_offset", -1), ("steps_offset", 1.5), ("steps_offset", True),
    ("thresholding", True),
    ("trained_betas", []), ("trained_betas", [[0.1, 0.2]]), ("trained_betas", [0.1, 1.0]),
    ("trained_betas", [0.0, 0.1]), ("trained_betas", [0.1, float("nan")]),
    ("beta_end", 1.5), ("beta_start", -0.1), ("beta_end", float("nan")), ("beta_start", "small"),
    ("clip_sample", "yes"), ("clip_sample", None), ("rescale_betas_zero_snr", "no"),
]


# (DDIM has no variance_type key: that one is an unknown key for it, tested above)
BAD_CASES = [(kind, k, v) for kind in KINDS for k, v in BAD_VALUES if not (kind == "ddim" and k == "variance_type")]


@pytest.mark.parametrize("kind, key, value", BAD_CASES, ids=[f"{c}-{k}={v!r}" for c, k, v in BAD_CASES])
def test_bad_value_names_the_key(kind, key, value):
    with pytest.raises(SchedulerConfigError, match=key):
        KINDS[kind][0](**{key: value})


@pytest.mark.parametrize("kind", KINDS)
def test_bad_boolean_for_ddim_set_alpha_to_one(kind):
    if kind == "ddim":
        with pytest.raises(SchedulerConfigError, match="set_alpha_to_one"):
            DDIMScheduler(set_alpha_to_one="false")
    else:
        with pytest.raises(SchedulerConfigError, match="set_alpha_to_one"):
            DDPMScheduler(set_alpha_to_one=False)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_key_is_named(kind):
    with pytest.raises(SchedulerConfigError, match="'beta_scheduel'") as err:
        KINDS[kind][0](beta_scheduel="linear")
    assert "known keys" in str(err.value)
    # a key from another diffusers scheduler (PNDM's, e.g. in stable-diffusion's scheduler_config.json)
    with pytest.raises(SchedulerConfigError, match="skip_prk_steps"):
        KINDS[kind][0].from_config({"skip_prk_steps": True})
    assert issubclass(SchedulerConfigError, ValueError)
    assert fastddpm.SchedulerConfigError is SchedulerConfigError


def test_bookkeeping_keys_are_ignored():
    s = DDPMScheduler(_class_name="DDPMScheduler", _diffusers_version="0.1.1", _use_default_values=["x"],
                      thresholding=False, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    assert "_class_name" not in s.config and "sample_max_value" not in s.config


# -- tables against diffusers ---------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("T", [1000, 50, 7])
def test_betas_and_alphas_cumprod_equal_diffusers(schedule, T):
    cfg = dict(beta_schedule=schedule, num_train_timesteps=T)
    ours, theirs = _pair("ddpm", **cfg)
    assert ours.betas.dtype == np.float64 and ours.alphas_cumprod.dtype == np.float64
    assert ours.betas.shape == ours.alphas_cumprod.shape == (T,)
    assert_tables_match(ours, theirs)
    np.testing.assert_allclose(ours.alphas_cumprod, np.cumprod(1.0 - ours.betas), rtol=1e-15)
    # DDIM's tables are DDPM's (where diffusers' DDIM has the schedule: it lacks sigmoid)
    ddim = DDIMScheduler(**cfg)
    np.testing.assert_array_equal(ddim.alphas_cumprod, ours.alphas_cumprod)
    if schedule != "sigmoid":
        assert_tables_match(ddim, diffusers.DDIMScheduler(**cfg))
    else:
        with pytest.raises(NotImplementedError):
            diffusers.DDIMScheduler(**cfg)


def test_betas_are_float64_exact_definitions():
    """The float64 schedules themselves, written from their papers."""
    T = 1000
    np.testing.assert_allclose(DDPMScheduler().betas, 1e-4 + (0.02 - 1e-4) * np.arange(T) / (T - 1), rtol=1e-14)
    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(s.betas, (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * np.arange(T) / (T - 1)) ** 2,
                               rtol=1e-14)
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2   # Nichol & Dhariwal eq. 17
    np.testing.assert_allclose(DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas,
                               np.minimum(1 - f[1:] / f[:-1], 0.999), rtol=1e-12)
    x = np.linspace(-6, 6, T)
    np.testing.assert_allclose(DDPMScheduler(beta_schedule="sigmoid").betas,
                               1 / (1 + np.exp(-x)) * (0.02 - 1e-4) + 1e-4, rtol=1e-14)


def test_trained_betas_equal_diffusers():
    betas = np.linspace(0.001, 0.05, 40) ** 1.3
    # (diffusers needs num_train_timesteps to match; fastddpm takes it from the list)
    ours, theirs = _pair("ddpm", trained_betas=betas.tolist(), num_train_timesteps=40)
    assert ours.num_train_timesteps == 40 == DDPMScheduler(trained_betas=betas).num_train_timesteps
    np.testing.assert_array_equal(ours.betas, betas)
    assert_tables_match(ours, theirs)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())


@pytest.mark.parametrize("kind, schedule", [(k, s) for k in KINDS for s in SCHEDULES
                                             if not (k == "ddim" and s == "sigmoid")])  # diffusers' DDIM lacks sigmoid
def test_rescale_betas_zero_snr_tables(kind, schedule):
    ours, theirs = _pair(kind, beta_schedule=schedule, rescale_betas_zero_snr=True)
    # exactly zero terminal SNR, as in diffusers' DDPM and DDIM (no 2**-24 floor in the table)
    assert ours.alphas_cumprod[-1] == 0.0 == float(theirs.alphas_cumprod[-1])
    assert ours.betas[-1] == 1.0
    # diffusers' rescale_zero_terminal_snr run in float64 on our unrescaled float64 betas: the same
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    base = DDPMScheduler(beta_schedule=schedule).betas
    want = rescale_zero_terminal_snr(torch.from_numpy(base.copy())).numpy()
    np.testing.assert_allclose(ours.betas, want, rtol=1e-12, atol=1e-15)
    # and diffusers' own float32 table: its rescale subtracts sqrt(abar_T) ~ 6e-3 from values down to
    # ~6e-5 near t = T, amplifying float32 rounding ~100x (measured 1.3e-5 relative)
    np.testing.assert_allclose(ours.alphas_cumprod[:-1], theirs.alphas_cumprod.double().numpy()[:-1], rtol=1e-4)
    # the first value is unchanged by the rescale
    np.testing.assert_allclose(ours.alphas_cumprod[0], DDPMScheduler(beta_schedule=schedule).alphas_cumprod[0],
                               rtol=1e-14)


# -- timesteps -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_equal_diffusers(kind, spacing):
    checked = refused = 0
    for T, offset in itertools.product((1000, 50, 7), (0, 1, 5)):
        ours, theirs = _pair(kind, num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        counts = sorted({1, 2, 3, 7, 10, 33, 50, 333, 999, 1000, T - 1, T} & set(range(1, T + 1)))
        for n in counts:
            theirs.set_timesteps(n)
            want = theirs.timesteps.numpy()
            if want.max() >= T or want.min() < 0:
                # diffusers silently makes timesteps it cannot index (leading + steps_offset); we refuse
                with pytest.raises(ValueError, match="steps_offset"):
                    ours.set_timesteps(n)
                refused += 1
                continue
            ours.set_timesteps(n)
            assert ours.timesteps.dtype == np.int64
            np.testing.assert_array_equal(ours.timesteps, want, err_msg=f"{kind} T={T} {spacing} offset={offset} n={n}")
            assert ours.num_inference_steps == n
            assert np.all(np.diff(ours.timesteps) < 0) or n == 1
            checked += 1
    assert checked > 40
    assert refused == 0 or spacing == "leading"


def test_ddpm_timesteps_before_set_timesteps():
    ours, theirs = _pair("ddpm")
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    x = np.zeros((1, 1, 2, 2), np.float32)
    ours.step(x, 999, x, seed=0)   # every training timestep is a valid step, as in diffusers
    ours.step(x, 0, x, seed=0)


def test_previous_timestep_equals_diffusers():
    for spacing in SPACINGS:
        ours, theirs = _pair("ddpm", timestep_spacing=spacing)
        ours.set_timesteps(7)
        theirs.set_timesteps(7)
        for t in ours.timesteps:
            assert ours.previous_timestep(int(t)) == int(theirs.previous_timestep(int(t)))
        ddim = DDIMScheduler(timestep_spacing=spacing)
        ddim.set_timesteps(7)
        for t in ddim.timesteps:
            assert ddim.previous_timestep(int(t)) == int(t) - 1000 // 7


def test_set_timesteps_out_of_range():
    for kind in KINDS:
        s = KINDS[kind][0](num_train_timesteps=50)
        for bad in (0, -1, 51, 10**9):
            with pytest.raises(ValueError, match="num_inference_steps"):
                s.set_timesteps(bad)
        for bad in (2.0, 2.5, "10", None, True):
            with pytest.raises((ValueError, TypeError), match="num_inference_steps"):
                s.set_timesteps(bad)
        s.set_timesteps(np.int64(5))
        assert len(s.timesteps) == 5
        s = KINDS[kind][0](steps_offset=1)
        with pytest.raises(ValueError, match="steps_offset"):
            s.set_timesteps(1000)          # leading + offset 1 would reach t = 1000
        s.set_timesteps(999)


def test_ddim_step_before_set_timesteps():
    s = DDIMScheduler()
    x = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x, seed=0)
    assert s.num_inference_steps is None


def test_ddim_final_alpha_cumprod():
    one = DDIMScheduler(set_alpha_to_one=True)
    first = DDIMScheduler(set_alpha_to_one=False)
    assert one.final_alpha_cumprod == 1.0
    assert first.final_alpha_cumprod == first.alphas_cumprod[0]
    assert float(diffusers.DDIMScheduler(set_alpha_to_one=False).final_alpha_cumprod) == pytest.approx(
        first.final_alpha_cumprod, rel=1e-7)


def test_coefficient_table_shape_and_caching():
    s = DDIMScheduler()
    s.set_timesteps(10)
    table = s.coefficients(eta=0.5)
    assert table.dtype == np.float32 and table.shape == (10, COEF_WIDTH) and table.flags.c_contiguous
    assert not table.flags.writeable
    assert np.isfinite(table).all()
    assert s.coefficients(eta=0.5) is table                 # cached per step option
    assert not np.array_equal(s.coefficients(eta=0.0), table)
    np.testing.assert_allclose(table, s.coefficients_float64(eta=0.5), rtol=2.0**-24)
    s.set_timesteps(20)                                     # a new schedule invalidates it
    assert s.coefficients(eta=0.5).shape == (20, COEF_WIDTH)


def test_row_index_errors():
    s = DDPMScheduler()
    s.set_timesteps(10)
    assert s.row_index(900) == 0 and s.row_index(np.int64(0)) == 9
    assert s.row_index(np.array(800)) == 1 and s.row_index(torch.tensor(700)) == 2
    for bad in (901, 1000, -1, 2**40):
        with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
            s.row_index(bad)
    for bad in (900.0, 900.5, np.float32(900), torch.tensor(900.0), "900", None):
        with pytest.raises(TypeError, match="timestep must be an integer"):
            s.row_index(bad)


# -- from_config / save_config -------------------------------------------------------------------------

CIFAR10_CONFIG = {  # google/ddpm-cifar10-32, scheduler/scheduler_config.json
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
    "variance_type": "fixed_small",
}


def _same(a, b):
    assert type(a) is type(b)
    assert a.config == b.config
    np.testing.assert_array_equal(a.alphas_cumprod, b.alphas_cumprod)
    np.testing.assert_array_equal(a.timesteps, b.timesteps)


def test_from_config_dict_file_and_directory(tmp_path):
    direct = DDPMScheduler(**{k: v for k, v in CIFAR10_CONFIG.items() if not k.startswith("_")})
    _same(DDPMScheduler.from_config(CIFAR10_CONFIG), direct)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(CIFAR10_CONFIG))
    _same(DDPMScheduler.from_config(path), direct)            # a file (PathLike)
    _same(DDPMScheduler.from_config(str(path)), direct)       # a file (str)
    _same(DDPMScheduler.from_config(tmp_path), direct)        # its directory
    pipe = tmp_path / "pipe"
    (pipe / "scheduler").mkdir(parents=True)
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(CIFAR10_CONFIG))
    _same(DDPMScheduler.from_config(pipe), direct)            # a pipeline directory
    # overrides win over the file
    s = DDPMScheduler.from_config(path, variance_type="fixed_large", clip_sample=False)
    assert s.config["variance_type"] == "fixed_large" and s.config["clip_sample"] is False
    # the original dict is not modified
    assert CIFAR10_CONFIG["variance_type"] == "fixed_small" and "_class_name" in CIFAR10_CONFIG
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DDPMScheduler.from_config(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(SchedulerConfigError, match="JSON object"):
        DDPMScheduler.from_config(bad)
    (bad / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError):
        DDPMScheduler.from_config(bad)


@pytest.mark.parametrize("kind", KINDS)
def test_config_saved_by_diffusers_loads(kind, tmp_path):
    cfg = dict(beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing",
               steps_offset=1, clip_sample=False, rescale_betas_zero_snr=True)
    if kind == "ddim":
        cfg["set_alpha_to_one"] = False
    else:
        cfg["variance_type"] = "fixed_large"
    theirs = KINDS[kind][1](**cfg)
    theirs.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert "_diffusers_version" in saved and "thresholding" in saved
    ours = KINDS[kind][0].from_config(tmp_path)
    for key, value in cfg.items():
        assert ours.config[key] == value
    _same(ours, KINDS[kind][0](**cfg))


@pytest.mark.parametrize("kind", KINDS)
def test_save_config_round_trip_and_diffusers_reads_it(kind, tmp_path):
    cfg = dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", timestep_spacing="linspace",
               clip_sample_range=0.5, steps_offset=1)
    ours = KINDS[kind][0](**cfg)
    path = ours.save_config(tmp_path / "sched")
    assert path.endswith("scheduler_config.json")
    saved = json.loads(open(path, encoding="utf-8").read())
    assert saved["_class_name"] == KINDS[kind][1].__name__
    again = KINDS[kind][0].from_config(path)
    _same(again, ours)
    # diffusers reads our file and builds the same scheduler it builds from the same keys
    theirs = KINDS[kind][1].from_config(KINDS[kind][1].load_config(tmp_path / "sched"))
    direct = KINDS[kind][1](**cfg)
    for key in cfg:
        assert theirs.config[key] == cfg[key]
    np.testing.assert_array_equal(theirs.alphas_cumprod.numpy(), direct.alphas_cumprod.numpy())
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())


def test_save_config_with_trained_betas(tmp_path):
    betas = np.linspace(0.001, 0.04, 30)
    ours = DDPMScheduler(trained_betas=betas)
    again = DDPMScheduler.from_config(ours.save_config(tmp_path))
    np.testing.assert_array_equal(again.betas, betas)
    theirs = diffusers.DDPMScheduler.from_config(diffusers.DDPMScheduler.load_config(tmp_path))
    np.testing.assert_allclose(theirs.betas.double().numpy(), betas, rtol=2.0**-24)
