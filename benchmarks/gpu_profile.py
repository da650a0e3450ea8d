"""Where a CUDA forward spends its time: per plan op, from the engine's own CUDA-event profiling
(Engine.set_profiling / op_seconds), summed by op kind, with the slowest ops listed.

    python benchmarks/gpu_profile.py [model:batch:dtype ...]   (default: bench-small:1:tf32
                                                                 ddpm-cifar10:1:tf32 ddpm-cifar10:256:tf32)
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict

import numpy as np

import fastddpm
from fastddpm.executors import EngineOptions  # noqa: E402
from fastddpm.executors.native_cuda import CUDA_BACKEND
from fastddpm.plan import build_plan

REPEATS = 10


def describe(op) -> str:
    if op.kind == "CONV":
        return f"CONV mode {op.mode} {op.c_in}+{op.c_in2}->{op.c_out} @{op.h}x{op.w}"
    if op.kind in ("GROUPNORM", "PAD", "ATTENTION"):
        return f"{op.kind} {op.c_in}+{op.c_in2} @{op.h}x{op.w}"
    return f"{op.kind} {op.c_in}->{op.c_out}"


def profile(name: str, batch: int, dtype: str) -> None:
    pipe = fastddpm.load(name)
    h, w = pipe.image_size
    plan = build_plan(pipe.unet_config, batch, h, w)
    eng = CUDA_BACKEND.make_engine(pipe.unet_config, pipe.weights, batch, h, w, EngineOptions(dtype=dtype))
    x = np.random.default_rng(0).standard_normal((batch, pipe.unet_config.in_channels, h, w)).astype(np.float32)
    t = np.full(batch, 500, np.float32)
    for _ in range(3):
        eng.forward(x, t)
    t0 = time.perf_counter()
    for _ in range(REPEATS):
        eng.forward(x, t)
    wall = (time.perf_counter() - t0) / REPEATS
    eng._engine.set_profiling(True)
    for _ in range(REPEATS):
        eng.forward(x, t)
    secs = np.array(eng._engine.op_seconds) / REPEATS
    eng._engine.set_profiling(False)
    by_kind = defaultdict(float)
    for op, s in zip(plan.ops, secs):
        by_kind[op.kind] += s
    print(f"\n{name} b{batch} {dtype}: host forward {wall * 1e3:.3f} ms, ops {secs.sum() * 1e3:.3f} ms "
          f"({len(plan.ops)} ops)")
    for kind, s in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:10s} {s * 1e3:8.3f} ms  {100 * s / secs.sum():5.1f} %")
    print("  slowest ops:")
    for i in np.argsort(-secs)[:8]:
        print(f"    {secs[i] * 1e6:8.1f} us  op {i:3d} {describe(plan.ops[i])}")


def main(argv) -> int:
    specs = argv or ["bench-small:1:tf32", "ddpm-cifar10:1:tf32", "ddpm-cifar10:256:tf32"]
    for spec in specs:
        name, batch, dtype = spec.split(":")
        profile(name, int(batch), dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
