"""Missing and malformed kernel files give findings, never tracebacks."""

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fixtures.sysfs import DESKTOP, XEON_SNC, write_tree
from lvllm_cli.doctor import FAIL, OK, WARN, run_checks
from lvllm_cli.probe import probe


def _files(root):
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.join(d, n) for n in names if not n.endswith(".json")]
    return sorted(out)


def _probe_finding(m):
    findings = run_checks(m, None)
    probe_f = [f for f in findings if f.check == "probe"]
    return findings, (probe_f[0] if probe_f else None)


def test_garbage_in_node_cpulist(tmp_path):
    root = write_tree(tmp_path, XEON_SNC)
    with open(os.path.join(root, "sys/devices/system/node/node1/cpulist"), "w") as f:
        f.write("14-27,zz\n")
    m = probe(root)
    problems = dict(m.read_problems)
    assert problems["/sys/devices/system/node/node1/cpulist"].startswith("malformed: bad cpulist '14-27,zz")
    assert "'zz' is not a number" in problems["/sys/devices/system/node/node1/cpulist"]
    findings, pf = _probe_finding(m)
    assert pf.status == WARN and "node1/cpulist" in pf.evidence
    # node1's CPUs are now in no node: the CPU balance check says so too
    assert next(f for f in findings if f.check == "numa").status == WARN


def test_missing_meminfo(tmp_path):
    root = write_tree(tmp_path, DESKTOP)
    os.unlink(os.path.join(root, "proc/meminfo"))
    m = probe(root)
    assert ("/proc/meminfo", "missing") in m.read_problems
    findings, pf = _probe_finding(m)
    assert "/proc/meminfo (missing)" in pf.evidence
    mem = next(f for f in findings if f.check == "memory")
    assert mem.status == WARN and "unknown" in mem.evidence


def test_non_numeric_numa_node(tmp_path):
    root = write_tree(tmp_path, XEON_SNC)
    with open(os.path.join(root, "sys/devices/pci0000:2a/0000:2a:00.0/numa_node"), "w") as f:
        f.write("one\n")
    m = probe(root)
    assert any(p.endswith("0000:2a:00.0/numa_node") and w.startswith("malformed") for p, w in m.read_problems)
    assert m.gpus[0].numa_node is None and m.gpus[1].numa_node == 2
    findings, pf = _probe_finding(m)
    assert pf is not None
    assert next(f for f in findings if f.check == "gpu0 numa").status == WARN


def test_missing_topology_and_online(tmp_path):
    root = write_tree(tmp_path, DESKTOP)
    os.unlink(os.path.join(root, "sys/devices/system/cpu/online"))
    os.unlink(os.path.join(root, "sys/devices/system/cpu/cpu3/topology/core_id"))
    m = probe(root)
    paths = [p for p, _ in m.read_problems]
    assert "/sys/devices/system/cpu/online" in paths and "/sys/devices/system/cpu/cpu3/topology/core_id" in paths
    assert m.cpu.logical_cpus == 16  # fell back to /proc/cpuinfo's processors


def test_empty_tree(tmp_path):
    m = probe(str(tmp_path))
    findings, pf = _probe_finding(m)
    assert pf.status == WARN and "/proc/cpuinfo (missing)" in pf.evidence
    isa = next(f for f in findings if f.check == "cpu isa")
    assert isa.status == FAIL  # nothing proves AVX2


def test_malformed_capture_json(tmp_path):
    root = write_tree(tmp_path, DESKTOP)
    with open(os.path.join(root, "lvllm-capture.json"), "w") as f:
        f.write('{"nvml": {"gpus": [{"index": "x", "pci_bus_id": "not a bus"}]}, "shm_bytes": 1}')
    m = probe(root)
    assert any(p == "/lvllm-capture.json" for p, _ in m.read_problems)
    assert [g.source for g in m.gpus] == ["sysfs"]  # the sysfs view survives
    with open(os.path.join(root, "lvllm-capture.json"), "w") as f:
        f.write("[1, 2")
    m = probe(root)
    assert any(p == "/lvllm-capture.json" for p, _ in m.read_problems)


@pytest.fixture(scope="module")
def xeon_tree(tmp_path_factory):
    root = write_tree(tmp_path_factory.mktemp("fuzz"), XEON_SNC)
    files = _files(root)
    # Sample a manageable, varied subset: every non-per-CPU file plus a few per-CPU ones.
    per_cpu = [f for f in files if "/cpu/cpu" in f]
    other = [f for f in files if "/cpu/cpu" not in f]
    return root, other + random.Random(0).sample(per_cpu, 40)


_GARBAGE = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=40),
    st.sampled_from(["", "\n", "-1", "0-", "[", "Node 0 MemTotal: x kB", "99999999999999999999", "0x", "1-0",
                     "16.0 GT/s", "255", "\x00\x00"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), garbage=_GARBAGE)
def test_any_corrupted_file_never_raises(xeon_tree, data, garbage):
    root, files = xeon_tree
    path = data.draw(st.sampled_from(files))
    with open(path, "rb") as f:
        original = f.read()
    try:
        with open(path, "wb") as f:
            f.write(garbage if isinstance(garbage, bytes) else garbage.encode("utf-8", "surrogatepass"))
        m = probe(root)
        findings = run_checks(m, None)
        assert findings and all(f.status in (OK, WARN, FAIL) for f in findings)
        kernel_path = "/" + os.path.relpath(path, root)
        problem_paths = {p for p, _ in m.read_problems}
        if kernel_path in problem_paths:
            assert any(f.check == "probe" and kernel_path in f.evidence for f in findings) or len(problem_paths) > 4
    finally:
        with open(path, "wb") as f:
            f.write(original)


def test_unreadable_file_is_a_problem(tmp_path):
    root = write_tree(tmp_path, DESKTOP)
    path = os.path.join(root, "proc/cpuinfo")
    os.unlink(path)
    os.mkdir(path)  # reading a directory fails with EISDIR, as an unreadable file would
    m = probe(root)
    assert any(p == "/proc/cpuinfo" and w.startswith("unreadable") for p, w in m.read_problems)
