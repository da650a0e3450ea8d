"""The CUDA U-Net engine on the GPU next to the PyTorch reference: one forward, and whole 1000-step
DDPM sampling, for bench-small (batch 1 and 64) and ddpm-cifar10 (batch 1 and 256).

Rows: "native-cuda" (the engine in tf32, fp32 and bf16), "torch-eager" (fastddpm.reference
ReferenceUNet in fp32, TF32 off) and "torch-compile" (the same module under
torch.compile(mode="reduce-overhead")). A sampling row is the whole loop: the engine replays its
captured step graph; the torch rows run reference_sample (spec noise made in torch). extra_info:
kind (forward / sample), impl, dtype, model, batch, steps, gflop (forward multiply-adds x 2, from
the plan). Every forward is checked against the fp32 reference before it is timed.
All rows are `cuda`-marked: skipped without a GPU.

To fit a GPU lease: the sampling rows run the batch-1 cases only, and torch.compile (a minute of
compilation per shape) runs on bench-small batch 1 only, unless FASTDDPM_BENCH_COMPILE=all.
FASTDDPM_BENCH_STEPS sets the sampling rows' steps (default 1000).
"""
import os

import numpy as np
import pytest

import fastddpm
from _gpu import gpu_reason  # benchmarks/ is on sys.path under pytest

CASES = [("bench-small", 1), ("bench-small", 64), ("ddpm-cifar10", 1), ("ddpm-cifar10", 256)]
SAMPLE_CASES = [c for c in CASES if c[1] == 1]
STEPS = int(os.environ.get("FASTDDPM_BENCH_STEPS", "1000"))
COMPILE_ALL = os.environ.get("FASTDDPM_BENCH_COMPILE", "") == "all"
IMPLS = ["native-cuda:tf32", "native-cuda:fp32", "native-cuda:bf16", "torch-eager", "torch-compile"]
TOL = {"fp32": 1e-4, "tf32": 3e-3, "bf16": 3e-2}


_NO_GPU = gpu_reason("native-cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_NO_GPU is not None, reason=f"no usable GPU: {_NO_GPU}")]


def forward_gflop(plan) -> float:
    """Multiply-adds x 2 of one forward as the plan defines it (nominal 3x3 convs, attention)."""
    flop = 0
    for op in plan.ops:
        hw = op.h * op.w
        if op.kind == "LINEAR":
            flop += 2 * op.c_in * op.c_out
        elif op.kind == "CONV":
            out_hw = {0: hw, 1: hw, 2: hw // 4, 3: hw // 4, 4: hw * 4}[op.mode]
            k = 1 if op.mode == 1 else 9
            flop += 2 * op.c_out * (op.c_in * k + op.c_in2) * out_hw
        elif op.kind == "ATTENTION":
            flop += 2 * 4 * op.c_in * op.c_in * hw + 2 * 2 * hw * hw * op.c_in
    return flop * plan.batch / 1e9


def _setup(name, batch):
    import torch
    from fastddpm.plan import build_plan
    pipe = fastddpm.load(name)
    h, w = pipe.image_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, pipe.unet_config.in_channels, h, w)).astype(np.float32)
    t = np.full(batch, 500, np.float32)
    plan = build_plan(pipe.unet_config, batch, h, w)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return pipe, x, t, forward_gflop(plan)


def _record(benchmark, kind, impl, dtype, name, batch, gflop, steps=1):
    import torch
    benchmark.group = f"cuda unet {kind} {name} b{batch}"
    benchmark.extra_info.update(kind=kind, impl=impl, dtype=dtype, model=name, batch=batch, steps=steps,
                                gflop=gflop * steps, baseline="torch-eager",
                                device=torch.cuda.get_device_name(0))


def _skip_compile(impl, name, batch):
    if impl == "torch-compile" and not COMPILE_ALL and (name, batch) != ("bench-small", 1):
        pytest.skip("torch.compile runs on bench-small batch 1 only (FASTDDPM_BENCH_COMPILE=all for every case)")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name,batch", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, name, batch, impl):
    import torch
    _skip_compile(impl, name, batch)
    from fastddpm.executors import EngineOptions
    from fastddpm.executors.native_cuda import CUDA_BACKEND
    pipe, x, t, gflop = _setup(name, batch)
    ref = pipe.reference_unet("cuda")
    xt, tt = torch.from_numpy(x).cuda(), torch.from_numpy(t).cuda()
    with torch.no_grad():
        want = ref(xt, tt).cpu().numpy()
    if impl.startswith("native-cuda"):
        dtype = impl.split(":")[1]
        eng = CUDA_BACKEND.make_engine(pipe.unet_config, pipe.weights, batch, *pipe.image_size, EngineOptions(dtype=dtype))
        out = torch.empty_like(xt)
        eng._engine.forward_ptr(xt.data_ptr(), tt.data_ptr(), out.data_ptr(), torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        err = _rel(out.cpu().numpy(), want)
        assert err <= TOL[dtype], f"{impl}: rel L2 {err:.3g}"

        def run():
            eng._engine.forward_ptr(xt.data_ptr(), tt.data_ptr(), out.data_ptr(),
                                    torch.cuda.current_stream().cuda_stream)
            torch.cuda.synchronize()
        impl_name, dt = "native-cuda", dtype
    else:
        fn = ref if impl == "torch-eager" else torch.compile(ref, mode="reduce-overhead")

        def run():
            with torch.no_grad():
                fn(xt, tt)
            torch.cuda.synchronize()
        for _ in range(3):  # compile / capture outside the timing
            run()
        impl_name, dt = impl, "fp32"
    _record(benchmark, "forward", impl_name, dt, name, batch, gflop)
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("name,batch", SAMPLE_CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_sample_1000_steps(benchmark, name, batch, impl):
    import torch
    _skip_compile(impl, name, batch)
    from fastddpm.reference import reference_sample
    pipe, x, t, gflop = _setup(name, batch)
    if impl.startswith("native-cuda"):
        dtype = impl.split(":")[1]
        s = pipe.sampler(batch, sampler="ddpm", steps=STEPS, dtype=dtype, backend="native-cuda")
        s(seed=0)  # capture outside the timing

        def run():
            s(seed=1)
        impl_name, dt = "native-cuda", dtype
    else:
        ref = pipe.reference_unet("cuda")
        fn = ref if impl == "torch-eager" else torch.compile(ref, mode="reduce-overhead")
        sched = pipe.scheduler_for("ddpm", STEPS)
        shape = (batch, pipe.unet_config.in_channels, *pipe.image_size)

        def unet(xx, tt):
            return fn(xx, torch.full((batch,), tt, device="cuda", dtype=torch.float32))

        def run():
            reference_sample(unet, sched, shape, seed=1, device="cuda")
            torch.cuda.synchronize()
        if impl == "torch-compile":
            with torch.no_grad():
                for _ in range(3):
                    unet(torch.from_numpy(x).cuda(), 500)
        impl_name, dt = impl, "fp32"
    _record(benchmark, "sample", impl_name, dt, name, batch, gflop, steps=STEPS)
    benchmark.pedantic(run, rounds=1, iterations=1)
