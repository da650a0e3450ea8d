"""The fused step's multistep history (DPM-Solver++ 2M / 3M): _C.fused_step's h1, h2, x0_out and
_C.Engine.run's history ring, on every ISA path of the native CPU backend.

The step with history is y = c_x0 x0 + d_x x + d_m m + h1 H1 + h2 H2 + sigma z with
x0 = clip(a_x x + a_m m) (csrc/include/fastddpm/step.h); x0_out receives x0. Checked against a
float64 NumPy reference with _stepkit's float32 bound, and the engine's ring against a Python loop
of engine.forward + _C.fused_step with explicit ring buffers (bit for bit)."""
from __future__ import annotations

import numpy as np
import pytest

import fastddpm
from fastddpm.coefficients import A_M, A_X, H1, H2
from fastddpm.executors import get as get_backend
from fastddpm.executors import reasons

from _stepkit import X0_ALONE_NOISE, assert_step_close, using, x0_out_alone_case
from _stepkit import history_inputs as _inputs
from _stepkit import history_reference as _reference
from _stepkit import history_row as _row

if reasons("native-cpu"):
    pytest.skip(f"native-cpu is unavailable: {reasons('native-cpu')}", allow_module_level=True)

from fastddpm import _C  # noqa: E402

ISAS = get_backend("native-cpu").supported_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    with using(("native-cpu", request.param)):
        yield request.param


