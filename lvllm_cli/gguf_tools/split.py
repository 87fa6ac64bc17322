"""Split a GGUF into shards the way llama.cpp's `llama-gguf-split --split`
does (tools/gguf-split/gguf-split.cpp, split_strategy), so llama.cpp, gguf-py
and `lvllm gguf merge` all read the result:

- names PREFIX-00001-of-0000N.gguf;
- tensors in input order, a new shard starting when the next tensor would
  push the shard's padded tensor bytes over --max-size (metadata not
  counted), or at every multiple of --max-tensors;
- shard 1 carries every input KV (old split.* keys dropped) followed by
  split.no (u16), split.tensors.count (i32), split.count (u16) -- that order
  because gguf.cpp re-appends split.count when it sets the final count;
- the other shards carry only those three keys;
- layout as in merge: metadata padded to the alignment, tensors padded too.

With a non-default `general.alignment` (llama.cpp would write unloadable
shards) every shard carries `general.alignment` and is laid out with it.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .copyio import Copier, DiskUsageFn, check_free_space, check_target
from .errors import GGUFToolError, SplitPlanError
from .format import (DEFAULT_ALIGNMENT, KEY_ALIGNMENT, KEY_SPLIT_COUNT, KEY_SPLIT_NO, KEY_SPLIT_TENSORS_COUNT,
                     KV, SPLIT_KEYS, VT, GGUFFile, TensorInfo, encode_metadata, make_kv, pad, read_gguf)
from .names import shard_path, split_prefix
from .shards import split_count_of
from .units import human_bytes
from .writer import CopyStep, OutputPlan, ProgressFn, write_outputs


def group_tensors(sizes: Sequence[int], *, max_size: int | None = None, max_tensors: int | None = None,
                  no_tensor_first_split: bool = False, alignment: int = DEFAULT_ALIGNMENT,
                  names: Sequence[str] | None = None) -> list[list[int]]:
    """Indices of the tensors in each shard (split_strategy's loop).

    Exactly one of max_size (bytes of padded tensor data per shard) and
    max_tensors must be given. With no_tensor_first_split the first shard
    holds metadata only."""
    if (max_size is None) == (max_tensors is None):
        raise SplitPlanError("give exactly one of --max-size and --max-tensors",
                             "for example --max-size 50G or --max-tensors 128")
    if max_size is not None and max_size <= 0:
        raise SplitPlanError(f"--max-size must be positive, not {max_size}")
    if max_tensors is not None and max_tensors <= 0:
        raise SplitPlanError(f"--max-tensors must be at least 1, not {max_tensors}")
    n = len(sizes)
    groups: list[list[int]] = [[]]
    if no_tensor_first_split:
        groups.append([])
    current = 0  # padded tensor bytes in the current shard
    for i, size in enumerate(sizes):
        padded = pad(size, alignment)
        if max_size is not None:
            cut = current + padded > max_size
        else:
            cut = 0 < i < n and i % max_tensors == 0
        if cut:
            if not groups[-1]:
                # llama.cpp stops here too ("one of splits have 0 tensors")
                what = f"tensor '{names[i]}'" if names else f"tensor {i}"
                raise SplitPlanError(
                    f"{what} alone is {human_bytes(padded)} ({padded} bytes), more than --max-size "
                    f"{human_bytes(max_size)} ({max_size} bytes), and would leave a shard without tensors",
                    f"use a --max-size of at least {padded} bytes",
                )
            groups.append([])
            current = padded
        else:
            current += padded
        groups[-1].append(i)
    return groups


def shard_kvs(src: GGUFFile, index: int, count: int, n_tensors: int, alignment: int) -> list[KV]:
    if index == 0:
        kvs = [kv for kv in src.kvs if kv.key not in SPLIT_KEYS]
    elif alignment != DEFAULT_ALIGNMENT:
        kvs = [make_kv(KEY_ALIGNMENT, VT.UINT32, alignment)]
    else:
        kvs = []
    kvs += [
        make_kv(KEY_SPLIT_NO, VT.UINT16, index),
        make_kv(KEY_SPLIT_TENSORS_COUNT, VT.INT32, n_tensors),
        make_kv(KEY_SPLIT_COUNT, VT.UINT16, count),
    ]
    return kvs


def plan_split(src: GGUFFile, prefix: str | os.PathLike[str], *, max_size: int | None = None,
               max_tensors: int | None = None, no_tensor_first_split: bool = False) -> list[OutputPlan]:
    """One OutputPlan per shard; nothing is written."""
    if split_count_of(src) > 1:
        raise GGUFToolError(f"{src.path} is itself one shard of a split model",
                            "merge the shards first (lvllm gguf merge), then split the merged file")
    n = len(src.tensors)
    if n > 2**31 - 1:
        raise SplitPlanError(f"{src.path} has {n} tensors, more than split.tensors.count (i32) can hold")
    alignment = src.alignment
    groups = group_tensors([t.nbytes for t in src.tensors], max_size=max_size, max_tensors=max_tensors,
                           no_tensor_first_split=no_tensor_first_split, alignment=alignment,
                           names=[t.name for t in src.tensors])
    count = len(groups)
    if count > 0xFFFF:
        raise SplitPlanError(f"the split would make {count} shards; split.count (u16) allows 65535",
                             "use a larger --max-size or --max-tensors")
    prefix = split_prefix(prefix)
    plans = []
    for i, group in enumerate(groups):
        tensors: list[TensorInfo] = [src.tensors[j] for j in group]
        meta = encode_metadata(shard_kvs(src, i, count, n, alignment), tensors, alignment)
        steps = tuple(CopyStep(src.path, src.data_offset + t.offset, t.nbytes, pad(t.nbytes, alignment) - t.nbytes)
                      for t in tensors)
        plans.append(OutputPlan(shard_path(prefix, i, count), meta, steps))
    return plans


@dataclass(frozen=True)
class SplitResult:
    outputs: tuple[Path, ...]
    tensors: tuple[int, ...]  # per shard
    sizes: tuple[int, ...]  # bytes per shard
    bytes_written: int
    seconds: float


def summarize(plans: Sequence[OutputPlan]) -> SplitResult:
    return SplitResult(tuple(p.path for p in plans), tuple(len(p.steps) for p in plans),
                       tuple(p.size for p in plans), sum(p.size for p in plans), 0.0)


def split(src: str | os.PathLike[str], prefix: str | os.PathLike[str], *, max_size: int | None = None,
          max_tensors: int | None = None, no_tensor_first_split: bool = False, force: bool = False,
          dry_run: bool = False, progress: ProgressFn | None = None,
          disk_usage: DiskUsageFn = shutil.disk_usage, copier: Copier | None = None) -> SplitResult:
    """Plan, check targets and free space, then write every shard (all or nothing)."""
    source = read_gguf(src)
    plans = plan_split(source, prefix, max_size=max_size, max_tensors=max_tensors,
                       no_tensor_first_split=no_tensor_first_split)
    for p in plans:
        check_target(p.path, force=force, inputs=[source.path])
    result = summarize(plans)
    if dry_run:
        return result
    check_free_space(plans[0].path.parent, result.bytes_written, f"{len(plans)} shards", disk_usage)
    t0 = time.perf_counter()
    written = write_outputs(plans, progress=progress, copier=copier)
    return SplitResult(result.outputs, result.tensors, result.sizes, written, time.perf_counter() - t0)
