"""Consistency-model sampling (fastddpm.CMStochasticIterativeScheduler, sampler "cm").

Oracles: diffusers' CMStochasticIterativeScheduler run in float64 (its sigmas rebuilt in float64
with its own _convert_to_karras, not cast from the float32 ones it keeps) for the rows and the
fused step on every CPU backend; the reference sampler (written from the paper's formulas) for
whole runs on the engines; diffusers' ConsistencyModelPipeline, driven with fastddpm's noise, end
to end: a small ADM-style model directory (scale_shift resnets, resnet down/upsamplers, a class
table) saved by diffusers and loaded by fastddpm.load, and the ImageNet-64 CM shape with random
weights, one-step class-conditional, on every CPU engine.

diffusers keeps sample = x * sqrt(sigma^2 + sigma_data^2) and feeds the model x (scale_model_input);
fastddpm keeps x, so diffusers' step is fed the sample and its result divided by the next
sqrt(sigma^2 + sigma_data^2) (the last step's result is the sample itself).
"""
from __future__ import annotations

import functools
import math
from unittest import mock

import numpy as np
import pytest

import fastddpm
from fastddpm.philox import noise as spec_noise
from fastddpm.unet_config import CM_IMAGENET64, UNetConfig, random_weights

from _stepkit import CPU_BACKENDS, assert_step_sequence

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers", reason="diffusers is the test-only oracle")
import diffusers.schedulers.scheduling_consistency_models as cm_module  # noqa: E402

CM = fastddpm.CMStochasticIterativeScheduler
RUN_BACKENDS = [n for n in ("native-cpu", "numba") if fastddpm.backends()[n]["available"]]
# (config, set_timesteps argument): one step, diffusers' two-step [22, 0], n evenly spaced steps
SEQUENCES = [({}, dict(num_inference_steps=1)), ({}, dict(timesteps=[22, 0])), ({}, dict(num_inference_steps=4)),
             (dict(clip_denoised=False, s_noise=0.7), dict(timesteps=[30, 12, 3])),
             (dict(num_train_timesteps=18, sigma_min=0.01, sigma_max=40.0, sigma_data=0.3, rho=5.0),
              dict(num_inference_steps=3))]
IDS = ["1-step", "22-0", "4-steps", "noclip-snoise", "other-sigmas"]


