"""The ``fastddpm`` command (also ``python -m fastddpm``): sample, train, bench, info.

    fastddpm sample -n 16 -o samples.png --trajectory trajectory.gif
    fastddpm sample -m my-conditional-model --label all -n 8 --guidance 3 -o classes.png
    fastddpm train --preset digits
    fastddpm train --dataset ./photos --channels 3 --image-size 32 --steps 20000 --out my-model
    fastddpm bench
    fastddpm app                       # the web app on http://127.0.0.1:7860
    fastddpm info

Exit codes: 0 done, 1 the request failed (message on stderr), 2 bad arguments, 130 interrupted.
Outputs are checked before any work starts and written atomically, so a failure leaves no
half-written file behind.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

__all__ = ["main", "build_parser"]

PROG = "fastddpm"


class CliError(Exception):
    """A failure to report as one line on stderr with exit code 1."""


# ---------------------------------------------------------------------- argument types

def _int_at_least(low: int, what: str):
    """An argparse type: an int >= low, else a one-line usage error saying `what` was expected."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _finite_float(s: str) -> float:
    import math
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    v = _finite_float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


def _int_list(s: str) -> list[int]:
    try:
        out = [int(p) for p in s.replace(" ", "").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return out


def _labels_arg(s: str):
    """--label: 'all', or one label or a comma list (integers; numbers for a 'timestep' model)."""
    if s.strip().lower() == "all":
        return "all"
    out = []
    for p in s.replace(" ", "").split(","):
        if not p:
            continue
        try:
            out.append(int(p))
        except ValueError:
            try:
                v = float(p)
            except ValueError:
                v = float("nan")
            if v != v or v in (float("inf"), float("-inf")):
                raise argparse.ArgumentTypeError(f"expected a class label, a comma list of labels or 'all', "
                                                 f"got {s!r}") from None
            out.append(v)
    if not out:
        raise argparse.ArgumentTypeError(f"expected a class label, a comma list of labels or 'all', got {s!r}")
    return out


def _float_list(s: str) -> list[float]:
    try:
        return [float(p) for p in s.replace(" ", "").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


# ---------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .schedulers import SAMPLERS
    p = argparse.ArgumentParser(prog=PROG, description="fastddpm: fast DDPM sampling, training and benchmarks.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("sample", help="sample images and write them as a PNG grid",
                       description="Sample images with a model and write them as a grid picture.")
    s.add_argument("-m", "--model", default=None,
                   help="bundled name (digits), preset (bench-small, ddpm-cifar10) or a diffusers model "
                        "directory (default: the bundled digits model)")
    s.add_argument("-n", "--num", "--n", dest="n", type=_positive_int, default=16, help="images (default 16)")
    s.add_argument("--sampler", choices=tuple(SAMPLERS), default=None,
                   help="default: cm for a consistency model, else ddpm")
    s.add_argument("--steps", type=_positive_int, default=None,
                   help="sampling steps (default: every training timestep for ddpm, 50 for ddim)")
    s.add_argument("--eta", type=_nonneg_float, default=0.0, help="DDIM eta (0: deterministic)")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--label", type=_labels_arg, default=None, metavar="LABELS",
                   help="a class-conditional model's class: one label, a comma list or 'all' (every class "
                        "but the null class); -n images per class, one grid row per class")
    s.add_argument("--guidance", type=_nonneg_float, default=None, metavar="W",
                   help="classifier-free guidance scale (default: the model's; 1: none)")
    s.add_argument("--backend", default="auto", help="auto, native-cpu, numba, torch, native-cuda")
    s.add_argument("-o", "--output", default="samples.png", help="grid picture (default samples.png)")
    s.add_argument("--nrow", type=_positive_int, default=None, help="images per grid row")
    s.add_argument("--scale", type=_positive_int, default=None,
                   help="enlarge by this whole factor (default: images at least 64 px tall)")
    s.add_argument("--trajectory", nargs="?", const="trajectory.gif", default=None, metavar="PATH",
                   help="also write the reverse trajectory: PATH as a GIF and beside it a PNG strip "
                        "(same name, .png); default trajectory.gif")
    s.add_argument("--frames", type=_positive_int, default=12, help="trajectory frames (default 12)")
    s.add_argument("--npy", default=None, metavar="PATH", help="also save the uint8 array as .npy")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="sample a data set into DIR instead: one .npz (uint8 [k, H, W, C]) per shard and a "
                        "manifest; rerunning the same command resumes (see --shard-size, --ray, --png)")
    s.add_argument("--shard-size", type=_positive_int, default=1000, help="images per shard (default 1000)")
    s.add_argument("--ray", nargs="?", const="ray", default=None, metavar="ADDRESS",
                   help="with --out: one Ray task per shard, on a local Ray instance or the cluster at ADDRESS")
    s.add_argument("--threads", type=_positive_int, default=None, help="with --ray: threads per shard task")
    s.add_argument("--png", action="store_true", help="with --out: also one PNG per image in DIR/png")
    s.set_defaults(func=cmd_sample)

    t = sub.add_parser("train", help="train a DDPM (PyTorch) and save it in diffusers' layout",
                       description="Train the reference U-Net on a dataset; saves the EMA weights as a "
                                   "diffusers model directory (fastddpm.load and DDPMPipeline load it).")
    t.add_argument("--preset", default=None,
                   help="start from a preset (digits, digits-cond: the bundled models)")
    t.add_argument("--out", default=None,
                   help="model directory (required without --preset; --preset digits / digits-cond: the "
                        "bundled model's)")
    t.add_argument("--work-dir", default=None,
                   help="checkpoint, loss.csv/png, train_config.json (default OUT/training; "
                        "--preset digits / digits-cond: runs/PRESET)")
    t.add_argument("--resume", action="store_true", help="continue from the work directory's checkpoint")
    g = t.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="'digits' or a folder of images")
    g.add_argument("--image-size", type=_positive_int, default=None)
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="folder datasets: 1 gray, 3 RGB")
    g = t.add_argument_group("model")
    g.add_argument("--unet-config", default=None, metavar="JSON", help="a UNet2DModel config.json")
    g.add_argument("--block-out-channels", type=_int_list, default=None, metavar="C0,C1,...")
    g.add_argument("--layers-per-block", type=_positive_int, default=None)
    g.add_argument("--attention-levels", type=_int_list_or_none, default=None, metavar="I,J",
                   help="0-based resolution levels with attention ('none' for no attention)")
    g.add_argument("--norm-groups", type=_positive_int, default=None)
    g.add_argument("--num-class-embeds", type=_positive_int, default=None, metavar="K",
                   help="class-conditional: a table of K class embeddings (the dataset's classes, "
                        "+1 for the null class with --cond-drop)")
    g.add_argument("--cond-drop", type=_nonneg_float, default=None, metavar="P",
                   help="replace each training label by the null class (the last row) with probability P, "
                        "for classifier-free guidance")
    g.add_argument("--guidance-scale", type=_nonneg_float, default=None, metavar="W",
                   help="with --cond-drop: the default guidance scale the saved model names")
    g = t.add_argument_group("noise schedule")
    g.add_argument("--num-train-timesteps", type=_positive_int, default=None)
    g.add_argument("--beta-schedule", choices=("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
                   default=None)
    g.add_argument("--beta-start", type=_finite_float, default=None)
    g.add_argument("--beta-end", type=_finite_float, default=None)
    g.add_argument("--trained-betas", type=_float_list, default=None, metavar="B1,B2,...")
    g.add_argument("--prediction-type", choices=("epsilon", "sample", "v_prediction"), default=None)
    g.add_argument("--variance-type", choices=("fixed_small", "fixed_large"), default=None)
    g.add_argument("--no-clip-sample", dest="clip_sample", action="store_false", default=None)
    g = t.add_argument_group("optimisation")
    g.add_argument("--lr", type=_finite_float, default=None)
    g.add_argument("--weight-decay", type=_nonneg_float, default=None)
    g.add_argument("--warmup-steps", type=_nonneg_int, default=None)
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None)
    g.add_argument("--grad-clip", type=_nonneg_float, default=None, help="max grad norm (0: off)")
    g.add_argument("--batch-size", type=_positive_int, default=None)
    n = g.add_mutually_exclusive_group()
    n.add_argument("--steps", type=_positive_int, default=None)
    n.add_argument("--epochs", type=_finite_float, default=None)
    g.add_argument("--ema-decay", type=_nonneg_float, default=None)
    g.add_argument("--seed", type=_nonneg_int, default=None)
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    g.add_argument("--device", default=None, help="torch device (cpu, cuda)")
    g.add_argument("--checkpoint-every", type=_nonneg_int, default=None)
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="run the benchmark suite and print the comparison table",
                       description="Run `pytest benchmarks` (pytest-benchmark), save JSON under "
                                   "benchmarks/results/ and print the table (benchmarks/report.py).")
    b.add_argument("--benchmarks", default=None, help="the benchmarks directory (default: ./benchmarks or the "
                                                      "source checkout's)")
    b.add_argument("-k", default=None, help="pytest -k expression to select benchmarks")
    b.add_argument("-q", "--quiet", action="store_true", help="only the table")
    b.set_defaults(func=cmd_bench)

    from .app.__main__ import add_arguments as app_arguments      # argparse only: Gradio is not imported
    a = app_arguments(sub.add_parser("app", help="the local web app: watch an image come out of static, train "
                                                 "a denoiser live (pip install 'fastddpm[app]')",
                                     description="Start the fastddpm web app on 127.0.0.1 (--host for another "
                                                 "address) and serve it until Ctrl-C."))
    a.set_defaults(func=cmd_app)

    i = sub.add_parser("info", help="backends, build and devices")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return p


