"""Weight files: safetensors in, safetensors out, checked against the U-Net's weight shapes.

NumPy + safetensors only (no torch). Weights load from safetensors only; nothing is unpickled.
A malformed or hostile file gives a ``WeightsError`` naming the path and the problem, never a
crash or a huge allocation: the header is parsed and checked here, and the tensors are then read
here with plain reads (no mmap, which a file truncated during the load would turn into SIGBUS),
each no larger than the file holds.
"""
from __future__ import annotations

import os
import stat
import struct
from typing import Any, Mapping

import numpy as np

from ._atomic import atomic_write
from ._files import parse_json

__all__ = ["WeightsError", "load_safetensors", "check_weights", "save_safetensors",
           "read_header"]


class WeightsError(ValueError):
    """Weights that cannot be used: a bad file, or missing/extra/misshapen/non-finite tensors."""


# safetensors dtype -> bytes per element (every dtype the format defines with whole bytes)
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
             "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
             "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}  # BF16: widened by hand
_SAVE_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
# The JSON header: ~110 bytes a tensor, so 16 MiB holds ~150,000 tensors, more than the U-Net
# bounds of unet_config allow (safetensors itself allows 100 MB; parsing that much JSON can take
# gigabytes)
_MAX_HEADER = 16 << 20
_MAX_PROBLEMS = 20         # problems listed in one error before "... and N more"


def _fail(path, problem: str) -> WeightsError:
    return WeightsError(f"{os.fspath(path)}: {problem}")


def read_header(path) -> tuple[dict[str, dict[str, Any]], int]:
    """Parse and check the safetensors header of ``path``.

    Returns ({name: {"dtype", "shape", "data_offsets"}}, byte offset of the data section).
    Checks: the 8-byte little-endian length fits in the file, the header is a JSON object without
    duplicate names, each tensor has a known dtype, a shape of non-negative ints and data offsets
    inside the file that match shape x itemsize, and the tensors tile the data section exactly
    (no overlap, no gap, no trailing bytes: what safetensors itself requires)."""
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
        header = parse_json(raw)
    except ValueError as e:
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
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
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
        if begin < 0 or begin > end:
            raise _fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}] are "
                              f"{'negative' if begin < 0 else 'reversed (begin > end)'}")
        if end > data_size:
            raise _fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the "
                              f"{data_size}-byte data section (truncated file?)")
        nbytes = _nbytes(shape, _ITEMSIZE[dtype], data_size)
        if end - begin != nbytes:
            needs = "more than the whole file" if nbytes > data_size else nbytes
            raise _fail(path, f"tensor {name!r}: data_offsets span {end - begin} bytes but "
                              f"{dtype} {shape!r:.200} needs {needs}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, a), (b1, _, b) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _fail(path, f"tensors {a!r} and {b!r} overlap in the data section")
        if b1 > e0:
            raise _fail(path, f"bytes [{e0}, {b1}) of the data section, between tensors {a!r} "
                              f"and {b!r}, belong to no tensor")
    first, covered = (spans[0][0], spans[-1][1]) if spans else (0, 0)
    if first:
        raise _fail(path, f"bytes [0, {first}) of the data section belong to no tensor")
    if covered != data_size:
        raise _fail(path, f"{data_size - covered} bytes after the last tensor belong to no tensor")
    return header, data_start


def _nbytes(shape: list[int], itemsize: int, cap: int) -> int:
    """shape x itemsize, or cap + 1 as soon as it exceeds cap (a shape of thousand-digit dims
    would otherwise take a long multiplication)."""
    if 0 in shape:
        return 0
    n = itemsize
    for s in shape:
        n *= s
        if n > cap:
            return cap + 1
    return n


def _read_tensor(f, path, data_start: int, info: dict) -> np.ndarray:
    """One tensor (offsets already checked against the file size) as float32."""
    begin, end = info["data_offsets"]
    f.seek(data_start + begin)
    raw = f.read(end - begin)
    if len(raw) != end - begin:
        raise _fail(path, "file changed (shorter) while reading its tensors")
    if info["dtype"] == "BF16":  # NumPy has no bfloat16: widen the raw bits to float32
        a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        a = np.frombuffer(raw, dtype=_NUMPY_DTYPES[info["dtype"]])
    return np.ascontiguousarray(a.reshape(info["shape"]), dtype=np.float32)


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Load a safetensors file as float32 C-contiguous arrays (F32, F16, BF16 and F64 tensors;
    any other dtype, or any malformed file, is a WeightsError naming the path)."""
    header, data_start = read_header(path)
    bad = [f"{k!r} ({v['dtype']})" for k, v in header.items() if v["dtype"] not in _FLOAT_DTYPES]
    if bad:
        more = f" and {len(bad) - _MAX_PROBLEMS} more" if len(bad) > _MAX_PROBLEMS else ""
        raise _fail(path, f"unsupported tensor dtype (only {', '.join(_FLOAT_DTYPES)} load): "
                          f"{', '.join(bad[:_MAX_PROBLEMS])}{more}")
    try:
        with open(path, "rb") as f:
            return {name: _read_tensor(f, path, data_start, info) for name, info in header.items()}
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None


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