def _reference_float64(cfg: dict, when: dict):
    """diffusers' scheduler set to `when`, its sigmas in float64 (its own formula)."""
    ref = diffusers.CMStochasticIterativeScheduler(**cfg)
    ref.set_timesteps(**when)
    T = ref.config.num_train_timesteps
    ts = np.asarray(when["timesteps"]) if "timesteps" in when else \
        (np.arange(0, when["num_inference_steps"]) * (T // when["num_inference_steps"])).round()[::-1]
    sig = ref._convert_to_karras(ts[::-1].astype(np.float64) / (T - 1))
    ref.sigmas = torch.from_numpy(np.concatenate([sig, [ref.config.sigma_min]]))   # float64
    return ref


def _sequence(cfg, when, seed=0):
    """Per step (x, m, z, x_next) with x_next from diffusers' float64 step, in fastddpm's space."""
    ours = CM(**cfg)
    ours.set_timesteps(**when)
    ref = _reference_float64(cfg, when)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours._sigmas, ref.sigmas.numpy(), rtol=1e-15, atol=0)
    sd = ref.config.sigma_data
    rng = np.random.default_rng(seed)
    out = []
    for k, t in enumerate(ref.timesteps):
        x, m, z = (rng.standard_normal((2, 3, 5, 7)) for _ in range(3))
        s, n = float(ref.sigmas[k]), float(ref.sigmas[k + 1])
        with mock.patch.object(cm_module, "randn_tensor", lambda *a, **kw: torch.from_numpy(z)):
            ref.is_scale_input_called = True
            prev = ref.step(torch.from_numpy(m), t, torch.from_numpy(x * math.sqrt(s * s + sd * sd))).prev_sample
        last = k == len(ref.timesteps) - 1
        out.append((x, m, z, prev.numpy() / (1.0 if last else math.sqrt(n * n + sd * sd))))
    return ours, out


@pytest.mark.parametrize("cfg,when", SEQUENCES, ids=IDS)
def test_rows_and_x_scale_are_diffusers_float64(cfg, when):
    ours, seq = _sequence(cfg, when)
    ref = _reference_float64(cfg, when)
    sd = ref.config.sigma_data
    assert ours.x_scale == pytest.approx(ref.init_noise_sigma / math.sqrt(float(ref.sigmas[0]) ** 2 + sd * sd), rel=1e-14)
    assert ours.init_noise_sigma == ref.init_noise_sigma
    rows = ours.coefficients_float64()
    for k, (x, m, z, want) in enumerate(seq):       # the row applied in float64 is diffusers' step
        ax, am, cx0, dx, dm, sigma, clip = rows[k][:7]
        x0 = ax * x + am * m
        if clip > 0:
            x0 = np.clip(x0, -clip, clip)
        np.testing.assert_allclose(cx0 * x0 + dx * x + dm * m + sigma * z, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg,when", SEQUENCES, ids=IDS)
def test_fused_step_on_every_backend(backend, cfg, when):
    """Every step in float32 against diffusers' float64 step: max abs <= 1e-5 where the terms are
    unit-scale (the first step weighs x by c_skip sqrt(sigma^2 + sigma_data^2) ~ 3e-3 and m by ~0.5:
    all unit-scale here), else the float32 bound of _stepkit."""
    ours, seq = _sequence(cfg, when)
    assert_step_sequence(ours, seq, backend)


def test_timesteps_and_noise_keys():
    s = CM()
    s.set_timesteps(timesteps=[22, 0])
    # diffusers' model times 250 ln(sigma); the noise keys: distinct, descending, in [0, T)
    assert list(s.noise_steps) == [39, 17]
    assert s.row_index(float(np.float32(s.timesteps[1]))) == 1 == s.row_index(17)
    s.set_timesteps(1)
    assert list(s.noise_steps) == [39] and s.timesteps[0] == pytest.approx(250 * math.log(80.0))
    assert CM.default_steps(40) == 1


@pytest.mark.parametrize("bad,match", [
    (dict(num_train_timesteps=1), "num_train_timesteps"), (dict(sigma_min=0.0), "sigma_min"),
    (dict(sigma_min=90.0), "below sigma_max"), (dict(sigma_data=-1.0), "sigma_data"),
    (dict(rho=float("nan")), "rho"), (dict(s_noise=-0.5), "s_noise"), (dict(clip_denoised="yes"), "clip_denoised"),
    (dict(beta_schedule="linear"), "unknown CMStochasticIterativeScheduler config key")])
def test_bad_configs_are_named(bad, match):
    with pytest.raises(fastddpm.SchedulerConfigError, match=match):
        CM(**bad)


@pytest.mark.parametrize("kw,match", [(dict(), "exactly one"), (dict(num_inference_steps=2, timesteps=[3, 1]), "exactly one"),
                                      (dict(timesteps=[0, 22]), "descending"), (dict(timesteps=[40, 0]), r"\[0, 40\)"),
                                      (dict(timesteps=[2.5, 1.0]), "integers"), (dict(num_inference_steps=41), "num_inference_steps")])
def test_bad_timesteps_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        CM().set_timesteps(**kw)


def test_step_needs_timesteps():
    with pytest.raises(ValueError, match="set_timesteps"):
        CM().step(np.zeros((1, 1, 2, 2), np.float32), 0, np.zeros((1, 1, 2, 2), np.float32))


# -- models ----------------------------------------------------------------------------------------

ADM_SMALL = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, num_class_embeds=5,
                 block_out_channels=[16, 32, 48], attention_head_dim=16, norm_num_groups=8,
                 down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
                 up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
                 resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8, upsample_type="resnet",
                 downsample_type="resnet")


@functools.lru_cache(maxsize=None)
def model(name: str):
    """(config, weights): random weights, perturbed where small so that nothing is zero."""
    cfg = UNetConfig.from_dict(ADM_SMALL if name == "small" else CM_IMAGENET64)
    w = random_weights(cfg, 4)
    if name == "small":
        rng = np.random.default_rng(8)
        w = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in w.items()}
    return cfg, w