# batch 1 and 3; per-sample sizes that are no multiple of 16 or 64 (partial last blocks), one over
# a chunk (16384 elements) so the chunks' seams are crossed
SHAPES = [(1, 37), (3, 5, 7, 3), (1, 3, 17, 19), (3, 16384 + 77)]
HISTORIES = ["none", "h1", "h1+h2"]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["noclip", "clip"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_step_with_history_matches_float64(isa, shape, clip, history):
    x, m, z, a, b = _inputs(shape, seed=len(history) + int(clip) + sum(shape))
    row = _row(clip=clip)
    hs = {"none": [], "h1": [(a, row[H1])], "h1+h2": [(a, row[H1]), (b, row[H2])]}[history]
    kw = {"h1": a if hs else None, "h2": b if len(hs) == 2 else None}
    want, scale, x0_want, x0_scale = _reference(row, x, m, z, hs)

    # given noise
    out, x0 = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    _C.fused_step(x, m, out, row, 0, 5, 0, z, x0_out=x0, **kw)
    assert_step_close(out, want, scale, f"{isa} {history} given noise")
    assert_step_close(x0, x0_want, x0_scale, f"{isa} x0_out")
    if clip:  # clipped elements are the clip value exactly
        far = np.abs(row[A_X] * x.astype(np.float64) + row[A_M] * m.astype(np.float64)) > clip * (1 + 1e-4)
        assert far.any()
        np.testing.assert_array_equal(np.abs(x0[far]), np.float32(clip))
    # without x0_out: the same result
    out2 = np.empty_like(out)
    _C.fused_step(x, m, out2, row, 0, 5, 0, z, **kw)
    np.testing.assert_array_equal(out2, out)

    # Philox noise made in the kernel = the given-noise path fed with the spec's normals
    seed, step, first = 1234, 77, 5
    zs = fastddpm.noise(seed, shape, step, first)
    given, made, x0_made = np.empty_like(out), np.empty_like(out), np.empty_like(out)
    _C.fused_step(x, m, given, row, seed, step, first, zs, **kw)
    _C.fused_step(x, m, made, row, seed, step, first, None, x0_out=x0_made, **kw)
    np.testing.assert_array_equal(made, given)
    np.testing.assert_array_equal(x0_made, x0)


@pytest.mark.parametrize("noise", X0_ALONE_NOISE)
def test_x0_out_alone_leaves_the_step_bit_identical(isa, noise):
    """A history call with no history terms (x0_out only) gives the single-step kernel's bits."""
    x, m, zz, row = x0_out_alone_case(noise)
    plain, hist, x0 = (np.empty(x.shape, np.float32) for _ in range(3))
    _C.fused_step(x, m, plain, row, 9, 40, 2, zz)
    _C.fused_step(x, m, hist, row, 9, 40, 2, zz, x0_out=x0)
    np.testing.assert_array_equal(hist, plain)


def test_history_is_batch_invariant_and_in_place(isa):
    """Sample i of a batch = the same sample alone at first_index + i; out may be x."""
    shape = (3, 2, 41)
    x, m, _, a, b = _inputs(shape, seed=8)
    row = _row(clip=1.0)
    out, x0 = np.empty(shape, np.float32), np.empty(shape, np.float32)
    _C.fused_step(x, m, out, row, 17, 300, 4, None, h1=a, h2=b, x0_out=x0)
    for i in range(3):
        one, x0_one = np.empty((1,) + shape[1:], np.float32), np.empty((1,) + shape[1:], np.float32)
        _C.fused_step(x[i:i + 1], m[i:i + 1], one, row, 17, 300, 4 + i, None, h1=a[i:i + 1], h2=b[i:i + 1],
                      x0_out=x0_one)
        np.testing.assert_array_equal(one[0], out[i])
        np.testing.assert_array_equal(x0_one[0], x0[i])
    xi = x.copy()
    _C.fused_step(xi, m, xi, row, 17, 300, 4, None, h1=a, h2=b, x0_out=np.empty_like(x))
    np.testing.assert_array_equal(xi, out)


def test_history_large_arrays_threads_and_unaligned_x0_out(isa):
    """Past the streaming-store size (16 MB outputs): the prefetching, streaming blocks, the
    fallback when x0_out is not 16-byte aligned, and one vs two threads, all the same bits."""
    shape = (1, (16 << 20) // 4 + 13)
    x, m, z, a, b = _inputs(shape, seed=21)
    row = _row(clip=1.0)
    restore = _C.num_threads()
    try:
        results = []
        for threads, aligned in ((2, True), (1, True), (2, False)):
            _C.set_num_threads(threads)
            out = np.empty(shape, np.float32)
            buf = np.empty(x.size + 4, np.float32)
            off = 0 if aligned else 1
            x0 = buf[off:off + x.size].reshape(shape)
            _C.fused_step(x, m, out, row, 3, 11, 0, None, h1=a, h2=b, x0_out=x0)
            results.append((out, x0.copy()))
        for out, x0 in results[1:]:
            np.testing.assert_array_equal(out, results[0][0])
            np.testing.assert_array_equal(x0, results[0][1])
    finally:
        _C.set_num_threads(restore)
    out, x0 = results[0]
    zs = fastddpm.noise(3, shape, 11, 0)
    want, scale, x0_want, x0_scale = _reference(row, x, m, zs, [(a, row[H1]), (b, row[H2])])
    assert_step_close(out, want, scale, f"{isa} large")
    assert_step_close(x0, x0_want, x0_scale, f"{isa} large x0")


# -- argument checks -------------------------------------------------------------------------------

def test_history_arguments_are_checked():
    shape = (2, 3, 5)
    x, m, _, a, b = _inputs(shape, seed=1)
    row = _row()
    out = np.full(shape, 7.0, np.float32)
    x0 = np.full(shape, 7.0, np.float32)
    ro = np.zeros(shape, np.float32)
    ro.setflags(write=False)
    bad = [
        (ValueError, dict(h1=a[:1])),
        (ValueError, dict(h2=a.reshape(2, 15))),
        (ValueError, dict(h1=np.zeros((2, 3, 6), np.float32))),
        (ValueError, dict(x0_out=x0[:, :2])),
        (ValueError, dict(h1=np.ones((2, 3, 10), np.float32)[..., ::2])),   # not C-contiguous
        (ValueError, dict(x0_out=ro)),
        (ValueError, dict(x0_out=x)),
        (ValueError, dict(x0_out=m)),
        (ValueError, dict(x0_out=out)),
        (ValueError, dict(h1=x0, x0_out=x0)),
        (ValueError, dict(h2=x0, x0_out=x0)),
        (TypeError, dict(h1=a.astype(np.float64))),
        (TypeError, dict(h2=[1.0])),
        (TypeError, dict(x0_out=x0.astype(np.float64))),
    ]
    for expected, kw in bad:
        with pytest.raises(expected):
            _C.fused_step(x, m, out, row, 0, 1, 0, None, **kw)
        assert (out == 7.0).all() and (x0 == 7.0).all(), kw
    _C.fused_step(x, m, out, row, 0, 1, 0, None, h1=a, h2=b, x0_out=x0)   # the good call still works
    assert np.isfinite(out).all() and np.isfinite(x0).all()
    # a non-finite history weight is refused like any coefficient
    for col in (H1, H2):
        nan_row = row.copy()
        nan_row[col] = np.nan
        with pytest.raises(ValueError, match="non-finite"):
            _C.fused_step(x, m, out, nan_row, 0, 1, 0, None, h1=a)


# -- the engine's ring -----------------------------------------------------------------------------

STEPS = 6


def _tiny_engine(batch):
    from fastddpm.schedulers import scheduler_for
    from fastddpm.unet_config import UNetConfig, random_weights
    from test_pipeline import TINY
    cfg = UNetConfig.from_dict(TINY)
    eng = get_backend("native-cpu").make_engine(cfg, random_weights(cfg, seed=1), batch, 8, 8)
    schedule = scheduler_for("ddim", fastddpm.DDPMScheduler().config, STEPS).schedule(eta=0.5)
    return eng._engine, schedule


def _history_table(table):
    """The schedule's rows with history weights, nonzero from the first step on (a step without
    history pointers must ignore them)."""
    t = np.array(table, np.float32)
    t[:, H1] = np.linspace(-0.3, 0.2, len(t))
    t[:, H2] = np.linspace(0.1, -0.05, len(t))
    return t


def _python_loop(eng, table, timesteps, seed, first_index, shape, history):
    x = fastddpm.noise(seed, shape, -1, first_index)
    ring = [np.empty(shape, np.float32) for _ in range(3)]
    frames = [x.copy()]
    for k, t in enumerate(timesteps):
        m = eng.forward(x, np.full(shape[0], float(t), np.float32))
        h1 = ring[(k - 1) % 3] if history >= 1 and k >= 1 else None
        h2 = ring[(k - 2) % 3] if history >= 2 and k >= 2 else None
        _C.fused_step(x, m, x, table, seed, int(t), first_index, None, k, h1=h1, h2=h2,
                      x0_out=ring[k % 3] if history else None)
        frames.append(x.copy())
    return x, frames


@pytest.mark.parametrize("history", [1, 2])
def test_engine_history_ring_matches_a_python_loop(isa, history):
    batch, seed, first = 2, 13, 3
    eng, schedule = _tiny_engine(batch)
    table = _history_table(schedule.table)
    shape = (batch, 1, 8, 8)
    keep = list(range(STEPS + 1))
    x, frames = eng.run(table, schedule.timesteps, seed, first, keep, None, 1, history)
    want, want_frames = _python_loop(eng, table, schedule.timesteps, seed, first, shape, history)
    for k in keep:
        np.testing.assert_array_equal(frames[k], want_frames[k], err_msg=f"{isa} history={history} position {k}")
    np.testing.assert_array_equal(x, want)
    # the history terms did change the result
    plain, _ = eng.run(table, schedule.timesteps, seed, first, [], None, 1, 0)
    assert not np.array_equal(plain, x)
    # the ring is kept: a second run gives the same bits
    again, _ = eng.run(table, schedule.timesteps, seed, first, [], None, 1, history)
    np.testing.assert_array_equal(again, x)


def test_engine_history_with_zero_weights_is_the_plain_loop(isa):
    eng, schedule = _tiny_engine(1)
    table = np.array(schedule.table)
    plain, _ = eng.run(table, schedule.timesteps, 4, 0, [], None)
    for history in (1, 2):
        hist, _ = eng.run(table, schedule.timesteps, 4, 0, [], None, 1, history)
        np.testing.assert_array_equal(hist, plain)
    # history=0 with a 12-wide table whose h columns are set: no history is read
    weighted, _ = eng.run(_history_table(table), schedule.timesteps, 4, 0, [], None, 1, 0)
    np.testing.assert_array_equal(weighted, plain)


@pytest.mark.parametrize("history", [-1, 3, 10])
def test_engine_refuses_a_bad_history(history):
    eng, schedule = _tiny_engine(1)
    with pytest.raises(ValueError, match="history"):
        eng.run(schedule.table, schedule.timesteps, 0, 0, [], None, 1, history)
    eng.run(schedule.table, schedule.timesteps, 0, 0, [], None, 1, 2)   # still usable
