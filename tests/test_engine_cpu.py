"""The C++ U-Net engine (fastddpm._C.Engine via NativeCpuBackend.make_engine).

- each op kind, on hand-built plans, against the float64 NumPy interpreter of the plan;
- the whole forward against the reference U-Net (rel. L2 <= 1e-4, fp32) on every ISA path the
  CPU runs, for the benchmark presets and configs that use every option;
- whole sampling loops against the reference sampler with the same noise;
- embedding: batch invariance, threads, memory, cancellation, bad input.
"""
import gc
import threading

import numpy as np
import pytest

import fastddpm
from fastddpm.executors.engine_options import cpu_engine_options
from fastddpm.executors.native import CPU_BACKEND, _C
from fastddpm.plan import CONV_MODES, Op
from fastddpm.unet_config import PRESETS, UNetConfig, random_weights
from fastddpm.weights import WeightsError

from _plan_cases import (ATTENTION_SHAPES, attention_case, check_ops, conv_mode_case,
                         groupnorm_concat_shortcut_residual_cases, plan_arrays, rel_err,
                         time_emb_linear_cases)
from _plan_cases import rand_w as _w
from plan_numpy import run_plan

pytestmark = pytest.mark.skipif(_C is None, reason="fastddpm._C is not built")

torch = pytest.importorskip("torch")
from fastddpm.reference import ReferenceUNet, reference_sample  # noqa: E402

from test_unet_config import CONFIGS  # noqa: E402

ISAS = CPU_BACKEND.supported_isas() if _C is not None else []
REL_TOL = 1e-4


@pytest.fixture
def isa(request):
    """Run the test body on one ISA path, then restore the best one."""
    CPU_BACKEND.set_isa(request.param)
    yield request.param
    CPU_BACKEND.set_isa(ISAS[0])


# ---------------------------------------------------------------------- single ops

def _engine_for(ops, slot_sizes, weights, batch):
    """A compiled engine for a hand-built op list (slot 0 = input, slot 1 = output), and a
    plan-like object for the NumPy interpreter."""
    args, plan, wd = plan_arrays(ops, slot_sizes, weights, batch)
    return _make_engine(*args, batch, slot_sizes[0], slot_sizes[1]), plan, wd


def _make_engine(ints, floats, slot_sizes, weights, batch, in_c, out_c):
    """The engine with the FASTDDPM_* switches of the environment, as the native backend makes it."""
    return _C.Engine(ints, floats, slot_sizes, weights, batch, in_c, out_c, 1, 1, **cpu_engine_options())


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_op_time_embedding_and_linear(isa):
    for case in time_emb_linear_cases():
        assert check_ops(_make_engine, *case) <= REL_TOL


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("mode", ["CONV3", "CONV1", "DOWN1", "DOWN0", "UP"])
def test_op_conv_modes(isa, mode):
    """Conv with bias + time-embedding add, on sizes that are not tile multiples (7 output
    channels, 10x6 images, 5 input channels)."""
    assert check_ops(_make_engine, *conv_mode_case(mode)) <= REL_TOL


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_op_groupnorm_concat_shortcut_residual(isa):
    """Group norm (+SiLU, padded, two concatenated sources whose groups straddle the seam), then
    conv + 1x1 shortcut + scale; and a conv with a residual add."""
    for case in groupnorm_concat_shortcut_residual_cases():
        assert check_ops(_make_engine, *case) <= REL_TOL


@pytest.fixture
def threads(request):
    """Run the test body with this many engine threads, then restore the count."""
    before = _C.num_threads()
    _C.set_num_threads(request.param)
    yield request.param
    _C.set_num_threads(before)


def _resnet_convs(c, co, h, w, residual=-1):
    """A resnet's two convs over slots 0 (input [c, h, w]) .. 7 (conv2's output [co, h, w]):
    conv1 with the time embedding, conv2 with the 1x1 shortcut of the input + scale 0.7 (and a
    residual if given); slots 2 and 6 are padded."""
    return [Op("TIME_EMB", out=3, c_out=16),
            Op("LINEAR", out=4, in_=3, c_in=16, c_out=co, w_idx=2, b_idx=3, act="silu"),
            Op("PAD", out=2, in_=0, c_in=c, h=h, w=w),
            Op("CONV", out=5, in_=2, c_in=c, h=h, w=w, c_out=co, mode=CONV_MODES["CONV3"], w_idx=0,
               b_idx=1, temb=4),
            Op("PAD", out=6, in_=5, c_in=co, h=h, w=w),
            Op("CONV", out=7, in_=6, c_in=co, h=h, w=w, c_out=co, mode=CONV_MODES["CONV3"], w_idx=4,
               b_idx=5, in2=2, c_in2=c, w2_idx=6, b2_idx=7, scale=0.7, residual=residual)]


