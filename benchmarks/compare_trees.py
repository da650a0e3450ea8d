"""Time the same public calls on two checkouts of fastddpm, interleaved, to show what a change
costs: `python benchmarks/compare_trees.py OLD_SRC NEW_SRC [--rounds R]` (each a src/ directory
with its extensions built in place). Each round runs one subprocess per tree, in alternating order;
each subprocess reports the median of its repeats per call; the table gives, per call, each tree's
median over the rounds and the median of the per-round ratios new/old (< 1: the new tree is faster).
The answers of both trees are compared first (the same bits), so a speed-up that changed a result
does not count."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROBE = r'''
import json, sys, time, hashlib
import numpy as np
import fastddpm

def med(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return float(np.median(ts))

pipe = fastddpm.load("bench-small")
x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
x16 = np.random.default_rng(0).standard_normal((16, 1, 32, 32)).astype(np.float32)
digits = fastddpm.load("digits")
sched = fastddpm.DDPMScheduler()
big = np.random.default_rng(1).standard_normal((3, 64, 3, 256, 256)).astype(np.float32)
small = np.random.default_rng(2).standard_normal((3, 1, 1, 32, 32)).astype(np.float32)
calls = {
    "unet forward bench-small b1 (native-cpu)": (lambda: pipe.unet(x, 500, backend="native-cpu"), 40),
    "unet forward bench-small b16 (native-cpu)": (lambda: pipe.unet(x16, 500, backend="native-cpu"), 8),
    "step 64x3x256x256 (native-cpu)": (lambda: sched.step(big[1], 500, big[0], seed=1, backend="native-cpu", out=big[2]), 20),
    "step 1x1x32x32 (native-cpu)": (lambda: sched.step(small[1], 500, small[0], seed=1, backend="native-cpu", out=small[2]), 3000),
    "sample digits n=1 ddim 20 (native-cpu)": (lambda: fastddpm.sample("digits", 1, sampler="ddim", steps=20, backend="native-cpu"), 15),
    "sample digits n=1 ddim 20 (numba)": (lambda: fastddpm.sample("digits", 1, sampler="ddim", steps=20, backend="numba"), 5),
}
answers = hashlib.sha256()
for fn, _ in calls.values():
    out = fn()
    answers.update(np.ascontiguousarray(out if out is not None else big[2]).tobytes())
print(json.dumps({"answers": answers.hexdigest(), **{k: med(fn, r) for k, (fn, r) in calls.items()}}))
'''


def run(src: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows: dict[str, list] = {}
    for r in range(args.rounds):
        order = (args.old, args.new) if r % 2 == 0 else (args.new, args.old)
        got = {src: run(src) for src in order}
        old, new = got[args.old], got[args.new]
        if old.pop("answers") != new.pop("answers"):
            print("the two trees give different answers: not comparable", file=sys.stderr)
            return 1
        for k in old:
            rows.setdefault(k, []).append((old[k], new[k]))
    print(f"| call | old median | new median | new/old (median of {args.rounds} paired rounds) |")
    print("|---|---|---|---|")
    for k, pairs in rows.items():
        o = statistics.median(p[0] for p in pairs)
        n = statistics.median(p[1] for p in pairs)
        ratio = statistics.median(p[1] / p[0] for p in pairs)
        print(f"| {k} | {o * 1e3:.3f} ms | {n * 1e3:.3f} ms | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
