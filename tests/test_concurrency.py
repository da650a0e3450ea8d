"""Many Python threads at once, on every CPU backend: nothing crashes, and every result equals the
serial result bit for bit.

Each backend runs in a child process (so an abort, such as numba's workqueue layer terminating on
concurrent access, fails the test instead of killing the suite): 4 threads sample with {the same
pipeline, two pipelines, mixed batch sizes}, while other threads call scheduler.step on the same
backend, and everything is compared with the same calls made one after another first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastddpm.executors import reasons

CHILD = r"""
import json, sys, threading, time
import numpy as np
import fastddpm
backend = sys.argv[1]
try:
    import torch
    torch.set_num_threads(1)
except ImportError:
    pass
pipes = [fastddpm.load("digits"), fastddpm.load("digits")]         # two pipelines of one model
sched = pipes[0].scheduler_for("ddim", 10)
rng = np.random.default_rng(0)
x = rng.standard_normal((3, 1, 16, 16), dtype=np.float32)
m = rng.standard_normal((3, 1, 16, 16), dtype=np.float32)
t = int(sched.timesteps[3])
# (kind, pipeline, n, seed): the same pipeline, both pipelines, batch sizes 1..3
cases = [("sample", i % 2, 1 + i % 3, i) for i in range(12)] + [("step", 0, 3, i) for i in range(8)]

def call(kind, p, n, seed):
    if kind == "sample":
        return pipes[p](n, sampler="ddim", steps=3, seed=seed, backend=backend, output="float")
    return sched.step(m, t, x, eta=1.0, seed=seed, backend=backend)

t0 = time.perf_counter()
serial = [call(*c) for c in cases]
serial_seconds = time.perf_counter() - t0
results, errors = [None] * len(cases), []

def worker(k, nthreads):
    for i in range(k, len(cases), nthreads):
        try:
            results[i] = call(*cases[i])
        except BaseException as exc:
            errors.append(repr(exc))

t0 = time.perf_counter()
threads = [threading.Thread(target=worker, args=(k, 4)) for k in range(4)]
for th in threads: th.start()
for th in threads: th.join()
seconds = time.perf_counter() - t0
same = [r is not None and np.array_equal(r, s) for r, s in zip(results, serial)]
layer = None
if backend == "numba":
    import numba
    layer = numba.threading_layer()
print(json.dumps({"cases": len(cases), "identical": sum(same), "errors": errors, "seconds": seconds, "serial_seconds": serial_seconds,
                  "layer": layer}))
"""


def _run_child(backend: str, env_extra: dict) -> dict:
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", CHILD, backend], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, (f"{backend} child died (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend,layer", [("native-cpu", None),
                                           ("numba", "workqueue"), ("numba", "default"),
                                           ("torch", None)])
@pytest.mark.slow
def test_threads_get_the_serial_results(backend, layer):
    why = reasons(backend)
    if why:
        pytest.skip(f"{backend} unavailable here: {'; '.join(why)}")
    env = {"NUMBA_THREADING_LAYER": layer} if layer else {}
    out = _run_child(backend, env)
    print(f"{backend} (numba layer {out['layer']}): {out['identical']}/{out['cases']} identical, "
          f"{len(out['errors'])} errors; the calls one after another {out['serial_seconds']:.2f} s (first calls "
          f"included), on 4 threads {out['seconds']:.2f} s")
    assert out["errors"] == []
    assert out["identical"] == out["cases"]
    if layer == "workqueue":
        assert out["layer"] == "workqueue"   # the layer that aborted on concurrent launches before