def _resnet_conv_weights(rng, c, co):
    """Weights 0-7 of _resnet_convs, then 8-9 for a last 3x3 conv co -> co."""
    return [_w(rng, co, c, 3, 3), _w(rng, co), _w(rng, co, 16), _w(rng, co), _w(rng, co, co, 3, 3),
            _w(rng, co), _w(rng, co, c, 1, 1), _w(rng, co), _w(rng, co, co, 3, 3), _w(rng, co)]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("batch,threads", [(1, 2), (2, 2), (3, 2), (2, 1)], indirect=["threads"])
@pytest.mark.parametrize("h,w,tile", [(10, 14, 2), (16, 32, 4)])
def test_op_conv3_winograd(isa, batch, threads, h, w, tile, monkeypatch):
    """Stride-1 3x3 convs on the Winograd path (FASTDDPM_WINOGRAD=force, whatever each ISA's cost
    model would pick): 10x14 takes F(2x2, 3x3) (35 tiles), 16x32 F(4x4, 3x3) (32 tiles); with
    the time embedding, with the 1x1 shortcut + scale, with a residual + scale; 9 output channels
    (not a micro-tile multiple). With 2 threads, whole pairs of samples run one per thread (the
    sample-parallel schedule), a remaining sample with the threads sharing the conv. Checked against the NumPy interpreter, with the Winograd path on and
    off (FASTDDPM_WINOGRAD=0)."""
    rng = np.random.default_rng(batch)
    c, co = 12, 9
    plane, pp = h * w, (h + 2) * (w + 2)
    sizes = [c * plane, co * plane, c * pp, 16, co, co * plane, co * pp, co * plane, co * pp]
    ops = _resnet_convs(c, co, h, w) + [
        Op("PAD", out=8, in_=7, c_in=co, h=h, w=w),
        Op("CONV", out=1, in_=8, c_in=co, h=h, w=w, c_out=co, mode=CONV_MODES["CONV3"], w_idx=8,
           b_idx=9, residual=7, scale=0.5)]
    weights = _resnet_conv_weights(rng, c, co)
    t = (3.0, 811.0, 40.0)[:batch]
    x = rng.standard_normal((batch, c * plane, 1, 1)).astype(np.float32)
    outs = {}
    for flag, paths in (("force", [tile] * 3), ("0", [0] * 3)):
        monkeypatch.setenv("FASTDDPM_WINOGRAD", flag)
        eng, plan, wd = _engine_for(ops, sizes, weights, batch)
        assert eng.conv_paths == paths
        outs[flag] = eng.forward(x, np.array(t, np.float32)).reshape(batch, -1)
    ref = run_plan(plan, wd, x.reshape(batch, -1), np.array(t)).reshape(batch, -1)
    assert rel_err(outs["force"], ref) <= REL_TOL
    assert rel_err(outs["0"], ref) <= REL_TOL
    # each sample is computed alone, the same way whatever the batch and thread count
    monkeypatch.setenv("FASTDDPM_WINOGRAD", "force")
    one = _engine_for(ops, sizes, weights, 1)[0].forward(x[:1], np.array(t[:1], np.float32))
    assert np.array_equal(one.reshape(1, -1), outs["force"][:1])


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("batch,threads", [(1, 2), (2, 2), (3, 1)], indirect=["threads"])
@pytest.mark.parametrize("h,w", [(16, 16), (16, 24)])
def test_op_upsample_conv_winograd(isa, batch, threads, h, w, monkeypatch):
    """A folded nearest-x2 upsample + 3x3 conv on the Winograd path (forced): its four output phases as
    one F(4x4) conv at the input's resolution with 4 x 7 rows (the 6-row blocks straddle phases),
    stored with stride 2; with the time embedding, and with a residual + scale. Against the NumPy
    interpreter, Winograd on and off."""
    rng = np.random.default_rng(batch + h + w)
    c, co = 12, 7
    plane, pp, up = h * w, (h + 2) * (w + 2), 4 * h * w
    sizes = [c * plane, co * up, c * pp, 16, co, co * up]
    ops = [Op("TIME_EMB", out=3, c_out=16),
           Op("LINEAR", out=4, in_=3, c_in=16, c_out=co, w_idx=2, b_idx=3, act="silu"),
           Op("PAD", out=2, in_=0, c_in=c, h=h, w=w),
           Op("CONV", out=5, in_=2, c_in=c, h=h, w=w, c_out=co, mode=CONV_MODES["UP"], w_idx=0,
              b_idx=1, temb=4),
           Op("CONV", out=1, in_=2, c_in=c, h=h, w=w, c_out=co, mode=CONV_MODES["UP"], w_idx=4,
              b_idx=5, residual=5, scale=0.5)]
    weights = [_w(rng, co, c, 3, 3), _w(rng, co), _w(rng, co, 16), _w(rng, co), _w(rng, co, c, 3, 3),
               _w(rng, co)]
    t = np.array((3.0, 811.0, 40.0)[:batch], np.float32)
    x = rng.standard_normal((batch, c * plane, 1, 1)).astype(np.float32)
    outs = {}
    for flag, paths in (("force", [4, 4]), ("0", [0, 0])):
        monkeypatch.setenv("FASTDDPM_WINOGRAD", flag)
        eng, plan, wd = _engine_for(ops, sizes, weights, batch)
        assert eng.conv_paths == paths
        outs[flag] = eng.forward(x, t).reshape(batch, -1)
    ref = run_plan(plan, wd, x.reshape(batch, -1), t.astype(np.float64)).reshape(batch, -1)
    assert rel_err(outs["force"], ref) <= REL_TOL
    assert rel_err(outs["0"], ref) <= REL_TOL


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("batch,threads", [(1, 2), (3, 2)], indirect=["threads"])
@pytest.mark.parametrize("h,w", [(6, 16), (5, 32), (4, 8), (3, 4)])  # whole vectors or halves per ISA
def test_compact_grid_columns(isa, batch, threads, h, w, monkeypatch):
    """Direct 3x3 and folded-upsample convs whose image width is a multiple of the ISA's lanes
    compute only the image's own pixels (each vector of a tile row read from its own row of the
    padded plane), not the padded grid's pad columns: the same dot products in the same order, so
    the output is bit-identical to the padded-grid run (FASTDDPM_COMPACT_GRID=0), and matches the
    NumPy interpreter. With the time embedding, the 1x1 shortcut + scale, a residual + scale."""
    rng = np.random.default_rng(w + batch)
    c, co = 12, 9
    plane, pp, up = h * w, (h + 2) * (w + 2), 4 * h * w
    sizes = [c * plane, co * up, c * pp, 16, co, co * plane, co * pp, co * plane]
    ops = _resnet_convs(c, co, h, w, residual=5) + [
        Op("PAD", out=6, in_=7, c_in=co, h=h, w=w),
        Op("CONV", out=1, in_=6, c_in=co, h=h, w=w, c_out=co, mode=CONV_MODES["UP"], w_idx=8, b_idx=9)]
    weights = _resnet_conv_weights(rng, c, co)
    t = np.array((3.0, 811.0, 40.0)[:batch], np.float32)
    x = rng.standard_normal((batch, c * plane, 1, 1)).astype(np.float32)
    monkeypatch.setenv("FASTDDPM_WINOGRAD", "0")
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTDDPM_COMPACT_GRID", flag)
        eng, plan, wd = _engine_for(ops, sizes, weights, batch)
        outs[flag] = eng.forward(x, t).reshape(batch, -1)
    assert np.array_equal(outs["1"], outs["0"])
    ref = run_plan(plan, wd, x.reshape(batch, -1), t.astype(np.float64)).reshape(batch, -1)
    assert rel_err(outs["1"], ref) <= REL_TOL


