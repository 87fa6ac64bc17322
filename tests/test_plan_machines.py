"""The plan tests' machines are read by the probe from generated kernel files (tests/fixtures/sysfs.py);
here they are checked against the same machines stated by hand (plan_machines.HAND): the probe must
find exactly the facts the planner uses, and both must give the same plan for every profile."""

from dataclasses import replace

import plan_machines as pm
import pytest

from lvllm_cli.isa import kernel_variant_for_flags
from lvllm_cli.plan import Request, build_plan
from lvllm_cli.profiles import resolve

TARGETS = ["demo", "qwen3-coder-30b", "qwen3-coder-30b:fp8", "qwen3-next", "qwen3-next:fp8", "qwen3-next:awq", "glm-4.5-air", "glm-4.5-air:awq"]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


def planner_facts(m) -> dict:
    """Everything about a machine that build_plan reads."""
    return {
        "cpus": [(c.id, c.core_id, c.package_id, c.node, sorted(c.siblings)) for c in m.cpu.online],
        "counts": (m.cpu.sockets, m.cpu.physical_cores, m.cpu.logical_cpus, m.cpu.threads_per_core),
        "kernel": kernel_variant_for_flags(m.cpu.flags),
        "numa": [(n.id, n.cpus, n.mem_total_bytes, n.mem_free_bytes, n.distances) for n in m.numa],
        "memory": (m.memory.total_bytes, m.memory.available_bytes),
        "gpus": [(g.index, g.numa_node, g.memory_total_bytes, g.memory_free_bytes) for g in m.gpus],
    }


def plan_without_summary(machine, target, request=None) -> dict:
    d = build_plan(machine, resolve(target), request or Request()).to_dict()
    d.pop("machine_summary")  # names and sources differ by design; the plan itself may not
    return d


@pytest.mark.parametrize("name", list(pm.ALL))
def test_the_probe_finds_the_hand_stated_facts(name):
    probed, hand = pm.ALL[name](), pm.HAND[name]()
    assert probed.sysroot != "/" and not probed.read_problems
    assert planner_facts(probed) == planner_facts(hand)


@pytest.mark.parametrize("name", list(pm.ALL))
@pytest.mark.parametrize("target", TARGETS)
def test_same_plans_from_kernel_files_and_by_hand(name, target):
    assert plan_without_summary(pm.ALL[name](), target) == plan_without_summary(pm.HAND[name](), target)


@pytest.mark.parametrize("target", TARGETS)
def test_a_gpu_without_numa_node_on_a_one_node_machine_is_local_to_it(target):
    """Desktops report numa_node -1 for their GPU (the generated desktop does): the plan must be the one
    for a GPU on node 0, without a warning about it."""
    m = pm.desktop()
    assert [g.numa_node for g in m.gpus] == [None]
    on_node0 = replace(m, gpus=[replace(g, numa_node=0) for g in m.gpus])
    unknown = plan_without_summary(m, target)
    assert unknown == plan_without_summary(on_node0, target)
    assert not any("NUMA node" in w for w in unknown["warnings"])


def test_machines_are_fresh_copies():
    a = pm.xeon_snc()
    a.cpu.flags.clear()
    a.gpus.pop()
    b = pm.xeon_snc()
    assert b.cpu.flags and len(b.gpus) == 2
