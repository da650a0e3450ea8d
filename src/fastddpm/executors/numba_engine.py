"""The numba U-Net engine: fastddpm.plan executed by numba kernels, and the whole sampling loop.

Used by the numba backend (``NumbaBackend.make_engine``) where the compiled core is missing. No
torch anywhere: NumPy, numba and the plan.

Layout
------
All activations live in one float32 *arena*: slot s of the plan is ``arena[soff[s] : soff[s] +
N * slot_sizes[s]]``, sample n at ``soff[s] + n * slot_sizes[s]`` (NCHW per sample, padded tensors
[C, H+2, W+2] as plan.py defines). A class-conditional plan's slot 2 (CLASS_SLOT) holds the class
embedding [N, D], written once per call; the LINEAR op of time_embedding.linear_2 adds it. All weights are packed once, at engine creation, into one flat
float32 array in the form each op's kernel wants (``_pack``):

- CONV3:  [c_out, 9 c_in + c_in2]: the 3x3 taps, then the 1x1 shortcut's columns (the shortcut is
          extra rows of the same im2col GEMM); bias = conv bias + shortcut bias.
- DOWN0/1, CONV1: [c_out, 9 c_in] / [c_out, c_in].
- UP:     4 phase matrices [c_out, 4 c_in]: nearest x2 + 3x3 conv = for each output phase (py, px)
          a 2x2 conv on the low-res input whose taps are sums of the 3x3 taps (4/9 of the work).
- ATTENTION: to_q/to_k/to_v stacked [3C, C] + [3C] bias, to_out [C, C] + [C].

A forward is one call of the jitted interpreter ``_forward`` over the plan's int/float rows. Each
conv is im2col (parallel over input channels) + one ``np.dot`` per sample (numba hands it to the
BLAS sgemm that SciPy ships; multithreaded there) + an epilogue pass (bias, time embedding,
residual, scale; parallel over output channels). Samples run one after another with the same
shapes, so a sample's result never depends on the batch size it ran in (batch invariance).

The sampling loop (``NumbaEngine.run``) is a Python loop over the timesteps calling two jitted
functions per step (the forward, then the numba backend's fused step + Philox noise in place):
that costs a few microseconds per step against milliseconds of U-Net, and lets the progress
callback run between steps. A guided run (classifier-free guidance) writes its n samples twice into
the 2n-row input and steps them with the fused step's guide (loop.py).
"""
from __future__ import annotations

import math
import os
import threading
import time

import numpy as np

from ..plan import (CLASS_SLOT, CONV_MODES, FLAG_FLIP, FLAG_GELU, FLAG_MISH, FLAG_PADDED_OUT, FLAG_RELU, FLAG_SILU,
                    FLOAT_FIELDS, INT_FIELDS, OP_CODES, RESAMPLE_MODES, TIME_MODES, PlanError)
from ..loop import fused_steps, run_loop, schedule_loop
from ..philox import INITIAL_STEP
from .. import threads as _budget
from .base import Engine, EngineLock
from .numba_threads import parallel_region

try:
    import numba
    from numba import prange
    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - numba missing or refusing this NumPy
    numba = None
    _IMPORT_ERROR = f"numba is not importable ({type(exc).__name__}: {exc})"

# Columns of Plan.arrays()["ints"] (plan.INT_FIELDS) and ["floats"] (plan.FLOAT_FIELDS).
(I_CODE, I_OUT, I_IN, I_CIN, I_IN2, I_CIN2, I_H, I_W, I_COUT, I_WI, I_BI, I_W2, I_B2, I_TEMB, I_RES,
 I_SCR, I_MODE, I_GROUPS, I_HEADS, I_FLAGS) = (INT_FIELDS.index(f) for f in (
    "code", "out", "in_", "c_in", "in2", "c_in2", "h", "w", "c_out", "w_idx", "b_idx", "w2_idx", "b2_idx",
    "temb", "residual", "scratch", "mode", "groups", "heads", "flags"))
F_EPS, F_SCALE, F_A, F_SHIFT = (FLOAT_FIELDS.index(f) for f in ("eps", "scale", "a", "shift"))
OP_TIME_EMB, OP_LINEAR, OP_PAD, OP_GROUPNORM, OP_CONV, OP_ATTENTION, OP_RESAMPLE, OP_DIVIDE_BY_T = (
    OP_CODES[k] for k in ("TIME_EMB", "LINEAR", "PAD", "GROUPNORM", "CONV", "ATTENTION", "RESAMPLE", "DIVIDE_BY_T"))
R_POOL, R_FIR_DOWN, R_FIR_UP = RESAMPLE_MODES["POOL"], RESAMPLE_MODES["FIR_DOWN"], RESAMPLE_MODES["FIR_UP"]
T_LEARNED, T_FOURIER = TIME_MODES["LEARNED"], TIME_MODES["FOURIER"]
M_CONV3, M_CONV1, M_DOWN1, M_DOWN0, M_UP = (CONV_MODES[k] for k in ("CONV3", "CONV1", "DOWN1", "DOWN0", "UP"))
_ALIGN = 16   # floats: every slot and packed weight starts on a 64-byte boundary

# UP phase taps: output row 2i + p reads padded low-res rows i + p + a (a = 0, 1), and the 3x3 tap
# rows folded into each: p=0: a=0 <- {0}, a=1 <- {1, 2}; p=1: a=0 <- {0, 1}, a=1 <- {2}.
_UP_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))