def test_compact_grid_switch_must_be_0_or_1(monkeypatch):
    monkeypatch.setenv("FASTDDPM_COMPACT_GRID", "yes")
    ops = [Op("CONV", out=1, in_=0, c_in=1, h=1, w=1, c_out=1, mode=CONV_MODES["CONV1"], w_idx=0, b_idx=1)]
    with pytest.raises(ValueError, match="FASTDDPM_COMPACT_GRID must be 0 or 1"):
        _engine_for(ops, [1, 1], [np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)], 1)


def test_winograd_scratch_is_bounded(monkeypatch):
    """A conv whose transformed input would exceed 128 MiB per thread (here 1024x1024, 16 input
    channels: 144 MiB for F(4x4), 256 MiB for F(2x2)) runs direct instead, even when forced."""
    monkeypatch.setenv("FASTDDPM_WINOGRAD", "force")
    c, co, h, w = 16, 8, 1024, 1024
    ops = [Op("PAD", out=2, in_=0, c_in=c, h=h, w=w),
           Op("CONV", out=1, in_=2, c_in=c, h=h, w=w, c_out=co, mode=CONV_MODES["CONV3"], w_idx=0,
              b_idx=1)]
    rng = np.random.default_rng(0)
    eng = _engine_for(ops, [c * h * w, co * h * w, c * (h + 2) * (w + 2)],
                      [_w(rng, co, c, 3, 3), _w(rng, co)], 1)[0]
    assert eng.conv_paths == [0]
    small = _engine_for([Op("PAD", out=2, in_=0, c_in=c, h=64, w=64),
                         Op("CONV", out=1, in_=2, c_in=c, h=64, w=64, c_out=co, mode=CONV_MODES["CONV3"],
                            w_idx=0, b_idx=1)],
                        [c * 64 * 64, co * 64 * 64, c * 66 * 66], [_w(rng, co, c, 3, 3), _w(rng, co)], 1)[0]
    assert small.conv_paths == [4]


