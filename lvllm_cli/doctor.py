"""Can this machine run hybrid CPU+GPU MoE inference well, and what exactly to fix.

`run_checks(machine, env)` turns a probed Machine (lvllm_cli.probe) and the
Python stack (lvllm_cli.pystack) into findings: ok / warn / fail, one line of
evidence, one line of fix.  Plain functions on data: no I/O happens here.
`env=None` skips the checks about this Python (used when judging a captured
machine, whose Python we do not know).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lvllm_cli import compat
from lvllm_cli.isa import KERNEL_VARIANTS, kernel_variant_for_flags, missing_for
from lvllm_cli.machine import GpuInfo, Machine
from lvllm_cli.ranges import format_cpulist
from lvllm_cli.pystack import PythonStack, version_key

OK, WARN, FAIL = "ok", "warn", "fail"

# Below this much /dev/shm vLLM's worker processes fail to exchange tensors
# (Docker's default is 64 MiB).
MIN_SHM_BYTES = 1 << 30
# vLLM raises its soft open-files limit to this when the hard limit allows.
WANT_NOFILE = 65535
# Nodes whose memory differs by more than this ratio are "unbalanced": the
# engine splits every expert evenly, so the smallest node limits the model.
NODE_MEM_RATIO = 1.25
# Leave this share of available RAM to the OS, vLLM and pinned buffers.
MODEL_RAM_HEADROOM = 0.85
# Approximate usable bandwidth per lane and direction, GB/s, by PCIe generation.
_PCIE_GBS_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


@dataclass
class Finding:
    check: str
    status: str  # ok / warn / fail
    evidence: str
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    machine: Machine
    env: PythonStack | None
    model_bytes: int | None
    model_note: str

    @property
    def live(self) -> bool:
        return self.machine.sysroot == "/"


def run_checks(machine: Machine, env: PythonStack | None, model_bytes: int | None = None,
               model_note: str = "") -> list[Finding]:
    ctx = Context(machine, env, model_bytes, model_note)
    out: list[Finding] = []
    for check in CHECKS:
        out.extend(check(ctx))
    return out


def worst(findings: list[Finding]) -> str:
    statuses = {f.status for f in findings}
    return FAIL if FAIL in statuses else WARN if WARN in statuses else OK


def kernel_variant(machine: Machine, env: PythonStack | None) -> str:
    """The kernel family that will run: the engine's own answer when it loaded here, else from the CPU flags."""
    if env is not None and env.native.loaded and env.native.best_isa in KERNEL_VARIANTS:
        return env.native.best_isa
    return kernel_variant_for_flags(machine.cpu.flags)


# --- helpers -----------------------------------------------------------------

def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 30):.1f} GiB"


def _short_list(items: list[str], n: int = 4) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def _gpu_label(g: GpuInfo) -> str:
    return f"GPU{g.index} ({g.pci_bus_id or 'unknown bus'})"


# --- checks, in report order ---------------------------------------------------

def check_probe(ctx: Context) -> list[Finding]:
    problems = ctx.machine.read_problems
    if not problems:
        return []
    return [Finding(
        "probe", WARN,
        f"{len(problems)} kernel file(s) missing or malformed: " + _short_list([f"{p} ({why})" for p, why in problems]),
        "facts from these files are unknown below; if this is a stock kernel, attach "
        "`lvllm doctor --capture report.tar.gz` to a bug report",
    )]


