"""One implementation's side of test_bench_load.py, in its own process (so another checkout of
fastddpm can be timed beside this one): `python load_probe.py IMPL [ONNX_DIR]`, IMPL "fastddpm"
(whichever fastddpm PYTHONPATH finds) or "onnxruntime" (the same weights exported from diffusers'
UNet2DModel, 2 intra-op threads). It checks its answers, prints one JSON line, then answers
commands, one JSON object per line on stdin -> one JSON line on stdout:

    {"workload": "forward" | "ddim50", "callers": k, "seconds": s}

k Python threads call the workload in a loop for s seconds; the reply holds every call's latency,
the calls finished and whether every output equalled the first (bit for bit). Workloads:
bench-small batch 1 U-Net forward; the digits model's 50-step DDIM sample of one image (ONNX
Runtime: its U-Net + the same DDIM arithmetic in NumPy, from fastddpm's coefficient table)."""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np

import fastddpm

SEED = 3


def _fastddpm():
    """{workload: a factory of per-caller callables}: each caller gets its own pipeline (pipelines
    serialise calls on one engine; several pipelines are several requests)."""
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32), dtype=np.float32)

    def forward():
        pipe = fastddpm.load("bench-small")
        return lambda: pipe.unet(x, 500, backend="native-cpu")

    def ddim50():
        pipe = fastddpm.load("digits")
        return lambda: pipe(1, sampler="ddim", steps=50, seed=SEED, backend="native-cpu", output="float")

    return {"forward": forward, "ddim50": ddim50}


def _onnxruntime(onnx_dir: str):
    from _onnx import export_unet, session as ort_session

    def session(name, shape):
        path = os.path.join(onnx_dir, f"{name}.onnx")
        if not os.path.exists(path):
            pipe = fastddpm.load(name)
            export_unet(pipe.unet_config, pipe.weights, path, shape)
        return ort_session(path)

    small, digits = session("bench-small", (1, 1, 32, 32)), session("digits", (1, 1, 16, 16))
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32), dtype=np.float32)
    sched = fastddpm.load("digits").scheduler_for("ddim", 50).schedule(eta=0.0)
    table, steps = sched.table, [int(t) for t in sched.timesteps]
    from fastddpm.coefficients import A_M, A_X, C_X0, CLIP, D_M, D_X
    x_t = fastddpm.noise(SEED, (1, 1, 16, 16), -1)

    def ddim():
        # fastddpm's fused step, term for term (eta = 0: no noise), around ORT's U-Net
        x = x_t.copy()
        for row, t in zip(table, steps):
            m = digits.run(None, {"x": x, "t": np.array([t], np.float32)})[0]
            x0 = row[A_X] * x + row[A_M] * m
            if row[CLIP] > 0:
                x0 = np.clip(x0, -row[CLIP], row[CLIP])
            x = row[C_X0] * x0 + row[D_X] * x + row[D_M] * m
        return x

    forward = lambda: small.run(None, {"x": x, "t": np.array([500.0], np.float32)})[0]  # noqa: E731
    return {"forward": lambda: forward, "ddim50": lambda: ddim}


def _check(impl, fns) -> dict:
    """The answers against the fastddpm engine of this process's tree (ORT) or its own serial ones."""
    if impl != "onnxruntime":
        return {"ok": True}
    ref = _fastddpm()
    f = fns["forward"]()()
    f_ref = ref["forward"]()()
    rel = float(np.linalg.norm(f - f_ref) / np.linalg.norm(f_ref))
    d = fns["ddim50"]()()
    d_ref = ref["ddim50"]()()
    diff = float(np.abs(d - d_ref).max())
    return {"ok": rel <= 1e-4 and diff <= 1e-3, "forward_rel_l2": rel, "ddim50_max_abs": diff}


def _measure(fns, workload: str, callers: int, seconds: float) -> dict:
    makers = [fns[workload]() for _ in range(callers)]
    first = makers[0]()          # warm every caller's engine; the reference output
    for f in makers[1:]:
        f()
    lat, same, lock = [], [True], threading.Lock()
    stop = time.perf_counter() + seconds

    def loop(f):
        mine = []
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            out = f()
            mine.append(time.perf_counter() - t0)
            if not np.array_equal(out, first):
                same[0] = False
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=loop, args=(f,)) for f in makers]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return {"latencies": lat, "wall": time.perf_counter() - t0, "identical": same[0]}


def main() -> int:
    impl = sys.argv[1]
    try:
        fns = _onnxruntime(sys.argv[2]) if impl == "onnxruntime" else _fastddpm()
    except ImportError as exc:
        print(json.dumps({"skip": f"{impl} is not importable here ({exc})"}), flush=True)
        return 0
    print(json.dumps({"check": _check(impl, fns)}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        print(json.dumps(_measure(fns, cmd["workload"], cmd["callers"], cmd["seconds"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
