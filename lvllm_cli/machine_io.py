"""Getting a `Machine`: probe this one, or read one saved as JSON (`Machine.to_dict()` output).

A saved machine lets `lvllm tune --machine FILE` plan for another box (or a
bug reporter's), and lets tests drive the CLI with fixture machines.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from lvllm_cli.machine import CpuInfo, GpuInfo, LogicalCpu, Machine, MemoryInfo, NumaNode


class MachineError(ValueError):
    pass


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise MachineError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise MachineError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        return cls(**data)
    except TypeError as e:
        raise MachineError(f"{where}: {e}") from None


def machine_from_dict(d: Any) -> Machine:
    """Inverse of Machine.to_dict(); also accepts {"machine": {...}} as written by reports."""
    if isinstance(d, dict) and "machine" in d and "cpu" not in d:
        d = d["machine"]
    if not isinstance(d, dict):
        raise MachineError("a machine file holds a JSON object (Machine.to_dict())")
    d = dict(d)
    cpu = dict(d.get("cpu") or {})
    cpu["online"] = [_build(LogicalCpu, c, f"cpu.online[{i}]") for i, c in enumerate(cpu.get("online") or [])]
    d["cpu"] = _build(CpuInfo, cpu, "cpu")
    d["numa"] = [_build(NumaNode, n, f"numa[{i}]") for i, n in enumerate(d.get("numa") or [])]
    d["memory"] = _build(MemoryInfo, d.get("memory") or {}, "memory")
    d["gpus"] = [_build(GpuInfo, g, f"gpus[{i}]") for i, g in enumerate(d.get("gpus") or [])]
    d["read_problems"] = [tuple(p) for p in d.get("read_problems") or []]
    return _build(Machine, d, "machine")


def load_machine_file(path: Path) -> Machine:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MachineError(f"machine file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MachineError(f"machine file {path} is not readable JSON: {e}") from None
    try:
        return machine_from_dict(data)
    except MachineError as e:
        raise MachineError(f"machine file {path}: {e}") from None


def probe_this_machine() -> Machine:
    """Probe the machine lvllm runs on (lvllm_cli.probe, written by the doctor issue)."""
    try:
        from lvllm_cli.probe import probe
    except ImportError:
        raise MachineError(
            "this build has no machine probe (lvllm_cli.probe): pass --machine FILE with a saved machine description"
        ) from None
    return probe()