_SAVED: dict = {}


def saved(name: str, tmp_factory) -> str:
    """A diffusers-saved model directory (unet/ + scheduler/), as a user downloads one (made once)."""
    if name in _SAVED:
        return _SAVED[name]
    cfg, w = model(name)
    root = tmp_factory.mktemp(f"cm-{name}")
    unet = diffusers.UNet2DModel.from_config(cfg.to_dict())
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    pipe = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=diffusers.CMStochasticIterativeScheduler())
    pipe.save_pretrained(root)
    _SAVED[name] = str(root)
    return str(root)


def diffusers_pipeline_sample(directory, n, seed, labels, when):
    """diffusers' ConsistencyModelPipeline (float32) on fastddpm's noise: x_T's normals as its
    latents, each step's noise from fastddpm's key of that step. Returns [n, C, H, W] in [-1, 1]."""
    pipe = diffusers.ConsistencyModelPipeline.from_pretrained(directory)
    unet = pipe.unet
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    ours = CM.from_config(directory)
    ours.set_timesteps(**when)
    keys = iter(int(k) for k in ours.noise_steps)
    with mock.patch.object(cm_module, "randn_tensor", lambda *a, **kw: torch.from_numpy(spec_noise(seed, shape, next(keys)))):
        out = pipe(batch_size=n, class_labels=torch.tensor(labels), latents=torch.from_numpy(spec_noise(seed, shape, -1)),
                   output_type="pt", **({"num_inference_steps": when["num_inference_steps"]} if "num_inference_steps" in when
                                        else {"timesteps": when["timesteps"]}))
    return (out.images.permute(0, 3, 1, 2).numpy() if out.images.shape[-1] == shape[1] else out.images.numpy()) * 2 - 1


STEPS = [1, [22, 0], 3]


def _when(steps):
    return dict(timesteps=steps) if isinstance(steps, list) else dict(num_inference_steps=steps)


@pytest.mark.parametrize("steps", STEPS, ids=["1-step", "22-0", "3-steps"])
def test_small_adm_directory_matches_diffusers_pipeline(steps, tmp_path_factory):
    """fastddpm.load of a diffusers-saved CM directory picks CMStochasticIterativeScheduler, and
    sample() (sampler "cm" by default; steps=[22, 0]: explicit timesteps) equals diffusers'
    ConsistencyModelPipeline with the same noise on every CPU engine and the reference sampler."""
    directory = saved("small", tmp_path_factory)
    pipe = fastddpm.load(directory)
    assert type(pipe.scheduler) is CM and pipe.default_sampler() == "cm"
    labels = [0, 3, 4]
    want = diffusers_pipeline_sample(directory, 3, 7, labels, _when(steps))
    for backend in RUN_BACKENDS + ["torch"]:
        got = pipe(3, steps=steps, seed=7, labels=labels, backend=backend, output="float")
        err = float(np.abs(got - want).max())
        print(f"steps {steps} on {backend}: max abs {err:.2e} against ConsistencyModelPipeline")
        assert err <= 2e-5, (backend, err)
        # batch invariance and first_index, as for every sampler
        np.testing.assert_array_equal(pipe(2, steps=steps, seed=7, labels=labels[:2], backend=backend, output="float"),
                                      got[:2])
        np.testing.assert_array_equal(pipe(2, steps=steps, seed=7, labels=labels[1:], backend=backend, output="float",
                                           first_index=1), got[1:])


@pytest.mark.parametrize("backend", RUN_BACKENDS)
def test_whole_runs_match_the_reference_sampler(backend, tmp_path_factory):
    pipe = fastddpm.load(saved("small", tmp_path_factory))
    for steps in ([30, 12, 3], 6):
        got = pipe(3, steps=steps, seed=2, labels=[1, 2, 3], backend=backend, output="float")
        want = pipe(3, steps=steps, seed=2, labels=[1, 2, 3], backend="torch", output="float")
        assert float(np.abs(got - want).max()) <= 1e-4, steps


