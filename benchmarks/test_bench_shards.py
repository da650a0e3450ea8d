"""Sharded sampling to disk: what the orchestration costs, and a projection for a 50,000-image run.

- test_shards_ray_vs_one_process: 2,000 digits images (DDIM, FASTDDPM_BENCH_SHARD_STEPS steps,
  default 20; shards of 250) written by sample_to_disk, on 2 Ray workers x 1 thread (a local Ray
  instance, loopback only) and in one process with 2 threads, interleaved A, B, A, B, ... The
  answer is checked first: both runs' shards are identical and equal one sample() call on their
  first shard. extra_info: each side's seconds, the per-pair ratios and their median
  (one-process time / Ray time: >= 0.9 means the orchestration costs almost nothing).
- test_projected_hours_ddpm_cifar10: one worker's seconds per image and step of the ddpm-cifar10
  architecture (native engine, 1 thread, batch 8), projected to 50,000 images x 1000 DDPM steps.
"""
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import pytest

import fastddpm
from fastddpm.executors.native import _C
from fastddpm.shards import read_shards, sample_to_disk

N, SHARD = 2000, 250
STEPS = int(os.environ.get("FASTDDPM_BENCH_SHARD_STEPS", "20"))
PAIRS = int(os.environ.get("FASTDDPM_BENCH_SHARD_PAIRS", "3"))


def test_shards_ray_vs_one_process(benchmark):
    ray = pytest.importorskip("ray", reason="Ray is the optional extra fastddpm[ray]")
    if _C is None:
        pytest.skip("fastddpm._C is not built")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    root = tempfile.mkdtemp(prefix="bench-shards-")
    opts = dict(seed=0, shard_size=SHARD, sampler="ddim", steps=STEPS)
    try:
        def run(kind, tag):
            out = os.path.join(root, f"{kind}-{tag}")
            t0 = time.perf_counter()
            if kind == "ray":
                sample_to_disk("digits", N, out, cluster="ray", threads=1, **opts)
            else:
                sample_to_disk("digits", N, out, **opts)
            return time.perf_counter() - t0, out

        _, a = run("local", "check")
        _, b = run("ray", "check")
        first = read_shards(a)
        np.testing.assert_array_equal(read_shards(b), first)
        np.testing.assert_array_equal(first[:SHARD], fastddpm.sample(n=SHARD, seed=0, sampler="ddim", steps=STEPS))
        times = {"local": [], "ray": []}

        def pairs():
            for i in range(PAIRS):
                for kind in (("local", "ray") if i % 2 == 0 else ("ray", "local")):
                    sec, out = run(kind, i)
                    times[kind].append(sec)
                    shutil.rmtree(out)

        benchmark.pedantic(pairs, rounds=1, iterations=1)
        ratios = [lo / ra for lo, ra in zip(times["local"], times["ray"])]
        benchmark.group = "shards 2000 digits"
        benchmark.extra_info.update(
            kind="shards", images=N, steps=STEPS, shard_size=SHARD,
            one_process_2_threads_s=times["local"], ray_2_workers_1_thread_s=times["ray"],
            median_one_process_s=statistics.median(times["local"]), median_ray_s=statistics.median(times["ray"]),
            throughput_ratio_ray_vs_one_process=statistics.median(ratios), pair_ratios=ratios)
        print(f"one process x 2 threads {statistics.median(times['local']):.2f} s, 2 Ray workers x 1 thread "
              f"{statistics.median(times['ray']):.2f} s: Ray throughput {statistics.median(ratios):.2f}x")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def test_projected_hours_ddpm_cifar10(benchmark):
    if _C is None:
        pytest.skip("fastddpm._C is not built")
    from fastddpm.executors.native import CPU_BACKEND
    pipe = fastddpm.load("ddpm-cifar10")
    batch, steps = 8, 3
    threads = _C.num_threads()
    CPU_BACKEND.set_num_threads(1)
    try:
        pipe(batch, steps=steps, seed=0, backend="native-cpu")   # the engine, warm
        result = {}

        def run():
            t0 = time.perf_counter()
            pipe(batch, steps=steps, seed=1, backend="native-cpu")
            result["s"] = time.perf_counter() - t0
        benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        CPU_BACKEND.set_num_threads(threads)
    per_image_step = benchmark.stats.stats.median / (batch * steps)
    hours = per_image_step * 1000 * 50_000 / 3600
    benchmark.group = "shards projection"
    benchmark.extra_info.update(kind="projection", model="ddpm-cifar10", threads=1, batch=batch,
                                seconds_per_image_step=per_image_step, projected_hours_50k_ddpm1000=hours)
    print(f"ddpm-cifar10, 1 thread: {per_image_step * 1e3:.1f} ms per image and step -> "
          f"{hours:.0f} h for 50,000 images x 1000 DDPM steps on one worker")