_COMPILE = {"seconds": None, "from_cache": None}   # the first forward of the process
_COMPILE_LOCK = threading.Lock()


def _jit(fn, **opts):
    # numba refuses cache=True where it finds no writable cache directory (a read-only install):
    # compile on every run there rather than fail to import (numba_cpu.py sets a temp dir first).
    try:
        return numba.njit(cache=True, fastmath=False, **opts)(fn)
    except RuntimeError:
        return numba.njit(cache=False, fastmath=False, **opts)(fn)


def _njit_parallel(fn):
    return _jit(fn, parallel=True)


def _njit(fn):
    return _jit(fn)


if numba is not None:
    _F0, _F1 = np.float32(0.0), np.float32(1.0)

    from .numba_cpu import _f32_from_bits   # an int32's bits as a float32 (numba intrinsic)

    # exp as a polynomial (Cephes expf, about 1 ulp) rather than a libm call: LLVM vectorises it,
    # and exp is most of the cost of group norm + SiLU and of softmax.
    _E_HI, _E_LO = np.float32(88.3762626647949), np.float32(-87.3365447505531)
    _LOG2E, _HALF = np.float32(1.44269504088896341), np.float32(0.5)
    _C1, _C2 = np.float32(0.693359375), np.float32(-2.12194440e-4)
    _P0, _P1, _P2, _P3, _P4, _P5 = (np.float32(c) for c in (
        1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))

    @numba.njit(inline="always", fastmath=False)
    def _expf(x):
        x = _E_HI if x > _E_HI else x
        x = _E_LO if x < _E_LO else x
        fx = np.floor(x * _LOG2E + _HALF)              # x = n ln2 + r, |r| <= ln2 / 2
        r = x - fx * _C1 - fx * _C2
        z = r * r
        p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
        p = p * z + r + _F1
        return p * _f32_from_bits(np.int32((np.int32(fx) + 127) << 23))   # * 2^n

    @numba.njit(inline="always", fastmath=False)
    def _silu(v):
        return v / (_F1 + _expf(-v))

    @numba.njit(inline="always", fastmath=False)
    def _act_code(flags):
        # the plan's activation flags -> 0 none, 1 SiLU, 2 Mish, 3 GELU, 4 ReLU (plan.h Act)
        if flags & FLAG_SILU:
            return 1
        if flags & FLAG_MISH:
            return 2
        if flags & FLAG_GELU:
            return 3
        if flags & FLAG_RELU:
            return 4
        return 0

    @numba.njit(inline="always", fastmath=False)
    def _act(v, act):
        # v: float32; Mish and GELU (erf form) in float64, as the C++ engine
        if act == 1:
            return _silu(v)
        if act == 2:
            x = np.float64(v)
            return v if x > 20.0 else np.float32(x * math.tanh(math.log1p(math.exp(x))))
        if act == 3:
            x = np.float64(v)
            return np.float32(0.5 * x * (1.0 + math.erf(x * 0.70710678118654752440)))
        if act == 4:
            return v if v > _F0 else _F0
        return v

    # ---------------------------------------------------------------- im2col (per sample)
    @_njit_parallel
    def _im2col3(src, c, h, w, col, r0):
        # src: padded [c, h+2, w+2]; col rows r0 + ci*9 + ky*3 + kx: [.., h*w]
        for ci in prange(c):
            for ky in range(3):
                for kx in range(3):
                    r = r0 + ci * 9 + ky * 3 + kx
                    for i in range(h):
                        for j in range(w):
                            col[r, i * w + j] = src[ci, i + ky, j + kx]

    @_njit_parallel
    def _interior_rows(src, c, h, w, col, r0):
        # src: padded [c, h+2, w+2] -> col rows r0 + ci: its interior [.., h*w] (1x1 shortcut)
        for ci in prange(c):
            for i in range(h):
                for j in range(w):
                    col[r0 + ci, i * w + j] = src[ci, i + 1, j + 1]

    @_njit_parallel
    def _im2col_down(src, c, h, w, col, pad_before):
        # src: unpadded [c, h, w]; 3x3 stride 2. pad_before=1: pad 1 all round (DOWN1);
        # pad_before=0: pad right/bottom only (DOWN0). col: [c*9, (h/2)*(w/2)]
        ho, wo = h // 2, w // 2
        for ci in prange(c):
            for ky in range(3):
                for kx in range(3):
                    r = ci * 9 + ky * 3 + kx
                    for i in range(ho):
                        y = 2 * i + ky - pad_before
                        for j in range(wo):
                            x = 2 * j + kx - pad_before
                            v = _F0
                            if y >= 0 and y < h and x >= 0 and x < w:
                                v = src[ci, y, x]
                            col[r, i * wo + j] = v

    @_njit_parallel
    def _im2col_up(src, c, h, w, py, px, col):
        # src: padded low-res [c, h+2, w+2]; phase (py, px): col rows ci*4 + a*2 + b = rows
        # i + py + a, columns j + px + b of src: [c*4, h*w]
        for ci in prange(c):
            for a in range(2):
                for b in range(2):
                    r = ci * 4 + a * 2 + b
                    for i in range(h):
                        for j in range(w):
                            col[r, i * w + j] = src[ci, i + py + a, j + px + b]

    @_njit_parallel
    def _scatter_phase(tmp, o, h, w, py, px, dst):
        # tmp: [o, h*w] of phase (py, px) -> dst [o, 2h, 2w] at (2i + py, 2j + px)
        for co in prange(o):
            for i in range(h):
                for j in range(w):
                    dst[co, 2 * i + py, 2 * j + px] = tmp[co, i * w + j]

    @_njit_parallel
    def _epilogue(out, bias, temb, has_temb, res, has_res, scale):
        # out: [o, M] in place: scale * (out + bias[o] + temb[o] + res[o, m])
        o, m = out.shape
        for co in prange(o):
            add = bias[co]
            if has_temb:
                add += temb[co]
            for k in range(m):
                v = out[co, k] + add
                if has_res:
                    v += res[co, k]
                out[co, k] = v * scale

    # ---------------------------------------------------------------- group norm, pad
    @_njit_parallel
    def _groupnorm(src, c1, src2, c2, h, w, groups, eps, gamma, beta, ss, has_ss, act, padded, pool, dst):
        # src: [c1, h*w], src2: [c2, h*w] (concatenated channels); dst: [c1+c2, h*w] or padded
        # [c1+c2, (h+2)*(w+2)]. Statistics per group in float64, two passes (biased variance).
        # has_ss: ss [2 (c1+c2)] = [scale, shift] rows folded into the affine (scale_shift).
        # pool (padded only): dst [c1+c2, (h/2+2)*(w/2+2)] holds the 2x2 average pooling.
        ctot = c1 + c2
        cg = ctot // groups
        hw = h * w
        wp = w + 2
        for g in prange(groups):
            s = 0.0
            for cc in range(g * cg, (g + 1) * cg):
                row = src[cc] if cc < c1 else src2[cc - c1]
                for k in range(hw):
                    s += row[k]
            mean = s / (cg * hw)
            q = 0.0
            for cc in range(g * cg, (g + 1) * cg):
                row = src[cc] if cc < c1 else src2[cc - c1]
                for k in range(hw):
                    d = row[k] - mean
                    q += d * d
            rstd = 1.0 / math.sqrt(q / (cg * hw) + eps)
            for cc in range(g * cg, (g + 1) * cg):
                row = src[cc] if cc < c1 else src2[cc - c1]
                out = dst[cc]
                # y = x * a + b with a = gamma * rstd, b = beta - mean * a
                a = np.float32(gamma[cc] * rstd)
                b = np.float32(beta[cc] - mean * gamma[cc] * rstd)
                if has_ss:
                    s1 = _F1 + ss[cc]
                    a = a * s1
                    b = b * s1 + ss[ctot + cc]
                if pool:
                    out[:] = _F0
                    ho, wo, wq = h // 2, w // 2, w // 2 + 2
                    for i in range(ho):
                        for j in range(wo):
                            r0 = 2 * i * w + 2 * j
                            out[(i + 1) * wq + j + 1] = np.float32(0.25) * (
                                ((_act(row[r0] * a + b, act) + _act(row[r0 + 1] * a + b, act))
                                 + _act(row[r0 + w] * a + b, act)) + _act(row[r0 + w + 1] * a + b, act))
                elif padded:
                    out[:] = _F0                     # zero border (the slot holds old data)
                    for i in range(h):
                        o0 = (i + 1) * wp + 1
                        if act == 1:
                            for j in range(w):
                                out[o0 + j] = _silu(row[i * w + j] * a + b)
                        else:
                            for j in range(w):
                                out[o0 + j] = _act(row[i * w + j] * a + b, act)
                elif act == 1:
                    for k in range(hw):
                        out[k] = _silu(row[k] * a + b)
                else:
                    for k in range(hw):
                        out[k] = _act(row[k] * a + b, act)

    @_njit
    def _fir_taps(up, o, n, idx, wgt):
        # the taps of output o along an axis of n inputs (plan.h fir_taps): fills idx, wgt, returns the count
        cnt = 0
        for a in range(2 if up else 4):
            if up:
                i = o // 2 - 1 + a + (o % 2)
                wt = (np.float32(0.25) if a == 0 else np.float32(0.75)) if o % 2 == 0 else \
                    (np.float32(0.75) if a == 0 else np.float32(0.25))
            else:
                i = 2 * o - 1 + a
                wt = np.float32(0.125) if a == 0 or a == 3 else np.float32(0.375)
            if 0 <= i < n:
                idx[cnt] = i
                wgt[cnt] = wt
                cnt += 1
        return cnt

    @_njit_parallel
    def _fir(src, c, h, w, up, padded, dst):
        # dst [c, Ho*Wo] (or padded) = score-SDE's FIR down / up of src [c, h*w]: rows along x, then y
        ho, wo = (2 * h, 2 * w) if up else (h // 2, w // 2)
        p = 1 if padded else 0
        wq = wo + 2 * p
        xi = np.zeros((wo, 4), np.int64)
        xw = np.zeros((wo, 4), np.float32)
        xc = np.zeros(wo, np.int64)
        for x in range(wo):
            xc[x] = _fir_taps(up, x, w, xi[x], xw[x])
        yi = np.zeros((ho, 4), np.int64)
        yw = np.zeros((ho, 4), np.float32)
        yc = np.zeros(ho, np.int64)
        for y in range(ho):
            yc[y] = _fir_taps(up, y, h, yi[y], yw[y])
        for cc in prange(c):
            rows = np.empty((h, wo), np.float32)
            for y in range(h):
                for x in range(wo):
                    s = _F0
                    for j in range(xc[x]):
                        s += xw[x, j] * src[cc, y * w + xi[x, j]]
                    rows[y, x] = s
            if padded:
                for k in range((ho + 2) * wq):
                    dst[cc, k] = _F0
            for y in range(ho):
                for x in range(wo):
                    s = _F0
                    for a in range(yc[y]):
                        s += yw[y, a] * rows[yi[y, a], x]
                    dst[cc, (y + p) * wq + x + p] = s

    @_njit_parallel
    def _resample(src, c, h, w, pool, padded, dst):
        # dst [c, Ho*Wo] (or padded) = 2x2 average pooling (pool) or nearest x2 of src [c, h*w]
        ho, wo = (h // 2, w // 2) if pool else (2 * h, 2 * w)
        p = 1 if padded else 0
        wq = wo + 2 * p
        for cc in prange(c):
            if padded:
                for k in range((ho + 2) * wq):
                    dst[cc, k] = _F0
            for i in range(ho):
                for j in range(wo):
                    if pool:
                        r0 = 2 * i * w + 2 * j
                        v = np.float32(0.25) * (((src[cc, r0] + src[cc, r0 + 1]) + src[cc, r0 + w]) + src[cc, r0 + w + 1])
                    else:
                        v = src[cc, (i // 2) * w + j // 2]
                    dst[cc, (i + p) * wq + j + p] = v

    @_njit_parallel
    def _pad(src, c1, src2, c2, h, w, a, b, dst):
        # dst: padded [c1+c2, (h+2)*(w+2)] = a * concat(src, src2) + b inside, 0 on the border
        wp = w + 2
        for cc in prange(c1 + c2):
            for k in range((h + 2) * wp):
                dst[cc, k] = _F0
            for i in range(h):
                for j in range(w):
                    v = src[cc, i * w + j] if cc < c1 else src2[cc - c1, i * w + j]
                    dst[cc, (i + 1) * wp + j + 1] = a * v + b

    # ---------------------------------------------------------------- attention
    @_njit_parallel
    def _add_rows(a, bias):
        # a: [r, L] += bias[r]
        r, L = a.shape
        for i in prange(r):
            for k in range(L):
                a[i, k] += bias[i]

    @_njit_parallel
    def _softmax_rows(s, scale):
        # s: [L, L] scores -> softmax(scale * s) per row, in place
        L = s.shape[0]
        for i in prange(L):
            mx = s[i, 0] * scale
            for k in range(L):
                v = s[i, k] * scale
                s[i, k] = v
                mx = v if v > mx else mx
            tot = np.float32(0.0)
            for k in range(L):
                e = _expf(s[i, k] - mx)
                s[i, k] = e
                tot += e
            inv = _F1 / tot
            for k in range(L):
                s[i, k] *= inv

    # ---------------------------------------------------------------- the interpreter
    @_njit
    def _sample_view(arena, soff, ssize, slot, n, rows, cols):
        base = soff[slot] + n * ssize[slot]
        return arena[base:base + rows * cols].reshape(rows, cols)

    @_njit
    def _forward(ints, floats, woff, wflat, arena, soff, ssize, work, t, nb):
        # One U-Net forward of nb samples: slot 0 (input) -> slot 1 (model output). t: [nb] float32.
        for k in range(ints.shape[0]):
            op = ints[k]
            code = op[I_CODE]
            cin, cin2, h, w, cout = op[I_CIN], op[I_CIN2], op[I_H], op[I_W], op[I_COUT]
            flags = op[I_FLAGS]
            if code == OP_TIME_EMB and op[I_MODE] == T_LEARNED:
                rows = woff[k, 1]
                for n in range(nb):
                    tv = t[n]
                    if not (tv >= 0 and tv < rows and tv == np.floor(tv)):
                        raise ValueError("a learned time embedding takes integer timesteps in [0, rows)")
                    dst = _sample_view(arena, soff, ssize, op[I_OUT], n, 1, cout)
                    r0 = woff[k, 0] + np.int64(tv) * cout
                    for j in range(cout):
                        dst[0, j] = wflat[r0 + j]
            elif code == OP_TIME_EMB and op[I_MODE] == T_FOURIER:
                half = cout // 2
                for n in range(nb):
                    if not t[n] > 0:
                        raise ValueError("a Fourier time embedding takes timesteps > 0")
                    dst = _sample_view(arena, soff, ssize, op[I_OUT], n, 1, cout)
                    lt = math.log(np.float64(t[n]))
                    for j in range(half):   # the argument in float64, as the C++ engine
                        arg = lt * np.float64(wflat[woff[k, 0] + j]) * 2.0 * math.pi
                        dst[0, j], dst[0, half + j] = np.float32(math.sin(arg)), np.float32(math.cos(arg))
            elif code == OP_DIVIDE_BY_T:
                for n in range(nb):
                    src = _sample_view(arena, soff, ssize, op[I_IN], n, 1, cin * h * w)
                    dst = _sample_view(arena, soff, ssize, op[I_OUT], n, 1, cin * h * w)
                    for i in range(cin * h * w):
                        dst[0, i] = src[0, i] / t[n]
            elif code == OP_TIME_EMB:
                half = cout // 2
                shift = np.float32(floats[k, F_SHIFT])
                for n in range(nb):
                    dst = _sample_view(arena, soff, ssize, op[I_OUT], n, 1, cout)
                    for j in range(half):
                        # float32 throughout, as the reference computes it
                        f = np.exp(np.float32(-math.log(10000.0)) * np.float32(j) / (np.float32(half) - shift))
                        arg = t[n] * f
                        sn, cs = np.sin(arg), np.cos(arg)
                        if flags & FLAG_FLIP:
                            dst[0, j], dst[0, half + j] = cs, sn
                        else:
                            dst[0, j], dst[0, half + j] = sn, cs
                    if cout % 2:
                        dst[0, cout - 1] = _F0
            elif code == OP_LINEAR:
                wo, bo = woff[k, 0], woff[k, 1]
                has_res = op[I_RES] >= 0
                for n in range(nb):
                    src = _sample_view(arena, soff, ssize, op[I_IN], n, 1, cin)
                    dst = _sample_view(arena, soff, ssize, op[I_OUT], n, 1, cout)
                    res = dst
                    if has_res:   # the class embedding (CLASS_SLOT), added after the rounding
                        res = _sample_view(arena, soff, ssize, op[I_RES], n, 1, cout)
                    for o in range(cout):
                        acc = 0.0
                        for i in range(cin):
                            v = _act(src[0, i], _act_code(flags))
                            acc += wflat[wo + o * cin + i] * v
                        y = np.float32(acc + wflat[bo + o])
                        if has_res:
                            y += res[0, o]
                        dst[0, o] = y
            elif code == OP_PAD:
                hw = h * w
                for n in range(nb):
                    src = _sample_view(arena, soff, ssize, op[I_IN], n, cin, hw)
                    src2 = src
                    if op[I_IN2] >= 0:
                        src2 = _sample_view(arena, soff, ssize, op[I_IN2], n, cin2, hw)
                    dst = _sample_view(arena, soff, ssize, op[I_OUT], n, cin + cin2, (h + 2) * (w + 2))
                    _pad(src, cin, src2, cin2, h, w, np.float32(floats[k, F_A]), np.float32(floats[k, F_SHIFT]), dst)
            elif code == OP_GROUPNORM:
                hw = h * w
                ctot = cin + cin2
                padded = (flags & FLAG_PADDED_OUT) != 0
                pool = op[I_MODE] == R_POOL
                dcols = (h // 2 + 2) * (w // 2 + 2) if pool else (h + 2) * (w + 2) if padded else hw
                gamma = wflat[woff[k, 0]:woff[k, 0] + ctot]
                beta = wflat[woff[k, 1]:woff[k, 1] + ctot]
                for n in range(nb):
                    src = _sample_view(arena, soff, ssize, op[I_IN], n, cin, hw)
                    src2 = src
                    if op[I_IN2] >= 0:
                        src2 = _sample_view(arena, soff, ssize, op[I_IN2], n, cin2, hw)
                    dst = _sample_view(arena, soff, ssize, op[I_OUT], n, ctot, dcols)
                    ss = gamma
                    if op[I_TEMB] >= 0:
                        ss = _sample_view(arena, soff, ssize, op[I_TEMB], n, 1, 2 * ctot)[0]
                    _groupnorm(src, cin, src2, cin2, h, w, op[I_GROUPS], floats[k, F_EPS], gamma, beta,
                               ss, op[I_TEMB] >= 0, _act_code(flags), padded, pool, dst)
            elif code == OP_RESAMPLE:
                mode = op[I_MODE]
                down = mode == R_POOL or mode == R_FIR_DOWN
                fir = mode == R_FIR_DOWN or mode == R_FIR_UP
                padded = (flags & FLAG_PADDED_OUT) != 0
                ho, wo_ = (h // 2, w // 2) if down else (2 * h, 2 * w)
                dcols = (ho + 2) * (wo_ + 2) if padded else ho * wo_
                for n in range(nb):
                    src = _sample_view(arena, soff, ssize, op[I_IN], n, cin, h * w)
                    dst = _sample_view(arena, soff, ssize, op[I_OUT], n, cin, dcols)
                    if fir:
                        _fir(src, cin, h, w, mode == R_FIR_UP, padded, dst)
                    else:
                        _resample(src, cin, h, w, down, padded, dst)
            elif code == OP_CONV:
                mode = op[I_MODE]
                if mode == M_UP:
                    ho, wo_ = 2 * h, 2 * w
                elif mode == M_DOWN0 or mode == M_DOWN1:
                    ho, wo_ = h // 2, w // 2
                else:
                    ho, wo_ = h, w
                m = ho * wo_
                hp, wp = h + 2, w + 2
                if mode == M_CONV3:
                    kk = 9 * cin + (cin2 if op[I_IN2] >= 0 else 0)
                elif mode == M_CONV1:
                    kk = cin
                elif mode == M_UP:
                    kk = 4 * cin
                else:
                    kk = 9 * cin
                wmat = wflat[woff[k, 0]:woff[k, 0] + (4 if mode == M_UP else 1) * cout * kk]
                bias = wflat[woff[k, 1]:woff[k, 1] + cout]
                scale = np.float32(floats[k, F_SCALE])
                for n in range(nb):
                    dst = _sample_view(arena, soff, ssize, op[I_OUT], n, cout, m)
                    if mode == M_UP:
                        src = _sample_view(arena, soff, ssize, op[I_IN], n, cin, hp * wp).reshape(cin, hp, wp)
                        col = work[:kk * h * w].reshape(kk, h * w)
                        tmp = work[kk * h * w:kk * h * w + cout * h * w].reshape(cout, h * w)
                        d3 = dst.reshape(cout, ho, wo_)
                        for ph in range(4):
                            py, px = ph // 2, ph % 2
                            _im2col_up(src, cin, h, w, py, px, col)
                            wp_ = wmat[ph * cout * kk:(ph + 1) * cout * kk].reshape(cout, kk)
                            np.dot(wp_, col, tmp)
                            _scatter_phase(tmp, cout, h, w, py, px, d3)
                    else:
                        col = work[:kk * m].reshape(kk, m)
                        if mode == M_CONV3:
                            src = _sample_view(arena, soff, ssize, op[I_IN], n, cin, hp * wp).reshape(cin, hp, wp)
                            _im2col3(src, cin, h, w, col, 0)
                            if op[I_IN2] >= 0:
                                s2 = _sample_view(arena, soff, ssize, op[I_IN2], n, cin2, hp * wp).reshape(cin2, hp, wp)
                                _interior_rows(s2, cin2, h, w, col, 9 * cin)
                        elif mode == M_CONV1:
                            col = _sample_view(arena, soff, ssize, op[I_IN], n, cin, m)
                        else:
                            src = _sample_view(arena, soff, ssize, op[I_IN], n, cin, h * w).reshape(cin, h, w)
                            _im2col_down(src, cin, h, w, col, 1 if mode == M_DOWN1 else 0)
                        np.dot(wmat.reshape(cout, kk), col, dst)
                    temb = bias
                    if op[I_TEMB] >= 0:
                        temb = _sample_view(arena, soff, ssize, op[I_TEMB], n, 1, cout)[0]
                    res = dst
                    if op[I_RES] >= 0:
                        res = _sample_view(arena, soff, ssize, op[I_RES], n, cout, m)
                    _epilogue(dst, bias, temb, op[I_TEMB] >= 0, res, op[I_RES] >= 0, scale)
            elif code == OP_ATTENTION:
                c = cin
                L = h * w
                heads = op[I_HEADS]
                d = c // heads
                wqkv = wflat[woff[k, 0]:woff[k, 0] + 3 * c * c].reshape(3 * c, c)
                bqkv = wflat[woff[k, 1]:woff[k, 1] + 3 * c]
                wout = wflat[woff[k, 2]:woff[k, 2] + c * c].reshape(c, c)
                bout = wflat[woff[k, 3]:woff[k, 3] + c]
                qkv = work[:3 * c * L].reshape(3 * c, L)                 # q, k, v: [3C, L]
                att = work[3 * c * L:4 * c * L].reshape(c, L)            # heads' outputs: [C, L]
                sc = work[4 * c * L:4 * c * L + L * L].reshape(L, L)     # one head's scores
                inv = np.float32(1.0 / math.sqrt(d))
                for n in range(nb):
                    hn = _sample_view(arena, soff, ssize, op[I_IN], n, c, L)
                    np.dot(wqkv, hn, qkv)
                    _add_rows(qkv, bqkv)
                    for hd in range(heads):
                        q = qkv[hd * d:(hd + 1) * d]                     # [d, L]
                        kt = qkv[c + hd * d:c + (hd + 1) * d]
                        v = qkv[2 * c + hd * d:2 * c + (hd + 1) * d]
                        np.dot(q.T, kt, sc)                             # [L, L] = q^T k
                        _softmax_rows(sc, inv)
                        np.dot(v, sc.T, att[hd * d:(hd + 1) * d])       # [d, L] = v p^T
                    dst = _sample_view(arena, soff, ssize, op[I_OUT], n, c, L)
                    np.dot(wout, att, dst)
                    res = _sample_view(arena, soff, ssize, op[I_RES], n, c, L)
                    _epilogue(dst, bout, bout, False, res, True, np.float32(floats[k, F_SCALE]))


def _pack(plan, weights) -> tuple[np.ndarray, np.ndarray]:
    """Weights in kernel form (module docstring): (flat float32, offsets int64 [n_ops, 4])."""
    chunks, pos = [], 0
    woff = np.full((len(plan.ops), 4), -1, dtype=np.int64)

    def add(a) -> int:
        nonlocal pos
        a = np.ascontiguousarray(a, dtype=np.float32).ravel()
        start = pos
        chunks.append(a)
        pos += a.size
        pad = -pos % _ALIGN
        if pad:
            chunks.append(np.zeros(pad, np.float32))
            pos += pad
        return start

    W = [np.asarray(weights[nm], dtype=np.float64) for nm in plan.weight_names]
    for k, op in enumerate(plan.ops):
        if op.kind == "LINEAR" or op.kind == "GROUPNORM":
            woff[k, 0], woff[k, 1] = add(W[op.w_idx]), add(W[op.b_idx])
        elif op.kind == "TIME_EMB" and op.w_idx >= 0:             # a learned table [rows, C0] / Fourier W [C0]
            woff[k, 0], woff[k, 1] = add(W[op.w_idx]), W[op.w_idx].shape[0]
        elif op.kind == "CONV":
            w, b = W[op.w_idx], W[op.b_idx]                       # w: [O, C, k, k]
            o = w.shape[0]
            if op.mode == M_UP:
                phases = []
                for py in range(2):
                    for px in range(2):
                        f = np.zeros((o, op.c_in, 2, 2))
                        for a in range(2):
                            for bb in range(2):
                                for ky in _UP_TAPS[py][a]:
                                    for kx in _UP_TAPS[px][bb]:
                                        f[:, :, a, bb] += w[:, :, ky, kx]
                        phases.append(f.reshape(o, -1))           # [O, 4C]
                woff[k, 0] = add(np.stack(phases))
            elif op.w2_idx >= 0:
                w2 = W[op.w2_idx].reshape(o, -1)                  # 1x1 shortcut [O, C2]
                woff[k, 0] = add(np.concatenate([w.reshape(o, -1), w2], axis=1))
                b = b + W[op.b2_idx]
            else:
                woff[k, 0] = add(w.reshape(o, -1))
            woff[k, 1] = add(b)
        elif op.kind == "ATTENTION":
            wq, bq, wk, bk, wv, bv, wo, bo = W[op.w_idx:op.w_idx + 8]
            woff[k, 0] = add(np.concatenate([wq, wk, wv]))        # [3C, C]
            woff[k, 1] = add(np.concatenate([bq, bk, bv]))
            woff[k, 2], woff[k, 3] = add(wo), add(bo)
    flat = np.concatenate(chunks) if chunks else np.zeros(_ALIGN, np.float32)
    return flat, woff


def _work_floats(plan) -> int:
    """Per-sample scratch the kernels need: im2col matrix (+ the UP phase product) or attention."""
    need = 1
    for op in plan.ops:
        if op.kind == "CONV":
            if op.in2 >= 0 and op.mode != M_CONV3:
                raise PlanError(f"{op.name}: the numba engine fuses a shortcut only into a 3x3 conv")
            if op.mode == M_UP:
                need = max(need, (4 * op.c_in + op.c_out) * op.h * op.w)
            elif op.mode == M_CONV3:
                need = max(need, (9 * op.c_in + (op.c_in2 if op.in2 >= 0 else 0)) * op.h * op.w)
            elif op.mode in (M_DOWN0, M_DOWN1):
                need = max(need, 9 * op.c_in * (op.h // 2) * (op.w // 2))
        elif op.kind == "ATTENTION":
            L = op.h * op.w
            need = max(need, 4 * op.c_in * L + L * L)
    return need


_BLAS: list = []   # [the controllers of SciPy's BLAS libraries (the sgemm numba calls)], once looked up
_BLAS_LOCK = threading.Lock()


def _scipy_blas():
    """threadpoolctl controllers of the BLAS that numba's np.dot calls (SciPy's, loaded through
    scipy.linalg.cython_blas); [] without threadpoolctl or SciPy."""
    with _BLAS_LOCK:
        if not _BLAS:
            try:
                import scipy
                import scipy.linalg.cython_blas  # noqa: F401 - load numba's BLAS before looking for it
                from threadpoolctl import ThreadpoolController
                root = os.path.dirname(os.path.dirname(scipy.__file__))   # site-packages: scipy/, scipy.libs/
                libs = [lc for lc in ThreadpoolController().lib_controllers
                        if lc.user_api == "blas" and os.path.basename(os.path.dirname(lc.filepath)).startswith("scipy")
                        and os.path.dirname(os.path.dirname(lc.filepath)) == root]
            except Exception:  # noqa: BLE001 - optional
                libs = []
            _BLAS.append(libs)
        return _BLAS[0]


def _pin_blas_threads() -> None:
    """SciPy's BLAS on one thread, for the whole process, before every engine call.

    OpenBLAS's sgemm rounds differently with different thread counts (measured on the Zen 1 with
    scipy-openblas 0.3.30: [64, 288] x [288, 256] differs by up to 4e-5 between 1 and 2 threads),
    so the engine's results need one fixed count. A per-call limit (threadpoolctl's limit(), the
    previous way) is process-wide state that overlapping calls from several Python threads undo
    for each other: one call's exit restored 2 threads while another call was still multiplying,
    and that call rounded differently from the serial one. One thread, because the parallelism is
    numba's: BLAS threads on top of numba's oversubscribed the cores (718 ms vs 39 ms per
    bench-small forward with 2 + 2 threads on 2 cores). Only SciPy's copy is touched, not NumPy's.
    """
    for lc in _scipy_blas():
        if lc.num_threads != 1:
            lc.set_num_threads(1)


class _Threads:
    """Draws this call's threads from the process-wide budget (threads.py) and sets numba's count
    (per calling thread) to them for the call, then puts the caller's back and returns them."""

    def __init__(self, engine):
        self.want = engine._threads()

    def __enter__(self):
        _pin_blas_threads()
        self.grant = _budget.grant(self.want)
        n = self.grant.__enter__()
        self.prev = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))

    def __exit__(self, *exc):
        numba.set_num_threads(self.prev)
        self.grant.__exit__(*exc)


class NumbaEngine(Engine):
    """The plan executed by numba kernels; the loop is loop.py's, with step_backend's fused step
    (the numba backend's kernels, Philox noise in place). A class-conditional plan's class
    embedding is copied into its slot (CLASS_SLOT) once per call; a guided run steps with the
    fused step's guidance (loop.py)."""

    history = 2
    supports_conditioning = True

    def __init__(self, config, weights, batch, height, width, options=None, *, step_backend):
        if numba is None:
            raise RuntimeError(_IMPORT_ERROR)
        super().__init__(config, weights, batch, height, width, options)
        self.dtype = step_backend.check_dtype(self.options.dtype)
        arrays = self.plan.arrays()
        self._ints = np.ascontiguousarray(arrays["ints"])
        self._floats = np.ascontiguousarray(arrays["floats"])
        self._wflat, self._woff = _pack(self.plan, self.weights)
        sizes = [int(s) for s in self.plan.slot_sizes]
        offs, pos = [], 0
        for s in sizes:
            offs.append(pos)
            pos += -(-(s * self.batch) // _ALIGN) * _ALIGN
        self._soff = np.array(offs, dtype=np.int64)
        self._ssize = np.array(sizes, dtype=np.int64)
        self._arena = np.zeros(pos + _ALIGN, dtype=np.float32)   # every activation: one buffer
        self._work = np.zeros(_work_floats(self.plan), dtype=np.float32)
        self._t = np.zeros(self.batch, dtype=np.float32)
        n_in = self.batch * sizes[0]
        self._x_view = self._arena[:n_in].reshape(self.plan.input_shape)           # slot 0
        o1 = offs[1]
        self._m_view = self._arena[o1:o1 + self.batch * sizes[1]].reshape(self.plan.output_shape)
        self._c_view = None                                                          # slot 2: [N, D]
        if self.conditional:
            o2 = offs[CLASS_SLOT]
            self._c_view = self._arena[o2:o2 + self.batch * sizes[CLASS_SLOT]].reshape(self.batch, -1)
        self._step_backend = step_backend
        self._lock = EngineLock("numba engine")

    # ------------------------------------------------------------------ forward
    def _threads(self) -> int:
        """Threads this engine's calls ask of the budget: the call's threads=, else the numba
        backend's count (FASTDDPM_NUM_THREADS / NumbaBackend.set_num_threads), else 1. Why 1 by
        default: the kernels run per op and per sample, ~300 short parallel regions per
        bench-small forward, and on 2 shared cores each fork-join can wait a whole scheduler
        timeslice for a descheduled worker (measured on a loaded machine: 45 ms with 1 thread,
        2.5 s with 2; torch eager alike). The count never changes a result (BLAS is pinned to one
        thread and numba's tasks are fixed)."""
        return _budget.requested() or getattr(self._step_backend, "_threads", None) or 1

    def _run_forward(self) -> None:
        """slot 0 and self._t -> slot 1 (the caller holds the lock and has set the threads)."""
        args = (self._ints, self._floats, self._woff, self._wflat, self._arena, self._soff,
                self._ssize, self._work, self._t, self.batch)
        if _COMPILE["seconds"] is not None:
            with parallel_region():
                _forward(*args)
            return
        with _COMPILE_LOCK, parallel_region():   # the first call compiles (or loads the disk cache): time it
            hits = sum(_forward.stats.cache_hits.values())
            t0 = time.perf_counter()
            _forward(*args)
            if _COMPILE["seconds"] is None:
                _COMPILE["seconds"] = time.perf_counter() - t0
                _COMPILE["from_cache"] = sum(_forward.stats.cache_hits.values()) > hits

    def _forward(self, x, t, class_emb=None) -> np.ndarray:
        with self._lock, _Threads(self):
            self._x_view[...] = x
            self._t[:] = t
            if class_emb is not None:
                self._c_view[...] = class_emb
            self._run_forward()
            return self._m_view.copy()

    # ------------------------------------------------------------------ the loop
    def _run(self, schedule, seed, first_index, keep, callback, class_emb=None, guidance=None):
        be = self._step_backend
        n = self.samples(guidance)
        shape = (n,) + self.input_shape[1:]
        # the U-Net's input seen as [copies, n, C, H, W]: x once, or for guidance twice ([x, x])
        x_in = self._x_view.reshape((self.batch // n,) + shape)

        def forward(x, t):                 # m = model output at t, in the arena (slot 1)
            x_in[...] = x
            self._t[:] = np.float32(t)
            self._run_forward()
            return self._m_view

        with self._lock, _Threads(self):
            if class_emb is not None:
                self._c_view[...] = class_emb          # fixed for the whole call
            x = np.ascontiguousarray(be.noise(seed, shape, INITIAL_STEP, first_index), dtype=np.float32)   # x_T
            step = fused_steps(be, schedule, seed, first_index, x, guidance)   # x <- x_{t-1}, in place
            return run_loop(schedule.timesteps, x, forward, step, keep=keep, callback=callback,
                            every=self.callback_every, **schedule_loop(schedule))


def compile_info() -> dict:
    """For the backend's describe(): the first forward's time in this process (compile or cache load)."""
    s = _COMPILE["seconds"]
    if s is None:
        return {"unet_compile_seconds": "not compiled yet"}
    return {"unet_compile_seconds": round(s, 3),
            "unet_compile_source": "disk cache" if _COMPILE["from_cache"] else "compiled"}


def can_run() -> bool:
    """numba's np.dot needs SciPy's BLAS: without SciPy the backend has no U-Net engine."""
    import importlib.util
    return numba is not None and importlib.util.find_spec("scipy") is not None
