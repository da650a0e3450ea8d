"""The Philox noise: the NumPy spec (fastddpm/philox.py) against Random123's published answers and
its own docstring, and every CPU backend (native-cpu once per ISA path) against the spec: the uint32
stream bit for bit, the normals to float32 rounding (NORMAL_ATOL, justified in tests/_stepkit.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import fastddpm
from fastddpm import philox as spec
from fastddpm.executors import get as get_backend

from _stepkit import NORMAL_ATOL, backend  # noqa: F401  (backend is a fixture)

SEEDS = (0, 1, 2**32 + 5, 0xDEADBEEFCAFEF00D, 2**64 - 1)
STEPS = (0, 1, 999, 0xFFFFFFFE, 0xFFFFFFFF)
PER_SAMPLE = tuple(range(1, 10)) + (15, 16, 17, 63, 64, 65, 4097)


# -- the spec itself ------------------------------------------------------------------------------

# Random123-1.09 kat_vectors, philox4x32 10 rounds: counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    got = spec.philox4x32_10(np.array(counter, dtype=np.uint32), key)
    assert got.dtype == np.uint32
    assert [int(v) for v in got] == list(expected)
    # batched evaluation gives the same block
    batch = spec.philox4x32_10(np.array([counter] * 3, dtype=np.uint32), key)
    assert (batch == np.array(expected, dtype=np.uint32)).all()


def test_philox_known_answer_through_the_stream():
    """The stream's counter layout: block g of row i = Philox((g, first_index + i, step, 0), seed)."""
    # counter (0, 0, 0, 0), key (0, 0) is block 0 of sample 0 at step 0 with seed 0
    assert [int(v) for v in spec.philox_uint32(0, 1, 4, 0)[0]] == list(KAT[0][2])
    # key (0xffffffff, 0xffffffff) is seed 2**64 - 1; counter (g=0xffffffff, i=0xffffffff, step=0xffffffff, 0)
    # is not reachable (c3 is always 0), so check the layout with a reachable counter instead
    seed, step, first = 0x0123456789ABCDEF, 0x9E3779B9, 2**32 - 3
    rows = spec.philox_uint32(seed, 3, 4 * 5, step, first)          # 3 samples, 5 groups each
    for i in range(3):
        for g in range(5):
            block = spec.philox4x32_10(np.array([g, first + i, step, 0], dtype=np.uint32),
                                       (seed & 0xFFFFFFFF, seed >> 32))
            assert (rows[i, 4 * g:4 * g + 4] == block).all(), (i, g)


def test_spec_normals_follow_the_docstring():
    """Box-Muller exactly as the module docstring writes it, in float64."""
    seed, step, first = 77, 12, 5
    shape = (3, 2, 3, 3)        # 18 per sample: 5 groups, the last one half used
    bits = spec.philox_uint32(seed, 3, 18, step, first)              # [3, 20]
    u = ((bits >> np.uint32(9)).astype(np.float64) + 0.5) * 2.0**-23
    assert (u > 0).all() and (u < 1).all()
    z = np.empty(bits.shape)
    for lane in (0, 2):
        rad = np.sqrt(-2.0 * np.log(u[:, lane::4]))
        theta = 2.0 * math.pi * u[:, lane + 1::4]
        z[:, lane::4] = rad * np.cos(theta)
        z[:, lane + 1::4] = rad * np.sin(theta)
    got = spec.noise(seed, shape, step, first, dtype=np.float64)
    np.testing.assert_array_equal(got.reshape(3, 18), z[:, :18])
    f32 = spec.noise(seed, shape, step, first)
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(f32, got.astype(np.float32))


def test_spec_initial_step_and_argument_checks():
    np.testing.assert_array_equal(spec.philox_uint32(9, 2, 6, -1), spec.philox_uint32(9, 2, 6, 0xFFFFFFFF))
    np.testing.assert_array_equal(spec.noise(9, (2, 6), -1), spec.noise(9, (2, 6), spec.INITIAL_STEP))
    assert spec.INITIAL_STEP == 0xFFFFFFFF
    for bad_step in (-2, 2**32):
        with pytest.raises(ValueError, match="noise step"):
            spec.noise(9, (2, 6), bad_step)
    for bad_seed in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            spec.noise(bad_seed, (2, 6), 0)
    with pytest.raises(ValueError, match="sample indices"):
        spec.noise(9, (2, 6), 0, first_index=2**32 - 1)
    with pytest.raises(ValueError, match="sample indices"):
        spec.noise(9, (2, 6), 0, first_index=-1)
    with pytest.raises(ValueError, match="shape"):
        spec.noise(9, (2, -6), 0)
    with pytest.raises(ValueError, match="shape"):
        spec.noise(9, (), 0)
    assert spec.noise(9, (0, 3), 0).shape == (0, 3)
    assert spec.noise(9, (2, 0), 0).shape == (2, 0)


