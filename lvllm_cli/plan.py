"""From a machine and a model to a launch plan: parallelism, CPU sets, GPU layers, memory fit.

Plain functions over plain data (`Machine`, `Target`, `Request` in, `Plan`
out); nothing here touches the hardware.  docs/readme/tune.md states every
rule and constant below; keep the two in step.

The rules, in order:
1. Parallelism: one worker per GPU.  GPUs on one socket -> TP over all of
   them.  GPUs on several sockets in equal groups -> TP inside a socket, PP
   across sockets (no per-layer all-reduce over the socket link, and each
   stage's experts sit in its own socket's memory).  A model whose heads or
   expert slices do not divide by the TP size falls back to PP.
2. CPUs: each worker gets the physical cores of its GPU's NUMA node; nodes
   without a GPU go to the nearest worker by NUMA distance (ties: the worker
   with fewer cores so far); workers sharing a node split its cores; one core
   per worker is left for vLLM's own Python thread (on the node where it has
   the most cores, its GPU's node on ties); SMT siblings only with `smt=True`.
3. GPU memory per GPU: VRAM x utilization - non-expert weights (its share) -
   runtime reserve - KV cache for max_model_len x max_num_seqs (+ the
   fixed-size linear-attention state per sequence) = room for experts.  The
   context is lowered (unless given explicitly) until the KV cache fits.
4. GPU layers: as many MoE layers as fit keep their experts on the GPU: the
   last MoE layers of each pipeline stage.
5. RAM: routed experts of every MoE layer not on a GPU + stated overheads,
   against MemAvailable.  A quantized checkpoint's CPU experts stay quantized
   or are widened to bf16 at load (experts_format.py states that rule).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lvllm_cli.experts_format import Speed, choose_experts_format
from lvllm_cli.machine import GpuInfo, Machine
from lvllm_cli.model_facts import ModelFacts
from lvllm_cli.profiles import ProfileError, Settings, Target, resolve_profile
from lvllm_cli.ranges import format_cpulist, format_layer_ranges, format_rank_lists

GiB = 1 << 30

# --- stated constants (docs/readme/tune.md) ---------------------------------------
# Host RAM besides the experts: the API server and engine-core processes (Python,
# torch, tokenizer) and, per GPU worker, torch/CUDA host state and the pinned
# staging buffers of the CPU-experts path.
RAM_BASE_OVERHEAD = 4 * GiB
RAM_PER_WORKER_OVERHEAD = 3 * GiB
# GPU memory besides weights and KV cache, per GPU: CUDA context, NCCL buffers and
# CUDA-graph pools (fixed part) plus the activation peak of one scheduler step,
# which vLLM measures with max_num_batched_tokens tokens (~16 live 16-bit
# hidden-sized tensors per token).
GPU_RESERVE_FIXED = int(1.5 * GiB)
GPU_ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN = 32
# One core per worker stays free for the worker's own Python thread (the
# scheduler loop, CUDA launches): the expert pool must not preempt it.
RESERVED_CORES_PER_WORKER = 1
# torch's own CPU thread pool: nothing of ours runs on it, and its threads would
# compete with the expert pool on the same cores.
OMP_NUM_THREADS = 1
# The context is lowered in these steps, never below the minimum.
MODEL_LEN_STEP = 1024
MIN_MODEL_LEN = 2048


@dataclass
class Request:
    """What the user asked for on the command line; explicit values are never lowered by the planner."""

    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    gpu_layers: int | None = None  # None: the profile's setting (auto unless it says otherwise)
    gpu_layers_auto: bool = False  # True: force auto even when the profile fixes a count
    tp: int | None = None
    pp: int | None = None
    smt: bool = False
    kv_cache_dtype_bytes: int | None = None  # 1 when --kv-cache-dtype fp8* is passed to vLLM
    cuda_visible_devices: str | None = None  # the user's own CUDA_VISIBLE_DEVICES, if set
    experts_format: str = "auto"  # auto | quantized | bf16 (quantized checkpoints' CPU experts)
    experts_format_by: str = "--experts-format"  # who asked: the option or LVLLM_EXPERTS_BF16=... in the environment
    prompt_ratio: float | None = None  # prompt tokens per generated token of the workload (None: the default)


@dataclass
class Worker:
    rank: int
    pp_rank: int
    tp_rank: int
    gpu: int | None
    numa_nodes: list[int]
    cpus: list[int]
    threads: int
    reserved_cpus: list[int] = field(default_factory=list)


@dataclass
class GpuBudget:
    gpu: int
    rank: int
    pp_rank: int
    vram_bytes: int
    usable_bytes: int  # vram x utilization
    non_expert_bytes: int
    reserve_bytes: int
    kv_bytes: int  # KV cache + linear-attention state for the planned context and sequences
    expert_layer_bytes: int  # one GPU-resident MoE layer's experts on this GPU
    expert_layers: int = 0
    expert_bytes: int = 0

    @property
    def room_for_experts(self) -> int:
        return self.usable_bytes - self.non_expert_bytes - self.reserve_bytes - self.kv_bytes

    @property
    def left_bytes(self) -> int:
        return self.room_for_experts - self.expert_bytes


@dataclass
class Plan:
    model: str
    name: str
    variant: str | None
    facts_source: str
    tp: int
    pp: int
    workers: list[Worker]
    gpu_layers: list[int]
    cpu_layers: list[int]
    moe_layers: list[int]
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    omp_num_threads: int
    expert_bytes_per_layer: int
    ram_expert_bytes: int
    ram_overhead_bytes: int
    ram_needed_bytes: int
    ram_available_bytes: int
    fits: bool
    gpu_budgets: list[GpuBudget]
    reasons: list[str]
    choices: list[dict]  # {setting, value, why}: the table `lvllm tune` prints
    warnings: list[str]
    problems: list[str]
    suggestions: list[str]
    env: dict[str, str]
    vllm_args: list[str]
    model_summary: dict[str, Any]
    machine_summary: dict[str, Any]
    needs_generate: bool = False
    measurements: list[dict] = field(default_factory=list)
    experts_format: dict = field(default_factory=dict)  # experts_format.ExpertsFormat: widen to bf16 or not, and why

    @property
    def has_gpu(self) -> bool:
        return any(w.gpu is not None for w in self.workers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = PLAN_VERSION
        for b, src in zip(d["gpu_budgets"], self.gpu_budgets):
            b["room_for_experts"] = src.room_for_experts
            b["left_bytes"] = src.left_bytes
        return d


PLAN_VERSION = 1


class Why:
    """Reasons grouped by the setting they explain: the 'why' column of the plan table."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, text: str) -> None:
        self.items.append((key, text))

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.items)

    def text(self, key: str) -> str:
        return "; ".join(t for k, t in self.items if k == key)


