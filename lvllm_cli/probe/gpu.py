"""NVIDIA GPUs: from NVML when the driver answers, from /sys/bus/pci otherwise, merged by PCI bus id.

sysfs alone knows which NUMA node a GPU hangs off and its PCIe link even
without a driver; NVML adds name, VRAM, compute capability and driver.
"""

from __future__ import annotations

from dataclasses import fields, replace

from lvllm_cli.machine import GpuInfo
from lvllm_cli.probe import formats
from lvllm_cli.probe.sysfs import SysReader

PCI_DIR = "/sys/bus/pci/devices"
NVIDIA_VENDOR = 0x10DE
# PCI class (upper 16 bits of the 24-bit class code): VGA controller, 3D controller.
GPU_CLASSES = (0x0300, 0x0302)


def read_sysfs_gpus(r: SysReader) -> list[GpuInfo]:
    gpus: list[GpuInfo] = []
    for dev in r.listdir(PCI_DIR, r"[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]"):
        base = f"{PCI_DIR}/{dev}"
        if r.parse(f"{base}/vendor", formats.hex_id) != NVIDIA_VENDOR:
            continue
        cls = r.parse(f"{base}/class", formats.hex_id)
        if cls is None or (cls >> 8) not in GPU_CLASSES:
            continue
        device = r.parse(f"{base}/device", formats.hex_id, required=False)
        node = r.parse(f"{base}/numa_node", formats.integer)
        gpus.append(GpuInfo(
            index=len(gpus),
            name=f"NVIDIA GPU [10de:{device:04x}]" if device is not None else "NVIDIA GPU",
            pci_bus_id=formats.normalize_bus_id(dev),
            numa_node=node if node is not None and node >= 0 else None,
            # The link files exist only for PCIe devices on kernels >= 4.13.
            pcie_gen_current=r.parse(f"{base}/current_link_speed", formats.pcie_gen, required=False),
            pcie_gen_max=r.parse(f"{base}/max_link_speed", formats.pcie_gen, required=False),
            pcie_width_current=r.parse(f"{base}/current_link_width", formats.link_width, required=False),
            pcie_width_max=r.parse(f"{base}/max_link_width", formats.link_width, required=False),
            source="sysfs",
        ))
    return gpus


def read_nvml_gpus() -> tuple[list[GpuInfo], str | None]:
    """(GPUs, None) when NVML answers, ([], why not) otherwise.  Never raises."""
    try:
        import pynvml
    except Exception as e:  # ImportError, or a broken install
        return [], f"nvidia-ml-py not importable: {e}"
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return [], f"NVML: {e}"
    try:
        driver = _try(lambda: _str(pynvml.nvmlSystemGetDriverVersion()))
        cuda = _try(lambda: _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion_v2())) or \
            _try(lambda: _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion()))
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = _try(lambda: pynvml.nvmlDeviceGetMemoryInfo(h))
            cc = _try(lambda: pynvml.nvmlDeviceGetCudaComputeCapability(h))
            bus = _try(lambda: formats.normalize_bus_id(_str(pynvml.nvmlDeviceGetPciInfo(h).busId)))
            node = _try(lambda: pynvml.nvmlDeviceGetNumaNodeId(h))
            gpus.append(GpuInfo(
                index=i,
                name=_try(lambda: _str(pynvml.nvmlDeviceGetName(h))) or "NVIDIA GPU",
                pci_bus_id=bus or "",
                numa_node=node if isinstance(node, int) and node >= 0 else None,
                memory_total_bytes=int(mem.total) if mem else 0,
                memory_free_bytes=int(mem.free) if mem else None,
                compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
                driver=driver,
                cuda_driver_version=cuda,
                pcie_gen_current=_try(lambda: pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h)),
                # NVML's max is what this GPU *and this slot* can do, the fair comparison.
                pcie_gen_max=_try(lambda: pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)),
                pcie_width_current=_try(lambda: pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)),
                pcie_width_max=_try(lambda: pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)),
                pstate=_try(lambda: int(pynvml.nvmlDeviceGetPerformanceState(h))),
                source="nvml",
            ))
        return gpus, None
    except Exception as e:
        return [], f"NVML: {e}"
    finally:
        _try(pynvml.nvmlShutdown)


def merge_gpus(nvml: list[GpuInfo], sysfs: list[GpuInfo]) -> list[GpuInfo]:
    """NVML's list, completed from sysfs by bus id; sysfs's list when NVML saw nothing."""
    if not nvml:
        return [replace(g, index=i) for i, g in enumerate(sysfs)]
    by_bus = {g.pci_bus_id: g for g in sysfs}
    out = []
    for g in nvml:
        s = by_bus.get(g.pci_bus_id)
        if s is not None:
            g = replace(
                g,
                numa_node=g.numa_node if g.numa_node is not None else s.numa_node,
                pcie_gen_current=g.pcie_gen_current if g.pcie_gen_current is not None else s.pcie_gen_current,
                pcie_gen_max=g.pcie_gen_max if g.pcie_gen_max is not None else s.pcie_gen_max,
                pcie_width_current=g.pcie_width_current if g.pcie_width_current is not None else s.pcie_width_current,
                pcie_width_max=g.pcie_width_max if g.pcie_width_max is not None else s.pcie_width_max,
            )
        out.append(g)
    return out


def gpu_from_dict(d: dict) -> GpuInfo:
    """A GpuInfo from captured JSON; unknown keys (from a newer lvllm) are ignored."""
    known = {f.name for f in fields(GpuInfo)}
    kw = {k: v for k, v in d.items() if k in known}
    kw.setdefault("index", 0)
    if kw.get("pci_bus_id"):
        kw["pci_bus_id"] = formats.normalize_bus_id(kw["pci_bus_id"])
    return GpuInfo(**kw)


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"