def check_isa(ctx: Context) -> list[Finding]:
    cpu = ctx.machine.cpu
    from_flags = kernel_variant_for_flags(cpu.flags)
    native = ctx.env.native if ctx.env else None
    engine_says = native is not None and native.loaded and native.best_isa in KERNEL_VARIANTS
    variant = native.best_isa if engine_says else from_flags
    source = "the engine dispatches to" if engine_says else "from the CPU flags,"
    name = cpu.model or "unknown CPU"
    capped = ctx.env.lk_isa_env if ctx.env else None
    if variant == "scalar" and engine_says and from_flags != "scalar" and capped:
        return [Finding("cpu isa", FAIL, f"{name}: LK_ISA={capped} forces scalar kernels (the CPU allows {from_flags})",
                        "unset LK_ISA")]
    if variant == "scalar":
        lacking = missing_for("avx2", cpu.flags)
        return [Finding(
            "cpu isa", FAIL,
            f"{name}: {source} scalar kernels; missing {', '.join(lacking) or 'OS support for AVX2'}",
            "the CPU experts need AVX2+FMA+F16C (Intel Haswell / AMD Zen or newer); in a VM pass the host CPU "
            "through (e.g. QEMU -cpu host)",
        )]
    if engine_says and KERNEL_VARIANTS.index(variant) < KERNEL_VARIANTS.index(from_flags):
        why = f"LK_ISA={capped} caps it" if capped else (
            "the kernel did not grant AMX tile state (needs Linux >= 5.16)" if from_flags == "amx" else
            "the OS does not enable the wider registers")
        return [Finding(
            "cpu isa", WARN,
            f"{name}: {source} {variant} kernels, though the CPU flags allow {from_flags} ({why})",
            "unset LK_ISA" if capped else ("upgrade the kernel to >= 5.16 for AMX" if from_flags == "amx"
                                           else "check the hypervisor/BIOS settings for AVX-512"),
        )]
    return [Finding("cpu isa", OK, f"{name}: {source} {variant} kernels", "")]


def check_engine(ctx: Context) -> list[Finding]:
    if ctx.env is None:
        return []
    n = ctx.env.native
    if not n.loaded or n.error:
        return [Finding(
            "engine", FAIL,
            f"native module lvllm_cli._lk_moe does not work: {n.error or 'not found'}",
            "reinstall (pip install --force-reinstall --no-deps lvllm) or rebuild it for this machine: lvllm build",
        )]
    return [Finding("engine", OK, f"lk_moe loads ({n.build_flavour or 'unknown'} build), dispatches to {n.best_isa}", "")]


def check_topology(ctx: Context) -> list[Finding]:
    cpu = ctx.machine.cpu
    if not cpu.logical_cpus:
        return [Finding("cpu topology", WARN, "no online CPUs could be read", "see the probe finding")]
    smt = f"{cpu.threads_per_core} threads/core" if cpu.threads_per_core > 1 else "no SMT"
    return [Finding(
        "cpu topology", OK,
        f"{cpu.sockets} socket(s), {cpu.physical_cores} cores, {cpu.logical_cpus} CPUs ({smt}), "
        f"L3 {cpu.l3_bytes >> 20} MiB", "",
    )]


def check_affinity(ctx: Context) -> list[Finding]:
    env = ctx.env
    if env is None or env.cpu_affinity is None:
        return []
    online = [c.id for c in ctx.machine.cpu.online]
    allowed = [c for c in env.cpu_affinity if c in set(online)]
    if online and len(allowed) < len(online):
        return [Finding("cpu affinity", WARN,
                        f"this process may run on {len(allowed)} of {len(online)} CPUs "
                        f"({format_cpulist(allowed) or 'none'}); the engine can use only those",
                        "drop the taskset/numactl restriction, or give the container all CPUs (--cpuset-cpus)")]
    return [Finding("cpu affinity", OK, f"all {len(online)} CPUs usable", "")]


