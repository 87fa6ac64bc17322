"""Shard file names, as llama.cpp's llama_split_path / llama_split_prefix
spell them: PREFIX-00001-of-00005.gguf (1-based, five digits at least)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_SHARD_RE = re.compile(r"(?P<stem>.+)-(?P<no>\d{5,})-of-(?P<count>\d{5,})\.gguf", re.DOTALL)


def shard_path(prefix: str | os.PathLike[str], index: int, count: int) -> Path:
    """Path of shard `index` (0-based, like llama_split_path) of `count`."""
    return Path(f"{os.fspath(prefix)}-{index + 1:05d}-of-{count:05d}.gguf")


@dataclass(frozen=True)
class ShardName:
    prefix: Path  # the path without "-0000k-of-0000n.gguf"
    number: int  # 1-based, as in the file name
    count: int

    def path_of(self, index: int) -> Path:
        return shard_path(self.prefix, index, self.count)

    @property
    def merged_path(self) -> Path:
        """Where `merge` writes by default: PREFIX.gguf next to the shards."""
        return self.prefix.with_name(self.prefix.name + ".gguf")


def parse_shard_name(path: str | os.PathLike[str]) -> ShardName | None:
    """The prefix/number/count encoded in a shard's name, or None if the name
    is not one that llama.cpp would have written."""
    p = Path(path)
    m = _SHARD_RE.fullmatch(p.name)
    if not m:
        return None
    number, count = int(m["no"]), int(m["count"])
    prefix = p.with_name(m["stem"])
    # llama.cpp zero-pads to exactly five digits; anything else is not its name
    if number < 1 or count < 1 or shard_path(prefix, number - 1, count).name != p.name:
        return None
    return ShardName(prefix, number, count)


def split_prefix(out_prefix: str | os.PathLike[str]) -> Path:
    """The prefix `split` names its shards after. A trailing ".gguf" is
    dropped so that `split in.gguf out.gguf` gives out-00001-of-0000N.gguf."""
    p = Path(out_prefix)
    return p.with_name(p.name[: -len(".gguf")]) if p.name.endswith(".gguf") and p.name != ".gguf" else p
