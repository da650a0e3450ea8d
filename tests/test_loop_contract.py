"""The loop contract (fastddpm/loop.py), held once against every engine: the C++ engine, the numba
engine, the reference engines (PyTorch formulas; the reference U-Net with a backend's fused step)
and, under the cuda mark, the CUDA engine. Each gets the same calls and must give the same kind of
answer: x_T keyed by (seed, sample index), kept positions, callbacks every k steps and after the
last, cancel by a raising callback (the engine stays usable), first_index, argument errors, a
fractional schedule with a scaled x_T (Euler's "linspace"); and for
a class-conditional U-Net with classifier-free guidance, a run of n samples on 2n engine rows."""
import numpy as np
import pytest

import fastddpm
from fastddpm.conditioning import class_embedding, guided_labels
from fastddpm.executors import EngineOptions, engine_for, get
from fastddpm.loop import reports
from fastddpm.schedulers import scheduler_for
from fastddpm.unet_config import UNetConfig, random_weights

from test_pipeline import TINY

CFG = UNetConfig.from_dict(TINY)
WEIGHTS = random_weights(CFG, seed=1)
STEPS = 7
# the same U-Net, class-conditional, trained for guidance: classes 0-4, null class 5
COND = UNetConfig.from_dict({**TINY, "num_class_embeds": 6})
COND_WEIGHTS = random_weights(COND, seed=1)
NULL = 5


def _usable(name):
    be = get(name)
    return not isinstance(be, str) and not be.unavailable()


def _engine_factories():
    """(id, factory(batch, every) -> engine, exact): exact = batch-invariant bit for bit."""
    out = []

    def own(name, exact, marks=()):
        def make(batch, every, name=name, cfg=CFG, weights=WEIGHTS):
            be = get(name)
            why = be if isinstance(be, str) else (
                be.engine_unavailable() if name == "native-cuda" else be.unavailable())
            if why:
                pytest.skip(f"{name} cannot run here: {why}")
            opts = EngineOptions(dtype="fp32" if name == "native-cuda" else None, callback_every=every)
            return be.make_engine(cfg, weights, batch, 8, 8, opts)
        out.append(pytest.param(make, exact, id=name, marks=marks))

    own("native-cpu", True)
    own("numba", True)
    own("torch", True)
    own("native-cuda", False, marks=pytest.mark.cuda)
    for step in ("numba", "native-cpu"):
        def stepped(batch, every, step=step, cfg=CFG, weights=WEIGHTS):
            if not _usable(step) or not _usable("torch"):
                pytest.skip(f"{step} or torch cannot run here")
            from fastddpm.executors.torch_ref import ReferenceEngine
            return ReferenceEngine(cfg, weights, batch, 8, 8, EngineOptions(callback_every=every),
                                   step_backend=get(step))
        out.append(pytest.param(stepped, True, id=f"reference-unet+{step}-step"))
    return out


ENGINES = _engine_factories()


def _schedule(eta=0.5):
    return scheduler_for("ddim", fastddpm.DDPMScheduler().config, STEPS).schedule(eta=eta)


@pytest.mark.parametrize("make,exact", ENGINES)
def test_initial_noise_and_kept_positions(make, exact):
    eng = make(2, 1)
    schedule = _schedule()
    x, frames = eng.run(schedule, seed=11, first_index=3, keep=[0, 2, -1])
    assert sorted(frames) == [0, 2, STEPS]
    np.testing.assert_array_equal(frames[STEPS], x)
    x_t = fastddpm.noise(11, (2, 1, 8, 8), -1, first_index=3)
    np.testing.assert_allclose(frames[0], x_t, rtol=0, atol=1e-6)
    assert x.dtype == np.float32 and x.shape == (2, 1, 8, 8) and np.isfinite(x).all()
    assert not np.array_equal(frames[2], frames[0]) and not np.array_equal(frames[2], x)


@pytest.mark.parametrize("every", [1, 3, STEPS, 100])
@pytest.mark.parametrize("make,exact", ENGINES)
def test_callback_every_k_steps_and_after_the_last(make, exact, every):
    eng = make(1, every)
    seen = []
    eng.run(_schedule(), seed=0, callback=seen.append)
    assert seen == [k for k in range(1, STEPS + 1) if reports(k, every, STEPS)]
    assert seen[-1] == STEPS


@pytest.mark.parametrize("error", [KeyError, KeyboardInterrupt])
@pytest.mark.parametrize("make,exact", ENGINES)
def test_a_raising_callback_cancels_and_the_engine_stays_usable(make, exact, error):
    eng = make(1, 1)
    seen = []

    def stop(k):
        seen.append(k)
        if k == 2:
            raise error("stop")
    with pytest.raises(error):
        eng.run(_schedule(), seed=5, callback=stop)
    assert seen == [1, 2]   # no step reported after the cancel
    a, _ = eng.run(_schedule(), seed=5)
    b, _ = eng.run(_schedule(), seed=5)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make,exact", ENGINES)