def check_numa(ctx: Context) -> list[Finding]:
    m = ctx.machine
    nodes = m.numa
    desc = _short_list([f"node{n.id}: {len(n.cpus)} CPUs, {gib(n.mem_total_bytes)}" for n in nodes])
    if len(nodes) == 1 and m.cpu.sockets > 1:
        return [Finding(
            "numa", WARN,
            f"{m.cpu.sockets} sockets but one NUMA node: memory is interleaved across sockets",
            "turn 'node interleaving' off in the BIOS so the engine can keep each expert slice next to its cores",
        )]
    problems: list[str] = []
    fixes: list[str] = []
    cpu_nodes = [n for n in nodes if n.cpus]
    no_mem = [n.id for n in cpu_nodes if n.mem_total_bytes == 0]
    if no_mem and not any(p[0].endswith("meminfo") for p in m.read_problems):
        problems.append(f"node(s) {', '.join(map(str, no_mem))} have CPUs but no memory")
        fixes.append("populate DIMMs on every socket")
    mems = [n.mem_total_bytes for n in cpu_nodes if n.mem_total_bytes]
    if len(mems) > 1 and max(mems) > NODE_MEM_RATIO * min(mems):
        problems.append(f"memory unbalanced ({gib(min(mems))} to {gib(max(mems))} per node)")
        fixes.append("populate the same DIMMs in every channel of every socket; the engine splits experts "
                     "evenly, so the smallest node limits the model")
    in_nodes = {c for n in nodes for c in n.cpus}
    orphans = [c.id for c in m.cpu.online if c.id not in in_nodes]
    if orphans:
        problems.append(f"CPUs {format_cpulist(orphans)} belong to no node")
        fixes.append("see the probe finding (a node's cpulist could not be read)")
    counts = [len(n.cpus) for n in cpu_nodes]
    if len(counts) > 1 and max(counts) != min(counts):
        problems.append(f"CPUs unbalanced ({min(counts)} to {max(counts)} per node)")
        fixes.append("online the same number of cores on every node (check isolcpus/offlined CPUs)")
    if problems:
        return [Finding("numa", WARN, f"{len(nodes)} node(s): {desc}; " + "; ".join(problems), "; ".join(fixes))]
    if len(nodes) == 1:
        return [Finding("numa", OK, f"one node: {desc}", "")]
    return [Finding("numa", OK, f"{len(nodes)} nodes, balanced: {desc}", "")]


def check_numa_balancing(ctx: Context) -> list[Finding]:
    m = ctx.machine
    nb = m.memory.numa_balancing
    if len(m.numa) < 2:
        return [Finding("numa balancing", OK, "one NUMA node: automatic NUMA balancing has nothing to do", "")]
    if nb is None:
        return [Finding("numa balancing", OK, "not available in this kernel (off)", "")]
    if nb != 0:
        return [Finding(
            "numa balancing", WARN,
            f"kernel.numa_balancing = {nb}: the kernel migrates expert pages between nodes behind the engine",
            "sudo sysctl -w kernel.numa_balancing=0 (persist it in /etc/sysctl.d/)",
        )]
    return [Finding("numa balancing", OK, "kernel.numa_balancing = 0", "")]


def check_thp(ctx: Context) -> list[Finding]:
    mem = ctx.machine.memory
    fix = "echo madvise | sudo tee /sys/kernel/mm/transparent_hugepage/enabled"
    if not mem.thp_enabled:
        return [Finding("transparent hugepages", WARN,
                        "THP setting not readable (kernel without THP?): experts may stream through 4 KiB pages",
                        "use a kernel with CONFIG_TRANSPARENT_HUGEPAGE; then " + fix)]
    if mem.thp_enabled == "never":
        return [Finding("transparent hugepages", WARN,
                        "THP is 'never': experts stream through 4 KiB pages, TLB misses cost bandwidth", fix)]
    return [Finding("transparent hugepages", OK,
                    f"enabled = {mem.thp_enabled}, defrag = {mem.thp_defrag or '?'}", "")]


