"""A plain NumPy interpreter of a fastddpm plan (float64): the executable meaning of plan.py's
op list, used by the tests to check the plan independently of any compiled engine."""
from __future__ import annotations

import math

import numpy as np

from fastddpm.plan import CLASS_SLOT, CONV_MODES, RESAMPLE_MODES, TIME_MODES, Plan

_MODES = {v: k for k, v in CONV_MODES.items()}


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _act(name, x):
    """plan.ACT_FLAGS' activations in float64 (gelu: the exact erf form)."""
    if name == "silu":
        return _silu(x)
    if name == "mish":
        return x * np.tanh(np.logaddexp(0.0, x))
    if name == "gelu":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if name == "relu":
        return np.maximum(x, 0.0)
    assert name == "", name
    return x


def _pool2(v):
    """2x2 average pooling of [N, C, h, w] (h, w even)."""
    n, c, h, w = v.shape
    return v.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def _fir_axis(v, axis, up):
    """score-SDE's [1, 3, 3, 1] FIR resampling along one axis of v (zero outside), from its
    definition: down y[i] = (x[2i-1] + 3 x[2i] + 3 x[2i+1] + x[2i+2]) / 8; up
    y[2i] = (x[i-1] + 3 x[i]) / 4, y[2i+1] = (3 x[i] + x[i+1]) / 4."""
    v = np.moveaxis(v, axis, -1)
    p = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(1, 2) if not up else (1, 1)])   # p[k] = x[k - 1]
    n = v.shape[-1]
    if up:
        out = np.empty(v.shape[:-1] + (2 * n,))
        out[..., 0::2] = (p[..., 0:n] + 3 * p[..., 1:n + 1]) / 4
        out[..., 1::2] = (3 * p[..., 1:n + 1] + p[..., 2:n + 2]) / 4
    else:
        out = (p[..., 0:n:2] + 3 * p[..., 1:n + 1:2] + 3 * p[..., 2:n + 2:2] + p[..., 3:n + 3:2]) / 8
    return np.moveaxis(out, -1, axis)


def _resample(v, mode):
    """RESAMPLE's modes on [N, C, h, w]."""
    if mode == RESAMPLE_MODES["POOL"]:
        return _pool2(v)
    if mode == RESAMPLE_MODES["NEAREST"]:
        return v.repeat(2, axis=2).repeat(2, axis=3)
    up = mode == RESAMPLE_MODES["FIR_UP"]
    assert up or mode == RESAMPLE_MODES["FIR_DOWN"], mode
    return _fir_axis(_fir_axis(v, 2, up), 3, up)


def _conv2d(x, w, stride=1):
    """x: [N, C, Hp, Wp] already padded; w: [O, C, k, k] -> valid conv with stride."""
    n, c, hp, wp = x.shape
    o, _, k, _ = w.shape
    ho, wo = (hp - k) // stride + 1, (wp - k) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for dy in range(k):
        for dx in range(k):
            patch = x[:, :, dy:dy + stride * ho:stride, dx:dx + stride * wo:stride]  # [N, C, ho, wo]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx])
    return out


