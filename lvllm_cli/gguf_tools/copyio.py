"""Streaming byte copies and all-or-nothing output files.

Tensor data is moved in bounded pieces through one reused 1 MiB buffer
(optionally with `os.copy_file_range`, which keeps the bytes in the kernel
but measured slower on the dev VM), with page-cache hints so that a copy of
tens of GB neither floods the cache nor stalls in page reclaim and dirty
throttling (pagecache.py). Outputs are written to hidden temporary files in the
destination directory and renamed into place only once complete and
fsynced, so an error, Ctrl-C or SIGTERM (the CLI turns it into
KeyboardInterrupt) never leaves a partial file under the final name.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from . import pagecache
from .errors import InsufficientSpaceError, OutputExistsError, OutputPathError, TruncatedGGUFError
from .units import human_bytes

Progress = Callable[[int], None]  # called with the number of bytes just written

# Bytes per step: the progress granularity and the unit of the page-cache
# hints (drop behind, write behind two chunks later). 8, 32 and 128 MiB all
# measured 1.0-1.2 GB/s on the dev VM (docs/notes/gguf-perf.md).
COPY_CHUNK = 32 * 1024 * 1024
# The one buffer. Small on purpose: a buffer that stays in the CPU cache
# copied page cache -> disk at 1.1 GB/s where a 16 MiB one managed
# 0.3-0.45 GB/s on the same VM; with the hints, 256 KiB, 1 MiB and 4 MiB
# all measured 1.0-1.3 GB/s (docs/notes/gguf-perf.md).
BUFFER_SIZE = 1024 * 1024

# copy_file_range refuses some file pairs (other filesystems, old kernels, FUSE...)
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM}


class Copier:
    """Copies byte ranges between open files with bounded memory.

    use_copy_file_range: move the bytes with os.copy_file_range instead of
    the buffer (falling back to the buffer where the kernel refuses). Off by
    default: with the page-cache hints it copied 0.85-0.93 GB/s where the
    buffer copied 1.20-1.22 GB/s, side by side on the dev VM; kept for
    filesystems that can copy without moving the bytes (NFS 4.2 server-side
    copy, reflinks). manage_cache: the page-cache hints of pagecache.py
    (drop the sources behind the copy, write the output behind it)."""

    def __init__(self, *, use_copy_file_range: bool = False, chunk: int = COPY_CHUNK,
                 buffer_size: int = BUFFER_SIZE, manage_cache: bool = True):
        self.fast = use_copy_file_range and hasattr(os, "copy_file_range")
        self.chunk = chunk
        self.buffer_size = buffer_size
        self.manage_cache = manage_cache
        self._buf: memoryview | None = None

    def open_source(self, path: Path) -> io.FileIO:
        src = io.FileIO(path, "rb")
        if self.manage_cache:
            pagecache.read_sequentially(src.fileno())
        return src

    def copy(self, src: io.FileIO, offset: int, nbytes: int, dst: io.FileIO,
             progress: Progress | None = None) -> None:
        """Append src[offset:offset+nbytes] at dst's current position."""
        done = 0
        while done < nbytes:
            want = min(self.chunk, nbytes - done)
            got = self._copy_some(src, offset + done, want, dst)
            if got == 0:
                raise TruncatedGGUFError(
                    f"{src.name} ended at byte {offset + done} while copying tensor data that runs to byte "
                    f"{offset + nbytes}; was it changed or truncated during the copy?",
                    "check the file and run the command again",
                )
            if self.manage_cache:
                pagecache.drop_read(src.fileno(), offset + done, got)
                pagecache.write_behind(dst.fileno(), dst.tell(), got, lag=2 * self.chunk)
            done += got
            if progress is not None:
                progress(got)

    def _copy_some(self, src: io.FileIO, offset: int, want: int, dst: io.FileIO) -> int:
        """Copy up to `want` bytes; fewer only at the end of src."""
        if self.fast:
            try:
                return os.copy_file_range(src.fileno(), dst.fileno(), want, offset)
            except OSError as e:
                if e.errno not in _FALLBACK_ERRNOS:
                    raise
                self.fast = False  # nothing was copied by the failed call
        if self._buf is None:
            self._buf = memoryview(bytearray(self.buffer_size))
        src.seek(offset)
        done = 0
        while done < want:
            view = self._buf[:min(want - done, self.buffer_size)]
            got = src.readinto(view) or 0
            if got == 0:
                break
            write_all(dst, view[:got])
            done += got
        return done


def write_all(dst: io.FileIO, data: bytes | memoryview) -> None:
    """FileIO.write may write less than asked; loop until everything is out."""
    view = memoryview(data)
    while view:
        n = dst.write(view)
        if not n:
            raise OSError(errno.EIO, "write returned 0", dst.name)
        view = view[n:]


class StagedOutputs:
    """Context manager: temporary files next to `targets`, renamed over them by
    `commit()`; on any exception (KeyboardInterrupt included) before commit,
    the temporaries are removed and nothing changes under the target names."""

    def __init__(self, targets: Sequence[Path]):
        self.targets = [Path(t) for t in targets]
        self.temps: list[Path] = []
        self.files: list[io.FileIO] = []
        self._committed = False

    def __enter__(self) -> "StagedOutputs":
        try:
            for target in self.targets:
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
                self.temps.append(Path(tmp))
                self.files.append(io.FileIO(fd, "wb", closefd=True))
        except BaseException:
            self._discard()
            raise
        return self

    def commit(self) -> None:
        mode = 0o666 & ~_umask()  # mkstemp makes 0600; give the usual permissions
        for f in self.files:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
            f.close()
        renamed: list[Path] = []
        try:
            for tmp, target in zip(self.temps, self.targets):
                os.replace(tmp, target)
                renamed.append(target)
        except BaseException:
            # half a set of shards is worse than none
            for target in renamed:
                _unlink(target)
            raise
        self._committed = True
        for d in {t.parent for t in self.targets}:
            _fsync_dir(d)

    def _discard(self) -> None:
        for f in self.files:
            try:
                f.close()
            except OSError:
                pass
        for tmp in self.temps:
            _unlink(tmp)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._committed:
            self._discard()
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # not every platform lets directories be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


DiskUsageFn = Callable[[Path], DiskUsage]

# room for the filesystem's own bookkeeping on top of the file itself
SPACE_MARGIN = 16 * 1024 * 1024


def check_free_space(directory: Path, needed: int, what: str,
                     disk_usage: DiskUsageFn = shutil.disk_usage) -> None:
    free = disk_usage(directory).free
    if free < needed + SPACE_MARGIN:
        raise InsufficientSpaceError(
            f"not enough disk space in {directory}: {what} needs {human_bytes(needed)} "
            f"but only {human_bytes(free)} is free",
            "free some space or choose an output on another disk",
        )


def check_target(target: Path, *, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse to write `target` over one of the inputs (ever) or over an
    existing file (without force), or into a directory that does not exist."""
    for src in inputs:
        if target.exists() and os.path.samefile(target, src):
            raise OutputPathError(f"{target} is one of the input files", "choose another output path")
    if target.is_dir():
        raise OutputPathError(f"{target} is a directory", "give a file path for the output")
    if target.exists() and not force:
        raise OutputExistsError(f"{target} already exists", "pass --force to replace it, or choose another output path")
    if not target.parent.is_dir():
        raise OutputPathError(f"the directory {target.parent} does not exist", "create it first or choose another output path")