def check_memory(ctx: Context) -> list[Finding]:
    mem = ctx.machine.memory
    if not mem.total_bytes:
        return [Finding("memory", WARN, "total memory unknown (/proc/meminfo unreadable)", "see the probe finding")]
    huge = ""
    if mem.hugepages_total:
        huge = f"; {mem.hugepages_total} hugepages of {mem.hugepage_size_bytes >> 20} MiB reserved"
    out = [Finding("memory", OK, f"{gib(mem.available_bytes)} available of {gib(mem.total_bytes)}{huge}", "")]
    if ctx.model_bytes is not None:
        need, have = ctx.model_bytes, mem.available_bytes
        ev = f"experts need {gib(need)}" + (f" ({ctx.model_note})" if ctx.model_note else "") + f"; {gib(have)} available"
        if need > have:
            out.append(Finding("model fits in RAM", FAIL, ev,
                               "use a smaller or quantized checkpoint, keep more experts on the GPU (lvllm tune), "
                               "or free/add RAM"))
        elif need > MODEL_RAM_HEADROOM * have:
            out.append(Finding("model fits in RAM", WARN, ev + f" (over {MODEL_RAM_HEADROOM:.0%})",
                               "close other programs or keep some experts on the GPU (lvllm tune)"))
        else:
            out.append(Finding("model fits in RAM", OK, ev, ""))
    return out


def check_gpus(ctx: Context) -> list[Finding]:
    m = ctx.machine
    gpus = m.gpus
    if not gpus:
        return [Finding("gpus", WARN, "no NVIDIA GPU found" + (f" ({m.nvml_error})" if m.nvml_error else ""),
                        "lvllm serve needs an NVIDIA GPU for attention and the KV cache; "
                        "the CPU engine, tune and gguf commands work without one")]
    if all(g.source == "sysfs" for g in gpus):
        ev = f"{len(gpus)} NVIDIA GPU(s) on the PCI bus, but NVML gave no details ({m.nvml_error or 'unknown'})"
        if ctx.live:
            return [Finding("gpus", FAIL, ev,
                            "install/load the NVIDIA driver until `nvidia-smi` works; in a container add --gpus all")]
        return [Finding("gpus", WARN, ev, "capture on the machine itself with the NVIDIA driver loaded")]
    first = gpus[0]
    desc = _short_list([f"GPU{g.index} {g.name} {gib(g.memory_total_bytes)}"
                        + (f" sm{g.compute_capability}" if g.compute_capability else "") for g in gpus])
    return [Finding("gpus", OK,
                    f"{desc}; driver {first.driver or '?'}, CUDA {first.cuda_driver_version or '?'}", "")]


def check_gpu_links(ctx: Context) -> list[Finding]:
    out = []
    for g in ctx.machine.gpus:
        name = f"gpu{g.index} pcie"
        cur_g, max_g, cur_w, max_w = g.pcie_gen_current, g.pcie_gen_max, g.pcie_width_current, g.pcie_width_max
        if None in (cur_g, max_g, cur_w, max_w):
            out.append(Finding(name, OK, f"{_gpu_label(g)}: link speed/width not reported", ""))
            continue
        link = f"gen{cur_g} x{cur_w} of gen{max_g} x{max_w} (~{_PCIE_GBS_PER_LANE.get(cur_g, 0) * cur_w:.0f} of " \
               f"{_PCIE_GBS_PER_LANE.get(max_g, 0) * max_w:.0f} GB/s)"
        if cur_w < max_w:
            out.append(Finding(name, WARN, f"{_gpu_label(g)}: running {link}",
                               "move the card to a full-width slot (slots sharing lanes with M.2 or another card "
                               "drop to x8); check the riser cable"))
        elif cur_g < max_g:
            if g.pstate is not None and g.pstate >= 8:
                out.append(Finding(name, OK, f"{_gpu_label(g)}: {link} while idle (P{g.pstate}); "
                                             "idle GPUs lower their link speed", ""))
            else:
                out.append(Finding(name, WARN, f"{_gpu_label(g)}: running {link}",
                                   "idle GPUs lower their link speed, so re-check under load (nvidia-smi -q -d PCIE); "
                                   "if it stays low, set the slot to its full generation in the BIOS, reseat the card"))
        else:
            out.append(Finding(name, OK, f"{_gpu_label(g)}: {link}", ""))
    return out


