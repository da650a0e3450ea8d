"""Training datasets: scikit-learn's handwritten digits, and any folder of images.

Both return float32 arrays [N, C, H, W] scaled to [-1, 1], the range the U-Net is trained on
(and the range ``fastddpm.sample(output="float")`` returns). NumPy + Pillow (+ scikit-learn for
``digits``); no torch, so the quality metrics can use the same preprocessing.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Sequence

import numpy as np

__all__ = ["load_digits", "digit_labels", "load_image_folder", "downscale_to_digits", "DatasetError",
           "IMAGE_SUFFIXES", "DIGITS_SIZE", "square_image"]

log = logging.getLogger(__name__)

DIGITS_SIZE = 16   # the bundled model's resolution: 8x8 digits upscaled x2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DatasetError(ValueError):
    """A dataset that cannot be used at all (empty folder, no readable image, bad size...)."""


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DatasetError(f"image size must be a positive integer, got {size!r}")
    return int(size)


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dev requirement
        raise ImportError("the digits dataset needs scikit-learn (pip install scikit-learn)") from exc
    return _load()


def _resize_float(img: np.ndarray, size: int) -> np.ndarray:
    """One float image [h, w] resized to [size, size] with Pillow's bilinear filter (mode "F":
    no 8-bit rounding). Bilinear, not nearest: x2 nearest would give blocky 2x2 pixels that a
    model would spend capacity reproducing."""
    from PIL import Image
    if img.shape == (size, size):
        return img.astype(np.float32)
    out = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F").resize(
        (size, size), Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def load_digits(size: int = DIGITS_SIZE) -> np.ndarray:
    """scikit-learn's 1797 handwritten 8x8 digits (values 0..16) as float32 [1797, 1, size, size]
    in [-1, 1], upscaled bilinearly (``size=8``: the originals)."""
    size = _check_size(size)
    raw = _sklearn_digits().images.astype(np.float32) / 16.0          # [N, 8, 8] in [0, 1]
    out = np.stack([_resize_float(im, size) for im in raw])           # [N, size, size]
    out = np.clip(out, 0.0, 1.0) * 2.0 - 1.0
    return np.ascontiguousarray(out[:, None], dtype=np.float32)


def digit_labels() -> np.ndarray:
    """The class (0..9) of each image of ``load_digits()``, same order."""
    return _sklearn_digits().target.astype(np.int64)


def downscale_to_digits(images) -> np.ndarray:
    """Images back to scikit-learn's digit representation: float64 [N, 64] in 0..16.

    Takes uint8 [N, H, W, 1] (what ``sample()`` returns) or float [N, 1, H, W] in [-1, 1]; H and
    W must be multiples of 8. Each 8x8 output pixel is the mean of its (H/8)x(W/8) block."""
    a = np.asarray(images)
    if a.ndim != 4:
        raise ValueError(f"images must be [N, H, W, 1] uint8 or [N, 1, H, W] float, got shape {a.shape}")
    if a.dtype == np.uint8:
        if a.shape[-1] != 1:
            raise ValueError(f"digit images have 1 channel, got uint8 shape {a.shape} (expected [N, H, W, 1])")
        x = a[..., 0].astype(np.float64) / 255.0
    else:
        if a.shape[1] != 1:
            raise ValueError(f"digit images have 1 channel, got float shape {a.shape} (expected [N, 1, H, W])")
        x = (np.clip(a[:, 0].astype(np.float64), -1.0, 1.0) + 1.0) / 2.0
    n, h, w = x.shape
    if h % 8 or w % 8:
        raise ValueError(f"image height and width must be multiples of 8, got {h}x{w}")
    x = x.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return (x * 16.0).reshape(n, 64)


def _list_images(folder: str, recursive: bool) -> list[str]:
    paths = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            paths += [os.path.join(root, f) for f in sorted(files)]
    else:
        paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
    return [p for p in paths if os.path.isfile(p) and not os.path.basename(p).startswith(".")]


def square_image(im, size: int) -> np.ndarray:
    """A PIL image as float32 [size, size] (or [size, size, 3]) in [-1, 1]: its shorter side
    scaled to ``size`` (bicubic, antialiased), then centre-cropped to a square."""
    from PIL import Image
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


def load_image_folder(folder, size: int, *, channels: int = 3, recursive: bool = True,
                      suffixes: Sequence[str] = IMAGE_SUFFIXES) -> np.ndarray:
    """Every image in ``folder`` as float32 [N, channels, size, size] in [-1, 1].

    Each image is converted to grayscale (``channels=1``) or RGB (``channels=3``), scaled so its
    shorter side is ``size`` (bicubic, antialiased) and centre-cropped to a square. Files that
    Pillow cannot read are skipped with a warning that names them; a folder with no readable
    image is a ``DatasetError``."""
    from PIL import Image, UnidentifiedImageError
    size = _check_size(size)
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DatasetError(f"image folder {folder!r} does not exist or is not a directory")
    suffixes = tuple(s.lower() for s in suffixes)
    files = [p for p in _list_images(folder, recursive) if p.lower().endswith(suffixes)]
    if not files:
        raise DatasetError(f"image folder {folder!r} holds no image files ({', '.join(suffixes)})")
    mode = "L" if channels == 1 else "RGB"
    out, bad = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()   # decode now, so a truncated file fails here and not later
                a = square_image(im.convert(mode), size)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            bad.append(path)
            msg = f"skipping {path}: not a readable image ({type(exc).__name__}: {exc})"
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
            continue
        out.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
    if not out:
        raise DatasetError(f"image folder {folder!r}: none of its {len(files)} image files could be read "
                           f"(first: {bad[0]})")
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)