def test_winograd_switch_must_be_0_1_or_2(monkeypatch):
    monkeypatch.setenv("FASTDDPM_WINOGRAD", "yes")
    ops = [Op("CONV", out=1, in_=0, c_in=1, h=1, w=1, c_out=1, mode=CONV_MODES["CONV1"], w_idx=0, b_idx=1)]
    with pytest.raises(ValueError, match="FASTDDPM_WINOGRAD must be 0, 1, 2 or force"):
        _engine_for(ops, [1, 1], [np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)], 1)


def test_engine_options_come_from_the_environment(monkeypatch):
    """The FASTDDPM_* switches become _C.Engine's keyword arguments; unset, the engine's defaults."""
    for name in ("FASTDDPM_WINOGRAD", "FASTDDPM_COMPACT_GRID", "FASTDDPM_SAMPLE_PARALLEL"):
        monkeypatch.delenv(name, raising=False)
    assert cpu_engine_options() == {"winograd_max_m": 4, "winograd_force": False, "compact_grid": True,
                                    "sample_parallel": True}
    for value, (max_m, force) in {"0": (0, False), "1": (4, False), "2": (2, False), "force": (4, True)}.items():
        monkeypatch.setenv("FASTDDPM_WINOGRAD", value)
        opts = cpu_engine_options()
        assert (opts["winograd_max_m"], opts["winograd_force"]) == (max_m, force)
    monkeypatch.setenv("FASTDDPM_COMPACT_GRID", "0")
    monkeypatch.setenv("FASTDDPM_SAMPLE_PARALLEL", "0")
    assert not cpu_engine_options()["compact_grid"] and not cpu_engine_options()["sample_parallel"]


def test_engine_options_are_checked_by_the_engine():
    ops = [Op("CONV", out=1, in_=0, c_in=1, h=1, w=1, c_out=1, mode=CONV_MODES["CONV1"], w_idx=0, b_idx=1)]
    args, _, _ = plan_arrays(ops, [1, 1], [np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)], 1)
    _C.Engine(*args, 1, 1, 1, 1, 1, winograd_max_m=2, winograd_force=True, compact_grid=False,
              sample_parallel=False)
    with pytest.raises(ValueError, match="winograd_max_m must be 0, 2 or 4, got 3"):
        _C.Engine(*args, 1, 1, 1, 1, 1, winograd_max_m=3)
    with pytest.raises(TypeError):   # the switches are keyword-only
        _C.Engine(*args, 1, 1, 1, 1, 1, 4)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("heads,c,h,w", ATTENTION_SHAPES)
def test_op_attention(isa, heads, c, h, w):
    assert check_ops(_make_engine, *attention_case(heads, c, h, w)) <= REL_TOL