def check_gpu_numa(ctx: Context) -> list[Finding]:
    m = ctx.machine
    out = []
    for g in m.gpus:
        name = f"gpu{g.index} numa"
        if len(m.numa) < 2:
            out.append(Finding(name, OK, f"{_gpu_label(g)}: one NUMA node, every CPU is equally close", ""))
        elif g.numa_node is None:
            out.append(Finding(name, WARN, f"{_gpu_label(g)}: the kernel reports no NUMA node (numa_node = -1)",
                               "enable NUMA/SRAT reporting in the BIOS; until then lvllm assumes node 0"))
        else:
            node = next((n for n in m.numa if n.id == g.numa_node), None)
            cpus = f" (CPUs {format_cpulist(node.cpus)})" if node and node.cpus else ""
            out.append(Finding(name, OK, f"{_gpu_label(g)} hangs off node {g.numa_node}{cpus}", ""))
    return out


def check_torch(ctx: Context) -> list[Finding]:
    env = ctx.env
    if env is None:
        return []
    if env.torch_version is None:
        return [Finding("torch", WARN, "torch is not installed (the CLI does not need it; serving does)",
                        "pip install 'lvllm[vllm]' (vLLM brings the torch it was built for)")]
    reason = compat.bad_torch_reason(env.torch_version)
    if reason:
        return [Finding("torch", FAIL, f"torch {env.torch_version}: {reason}",
                        "install a vLLM release built for another torch, e.g. pip install 'lvllm[vllm]' --upgrade")]
    build = f"CUDA {env.torch_cuda}" if env.torch_cuda else "CPU-only build"
    gpus_ok = [g for g in ctx.machine.gpus if g.source == "nvml"]
    if ctx.machine.gpus and not env.torch_cuda:
        return [Finding("torch", FAIL, f"torch {env.torch_version} is a CPU-only build but this machine has GPUs",
                        "install the CUDA build of torch that your vLLM release pins (pip install vllm pulls it)")]
    driver_cuda = gpus_ok[0].cuda_driver_version if gpus_ok else None
    if env.torch_cuda and driver_cuda:
        t, d = version_key(env.torch_cuda), version_key(driver_cuda)
        if t and d and t[0] > d[0]:
            return [Finding("torch", FAIL, f"torch {env.torch_version} needs CUDA {env.torch_cuda}; the driver "
                                           f"supports CUDA {driver_cuda}",
                            "update the NVIDIA driver, or install a torch built for your driver's CUDA")]
        if t and d and t > d:
            return [Finding("torch", WARN, f"torch {env.torch_version} is built for CUDA {env.torch_cuda}; the driver "
                                           f"supports {driver_cuda} (minor-version compatibility only)",
                            "update the NVIDIA driver if kernels fail to launch")]
    return [Finding("torch", OK, f"torch {env.torch_version} ({build})", "")]


def check_vllm(ctx: Context) -> list[Finding]:
    env = ctx.env
    if env is None:
        return []
    rng = ",".join(compat.SUPPORTED_VLLM)
    if env.vllm_version is None:
        return [Finding("vllm", WARN, "vLLM is not installed (lvllm serve needs it)", f"pip install 'vllm{rng}'")]
    try:
        supported = compat.satisfies(env.vllm_version)
    except ValueError:
        return [Finding("vllm", WARN, f"vLLM version {env.vllm_version!r} is not a version we can compare",
                        f"pip install 'vllm{rng}'")]
    if not supported:
        return [Finding("vllm", FAIL, f"vLLM {env.vllm_version} is outside the supported range {rng}",
                        f"pip install 'vllm{rng}'")]
    return [Finding("vllm", OK, f"vLLM {env.vllm_version} (supported: {rng})", "")]


def check_libnuma(ctx: Context) -> list[Finding]:
    env = ctx.env
    if env is None:
        return []
    if env.libnuma_error is None:
        return [Finding("libnuma", OK, f"loads ({env.libnuma_path})", "")]
    if len(ctx.machine.numa) < 2:
        return [Finding("libnuma", OK, "not found; not needed on one NUMA node", "")]
    return [Finding("libnuma", WARN,
                    f"libnuma.so.1 does not load ({env.libnuma_error}): the engine cannot bind expert memory to "
                    "its node and loses much of the bandwidth",
                    "sudo apt install libnuma1 (Fedora/RHEL: sudo dnf install numactl-libs)")]


