"""Weight files: safetensors in, safetensors out, checked against the U-Net's weight shapes.

NumPy + safetensors only (no torch). Weights load from safetensors only; nothing is unpickled.
A malformed or hostile file gives a ``WeightsError`` naming the path and the problem, never a
crash or a huge allocation: the header is parsed and checked here before safetensors reads it.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
from typing import Any, Mapping

import numpy as np

from ._atomic import atomic_write

__all__ = ["WeightsError", "load_safetensors", "check_weights", "save_safetensors",
           "read_header"]


class WeightsError(ValueError):
    """Weights that cannot be used: a bad file, or missing/extra/misshapen/non-finite tensors."""


# safetensors dtype -> bytes per element (every dtype the format defines with whole bytes)
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
             "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
             "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_SAVE_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_MAX_PROBLEMS = 20         # problems listed in one error before "... and N more"


def _fail(path, problem: str) -> WeightsError:
    return WeightsError(f"{os.fspath(path)}: {problem}")


def read_header(path) -> tuple[dict[str, dict[str, Any]], int]:
    """Parse and check the safetensors header of ``path``.

    Returns ({name: {"dtype", "shape", "data_offsets"}}, byte offset of the data section).
    Checks: the 8-byte little-endian length fits in the file, the header is a JSON object, each
    tensor has a known dtype, a shape of non-negative ints and data offsets inside the file that
    match shape x itemsize, and no two tensors overlap."""
    try:
        # a FIFO or device would block or never end: only regular files are opened
        if not stat.S_ISREG(os.stat(path).st_mode):
            if os.path.isdir(path):
                raise _fail(path, "is a directory, not a safetensors file")
            raise _fail(path, "not a regular file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _fail(path, f"not a safetensors file: {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise _fail(path, f"header length {n} exceeds the file size ({size} bytes): "
                                  "truncated or not a safetensors file")
            if n > _MAX_HEADER:
                raise _fail(path, f"header length {n} exceeds the {_MAX_HEADER}-byte limit")
            raw = f.read(n)
    except WeightsError:
        raise
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a safetensors file") from None
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    if len(raw) != n:
        raise _fail(path, "file changed while reading its header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}, not an object")

    data_start, data_size = 8 + n, size - 8 - n
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and
                                 all(isinstance(v, str) for v in meta.values())):
        raise _fail(path, "__metadata__ must be an object of strings")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"tensor {name!r}: entry must have exactly dtype, shape and "
                              f"data_offsets, got {info!r:.200}")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative ints, "
                              f"got {shape!r:.200}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise _fail(path, f"tensor {name!r}: data_offsets must be [begin, end], "
                              f"got {offs!r:.200}")
        begin, end = offs
        if not 0 <= begin <= end <= data_size:
            raise _fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the "
                              f"{data_size}-byte data section (truncated file?)")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if end - begin != nbytes:
            raise _fail(path, f"tensor {name!r}: data_offsets span {end - begin} bytes but "
                              f"{dtype} {shape} needs {nbytes}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _fail(path, f"tensors {a!r} and {b!r} overlap in the data section")
    return header, data_start


def _read_bf16(path, data_start: int, info: dict) -> np.ndarray:
    # NumPy has no bfloat16 (safetensors.numpy cannot load it): widen the raw bits ourselves
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = f.read(end - begin)
    if len(raw) != end - begin:
        raise OSError("short read")
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(info["shape"])


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Load a safetensors file as float32 C-contiguous arrays (F32, F16, BF16 and F64 tensors;
    any other dtype, or any malformed file, is a WeightsError naming the path)."""
    header, data_start = read_header(path)
    bad = [f"{k!r} ({v['dtype']})" for k, v in header.items() if v["dtype"] not in _FLOAT_DTYPES]
    if bad:
        more = f" and {len(bad) - _MAX_PROBLEMS} more" if len(bad) > _MAX_PROBLEMS else ""
        raise _fail(path, f"unsupported tensor dtype (only {', '.join(_FLOAT_DTYPES)} load): "
                          f"{', '.join(bad[:_MAX_PROBLEMS])}{more}")
    from safetensors import safe_open  # a plain import: safetensors is a run-time requirement

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(os.fspath(path), framework="np") as f:
            for name in f.keys():
                info = header[name]
                if info["dtype"] == "BF16":
                    a = _read_bf16(path, data_start, info)
                else:
                    a = f.get_tensor(name)
                out[name] = np.ascontiguousarray(a, dtype=np.float32)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise _fail(path, f"cannot load: {type(e).__name__}: {e}") from None
    return out


def check_weights(weights: Mapping[str, Any],
                  shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Check ``weights`` against ``shapes`` (from ``unet_config.weight_shapes``).

    Missing keys, unexpected keys, wrong shapes, non-numeric or non-finite values: one
    WeightsError listing every problem (up to 20) by key. Returns float32 C-contiguous arrays
    in the order of ``shapes``."""
    if not isinstance(weights, Mapping):
        raise WeightsError(f"weights must be a dict of arrays, got {type(weights).__name__}")
    problems = [f"missing {k!r} (expected shape {tuple(s)})" for k, s in shapes.items()
                if k not in weights]
    problems += [f"unexpected {k!r}" for k in weights if k not in shapes]
    out: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        if key not in weights:
            continue
        v = weights[key]
        try:
            if hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor; torch not imported
                v = v.detach().cpu().float().numpy()
            a = np.asarray(v)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{key!r}: not an array ({type(e).__name__})")
            continue
        if a.dtype.kind not in "fiu":
            problems.append(f"{key!r}: dtype {a.dtype} is not numeric")
            continue
        if a.shape != tuple(shape):
            problems.append(f"{key!r}: shape {a.shape}, expected {tuple(shape)}")
            continue
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            problems.append(f"{key!r}: {bad} non-finite value(s) (NaN or inf)")
            continue
        out[key] = a
    if problems:
        shown = problems[:_MAX_PROBLEMS]
        if len(problems) > _MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
        raise WeightsError(f"{len(problems)} problem(s) with the weights:\n  " + "\n  ".join(shown))
    return out


def save_safetensors(weights: Mapping[str, Any], path) -> None:
    """Write ``weights`` (float16/32/64 arrays) to ``path`` atomically: a temp file in the same
    directory, flushed to disk, then renamed over ``path``, so no half-written file is left."""
    arrays = {}
    for k, v in weights.items():
        if not isinstance(k, str):
            raise WeightsError(f"weight names must be strings, got {k!r}")
        if hasattr(v, "detach") and hasattr(v, "cpu"):
            v = v.detach().cpu().numpy()
        a = np.ascontiguousarray(v)
        if a.dtype not in _SAVE_DTYPES:
            raise WeightsError(f"{k!r}: dtype {a.dtype} cannot be saved (float16/32/64 only)")
        arrays[k] = a
    from safetensors.numpy import save_file

    # "pt": what diffusers writes; fsync: weights are what a training run exists to produce
    atomic_write(os.fspath(path), lambda tmp: save_file(arrays, tmp, metadata={"format": "pt"}), fsync=True)
