"""The U-Net forward, interleaved: native and its baselines timed round by round.

A machine whose speed drifts under sustained load (a shared VM, thermal or power limits) can run
rows timed one after the other (test_bench_unet.py) at different speeds, which skews their ratio.
Here each round times one call of every implementation (native, native-direct, torch eager,
torch.compile, ONNX Runtime), in an order that rotates from round to round, and a speed-up is the
median of the per-round ratios: both sides of each ratio ran within a second of each other. Each
timed call follows an untimed call of the same implementation: ONNX Runtime's and OpenMP's worker
threads spin for a while after a call returns, on the cores the next implementation is about to
use, which slowed whichever implementation came next (measured on a Zen 2: native's cifar10 b1
forward 94 ms when timed right after another implementation, 65 ms back to back).
Answers are checked before anything is timed; a baseline that cannot run here (ONNX Runtime not
installed) is left out of the rounds and named in extra_info["skipped"]. The pytest-benchmark
statistics of these tests are of a whole round (all implementations); the per-implementation
medians and the paired ratios are in extra_info, and benchmarks/report.py renders them.
"""
import time

import numpy as np
import pytest

from fastddpm.executors.native import _C
from fastddpm.unet_config import flops

from test_bench_unet import FORWARD, _setup, check_answer, check_sample_paths_agree, forward_fn

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

IMPLS = ["native", "native-direct", "torch-eager", "torch-compile", "onnxruntime"]
BASELINES = ["native-direct", "torch-eager", "torch-compile", "onnxruntime"]


@pytest.mark.parametrize("model,batch", FORWARD, ids=[f"{m}-b{b}" for m, b in FORWARD])
def test_forward_paired(benchmark, model, batch, monkeypatch):
    if _C is None:
        pytest.skip("fastddpm._C is not built")
    cfg, w, x, ref, expected = _setup(model, batch)
    fns, skipped = {}, {}
    for name in IMPLS:  # forward_fn reads FASTDDPM_WINOGRAD when it builds a native engine
        try:
            fns[name] = forward_fn(name, cfg, w, x, ref, batch, monkeypatch)
        except pytest.skip.Exception as why:      # a baseline that cannot run here: the others still do
            skipped[name] = str(why)
            continue
        check_answer(name, fns[name](), expected)
    times = {name: [] for name in fns}
    order = list(fns)
    warm = []  # empty during pytest-benchmark's warm-up round

    def one_round():
        for name in order:
            fns[name]()   # untimed: the previous implementation's threads stop spinning meanwhile
            t0 = time.perf_counter()
            fns[name]()
            if warm:
                times[name].append(time.perf_counter() - t0)
        warm.append(True)
        order.append(order.pop(0))  # rotate, so no implementation always follows the same one

    rounds = 20 if model == "bench-small" and batch == 1 else 6
    benchmark.group = f"paired forward {model} b{batch}"
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    t = {name: np.array(v) for name, v in times.items()}
    benchmark.extra_info.update(
        kind="paired", model=model, batch=batch, gflop=flops(cfg, batch) / 1e9, rounds=rounds,
        medians_ms={name: float(np.median(v) * 1e3) for name, v in t.items()},
        paired={b: float(np.median(t[b] / t["native"])) for b in BASELINES if b in t}, skipped=skipped)
    for name, why in skipped.items():
        print(f"{model} b{batch}: {name} skipped: {why}")


def test_sample_1000_steps_paired(benchmark):
    """fastddpm.sample of one bench-small image, 1000 DDPM steps: native-cpu and the reference
    sampler (backend="torch") alternately, two rounds."""
    import fastddpm
    if _C is None:
        pytest.skip("fastddpm._C is not built")
    pipe = fastddpm.load("bench-small")
    check_sample_paths_agree(pipe)
    times = {"native": [], "reference": []}
    order = ["native", "reference"]

    def one_round():
        for name in order:
            t0 = time.perf_counter()
            pipe(1, steps=1000, seed=0, backend="native-cpu" if name == "native" else "torch")
            times[name].append(time.perf_counter() - t0)
        order.reverse()

    benchmark.group = "paired sample bench-small 1 image 1000 steps"
    benchmark.pedantic(one_round, rounds=2, iterations=1)
    t = {name: np.array(v) for name, v in times.items()}
    benchmark.extra_info.update(
        kind="paired", model="bench-small", batch=1, rounds=2,
        gflop=1000 * flops(pipe.unet_config, 1) / 1e9,
        medians_ms={name: float(np.median(v) * 1e3) for name, v in t.items()},
        paired={"reference": float(np.median(t["reference"] / t["native"]))})
