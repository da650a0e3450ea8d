"""PyTorch is optional at run time: with `import torch` made to fail, fastddpm imports, samples on
the numba and native-cpu engines, and loads and samples a saved directory (safetensors.numpy)."""
import os
import subprocess
import sys
import textwrap

import pytest

_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

# Runs in a fresh interpreter: a meta-path finder in front of every other one refuses torch (and
# its submodules) before fastddpm is imported, and counts the attempts.
_SCRIPT = textwrap.dedent(r"""
    import importlib.abc, sys, tempfile

    class NoTorch(importlib.abc.MetaPathFinder):
        attempts = 0
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                NoTorch.attempts += 1
                raise ImportError("torch is blocked by test_no_torch")
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
        raise SystemExit("the torch block does not work")
    except ImportError:
        pass

    import numpy as np
    import fastddpm

    backends = [b for b in sys.argv[1:]]
    ran = []
    for be in backends:
        imgs = fastddpm.sample("bench-small", backend=be, steps=3)
        assert imgs.shape == (1, 32, 32, 1) and imgs.dtype == np.uint8, (be, imgs.shape, imgs.dtype)
        out = fastddpm.load("bench-small").unet(np.zeros((1, 1, 32, 32), np.float32), 10, backend=be)
        assert out.shape == (1, 1, 32, 32) and np.all(np.isfinite(out))
        ran.append(be)

    # save -> load (weights through safetensors.numpy) -> sample, on the first backend
    with tempfile.TemporaryDirectory() as d:
        fastddpm.load("bench-small").save(d + "/m")
        pipe = fastddpm.load(d + "/m")
        a = pipe(2, steps=2, seed=3, backend=backends[0], output="float")
        b = fastddpm.load("bench-small")(2, steps=2, seed=3, backend=backends[0], output="float")
        assert np.array_equal(a, b), "a saved and reloaded model samples differently"

    leaked = [m for m, v in sys.modules.items() if (m == "torch" or m.startswith("torch.")) and v is not None]
    assert not leaked, leaked
    print("OK", ",".join(ran), "torch import attempts:", NoTorch.attempts)
""")


def test_sampling_without_torch():
    from fastddpm.executors import get
    names = [n for n in ("numba", "native-cpu")
             if not isinstance(get(n), str) and not get(n).unavailable() and hasattr(get(n), "make_engine")]
    if "numba" not in names:
        pytest.skip("the numba backend is unavailable here")
    pytest.importorskip("scipy")         # the numba engine's GEMMs go through SciPy's BLAS
    env = dict(os.environ, PYTHONPATH=_SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *names], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"OK {','.join(names)}" in proc.stdout, proc.stdout
