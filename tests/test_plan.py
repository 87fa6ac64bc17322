"""Plans for the four fixture machines x every profile, checked against arithmetic done here from the rules.

The reference below is written from docs/readme/tune.md, not from plan.py:
per-layer parameter counts from the architectures, the GPU budget formula,
the closed-form context cut, the RAM formula.  CPU sets are spelled out by
hand for each machine.  The machines are the doctor's generated /proc and /sys
trees as the probe reads them (plan_machines.py; test_plan_machines.py checks
them against the same machines stated by hand).
"""

import math
from dataclasses import replace

import plan_machines as pm
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvllm_cli.machine import CpuInfo, GpuInfo, LogicalCpu, Machine, MemoryInfo, NumaNode
from lvllm_cli.plan import Request, build_plan
from lvllm_cli.profiles import resolve
from lvllm_cli.ranges import parse_cpulist, parse_layer_ranges, parse_rank_lists

GiB = 1 << 30


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    # Profile facts only: no developer's Hugging Face cache or generated demo model may change the numbers.
    monkeypatch.setenv("LVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


# ---- independent reference -------------------------------------------------------------------


def params_per_layer(cfg: dict, layer: int) -> tuple[int, int]:
    """(linear weights, 16-bit extras) of one layer without routed experts, from the architecture."""
    H = cfg["hidden_size"]
    mt = cfg["model_type"]
    heads, kvh, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    full = True
    if mt == "qwen3_next":
        full = (layer + 1) % cfg["full_attention_interval"] == 0
    if full:
        gate = 2 if mt == "qwen3_next" else 1  # Qwen3-Next's gated attention doubles q_proj
        attn = H * heads * hd * gate + 2 * H * kvh * hd + heads * hd * H
    else:
        kd = cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
        vd = cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
        attn = H * (2 * kd + 2 * vd) + H * 2 * cfg["linear_num_value_heads"] + (2 * kd + vd) * cfg["linear_conv_kernel_dim"] + vd * H
    E = cfg.get("num_experts") or cfg.get("n_routed_experts")
    is_moe = layer >= cfg.get("first_k_dense_replace", 0)
    if is_moe:
        shared = cfg.get("shared_expert_intermediate_size") or cfg.get("n_shared_experts", 0) * cfg["moe_intermediate_size"]
        mlp = 3 * H * shared
        extras = 2 * H + H * E + (H if mt.startswith("qwen3") and shared else 0)
    else:
        mlp = 3 * H * cfg["intermediate_size"]
        extras = 2 * H
    return attn + mlp, extras


def expert_bytes(cfg: dict) -> int:
    """Routed experts of one layer in the checkpoint's format."""
    H, I = cfg["hidden_size"], cfg["moe_intermediate_size"]
    E = cfg.get("num_experts") or cfg.get("n_routed_experts")
    n = 3 * H * I
    qc = cfg.get("quantization_config")
    if not qc:
        return E * n * 2
    if qc["quant_method"] == "fp8":
        return E * (n + 3 * math.ceil(H / 128) * math.ceil(I / 128) * 4)
    w = next(iter(qc["config_groups"].values()))["weights"]
    if w["num_bits"] == 8:  # per output channel: gate, up have I rows, down H rows
        return E * (n + (2 * I + H) * 4)
    return E * (n // 2 + (n // w["group_size"]) * 2)


def linear_bytes(cfg: dict) -> float:
    qc = cfg.get("quantization_config") or {}
    fp8 = qc.get("quant_method") == "fp8" or any(
        g["weights"]["num_bits"] == 8 for g in qc.get("config_groups", {}).values()
    )
    return 1 if fp8 else 2


def reference(machine_name: str, target_name: str) -> dict:
    m = pm.ALL[machine_name]()
    t = resolve(target_name)
    prof = t.profile
    cfg = prof.facts_for(t.variant)
    s = t.settings
    L, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    moe = [i for i in range(L) if i >= cfg.get("first_k_dense_replace", 0)]
    pp = len(m.gpus) if len(m.gpus) > 1 else 1  # both 2-GPU fixtures have their GPUs on different sockets
    workers = max(1, len(m.gpus))
    per = L // pp
    stages = [range(k * per, (k + 1) * per) for k in range(pp)]
    assert sum(len(r) for r in stages) == L  # all fixture models split evenly
    vocab_bytes = cfg["vocab_size"] * H * 2
    out = {"pp": pp, "tp": 1, "gpu_layers": [], "max_model_len": s.max_model_len}
    per_layer = expert_bytes(cfg)
    if m.gpus:
        util = s.gpu_memory_utilization
        reserve = int(1.5 * GiB) + s.max_num_batched_tokens * H * 32
        seqs = s.max_num_seqs
        rooms, kvs = [], []
        for k, layers in enumerate(stages):
            lin = sum(params_per_layer(cfg, i)[0] for i in layers)
            ext = sum(params_per_layer(cfg, i)[1] for i in layers)
            non_expert = int(lin * linear_bytes(cfg)) + 2 * ext
            non_expert += vocab_bytes if k == 0 else 0
            non_expert += vocab_bytes + 2 * H if k == pp - 1 else 0
            kvh = cfg["num_key_value_heads"]
            if cfg["model_type"] == "qwen3_next":
                full = [i for i in layers if (i + 1) % 4 == 0]
                kd = cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
                vd = cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
                state = (len(layers) - len(full)) * ((2 * kd + vd) * 3 + cfg["linear_num_value_heads"] * 128 * 128) * 2
            else:
                full, state = list(layers), 0
            kv_tok = len(full) * 2 * kvh * cfg["head_dim"] * 2
            usable = math.floor(m.gpus[k].memory_total_bytes * util)
            rooms.append(usable - non_expert - reserve - state * seqs)
            kvs.append(kv_tok)
            out.setdefault("budgets", []).append({"usable": usable, "non_expert": non_expert, "reserve": reserve, "state": state * seqs, "kv_tok": kv_tok})
        length = s.max_model_len
        if any(r - kv * length * seqs < 0 for r, kv in zip(rooms, kvs)):
            fit = min((r // (kv * seqs)) for r, kv in zip(rooms, kvs))
            length = max(2048, fit // 1024 * 1024)
        out["max_model_len"] = length
        for b in out["budgets"]:
            b["kv"] = b.pop("kv_tok") * length * seqs + b.pop("state")
        if s.gpu_layers is None:
            for k, layers in enumerate(stages):
                room = rooms[k] - kvs[k] * length * seqs
                stage_moe = [i for i in moe if i in layers]
                n = max(0, min(len(stage_moe), room // per_layer))
                out["gpu_layers"] += stage_moe[len(stage_moe) - n :]
        else:
            out["gpu_layers"] = moe[len(moe) - s.gpu_layers :]
    cpu_layers = len(moe) - len(out["gpu_layers"])
    out["ram_needed"] = cpu_layers * per_layer + 4 * GiB + 3 * GiB * workers
    out["ram_available"] = m.memory.available_bytes
    out["fits"] = out["ram_needed"] <= out["ram_available"]
    return out


# Hand-derived CPU sets: physical cores of each worker's nodes, minus the first core of its GPU's node
# (all its nodes have equally many cores, so the tie goes to the GPU's node).
EXPECTED_CPUS = {
    "desktop": ([[0]], [list(range(1, 8))]),
    "xeon_snc": ([[0, 1], [2, 3]], [list(range(1, 28)), list(range(29, 56))]),
    "epyc_nps4": ([[0, 1, 2, 3], [4, 5, 6, 7]], [[c for c in range(96) if c != 24], [c for c in range(96, 192) if c != 120]]),
    "avx2_vm": ([[0]], [[1, 2, 3]]),
}

TARGETS = ["demo", "qwen3-coder-30b", "qwen3-coder-30b:fp8", "qwen3-next", "qwen3-next:fp8", "qwen3-next:awq", "glm-4.5-air", "glm-4.5-air:awq"]


@pytest.mark.parametrize("machine_name", list(pm.ALL))
@pytest.mark.parametrize("target_name", TARGETS)
def test_fixture_plans_match_the_reference(machine_name, target_name):
    m = pm.ALL[machine_name]()
    plan = build_plan(m, resolve(target_name))
    ref = reference(machine_name, target_name)
    nodes, cpus = EXPECTED_CPUS[machine_name]
    assert (plan.tp, plan.pp) == (ref["tp"], ref["pp"])
    assert [w.numa_nodes for w in plan.workers] == nodes
    assert [w.cpus for w in plan.workers] == cpus
    assert [w.threads for w in plan.workers] == [len(c) for c in cpus]
    assert [w.gpu for w in plan.workers] == ([g.index for g in m.gpus] or [None])
    assert plan.max_model_len == ref["max_model_len"]
    got = [{"usable": b.usable_bytes, "non_expert": b.non_expert_bytes, "reserve": b.reserve_bytes, "kv": b.kv_bytes} for b in plan.gpu_budgets]
    assert got == ref.get("budgets", [])
    assert all(b.expert_layer_bytes == expert_bytes(resolve(target_name).profile.facts_for(resolve(target_name).variant)) for b in plan.gpu_budgets)
    assert plan.gpu_layers == ref["gpu_layers"]
    assert plan.ram_needed_bytes == ref["ram_needed"]
    assert plan.ram_available_bytes == ref["ram_available"]
    assert plan.fits == ref["fits"]
    # the environment says the same thing
    env = plan.env
    assert parse_layer_ranges(env["LVLLM_GPU_LAYERS"], plan.model_summary["layers"]) == plan.gpu_layers
    assert parse_rank_lists(env["LVLLM_RANK_CPUS"], len(cpus)) == cpus
    assert parse_rank_lists(env["LVLLM_RANK_NODES"], len(cpus)) == nodes
    assert env["LVLLM_RANK_THREADS"].split("|") == [str(len(c)) for c in cpus]
    assert env["LVLLM_MOE_CPU"] == ("1" if plan.cpu_layers else "0")
    assert env["OMP_NUM_THREADS"] == "1"
    if plan.tp * plan.pp == 1:
        assert parse_cpulist(env["LK_CPUS"]) == cpus[0] and env["LK_THREADS"] == str(len(cpus[0]))
        assert parse_cpulist(env["LK_NODES"]) == nodes[0]
    else:
        assert "LK_CPUS" not in env
    if m.gpus:
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(str(g.index) for g in m.gpus)
        assert f"--pipeline-parallel-size {plan.pp}" in " ".join(plan.vllm_args)
        assert f"--max-model-len {plan.max_model_len}" in " ".join(plan.vllm_args)
    else:
        assert any("no NVIDIA GPU" in w for w in plan.warnings) and "CUDA_VISIBLE_DEVICES" not in env
    d = plan.to_dict()
    for key in ("tp", "pp", "workers", "gpu_layers", "ram_needed_bytes", "ram_available_bytes", "fits", "reasons", "env", "vllm_args"):
        assert key in d
    assert set(d["workers"][0]) >= {"gpu", "numa_nodes", "cpus", "threads"}
    assert all(isinstance(r, str) and r for r in d["reasons"])


def test_the_interesting_verdicts():
    """Spot checks that the fixtures exercise fit and no-fit both ways."""
    assert not build_plan(pm.desktop(), resolve("qwen3-next")).fits
    assert build_plan(pm.desktop(), resolve("qwen3-next:awq")).fits
    assert build_plan(pm.xeon_snc(), resolve("glm-4.5-air")).fits
    assert not build_plan(pm.avx2_vm(), resolve("qwen3-coder-30b")).fits
    assert build_plan(pm.avx2_vm(), resolve("demo")).fits
    # all 128 x 48 experts of Qwen3-Coder (54 GiB) fit in the 2 x 48 GiB GPUs of the EPYC box: plain vLLM
    p = build_plan(pm.epyc_nps4(), resolve("qwen3-coder-30b"))
    assert p.cpu_layers == [] and p.env["LVLLM_MOE_CPU"] == "0"


def test_no_fit_comes_with_concrete_suggestions():
    p = build_plan(pm.desktop(), resolve("qwen3-next"))
    assert any("not enough RAM" in x for x in p.problems)
    assert any(s.startswith("use qwen3-next:awq") and "lvllm tune qwen3-next:awq" in s for s in p.suggestions)
    assert not any("qwen3-next:fp8" in s for s in p.suggestions)  # fp8 does not fit 64 GiB either
    p = build_plan(pm.desktop(), resolve("qwen3-coder-30b"))
    ctx = [s for s in p.suggestions if s.startswith("--max-model-len")]
    assert ctx, p.suggestions
    length = int(ctx[0].split()[1])
    assert build_plan(pm.desktop(), resolve("qwen3-coder-30b"), Request(max_model_len=length)).fits
    p = build_plan(pm.avx2_vm(), resolve("qwen3-next"))
    assert any("more RAM is needed" in s for s in p.suggestions)


def test_requested_values_are_never_lowered_and_fail_instead():
    p = build_plan(pm.desktop(), resolve("qwen3-coder-30b"), Request(max_model_len=262144, max_num_seqs=8))
    assert p.max_model_len == 262144 and p.max_num_seqs == 8 and not p.fits
    assert any("too small even without experts" in x for x in p.problems)
    p = build_plan(pm.desktop(), resolve("qwen3-coder-30b"), Request(max_model_len=300000))
    assert any("exceeds the model's max_position_embeddings" in x for x in p.problems)


def test_fixed_gpu_layers_and_smt():
    t = resolve("qwen3-next:awq")
    p = build_plan(pm.desktop(), t, Request(gpu_layers=3))
    assert p.gpu_layers == [45, 46, 47] and p.env["LVLLM_GPU_LAYERS"] == "45-47"
    p = build_plan(pm.desktop(), t, Request(gpu_layers=40))
    assert not p.fits and any("do not fit on GPU 0" in x for x in p.problems)
    p = build_plan(pm.desktop(), t, Request(gpu_layers=0))
    assert p.gpu_layers == [] and p.env["LVLLM_GPU_LAYERS"] == ""
    # the demo profile fixes one GPU layer; --gpu-layers auto overrides it
    demo = resolve("demo")
    assert build_plan(pm.desktop(), demo).gpu_layers == demo.facts.moe_layers[-1:]
    assert build_plan(pm.desktop(), demo, Request(gpu_layers_auto=True)).gpu_layers == demo.facts.moe_layers
    p = build_plan(pm.desktop(), t, Request(smt=True))
    assert p.workers[0].cpus == [c for c in range(16) if c not in (0, 8)] and p.workers[0].reserved_cpus == [0, 8]


def _two_gpus(m: Machine, nodes: list[int], mem: int) -> Machine:
    gpus = [GpuInfo(index=i, numa_node=n, memory_total_bytes=mem, memory_free_bytes=mem) for i, n in enumerate(nodes)]
    return replace(m, gpus=gpus)


def test_same_socket_gpus_use_tensor_parallelism():
    m = _two_gpus(pm.xeon_snc(), [0, 1], 48 * GiB)
    p = build_plan(m, resolve("qwen3-next"))
    assert (p.tp, p.pp) == (2, 1)
    # nodes 2 and 3 are equally far (21) from both GPU nodes: they go one to each worker
    assert [w.numa_nodes for w in p.workers] == [[0, 2], [1, 3]]
    assert p.workers[0].cpus == list(range(1, 14)) + list(range(28, 42))
    assert p.workers[1].cpus == list(range(15, 28)) + list(range(42, 56))
    assert "--tensor-parallel-size 2" in " ".join(p.vllm_args)


def test_two_gpus_on_one_node_split_its_cores():
    m = _two_gpus(pm.desktop(), [0, 0], 24 * GiB)
    p = build_plan(m, resolve("qwen3-coder-30b"))
    assert (p.tp, p.pp) == (2, 1)
    assert [w.cpus for w in p.workers] == [[1, 2, 3], [5, 6, 7]]
    assert [w.reserved_cpus for w in p.workers] == [[0], [4]]
    assert p.env["LVLLM_RANK_CPUS"] == "1-3|5-7"


def test_four_gpus_on_two_sockets_tp_inside_pp_across():
    m = pm.epyc_nps4()
    gpus = [GpuInfo(index=i, numa_node=n, memory_total_bytes=96 * GiB) for i, n in enumerate([5, 0, 4, 1])]
    p = build_plan(replace(m, gpus=gpus), resolve("qwen3-next"))
    assert (p.tp, p.pp) == (2, 2)
    assert [w.gpu for w in p.workers] == [1, 3, 2, 0]  # socket 0 (nodes 0, 1) first, tp-major within pp
    assert p.env["CUDA_VISIBLE_DEVICES"] == "1,3,2,0"
    assert [(w.pp_rank, w.tp_rank) for w in p.workers] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [w.numa_nodes for w in p.workers] == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_tp_falls_back_to_pp_when_the_model_does_not_split():
    t = resolve("glm-4.5-air")
    t.facts.quant = replace(t.facts.quant, block=(128, 128), per_channel=False)  # 1408 / 2 = 704 is not a multiple of 128
    m = _two_gpus(pm.xeon_snc(), [0, 1], 48 * GiB)
    p = build_plan(m, t)
    assert (p.tp, p.pp) == (1, 2)
    assert "fp8 block" in next(c["why"] for c in p.choices if c["setting"] == "parallelism")
    p = build_plan(m, t, Request(tp=2))
    assert any("TP=2 cannot split this model" in x for x in p.problems)
    p = build_plan(m, t, Request(tp=2, pp=2))
    assert any("needs 4 GPUs but 2 found" in x for x in p.problems)


def test_busy_gpu_lowers_utilization_and_user_cuda_visible_devices():
    m = pm.desktop()
    m.gpus[0].memory_free_bytes = 20 * GiB
    p = build_plan(m, resolve("qwen3-next:awq"))
    assert p.gpu_memory_utilization == pytest.approx(math.floor(20 / 24 * 100) / 100 - 0.01)
    p = build_plan(m, resolve("qwen3-next:awq"), Request(gpu_memory_utilization=0.9))
    assert p.gpu_memory_utilization == 0.9 and any("will refuse" in w for w in p.warnings)
    p = build_plan(pm.xeon_snc(), resolve("qwen3-next"), Request(cuda_visible_devices="1"))
    assert [w.gpu for w in p.workers] == [1] and (p.tp, p.pp) == (1, 1)
    assert p.workers[0].numa_nodes == [0, 1, 2, 3]  # the only worker gets every node


def test_cpu_without_avx2_is_a_problem():
    m = pm.avx2_vm()
    m.cpu.flags = ["sse4_2", "avx"]
    p = build_plan(m, resolve("demo"))
    assert not p.fits and any("AVX2" in x for x in p.problems)


# ---- invariants on random machines -------------------------------------------------------------


@st.composite
def machines(draw):
    sockets = draw(st.integers(1, 2))
    nodes_per_socket = draw(st.integers(1, 4))
    cores_per_node = draw(st.integers(1, 6))
    smt = draw(st.booleans())
    n_nodes = sockets * nodes_per_socket
    physical = n_nodes * cores_per_node
    tpc = 2 if smt else 1
    online = []
    for t in range(tpc):
        for p in range(physical):
            node = p // cores_per_node
            online.append(LogicalCpu(id=t * physical + p, core_id=p % (nodes_per_socket * cores_per_node), package_id=node // nodes_per_socket, node=node))
    dist = [[10 if a == b else (12 if a // nodes_per_socket == b // nodes_per_socket else 32) for b in range(n_nodes)] for a in range(n_nodes)]
    numa = [NumaNode(id=n, cpus=[c.id for c in online if c.node == n], mem_total_bytes=64 * GiB, distances=dist[n]) for n in range(n_nodes)]
    gpu_nodes = draw(st.lists(st.integers(0, n_nodes - 1), max_size=4))
    mem = draw(st.sampled_from([16, 24, 48, 80])) * GiB
    gpus = [GpuInfo(index=i, numa_node=n, memory_total_bytes=mem) for i, n in enumerate(gpu_nodes)]
    ram = draw(st.sampled_from([32, 128, 512])) * GiB
    cpu = CpuInfo(flags=["avx2", "fma"], sockets=sockets, physical_cores=physical, logical_cpus=physical * tpc, threads_per_core=tpc, online=online)
    return Machine(cpu=cpu, numa=numa, memory=MemoryInfo(total_bytes=ram, available_bytes=ram), gpus=gpus)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(machines(), st.sampled_from(["qwen3-coder-30b", "qwen3-next:awq", "demo", "glm-4.5-air"]), st.booleans())
def test_plan_invariants_on_random_machines(m, target_name, smt):
    t = resolve(target_name)
    p = build_plan(m, t, Request(smt=smt))
    siblings_of = {}
    for c in m.cpu.online:
        siblings_of.setdefault((c.package_id, c.core_id), []).append(c.id)
    first_thread = {min(v) for v in siblings_of.values()}
    used = [c for w in p.workers for c in w.cpus]
    reserved = [c for w in p.workers for c in w.reserved_cpus]
    assert len(used) == len(set(used)), "two workers share a CPU"
    assert not set(used) & set(reserved)
    if smt:
        assert sorted(used + reserved) == sorted(c.id for c in m.cpu.online)
    else:
        assert set(used) <= first_thread and sorted(used + reserved) == sorted(first_thread)
    for w in p.workers:
        assert w.threads == len(w.cpus)
        # a worker's nodes are exactly those it has threads on (its GPU's node when it has none)
        assert w.numa_nodes == (sorted({m.node_of_cpu(c) for c in w.cpus}) or [m.gpus[w.gpu].numa_node if w.gpu is not None else 0])
    assert len(p.workers) == max(1, p.tp * p.pp) and p.tp * p.pp <= max(1, len(m.gpus))
    # every node's cores are in use (as threads or as a worker's reserved core)
    assert {m.node_of_cpu(c) for c in used + reserved} == {n.id for n in m.numa}
    # a GPU worker with cores on its GPU's node keeps that node
    for w in p.workers:
        if w.gpu is not None and any(m.node_of_cpu(c) == m.gpus[w.gpu].numa_node for c in w.cpus + w.reserved_cpus):
            core_of = {c.id: (c.package_id, c.core_id) for c in m.cpu.online}
            home_cores = len({core_of[c] for c in w.cpus + w.reserved_cpus if m.node_of_cpu(c) == m.gpus[w.gpu].numa_node})
            assert m.gpus[w.gpu].numa_node in w.numa_nodes or home_cores == 1
    # GPU layers: MoE layers only, a suffix of each stage's MoE layers, within each GPU's room
    moe = t.facts.moe_layers
    assert set(p.gpu_layers) <= set(moe) and p.cpu_layers == [i for i in moe if i not in p.gpu_layers]
    from lvllm_cli.plan import pp_layer_ranges

    for stage in pp_layer_ranges(t.facts.num_layers, p.pp):
        stage_moe = [i for i in moe if i in stage]
        on_gpu = [i for i in p.gpu_layers if i in stage]
        assert on_gpu == stage_moe[len(stage_moe) - len(on_gpu) :]
    if t.settings.gpu_layers is None and not any("too small" in x for x in p.problems):
        assert all(b.left_bytes >= 0 for b in p.gpu_budgets)
        assert all(b.left_bytes < b.expert_layer_bytes or b.expert_layers == len([i for i in moe if i in pp_layer_ranges(t.facts.num_layers, p.pp)[b.pp_rank]]) for b in p.gpu_budgets)
    assert p.ram_needed_bytes == len(p.cpu_layers) * t.facts.expert_bytes_per_layer() + 4 * GiB + 3 * GiB * len(p.workers)
    assert p.fits == (p.ram_needed_bytes <= p.ram_available_bytes and not p.problems)
    assert parse_rank_lists(p.env["LVLLM_RANK_CPUS"], len(p.workers)) == [w.cpus for w in p.workers]