def test_samplers_and_models_do_not_mix(tmp_path_factory):
    cm_pipe = fastddpm.load(saved("small", tmp_path_factory))
    with pytest.raises(ValueError, match="consistency model"):
        cm_pipe(1, sampler="ddpm", labels=[0])
    with pytest.raises(ValueError, match="needs a consistency model"):
        fastddpm.load("digits")(1, sampler="cm")
    with pytest.raises(ValueError, match="explicit timesteps"):
        fastddpm.load("digits")(1, sampler="ddim", steps=[10, 0])
    with pytest.raises(ValueError, match="descending"):
        cm_pipe(1, steps=[0, 22], labels=[0])


@pytest.mark.slow
def test_imagenet64_shape_one_step_on_every_cpu_engine(tmp_path_factory):
    """The ImageNet-64 consistency-model U-Net (296M parameters, random weights) samples one
    class-conditional image in one step on every CPU engine, equal to diffusers' pipeline (float32).
    Measured max abs on the [-1, 1] image: 5.8e-6 native (its Winograd F(4x4) convs round most:
    1.1e-5 of the output scale for the bare forward against float64 diffusers, direct and F(2x2)
    convs 1-3e-6), 1.7e-6 numba; bound 2e-5."""
    directory = saved("imagenet64", tmp_path_factory)
    pipe = fastddpm.load(directory)
    want = diffusers_pipeline_sample(directory, 1, 3, [207], dict(num_inference_steps=1))
    for backend in RUN_BACKENDS:
        got = pipe(1, seed=3, labels=[207], backend=backend, output="float")
        err = float(np.abs(got - want).max())
        print(f"ImageNet-64 CM shape, 1 step on {backend}: max abs {err:.2e}")
        assert err <= 2e-5, (backend, err)


@pytest.mark.cuda
@pytest.mark.parametrize("steps", STEPS, ids=["1-step", "22-0", "3-steps"])
def test_cuda_engine_matches_the_reference_sampler(steps, tmp_path_factory):
    """The CUDA engine (fp32, its captured loop) runs the CM rows and the ADM ops like the reference."""
    pipe = fastddpm.load(saved("small", tmp_path_factory))
    got = pipe(3, steps=steps, seed=7, labels=[0, 3, 4], backend="native-cuda", dtype="fp32", output="float")
    want = pipe(3, steps=steps, seed=7, labels=[0, 3, 4], backend="torch", output="float")
    assert float(np.abs(got - want).max()) <= 1e-4


def test_sharded_sampling_keeps_explicit_timesteps(tmp_path_factory, tmp_path):
    """sample_to_disk of a consistency model: the model's own sampler by default, and steps=[22, 0]
    reaches the shards as those timesteps (their count alone would space them as [20, 0])."""
    from fastddpm.shards import read_shards
    directory = saved("small", tmp_path_factory)
    pipe = fastddpm.load(directory)
    manifest = fastddpm.sample_to_disk(directory, 5, tmp_path / "out", seed=9, shard_size=2, steps=[22, 0], labels=1)
    assert manifest["request"]["sampler"] == "cm" and manifest["request"]["steps"] == [22, 0]
    np.testing.assert_array_equal(read_shards(tmp_path / "out"), pipe(5, steps=[22, 0], seed=9, labels=1))
    assert not np.array_equal(pipe(5, steps=2, seed=9, labels=1), pipe(5, steps=[22, 0], seed=9, labels=1))


def test_cli_samples_a_consistency_model_with_its_own_sampler(tmp_path_factory, tmp_path, capsys):
    """`fastddpm sample -m <CM directory>` without --sampler runs "cm" (one step) and says so."""
    from fastddpm.cli import main
    directory = saved("small", tmp_path_factory)
    npy = tmp_path / "s.npy"
    rc = main(["sample", "-m", directory, "-n", "2", "--label", "3", "--seed", "4", "-o", str(tmp_path / "s.png"),
               "--npy", str(npy)])
    out = capsys.readouterr().out
    assert rc == 0 and "cm 1 steps" in out
    np.testing.assert_array_equal(np.load(npy), fastddpm.load(directory)(2, labels=3, seed=4))