def _int_list_or_none(s: str) -> list[int]:
    if s.strip().lower() == "none":
        return []
    try:
        out = [int(p) for p in s.replace(" ", "").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or 'none', got {s!r}") from None
    if any(v < 0 for v in out):
        raise argparse.ArgumentTypeError(f"levels are >= 0, got {s!r}")
    return out


# ---------------------------------------------------------------------- sample

def _trajectory_paths(path: str) -> tuple[str, str]:
    stem, suf = os.path.splitext(path)
    if suf.lower() not in (".gif", ".png"):
        raise CliError(f"--trajectory {path!r}: the suffix must be .gif or .png (both are written)")
    return stem + ".gif", stem + ".png"


def _precheck_output(path: str, allowed, what: str) -> str:
    from .images import _check_writable, _suffix
    try:
        _suffix(path, allowed, what)
        return _check_writable(path)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None


def _class_labels(pipe, spec, n: int):
    """(labels for the call or None, the classes named): -n images of each class of --label,
    class by class; every problem a CliError naming --label / --guidance."""
    import numpy as np
    from .conditioning import check_labels, num_labels
    cfg = pipe.unet_config
    kind = cfg.class_embedding_kind
    name = pipe.name or "the model"
    if spec is None:
        if kind is not None:
            what = f"0 .. {cfg.num_class_embeds - 1}" if kind == "table" else "numbers"
            raise CliError(f"{name} is class-conditional: pass --label (labels {what}, a comma list or 'all')")
        return None, None
    if kind is None:
        raise CliError(f"--label: {name} is unconditional (its U-Net has no class embedding)")
    if kind == "identity":
        raise CliError(f"--label: {name} takes class embeddings (class_embed_type='identity'), not labels: "
                       "use the Python API (fastddpm.sample(..., labels=array [n, D]))")
    if spec == "all":
        if num_labels(cfg) is None:
            raise CliError(f"--label all: {name}'s labels are numbers (class_embed_type='timestep'), not "
                           "classes to enumerate; name them")
        spec = [c for c in range(cfg.num_class_embeds) if c != pipe.null_class]
    classes = []
    for c in spec:
        try:
            classes.append(check_labels(cfg, c, 1)[0])
        except (ValueError, TypeError) as exc:
            msg = str(exc)   # "labels = 11 is out of range: ..." -> "--label 11 is out of range: ..."
            raise CliError(msg.replace("labels = ", "--label ", 1) if msg.startswith("labels = ")
                           else f"--label {c}: {msg}") from None
    classes = np.array(classes)
    return (classes[0].item() if len(classes) == 1 else np.repeat(classes, n)), [c.item() for c in classes]


def _check_guidance(pipe, guidance) -> None:
    try:
        pipe._guidance(guidance)
    except (ValueError, TypeError) as exc:
        raise CliError(f"--guidance: {exc}") from None


def _conditioning_note(classes, pipe, guidance) -> str:
    if classes is None:
        return ""
    w = pipe.guidance_scale if guidance is None else guidance
    shown = ",".join(str(c) for c in classes[:12]) + (",..." if len(classes) > 12 else "")
    return f", label{'s' if len(classes) > 1 else ''} {shown}, guidance {w:g}"


def cmd_sample_to_disk(args) -> int:
    from .pipeline import _cached, default_model
    from .shards import sample_to_disk
    if args.sampler != "ddim" and args.eta != 0:
        raise CliError("--eta is a DDIM parameter: add --sampler ddim")
    model = default_model() if args.model is None else args.model
    pipe = _cached(model)
    args.sampler = args.sampler or pipe.default_sampler()
    labels, classes = _class_labels(pipe, args.label, args.n)
    _check_guidance(pipe, args.guidance)
    total = args.n * (len(classes) if classes else 1)
    t0 = time.perf_counter()
    data = sample_to_disk(model, total, args.out,
                          seed=args.seed, shard_size=args.shard_size, sampler=args.sampler, steps=args.steps,
                          eta=args.eta, backend=args.backend, cluster=args.ray, threads=args.threads,
                          png=args.png, progress=not args.quiet, labels=labels, guidance_scale=args.guidance)
    if not args.quiet:
        print(f"{total} images{_conditioning_note(classes, pipe, args.guidance)} in {len(data['shards'])} shards "
              f"in {os.path.abspath(args.out)} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_sample(args) -> int:
    from . import images as im
    if args.out is not None:
        return cmd_sample_to_disk(args)
    if args.ray is not None or args.png or args.threads is not None:
        raise CliError("--ray, --threads and --png need --out DIR")
    from .pipeline import _cached, default_model
    from .executors import sampling_backend

    outputs = [_precheck_output(args.output, im.GRID_SUFFIXES, "the grid")]
    traj_paths = ()
    if args.trajectory is not None:
        traj_paths = _trajectory_paths(args.trajectory)
        outputs += [_precheck_output(p, im.TRAJECTORY_SUFFIXES, "the trajectory") for p in traj_paths]
    if args.npy is not None:
        outputs.append(_precheck_output(args.npy, (".npy",), "the array"))
    if len(set(outputs)) != len(outputs):
        raise CliError(f"two outputs would go to the same file: {outputs}")
    if args.sampler != "ddim" and args.eta != 0:
        raise CliError("--eta is a DDIM parameter: add --sampler ddim")

    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = default_model() if args.model is None else args.model
    for w in caught:
        print(f"{PROG} sample: warning: {w.message}", file=sys.stderr)
    pipe = _cached(model)
    args.sampler = args.sampler or pipe.default_sampler()
    labels, classes = _class_labels(pipe, args.label, args.n)
    _check_guidance(pipe, args.guidance)
    count, nrow = args.n, args.nrow
    if classes is not None and len(classes) > 1:   # -n images per class, one grid row per class
        if nrow is not None and nrow != args.n:
            raise CliError(f"--nrow {nrow}: with several classes the grid has one row of -n {args.n} images per class")
        count, nrow = args.n * len(classes), args.n
    be = sampling_backend(args.backend)
    sched = pipe.scheduler_for(args.sampler, args.steps)
    total = len(sched.timesteps)
    keep = im.trajectory_steps(total, max(2, args.frames)) if traj_paths else None

    t0 = time.perf_counter()
    out = pipe(count, steps=args.steps, sampler=args.sampler, seed=args.seed, backend=args.backend,
               eta=args.eta, progress=not args.quiet, trajectory=keep, labels=labels, guidance_scale=args.guidance)
    seconds = time.perf_counter() - t0
    images = out.images if keep is not None else out

    written = []
    try:
        written.append(im.save_grid(images, args.output, nrow=nrow, scale=args.scale))
        if traj_paths:
            for p in traj_paths:
                written.append(im.save_trajectory(out, p, scale=args.scale))
        if args.npy is not None:
            written.append(_save_npy(images, args.npy))
    except BaseException:
        for p in written:   # all or nothing: a failed run leaves none of its files
            try:
                os.unlink(p)
            except OSError:
                pass
        raise
    if not args.quiet:
        print(f"{count} images ({pipe.name}, {args.sampler} {total} steps, seed {args.seed}"
              f"{_conditioning_note(classes, pipe, args.guidance)}) in {seconds:.2f} s on {_describe_backend(be, pipe)}")
        for p in written:
            print(f"wrote {p}")
    return 0


def _save_npy(images, path) -> str:
    import numpy as np
    from .images import _atomic_save
    return _atomic_save(path, lambda f: np.save(f, images))


def _describe_backend(be, pipe=None) -> str:
    """What ran, as the backend describes its loop."""
    return f"{be.name} ({be.loop_description()})"


# ---------------------------------------------------------------------- train

_TRAIN_FIELDS = ("dataset", "image_size", "channels", "num_train_timesteps", "beta_schedule", "beta_start",
                 "beta_end", "trained_betas", "prediction_type", "variance_type", "clip_sample", "lr",
                 "weight_decay", "warmup_steps", "lr_schedule", "grad_clip", "batch_size", "ema_decay",
                 "seed", "threads", "device", "checkpoint_every", "cond_drop", "guidance_scale")


def _unet_overrides(args, base: dict) -> dict:
    import json
    unet = dict(base)
    if args.unet_config is not None:
        try:
            with open(args.unet_config, encoding="utf-8") as f:
                unet = json.load(f)
        except OSError as exc:
            raise CliError(f"--unet-config {args.unet_config}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise CliError(f"--unet-config {args.unet_config}: not valid JSON ({exc})") from None
        if not isinstance(unet, dict):
            raise CliError(f"--unet-config {args.unet_config}: must hold a JSON object")
    if args.block_out_channels is not None:
        unet["block_out_channels"] = args.block_out_channels
        levels = args.attention_levels
        if levels is None:   # keep attention where it was, as far as the new depth allows
            old = unet.get("down_block_types", [])
            levels = [i for i, b in enumerate(old) if b.startswith("Attn") and i < len(args.block_out_channels)]
        args.attention_levels = levels
    if args.attention_levels is not None:
        k = len(unet.get("block_out_channels", []))
        bad = [lv for lv in args.attention_levels if lv >= k]
        if bad:
            raise CliError(f"--attention-levels {bad}: the model has {k} levels (0..{k - 1})")
        unet["down_block_types"] = ["AttnDownBlock2D" if i in args.attention_levels else "DownBlock2D"
                                    for i in range(k)]
        unet["up_block_types"] = ["AttnUpBlock2D" if (k - 1 - i) in args.attention_levels else "UpBlock2D"
                                  for i in range(k)]
    if args.layers_per_block is not None:
        unet["layers_per_block"] = args.layers_per_block
    if args.norm_groups is not None:
        unet["norm_num_groups"] = args.norm_groups
    if args.num_class_embeds is not None:
        unet["num_class_embeds"] = args.num_class_embeds
    return unet


def cmd_train(args) -> int:
    from .pipeline import _MODELS_DIR
    from .train import TRAIN_PRESETS, TrainConfig, train

    if args.preset is not None and args.preset not in TRAIN_PRESETS:
        raise CliError(f"unknown preset {args.preset!r}; presets: {', '.join(TRAIN_PRESETS)}")
    base = dict(TRAIN_PRESETS[args.preset]) if args.preset else {}
    for name in _TRAIN_FIELDS:
        v = getattr(args, name)
        if v is not None:
            base[name] = v
    if args.steps is not None:
        base["steps"], base["epochs"] = args.steps, None
    if args.epochs is not None:
        base["steps"], base["epochs"] = None, args.epochs
    base["unet"] = _unet_overrides(args, base.get("unet") or TrainConfig().unet)
    cfg = TrainConfig.from_dict(base)

    out, work = args.out, args.work_dir
    if out is None:
        if args.preset not in ("digits", "digits-cond"):
            raise CliError("--out is required (the model directory to write)")
        out = os.path.join(_MODELS_DIR, args.preset)   # the bundled model
        if work is None:
            work = os.path.join("runs", args.preset)   # keep checkpoints out of the package data
    for d in (out, work):
        if d is None:
            continue
        parent = os.path.dirname(os.path.abspath(d)) or "."
        probe = parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            raise CliError(f"cannot write {os.path.abspath(d)}: {probe} is not a writable directory")

    if not args.quiet:
        from .unet_config import parameter_count
        ucfg = cfg.unet_config()
        print(f"training {ucfg.in_channels}x{cfg.image_size}x{cfg.image_size} on {cfg.dataset}: "
              f"{parameter_count(ucfg) / 1e6:.2f}M parameters, T={cfg.num_train_timesteps} "
              f"({cfg.beta_schedule}), {cfg.prediction_type}, batch {cfg.batch_size}, "
              f"{f'{cfg.steps} steps' if cfg.steps else f'{cfg.epochs} epochs'}, lr {cfg.lr}, seed {cfg.seed}"
              + (f", {ucfg.num_class_embeds} class embeddings, cond_drop {cfg.cond_drop}" if cfg.conditional else ""))
    try:
        res = train(cfg, out, work_dir=work, resume=args.resume, quiet=args.quiet)
    except KeyboardInterrupt:
        wd = os.path.abspath(work) if work else os.path.join(os.path.abspath(out), "training")
        print(f"\n{PROG} train: interrupted; checkpoint saved in {wd}: run the same command with --resume "
              "to continue", file=sys.stderr)
        return 130
    if not args.quiet:
        last = res.losses[-min(100, len(res.losses)):]
        print(f"done: {res.steps} steps in {res.seconds:.0f} s"
              + (f" (resumed at step {res.resumed_from})" if res.resumed_from is not None else "")
              + f", final loss (mean of last {len(last)}) {sum(last) / max(1, len(last)):.4f}")
        print(f"model:      {res.out_dir}")
        print(f"loss curve: {os.path.join(res.work_dir, 'loss.png')} (and loss.csv)")
        print(f"try:        {PROG} sample --model {res.out_dir} -o samples.png")
    return 0


# ---------------------------------------------------------------------- bench, info

def _find_benchmarks(given: str | None) -> str:
    if given is not None:
        if not os.path.isdir(given):
            raise CliError(f"--benchmarks {given!r} is not a directory")
        return os.path.abspath(given)
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.getcwd(), "benchmarks"), os.path.join(here, "..", "..", "benchmarks")):
        if os.path.isdir(cand) and any(f.startswith("test_") for f in os.listdir(cand)):
            return os.path.abspath(cand)
    raise CliError("no benchmarks directory found: run from the fastddpm source checkout, or pass --benchmarks DIR")


def cmd_bench(args) -> int:
    bdir = _find_benchmarks(args.benchmarks)
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise CliError("the benchmarks need pytest-benchmark (pip install -r requirements-dev.txt)") from None
    results = os.path.join(bdir, "results")
    os.makedirs(results, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = os.path.join(results, f"{socket.gethostname()}-{stamp}.json")
    cmd = [sys.executable, "-m", "pytest", bdir, "-q", f"--benchmark-json={out}", "-p", "no:cacheprovider"]
    if args.k:
        cmd += ["-k", args.k]
    if not args.quiet:
        print("running:", " ".join(cmd), flush=True)
    run = subprocess.run(cmd, stdout=subprocess.DEVNULL if args.quiet else None)
    if not os.path.isfile(out):
        raise CliError(f"the benchmarks wrote no results (pytest exit code {run.returncode})")
    report = os.path.join(bdir, "report.py")
    if not os.path.isfile(report):
        raise CliError(f"results in {out}, but {report} is missing to turn them into a table")
    rep = subprocess.run([sys.executable, report, out])
    if not args.quiet:
        print(f"results: {out}")
    return run.returncode or rep.returncode


def cmd_app(args) -> int:
    from .app.__main__ import run
    return run(args)


def cmd_info(args) -> int:
    from .info import main as info_main
    return info_main(["--json"] if args.json else [])


# ---------------------------------------------------------------------- entry point

def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)    # bad arguments: usage + message, exit 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except CliError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as exc:
        # library errors carry their own explanation (missing model dir, bad config, backend refusal...)
        msg = str(exc) or type(exc).__name__
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
