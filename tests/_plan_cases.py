"""Hand-built single-op plan cases, shared by the engine tests (test_engine_cpu.py on the C++
engine, test_cuda_ops.py on the CUDA engine).

Each case builder gives Case tuples: an op list over slots (slot 0 = the input [slot_sizes[0]],
slot 1 = the output [slot_sizes[1]], both at 1x1 "pixels"), the slot sizes, the weights (float32,
named w0, w1, ... in order), and the batch and timesteps to check it with. `check_ops(make_engine,
*case)` runs a case on an engine and returns its relative L2 error against the float64 NumPy
interpreter of the plan (plan_numpy.run_plan). The random numbers (seeds, draw order) are fixed:
every engine is checked on exactly the same inputs.
"""
from __future__ import annotations

import types
from typing import NamedTuple

import numpy as np

from fastddpm.plan import CONV_MODES, Op

from plan_numpy import run_plan


class Case(NamedTuple):
    ops: list
    slot_sizes: list
    weights: list
    batch: int = 2
    t: tuple = (3.0, 811.0)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rand_w(rng, *shape, scale=None):
    """Normal float32 weights scaled by 1/sqrt(fan-in) (the product of all but the first dim)."""
    fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    s = scale if scale is not None else 1 / np.sqrt(fan)
    return (rng.standard_normal(shape) * s).astype(np.float32)


def plan_arrays(ops, slot_sizes, weights, batch):
    """The engine constructors' plan arguments for a hand-built op list: (ints, floats, slot sizes,
    [(name, float32 array), ...]), and a plan-like object with its weight dict for run_plan."""
    names = [f"w{i}" for i in range(len(weights))]
    plan = types.SimpleNamespace(ops=ops, batch=batch, weight_names=names,
                                 output_shape=(batch, slot_sizes[1]))
    ints = np.array([op.int_row() for op in ops], dtype=np.int64)
    floats = np.array([op.float_row() for op in ops], dtype=np.float64)
    wl = [(n, np.ascontiguousarray(w, np.float32)) for n, w in zip(names, weights)]
    return (ints, floats, np.array(slot_sizes, dtype=np.int64), wl), plan, dict(zip(names, weights))


def check_ops(make_engine, ops, slot_sizes, weights, batch=2, t=(3.0, 811.0)) -> float:
    """Relative L2 error of an engine's forward on this op list against the NumPy interpreter.

    make_engine(ints, floats, slot_sizes_array, weights_list, batch, in_c, out_c) -> an engine whose
    .forward(x, t) takes x float32 [batch, slot_sizes[0], 1, 1] and t float32 [batch]."""
    rng = np.random.default_rng(len(ops))
    args, plan, wd = plan_arrays(ops, slot_sizes, weights, batch)
    eng = make_engine(*args, batch, slot_sizes[0], slot_sizes[1])
    x = rng.standard_normal((batch, slot_sizes[0], 1, 1)).astype(np.float32)
    tt = np.array(t[:batch], dtype=np.float32)
    out = np.asarray(eng.forward(x, tt)).reshape(batch, -1)
    ref = run_plan(plan, wd, x.reshape(batch, -1), tt).reshape(batch, -1)
    return rel_err(out, ref)


def time_emb_linear_cases():
    """The sinusoidal embedding (even dim with flip, odd dim with shift), then two linears (the
    second with SiLU on its input): two cases from one rng (seed 0)."""
    rng = np.random.default_rng(0)
    for dim, flip, shift in ((32, True, 0.0), (33, False, 1.0)):
        ops = [Op("TIME_EMB", out=2, c_out=dim, flip=flip, shift=shift),
               Op("LINEAR", out=3, in_=2, c_in=dim, c_out=40, w_idx=0, b_idx=1),
               Op("LINEAR", out=1, in_=3, c_in=40, c_out=24, w_idx=2, b_idx=3, act="silu")]
        w = [rand_w(rng, 40, dim), rand_w(rng, 40), rand_w(rng, 24, 40), rand_w(rng, 24)]
        yield Case(ops, [1, 24, dim, 40], w)