def check_libstdcxx(ctx: Context) -> list[Finding]:
    env = ctx.env
    if env is None:
        return []
    lib = env.libstdcxx
    fix = ("conda: conda install -c conda-forge 'libstdcxx-ng>=12'; otherwise rebuild the engine here: lvllm build")
    need = max(lib.required, key=version_key) if lib.required else None
    if not lib.path:
        if env.native.error and "GLIBCXX" in env.native.error:
            return [Finding("libstdc++", FAIL, env.native.error, fix)]
        return [Finding("libstdc++", WARN, f"no libstdc++ found ({lib.error or 'unknown'})",
                        "install libstdc++6 (sudo apt install libstdc++6)")]
    have = max(lib.provides, key=version_key) if lib.provides else None
    missing = [v for v in lib.required if v not in set(lib.provides)]
    if missing:
        return [Finding("libstdc++", FAIL,
                        f"{lib.path} provides GLIBCXX up to {have or '?'}, the engine needs {', '.join(missing)}", fix)]
    if env.native.error and "GLIBCXX" in env.native.error:
        return [Finding("libstdc++", FAIL, env.native.error, fix)]
    return [Finding("libstdc++", OK, f"{lib.path} provides GLIBCXX up to {have or '?'}"
                                     + (f"; engine needs {need}" if need else ""), "")]


def check_nofile(ctx: Context) -> list[Finding]:
    env = ctx.env
    if env is None or env.nofile_soft is None:
        return []
    hard = env.nofile_hard
    ev = f"open files: soft {_lim(env.nofile_soft)}, hard {_lim(hard)}"
    if hard is not None and hard != -1 and hard < WANT_NOFILE:
        return [Finding("open files", WARN, ev + f"; vLLM wants {WANT_NOFILE} for many concurrent requests",
                        f"raise the hard limit: 'nofile' in /etc/security/limits.conf, LimitNOFILE= in a systemd "
                        f"unit, or docker --ulimit nofile={WANT_NOFILE}:{WANT_NOFILE}")]
    return [Finding("open files", OK, ev, "")]


def _lim(v: int | None) -> str:
    return "?" if v is None else "unlimited" if v == -1 else str(v)


def check_shm(ctx: Context) -> list[Finding]:
    shm = ctx.machine.memory.shm_bytes
    if shm is None:
        return [Finding("/dev/shm", WARN, "size unknown (not mounted?)",
                        "mount a tmpfs on /dev/shm; in Docker use --ipc=host or --shm-size=16g")]
    if shm < MIN_SHM_BYTES:
        return [Finding("/dev/shm", WARN, f"/dev/shm is {shm >> 20} MiB: vLLM's worker processes run out of "
                                          "shared memory", "in Docker use --ipc=host or --shm-size=16g")]
    return [Finding("/dev/shm", OK, f"{gib(shm)}", "")]


def check_governor(ctx: Context) -> list[Finding]:
    govs = ctx.machine.cpu.governors
    if not govs:
        return [Finding("cpu governor", OK, "cpufreq not exposed (VM or firmware-managed clocks)", "")]
    desc = ", ".join(f"{g} on {n} CPUs" for g, n in sorted(govs.items()))
    if set(govs) != {"performance"}:
        return [Finding("cpu governor", WARN, f"{desc}: cores ramp up late between decode steps",
                        "sudo cpupower frequency-set -g performance")]
    return [Finding("cpu governor", OK, desc, "")]


CHECKS = (
    check_probe,
    check_isa,
    check_engine,
    check_topology,
    check_affinity,
    check_numa,
    check_numa_balancing,
    check_memory,
    check_thp,
    check_gpus,
    check_gpu_links,
    check_gpu_numa,
    check_torch,
    check_vllm,
    check_libnuma,
    check_libstdcxx,
    check_nofile,
    check_shm,
    check_governor,
)
