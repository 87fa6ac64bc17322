"""Reading the kernel's files under a root, never raising.

Every successful read is remembered (path and exact text) so that
`lvllm doctor --capture` can bundle precisely what the probe looked at and
nothing else.  Failures are recorded as (path, reason) for doctor.
"""

from __future__ import annotations

import os
import re
from typing import Callable, TypeVar

T = TypeVar("T")

# What a capture carries besides the kernel's files (NVML's GPU list, the size
# of /dev/shm), at the root of the captured tree.
CAPTURE_JSON = "lvllm-capture.json"

# Kernel files are small; anything bigger is not what we think it is.
_MAX_BYTES = 4 << 20
# /proc/sys handlers allocate a kernel buffer as large as the read request
# (ENOMEM for a 4 MiB read), so read in modest chunks.
_CHUNK = 64 << 10


def _read_bounded(f) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size <= _MAX_BYTES:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class SysReader:
    def __init__(self, root: str = "/"):
        self.root = os.path.abspath(root)
        self.problems: list[tuple[str, str]] = []
        self.files: dict[str, str] = {}  # kernel path ("/proc/meminfo") -> text read

    @property
    def live(self) -> bool:
        return self.root == "/"

    def real(self, path: str) -> str:
        """The file on this machine for a kernel path such as '/proc/meminfo'."""
        return os.path.join(self.root, path.lstrip("/"))

    def problem(self, path: str, reason: str) -> None:
        if (path, reason) not in self.problems:
            self.problems.append((path, reason))

    def exists(self, path: str) -> bool:
        return os.path.exists(self.real(path))

    def isdir(self, path: str) -> bool:
        return os.path.isdir(self.real(path))

    def listdir(self, path: str, pattern: str = r".*") -> list[str]:
        """Names in a directory matching a regex, in natural order ('cpu2' before 'cpu10'); [] if absent."""
        try:
            names = os.listdir(self.real(path))
        except OSError:
            return []
        return sorted((n for n in names if re.fullmatch(pattern, n)), key=_natural_key)

    def text(self, path: str, required: bool = True) -> str | None:
        """The file's text, or None.  A missing file is a problem only when `required`."""
        try:
            with open(self.real(path), "rb") as f:
                data = _read_bounded(f)
        except FileNotFoundError:
            if required:
                self.problem(path, "missing")
            return None
        except OSError as e:
            self.problem(path, f"unreadable: {e.strerror or e}")
            return None
        if len(data) > _MAX_BYTES:
            self.problem(path, "implausibly large")
            return None
        text = data.decode("utf-8", errors="replace")
        self.files[path] = text
        return text

    def parse(self, path: str, parser: Callable[[str], T], required: bool = True, default=None) -> T | None:
        """Read and parse; a malformed file is always a problem, a missing one only when `required`."""
        text = self.text(path, required=required)
        if text is None:
            return default
        try:
            return parser(text)
        except ValueError as e:
            self.problem(path, f"malformed: {e}")
            return default