def test_a_callback_calling_back_into_its_engine_raises(make, exact):
    """One call at a time per engine: re-entering from the callback is a RuntimeError, not a
    deadlock, and the engine stays usable."""
    eng = make(1, 1)
    x = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(RuntimeError, match="must not call back into the engine"):
        eng.run(_schedule(), seed=2, callback=lambda k: eng.forward(x, 10))
    other, seen = make(1, 1), []
    a, _ = eng.run(_schedule(), seed=2, callback=lambda k: seen.append(other.forward(x, 10)))
    assert len(seen) == STEPS   # another engine may be called from the callback
    np.testing.assert_array_equal(a, eng.run(_schedule(), seed=2)[0])


@pytest.mark.parametrize("make,exact", ENGINES)
def test_noise_is_keyed_by_sample_index(make, exact):
    """Sample i of a call with first_index f is sample f + i of the seed's stream."""
    eng = make(2, 1)
    a, _ = eng.run(_schedule(), seed=9, first_index=0)
    b, _ = eng.run(_schedule(), seed=9, first_index=1)
    c, _ = eng.run(_schedule(), seed=10, first_index=0)
    if exact:
        np.testing.assert_array_equal(b[0], a[1])
    else:
        np.testing.assert_allclose(b[0], a[1], rtol=0, atol=1e-5)
    assert not np.allclose(c, a)


@pytest.mark.parametrize("make,exact", ENGINES)
def test_deterministic_schedule_and_eta(make, exact):
    """eta = 0 draws no noise after x_T: the same seed repeats; another eta changes the result."""
    eng = make(1, 1)
    a, _ = eng.run(_schedule(eta=0.0), seed=1)
    b, _ = eng.run(_schedule(eta=1.0), seed=1)
    np.testing.assert_array_equal(a, eng.run(_schedule(eta=0.0), seed=1)[0])
    assert not np.allclose(a, b)


