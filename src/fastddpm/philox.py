"""The noise specification: Philox4x32-10 + Box-Muller, in NumPy.

This module *defines* the random numbers of fastddpm; the C++, CUDA, numba and torch backends
reproduce its uint32 stream bit for bit and its normals to float32 rounding.

Counter layout
--------------
Every sample is flattened in C order (for an NCHW batch: C, H, W) and cut into groups of four
consecutive elements; the last group of a sample may be partial (its unused lanes are dropped).
Group ``g`` of sample ``i`` at noise step ``s`` is one Philox4x32-10 block:

    key     = (seed & 0xFFFFFFFF, seed >> 32)          # the 64-bit seed
    counter = (g, first_index + i, s, 0)               # c0, c1, c2, c3 (c3 reserved, always 0)

and its four uint32 outputs ``r0..r3`` give four normals by Box-Muller:

    u(r)    = ((r >> 9) + 0.5) * 2**-23                # in (0, 1), exact in float32
    rad     = sqrt(-2 ln u(r0)),   theta = 2 pi u(r1)  -> n0 = rad cos theta, n1 = rad sin theta
    rad'    = sqrt(-2 ln u(r2)),   theta' = 2 pi u(r3) -> n2, n3 likewise

The noise step ``s`` is the *timestep* passed to ``Scheduler.step`` (so a step call needs no loop
index), and ``INITIAL_STEP = 0xFFFFFFFF`` for the starting static x_T. Sample i's noise at step s
therefore depends only on (seed, i, s): batches can be split or merged freely.
"""
from __future__ import annotations

import numpy as np

from . import validate

__all__ = ["INITIAL_STEP", "philox4x32_10", "philox_uint32", "box_muller", "noise"]

INITIAL_STEP = validate.INITIAL_STEP

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)


def _mulhilo(a: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prod = np.uint64(a) * b.astype(np.uint64)
    return prod >> np.uint64(32), prod & _MASK32


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Random123's Philox4x32-10. counter: uint32 [..., 4]; key: two uint32. Returns uint32 [..., 4]."""
    c = [counter[..., j].astype(np.uint64) for j in range(4)]
    k0, k1 = np.uint64(key[0] & 0xFFFFFFFF), np.uint64(key[1] & 0xFFFFFFFF)
    for rnd in range(10):
        if rnd:
            k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c[0])
        hi1, lo1 = _mulhilo(PHILOX_M1, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return np.stack([x.astype(np.uint32) for x in c], axis=-1)


def philox_uint32(seed: int, batch: int, per_sample: int, step: int, first_index: int = 0) -> np.ndarray:
    """The raw stream: uint32 [batch, ceil(per_sample / 4) * 4], block g of row i = Philox(g, first_index+i, step)."""
    seed, step = validate.seed(seed), validate.noise_step(step)
    first_index = validate.first_index(first_index, batch)
    groups = -(-per_sample // 4)
    ctr = np.zeros((batch, groups, 4), dtype=np.uint32)
    ctr[..., 0] = np.arange(groups, dtype=np.uint32)[None, :]
    ctr[..., 1] = (first_index + np.arange(batch, dtype=np.uint64)).astype(np.uint32)[:, None]
    ctr[..., 2] = step
    out = philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))  # [batch, groups, 4]
    return out.reshape(batch, groups * 4)


def uniform_from_uint32(r: np.ndarray) -> np.ndarray:
    """u(r) = ((r >> 9) + 0.5) * 2**-23, in (0, 1); float64."""
    return ((r >> np.uint32(9)).astype(np.float64) + 0.5) * 2.0**-23


def box_muller(bits: np.ndarray) -> np.ndarray:
    """uint32 [..., 4k] -> float64 normals [..., 4k]: lanes (0,1) and (2,3) of each block are pairs."""
    pairs = bits.reshape(*bits.shape[:-1], bits.shape[-1] // 2, 2)   # not -1: bits may be empty
    rad = np.sqrt(-2.0 * np.log(uniform_from_uint32(pairs[..., 0])))
    theta = 2.0 * np.pi * uniform_from_uint32(pairs[..., 1])
    return np.stack([rad * np.cos(theta), rad * np.sin(theta)], axis=-1).reshape(bits.shape)


def noise(seed: int, shape, step: int, first_index: int = 0, dtype=np.float32) -> np.ndarray:
    """The normal noise that the sampler adds at noise step ``step`` to samples ``first_index, ...``.

    shape: (N, ...) — N samples, each flattened in C order. ``step`` is the timestep given to
    ``Scheduler.step`` or -1 for the initial static x_T. Reference implementation (float64 math).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 0 for s in shape):
        raise ValueError(f"noise shape must be (N, ...) with non-negative sizes, got {shape}")
    batch = shape[0]
    per_sample = int(np.prod(shape[1:], dtype=np.int64))
    bits = philox_uint32(seed, batch, per_sample, step, first_index)
    normals = box_muller(bits)[:, :per_sample]
    return normals.reshape(shape).astype(dtype, copy=False)
