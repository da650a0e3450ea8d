"""Latency under load: fastddpm's native engine beside ONNX Runtime (2 intra-op threads, the same
weights exported from diffusers' UNet2DModel) when the machine is not idle.

Workloads: bench-small batch 1 U-Net forward; the digits model's 50-step DDIM sample of one image.
Conditions: idle; one busy process (a busy loop this test starts and stops); 2 and 4 requests in
flight (Python threads calling at once, each fastddpm caller with its own pipeline, ONNX Runtime
callers sharing one session). Per condition and implementation: median, p90, p99 latency and the
throughput (calls per second, all callers together), and whether every output equalled the first
bit for bit. Each implementation runs in its own process (load_probe.py); within a condition the
implementations take turns in short blocks, rotating, so a drift of the machine hits them alike.

FASTDDPM_BENCH_OLD_SRC=/path/to/other/src adds that checkout's fastddpm as "fastddpm-old" (the
build before a change, for the paired comparison). Bounded: about 2-3 minutes
(FASTDDPM_BENCH_LOAD_SECONDS scales the measuring time).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
CONDITIONS = [("idle", 1, False), ("busy", 1, True), ("2 requests", 2, False), ("4 requests", 4, False)]
# per condition and implementation: blocks x seconds of measuring, per workload
BLOCKS = 3
SECONDS = {"forward": 1.0, "ddim50": 1.0}
SCALE = float(os.environ.get("FASTDDPM_BENCH_LOAD_SECONDS", "1"))


class Probe:
    def __init__(self, impl: str, src: str, onnx_dir: str):
        env = {**os.environ, "PYTHONPATH": src}
        self.impl = impl
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "load_probe.py"),
                                      "onnxruntime" if impl == "onnxruntime" else "fastddpm", onnx_dir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.impl} probe died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, workload: str, callers: int, seconds: float) -> dict:
        self.proc.stdin.write(json.dumps({"workload": workload, "callers": callers, "seconds": seconds}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info.get('model name', '?')} (family {info.get('cpu family')} model {info.get('model')})"
    except OSError:
        return "?"


@pytest.fixture(scope="module")
def probes():
    from fastddpm.executors.native import _C
    if _C is None:
        pytest.skip("fastddpm._C is not built")
    impls = {"fastddpm": SRC, "onnxruntime": SRC}
    old = os.environ.get("FASTDDPM_BENCH_OLD_SRC")
    if old:
        impls["fastddpm-old"] = os.path.abspath(old)
    skipped = {}
    with tempfile.TemporaryDirectory() as onnx_dir:
        running = {}
        try:
            for impl, src in impls.items():
                p = Probe(impl, src, onnx_dir)
                if "skip" in p.hello:
                    skipped[impl] = p.hello["skip"]
                    p.close()
                    continue
                if not p.hello["check"]["ok"]:
                    pytest.fail(f"FAIL {impl}: answers differ from fastddpm's engine: {p.hello['check']}")
                running[impl] = p
            yield running, skipped
        finally:
            for p in running.values():
                p.close()


def _stats(lat: list, wall_total: float, calls: int) -> dict:
    ms = np.array(lat) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "calls": calls, "throughput_per_s": calls / wall_total}


@pytest.mark.parametrize("workload", ["forward", "ddim50"])
def test_latency_under_load(benchmark, probes, workload):
    running, skipped = probes
    if "onnxruntime" in skipped:
        print(f"onnxruntime row skipped: {skipped['onnxruntime']}")
    results = {}
    order = list(running)

    def measure():
        for cond, callers, busy in CONDITIONS:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                lat = {i: [] for i in running}
                wall = {i: 0.0 for i in running}
                same = {i: True for i in running}
                for _ in range(BLOCKS):
                    for impl in order:
                        r = running[impl].run(workload, callers, SECONDS[workload] * SCALE)
                        lat[impl] += r["latencies"]
                        wall[impl] += r["wall"]
                        same[impl] &= r["identical"]
                    order.append(order.pop(0))
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            results[cond] = {i: {**_stats(lat[i], wall[i], len(lat[i])), "identical": same[i]} for i in running}

    benchmark.group = f"latency under load {workload}"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(kind="load", workload=workload, cpu=_cpu_name(), conditions=results,
                                skipped=skipped)
    print(f"\n{workload} on {_cpu_name()}")
    for cond, row in results.items():
        for impl, s in row.items():
            print(f"  {cond:11s} {impl:12s} median {s['median_ms']:8.2f} ms  p90 {s['p90_ms']:8.2f}  "
                  f"p99 {s['p99_ms']:8.2f}  {s['throughput_per_s']:7.1f}/s  {s['calls']:5d} calls"
                  f"{'' if s['identical'] else '  OUTPUTS DIFFER'}")
    for cond, row in results.items():
        for impl, s in row.items():
            if impl.startswith("fastddpm") and not s["identical"]:
                pytest.fail(f"FAIL {impl} {cond}: an output differed from the first call's")