def test_bad_plans_raise_value_errors():
    rng = np.random.default_rng(3)
    ops = [Op("PAD", out=2, in_=0, c_in=2, h=4, w=4), Op("CONV", out=1, in_=2, c_in=2, h=4, w=4, c_out=3,
                                                         mode=0, w_idx=0, b_idx=1)]
    good = [_w(rng, 3, 2, 3, 3), _w(rng, 3)]
    sizes = [32, 48, 72]
    _engine_for(ops, sizes, good, 1)  # builds
    with pytest.raises(ValueError, match=r"weight 'w0' has shape \(3, 2, 1, 3\), expected \(3, 2, 3, 3\)"):
        _engine_for(ops, sizes, [good[0][:, :, :1], good[1]], 1)
    with pytest.raises(ValueError, match="slot 2 holds 50"):
        _engine_for(ops, [32, 48, 50], good, 1)
    with pytest.raises(ValueError, match="slot 7 is out of range"):
        _engine_for([ops[0], Op("CONV", out=1, in_=7, c_in=2, h=4, w=4, c_out=3, mode=0, w_idx=0, b_idx=1)],
                    sizes, good, 1)
    with pytest.raises(ValueError, match="unknown conv mode 9"):
        _engine_for([ops[0], Op("CONV", out=1, in_=2, c_in=2, h=4, w=4, c_out=3, mode=9, w_idx=0, b_idx=1)],
                    sizes, good, 1)
    # sizes whose products would overflow int64 are refused by name, before any product is formed
    with pytest.raises(ValueError, match=r"h = 131072 must be in \[1, 65536\]"):
        _engine_for([Op("PAD", out=2, in_=0, c_in=2, h=2**17, w=2**17), ops[1]], sizes, good, 1)
    with pytest.raises(ValueError, match=r"c_in = 1099511627776 must be in \[1, 16777216\]"):
        _engine_for([ops[0], Op("CONV", out=1, in_=2, c_in=2**40, h=4, w=4, c_out=3, mode=0, w_idx=0, b_idx=1)],
                    sizes, good, 1)
    bad = Op("PAD", out=2, in_=0, c_in=2, h=4, w=4)
    bad.kind = "TIME_EMB"
    ints = np.array([op.int_row() for op in ops], dtype=np.int64)
    ints[0, 0] = 99
    with pytest.raises(ValueError, match="unknown op code 99"):
        _C.Engine(ints, np.zeros((2, 4)), np.array(sizes, np.int64), [("w0", good[0]), ("w1", good[1])],
                  1, 32, 48, 1, 1)
    eng, _, _ = _engine_for(ops, sizes, good, 1)
    with pytest.raises(ValueError, match="sample must have shape"):
        eng.forward(np.zeros((2, 32, 1, 1), np.float32), np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="float32"):
        eng.forward(np.zeros((1, 32, 1, 1), np.float64), np.zeros(1, np.float32))


# ---------------------------------------------------------------------- whole forward

FORWARD_CASES = [("bench-small", 1), ("bench-small", 3), ("ddpm-cifar10", 1), ("rgb64-heads", 1),
                 ("gray16-noattn", 3), ("four-nonsquare", 3), ("odd-width", 5)]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("name,batch", FORWARD_CASES, ids=[f"{n}-n{b}" for n, b in FORWARD_CASES])
def test_forward_matches_reference(isa, name, batch, monkeypatch):
    """The whole network with every conv that can on the Winograd path (forced), each ISA."""
    monkeypatch.setenv("FASTDDPM_WINOGRAD", "force")
    _check_forward(name, batch)


@pytest.mark.parametrize("name,batch", FORWARD_CASES, ids=[f"{n}-n{b}" for n, b in FORWARD_CASES])
def test_forward_with_the_cost_models_paths_matches_reference(name, batch, monkeypatch):
    """What users get: each conv's path from the best ISA's cost model (FASTDDPM_WINOGRAD unset)."""
    monkeypatch.delenv("FASTDDPM_WINOGRAD", raising=False)
    _check_forward(name, batch, winograd=None)


@pytest.mark.parametrize("winograd", ["0", "force"])
def test_sample_parallel_schedule_is_bit_identical(winograd, monkeypatch):
    """Batch 5 on 2 threads: samples 0-3 run one per thread (each op single-threaded), sample 4
    with the threads sharing each op; with the schedule off every sample runs op-parallel. The
    outputs are the same to the bit, and sample 4 is what a batch of one gives."""
    cfg = UNetConfig.from_dict(CONFIGS["bench-small"])
    w = random_weights(cfg, seed=2)
    h, wd = cfg.sample_hw
    x = np.random.default_rng(5).standard_normal((5, cfg.in_channels, h, wd)).astype(np.float32)
    t = np.array([3, 999, 500, 1, 77])
    monkeypatch.setenv("FASTDDPM_WINOGRAD", winograd)
    restore = _C.num_threads()
    outs = {}
    try:
        _C.set_num_threads(2)
        for flag in ("1", "0"):
            monkeypatch.setenv("FASTDDPM_SAMPLE_PARALLEL", flag)
            outs[flag] = CPU_BACKEND.make_engine(cfg, w, 5, h, wd).forward(x, t)
        one = CPU_BACKEND.make_engine(cfg, w, 1, h, wd).forward(x[4:], t[4:])
    finally:
        _C.set_num_threads(restore)
    assert np.array_equal(outs["1"], outs["0"])
    assert np.array_equal(outs["1"][4:], one)


