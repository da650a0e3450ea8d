"""Reading the files of a model directory as if they were hostile.

Every file is read only if it lies inside the model directory once symlinks are resolved, is a
regular file (a FIFO or device would block or never end) and is small enough for what it holds;
JSON is parsed strictly (no duplicate keys, no nesting deep enough to exhaust the stack). Each
problem is a ``ModelFileError`` (a ValueError) naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import Any, Iterator

__all__ = ["ModelFileError", "MAX_JSON_BYTES", "parse_json", "read_json_object", "check_inside",
           "errors_name"]

MAX_JSON_BYTES = 8 << 20  # a config is a few KB; 1000 trained_betas are about 25 KB


class ModelFileError(ValueError):
    """A model file that is not read: outside the model directory, not a regular file, too
    large, or not strict JSON. The message names the file."""


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(raw: bytes) -> Any:
    """Strict JSON from UTF-8 bytes; ValueError (without a path) saying what is wrong.

    Python's json keeps the last of two equal keys silently (and other readers the first), so a
    file with a duplicate key could mean different things to different loaders: refused."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise ValueError(str(e)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(str(e)) from None


def read_json_object(path, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in the regular file ``path`` (at most ``limit`` bytes).

    FileNotFoundError if there is none; ModelFileError naming the file for anything else."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise ModelFileError(f"{path} is {st.st_size} bytes, over the {limit}-byte limit "
                                 "for a JSON config")
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except ModelFileError:
        raise
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > limit:
        raise ModelFileError(f"{path} grew past the {limit}-byte limit while being read")
    try:
        obj = parse_json(raw)
    except ValueError as e:
        raise ModelFileError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path} must hold a JSON object, got a JSON {_json_type(obj)}")
    return obj


def _json_type(obj) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(obj), "number")


def check_inside(root, path) -> None:
    """ModelFileError unless ``path``, symlinks resolved, lies inside the directory ``root``.

    The one place a model file may point outside: a Hugging Face cache snapshot
    (``<repo>/snapshots/<revision>``), whose files are symlinks into ``<repo>/blobs``."""
    root, path = os.path.realpath(root), os.fspath(path)
    real = os.path.realpath(path)
    allowed = [root]
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(parent), "blobs"))
    if not any(os.path.commonpath([a, real]) == a for a in allowed):
        raise ModelFileError(f"{path} resolves to {real}, outside the model directory {root}: "
                             "a model file must not be a symlink out of its directory")


@contextlib.contextmanager
def errors_name(path, *types: type[Exception]) -> Iterator[None]:
    """Re-raise an exception of ``types`` (their messages name a field, not a file) as the same
    type with ``path: `` in front of the message."""
    try:
        yield
    except types as e:
        msg = str(e)
        prefix = f"{os.fspath(path)}: "
        if msg.startswith(prefix):
            raise
        raise type(e)(prefix + msg) from None
