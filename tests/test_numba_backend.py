"""numba-specific behaviour of executors/numba_cpu.py: import without numba, compile-time reporting,
the thread setting, one compiled specialisation, the cache-dir fallback. The step and noise maths
are tested for every backend in test_step.py and test_noise.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastddpm

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _python(code: str, **env) -> str:
    """Run code in a fresh interpreter (module state such as 'compiled yet' is per process)."""
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.pop("FASTDDPM_NUM_THREADS", None)
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_imports_and_explains_itself_without_numba():
    out = _python(
        "import sys, json; sys.modules['numba'] = None\n"
        "import numpy as np, fastddpm\n"
        "from fastddpm.executors import BackendUnavailableError\n"
        "entry = fastddpm.backends()['numba']\n"
        "s = fastddpm.DDPMScheduler(); s.set_timesteps(10); x = np.zeros((1, 4), np.float32)\n"
        "try:\n"
        "    s.step(x, int(s.timesteps[0]), x, seed=0, backend='numba'); err = None\n"
        "except BackendUnavailableError as exc:\n"
        "    err = str(exc)\n"
        "print(json.dumps({'entry': entry, 'err': err}))\n")
    got = json.loads(out)
    assert got["entry"]["available"] is False
    # the reason carries the ImportError's own text
    assert any("numba is not importable" in r and "import of numba halted" in r for r in got["entry"]["reasons"])
    assert got["err"] is not None and "numba is not importable" in got["err"]


numba = pytest.importorskip("numba")
from fastddpm.executors import numba_cpu  # noqa: E402
from fastddpm.executors.numba_backend import BACKEND as NUMBA  # noqa: E402

pytestmark = pytest.mark.skipif(bool(NUMBA.unavailable()), reason="numba backend unavailable")


def test_describe_reports_first_call_time():
    out = _python(
        "import json, numpy as np\n"
        "from fastddpm.executors.numba_backend import BACKEND as B\n"
        "before = B.describe()\n"
        "B.noise(1, (2, 3), 0)\n"
        "print(json.dumps({'before': before, 'after': B.describe()}))\n")
    got = json.loads(out)
    assert got["before"]["compile_seconds"] == "not compiled yet"
    after = got["after"]
    assert isinstance(after["compile_seconds"], float) and after["compile_seconds"] > 0
    assert after["compile_source"] in ("compiled", "disk cache")
    assert os.path.isdir(after["cache_dir"])
    assert after["threads"] >= 1


def test_cache_falls_back_to_a_temp_dir(tmp_path):
    # Only the NUMBA_CACHE_DIR locator, and no NUMBA_CACHE_DIR: numba finds nowhere to cache (as on
    # a read-only install with no writable home); the backend must still import, under TMPDIR.
    out = _python(
        "from fastddpm.executors.numba_backend import BACKEND as B\n"
        "print(B.describe()['cache_dir'])\n",
        NUMBA_CACHE_LOCATOR_CLASSES="UserProvidedCacheLocator", NUMBA_CACHE_DIR="", TMPDIR=str(tmp_path))
    assert out.startswith(str(tmp_path)), out


@pytest.mark.parametrize("value,expected", [("1", 1), ("100000", "max")])
def test_thread_env_var(value, expected):
    out = _python(
        "import numba\n"
        "from fastddpm.executors.numba_backend import BACKEND as B\n"
        "print(B.describe()['threads'], numba.config.NUMBA_NUM_THREADS)\n",
        FASTDDPM_NUM_THREADS=value)
    threads, pool = map(int, out.split())
    assert threads == (pool if expected == "max" else expected)


def test_bad_thread_env_var_is_a_reason():
    out = _python(
        "from fastddpm.executors.numba_backend import BACKEND as B\n"
        "print(B.unavailable())\n",
        FASTDDPM_NUM_THREADS="many")
    assert "FASTDDPM_NUM_THREADS" in out and "many" in out


def test_thread_count_changes_nothing_and_is_restored():
    be = NUMBA
    s = fastddpm.DDPMScheduler()
    s.set_timesteps(20)
    t = int(s.timesteps[3])
    rng = np.random.default_rng(0)
    shape = (3, 3, 97, 101)            # above the one-thread threshold, odd sizes: partial tasks
    assert np.prod(shape) >= numba_cpu._PARALLEL_MIN
    x, m = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    caller = numba.get_num_threads()
    saved = be._threads
    try:
        results = []
        for n in (1, numba.config.NUMBA_NUM_THREADS):
            be.set_num_threads(n)
            results.append(s.step(m, t, x, seed=5, backend="numba"))
            assert numba.get_num_threads() == caller   # the caller's setting is put back
        assert np.array_equal(results[0], results[1])
        s.step(m[:1, :1, :4, :4].copy(), t, x[:1, :1, :4, :4].copy(), seed=5, backend="numba")  # one-thread path
        assert numba.get_num_threads() == caller
    finally:
        be._threads = saved
    with pytest.raises(ValueError, match="positive integer"):
        be.set_num_threads(0)


def test_one_compiled_specialisation_for_every_input_kind():
    # A read-only or unaligned array is another numba type: without care each would recompile the
    # kernel (seconds). Every kind must run on the one specialisation, with the same results.
    s = fastddpm.DDPMScheduler()
    s.set_timesteps(10)
    t = int(s.timesteps[2])
    rng = np.random.default_rng(1)
    x, m, z = (rng.standard_normal((2, 3, 5, 7), dtype=np.float32) for _ in range(3))
    want = s.step(m, t, x, seed=1, backend="numba")
    want_given = s.step(m, t, x, noise=z, backend="numba")

    ro = [a.copy() for a in (x, m, z)]
    for a in ro:
        a.flags.writeable = False
    assert np.array_equal(s.step(ro[1], t, ro[0], seed=1, backend="numba"), want)
    assert np.array_equal(s.step(ro[1], t, ro[0], noise=ro[2], backend="numba"), want_given)

    def unaligned(a):
        buf = np.empty(a.nbytes + 1, np.uint8)
        u = np.frombuffer(buf.data, np.float32, count=a.size, offset=1).reshape(a.shape)
        u[...] = a
        assert not u.flags.aligned and u.flags.c_contiguous and u.flags.writeable
        return u
    assert np.array_equal(s.step(unaligned(m), t, unaligned(x), seed=1, backend="numba"), want)
    xu = unaligned(x)
    s.step(m, t, xu, seed=1, backend="numba", out=xu)
    assert np.array_equal(xu, want)
    NUMBA.noise(3, (2, 9), 4)
    # a guided step (classifier-free guidance: the null-class output mu) is the one other
    # specialisation, whatever kind its mu is
    from fastddpm.dispatch import fused_step
    table = s.schedule().table
    row = s.row_index(t)
    want_guided = fused_step(x, m, table, row, t, seed=1, backend="numba", uncond_output=z, guidance_scale=2.5)
    assert np.array_equal(fused_step(ro[0], ro[1], table, row, t, seed=1, backend="numba", uncond_output=ro[2],
                                     guidance_scale=np.float64(2.5)), want_guided)
    assert np.array_equal(fused_step(x, m, table, row, t, seed=1, backend="numba", uncond_output=unaligned(z),
                                     guidance_scale=2.5), want_guided)
    guided = [sig for sig in numba_cpu._step_kernel.signatures if sig[-2] != numba.types.none]
    plain = [sig for sig in numba_cpu._step_kernel.signatures if sig[-2] == numba.types.none]
    assert len(plain) == 1 and len(guided) == 1, numba_cpu._step_kernel.signatures
