"""Merge the shards of a split GGUF into one file, byte for byte what
llama.cpp's `llama-gguf-split --merge` writes (tools/gguf-split/gguf-split.cpp,
gguf_merge):

- KVs: the first shard's, in its order, except that `split.count` is set to 0,
  which in gguf.cpp removes the key and appends it at the end
  (gguf_set_val_u16 = gguf_remove_key + emplace_back). `split.no` and
  `split.tensors.count` stay.
- tensors: every shard's tensor infos in shard order, offsets recomputed.
- layout: metadata padded to the alignment, then each tensor's bytes padded
  with zeros to the alignment (the last one too).

One deliberate difference: llama.cpp always lays out with 32 bytes even when
`general.alignment` says otherwise, which yields a file ggml cannot load; we
use the first shard's `general.alignment`. With the default of 32 the two
agree exactly.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .copyio import Copier, DiskUsageFn, check_free_space, check_target
from .format import KEY_SPLIT_COUNT, VT, encode_metadata, make_kv, pad
from .shards import ShardSet, validate_shards
from .writer import CopyStep, OutputPlan, ProgressFn, write_outputs


def plan_merge(shards: ShardSet, out: Path) -> OutputPlan:
    first = shards.first
    kvs = [kv for kv in first.kvs if kv.key != KEY_SPLIT_COUNT]
    kvs.append(make_kv(KEY_SPLIT_COUNT, VT.UINT16, 0))  # "do not trigger merge" again, as llama.cpp puts it
    alignment = first.alignment
    tensors = [t for s in shards.shards for t in s.tensors]
    steps = tuple(
        CopyStep(s.path, s.data_offset + t.offset, t.nbytes, pad(t.nbytes, alignment) - t.nbytes)
        for s in shards.shards for t in s.tensors
    )
    return OutputPlan(out, encode_metadata(kvs, tensors, alignment), steps)


def default_merge_output(shards: ShardSet, out: str | os.PathLike[str] | None) -> Path:
    """OUT as given; PREFIX.gguf next to the shards when omitted; inside OUT
    when OUT is an existing directory."""
    if out is None:
        return shards.name.merged_path
    out = Path(out)
    return out / shards.name.merged_path.name if out.is_dir() else out


@dataclass(frozen=True)
class MergeResult:
    output: Path
    shards: int
    tensors: int
    bytes_written: int
    seconds: float


def merge(first: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
          force: bool = False, progress: ProgressFn | None = None,
          disk_usage: DiskUsageFn = shutil.disk_usage, copier: Copier | None = None) -> MergeResult:
    """Validate every shard, check the output and the free space, then stream
    the tensors into a temporary file renamed to OUT at the end."""
    shards = validate_shards(first)
    target = default_merge_output(shards, out)
    check_target(target, force=force, inputs=shards.paths)
    plan = plan_merge(shards, target)
    check_free_space(target.parent, plan.size, f"the merged file {target.name}", disk_usage)
    t0 = time.perf_counter()
    written = write_outputs([plan], progress=progress, copier=copier)
    return MergeResult(target, len(shards.shards), shards.tensors_count, written, time.perf_counter() - t0)
