"""The probe on generated trees of four real machine shapes: every number against the spec."""

import pytest

from fixtures.sysfs import MACHINES, AVX2_VM, GpuSpec, MachineSpec, replace, write_tree, GiB
from lvllm_cli.isa import kernel_variant_for_flags
from lvllm_cli.probe import probe

VARIANT = {"desktop": "avx2", "xeon_snc": "amx", "epyc_nps4": "avx512_bf16", "avx2_vm": "avx2"}


@pytest.fixture(scope="module", params=sorted(MACHINES))
def machine(request, tmp_path_factory):
    spec, make = MACHINES[request.param]
    root = make(tmp_path_factory.mktemp(request.param))
    return request.param, spec, probe(root)


def test_cpu_counts(machine):
    name, spec, m = machine
    assert m.read_problems == []
    assert m.cpu.model == spec.model
    assert m.cpu.vendor == spec.vendor
    assert m.cpu.sockets == spec.sockets
    assert m.cpu.physical_cores == spec.physical_cores
    assert m.cpu.logical_cpus == spec.logical_cpus
    assert m.cpu.threads_per_core == spec.threads_per_core
    assert m.cpu.l3_bytes == spec.l3_bytes
    assert [c.id for c in m.cpu.online] == list(range(spec.logical_cpus))
    assert kernel_variant_for_flags(m.cpu.flags) == VARIANT[name]


def test_smt_siblings_and_physical_cpus(machine):
    _, spec, m = machine
    by_id = {c.id: c for c in m.cpu.online}
    for s in range(spec.sockets):
        for c in range(spec.cores_per_socket):
            sibs = [spec.cpu(s, c, t) for t in range(spec.threads_per_core)]
            for cpu in sibs:
                assert by_id[cpu].siblings == sibs
                assert by_id[cpu].package_id == s
                assert by_id[cpu].core_id == c * spec.core_id_stride
                assert by_id[cpu].node == spec.node_of(s, c)
    # one CPU per core, the first thread of each
    assert m.physical_cpus() == list(range(spec.physical_cores))


def test_numa_nodes(machine):
    _, spec, m = machine
    assert len(m.numa) == spec.nodes
    for node in m.numa:
        if spec.nodes_per_socket:
            assert node.cpus == spec.node_cpus(node.id)
            assert node.mem_total_bytes == spec.node_mem(node.id)
            assert node.distances[node.id] == 10
            assert len(node.distances) == spec.nodes
        else:  # no node directory: the whole machine is node 0
            assert node.cpus == list(range(spec.logical_cpus))
            assert node.mem_total_bytes == spec.mem_total
    for n in range(spec.nodes):
        assert m.physical_cpus(node=n) == sorted(spec.cpu(s, c, 0) for s in range(spec.sockets)
                                                  for c in range(spec.cores_per_socket) if spec.node_of(s, c) == n)


def test_memory(machine):
    _, spec, m = machine
    assert m.memory.total_bytes == spec.mem_total
    assert 0 < m.memory.available_bytes <= m.memory.total_bytes
    assert m.memory.hugepage_size_bytes == 2 << 20
    assert m.memory.shm_bytes == spec.shm_bytes
    assert m.memory.numa_balancing == spec.numa_balancing
    if spec.thp_enabled is None:
        assert m.memory.thp_enabled == ""
    else:
        assert f"[{m.memory.thp_enabled}]" in spec.thp_enabled
    assert m.cpu.governors == ({spec.governor: spec.logical_cpus} if spec.governor else {})


