"""Which CPUs the engine's workers get (lvllm_cli/moe/placement.py), on machines probed from generated sysfs trees."""

from __future__ import annotations

import pytest

from fixtures.sysfs import make_desktop, make_xeon_snc
from lvllm_cli.moe.placement import Group, Settings, plan_groups, settings_from_env
from lvllm_cli.probe import probe


@pytest.fixture(scope="module")
def xeon(tmp_path_factory):
    return probe(sysroot=make_xeon_snc(tmp_path_factory.mktemp("xeon")), use_nvml=False).cpu.online


@pytest.fixture(scope="module")
def desktop(tmp_path_factory):
    return probe(sysroot=make_desktop(tmp_path_factory.mktemp("desk")), use_nvml=False).cpu.online


def all_ids(topo):
    return {c.id for c in topo}


def test_default_one_worker_per_physical_core_per_node_minus_the_reserve(xeon):
    groups = plan_groups(xeon, all_ids(xeon), Settings())
    # 4 SNC nodes of 14 cores; node 0 is CPUs 0-13 (+ siblings 56-69); the reserve comes off node 0.
    assert [g.numa_node for g in groups] == [0, 1, 2, 3]
    assert groups[0].cpus == tuple(range(0, 13))
    assert groups[1].cpus == tuple(range(14, 28))
    assert sum(len(g.cpus) for g in groups) == 55
    assert not set(range(56, 112)) & {c for g in groups for c in g.cpus}  # no SMT siblings


def test_smt_and_no_reserve(desktop):
    g = plan_groups(desktop, all_ids(desktop), Settings(smt=True, reserve=0))
    assert g == [Group(0, tuple(range(16)))]
    assert plan_groups(desktop, all_ids(desktop), Settings(reserve=0)) == [Group(0, tuple(range(8)))]


def test_threads_are_spread_evenly_over_nodes(xeon):
    groups = plan_groups(xeon, all_ids(xeon), Settings(threads=10))
    assert [len(g.cpus) for g in groups] == [3, 3, 2, 2]
    assert groups[0].cpus == (0, 1, 2)


def test_nodes_and_explicit_cpus(xeon):
    assert plan_groups(xeon, all_ids(xeon), Settings(nodes=(2,), reserve=0)) == [Group(2, tuple(range(28, 42)))]
    g = plan_groups(xeon, all_ids(xeon), Settings(cpus=(0, 1, 14, 15)))
    assert g == [Group(0, (0, 1)), Group(1, (14, 15))]


def test_affinity_limits_the_choice(desktop):
    assert plan_groups(desktop, {2, 3, 4, 10}, Settings(reserve=0)) == [Group(0, (2, 3, 4))]


def test_virtual_nodes_split_the_workers(desktop):
    g = plan_groups(desktop, all_ids(desktop), Settings(virtual_nodes=2, reserve=0))
    assert g == [Group(0, (0, 1, 2, 3)), Group(0, (4, 5, 6, 7))]


def test_virtual_groups_spanning_real_nodes_have_no_memory_node(xeon):
    g = plan_groups(xeon, all_ids(xeon), Settings(cpus=(0, 1, 14), virtual_nodes=1))
    assert g == [Group(-1, (0, 1, 14))]


def test_more_threads_than_cores_run_unpinned(desktop):
    g = plan_groups(desktop, {0, 1}, Settings(threads=4, reserve=0))
    assert g == [Group(0, (0, 1, -1, -1))]


def test_bad_settings_are_named(xeon):
    with pytest.raises(ValueError, match="LK_CPUS names CPUs this machine does not have online: \\[500\\]"):
        plan_groups(xeon, all_ids(xeon), Settings(cpus=(0, 500)))
    with pytest.raises(ValueError, match="LK_NODES names NUMA nodes without CPUs here: \\[9\\]"):
        plan_groups(xeon, all_ids(xeon), Settings(nodes=(9,)))
    with pytest.raises(ValueError, match="no usable CPUs"):
        plan_groups(xeon, {200}, Settings())
    with pytest.raises(ValueError, match="LK_VIRTUAL_NODES=8 needs at least 8 workers"):
        plan_groups(xeon, all_ids(xeon), Settings(threads=4, virtual_nodes=8))


def test_settings_from_env():
    s = settings_from_env({"LK_THREADS": "12", "LK_CPUS": "0-3,8", "LK_NODES": "1", "LK_VIRTUAL_NODES": "2", "LK_SMT": "1",
                           "LK_RESERVE": "0"})
    assert s == Settings(threads=12, cpus=(0, 1, 2, 3, 8), nodes=(1,), virtual_nodes=2, smt=True, reserve=0)
    assert settings_from_env({}) == Settings()
    for env, msg in (({"LK_THREADS": "many"}, "LK_THREADS='many' is not a whole number"),
                     ({"LK_THREADS": "0"}, "must be at least 1"),
                     ({"LK_CPUS": "3-1"}, "LK_CPUS='3-1'"),
                     ({"LK_RESERVE": "-1"}, "LK_RESERVE")):
        with pytest.raises(ValueError, match=msg):
            settings_from_env(env)
