"""Capture: exactly the kernel files the probe reads, replayable with --sysroot."""

import io
import json
import os
import tarfile

import pytest

from fixtures.sysfs import XEON_SNC, write_tree
from lvllm_cli.capture import open_sysroot, write_capture
from lvllm_cli.probe import collect, probe


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def _stable(m):
    """Facts that do not move between two reads of a live machine."""
    return {
        "cpu": m.cpu, "nodes": [(n.id, n.cpus, n.mem_total_bytes, n.distances) for n in m.numa],
        "mem_total": m.memory.total_bytes, "thp": (m.memory.thp_enabled, m.memory.thp_defrag),
        "numa_balancing": m.memory.numa_balancing, "hugepage": m.memory.hugepage_size_bytes,
        "shm": m.memory.shm_bytes, "gpus": [(g.pci_bus_id, g.numa_node) for g in m.gpus],
    }


def test_capture_this_machine_and_replay(tmp_path):
    out = tmp_path / "cap.tar.gz"
    n = write_capture(str(out))
    members = _members(out)
    names = set(members)
    kernel_files = {x for x in names if x != "lvllm-capture.json"}
    assert len(kernel_files) == n and "lvllm-capture.json" in names
    assert all(x.startswith(("proc/", "sys/")) for x in kernel_files)
    # No personal data: nothing outside the hardware facts the probe reads.
    for forbidden in ("environ", "cmdline", "hostname", "passwd", "mounts", "status"):
        assert not any(os.path.basename(x) == forbidden for x in names), forbidden
    assert "proc/cpuinfo" in names and "proc/meminfo" in names and "sys/devices/system/cpu/online" in names
    assert all(m.isfile() and m.mtime == 0 for m in members.values())

    root, cleanup = open_sysroot(str(out))
    try:
        replayed = probe(root)
        # the capture holds what the live probe read; the machine it yields is the same
        live = probe("/")
        assert _stable(replayed) == _stable(live)
        assert replayed.read_problems == live.read_problems
        assert replayed.memory.available_bytes > 0
        # exactly the same file set is read on replay as on the machine itself
        _, reader, _ = collect(root)
        assert set(reader.files) == {"/" + x for x in kernel_files}
    finally:
        import shutil
        shutil.rmtree(cleanup)


def test_capture_of_a_fixture_replays_identically(tmp_path):
    src = write_tree(tmp_path / "src", XEON_SNC)
    original = probe(src)
    out = tmp_path / "xeon.tar.gz"
    write_capture(str(out), sysroot=src)
    root, cleanup = open_sysroot(str(out))
    try:
        replayed = probe(root)
    finally:
        import shutil
        shutil.rmtree(cleanup)
    a, b = original.to_dict(), replayed.to_dict()
    a.pop("sysroot"), b.pop("sysroot")
    assert a == b
    meta = json.loads(tarfile.open(out).extractfile("lvllm-capture.json").read())
    assert meta["format"] == 1 and meta["shm_bytes"] == XEON_SNC.shm_bytes
    assert [g["pci_bus_id"] for g in meta["nvml"]["gpus"]] == ["0000:2a:00.0", "0000:ab:00.0"]


def test_capture_leaves_no_partial_file(tmp_path, monkeypatch):
    import lvllm_cli.capture as capture

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(capture, "_add", boom)
    with pytest.raises(RuntimeError):
        write_capture(str(tmp_path / "x.tar.gz"))
    assert os.listdir(tmp_path) == []


def _tar(path, entries):
    with tarfile.open(path, "w:gz") as tar:
        for name, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                data = b"x"
                info.size = 1
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("entries,needle", [
    ([("../evil", "file")], "unsafe"),
    ([("/etc/evil", "file")], "unsafe"),
    ([("proc/cpuinfo", "sym")], "not a plain file"),
])
def test_open_sysroot_rejects_unsafe_archives(tmp_path, entries, needle):
    p = tmp_path / "bad.tar.gz"
    _tar(p, entries)
    with pytest.raises(ValueError, match=needle):
        open_sysroot(str(p))
    assert not (tmp_path.parent / "evil").exists()


def test_open_sysroot_rejects_non_archives(tmp_path):
    p = tmp_path / "x.tar.gz"
    p.write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="not a capture archive"):
        open_sysroot(str(p))
    with pytest.raises(ValueError, match="no such"):
        open_sysroot(str(tmp_path / "missing"))
