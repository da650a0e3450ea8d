"""The numba backend: the fused step and the Philox noise as numba kernels, for machines where the
compiled core (fastddpm._C) is missing or broken.

Everything numba lives behind one guarded import, so this module imports (and reports why it cannot
run) without numba. The kernels are ``@njit(parallel=True, fastmath=False, cache=True, nogil=True)``
and compile on first use; the first call's time (a compile, or a load from numba's on-disk cache)
is recorded for ``describe()``.

Work is cut into fixed tasks of (sample, run of ``_GROUPS`` Philox groups), independent of the
thread count, so results never depend on how many threads ran them. Inside a task the noise is made
by a branch-free loop that LLVM vectorises (Philox4x32-10 on 32-bit words held in uint64 lanes, so
each product is exact; Box-Muller with Cephes-style float32 log and sin/cos polynomials, as the C++
core, instead of scalar libm calls), then the fused step runs over the task's elements. See
fastddpm.noise for the spec and fastddpm.schedulers for the coefficient row.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time

import numpy as np

from .. import validate

from ..coefficients import A_M, A_X, C_X0, CLIP, COEF_WIDTH, D_M, D_X, H1, H2, SIGMA
from .base import Backend
from .. import threads as _budget
from .numba_threads import parallel_region

try:
    import numba
    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - ImportError, or numba refusing this NumPy/llvmlite
    numba = None
    _IMPORT_ERROR = f"numba is not importable ({type(exc).__name__}: {exc}); pip install numba"

# Philox groups (4 elements each) per parallel task: 4096 elements, 16 KiB per array, so a task's
# x, m, out and local buffers stay in L1/L2.
_GROUPS = 1024
# Below this many elements a call runs on one thread: waking the pool costs more than it saves, and
# on a busy machine a parallel region waits for a descheduled worker (milliseconds).
_PARALLEL_MIN = 1 << 16
_MAX_INDEX = 2**32

# Kernel modes: what the noise term is.
_NO_NOISE, _PHILOX, _GIVEN, _NORMALS_ONLY = 0, 1, 2, 3


def _threads_from_env() -> tuple[int | None, str | None]:
    """(threads asked for by FASTDDPM_NUM_THREADS or None, an error string or None)."""
    value = os.environ.get("FASTDDPM_NUM_THREADS")
    if value is None:
        return None, None
    try:
        n = int(value)
        if n < 1:
            raise ValueError
    except ValueError:
        return None, f"FASTDDPM_NUM_THREADS must be a positive integer, got {value!r}"
    return n, None


_ENV_THREADS, _ENV_THREADS_ERROR = _threads_from_env()


if numba is not None:
    from llvmlite import ir as _ir
    from numba import prange
    from numba.core import config as _numba_config
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def _f32_bits(typingctx, x):
        """The bits of a float32 as an int32 (a bitcast; numba has no scalar view)."""
        if x != numba.types.float32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _ir.IntType(32))
        return numba.types.int32(numba.types.float32), codegen

    @_intrinsic
    def _f32_from_bits(typingctx, b):
        if b != numba.types.int32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _ir.FloatType())
        return numba.types.float32(numba.types.int32), codegen

    # Constants as typed globals: a bare Python float would promote float32 maths to float64, and a
    # bare int mixed with uint64 would promote to float64.
    _U64_M0, _U64_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    _U64_W0, _U64_W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    _U64_MASK, _U64_32, _U64_9 = np.uint64(0xFFFFFFFF), np.uint64(32), np.uint64(9)
    _F_HALF, _F_ONE, _F_TWO, _F_FOUR, _F_QUARTER = (np.float32(v) for v in (0.5, 1.0, 2.0, 4.0, 0.25))
    _F_2POW_M23 = np.float32(2.0**-23)
    _F_SQRT_HALF = np.float32(0.707106781186547524)
    _F_LN2_HI, _F_LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
    _F_2PI = np.float32(6.28318530717958647692)
    _LOGP = tuple(np.float32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1,
                                           -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
                                           2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
    _LP0, _LP1, _LP2, _LP3, _LP4, _LP5, _LP6, _LP7, _LP8 = _LOGP
    _SP0, _SP1, _SP2 = (np.float32(c) for c in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1))
    _CP0, _CP1, _CP2 = (np.float32(c) for c in (2.443315711809948e-5, -1.388731625493765e-3,
                                                 4.166664568298827e-2))

    # _philox and _box_muller are inlined at numba's IR level (LLVM declines: without them inlined
    # the noise loop does not vectorise and runs 5x slower); the small leaf helpers LLVM inlines by
    # itself, and leaving them to it saves a third of the compile time.
    _inline = numba.njit(inline="always", fastmath=False)
    _helper = numba.njit(fastmath=False)

    @_inline
    def _philox(c0, c1, c2, k0, k1):
        """Philox4x32-10 of counter (c0, c1, c2, 0), key (k0, k1). Takes and returns uint64 words
        holding 32-bit values: kept in 64-bit lanes, every product is one vpmuludq and no lane
        ever needs packing to 32 bits and widening back."""
        c3 = np.uint64(0)
        for rnd in range(10):
            if rnd:
                k0 = (k0 + _U64_W0) & _U64_MASK
                k1 = (k1 + _U64_W1) & _U64_MASK
            p0 = c0 * _U64_M0                       # 32 x 32 -> 64 bits, exact in uint64
            p1 = c2 * _U64_M1
            c0, c1, c2, c3 = (p1 >> _U64_32) ^ c1 ^ k0, p1 & _U64_MASK, (p0 >> _U64_32) ^ c3 ^ k1, p0 & _U64_MASK
        return c0, c1, c2, c3

    @_helper
    def _uniform(r):
        """u(r) = ((r >> 9) + 0.5) * 2^-23 in (0, 1); exact in float32."""
        return (np.float32(np.int32(r >> _U64_9)) + _F_HALF) * _F_2POW_M23   # r >> 9 < 2^23

    @_helper
    def _log(x):
        """ln(x) for a normal float32 x > 0: Cephes logf (about 1 ulp; accurate near x = 1)."""
        bits = _f32_bits(x)
        e = np.int32(((bits >> 23) & 0xFF) - 126)
        m = _f32_from_bits(np.int32((bits & 0x007FFFFF) | 0x3F000000))   # mantissa in [0.5, 1)
        small = m < _F_SQRT_HALF
        e = np.int32(e - np.int32(small))
        m = m + m * np.float32(small) - _F_ONE      # in [sqrt(1/2) - 1, sqrt(2) - 1)
        z = m * m
        y = _LP0
        y = y * m + _LP1
        y = y * m + _LP2
        y = y * m + _LP3
        y = y * m + _LP4
        y = y * m + _LP5
        y = y * m + _LP6
        y = y * m + _LP7
        y = y * m + _LP8
        y = y * m * z
        ef = np.float32(e)
        y = y + ef * _F_LN2_LO
        y = y - _F_HALF * z
        return m + y + ef * _F_LN2_HI

    @_helper
    def _sincos_2pi(u):
        """(sin 2 pi u, cos 2 pi u) for u in (0, 1): exact reduction to a quadrant, then Cephes'
        minimax polynomials on [-pi/4, pi/4] (float32 sin/cos of 2 pi u directly would lose the
        absolute accuracy of theta near 2 pi)."""
        q = np.int32(u * _F_FOUR + _F_HALF)          # round(4 u), u > 0
        x = (u - np.float32(q) * _F_QUARTER) * _F_2PI   # the subtraction is exact, |x| <= pi / 4
        x2 = x * x
        ps = _SP0
        ps = ps * x2 + _SP1
        ps = ps * x2 + _SP2
        sp = ps * x2 * x + x
        pc = _CP0
        pc = pc * x2 + _CP1
        pc = pc * x2 + _CP2
        cp = pc * x2 * x2 - _F_HALF * x2 + _F_ONE
        swap = (q & 1) != 0                          # quadrants 1, 3: sin <-> cos
        s = cp if swap else sp
        c = sp if swap else cp
        s = -s if (q & 2) != 0 else s                # quadrants 2, 3: sin < 0
        c = -c if ((q + 1) & 2) != 0 else c          # quadrants 1, 2: cos < 0
        return s, c

    @_inline
    def _box_muller(r0, r1, r2, r3):
        rad0 = np.sqrt(-_F_TWO * _log(_uniform(r0)))
        rad1 = np.sqrt(-_F_TWO * _log(_uniform(r2)))
        s0, c0 = _sincos_2pi(_uniform(r1))
        s1, c1 = _sincos_2pi(_uniform(r3))
        return rad0 * c0, rad0 * s0, rad1 * c1, rad1 * s1

    def _jit_kernel(fn):
        """njit(parallel, cache) with a cache directory that works: numba looks in NUMBA_CACHE_DIR,
        then the package's __pycache__, then the user cache dir, and refuses to decorate if none is
        writable (a read-only install with no writable home); then use a temp dir, else no cache."""
        opts = dict(parallel=True, fastmath=False, nogil=True)
        try:
            return numba.njit(cache=True, **opts)(fn)
        except RuntimeError:
            pass
        if not _numba_config.CACHE_DIR:
            _numba_config.CACHE_DIR = os.path.join(tempfile.gettempdir(), f"fastddpm-numba-{os.getuid()}"
                                                   if hasattr(os, "getuid") else "fastddpm-numba")
            try:
                return numba.njit(cache=True, **opts)(fn)
            except RuntimeError:
                pass
        return numba.njit(cache=False, **opts)(fn)

    @_helper
    def _fused(xs, ms, zs, os, coef, with_noise, h1s, h2s, x0s, nh, store, mus, w):
        """os = the fused step of xs, ms (and zs if with_noise, and the nh previous x0 predictions
        h1s, h2s); x0s = this step's x0 if store. With mus (not None), the model output is
        mus + w (ms - mus) (classifier-free guidance: ms conditional, mus unconditional; step.h
        step_guided_output), formed in registers. All [n] float32. os must not overlap the inputs,
        or the loop runs scalar (the caller copies x for in-place steps). mus=None is a type of its
        own: numba prunes the guidance branch at compile time, so the unguided kernel is the same
        code as without guidance support (a run-time flag cost it its vectorisation)."""
        ax, am, cx0, dx, dm, sigma, r = coef[A_X], coef[A_M], coef[C_X0], coef[D_X], coef[D_M], coef[SIGMA], coef[CLIP]
        w1, w2 = coef[H1], coef[H2]
        clip = r > np.float32(0)
        nr = -r
        for j in range(os.shape[0]):   # loop-invariant branches: LLVM unswitches them
            xv, mv = xs[j], ms[j]
            if mus is not None:
                uv = mus[j]
                mv = uv + w * (mv - uv)
            x0 = ax * xv + am * mv
            if clip:  # comparisons with NaN are false, so a NaN x0 stays NaN
                x0 = r if r < x0 else x0
                x0 = nr if x0 < nr else x0
            y = cx0 * x0 + dx * xv + dm * mv
            if nh >= 1:
                y += w1 * h1s[j]
            if nh >= 2:
                y += w2 * h2s[j]
            if with_noise:
                y += sigma * zs[j]
            if store:
                x0s[j] = x0
            os[j] = y

    @_jit_kernel
    def _step_kernel(x, m, noise, out, coef, k0, k1, noise_step, first_index, mode, h1, h2, x0_out, nh, store,
                     mu, w):
        # x, m, noise, out: [N, P] float32 (noise is a dummy unless mode == _GIVEN; x and m are
        # dummies when mode == _NORMALS_ONLY); out may be x. coef: [COEF_WIDTH] float32. k0, k1,
        # noise_step, first_index: uint64 holding 32-bit values. h1, h2: the previous x0
        # predictions ([N, P]; dummies beyond nh), x0_out: where this step's x0 goes if store.
        # mu: None, or the unconditional model output [N, P] of a guided step with w its scale
        # (float32); a None mu compiles a kernel without the guidance term.
        n, p = out.shape
        groups = (p + 3) // 4
        per = (groups + _GROUPS - 1) // _GROUPS
        for task in prange(n * per):
            i = task // per
            g0 = (task - i * per) * _GROUPS
            ng = min(_GROUPS, groups - g0)
            e0 = g0 * 4
            e1 = min(e0 + 4 * ng, p)
            # Views of this task's elements, indexed from 0 (a non-negative index needs no
            # wraparound handling, which keeps the loops vectorisable).
            os = out[i, e0:e1]
            z = np.empty(4 * ng, dtype=np.float32)
            if mode == _PHILOX or mode == _NORMALS_ONLY:
                idx = np.uint64(first_index) + np.uint64(i)    # < 2**32, checked by the caller
                for j in range(ng):                  # branch-free: vectorisable
                    r0, r1, r2, r3 = _philox(np.uint64(g0 + j), idx, noise_step, k0, k1)
                    n0, n1, n2, n3 = _box_muller(r0, r1, r2, r3)
                    z[4 * j] = n0
                    z[4 * j + 1] = n1
                    z[4 * j + 2] = n2
                    z[4 * j + 3] = n3
            if mode == _NORMALS_ONLY:
                os[:] = z[:e1 - e0]
            else:
                # x through a task-local copy: when out is x, LLVM's runtime overlap check fails
                # and the loop would run scalar (5x slower); the copy stays in L1.
                xt = np.empty(e1 - e0, dtype=np.float32)
                xt[:] = x[i, e0:e1]
                hs1, hs2, xs0 = h1[i, e0:e1], h2[i, e0:e1], x0_out[i, e0:e1]
                if mu is None:
                    if mode == _GIVEN:
                        _fused(xt, m[i, e0:e1], noise[i, e0:e1], os, coef, True, hs1, hs2, xs0, nh, store, None, w)
                    else:
                        _fused(xt, m[i, e0:e1], z, os, coef, mode == _PHILOX, hs1, hs2, xs0, nh, store, None, w)
                elif mode == _GIVEN:
                    _fused(xt, m[i, e0:e1], noise[i, e0:e1], os, coef, True, hs1, hs2, xs0, nh, store, mu[i, e0:e1], w)
                else:
                    _fused(xt, m[i, e0:e1], z, os, coef, mode == _PHILOX, hs1, hs2, xs0, nh, store, mu[i, e0:e1], w)

    @_jit_kernel
    def _philox_kernel(out, k0, k1, step, first_index):
        # out: [N, 4 * groups] uint32; block g of row i = Philox(g, first_index + i, step).
        n, width = out.shape
        groups = width // 4
        per = (groups + _GROUPS - 1) // _GROUPS
        for task in prange(n * per):
            i = task // per
            g0 = (task - i * per) * _GROUPS
            g1 = min(g0 + _GROUPS, groups)
            idx = np.uint64(first_index) + np.uint64(i)
            row = out[i]
            for g in range(g0, g1):
                r0, r1, r2, r3 = _philox(np.uint64(g), idx, step, k0, k1)
                row[4 * g] = r0
                row[4 * g + 1] = r1
                row[4 * g + 2] = r2
                row[4 * g + 3] = r3


def _key(seed: int) -> tuple[np.uint64, np.uint64]:
    return np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)


def _check_indices(batch: int, per_sample: int, step: int, first_index: int) -> np.uint64:
    """The checks the C++ entry points make again; returns the noise step as a kernel argument."""
    if first_index < 0 or first_index + batch > _MAX_INDEX:
        raise ValueError(f"sample indices must lie in [0, 2**32), got first_index={first_index}, batch={batch}")
    if -(-per_sample // 4) > _MAX_INDEX:
        raise ValueError(f"per_sample={per_sample} is too large: Philox groups must fit in 32 bits")
    step = int(step)
    if not 0 <= step < _MAX_INDEX:
        raise ValueError(f"noise step must be in [0, 2**32), got {step}")
    return np.uint64(step)


def _in(a: np.ndarray, shape) -> np.ndarray:
    """A read-only aligned [N, P] view (or copy) of an input.

    numba compiles one specialisation per array type, and read-only and unaligned arrays are other
    types: every input goes in read-only (and aligned) so that one compiled kernel serves all calls.
    """
    v = a.reshape(shape) if a.flags.aligned else np.array(a, order="C").reshape(shape)
    if v is a:
        v = v.view()
    v.flags.writeable = False
    return v


class NumbaStepBackend(Backend):
    """Fused step and Philox noise as numba kernels (CPU, multithreaded through numba's prange);
    numba_backend.py adds the U-Net engine."""

    name = "numba"
    devices = ("cpu",)

    def __init__(self):
        self._lock = threading.Lock()
        self._first_call: dict[str, float] = {}   # kernel name -> seconds its first call took
        self._from_cache: dict[str, bool] = {}    # kernel name -> loaded from numba's disk cache
        self._threads = None
        if numba is not None and _ENV_THREADS is not None:
            self._threads = min(_ENV_THREADS, _numba_config.NUMBA_NUM_THREADS)

    def unavailable(self) -> list[str]:
        reasons = []
        if _IMPORT_ERROR:
            reasons.append(_IMPORT_ERROR)
        if _ENV_THREADS_ERROR:
            reasons.append(_ENV_THREADS_ERROR)
        return reasons

    # -- threads --------------------------------------------------------------------------------
    def set_num_threads(self, n: int) -> None:
        """Threads for this backend's kernels, clamped to numba's pool size (NUMBA_NUM_THREADS)."""
        n = validate.count("num_threads", n)
        self._threads = min(n, _numba_config.NUMBA_NUM_THREADS)

    def _run(self, name: str, kernel, elements: int, *args) -> None:
        # numba's thread count is per calling thread and shared with the rest of the process: set
        # ours for the call only, and put the caller's back. (Inside the kernel it would be cheaper,
        # but numba then refuses to cache the kernel.)
        # The threads come from the process-wide budget (threads.py): the call's threads=, else
        # this backend's count, else the whole budget; small calls run on one.
        ask = 1 if elements < _PARALLEL_MIN else (_budget.requested() or self._threads)
        with _budget.grant(ask) as granted:
            self._run_on(min(granted, _numba_config.NUMBA_NUM_THREADS), name, kernel, *args)

    def _run_on(self, want: int, name: str, kernel, *args) -> None:
        prev = numba.get_num_threads()
        if want != prev:
            numba.set_num_threads(want)
        try:
            # The kernels release the GIL: parallel_region() keeps launches from different threads
            # apart where numba's threading layer is not thread-safe (workqueue aborts the process).
            if name in self._first_call:
                with parallel_region():
                    kernel(*args)
                return
            with self._lock, parallel_region():   # the first call compiles (or loads the disk cache): time it
                hits = sum(kernel.stats.cache_hits.values())
                t0 = time.perf_counter()
                kernel(*args)
                if name not in self._first_call:
                    self._first_call[name] = time.perf_counter() - t0
                    self._from_cache[name] = sum(kernel.stats.cache_hits.values()) > hits
        finally:
            if want != prev:
                numba.set_num_threads(prev)

    # -- the Backend interface ------------------------------------------------------------------
    def step(self, x, m, out, table, row, seed, noise_step, first_index, noise, history=None, guide=None) -> None:
        # x, m, out, noise: [N, ...] float32 C-contiguous (checked by dispatch); out may be x.
        # history: None or (h1, h2, x0_out), each None or [N, ...] float32 C-contiguous.
        # guide: None or (m_u, w): m_u [N, ...] float32 C-contiguous, w a float.
        if x.size == 0:
            return
        n = x.shape[0]
        shape = (n, x.size // n)
        step = _check_indices(n, shape[1], noise_step, first_index)
        coef = _in(np.asarray(table[row], dtype=np.float32), (COEF_WIDTH,))      # [COEF_WIDTH]
        x2, m2 = _in(x, shape), _in(m, shape)
        if noise is not None:
            mode, n2 = _GIVEN, _in(noise, shape)
        else:  # sigma == 0 (the last DDPM step, DDIM with eta 0): no noise to make
            mode, n2 = (_PHILOX if coef[SIGMA] != 0 else _NO_NOISE), x2
        k0, k1 = _key(seed)
        aside = not out.flags.aligned   # an unaligned out: compute into an aligned array, copy in
        o2 = np.empty(shape, dtype=np.float32) if aside else out.reshape(shape)
        h1, h2, x0_out = history if history is not None else (None, None, None)
        nh = 0 if h1 is None else (1 if h2 is None else 2)
        hs1 = _in(h1, shape) if h1 is not None else x2
        hs2 = _in(h2, shape) if h2 is not None else x2
        store = x0_out is not None
        xo = x0_out.reshape(shape) if store else o2
        mu, w = (_in(guide[0], shape), np.float32(guide[1])) if guide is not None else (None, np.float32(0))
        self._run("step", _step_kernel, x.size, x2, m2, n2, o2, coef, k0, k1, step, np.uint64(first_index), mode,
                  hs1, hs2, xo, nh, store, mu, w)
        if aside:
            np.copyto(out, o2.reshape(out.shape))

    def noise(self, seed, shape, step, first_index=0, device="cpu"):
        shape = tuple(int(s) for s in shape)
        n = shape[0]
        per_sample = int(np.prod(shape[1:], dtype=np.int64))
        out = np.empty((n, per_sample), dtype=np.float32)
        if out.size:
            step = _check_indices(n, per_sample, step, first_index)
            k0, k1 = _key(seed)
            dummy = _in(out, out.shape)   # the step kernel in normals-only mode: x, m, noise unread
            self._run("step", _step_kernel, out.size, dummy, dummy, dummy, out,
                      _in(np.zeros(COEF_WIDTH, np.float32), (COEF_WIDTH,)),
                      k0, k1, step, np.uint64(first_index), _NORMALS_ONLY, dummy, dummy, out, 0, False,
                      None, np.float32(0))
        return out.reshape(shape)

    def philox_uint32(self, seed, batch, per_sample, step, first_index=0):
        out = np.empty((batch, -(-per_sample // 4) * 4), dtype=np.uint32)
        if out.size:
            step = _check_indices(batch, per_sample, step, first_index)
            k0, k1 = _key(seed)
            self._run("philox", _philox_kernel, out.size, out, k0, k1, step, np.uint64(first_index))
        return out

    def describe(self) -> dict:
        if numba is None:
            return {}
        step = self._first_call.get("step")
        if step is None:
            compiled = "not compiled yet"
        else:
            compiled = round(step, 3)
        return {
            "threads": self._threads if self._threads is not None else numba.get_num_threads(),
            "compile_seconds": compiled,
            "compile_source": ("disk cache" if self._from_cache.get("step") else "compiled")
                              if step is not None else "not compiled yet",
            "cache_dir": _step_kernel.stats.cache_path or "caching off",
            "numba": numba.__version__,
        }
