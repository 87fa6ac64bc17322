"""What the machine is, read from the kernel's own files.

`probe()` returns a `Machine` (lvllm_cli.machine).  Every file is read relative
to a root: the argument, else $LVLLM_SYSROOT, else "/".  A captured tree (see
lvllm_cli.capture) replays another machine; what is not in any file there (the
NVML GPU list, the size of /dev/shm) comes from the capture's JSON.

Missing or malformed files never raise: they land in `Machine.read_problems`.
"""

from __future__ import annotations

import json
import os

from lvllm_cli.machine import Machine
from lvllm_cli.probe.cpu import read_cpu
from lvllm_cli.probe.gpu import gpu_from_dict, merge_gpus, read_nvml_gpus, read_sysfs_gpus
from lvllm_cli.probe.memory import read_memory
from lvllm_cli.probe.numa import read_numa, single_node
from lvllm_cli.probe.sysfs import CAPTURE_JSON, SysReader

__all__ = ["probe", "collect", "resolve_sysroot", "SysReader", "CAPTURE_JSON"]

SYSROOT_ENV = "LVLLM_SYSROOT"


def resolve_sysroot(sysroot: str | None = None) -> str:
    """The argument, else $LVLLM_SYSROOT, else '/'."""
    return os.path.abspath(sysroot or os.environ.get(SYSROOT_ENV) or "/")


def probe(sysroot: str | None = None, use_nvml: bool = True) -> Machine:
    return collect(sysroot, use_nvml)[0]


def collect(sysroot: str | None = None, use_nvml: bool = True) -> tuple[Machine, SysReader, dict]:
    """The machine, the reader (with every file it read) and the non-file facts used (for a capture)."""
    r = SysReader(resolve_sysroot(sysroot))
    extra = _captured_extra(r) if not r.live else {}

    numa = read_numa(r)
    node_of = {cpu: n.id for n in numa for cpu in n.cpus}
    cpu = read_cpu(r, node_of)
    memory = read_memory(r, extra.get("shm_bytes"))
    if not numa:
        numa = [single_node([c.id for c in cpu.online], memory.total_bytes, memory.available_bytes)]

    sysfs_gpus = read_sysfs_gpus(r)
    if r.live:
        nvml, nvml_error = read_nvml_gpus() if use_nvml else ([], "NVML not queried")
    else:
        nvml_part = extra.get("nvml") or {}
        nvml = []
        for d in nvml_part.get("gpus") or []:
            try:
                nvml.append(gpu_from_dict(d))
            except (TypeError, ValueError) as e:
                r.problem(f"/{CAPTURE_JSON}", f"malformed GPU entry: {e}")
        nvml_error = nvml_part.get("error") if "nvml" in extra else "no NVML data in the captured tree"
    gpus = merge_gpus(nvml, sysfs_gpus)

    machine = Machine(cpu=cpu, numa=numa, memory=memory, gpus=gpus, sysroot=r.root,
                      read_problems=list(r.problems), nvml_error=nvml_error)
    used = {"shm_bytes": memory.shm_bytes,
            "nvml": {"error": nvml_error, "gpus": [_asdict(g) for g in nvml]}}
    return machine, r, used


def _captured_extra(r: SysReader) -> dict:
    path = r.real(CAPTURE_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        r.problem(f"/{CAPTURE_JSON}", f"malformed: {e}")
        return {}
    if not isinstance(data, dict):
        r.problem(f"/{CAPTURE_JSON}", "malformed: not a JSON object")
        return {}
    return data


def _asdict(g) -> dict:
    from dataclasses import asdict

    return asdict(g)