def conv_mode_case(mode):
    """A conv in `mode` (a CONV_MODES key) with bias + time-embedding add, on sizes that are not
    tile multiples (7 output channels, 10x6 images, 5 input channels); CONV3 and UP read a padded
    (PAD with scale and shift) copy of the input, the others read slot 0."""
    rng = np.random.default_rng(1)
    c, h, w, co = 5, 10, 6, 7
    k = 1 if mode == "CONV1" else 3
    ho, wo = {"CONV3": (h, w), "CONV1": (h, w), "DOWN1": (h // 2, w // 2), "DOWN0": (h // 2, w // 2),
              "UP": (2 * h, 2 * w)}[mode]
    padded_in = mode in ("CONV3", "UP")
    sizes = [c * h * w, co * ho * wo, c * (h + 2) * (w + 2), 9, co, c * 9 * ho * wo]
    ops = [Op("TIME_EMB", out=3, c_out=9),
           Op("LINEAR", out=4, in_=3, c_in=9, c_out=co, w_idx=2, b_idx=3, act="silu")]
    src = 0
    if padded_in:
        ops.append(Op("PAD", out=2, in_=0, c_in=c, h=h, w=w, a=1.5, shift=-0.25))
        src = 2
    ops.append(Op("CONV", out=1, in_=src, c_in=c, h=h, w=w, c_out=co, mode=CONV_MODES[mode],
                  w_idx=0, b_idx=1, temb=4, scratch=5 if mode.startswith("DOWN") else -1))
    weights = [rand_w(rng, co, c, k, k), rand_w(rng, co), rand_w(rng, co, 9), rand_w(rng, co)]
    return Case(ops, sizes, weights)


def groupnorm_concat_shortcut_residual_cases():
    """Two cases from one rng (seed 2): group norm (+SiLU, padded, two concatenated sources whose
    groups straddle the seam), then conv + 1x1 shortcut + scale, then a plain group norm (batch 3);
    and a conv with a residual add + scale."""
    rng = np.random.default_rng(2)
    c1, c2, h, w, co, g = 6, 3, 8, 5, 4, 3
    plane, pp = h * w, (h + 2) * (w + 2)
    sizes = [(c1 + c2) * plane, co * plane, (c1 + c2) * pp, (c1 + c2) * pp, c2 * plane, co * plane]
    ops = [
        # split the input in two tensors so that the norm reads a concat
        Op("CONV", out=4, in_=0, c_in=c1 + c2, h=h, w=w, c_out=c2, mode=CONV_MODES["CONV1"], w_idx=6, b_idx=7),
        Op("GROUPNORM", out=2, in_=0, c_in=c1, in2=4, c_in2=c2, h=h, w=w, groups=g, act="silu",
           padded_out=True, eps=1e-5, w_idx=0, b_idx=1),
        Op("PAD", out=3, in_=0, c_in=c1, in2=4, c_in2=c2, h=h, w=w),
        Op("CONV", out=5, in_=2, c_in=c1 + c2, h=h, w=w, c_out=co, mode=CONV_MODES["CONV3"], w_idx=2,
           b_idx=3, in2=3, c_in2=c1 + c2, w2_idx=4, b2_idx=5, scale=0.7),
        Op("GROUPNORM", out=1, in_=5, c_in=co, h=h, w=w, groups=2, eps=1e-6, w_idx=8, b_idx=9),
    ]
    ct = c1 + c2
    weights = [1 + 0.2 * rand_w(rng, ct, scale=1), 0.3 * rand_w(rng, ct, scale=1), rand_w(rng, co, ct, 3, 3),
               rand_w(rng, co), rand_w(rng, co, ct, 1, 1), rand_w(rng, co), rand_w(rng, c2, ct, 1, 1),
               rand_w(rng, c2) + 3.0, 1 + 0.2 * rand_w(rng, co, scale=1), rand_w(rng, co)]
    yield Case(ops, sizes, weights, 3, (1.0, 2.0, 3.0))
    # residual add: conv(x) + x
    c, sizes = 4, [4 * plane, 4 * plane, 4 * pp]
    ops = [Op("PAD", out=2, in_=0, c_in=c, h=h, w=w),
           Op("CONV", out=1, in_=2, c_in=c, h=h, w=w, c_out=c, mode=CONV_MODES["CONV3"], w_idx=0,
              b_idx=1, residual=0, scale=0.5)]
    yield Case(ops, sizes, [rand_w(rng, c, c, 3, 3), rand_w(rng, c)])


ATTENTION_SHAPES = [(1, 8, 4, 5), (3, 12, 6, 6), (4, 16, 16, 16)]  # (heads, c, h, w)


def attention_case(heads, c, h, w):
    """Group norm, then self-attention over the h*w pixels with `heads` heads, the residual (the
    input) added and scaled by 1/1.3; q/k/v/out weights scaled 1.5/sqrt(c) so the softmax is not
    flat."""
    rng = np.random.default_rng(heads)
    L = h * w
    sizes = [c * L, c * L, c * L, 4 * c * L + heads * L * L]
    ops = [Op("GROUPNORM", out=2, in_=0, c_in=c, h=h, w=w, groups=2, eps=1e-5, w_idx=0, b_idx=1),
           Op("ATTENTION", out=1, in_=2, c_in=c, h=h, w=w, c_out=c, heads=heads, residual=0,
              scratch=3, w_idx=2, scale=1 / 1.3)]
    weights = [np.ones(c, np.float32), np.zeros(c, np.float32)]
    for _ in range(4):
        weights += [rand_w(rng, c, c, scale=1.5 / np.sqrt(c)), rand_w(rng, c)]
    return Case(ops, sizes, weights)
