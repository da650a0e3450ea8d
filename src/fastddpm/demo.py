"""`python -m fastddpm.demo` (what `make demo` runs): 16 digits and their reverse trajectory.

Writes samples.png (a 4x4 grid), trajectory.gif (the 16 samples from pure static to digits) and
trajectory.png (a strip: one row per sample, one column per kept step) into the current directory
or --out, and prints where they are and how long sampling took on which backend.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastddpm.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".", help="directory for the pictures (default: here)")
    p.add_argument("-n", type=int, default=16, help="images (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=12, help="trajectory frames (default 12)")
    p.add_argument("--steps", type=int, default=None, help="DDPM steps (default: every training timestep)")
    p.add_argument("--backend", default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    import fastddpm
    from . import images as im
    from .executors import sampling_backend
    from .cli import _describe_backend
    from .pipeline import BUNDLED_MODELS, _MODELS_DIR, _cached

    out = os.path.abspath(args.out)
    if not os.path.isdir(out):
        print(f"demo: error: --out {out} is not a directory", file=sys.stderr)
        return 1
    paths = {k: os.path.join(out, k) for k in ("samples.png", "trajectory.gif", "trajectory.png")}
    try:
        for path in paths.values():
            im._check_writable(path)
    except OSError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1

    name = "digits"
    if not os.path.isdir(os.path.join(_MODELS_DIR, name)):
        # until the bundled model is trained and installed, show the machinery on random weights
        name = "bench-small"
        print("demo: the bundled 'digits' model is not installed (train it with `fastddpm train --preset "
              "digits`); using the bench-small architecture with RANDOM weights: expect noise, not digits")
    pipe = _cached(name)
    be = sampling_backend(args.backend)
    # the fallback's 1000 timesteps at 32x32 would take minutes: 50 DDPM steps show the machinery
    steps = args.steps if args.steps is not None else (None if name == "digits" else 50)
    total = len(pipe.scheduler_for("ddpm", steps).timesteps)
    keep = im.trajectory_steps(total, args.frames)
    t0 = time.perf_counter()
    res = pipe(args.n, steps=steps, seed=args.seed, backend=args.backend, progress=not args.quiet, trajectory=keep)
    seconds = time.perf_counter() - t0
    im.save_grid(res.images, paths["samples.png"])
    im.save_trajectory(res, paths["trajectory.gif"])
    im.save_trajectory(res, paths["trajectory.png"])
    h, w = pipe.image_size
    print(f"sampled {args.n} {h}x{w} images with '{name}' (DDPM, {total} steps, seed {args.seed}) in "
          f"{seconds:.1f} s on {_describe_backend(be)}")
    for k, path in paths.items():
        print(f"  {k:15s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
