"""Range lists such as "0-3,8,10-11": CPU lists (the kernel's cpulist format) and layer lists.

One parser for every place that reads or writes these strings: the planner
writes them into LK_CPUS / LVLLM_RANK_CPUS / LVLLM_GPU_LAYERS, the vLLM plugin
and the doctor read them back.  Parsed lists are sorted and free of duplicates;
formatting a parsed list gives the canonical (shortest) spelling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NUMBER = re.compile(r"[0-9]+")
# No machine has a million CPUs or a model a million layers; the cap keeps a typo from allocating gigabytes.
_LIMIT = 1 << 20


def _parse(text: str, what: str) -> list[int]:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string like '0-3,8', got {type(text).__name__}")
    out: set[int] = set()
    stripped = text.strip()
    if not stripped:
        return []
    for raw in stripped.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"bad {what} {text!r}: empty item (two commas in a row, or a trailing comma)")
        lo_txt, dash, hi_txt = item.partition("-")
        lo_txt, hi_txt = lo_txt.strip(), hi_txt.strip()
        if not _NUMBER.fullmatch(lo_txt) or (dash and not _NUMBER.fullmatch(hi_txt)):
            raise ValueError(
                f"bad {what} {text!r}: {item!r} is not a number or a range 'a-b' of non-negative integers"
            )
        lo = int(lo_txt)
        hi = int(hi_txt) if dash else lo
        if hi < lo:
            raise ValueError(f"bad {what} {text!r}: range {item!r} runs backwards (write {hi}-{lo})")
        if hi >= _LIMIT:
            raise ValueError(f"bad {what} {text!r}: {hi} is implausibly large (limit {_LIMIT - 1})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _format(values: Iterable[int], what: str) -> str:
    nums = sorted(set(values))
    for v in nums:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what} entries must be non-negative integers, got {v!r}")
    parts: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8]; '' -> []. Raises ValueError naming the bad part."""
    return _parse(text, "cpulist")


def format_cpulist(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'; [] -> ''."""
    return _format(cpus, "cpulist")


def parse_layer_ranges(text: str, num_layers: int) -> list[int]:
    """'0-3,46-47' -> [0, 1, 2, 3, 46, 47], every index checked against the model's layer count."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative integer, got {num_layers!r}")
    layers = _parse(text, "layer list")
    if layers and layers[-1] >= num_layers:
        valid = f"0-{num_layers - 1}" if num_layers else "none"
        raise ValueError(
            f"bad layer list {text!r}: layer {layers[-1]} is out of range; "
            f"the model has {num_layers} layers (valid: {valid})"
        )
    return layers


def format_layer_ranges(layers: Iterable[int]) -> str:
    """[0, 1, 2, 3, 46, 47] -> '0-3,46-47'; [] -> ''."""
    return _format(layers, "layer list")


def parse_rank_lists(text: str, ranks: int | None = None) -> list[list[int]]:
    """'0-15|16-31' -> [[0..15], [16..31]]: one cpulist per rank, '|' separated (LVLLM_RANK_CPUS/NODES)."""
    parts = text.split("|")
    if ranks is not None and len(parts) != ranks:
        raise ValueError(f"bad per-rank list {text!r}: {len(parts)} entries for {ranks} ranks")
    return [parse_cpulist(p) for p in parts]


def format_rank_lists(lists: Iterable[Iterable[int]]) -> str:
    return "|".join(format_cpulist(x) for x in lists)
