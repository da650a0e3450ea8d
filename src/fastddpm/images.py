"""Pictures: uint8/PIL conversion, image grids, and reverse-diffusion trajectories (GIF or PNG strip).

    images = fastddpm.sample(n=16, seed=0)
    fastddpm.save_grid(images, "samples.png")                        # a 4x4 grid
    result = fastddpm.sample(n=8, trajectory=fastddpm.images.trajectory_steps(200, 12))
    fastddpm.save_trajectory(result, "trajectory.gif")               # one grid per kept step
    fastddpm.save_trajectory(result, "trajectory.png")               # rows = samples, columns = steps

Inputs are what ``sample()`` returns: uint8 [N, H, W, C], or float32 [N, C, H, W] in [-1, 1]
(``output="float"``); NumPy arrays or torch tensors. Small images are enlarged by a whole factor
with nearest-neighbour (``scale``; by default the smallest that makes each image >= 64 pixels
tall) so that 16x16 digits are visible. Files are written atomically (a temporary file in the same
directory, renamed into place): a failure never leaves a half-written picture.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from . import validate

from ._atomic import atomic_write

__all__ = ["to_pil", "to_uint8_images", "save_grid", "save_trajectory", "grid", "trajectory_steps",
           "GRID_SUFFIXES", "TRAJECTORY_SUFFIXES"]

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TRAJECTORY_SUFFIXES = (".gif", ".png")
_MIN_CELL = 64          # default scale: each image at least this many pixels tall
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
            ".tif": "TIFF", ".tiff": "TIFF"}


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):          # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_uint8_images(images) -> np.ndarray:
    """uint8 [N, H, W, C] from uint8 [N, H, W, C] / [H, W, C] or float [N, C, H, W] / [C, H, W]
    in [-1, 1] (rounded as ``sample()`` rounds)."""
    a = _numpy(images)
    if a.dtype == np.uint8:
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] not in _MODES:
            raise ValueError(f"uint8 images must be [N, H, W, C] with C in 1/3/4, got shape {a.shape}")
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"images must be uint8 [N, H, W, C] or float [N, C, H, W] in [-1, 1], got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[1] not in _MODES:
        raise ValueError(f"float images must be [N, C, H, W] with C in 1/3/4, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("images contain NaN or infinity")
    img = np.clip(a.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.ascontiguousarray((img.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8))


def to_pil(images, scale: int = 1):
    """A PIL image for one image ([H, W, C] uint8 or [C, H, W] float), a list of them for a batch
    ([N, ...]). ``scale``: whole-number nearest-neighbour enlargement."""
    from PIL import Image
    a = _numpy(images)
    single = a.ndim == 3
    u8 = to_uint8_images(a)
    scale = _check_scale(scale)
    out = []
    for im in u8:
        c = im.shape[-1]
        p = Image.fromarray(im[..., 0] if c == 1 else im, mode=_MODES[c])
        if scale != 1:
            p = p.resize((p.width * scale, p.height * scale), Image.NEAREST)
        out.append(p)
    return out[0] if single else out


def _check_scale(scale) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or not 1 <= scale <= 64:
        raise ValueError(f"scale must be an integer in [1, 64], got {scale!r}")
    return int(scale)


def _auto_scale(h: int) -> int:
    return max(1, math.ceil(_MIN_CELL / h))


def grid(images, nrow: int | None = None, padding: int = 1, scale: int | None = None,
         pad_value: int = 96) -> np.ndarray:
    """uint8 [H', W', C]: the images tiled ``nrow`` per row (default: a near-square grid), with
    ``padding`` pixels between and around them, then enlarged ``scale`` times.

    Size: scale * (cols * W + (cols + 1) * padding) wide, likewise tall."""
    u8 = to_uint8_images(images)
    n, h, w, c = u8.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    nrow = validate.count("nrow", nrow)
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    scale = _auto_scale(h) if scale is None else _check_scale(scale)
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    out = np.full((rows * h + (rows + 1) * padding, cols * w + (cols + 1) * padding, c), pad_value, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        out[y:y + h, x:x + w] = u8[i]
    if scale != 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def _suffix(path: str, allowed: Sequence[str], what: str) -> str:
    suf = os.path.splitext(path)[1].lower()
    if suf not in allowed:
        raise ValueError(f"cannot write {what} to {path!r}: the suffix must be one of {', '.join(allowed)} "
                         f"(got {suf or 'none'!r})")
    return suf


def _check_writable(path: str) -> str:
    path = os.path.abspath(os.fspath(path))
    d = os.path.dirname(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"cannot write {path}: the directory {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: the directory {d} is not writable")
    return path


def _atomic_save(path: str, save) -> str:
    """save(file object) into a temporary file beside ``path``, then rename it into place."""
    path = _check_writable(path)

    def write(tmp):
        with open(tmp, "wb") as f:
            save(f)
    atomic_write(path, write)
    return path


def save_grid(images, path, nrow: int | None = None, padding: int = 1, scale: int | None = None) -> str:
    """Write ``images`` as one grid picture (format from the suffix: png, jpg, gif, ...); returns
    the absolute path. See ``grid`` for the layout."""
    path = os.fspath(path)
    suf = _suffix(path, GRID_SUFFIXES, "a grid")
    g = grid(images, nrow=nrow, padding=padding, scale=scale)
    img = to_pil(g)
    return _atomic_save(path, lambda f: img.save(f, format=_FORMATS[suf]))


def _trajectory_frames(result):
    """(frames uint8 [K, N, H, W, C] in loop order, steps) from a SampleResult or an array."""
    traj = getattr(result, "trajectory", result)
    a = _numpy(traj)
    if a.ndim != 5:
        raise ValueError("a trajectory must be a SampleResult (sample(..., trajectory=[...])) or an array "
                         f"[K, N, ...] of K frames, got shape {a.shape}")
    if len(a) == 0:
        raise ValueError("the trajectory has no frames (pass trajectory=[...] with some steps to sample())")
    frames = np.stack([to_uint8_images(f) for f in a])
    steps = list(getattr(result, "trajectory_steps", None) or range(len(frames)))
    if len(steps) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(steps)} trajectory_steps")
    order = np.argsort(steps, kind="stable")   # static (step 0) first, the finished image last
    return frames[order], [steps[i] for i in order]


def save_trajectory(result, path, *, max_samples: int = 16, scale: int | None = None, padding: int = 1,
                    frame_ms: int = 100, hold_ms: int = 1500) -> str:
    """Write the reverse trajectory of ``sample(..., trajectory=[...])``; returns the path.

    ``.gif``: one frame per kept step, each a grid of (up to ``max_samples``) samples, from the
    pure static to the finished images (held ``hold_ms``), looping. ``.png``: a strip, one row per
    sample (up to ``max_samples``), one column per kept step, static on the left, finished on the
    right."""
    path = os.fspath(path)
    suf = _suffix(path, TRAJECTORY_SUFFIXES, "a trajectory")
    frames, _ = _trajectory_frames(result)
    frames = frames[:, :max_samples]                                   # [K, n, H, W, C]
    k, n, h, w, c = frames.shape
    if suf == ".png":
        # row i = sample i across the steps: the grid of [n * K] images, K per row
        flat = frames.transpose(1, 0, 2, 3, 4).reshape(n * k, h, w, c)
        img = to_pil(grid(flat, nrow=k, padding=padding, scale=scale))
        return _atomic_save(path, lambda f: img.save(f, format="PNG"))
    pics = [to_pil(grid(fr, padding=padding, scale=scale)) for fr in frames]
    durations = [int(frame_ms)] * (k - 1) + [int(hold_ms)]
    return _atomic_save(path, lambda f: pics[0].save(f, format="GIF", save_all=True, append_images=pics[1:],
                                                     duration=durations, loop=0, optimize=False,
                                                     disposal=1))


def trajectory_steps(total: int, frames: int = 10) -> list[int]:
    """``frames`` loop positions from 0 (the static) to ``total`` (the finished image), evenly
    spaced: the ``trajectory=`` argument of ``sample()`` for a ``total``-step run."""
    total = validate.count("total", total)
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 2:
        raise ValueError(f"frames must be an integer >= 2, got {frames!r}")
    return sorted({int(round(v)) for v in np.linspace(0, int(total), int(frames))})