def test_public_noise_function():
    shape = (3, 2, 5, 3)
    got = fastddpm.noise(7, shape, 17, first_index=4)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, spec.noise(7, shape, 17, 4, dtype=np.float64), rtol=0, atol=NORMAL_ATOL)
    # step=-1 is the initial static, noise step 0xFFFFFFFF
    np.testing.assert_array_equal(fastddpm.noise(7, shape, -1), fastddpm.noise(7, shape, 0xFFFFFFFF))
    assert not np.array_equal(fastddpm.noise(7, shape, -1), fastddpm.noise(7, shape, 0))
    # seeds as NumPy integers; the largest seed
    np.testing.assert_array_equal(fastddpm.noise(np.uint64(2**64 - 1), shape, 3), fastddpm.noise(2**64 - 1, shape, 3))
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            fastddpm.noise(bad, shape, 0)
    for bad in (-2, 2**32):
        with pytest.raises(ValueError, match="noise step"):
            fastddpm.noise(7, shape, bad)


# -- every backend against the spec ---------------------------------------------------------------

def test_philox_stream_bit_exact(backend):
    be = get_backend(backend)
    for seed in SEEDS:
        for step in STEPS:
            for per_sample in PER_SAMPLE:
                for first_index, batch in ((0, 2), (5, 3), (2**32 - 2, 2)):
                    got = be.philox_uint32(seed, batch, per_sample, step, first_index)
                    want = spec.philox_uint32(seed, batch, per_sample, step, first_index)
                    assert got.dtype == np.uint32 and got.shape == want.shape == (batch, -(-per_sample // 4) * 4)
                    if not np.array_equal(got, want):
                        raise AssertionError(f"{backend}: seed={seed} step={step} per_sample={per_sample} "
                                             f"first_index={first_index}: {np.mean(got != want):.0%} differ")


def test_philox_stream_bit_exact_large(backend):
    """Past one kernel chunk (16384 elements) and the parallel threshold (65536 in a call)."""
    be = get_backend(backend)
    for batch, per_sample in ((1, 70001), (3, 40003)):
        got = be.philox_uint32(0xC0FFEE, batch, per_sample, 500, 17)
        np.testing.assert_array_equal(got, spec.philox_uint32(0xC0FFEE, batch, per_sample, 500, 17))


def _noise_shapes():
    return [(1, 1), (2, 3), (3, 5), (1, 1, 5, 7), (3, 3, 4, 4), (5, 1, 3, 3), (2, 4, 9, 7), (2, 4097),
            (1, 3, 130, 130), (0, 4), (2, 0)]


def test_normals_match_spec(backend):
    be = get_backend(backend)
    worst = 0.0
    for shape in _noise_shapes():
        for seed, step, first_index in ((0, 0, 0), (2**64 - 1, 0xFFFFFFFF, 3), (12345, 999, 2**32 - shape[0] - 1)):
            got = be.noise(seed, shape, step, first_index)
            want = spec.noise(seed, shape, step, first_index, dtype=np.float64)
            assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == shape
            if got.size:
                worst = max(worst, float(np.max(np.abs(got - want))))
    assert worst <= NORMAL_ATOL, f"{backend}: normals differ from the float64 spec by up to {worst:.3g}"


def test_normals_of_many_draws_match_spec(backend):
    """2**20 normals: the extreme tails (|z| up to ~5.4) and u near 0 and 1 all occur."""
    be = get_backend(backend)
    got = be.noise(2024, (4, 2**18), 31)
    want = spec.noise(2024, (4, 2**18), 31, dtype=np.float64)
    err = np.abs(got - want)
    assert err.max() <= NORMAL_ATOL, f"{backend}: max |err| {err.max():.3g} at z = {want.flat[np.argmax(err)]:.4f}"
    assert np.abs(want).max() > 4.5


def test_noise_batch_invariance_and_prefixes(backend):
    """Sample i of a batch is the single-sample draw with first_index + i; a sample's first k elements
    do not depend on its size. Bit for bit, on the same backend."""
    be = get_backend(backend)
    seed, step = 31337, 421
    batch = be.noise(seed, (5, 3, 7, 7), step, 1000)
    bits = be.philox_uint32(seed, 5, 147, step, 1000)
    for i in range(5):
        np.testing.assert_array_equal(batch[i:i + 1], be.noise(seed, (1, 3, 7, 7), step, 1000 + i))
        np.testing.assert_array_equal(bits[i:i + 1], be.philox_uint32(seed, 1, 147, step, 1000 + i))
    flat = batch.reshape(5, -1)
    for k in (1, 2, 3, 5, 146):
        np.testing.assert_array_equal(be.noise(seed, (5, k), step, 1000), flat[:, :k])
    # the shape within a sample does not matter, only the element count
    np.testing.assert_array_equal(be.noise(seed, (5, 147), step, 1000), flat)


def test_noise_counters_all_matter(backend):
    be = get_backend(backend)
    base = be.noise(5, (4, 64), 10, 0)
    for other in (be.noise(6, (4, 64), 10, 0), be.noise(5 + 2**32, (4, 64), 10, 0),
                  be.noise(5, (4, 64), 11, 0), be.noise(5, (4, 64), 10, 1)[:-1]):
        assert np.mean(base[: len(other)] != other) > 0.99
    # no repeated rows or repeated groups inside one draw
    bits = be.philox_uint32(5, 64, 256, 10)
    assert len({row.tobytes() for row in bits}) == 64
    groups = bits.reshape(-1, 4)
    assert len({g.tobytes() for g in groups}) == len(groups)


def test_public_noise_matches_every_backend(backend):
    be = get_backend(backend)
    shape = (3, 1, 9, 5)
    for step in (-1, 0, 500):
        want = fastddpm.noise(99, shape, step, first_index=8)
        step32 = 0xFFFFFFFF if step == -1 else step
        np.testing.assert_allclose(be.noise(99, shape, step32, 8), want, rtol=0, atol=2 * NORMAL_ATOL)


# -- statistics (deterministic: fixed seeds, so a pass or fail is reproducible) ----------------------

N_STAT = 1_000_000


@pytest.fixture(scope="module")
def native_or_spec_noise():
    """1e6 normals of seed 8 (the fastest CPU backend's; they equal the spec to NORMAL_ATOL)."""
    return fastddpm.noise(8, (4, N_STAT // 4), 250).ravel().astype(np.float64)


def test_normal_moments(native_or_spec_noise):
    z = native_or_spec_noise
    n = z.size
    # sampling standard errors of the mean, variance, skewness and excess kurtosis of N(0, 1)
    se_mean, se_var, se_skew, se_kurt = 1 / math.sqrt(n), math.sqrt(2 / n), math.sqrt(6 / n), math.sqrt(24 / n)
    mean, var = z.mean(), z.var()
    skew = np.mean((z - mean) ** 3) / var**1.5
    kurt = np.mean((z - mean) ** 4) / var**2 - 3.0
    assert abs(mean) < 5 * se_mean, mean
    assert abs(var - 1) < 5 * se_var, var
    assert abs(skew) < 5 * se_skew, skew
    assert abs(kurt) < 5 * se_kurt, kurt
    # the tails: P(|z| > 3) = 0.0026998, binomial standard error
    p3 = 0.0026997960632601866
    assert abs(np.mean(np.abs(z) > 3) - p3) < 5 * math.sqrt(p3 * (1 - p3) / n)


def test_kolmogorov_smirnov(native_or_spec_noise):
    stats = pytest.importorskip("scipy.stats", reason="scipy is an optional test dependency")
    z = native_or_spec_noise
    # A fixed draw: p > 1e-3 fails for a correct generator with probability 1e-3, once, and then
    # stays failing for this seed -- it passes, and a wrong transform (e.g. a missing factor 2 in
    # sqrt(-2 ln u), or a biased u) gives p ~ 0.
    assert stats.kstest(z, "norm").pvalue > 1e-3
    u = spec.uniform_from_uint32(spec.philox_uint32(8, 4, N_STAT // 4, 250)).ravel()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # and the bits: each of the 32 bits is set half the time (5 sigma)
    words = spec.philox_uint32(8, 4, N_STAT // 4, 250).ravel()
    ones = np.array([np.mean((words >> np.uint32(b)) & np.uint32(1)) for b in range(32)])
    assert np.all(np.abs(ones - 0.5) < 5 * 0.5 / math.sqrt(words.size)), ones


def test_no_correlation_across_counters():
    n = 2**18
    a = fastddpm.noise(3, (2, n), 40).astype(np.float64)
    b = fastddpm.noise(3, (2, n), 39).astype(np.float64)
    limit = 5 / math.sqrt(n)          # 5 standard errors of a correlation of independent normals
    assert abs(np.corrcoef(a[0], a[1])[0, 1]) < limit          # neighbouring samples
    assert abs(np.corrcoef(a[0], b[0])[0, 1]) < limit          # neighbouring steps
    assert abs(np.corrcoef(a[0, :-1], a[0, 1:])[0, 1]) < limit  # neighbouring elements
    # the two normals of one Box-Muller pair are uncorrelated (E[z0^2 z1^2] = 1: the same standard error)
    assert abs(np.corrcoef(a[0, ::4], a[0, 1::4])[0, 1]) < 5 / math.sqrt(n // 4)