# ---- topology helpers -------------------------------------------------------------


def node_package(machine: Machine) -> dict[int, int]:
    """NUMA node -> socket, from the CPUs' package ids (nodes without CPUs are left out)."""
    out: dict[int, int] = {}
    for c in machine.cpu.online:
        out.setdefault(c.node, c.package_id)
    for n in machine.numa:
        if n.id not in out and n.cpus:
            out[n.id] = 0
    return out


def node_distance(machine: Machine, a: int, b: int) -> int:
    """SLIT distance; without a table: 10 same node, 20 same socket, 32 other socket."""
    ids = sorted(n.id for n in machine.numa)
    for n in machine.numa:
        if n.id == a and b in ids and len(n.distances) == len(ids):
            return n.distances[ids.index(b)]
    if a == b:
        return 10
    pkg = node_package(machine)
    return 20 if pkg.get(a) == pkg.get(b) else 32


def _cpu_nodes(machine: Machine) -> list[int]:
    nodes = sorted({c.node for c in machine.cpu.online})
    if not nodes:
        nodes = sorted(n.id for n in machine.numa if n.cpus)
    return nodes or [0]


def _node_cores(machine: Machine, node: int, smt: bool) -> list[list[int]]:
    """The node's cores, each as the list of its logical CPUs (only the first sibling unless smt)."""
    cores: dict[tuple[int, int], list[int]] = {}
    for c in sorted(machine.cpu.online, key=lambda c: c.id):
        if c.node == node:
            cores.setdefault((c.package_id, c.core_id), []).append(c.id)
    if not cores:  # no per-CPU topology: every CPU of the node counts as a core
        ids = next((n.cpus for n in machine.numa if n.id == node), [])
        if not ids and len(_cpu_nodes(machine)) == 1:
            ids = list(range(machine.cpu.logical_cpus or machine.cpu.physical_cores or 1))
        return [[i] for i in sorted(ids)]
    out = [sorted(ids) for ids in cores.values()]
    out.sort(key=lambda ids: ids[0])
    return out if smt else [[ids[0]] for ids in out]


# ---- 1. parallelism ------------------------------------------------------------------