def run_plan(plan: Plan, weights: dict, x: np.ndarray, t, class_emb=None) -> np.ndarray:
    """class_emb: [N, D] the class-embedding rows of a class-conditional plan (slot CLASS_SLOT)."""
    W = [np.asarray(weights[n], dtype=np.float64) for n in plan.weight_names]
    N = plan.batch
    slots: dict[int, np.ndarray] = {0: np.asarray(x, dtype=np.float64)}
    if class_emb is not None:
        slots[CLASS_SLOT] = np.asarray(class_emb, dtype=np.float64).reshape(N, -1)
    tt = np.broadcast_to(np.asarray(t, dtype=np.float64).reshape(-1), (N,))

    def get(slot, *shape):
        """The leading tensor of a slot (a slot may hold more than the op reads)."""
        return slots[slot][:, :int(np.prod(shape))].reshape(N, *shape)

    def cat(op):
        a = get(op.in_, op.c_in, op.h, op.w)
        if op.in2 >= 0:
            a = np.concatenate([a, get(op.in2, op.c_in2, op.h, op.w)], axis=1)
        return a

    for op in plan.ops:
        if op.kind == "TIME_EMB" and op.mode == TIME_MODES["LEARNED"]:
            res = W[op.w_idx][tt.astype(np.int64)]
        elif op.kind == "TIME_EMB" and op.mode == TIME_MODES["FOURIER"]:
            arg = np.log(tt)[:, None] * W[op.w_idx][None, :] * 2 * np.pi
            res = np.concatenate([np.sin(arg), np.cos(arg)], 1)
        elif op.kind == "DIVIDE_BY_T":
            res = get(op.in_, op.c_in, op.h, op.w) / tt[:, None, None, None]
        elif op.kind == "TIME_EMB":
            half = op.c_out // 2
            f = np.exp(-math.log(10000) * np.arange(half) / (half - op.shift))
            arg = tt[:, None] * f[None]
            e = np.concatenate([np.cos(arg), np.sin(arg)] if op.flip else [np.sin(arg), np.cos(arg)], 1)
            if op.c_out % 2:
                e = np.pad(e, ((0, 0), (0, 1)))
            res = e
        elif op.kind == "LINEAR":
            v = get(op.in_, op.c_in)
            res = _act(op.act, v) @ W[op.w_idx].T + W[op.b_idx]
            if op.residual >= 0:  # the class embedding
                res = res + get(op.residual, op.c_out)
        elif op.kind == "PAD":
            res = np.pad(op.a * cat(op) + op.shift, ((0, 0), (0, 0), (1, 1), (1, 1)))
        elif op.kind == "GROUPNORM":
            v = cat(op)
            n, c, h, w = v.shape
            g = v.reshape(n, op.groups, -1)
            g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + op.eps)
            v = g.reshape(n, c, h, w) * W[op.w_idx][None, :, None, None] + W[op.b_idx][None, :, None, None]
            if op.temb >= 0:  # scale_shift rows [N, 2C]
                ss = get(op.temb, 2 * c)
                v = v * (1 + ss[:, :c, None, None]) + ss[:, c:, None, None]
            v = _act(op.act, v)
            if op.mode == RESAMPLE_MODES["POOL"]:
                v = _pool2(v)
            res = np.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1))) if op.padded_out else v
        elif op.kind == "RESAMPLE":
            v = get(op.in_, op.c_in, op.h, op.w)
            v = _resample(v, op.mode)
            res = np.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1))) if op.padded_out else v
        elif op.kind == "CONV":
            mode = _MODES[op.mode]
            wt, h, w = W[op.w_idx], op.h, op.w
            if mode == "CONV3":
                res = _conv2d(get(op.in_, op.c_in, h + 2, w + 2), wt)
            elif mode == "CONV1":
                res = _conv2d(get(op.in_, op.c_in, h, w), wt)
            elif mode in ("DOWN0", "DOWN1"):
                v = get(op.in_, op.c_in, h, w)
                pad = ((0, 1), (0, 1)) if mode == "DOWN0" else ((1, 1), (1, 1))
                res = _conv2d(np.pad(v, ((0, 0), (0, 0)) + pad), wt, stride=2)
            else:  # UP: the padded low-res input -> interior, nearest x2, pad, conv
                v = get(op.in_, op.c_in, h + 2, w + 2)[:, :, 1:-1, 1:-1]
                v = v.repeat(2, axis=2).repeat(2, axis=3)
                res = _conv2d(np.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1))), wt)
            res = res + W[op.b_idx][None, :, None, None]
            if op.temb >= 0:
                res = res + get(op.temb, op.c_out)[:, :, None, None]
            if op.in2 >= 0:
                s = get(op.in2, op.c_in2, h + 2, w + 2)[:, :, 1:-1, 1:-1]
                res = res + np.einsum("nchw,oc->nohw", s, W[op.w2_idx][:, :, 0, 0]) \
                    + W[op.b2_idx][None, :, None, None]
            if op.residual >= 0:
                res = res + get(op.residual, *res.shape[1:])
            res = res * op.scale
        elif op.kind == "ATTENTION":
            c, L, heads = op.c_in, op.h * op.w, op.heads
            d = c // heads
            hn = get(op.in_, c, L).transpose(0, 2, 1)          # [N, L, C]
            wq, bq, wk, bk, wv, bv, wo, bo = W[op.w_idx:op.w_idx + 8]
            split = lambda a: a.reshape(N, L, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
            q, k, v = split(hn @ wq.T + bq), split(hn @ wk.T + bk), split(hn @ wv.T + bv)
            s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o = (p @ v).transpose(0, 2, 1, 3).reshape(N, L, c) @ wo.T + bo
            res = (o.transpose(0, 2, 1).reshape(N, c, op.h, op.w)
                   + get(op.residual, c, op.h, op.w)) * op.scale
        else:
            raise AssertionError(op.kind)
        slots[op.out] = np.asarray(res).reshape(N, -1)
        if op.scratch >= 0:
            slots[op.scratch] = None   # the scratch slot's old value is gone
    return slots[1].reshape(plan.output_shape)
