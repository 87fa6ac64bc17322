"""What a GGUF model holds, as plain data (the `lvllm gguf info --json` schema,
documented in docs/readme/gguf.md)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .format import KEY_ARCHITECTURE, KEY_SPLIT_NO, KEY_SPLIT_TENSORS_COUNT, VT, KV, GGUFFile, read_gguf
from .names import parse_shard_name
from .shards import split_count_of, validate_shards

SCHEMA_VERSION = 1
ARRAY_HEAD = 8  # array elements shown in "head"

# routed experts, shared experts and the router of MoE blocks (llama.cpp tensor names)
_EXPERT_RE = re.compile(
    r"^blk\.(?P<layer>\d+)\.(?P<kind>ffn_(?:gate|up|down|gate_up)_(?:exps|shexp)|ffn_gate_inp(?:_shexp)?)\.weight$"
)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (np.generic,)):
        return _jsonable(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # strict JSON has no NaN/inf
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def metadata_entry(kv: KV) -> dict[str, Any]:
    if kv.vtype == VT.ARRAY:
        return {"key": kv.key, "type": kv.type_name, "length": len(kv.value),
                "head": _jsonable(kv.value[:ARRAY_HEAD])}
    return {"key": kv.key, "type": kv.type_name, "value": _jsonable(kv.value)}


def expert_layers(tensors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer, the type of each expert-related tensor, sorted by layer."""
    layers: dict[int, dict[str, Any]] = {}
    for t in tensors:
        m = _EXPERT_RE.match(t["name"])
        if not m:
            continue
        layer = layers.setdefault(int(m["layer"]), {"layer": int(m["layer"]), "tensors": {}, "bytes": 0})
        layer["tensors"][m["kind"]] = t["type"]
        layer["bytes"] += t["bytes"]
    return [layers[k] for k in sorted(layers)]


def summarize_layers(layers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of consecutive layers whose expert tensors have the same types:
    [{"first": 0, "last": 23, "tensors": {...}}, ...]."""
    runs: list[dict[str, Any]] = []
    for layer in layers:
        last = runs[-1] if runs else None
        if last and last["last"] == layer["layer"] - 1 and last["tensors"] == layer["tensors"]:
            last["last"] = layer["layer"]
        else:
            runs.append({"first": layer["layer"], "last": layer["layer"], "tensors": dict(layer["tensors"])})
    return runs


def _files_for(path: Path, whole_set: bool) -> tuple[list[GGUFFile], int | None]:
    """The files that make up the model, and split.tensors.count when split."""
    f = read_gguf(path)
    if not whole_set or split_count_of(f) <= 1:
        return [f], None
    name = parse_shard_name(path)
    first = name.path_of(0) if name else path  # validate_shards explains a bad name
    shards = validate_shards(first)
    return list(shards.shards), shards.tensors_count


def read_info(path: str | os.PathLike[str], *, whole_set: bool = True) -> dict[str, Any]:
    """Facts about a GGUF model. When `path` is one shard of a split model and
    `whole_set` is true, every shard is read (and checked) and the model is
    described as a whole; otherwise just this file."""
    path = Path(path)
    files, tensors_count = _files_for(path, whole_set)
    head = files[0]
    tensors = []
    for i, f in enumerate(files):
        for t in f.tensors:
            tensors.append({"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.nbytes,
                            "offset": f.data_offset + t.offset, "file": i})

    by_type: dict[str, dict[str, Any]] = {}
    for t in tensors:
        e = by_type.setdefault(t["type"], {"type": t["type"], "count": 0, "bytes": 0})
        e["count"] += 1
        e["bytes"] += t["bytes"]

    arch = head.value(KEY_ARCHITECTURE)
    layers = expert_layers(tensors)
    experts = None
    if layers:
        experts = {
            "expert_count": _jsonable(head.value(f"{arch}.expert_count")),
            "expert_used_count": _jsonable(head.value(f"{arch}.expert_used_count")),
            "bytes": sum(layer["bytes"] for layer in layers),
            "layers": layers,
            "runs": summarize_layers(layers),
        }

    split = None
    count = split_count_of(head)
    if count:
        split = {
            "count": count,
            "no": _jsonable(head.value(KEY_SPLIT_NO)) if len(files) == 1 else None,
            "tensors_count": _jsonable(tensors_count if tensors_count is not None else head.value(KEY_SPLIT_TENSORS_COUNT)),
            "complete": len(files) == count,
            "shards": [{"path": str(f.path), "tensor_count": len(f.tensors), "tensor_bytes": f.tensor_bytes,
                        "file_bytes": f.file_size} for f in files],
        }

    return {
        "schema": SCHEMA_VERSION,
        "path": str(path),
        "files": [str(f.path) for f in files],
        "gguf_version": head.version,
        "alignment": head.alignment,
        "architecture": arch,
        "name": head.value("general.name"),
        "file_bytes": sum(f.file_size for f in files),
        "tensor_count": len(tensors),
        "tensor_bytes": sum(t["bytes"] for t in tensors),
        "parameters": sum(int(np.prod(t["shape"], dtype=np.int64)) if t["shape"] else 1 for t in tensors),
        "tensor_types": sorted(by_type.values(), key=lambda e: (-e["bytes"], e["type"])),
        "experts": experts,
        "split": split,
        "metadata": [metadata_entry(kv) for kv in head.kvs],
        "tensors": tensors,
    }