def tp_problem(facts: ModelFacts, tp: int) -> str | None:
    """Why the model cannot be split tp ways (None when it can)."""
    if tp == 1:
        return None
    if facts.num_attention_heads % tp:
        return f"its {facts.num_attention_heads} attention heads do not divide by {tp}"
    kv = facts.num_kv_heads
    if facts.mla is None and kv % tp and tp % kv:
        return f"its {kv} KV heads and TP={tp} do not divide one another"
    la = facts.linear_attention
    if la and (la.num_value_heads % tp or la.num_key_heads % tp):
        return f"its linear-attention heads ({la.num_key_heads} key, {la.num_value_heads} value) do not divide by {tp}"
    inter = facts.moe_intermediate_size
    if inter % tp:
        return f"its expert width {inter} does not divide by {tp}"
    q = facts.quant
    if q.block and ((inter // tp) % q.block[0] or (inter // tp) % q.block[1]):
        return f"each rank's expert slice ({inter // tp}) is not a multiple of the fp8 block {q.block[0]}x{q.block[1]}"
    if q.method == "int4" and q.group_size and (inter // tp) % q.group_size:
        return f"each rank's expert slice ({inter // tp}) is not a multiple of the int4 group {q.group_size}"
    return None


def _gpu_node(g: GpuInfo, nodes: list[int]) -> int | None:
    return g.numa_node if g.numa_node in nodes else None


def choose_parallelism(
    machine: Machine, facts: ModelFacts, req: Request, why: Why, warnings: list[str], problems: list[str]
) -> tuple[int, int, list[GpuInfo]]:
    """(tp, pp, GPUs in rank order: tp-major within pp)."""
    gpus = sorted(machine.gpus, key=lambda g: g.index)
    nodes = _cpu_nodes(machine)
    pkg = node_package(machine)
    for g in gpus:
        if _gpu_node(g, nodes) is None and len(nodes) > 1:
            warnings.append(f"GPU {g.index} reports no NUMA node: treated as local to node {nodes[0]}")

    def socket(g: GpuInfo) -> int:
        n = _gpu_node(g, nodes)
        return pkg.get(n if n is not None else nodes[0], 0)

    # Rank order: socket, then node, then index, so a PP stage's GPUs share a socket.
    gpus.sort(key=lambda g: (socket(g), _gpu_node(g, nodes) or 0, g.index))
    n = len(gpus)
    if req.tp or req.pp:
        tp = req.tp or max(1, n // (req.pp or 1))
        pp = req.pp or max(1, n // tp)
        if tp * pp > n:
            problems.append(f"TP={tp} x PP={pp} needs {tp * pp} GPUs but {n} found: lower --tp/--pp")
            return tp, pp, gpus
        bad = tp_problem(facts, tp)
        if bad:
            problems.append(f"TP={tp} cannot split this model: {bad}; use --pp instead")
        if pp > facts.num_layers:
            problems.append(f"PP={pp} is more stages than the model's {facts.num_layers} layers")
        if tp * pp < n:
            warnings.append(f"using {tp * pp} of {n} GPUs (TP={tp} x PP={pp} as requested)")
        why.add("parallelism", "as requested on the command line")
        return tp, pp, gpus[: tp * pp]
    if n <= 1:
        why.add("parallelism", "one GPU" if n else "no GPU")
        return 1, 1, gpus
    groups: dict[int, list[GpuInfo]] = {}
    for g in gpus:
        groups.setdefault(socket(g), []).append(g)
    sizes = {len(v) for v in groups.values()}
    if len(groups) == 1:
        tp, pp = n, 1
        text = f"all {n} GPUs hang off socket {next(iter(groups))}: TP={n} splits every layer, the all-reduces stay on one socket"
    elif len(sizes) == 1:
        tp, pp = sizes.pop(), len(groups)
        text = (
            f"the GPUs sit on {pp} sockets ({tp} each): TP={tp} inside a socket, PP={pp} across sockets, so no "
            "per-layer all-reduce crosses the socket link and each stage's experts stay in its own socket's memory "
            f"(--tp {n} trades that for lower single-stream latency)"
        )
    else:
        tp, pp = 1, n
        text = f"the GPUs sit unevenly on {len(groups)} sockets: PP={n}, one stage per GPU"
    bad = tp_problem(facts, tp)
    if bad:
        text = f"TP={tp} would fit the topology but {bad}: PP={n}, one stage per GPU"
        tp, pp = 1, n
    why.add("parallelism", text)
    return tp, pp, gpus


# ---- 2. CPUs per worker ------------------------------------------------------------------


def assign_cpus(
    machine: Machine, gpus: list[GpuInfo], tp: int, smt: bool, why: Why, warnings: list[str]
) -> list[Worker]:
    nodes = _cpu_nodes(machine)
    home: list[int] = []
    for g in gpus or [None]:
        n = _gpu_node(g, nodes) if g is not None else None
        home.append(n if n is not None else nodes[0])
    nworkers = len(home)
    # Each node's cores: split among the workers whose GPU is on it...
    node_owner: dict[int, list[int]] = {}
    for w, n in enumerate(home):
        node_owner.setdefault(n, []).append(w)
    assigned: list[list[tuple[int, list[int]]]] = [[] for _ in range(nworkers)]  # (node, core) per worker
    core_count = [0] * nworkers
    for n, owners in sorted(node_owner.items()):
        cores = _node_cores(machine, n, smt)
        share, extra = divmod(len(cores), len(owners))
        start = 0
        for i, w in enumerate(owners):
            k = share + (1 if i < extra else 0)
            assigned[w].extend((n, c) for c in cores[start : start + k])
            core_count[w] += k
            start += k
    # ...and nodes without a GPU go to the nearest worker.
    for n in nodes:
        if n in node_owner:
            continue
        best = min(range(nworkers), key=lambda w: (node_distance(machine, home[w], n), core_count[w], w))
        cores = _node_cores(machine, n, smt)
        assigned[best].extend((n, c) for c in cores)
        core_count[best] += len(cores)
        if nworkers > 1:
            why.add(
                "cpus",
                f"node {n} has no GPU: its cores go to worker {best} (distance {node_distance(machine, home[best], n)} from node {home[best]})",
            )
    workers = []
    for w in range(nworkers):
        cores = sorted(assigned[w], key=lambda nc: (nc[0], nc[1][0]))
        reserved: list[int] = []
        if len(cores) > RESERVED_CORES_PER_WORKER:
            # Leave one core to the worker's Python thread: the first core of the node where the worker has
            # the most cores (its GPU's node on ties), so no node loses its only core while another has spares.
            per_node = {n: sum(1 for m, _ in cores if m == n) for n, _ in cores}
            node = max(per_node, key=lambda n: (per_node[n], n == home[w], -n))
            reserved = cores.pop(next(i for i, (n, _) in enumerate(cores) if n == node))[1]
        else:
            warnings.append(f"worker {w} has a single core: no core left free for vLLM's own thread")
        cpus = sorted(c for _, core in cores for c in core)
        # The nodes whose memory holds this worker's experts: exactly those it has threads on.
        wnodes = sorted({n for n, _ in cores}) or [home[w]]
        g = gpus[w] if gpus else None
        workers.append(
            Worker(
                rank=w,
                pp_rank=w // tp,
                tp_rank=w % tp,
                gpu=g.index if g is not None else None,
                numa_nodes=wnodes,
                cpus=cpus,
                threads=len(cpus),
                reserved_cpus=sorted(reserved),
            )
        )
    kind = "logical CPUs (SMT siblings included, --smt)" if smt else "physical cores (one thread per core; --smt adds the siblings)"
    why.add(
        "cpus",
        f"each worker uses the {kind} of its GPU's NUMA node(s) minus {RESERVED_CORES_PER_WORKER} core left to "
        "vLLM's own Python thread; no two workers share a core",
    )
    return workers


# ---- 3./4. GPU memory and GPU layers ---------------------------------------------------------


def pp_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """vLLM's get_pp_indices: even split, the remainder on the stages before the last, from the back."""
    per, rem = divmod(num_layers, pp)
    parts = [per] * pp
    for i in range(2, rem + 2):
        parts[-i] += 1
    out, start = [], 0
    for p in parts:
        out.append(range(start, start + p))
        start += p
    return out


@dataclass
class _Stage:
    layers: range
    non_expert: int  # per TP rank
    kv_per_token: int  # per TP rank, all full-attention layers of the stage
    state_per_seq: int  # per TP rank


def _stages(facts: ModelFacts, tp: int, pp: int, kv_bytes: int | None) -> list[_Stage]:
    out = []
    for s, layers in enumerate(pp_layer_ranges(facts.num_layers, pp)):
        non_expert = sum(facts.layer_non_expert_bytes(i) for i in layers)
        if s == 0:
            non_expert += facts.embed_bytes()
        if s == pp - 1:
            # With PP and tied embeddings the last stage still holds its own lm_head copy.
            lm = facts.lm_head_bytes() or (facts.embed_bytes() if pp > 1 else 0)
            non_expert += lm + facts.hidden_size * facts.dtype_bytes
        kv = sum(facts.kv_bytes_per_token_layer(tp, kv_bytes) for i in layers if i in facts.full_attention_layers)
        state = sum(facts.state_bytes_per_seq_layer(i, tp) for i in layers)
        out.append(_Stage(layers, math.ceil(non_expert / tp), kv, state))
    return out


def gpu_reserve_bytes(facts: ModelFacts, max_num_batched_tokens: int) -> int:
    return GPU_RESERVE_FIXED + max_num_batched_tokens * facts.hidden_size * GPU_ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN


def _effective_utilization(gpus: list[GpuInfo], util: float, explicit: bool, why: Why, warnings: list[str]) -> float:
    """vLLM refuses to start when a GPU has less free memory than util x total: plan with what is free."""
    out = util
    for g in gpus:
        if g.memory_free_bytes is None or not g.memory_total_bytes:
            continue
        if g.memory_free_bytes < util * g.memory_total_bytes:
            fit = math.floor(g.memory_free_bytes / g.memory_total_bytes * 100) / 100 - 0.01
            msg = (
                f"GPU {g.index} has only {g.memory_free_bytes / GiB:.1f} GiB of {g.memory_total_bytes / GiB:.1f} GiB free "
                f"(other processes hold the rest)"
            )
            if explicit:
                warnings.append(f"{msg}: vLLM will refuse --gpu-memory-utilization {util:.2f}")
            else:
                out = min(out, max(fit, 0.05))
                why.add("gpu_memory_utilization", f"{msg}: lowered to {out:.2f}")
    return out


# ---- the plan ------------------------------------------------------------------------------------


def build_plan(
    machine: Machine,
    target: Target,
    req: Request | None = None,
    *,
    speeds: dict[str, Speed] | None = None,
    suggest: bool = True,
) -> Plan:
    """`speeds`: the engine's measured {"quantized": Speed, "bf16": Speed} for the experts-format choice
    (`lvllm tune --measure`); without them the choice uses the known ratios."""
    req = req or Request()
    facts = target.facts
    s: Settings = target.settings
    why = Why()
    warnings: list[str] = []
    problems: list[str] = []
    suggestions: list[str] = []
    machine = visible_gpus(machine, req.cuda_visible_devices, warnings)

    flags = set(machine.cpu.flags)
    if flags and not {"avx2", "fma"} <= flags:
        problems.append("this CPU lacks AVX2/FMA: the lvllm CPU-experts engine needs at least AVX2 + FMA")

    # 1. parallelism
    tp, pp, gpus = choose_parallelism(machine, facts, req, why, warnings, problems)
    if not machine.gpus:
        warnings.append("no NVIDIA GPU found: this plan is for reading only, `lvllm serve` needs a GPU")

    # 2. CPUs
    workers = assign_cpus(machine, gpus, tp, req.smt, why, warnings)

    # 3. memory targets
    max_len = req.max_model_len or s.max_model_len
    seqs = req.max_num_seqs or s.max_num_seqs
    batched = req.max_num_batched_tokens or s.max_num_batched_tokens
    if max_len > facts.max_position_embeddings:
        if req.max_model_len:
            problems.append(
                f"--max-model-len {max_len} exceeds the model's max_position_embeddings ({facts.max_position_embeddings})"
            )
        else:
            why.add("max_model_len", f"the model's own limit (max_position_embeddings; {max_len} was asked)")
            max_len = facts.max_position_embeddings
    util_asked = req.gpu_memory_utilization or s.gpu_memory_utilization
    util = _effective_utilization(gpus, util_asked, req.gpu_memory_utilization is not None, why, warnings)
    stages = _stages(facts, tp, pp, req.kv_cache_dtype_bytes)
    reserve = gpu_reserve_bytes(facts, batched)

    def usable(g: GpuInfo) -> int:
        return math.floor(g.memory_total_bytes * util)

    def room(length: int, nseq: int) -> list[int]:
        out = []
        for r, g in enumerate(gpus):
            st = stages[r // tp]
            out.append(usable(g) - st.non_expert - reserve - (st.kv_per_token * length + st.state_per_seq) * nseq)
        return out

    if gpus:
        if min(room(max_len, seqs)) < 0 and not req.max_model_len:
            # Longest context (in MODEL_LEN_STEP steps) whose KV cache fits every GPU.
            best = max_len
            while best > MIN_MODEL_LEN and min(room(best, seqs)) < 0:
                best = max(MIN_MODEL_LEN, (best - 1) // MODEL_LEN_STEP * MODEL_LEN_STEP)
            if best != max_len:
                why.add(
                    "max_model_len",
                    f"lowered from {max_len}: the KV cache of {seqs} sequences must fit next to the non-expert weights "
                    "(--max-num-seqs 1 allows longer single requests)",
                )
                max_len = best
        if min(room(max_len, seqs)) < 0 and not req.max_num_seqs:
            nseq = seqs
            while nseq > 1 and min(room(max_len, nseq)) < 0:
                nseq -= 1
            if nseq != seqs:
                why.add("max_num_seqs", f"lowered from {seqs}: the KV cache must fit")
                seqs = nseq
        if min(room(max_len, seqs)) < 0:
            worst = min(range(len(gpus)), key=lambda r: room(max_len, seqs)[r])
            g, st = gpus[worst], stages[worst // tp]
            need = st.non_expert + reserve + (st.kv_per_token * max_len + st.state_per_seq) * seqs
            problems.append(
                f"GPU {g.index} is too small even without experts: non-expert weights {st.non_expert / GiB:.1f} GiB + "
                f"runtime reserve {reserve / GiB:.1f} GiB + KV cache {(need - st.non_expert - reserve) / GiB:.1f} GiB "
                f"({max_len} tokens x {seqs} sequences) > {usable(g) / GiB:.1f} GiB usable "
                f"({g.memory_total_bytes / GiB:.1f} GiB x {util:.2f}); use a quantized variant, a shorter --max-model-len, "
                "or more GPUs"
            )
    if batched < seqs:
        batched = seqs

    # 4. GPU layers
    per_layer_total = facts.expert_bytes_per_layer()
    per_layer_gpu = math.ceil(per_layer_total / tp)
    moe = facts.moe_layers
    budgets: list[GpuBudget] = []
    for r, g in enumerate(gpus):
        st = stages[r // tp]
        budgets.append(
            GpuBudget(
                gpu=g.index,
                rank=r,
                pp_rank=r // tp,
                vram_bytes=g.memory_total_bytes,
                usable_bytes=usable(g),
                non_expert_bytes=st.non_expert,
                reserve_bytes=reserve,
                kv_bytes=(st.kv_per_token * max_len + st.state_per_seq) * seqs,
                expert_layer_bytes=per_layer_gpu,
            )
        )
    fixed_count = None if req.gpu_layers_auto else (req.gpu_layers if req.gpu_layers is not None else s.gpu_layers)
    gpu_layers: list[int] = []
    if gpus:
        if fixed_count is None:
            for sidx, st in enumerate(stages):
                stage_moe = [i for i in moe if i in st.layers]
                rooms = [b.room_for_experts for b in budgets if b.pp_rank == sidx]
                n = max(0, min(len(stage_moe), min(rooms) // per_layer_gpu)) if rooms else 0
                gpu_layers += stage_moe[len(stage_moe) - n :] if n else []
            how = "the last MoE layers of each pipeline stage" if pp > 1 else "the last MoE layers"
            why.add(
                "gpu_layers",
                f"{len(gpu_layers)} of {len(moe)} MoE layers fit in the room left on the GPU "
                f"({per_layer_gpu / GiB:.2f} GiB of experts per layer per GPU); chosen: {how}",
            )
        else:
            if fixed_count > len(moe):
                warnings.append(f"gpu_layers {fixed_count} is more than the model's {len(moe)} MoE layers: using {len(moe)}")
            n = min(fixed_count, len(moe))
            gpu_layers = moe[len(moe) - n :] if n else []
            why.add(
                "gpu_layers",
                f"{n} fixed by {'--gpu-layers' if req.gpu_layers is not None else 'the profile'}; chosen: the last MoE layers",
            )
        for b in budgets:
            st = stages[b.pp_rank]
            b.expert_layers = sum(1 for i in gpu_layers if i in st.layers)
            b.expert_bytes = b.expert_layers * per_layer_gpu
            if fixed_count is not None and b.left_bytes < 0:
                problems.append(
                    f"{b.expert_layers} GPU layers do not fit on GPU {b.gpu}: "
                    f"{b.expert_bytes / GiB:.1f} GiB of experts > {max(b.room_for_experts, 0) / GiB:.1f} GiB of room; "
                    "lower --gpu-layers or use --gpu-layers auto"
                )
    cpu_layers = [i for i in moe if i not in gpu_layers]
    starved = [w for w in workers if w.threads == 0]
    if cpu_layers and starved:
        problems.append(
            f"worker(s) {', '.join(str(w.rank) for w in starved)} get no CPU core: more GPUs share NUMA node(s) "
            f"{format_cpulist(sorted({w.numa_nodes[0] for w in starved}))} than it has cores; use fewer GPUs (--tp/--pp)"
        )
    if gpus and not cpu_layers:
        why.add("gpu_layers", "all experts fit on the GPU(s): the CPU engine is off (LVLLM_MOE_CPU=0), this is plain vLLM")
    elif not gpus:
        why.add("gpu_layers", "no GPU: every MoE layer's experts would be on the CPU")

    # 5. RAM, and the format the CPU experts are held in
    overhead = RAM_BASE_OVERHEAD + RAM_PER_WORKER_OVERHEAD * len(workers)
    available = machine.memory.available_bytes or machine.memory.total_bytes
    fmt = choose_experts_format(
        method=facts.quant.method,
        dtype=facts.dtype,
        requested=req.experts_format,
        requested_by=req.experts_format_by,
        cpu_layers=len(cpu_layers),
        quantized_bytes_per_layer=per_layer_total,
        bf16_bytes_per_layer=facts.expert_bytes_per_layer(widened_to_bf16=True),
        ram_overhead_bytes=overhead,
        ram_available_bytes=available,
        prompt_ratio=req.prompt_ratio,
        measured=speeds,
    )
    if fmt.problem:
        problems.append(fmt.problem)
    per_layer_cpu = fmt.cpu_bytes_per_layer
    ram_experts = len(cpu_layers) * per_layer_cpu
    needed = ram_experts + overhead
    ram_fits = needed <= available
    held = f"bf16, widened at load from {facts.quant.label}" if fmt.widen else facts.quant.label
    why.add(
        "ram",
        f"{len(cpu_layers)} CPU layers x {per_layer_cpu / GiB:.2f} GiB of experts ({held}) = "
        f"{ram_experts / GiB:.1f} GiB, + {RAM_BASE_OVERHEAD / GiB:.0f} GiB for vLLM's server processes "
        f"+ {RAM_PER_WORKER_OVERHEAD / GiB:.0f} GiB per worker; against MemAvailable",
    )
    if cpu_layers and ram_fits and len(machine.numa) > 1:
        _check_node_memory(machine, workers, stages, cpu_layers, per_layer_cpu, tp, warnings)
    if not ram_fits:
        problems.append(
            f"not enough RAM: the CPU experts need {needed / GiB:.1f} GiB, {available / GiB:.1f} GiB is available"
        )

    fits = ram_fits and not problems
    for key, text in (
        ("gpu_memory_utilization", "the profile's setting" if req.gpu_memory_utilization is None else "as requested"),
        ("max_model_len", "the profile's setting" if req.max_model_len is None else "as requested"),
        ("max_num_seqs", "the profile's setting" if req.max_num_seqs is None else "as requested"),
        ("max_num_batched_tokens", "tokens per scheduler step: longer prefill chunks keep the CPU experts busier"),
        ("omp_num_threads", "torch's own CPU threads only compete with the expert pool for the same cores"),
    ):
        if not why.has(key):
            why.add(key, text)
    if gpus:
        why.add("gpu_memory_utilization", f"runtime reserve per GPU {reserve / GiB:.1f} GiB (CUDA context, graphs, activations)")
    choices = [
        {"setting": "parallelism", "value": f"TP={tp} x PP={pp}", "why": why.text("parallelism")},
        {
            "setting": "threads",
            "value": " + ".join(str(w.threads) for w in workers),
            "why": why.text("cpus"),
        },
        {"setting": "gpu-layers", "value": format_layer_ranges(gpu_layers) or "none", "why": why.text("gpu_layers")},
        {"setting": "experts format", "value": fmt.value, "why": fmt.reason},
        {
            "setting": "host RAM",
            "value": f"{needed / GiB:.1f} of {available / GiB:.1f} GiB" + ("" if ram_fits else " (does NOT fit)"),
            "why": why.text("ram"),
        },
        {"setting": "max-model-len", "value": str(max_len), "why": why.text("max_model_len")},
        {"setting": "max-num-seqs", "value": str(seqs), "why": why.text("max_num_seqs")},
        {"setting": "max-num-batched-tokens", "value": str(batched), "why": why.text("max_num_batched_tokens")},
        {"setting": "gpu-memory-utilization", "value": _fmt_util(util), "why": why.text("gpu_memory_utilization")},
        {"setting": "OMP_NUM_THREADS", "value": str(OMP_NUM_THREADS), "why": why.text("omp_num_threads")},
    ]
    env = plan_env(workers, gpus, gpu_layers, cpu_layers, tp, pp, experts_bf16=fmt.widen)
    vllm_args = plan_vllm_args(tp, pp, max_len, seqs, batched, util, target.vllm_args)
    plan = Plan(
        model=target.model,
        name=target.name,
        variant=target.variant,
        facts_source=facts.source,
        tp=tp,
        pp=pp,
        workers=workers,
        gpu_layers=gpu_layers,
        cpu_layers=cpu_layers,
        moe_layers=list(moe),
        max_model_len=max_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=batched,
        gpu_memory_utilization=util,
        omp_num_threads=OMP_NUM_THREADS,
        expert_bytes_per_layer=per_layer_total,
        ram_expert_bytes=ram_experts,
        ram_overhead_bytes=overhead,
        ram_needed_bytes=needed,
        ram_available_bytes=available,
        fits=fits,
        gpu_budgets=budgets,
        reasons=[f"{c['setting']} = {c['value']}: {c['why']}" for c in choices],
        choices=choices,
        warnings=warnings,
        problems=problems,
        suggestions=suggestions,
        env=env,
        vllm_args=vllm_args,
        model_summary=model_summary(facts),
        machine_summary=machine_summary(machine),
        needs_generate=target.generate is not None,
        experts_format=fmt.to_dict(),
    )
    if suggest and not ram_fits:
        suggestions.extend(suggest_fixes(machine, target, req, plan))
    return plan


def _check_node_memory(machine, workers, stages, cpu_layers, per_layer_total, tp, warnings) -> None:
    """The engine splits each worker's experts evenly over its nodes; warn where a node cannot hold its part."""
    per_node: dict[int, int] = {}
    for w in workers:
        if not w.numa_nodes:
            continue
        layers = [i for i in cpu_layers if i in stages[w.pp_rank].layers] if w.gpu is not None else cpu_layers
        share = len(layers) * per_layer_total / tp / len(w.numa_nodes)
        for n in w.numa_nodes:
            per_node[n] = per_node.get(n, 0) + int(share)
    for node in machine.numa:
        cap = node.mem_free_bytes or node.mem_total_bytes
        if cap and per_node.get(node.id, 0) > cap:
            warnings.append(
                f"NUMA node {node.id} gets {per_node[node.id] / GiB:.1f} GiB of experts but has {cap / GiB:.1f} GiB free: "
                "the rest lands on other nodes and decode slows down"
            )


def cpu_env(workers: list[Worker], tp: int, pp: int) -> dict[str, str]:
    """The per-worker CPU sets of the plugin contract (docs/readme/serve.md)."""
    env = {
        "LVLLM_RANK_CPUS": format_rank_lists(w.cpus for w in workers),
        "LVLLM_RANK_NODES": format_rank_lists(w.numa_nodes for w in workers),
        "LVLLM_RANK_THREADS": "|".join(str(w.threads) for w in workers),
    }
    if tp * pp == 1 and workers:
        env["LK_THREADS"] = str(workers[0].threads)
        env["LK_CPUS"] = format_cpulist(workers[0].cpus)
        env["LK_NODES"] = format_cpulist(workers[0].numa_nodes)
    return env


def plan_env(
    workers: list[Worker], gpus: list[GpuInfo], gpu_layers, cpu_layers, tp: int, pp: int, *, experts_bf16: bool = False
) -> dict[str, str]:
    """The environment contract with the vLLM plugin (docs/readme/serve.md)."""
    env = {
        "LVLLM_MOE_CPU": "1" if cpu_layers else "0",
        "LVLLM_GPU_LAYERS": format_layer_ranges(gpu_layers),
        "LVLLM_EXPERTS_BF16": "1" if experts_bf16 else "0",
        **cpu_env(workers, tp, pp),
        "OMP_NUM_THREADS": str(OMP_NUM_THREADS),
    }
    if gpus:
        # vLLM gives rank r the r-th visible GPU; PCI order makes the indices mean what nvidia-smi shows.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g.index) for g in gpus)
    return env


def _fmt_util(u: float) -> str:
    return f"{u:.4g}"  # exact enough that vLLM gets the fraction the budget was computed with


def plan_vllm_args(tp, pp, max_len, seqs, batched, util, profile_args: dict) -> list[str]:
    args = [
        "--tensor-parallel-size", str(tp),
        "--pipeline-parallel-size", str(pp),
        "--max-model-len", str(max_len),
        "--max-num-seqs", str(seqs),
        "--max-num-batched-tokens", str(batched),
        "--gpu-memory-utilization", _fmt_util(util),
    ]  # fmt: skip
    return args + profile_args_to_argv(profile_args)


def profile_args_to_argv(opts: dict) -> list[str]:
    """{option: value} -> argv: true -> flag, false -> omitted, list -> several values, mapping -> JSON."""
    import json

    out: list[str] = []
    for k, v in opts.items():
        flag = "--" + k
        if v is True:
            out.append(flag)
        elif v is False or v is None:
            continue
        elif isinstance(v, list):
            out += [flag, *(str(x) for x in v)]
        elif isinstance(v, dict):
            out += [flag, json.dumps(v, separators=(",", ":"))]
        else:
            out += [flag, str(v)]
    return out


def model_summary(f: ModelFacts) -> dict[str, Any]:
    return {
        "model_type": f.model_type,
        "layers": f.num_layers,
        "moe_layers": len(f.moe_layers),
        "experts": f.num_experts,
        "experts_per_token": f.experts_per_tok,
        "hidden_size": f.hidden_size,
        "moe_intermediate_size": f.moe_intermediate_size,
        "shared_expert_intermediate_size": f.shared_intermediate_size,
        "dtype": f.dtype,
        "experts_format": f.quant.label,
        "expert_bytes_total": f.total_expert_bytes(),
        "non_expert_bytes": f.non_expert_bytes(),
        "full_attention_layers": len(f.full_attention_layers),
        "max_position_embeddings": f.max_position_embeddings,
        "source": f.source,
    }


def machine_summary(m: Machine) -> dict[str, Any]:
    return {
        "cpu_model": m.cpu.model,
        "sockets": m.cpu.sockets,
        "physical_cores": m.cpu.physical_cores,
        "logical_cpus": m.cpu.logical_cpus,
        "numa_nodes": [n.id for n in m.numa],
        "ram_total_bytes": m.memory.total_bytes,
        "gpus": [{"index": g.index, "name": g.name, "memory_total_bytes": g.memory_total_bytes, "numa_node": g.numa_node} for g in m.gpus],
    }


# ---- suggestions when RAM does not fit ------------------------------------------------------


def suggest_fixes(machine: Machine, target: Target, req: Request, plan: Plan) -> list[str]:
    out: list[str] = []
    prof = target.profile
    if prof is not None:
        for vname in [None, *prof.variants]:
            if vname == target.variant:
                continue
            try:
                alt_target = resolve_profile(prof, vname)
            except ProfileError:
                continue
            alt = build_plan(machine, alt_target, req, suggest=False)
            if alt.fits:
                label = f"{prof.name}:{vname}" if vname else prof.name
                out.append(
                    f"use {label} ({alt_target.model}): it needs {alt.ram_needed_bytes / GiB:.1f} GiB of RAM "
                    f"(`lvllm tune {label}`)"
                )
    # A shorter context frees VRAM for more GPU layers, which takes experts out of RAM.
    if plan.has_gpu and not req.max_model_len and (req.gpu_layers is None and target.settings.gpu_layers is None or req.gpu_layers_auto):
        length = plan.max_model_len
        while length > MIN_MODEL_LEN:
            length = max(MIN_MODEL_LEN, length // 2)
            alt = build_plan(machine, target, _with(req, max_model_len=length), suggest=False)
            if alt.fits:
                out.append(
                    f"--max-model-len {length} leaves room for {len(alt.gpu_layers)} GPU layers "
                    f"(now {len(plan.gpu_layers)}) and needs {alt.ram_needed_bytes / GiB:.1f} GiB of RAM"
                )
                break
    if not out:
        short = plan.ram_needed_bytes - plan.ram_available_bytes
        out.append(
            f"{short / GiB:.1f} GiB more RAM is needed: free memory (close other programs), add RAM or GPUs, "
            "or choose a smaller model (`lvllm profiles`)"
        )
    return out


def _with(req: Request, **kw) -> Request:
    return replace(req, **kw)


def visible_gpus(machine: Machine, cuda_visible_devices: str | None, warnings: list[str]) -> Machine:
    """Honour a CUDA_VISIBLE_DEVICES the user already set (numeric indices only)."""
    if cuda_visible_devices is None:
        return machine
    items = [x.strip() for x in cuda_visible_devices.split(",") if x.strip()]
    if not all(x.isdigit() for x in items):
        warnings.append(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} is not a list of indices: ignored for planning")
        return machine
    keep = [int(x) for x in items]
    kept = [g for g in machine.gpus if g.index in keep]
    if len(kept) != len(machine.gpus):
        warnings.append(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices}: planning for GPU(s) {', '.join(str(g.index) for g in kept) or 'none'} only")
    return replace(machine, gpus=kept)
