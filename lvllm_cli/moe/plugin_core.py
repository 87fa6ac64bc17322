"""What the vLLM plugin decides and runs, without importing vLLM.

The seam itself (lvllm_cli/vllm_plugin.py) only translates vLLM's objects into
calls of this module: which layers stay on the GPU, which CPUs this worker
uses, one MoELayer per CPU layer fed by vLLM's weight loader, and the
stream-ordered runner.  Everything here is tested on the CPU.

Environment (set by `lvllm serve`, see lvllm_cli/plan.py):
  LVLLM_MOE_CPU=1          enable (anything else: stock vLLM)
  LVLLM_GPU_LAYERS=0-3,46  decoder layers whose experts stay on the GPU
  LVLLM_RANK_CPUS=0-15|16-31, LVLLM_RANK_NODES=0|1, LVLLM_RANK_THREADS=15|15
                           per parallel rank (tensor-parallel rank fastest)
  LK_THREADS / LK_CPUS / LK_NODES / LK_VIRTUAL_NODES   a single worker's placement
  LVLLM_METRICS_DIR        where each worker publishes its figures (monitor)
  LVLLM_EXPERTS_BF16=1     widen quantized checkpoints' experts to bf16 at load
  LVLLM_STREAM_SYNC=memops captured calls hand over through stream memory operations
                           and a spinning worker instead of two host functions (hostcalls.py)
  LVLLM_TIMING_FILE        where each second a JSON snapshot of the engine's and host
                           functions' counters goes (moe/timing.py; benchmarks)
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from lvllm_cli.moe import native, timing
from lvllm_cli.ranges import parse_cpulist, parse_layer_ranges, parse_rank_lists

log = logging.getLogger("lvllm")

DUMMY_WEIGHT_RANGE = 1e-3  # what vLLM's --load-format dummy draws from: U(-1e-3, 1e-3)


def enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("LVLLM_MOE_CPU", "0").strip() == "1"


def layer_index(layer_name: str) -> int:
    """'model.layers.12.mlp.experts' -> 12 (the one integer in vLLM's layer names)."""
    numbers = [int(part) for part in layer_name.split(".") if part.isdigit()]
    if len(numbers) != 1:
        raise ValueError(f"cannot tell the decoder layer of MoE module {layer_name!r}")
    return numbers[0]


def gpu_layers(env: Mapping[str, str], num_layers: int) -> set[int]:
    raw = env.get("LVLLM_GPU_LAYERS", "").strip()
    try:
        return set(parse_layer_ranges(raw, num_layers))
    except ValueError as exc:
        raise ValueError(f"LVLLM_GPU_LAYERS: {exc}") from None


@dataclass(frozen=True)
class Placement:
    threads: int | None = None
    cpus: tuple[int, ...] | None = None
    nodes: tuple[int, ...] | None = None


def placement_for_rank(env: Mapping[str, str], rank: int, world: int) -> Placement:
    """This worker's CPUs: its entry of LVLLM_RANK_* when set, else LK_* (read later by the engine)."""

    def entry(name: str) -> str | None:
        raw = env.get(name, "").strip()
        if not raw:
            return None
        parts = raw.split("|")
        if len(parts) != world:
            raise ValueError(f"{name}={raw!r} has {len(parts)} entries but vLLM runs {world} parallel ranks")
        return parts[rank].strip()

    cpus = entry("LVLLM_RANK_CPUS")
    nodes = entry("LVLLM_RANK_NODES")
    threads = entry("LVLLM_RANK_THREADS")
    try:
        return Placement(
            threads=int(threads) if threads else None,
            cpus=tuple(parse_cpulist(cpus)) if cpus else None,
            nodes=tuple(parse_cpulist(nodes)) if nodes else None,
        )
    except ValueError as exc:
        raise ValueError(f"LVLLM_RANK_* entry of rank {rank}: {exc}") from None


def check_rank_lists_disjoint(env: Mapping[str, str]) -> None:
    """No two workers may pin threads to the same core."""
    raw = env.get("LVLLM_RANK_CPUS", "").strip()
    if not raw:
        return
    seen: dict[int, int] = {}
    for rank, cpus in enumerate(parse_rank_lists(raw)):
        for c in cpus:
            if c in seen:
                raise ValueError(f"LVLLM_RANK_CPUS gives CPU {c} to ranks {seen[c]} and {rank}")
            seen[c] = rank


class CpuExperts:
    """Per worker process: the engine, the CPU layers, the runner and the metrics file."""

    def __init__(self, env: Mapping[str, str], *, rank: int, world: int, max_tokens: int, stream_ops=None):
        from lvllm_cli.moe.layer import get_engine

        self.env = dict(env)
        self.max_tokens = max(1, int(max_tokens))
        check_rank_lists_disjoint(env)
        p = placement_for_rank(env, rank, world)
        self.engine = get_engine(threads=p.threads, cpus=p.cpus, nodes=p.nodes)
        self.layers: dict[str, Any] = {}
        self.assemblers: dict[str, Any] = {}  # quantized layers: pieces of projections waiting for the rest
        self.gpu_layer_count = 0
        self.cpu_layer_count = 0
        self._runner = None
        self._staging_key: tuple | None = None
        self._lock = threading.Lock()
        self._exporter: MetricsExporter | None = None
        self._stream_ops = stream_ops  # factory; default: the current CUDA stream

    # -- building ------------------------------------------------------------
    def new_layer(self, name: str, experts: int, hidden: int, intermediate: int, dtype: str, scheme=None):
        """A CPU layer of bf16/fp16 weights, or of the quantized format `scheme` (a quant_loading.QuantScheme)."""
        from lvllm_cli.moe.layer import MoELayer
        from lvllm_cli.moe.quant_loading import QuantAssembler, dequantize_at_load, int8_activations

        if scheme is None:
            layer = MoELayer.empty(experts, hidden, intermediate, dtype, engine=self.engine)
        else:
            if dequantize_at_load(self.env):  # the assembler widens each projection to this bf16 layer
                layer = MoELayer.empty(experts, hidden, intermediate, "bfloat16", engine=self.engine)
            else:
                layer = MoELayer.empty(experts, hidden, intermediate, scheme.kind, group_size=scheme.group,
                                       engine=self.engine, int8_activations=int8_activations(self.env))
            self.assemblers[name] = QuantAssembler(layer, scheme, name)
        self.layers[name] = layer
        self.cpu_layer_count += 1
        return layer

    def add_quantized(self, name: str, expert: int, part: str, what: str, tensor: Any) -> None:
        """One piece (quant_loading.ROLES) of an expert projection, already this rank's slice, from vLLM's loader."""
        self.assemblers[name].add(expert, part, what, tensor)

    def finish_layer(self, name: str, *, dummy: bool, seed: int) -> None:
        """After vLLM's loader: random weights for --load-format dummy, else every expert must have arrived."""
        layer = self.layers[name]
        if dummy:
            layer.fill_random(seed=seed, scale=DUMMY_WEIGHT_RANGE)
        assembler = self.assemblers.pop(name, None)
        halves = assembler.incomplete() if assembler is not None and not dummy else []
        if halves:
            raise RuntimeError(f"{name}: the checkpoint gave codes without scales, scales without codes or no "
                               f"zero points for {len(halves)} projections (e.g. {halves[0]}); is the model "
                               "directory complete?")
        missing = [e for e, m in enumerate(layer.native.loaded) if m != 7]
        if missing:
            parts = {1: "gate", 2: "up", 4: "down"}
            e = missing[0]
            lacking = [p for bit, p in parts.items() if not layer.native.loaded[e] & bit]
            raise RuntimeError(
                f"{name}: the checkpoint did not provide every routed expert "
                f"({len(missing)} incomplete, e.g. expert {e} lacks {'/'.join(lacking)}); "
                "is the model directory complete?"
            )

    # -- running -------------------------------------------------------------
    def runner(self, hidden: int, k: int, dtype: Any):
        """The process-wide runner; its pinned staging is made before any graph capture."""
        from lvllm_cli.moe.hostcalls import CudaStreamOps, HostCallRunner, Staging, stream_sync

        key = (hidden, k, str(dtype))
        with self._lock:
            if self._runner is None:
                ops = self._stream_ops() if self._stream_ops else CudaStreamOps()
                pin = isinstance(ops, CudaStreamOps)
                staging = Staging(self.max_tokens, hidden, k, dtype, pin=pin)
                sync = stream_sync(self.env)
                try:
                    self._runner = HostCallRunner(ops, staging, sync)
                except RuntimeError as exc:  # a driver without stream memory operations
                    log.warning("lvllm: LVLLM_STREAM_SYNC=%s unavailable (%s); using host functions", sync, exc)
                    self._runner = HostCallRunner(ops, staging, "hostfn")
                self._staging_key = key
            elif key != self._staging_key:
                raise RuntimeError(
                    f"MoE layers of one model differ in hidden size / top-k / dtype ({key} vs {self._staging_key}); "
                    "lvllm supports one shape per process"
                )
            return self._runner

    def prepare(self, name: str, k: int, dtype: Any) -> None:
        layer = self.layers[name]
        self.runner(layer.hidden, k, dtype)
        self.engine.reserve(self.max_tokens, k, layer.native)

    def run(self, name: str, x: Any, topk_ids: Any, topk_weights: Any):
        layer = self.layers[name]
        return self.runner(layer.hidden, int(topk_ids.shape[1]), x.dtype).run(layer, x, topk_ids, topk_weights)

    # -- figures -------------------------------------------------------------
    def start_metrics(self, directory=None, period_s: float = 1.0) -> "MetricsExporter | None":
        """Publish this worker's figures for `lvllm monitor`; a directory we may not use only costs the figures."""
        if self._exporter is None:
            try:
                self._exporter = MetricsExporter(self, directory, period_s)
            except OSError as exc:
                log.warning("lvllm: CPU-expert figures not published: %s", exc)
                return None
            self._exporter.start()
            atexit.register(self._exporter.stop)
        return self._exporter


class MetricsExporter(threading.Thread):
    """Rewrites this worker's Prometheus file about once a second (see monitor/engine_metrics.py).

    GPU-resident layers run inside CUDA graphs where nothing can count them;
    every token passes every MoE layer of a step, so their tokens are derived:
    CPU tokens per CPU layer x number of GPU layers.
    """

    def __init__(self, experts: CpuExperts, directory=None, period_s: float = 1.0):
        super().__init__(name="lvllm-metrics", daemon=True)
        from lvllm_cli.monitor import engine_metrics

        self._em = engine_metrics
        self.experts = experts
        self.directory = engine_metrics.prepare_dir(directory or engine_metrics.metrics_dir(experts.env))
        self.period_s = period_s
        self.timing_file = experts.env.get("LVLLM_TIMING_FILE") or None
        self._stop = threading.Event()

    def snapshot_text(self) -> str:
        st = self.experts.engine.stats()
        cpu_layers = max(self.experts.cpu_layer_count, 1)
        cpu_tokens = float(st["tokens"])
        gpu_tokens = cpu_tokens / cpu_layers * self.experts.gpu_layer_count
        return self._em.format_metrics(cpu_tokens, gpu_tokens, st["busy_ns"] / 1e9, float(st["calls"]),
                                       float(self.experts.engine.threads))

    def write_once(self) -> None:
        self._em.write_metrics_file(self.directory, self.snapshot_text())
        if self.timing_file:
            times = native.load().hostfn_times()
            timing.write_snapshot(self.timing_file, timing.snapshot(self.experts.engine.stats(), times))

    def run(self) -> None:
        warned = False
        while not self._stop.wait(self.period_s):
            try:
                self.write_once()
            except Exception as exc:  # noqa: BLE001 - figures must never take the server down
                if not warned:
                    log.warning("lvllm: cannot write CPU-expert figures to %s: %s", self.directory, exc)
                    warned = True

    def stop(self) -> None:
        self._stop.set()
        self._em.remove_metrics_file(self.directory)


def dummy_seed(layer_name: str) -> int:
    """A stable per-layer seed, so dummy runs are reproducible."""
    return (layer_index(layer_name) + 1) * 1_000_003 % (1 << 31)

