"""`lvllm doctor --capture`: the kernel files the probe read, as a tar.gz for a bug report.

The archive holds exactly the /proc and /sys files the probe read (hardware
facts only: no environment, host name, command lines or user files), plus
lvllm-capture.json with what no file holds (NVML's GPU list, /dev/shm size).
`probe(sysroot=<extracted dir>)` replays it; `open_sysroot` extracts safely.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile

from lvllm_cli import __version__
from lvllm_cli.atomic import replacing
from lvllm_cli.probe import CAPTURE_JSON, collect

CAPTURE_FORMAT = 1
# Only these trees are ever captured (the probe reads nothing else, but a
# capture must not carry anything else even if it one day does).
_ALLOWED_PREFIXES = ("/proc/", "/sys/")
_MAX_MEMBER_BYTES = 4 << 20
_MAX_MEMBERS = 200_000


def write_capture(out_path: str, sysroot: str | None = None, use_nvml: bool = True) -> int:
    """Write the capture atomically (temp file + rename); returns the number of kernel files in it."""
    _machine, reader, extra = collect(sysroot, use_nvml)
    files = {p: t for p, t in reader.files.items() if p.startswith(_ALLOWED_PREFIXES)}
    meta = {"format": CAPTURE_FORMAT, "lvllm_version": __version__, **extra}

    with replacing(os.path.abspath(out_path), mode=0o644, binary=True) as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for path in sorted(files):
            _add(tar, path.lstrip("/"), files[path].encode("utf-8"))
        _add(tar, CAPTURE_JSON, json.dumps(meta, indent=1, sort_keys=True).encode("utf-8"))
    return len(files)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # no timestamps: nothing about when or where it was taken
    tar.addfile(info, io.BytesIO(data))


def open_sysroot(path: str) -> tuple[str, str | None]:
    """(root to probe, temp dir to delete afterwards or None).  A directory is used as is;
    a capture archive is extracted into a fresh temp dir, accepting only plain files and
    directories with relative, non-escaping names.  Raises ValueError with a user-facing reason."""
    if os.path.isdir(path):
        return os.path.abspath(path), None
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such directory or capture file")
    try:
        tar = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path}: not a capture archive ({e})") from None
    tmp = tempfile.mkdtemp(prefix="lvllm-sysroot-")
    try:
        with tar:
            count = 0
            for member in tar:
                count += 1
                if count > _MAX_MEMBERS:
                    raise ValueError(f"{path}: too many entries for a capture")
                name = os.path.normpath(member.name)
                if name.startswith(("/", "..")) or os.path.isabs(name):
                    raise ValueError(f"{path}: unsafe entry name {member.name!r}")
                if member.isdir():
                    os.makedirs(os.path.join(tmp, name), exist_ok=True)
                    continue
                if not member.isfile():
                    raise ValueError(f"{path}: entry {member.name!r} is not a plain file")
                if member.size > _MAX_MEMBER_BYTES:
                    raise ValueError(f"{path}: entry {member.name!r} is implausibly large")
                dest = os.path.join(tmp, name)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                src = tar.extractfile(member)
                with open(dest, "wb") as f:
                    f.write(src.read() if src else b"")
    except (ValueError, tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"{path}: damaged capture archive ({e})") from None
    return tmp, tmp