def test_sample_parallel_switch_must_be_0_or_1(monkeypatch):
    monkeypatch.setenv("FASTDDPM_SAMPLE_PARALLEL", "2")
    ops = [Op("CONV", out=1, in_=0, c_in=1, h=1, w=1, c_out=1, mode=CONV_MODES["CONV1"], w_idx=0, b_idx=1)]
    with pytest.raises(ValueError, match="FASTDDPM_SAMPLE_PARALLEL must be 0 or 1"):
        _engine_for(ops, [1, 1], [np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)], 1)


@pytest.mark.parametrize("name,batch", [("bench-small", 3), ("rgb64-heads", 1)])
def test_forward_without_winograd_matches_reference(name, batch, monkeypatch):
    """The direct conv path (FASTDDPM_WINOGRAD=0) on whole networks, best ISA."""
    monkeypatch.setenv("FASTDDPM_WINOGRAD", "0")
    _check_forward(name, batch, winograd=False)


def _check_forward(name, batch, winograd=True):
    """winograd: whether some conv must take the Winograd path (every config has one that can),
    or None for whatever the cost model chose."""
    cfg = UNetConfig.from_dict(CONFIGS[name])
    w = random_weights(cfg, seed=4)
    h, wd = cfg.sample_hw
    eng = CPU_BACKEND.make_engine(cfg, w, batch, h, wd)
    if winograd is not None:
        assert any(eng._engine.conv_paths) == winograd
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, cfg.in_channels, h, wd)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    out = eng.forward(x, t)
    with torch.no_grad():
        ref = ReferenceUNet.from_weights(cfg, w)(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    assert out.shape == ref.shape and out.dtype == np.float32
    assert rel_err(out, ref) <= REL_TOL
    # a scalar timestep means the same step for every sample
    with torch.no_grad():
        ref7 = ReferenceUNet.from_weights(cfg, w)(torch.from_numpy(x), 7).numpy()
    assert rel_err(eng.forward(x, 7), ref7) <= REL_TOL


def test_pipeline_uses_the_engine():
    pipe = fastddpm.load("bench-small")
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    out = pipe.unet(x, 100, backend="native-cpu")
    [eng] = [e for k, e in pipe._engines.items() if k[:4] == ("native-cpu", 2, 32, 32)]
    assert np.array_equal(out, eng.forward(x, 100))
    with torch.no_grad():
        ref = pipe.reference_unet()(torch.from_numpy(x), 100).numpy()
    assert rel_err(out, ref) <= REL_TOL


def test_make_engine_refuses_bad_weights_naming_the_key():
    cfg = UNetConfig.from_dict(PRESETS["bench-small"])
    w = random_weights(cfg, 0)
    missing = {k: v for k, v in w.items() if k != "mid_block.resnets.1.conv2.bias"}
    with pytest.raises(WeightsError, match="mid_block.resnets.1.conv2.bias"):
        CPU_BACKEND.make_engine(cfg, missing, 1, 32, 32)
    extra = dict(w, **{"mid_block.attentions.0.to_out.1.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match=r"unexpected 'mid_block.attentions.0.to_out.1.weight'"):
        CPU_BACKEND.make_engine(cfg, extra, 1, 32, 32)
    wrong = dict(w, **{"conv_in.weight": np.zeros((32, 1, 3, 1), np.float32)})
    with pytest.raises(WeightsError, match=r"'conv_in.weight': shape \(32, 1, 3, 1\)"):
        CPU_BACKEND.make_engine(cfg, wrong, 1, 32, 32)
    with pytest.raises(ValueError, match="height must be a positive multiple of 4"):
        CPU_BACKEND.make_engine(cfg, w, 1, 30, 32)
    eng = CPU_BACKEND.make_engine(cfg, w, 2, 32, 32)
    x = np.zeros((2, 1, 32, 32), np.float32)
    with pytest.raises(ValueError, match="timestep must be a scalar or have shape"):
        eng.forward(x, [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        eng.forward(x, float("nan"))
    with pytest.raises(ValueError, match=r"shape \(2, 1, 32, 32\)"):
        eng.forward(x[:1], 5)


# ---------------------------------------------------------------------- whole loops

def _loops(pipe, sampler, steps, n, keep, seed=5):
    a = pipe(n, steps=steps, sampler=sampler, seed=seed, backend="native-cpu", output="float", trajectory=keep)
    sched = pipe.scheduler_for(sampler, steps)
    x, frames = reference_sample(pipe.reference_unet(), sched, (n, 1, 32, 32), seed=seed, keep=keep)
    # output="float" clips to [-1, 1]: compare the reference the same way
    return a, np.clip(x.numpy(), -1, 1), {k: np.clip(v.numpy(), -1, 1) for k, v in frames.items()}


@pytest.mark.slow
def test_ddpm_1000_steps_matches_reference_sampler():
    """bench-small, DDPM, 1000 steps, the same Philox noise. Measured max |native - reference|
    on [-1, 1]: 1.55e-6 with direct convs, 2.23e-6 with Winograd F(2x2) + F(4x4), 2.15e-6 with
    the folded one-head attention and the degree-5 exp (AVX2, 2 threads, Zen1); the bound leaves
    a 13x margin for other ISAs, far below one uint8 level (7.8e-3)."""
    pipe = fastddpm.load("bench-small")
    a, x, frames = _loops(pipe, "ddpm", 1000, 1, [0, 500, 1000])
    diff = float(np.abs(a.images - x).max())
    print(f"DDPM 1000 steps: max abs difference {diff:.3g}")
    assert np.abs(a.trajectory[0] - frames[0]).max() <= 2e-6   # x_T: the spec's noise to float rounding
    assert diff <= 3e-5


def test_ddim_50_steps_against_reference_sampler():
    """bench-small, DDIM (eta 0), 50 steps. With random weights this ODE is chaotic: a 1e-6
    relative perturbation of the reference's own model output moves its final image by ~1.4 (a
    separate experiment: 3.4e-5 at step 5, 4.0e-4 at step 10, 1.43 at step 50), so the whole-run
    difference says nothing about the engine. What is checked: the first 10 steps, before the
    amplification saturates, with bounds at least 3x the differences that direct convs, Winograd,
    the folded attention and the degree-5 exp each produce at steps 5 and 10."""
    pipe = fastddpm.load("bench-small")
    keep = [0, 5, 10, 50]
    a, x, frames = _loops(pipe, "ddim", 50, 1, keep)
    d5 = float(np.abs(a.trajectory[1] - frames[5]).max())
    d10 = float(np.abs(a.trajectory[2] - frames[10]).max())
    d50 = float(np.abs(a.images - x).max())
    print(f"DDIM 50 steps: max abs difference {d5:.3g} at step 5, {d10:.3g} at 10, {d50:.3g} at 50")
    assert np.abs(a.trajectory[0] - frames[0]).max() <= 2e-6   # the spec's noise to float rounding
    assert d5 <= 1.5e-4 and d10 <= 2.5e-3
    assert np.isfinite(a.images).all() and np.abs(a.images).max() <= 1


def test_batch_invariance_is_bit_exact():
    pipe = fastddpm.load("bench-small")
    four = pipe(4, steps=4, sampler="ddpm", seed=11, backend="native-cpu", output="float")
    two = pipe(2, steps=4, sampler="ddpm", seed=11, backend="native-cpu", output="float")
    assert np.array_equal(four[:2], two)
    one = pipe(1, steps=4, sampler="ddim", seed=11, backend="native-cpu", output="float", eta=0.5)
    three = pipe(3, steps=4, sampler="ddim", seed=11, backend="native-cpu", output="float", eta=0.5)
    assert np.array_equal(three[:1], one)


def test_two_threads_get_the_sequential_images():
    pipe = fastddpm.load("bench-small")
    seq = [pipe(2, steps=6, seed=s, backend="native-cpu", output="float") for s in (1, 2)]
    got = [None, None]

    def work(i):
        got[i] = pipe(2, steps=6, seed=i + 1, backend="native-cpu", output="float")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(got[0], seq[0]) and np.array_equal(got[1], seq[1])


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_200_calls_do_not_grow_memory():
    cfg = UNetConfig.from_dict(CONFIGS["gray16-noattn"])
    eng = CPU_BACKEND.make_engine(cfg, random_weights(cfg, 0), 2, 16, 16)
    x = np.zeros((2, 1, 16, 16), np.float32)
    sched = fastddpm.DDIMScheduler()
    sched.set_timesteps(3)
    for _ in range(20):
        eng.forward(x, 3)
        eng.run(sched.schedule(), seed=1, keep=[0, 1])
    gc.collect()
    before = _rss_mb()
    for i in range(200):
        eng.forward(x, i)
        eng.run(sched.schedule(), seed=i, keep=[0, 1], callback=lambda k: None)
    gc.collect()
    grown = _rss_mb() - before
    assert grown < 2.0, f"RSS grew by {grown:.1f} MiB over 200 calls"


def test_ctrl_c_stops_the_loop_between_steps(sigint_handled):
    """A SIGINT while the GIL is released: the loop notices it at the next step boundary."""
    import _thread
    import time
    cfg = UNetConfig.from_dict(CONFIGS["gray16-noattn"])
    eng = CPU_BACKEND.make_engine(cfg, random_weights(cfg, 0), 1, 16, 16)
    sched = fastddpm.DDPMScheduler()
    sched.set_timesteps(1000)
    steps = []
    timer = threading.Timer(0.05, _thread.interrupt_main)

    def progress(k):
        steps.append(k)
        if k == 1:  # the loop is running: interrupt it from another thread
            timer.start()

    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        eng.run(sched.schedule(), seed=1, callback=progress)
    timer.join()
    assert 0 < len(steps) < 1000       # it ran, and it stopped early
    assert time.perf_counter() - t0 < 60
    sched.set_timesteps(5)             # and the engine is usable afterwards, with the same answers
    x, _ = eng.run(sched.schedule(), seed=1)
    fresh = CPU_BACKEND.make_engine(cfg, random_weights(cfg, 0), 1, 16, 16)
    np.testing.assert_array_equal(x, fresh.run(sched.schedule(), seed=1)[0])


def test_diffusers_saved_directory_runs_natively(tmp_path):
    """UNet2DModel.save_pretrained + DDPMScheduler.save_pretrained -> fastddpm.load -> the native
    forward equals diffusers' forward (no rename table: the plan reads diffusers' keys)."""
    diffusers = pytest.importorskip("diffusers")
    cfg = UNetConfig.from_dict(CONFIGS["four-nonsquare"])
    w = random_weights(cfg, seed=6)
    with torch.device("meta"):
        model = diffusers.UNet2DModel.from_config(cfg.to_dict())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True, assign=True)
    model.eval().save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")
    pipe = fastddpm.load(tmp_path)
    h, wd = cfg.sample_hw
    x = np.random.default_rng(6).standard_normal((2, cfg.in_channels, h, wd)).astype(np.float32)
    out = pipe.unet(x, 321, backend="native-cpu")
    with torch.no_grad():
        ref = model(torch.from_numpy(x), 321).sample.numpy()
    assert any(k[:4] == ("native-cpu", 2, h, wd) for k in pipe._engines)
    assert rel_err(out, ref) <= REL_TOL


def test_fma_peak_is_measured_and_checks_its_arguments():
    """The benchmarks' FLOP ceiling: a positive rate on every ISA this CPU runs, and clear errors
    for bad arguments."""
    for isa in _C.supported_isas():
        assert _C._fma_peak_gflops(isa, 1, 0.01) > 0
    with pytest.raises(ValueError, match="unknown ISA path 'sse9'"):
        _C._fma_peak_gflops("sse9", 1)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        _C._fma_peak_gflops("generic", 0)
    with pytest.raises(ValueError, match=r"seconds must be in \(0, 10\]"):
        _C._fma_peak_gflops("generic", 1, 0.0)
    assert not hasattr(_C, "fma_peak_gflops")   # a benchmark tool, not the product's API


def test_per_op_profiling(monkeypatch):
    """Engine.set_profiling / op_seconds: one entry per plan op, filled by forwards while on (batch
    1 runs op-parallel, so every op is timed), zeroed when switched on again, frozen when off."""
    monkeypatch.delenv("FASTDDPM_SAMPLE_PARALLEL", raising=False)
    pipe = fastddpm.load("bench-small")
    eng = CPU_BACKEND.make_engine(pipe.unet_config, pipe.weights, 1, 32, 32)
    x = np.zeros((1, 1, 32, 32), np.float32)
    assert eng._engine.op_seconds == [0.0] * len(eng.plan.ops)
    eng._engine.set_profiling(True)
    eng.forward(x, 5)
    first = np.array(eng._engine.op_seconds)
    assert first.shape == (len(eng.plan.ops),) and (first >= 0).all() and first.sum() > 0
    eng.forward(x, 5)
    assert (np.array(eng._engine.op_seconds) >= first).all()
    eng._engine.set_profiling(False)
    frozen = eng._engine.op_seconds
    eng.forward(x, 5)
    assert eng._engine.op_seconds == frozen
    eng._engine.set_profiling(True)
    assert eng._engine.op_seconds == [0.0] * len(eng.plan.ops)
