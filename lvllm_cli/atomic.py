"""Write a file whole or not at all: a temporary file in the same directory, then one rename.

Readers see the old file or the new one, never half of one; an interrupted or
failed write leaves the old file (or nothing) in place and no temporary file
behind. The temporary file is created with O_EXCL (mkstemp), so a symlink
planted in its place cannot redirect the write; its name starts with '.' and
ends with '.tmp', so directory readers that skip hidden files skip it.

Standard library only: the vLLM plugin's workers import this (through
lvllm_cli.monitor.engine_metrics).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def replacing(path: str | os.PathLike, *, mode: int = 0o600, binary: bool = False) -> Iterator[IO]:
    """`with replacing(path) as f: f.write(...)`: on a clean exit the file replaces `path`
    (with permissions `mode`); on an exception it is removed and `path` is untouched."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_atomically(path: str | os.PathLike, data: str | bytes, *, mode: int = 0o600) -> Path:
    """Replace `path` with `data` (text as UTF-8) in one step; the path."""
    with replacing(path, mode=mode, binary=isinstance(data, bytes)) as f:
        f.write(data)
    return Path(path)
