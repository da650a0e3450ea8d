"""Checks for every value the page sends: the server never trusts the browser.

Each checker takes what Gradio delivered (a number, a string, a path, or anything a hand-made
request put there) and returns a clean Python value or raises ``AppInputError`` with a message
fit for the page. Limits are module constants so the tests and the layout read the same numbers.
"""
from __future__ import annotations

import math
import numbers
import os

import numpy as np

__all__ = ["AppInputError", "integer", "number", "choice", "image_upload", "LIMITS"]


class AppInputError(ValueError):
    """A value from the page that cannot be used; the message is shown in the page."""


# Bounds of a request. Generate: 16 images of the 16x16 digits model and every timestep of its
# 200-step schedule keep a trajectory at ~3 MB. Train: steps and seconds bound one run's time.
LIMITS = dict(
    max_images=16,
    max_seed=2**63 - 1,
    max_guidance=20.0,
    max_train_steps=5000,
    max_train_timesteps=1000,
    lr=(1e-6, 1.0),
    beta=(1e-6, 0.999),
    upload_bytes=4 * 1024 * 1024,      # 4 MiB
    upload_pixels=4096 * 4096,         # also Pillow's decompression-bomb guard
)
UPLOAD_FORMATS = ("PNG", "JPEG")


def _finite(name: str, v, what: str) -> float:
    """v as a finite float (a form may send numbers as text), else the message naming ``what``."""
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise AppInputError(f"{name} must be {what}, got {v!r}") from None
    if not isinstance(v, numbers.Real) or isinstance(v, (bool, np.bool_)) or not math.isfinite(float(v)):
        raise AppInputError(f"{name} must be {what}, got {v!r}")
    return float(v)


def integer(name: str, v, lo: int, hi: int) -> int:
    """An integer in [lo, hi]. Gradio sends numbers as floats (2.0): whole floats pass."""
    f = _finite(name, v, "a whole number")
    if f != int(f):
        raise AppInputError(f"{name} must be a whole number, got {v!r}")
    v = int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else int(f)
    if not lo <= v <= hi:
        raise AppInputError(f"{name} must be between {lo} and {hi}, got {v}")
    return v


def number(name: str, v, lo: float, hi: float) -> float:
    """A finite float in [lo, hi]."""
    v = _finite(name, v, "a finite number")
    if not lo <= v <= hi:
        raise AppInputError(f"{name} must be between {lo:g} and {hi:g}, got {v:g}")
    return v


def choice(name: str, v, options) -> str:
    options = tuple(options)
    if not isinstance(v, str) or v not in options:
        raise AppInputError(f"{name} must be one of {', '.join(map(str, options))}; got {v!r}")
    return v


def image_upload(path, size: int) -> np.ndarray:
    """An uploaded PNG/JPEG as the model's input: float32 [1, size, size] in [-1, 1], grayscale,
    shorter side scaled to ``size`` and centre-cropped. Refuses anything else, or a file or image
    over the limits, before decoding the pixels."""
    from PIL import Image, UnidentifiedImageError
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise AppInputError("no uploaded file: choose a PNG or JPEG image")
    nbytes = os.path.getsize(path)
    if nbytes > LIMITS["upload_bytes"]:
        raise AppInputError(f"the upload is {nbytes / 2**20:.1f} MiB; the limit is "
                            f"{LIMITS['upload_bytes'] / 2**20:.0f} MiB")
    try:
        with Image.open(path) as im:              # reads the header only
            fmt, (w, h) = im.format, im.size
            if fmt not in UPLOAD_FORMATS:
                raise AppInputError(f"the upload is a {fmt} image; only PNG and JPEG are accepted")
            if w * h > LIMITS["upload_pixels"]:
                raise AppInputError(f"the upload is {w}x{h} pixels; the limit is "
                                    f"{LIMITS['upload_pixels']:,} pixels (e.g. 4096x4096)")
            im = im.convert("L")                  # decodes; grayscale: the model has one channel
    except AppInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise AppInputError("the upload is not a readable PNG or JPEG image") from None
    from ..data import square_image
    return np.clip(square_image(im, size), -1.0, 1.0)[None]   # [1, size, size]
