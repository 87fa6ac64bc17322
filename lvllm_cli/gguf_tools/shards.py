"""Find and check every shard of a split GGUF before anything is written."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DuplicateTensorError, MissingShardError, ShardSetError
from .format import (KEY_SPLIT_COUNT, KEY_SPLIT_NO, KEY_SPLIT_TENSORS_COUNT, VALUE_TYPE_NAMES, VT,
                     GGUFFile, read_gguf)
from .names import ShardName, parse_shard_name


@dataclass(frozen=True)
class ShardSet:
    """A complete, consistent set of shards, in order."""

    name: ShardName
    shards: tuple[GGUFFile, ...]
    tensors_count: int  # split.tensors.count, checked against the shards

    @property
    def first(self) -> GGUFFile:
        return self.shards[0]

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.shards]

    @property
    def tensor_bytes(self) -> int:
        return sum(s.tensor_bytes for s in self.shards)


def _split_value(f: GGUFFile, key: str, vtype: VT) -> int | None:
    kv = f.get(key)
    if kv is None:
        return None
    if kv.vtype != vtype:
        raise ShardSetError(f"{f.path}: '{key}' is a {kv.type_name}, expected {VALUE_TYPE_NAMES[vtype]}",
                            "the shard was not written by llama.cpp's or gguf-py's splitter")
    return int(kv.value)


def split_count_of(f: GGUFFile) -> int:
    """split.count of a file; 0 when absent (an unsplit or merged file)."""
    return _split_value(f, KEY_SPLIT_COUNT, VT.UINT16) or 0


def validate_shards(first: str | os.PathLike[str]) -> ShardSet:
    """Locate the shards named after `first` (PREFIX-00001-of-0000N.gguf) and
    check them all: present and readable GGUF, split.no in sequence,
    split.count and split.tensors.count consistent, tensors adding up, no
    tensor name twice, tensor data within each file. Raises a ShardSetError
    (or a GGUF reading error naming the shard) on the first problem."""
    first = Path(first)
    name = parse_shard_name(first)
    if name is None:
        if not first.is_file():
            raise MissingShardError(f"{first} does not exist", "check the path")
        f = read_gguf(first)
        count = split_count_of(f)
        if count == 0:
            raise ShardSetError(f"{first} is not a split GGUF ('{KEY_SPLIT_COUNT}' is absent or 0): there is nothing to merge",
                                "it can be used as it is")
        raise ShardSetError(
            f"{first} says it is shard {(_split_value(f, KEY_SPLIT_NO, VT.UINT16) or 0) + 1} of {count} "
            f"but its name does not end in -00001-of-{count:05d}.gguf",
            "llama.cpp finds the other shards by name: rename the shards back to PREFIX-0000k-of-0000N.gguf",
        )
    if name.number != 1:
        raise ShardSetError(f"{first} is shard {name.number} of {name.count}, not the first one",
                            f"pass the first shard: {name.path_of(0)}")

    paths = [name.path_of(i) for i in range(name.count)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        listed = ", ".join(str(p) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MissingShardError(f"{len(missing)} of {name.count} shards are missing: {listed}",
                                "download the missing shards into the same directory")

    shards = tuple(read_gguf(p) for p in paths)
    head = shards[0]
    tensors_count = _split_value(head, KEY_SPLIT_TENSORS_COUNT, VT.INT32)
    if tensors_count is None:
        raise ShardSetError(f"{head.path} has no '{KEY_SPLIT_TENSORS_COUNT}'",
                            "the shard was not written by llama.cpp's or gguf-py's splitter")

    owner: dict[str, Path] = {}
    for i, s in enumerate(shards):
        no = _split_value(s, KEY_SPLIT_NO, VT.UINT16)
        count = _split_value(s, KEY_SPLIT_COUNT, VT.UINT16)
        if no is None or count is None:
            raise ShardSetError(f"{s.path} has no '{KEY_SPLIT_NO if no is None else KEY_SPLIT_COUNT}': it is not a shard",
                                "make sure every PREFIX-0000k-of-0000N.gguf file comes from the same split")
        if count != name.count:
            raise ShardSetError(f"{s.path} says the model has {count} shards, but the file names say {name.count}",
                                "the files come from different splits; download the set again")
        if no != i:
            raise ShardSetError(f"{s.path} holds shard number {no + 1} ({KEY_SPLIT_NO}={no}) but is named as shard {i + 1}",
                                "the shards were renamed or mixed up; restore their original names")
        tc = _split_value(s, KEY_SPLIT_TENSORS_COUNT, VT.INT32)
        if tc is not None and tc != tensors_count:
            raise ShardSetError(f"{s.path} says the model has {tc} tensors but {head.path} says {tensors_count}",
                                "the files come from different splits; download the set again")
        for t in s.tensors:
            if t.name in owner:
                raise DuplicateTensorError(f"tensor '{t.name}' is in both {owner[t.name]} and {s.path}",
                                           "the files come from different splits; download the set again")
            owner[t.name] = s.path

    found = sum(len(s.tensors) for s in shards)
    if found != tensors_count:
        raise ShardSetError(f"the {name.count} shards hold {found} tensors but '{KEY_SPLIT_TENSORS_COUNT}' says {tensors_count}",
                            "a shard is from a different split or damaged; download the set again")
    return ShardSet(name, shards, tensors_count)
