"""Writing a file so that no reader, and no crash or Ctrl-C, ever leaves it half-written."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None], *, fsync: bool = False) -> None:
    """write(tmp) into a temporary file beside ``path``, then rename it over ``path``.

    The result is 0644 (mkstemp and safetensors create 0600 files; outputs should be readable like
    any other file). On any failure the temporary file is removed and ``path`` is left as it was.
    ``fsync``: flush the data to disk before the rename (for files that must survive a power cut)."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    except PermissionError as exc:
        raise PermissionError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