@pytest.mark.parametrize("make,exact", ENGINES)
def test_bad_arguments(make, exact):
    eng = make(2, 1)
    schedule = _schedule()
    with pytest.raises(TypeError, match="seed"):
        eng.run(schedule, seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        eng.run(schedule, seed=-1)
    with pytest.raises(ValueError, match="first_index"):
        eng.run(schedule, seed=0, first_index=2**32 - 1)
    with pytest.raises(ValueError, match="trajectory step"):
        eng.run(schedule, seed=0, keep=[STEPS + 1])
    with pytest.raises(TypeError, match="callback"):
        eng.run(schedule, seed=0, callback=3)


def test_every_backend_gives_an_engine():
    """engine_for: the backend's own engine, or the reference U-Net with its fused step."""
    for name in ("native-cpu", "numba", "torch"):
        if _usable(name):
            eng = engine_for(get(name), CFG, WEIGHTS, 1, 8, 8)
            assert eng.input_shape == (1, 1, 8, 8)


@pytest.mark.parametrize("make,exact", ENGINES)
def test_a_multistep_schedule_runs_like_the_reference(make, exact):
    """A DPM-Solver++ (3M, SDE) schedule: each step reads the two previous x0 predictions, which
    the engine keeps; the result is the reference sampler's (diffusers' formulas) to float rounding."""
    eng = make(2, 1)
    if eng.history < 2:
        pytest.skip(f"{type(eng).__name__}'s step reads no previous predictions: it refuses multistep schedules")
    sched = scheduler_for("dpm++3m", {**fastddpm.DDPMScheduler().config, "algorithm_type": "sde-dpmsolver++"}, STEPS)
    got, frames = eng.run(sched.schedule(), seed=4, first_index=1, keep=[0, -1])
    ref = get("torch").make_engine(CFG, WEIGHTS, 2, 8, 8)
    want, _ = ref.run(sched.schedule(), seed=4, first_index=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(frames[STEPS], got)


def _fractional():
    """Euler-ancestral with diffusers' default spacing ("linspace"): fractional model times, x_T
    scaled by x_scale < 1, noise at every step."""
    sched = fastddpm.EulerAncestralDiscreteScheduler()
    sched.set_timesteps(STEPS)
    schedule = sched.schedule()
    assert schedule.model_timesteps is not None and schedule.x_scale < 1.0
    assert not np.array_equal(schedule.model_t, np.round(schedule.model_t))
    return schedule


@pytest.mark.parametrize("make,exact", ENGINES)
def test_a_fractional_scaled_schedule(make, exact):
    """The model sees the float32 model times, the noise is keyed by the integer timesteps, x_T is
    x_scale times the normals (position 0 shows it), and the result is the reference sampler's;
    first_index and batch invariance hold as for any schedule."""
    import dataclasses
    eng = make(2, 1)
    schedule = _fractional()
    x, frames = eng.run(schedule, seed=11, first_index=3, keep=[0, -1])
    x_t = fastddpm.noise(11, (2, 1, 8, 8), -1, first_index=3) * np.float32(schedule.x_scale)
    np.testing.assert_allclose(frames[0], x_t, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(frames[STEPS], x)
    want, _ = get("torch").make_engine(CFG, WEIGHTS, 2, 8, 8).run(schedule, seed=11, first_index=3)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-4)   # random weights: |x| reaches ~500
    # the same rows at the integer noise keys as model times, or from unscaled normals, differ
    for other in (dataclasses.replace(schedule, model_timesteps=None), dataclasses.replace(schedule, x_scale=1.0)):
        assert np.abs(eng.run(other, seed=11, first_index=3)[0] - x).max() > 1e-4
    b, _ = eng.run(schedule, seed=11, first_index=4)
    if exact:
        np.testing.assert_array_equal(b[0], x[1])
    else:
        np.testing.assert_allclose(b[0], x[1], rtol=0, atol=1e-5)


def _class_rows(labels, guided=True):
    labels = np.asarray(labels)
    return class_embedding(COND, COND_WEIGHTS, guided_labels(labels, NULL) if guided else labels)


@pytest.mark.parametrize("make,exact", ENGINES)
def test_a_guided_run_is_a_run_of_its_n_samples(make, exact):
    """guidance=w on an engine of 2n rows: x_T, the noise, first_index, the kept frames and the
    callbacks are those of n samples; the labels matter and the null rows are the null class's."""
    eng = make(4, 3, cfg=COND, weights=COND_WEIGHTS)
    schedule = _schedule()
    seen = []
    x, frames = eng.run(schedule, seed=11, first_index=3, keep=[0, 2, -1], callback=seen.append,
                        class_emb=_class_rows([1, 4]), guidance=2.5)
    assert x.shape == (2, 1, 8, 8) and x.dtype == np.float32 and np.isfinite(x).all()
    assert sorted(frames) == [0, 2, STEPS] and all(f.shape == (2, 1, 8, 8) for f in frames.values())
    np.testing.assert_array_equal(frames[STEPS], x)
    np.testing.assert_allclose(frames[0], fastddpm.noise(11, (2, 1, 8, 8), -1, first_index=3), rtol=0, atol=1e-6)
    assert seen == [k for k in range(1, STEPS + 1) if reports(k, 3, STEPS)]
    # sample 1 (label 4, index 4) = sample 0 of a run of the one label at first_index 4
    one = make(2, 1, cfg=COND, weights=COND_WEIGHTS)
    b, _ = one.run(schedule, seed=11, first_index=4, class_emb=_class_rows([4]), guidance=2.5)
    if exact:
        np.testing.assert_array_equal(b[0], x[1])
    else:
        np.testing.assert_allclose(b[0], x[1], rtol=0, atol=1e-5)
    other, _ = one.run(schedule, seed=11, first_index=4, class_emb=_class_rows([2]), guidance=2.5)
    assert not np.allclose(other, b)
    # w = 0 is the null class alone: the unguided run of the null label on n rows
    zero, _ = one.run(schedule, seed=11, first_index=4, class_emb=_class_rows([4]), guidance=0.0)
    null, _ = make(1, 1, cfg=COND, weights=COND_WEIGHTS).run(schedule, seed=11, first_index=4,
                                                           class_emb=_class_rows([NULL], guided=False))
    np.testing.assert_allclose(zero, null, rtol=0, atol=0 if exact else 1e-5)


@pytest.mark.parametrize("make,exact", ENGINES)
def test_conditional_engine_arguments(make, exact):
    eng = make(2, 1, cfg=COND, weights=COND_WEIGHTS)
    schedule = _schedule()
    with pytest.raises(ValueError, match="class_emb"):
        eng.run(schedule, seed=0)
    with pytest.raises(ValueError, match="class_emb"):
        eng.run(schedule, seed=0, class_emb=_class_rows([1], guided=False))
    # first_index is checked against the run's samples: 2 unguided, 1 guided
    with pytest.raises(ValueError, match="first_index"):
        eng.run(schedule, seed=0, first_index=2**32 - 1, class_emb=_class_rows([1, 2], guided=False))
    x, _ = eng.run(schedule, seed=0, first_index=2**32 - 1, class_emb=_class_rows([1]), guidance=2.0)
    assert x.shape == (1, 1, 8, 8)
    odd = make(3, 1, cfg=COND, weights=COND_WEIGHTS)
    with pytest.raises(ValueError, match="even engine batch"):
        odd.run(schedule, seed=0, class_emb=_class_rows([1, 2, 3], guided=False), guidance=2.0)