def test_gpus(machine):
    _, spec, m = machine
    assert len(m.gpus) == len(spec.gpus)  # NVIDIA audio functions are not GPUs
    for i, (g, want) in enumerate(zip(m.gpus, spec.gpus)):
        assert g.index == i
        assert g.source == "nvml"
        assert g.name == want.name
        assert g.pci_bus_id == want.bus_id
        # NVML's entry has no node: it comes from sysfs by bus id
        assert g.numa_node == (want.node if want.node >= 0 else None)
        assert g.memory_total_bytes == want.vram_bytes
        assert (g.pcie_gen_current, g.pcie_gen_max) == (want.gen_cur, want.gen_max)
        assert (g.pcie_width_current, g.pcie_width_max) == (want.width_cur, want.width_max)
        assert g.driver == spec.driver and g.cuda_driver_version == spec.cuda
    assert (m.nvml_error is None) == bool(spec.gpus)


def test_named_facts_of_the_reference_machines(tmp_path):
    # The facts the docstrings promise, spelled out (another engineer plans against them).
    from fixtures.sysfs import make_desktop, make_epyc_nps4, make_xeon_snc

    d = probe(make_desktop(tmp_path / "d"))
    assert (d.cpu.physical_cores, d.cpu.logical_cpus, len(d.numa)) == (8, 16, 1)
    assert d.gpus[0].pcie_width_current == 8 and d.gpus[0].numa_node is None
    x = probe(make_xeon_snc(tmp_path / "x"))
    assert (x.cpu.sockets, x.cpu.physical_cores, len(x.numa)) == (2, 56, 4)
    assert x.numa[0].cpus == list(range(0, 14)) + list(range(56, 70))
    assert [g.numa_node for g in x.gpus] == [0, 2]
    e = probe(make_epyc_nps4(tmp_path / "e"))
    assert (e.cpu.sockets, e.cpu.physical_cores, e.cpu.logical_cpus, len(e.numa)) == (2, 192, 384, 8)
    assert [g.numa_node for g in e.gpus] == [1, 5]
    assert e.numa[1].cpus == list(range(24, 48)) + list(range(216, 240))
    assert "amx_tile" not in e.cpu.flags and "avx512_bf16" in e.cpu.flags


def test_sysfs_only_gpus_when_nvml_data_is_absent(tmp_path):
    spec = replace(AVX2_VM, gpus=[GpuSpec("0000:65:00.0", -1, in_nvml=False, width_cur=4, width_max=16)],
                   nvml_error="NVML: Driver Not Loaded")
    m = probe(write_tree(tmp_path, spec))
    assert [(g.source, g.pci_bus_id, g.pcie_width_current, g.memory_total_bytes) for g in m.gpus] == \
        [("sysfs", "0000:65:00.0", 4, 0)]
    assert "2684" in m.gpus[0].name
    assert m.nvml_error == "NVML: Driver Not Loaded"


def test_sysroot_from_environment(tmp_path, monkeypatch):
    root = write_tree(tmp_path, AVX2_VM)
    monkeypatch.setenv("LVLLM_SYSROOT", root)
    m = probe()
    assert m.sysroot == str(tmp_path) and m.cpu.model == AVX2_VM.model
    # the argument beats the environment
    assert probe("/").sysroot == "/"


@pytest.mark.parametrize("sockets,cores,threads,nps", [(1, 6, 2, 1), (2, 8, 1, 2), (4, 4, 2, 1), (1, 12, 4, 3)])
def test_other_shapes(tmp_path, sockets, cores, threads, nps):
    spec = MachineSpec(vendor="GenuineIntel", model="test", flags="avx2 fma f16c", sockets=sockets,
                       cores_per_socket=cores, threads_per_core=threads, nodes_per_socket=nps,
                       mem_per_node_bytes=8 * GiB, l3_kib=1024, cores_per_l3=cores)
    m = probe(write_tree(tmp_path, spec))
    assert (m.cpu.sockets, m.cpu.physical_cores, m.cpu.logical_cpus, len(m.numa)) == \
        (sockets, sockets * cores, sockets * cores * threads, sockets * nps)
    assert sum(len(n.cpus) for n in m.numa) == m.cpu.logical_cpus
    assert m.cpu.l3_bytes == sockets * 1024 * 1024
