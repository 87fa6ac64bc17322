"""The kernel-format parsers, against the kernel's own files on this machine and independent references."""

import os
import re

import psutil
import pytest
from hypothesis import given, settings, strategies as st

from fixtures.sysfs import _ranges
from lvllm_cli.probe import formats
from lvllm_cli.ranges import format_cpulist


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(min_value=0, max_value=2047), max_size=300))
def test_cpulist_parses_the_kernel_range_form(cpus):
    # _ranges is the fixture generator's own writer of the kernel's form.
    assert formats.cpulist(_ranges(cpus) + "\n") == sorted(cpus)
    assert format_cpulist(cpus) == _ranges(cpus)  # the planner's writer (lvllm_cli.ranges) spells it the same


def test_cpulist_real_files_match_the_affinity_of_this_machine():
    online = formats.cpulist(open("/sys/devices/system/cpu/online").read())
    assert len(online) == psutil.cpu_count(logical=True)
    assert set(os.sched_getaffinity(0)) <= set(online)


@pytest.mark.parametrize("bad", ["0-", "a", "3-1", "1,,2", "0-3:0", "1 2", "0-8:4,10"])
def test_cpulist_rejects_garbage(bad):
    with pytest.raises(ValueError):
        formats.cpulist(bad)


def test_cpulist_empty_node():
    # (stride forms such as "0-8:4" are input syntax of cpusets and boot parameters; the kernel
    # never prints them in a cpulist file, so they are malformed here)
    assert formats.cpulist("\n") == []


def test_meminfo_matches_psutil_on_this_machine():
    info = formats.meminfo(open("/proc/meminfo").read())
    assert info["MemTotal"] == psutil.virtual_memory().total
    # counts carry no unit and stay counts
    text = open("/proc/meminfo").read()
    m = re.search(r"^HugePages_Total:\s+(\d+)$", text, flags=re.M)
    assert info["HugePages_Total"] == int(m.group(1))


def test_node_meminfo_drops_the_node_prefix():
    text = "Node 3 MemTotal:       65536000 kB\nNode 3 MemFree:        1024 kB\nNode 3 HugePages_Total:     7\n"
    assert formats.meminfo(text) == {"MemTotal": 65536000 * 1024, "MemFree": 1024 * 1024, "HugePages_Total": 7}


@pytest.mark.parametrize("bad", ["", "MemTotal 12 kB", "MemTotal:  twelve kB", "Node x MemTotal: 1 kB"])
def test_meminfo_rejects_garbage(bad):
    with pytest.raises(ValueError):
        formats.meminfo(bad)


@pytest.mark.parametrize("text,want", [
    ("always [madvise] never\n", "madvise"),
    ("[always] madvise never", "always"),
    ("always defer defer+madvise [madvise] never", "madvise"),
    ("always madvise [never]", "never"),
])
def test_bracketed_choice(text, want):
    assert formats.bracketed_choice(text) == want


def test_bracketed_choice_on_this_machine():
    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(path):
        pytest.skip("this kernel has no THP")
    text = open(path).read()
    assert formats.bracketed_choice(text) in text.replace("[", " ").replace("]", " ").split()


@pytest.mark.parametrize("gen,text", [(1, "2.5 GT/s PCIe"), (2, "5.0 GT/s PCIe"), (3, "8.0 GT/s PCIe"),
                                      (4, "16.0 GT/s PCIe"), (5, "32.0 GT/s PCIe"), (6, "64.0 GT/s PCIe"),
                                      (3, "8 GT/s"), (2, "5 GT/s")])
def test_pcie_gen(gen, text):
    assert formats.pcie_gen(text + "\n") == gen


def test_pcie_gen_unknown_and_garbage():
    assert formats.pcie_gen("Unknown\n") is None
    for bad in ("fast", "12.0 GT/s PCIe", ""):
        with pytest.raises(ValueError):
            formats.pcie_gen(bad)


def test_link_width_down_is_unknown():
    assert formats.link_width("16\n") == 16
    assert formats.link_width("0\n") is None
    assert formats.link_width("255\n") is None


@pytest.mark.parametrize("text,want", [("32768K", 32 << 20), ("48K", 48 << 10), ("2M", 2 << 20), ("512", 512)])
def test_cache_size(text, want):
    assert formats.cache_size(text + "\n") == want


def test_integer_and_hex():
    assert formats.integer("-1\n") == -1
    assert formats.hex_id("0x10de\n") == 0x10DE
    for bad in ("", "1.5", "x"):
        with pytest.raises(ValueError):
            formats.integer(bad)
    with pytest.raises(ValueError):
        formats.hex_id("10de")


@pytest.mark.parametrize("raw,want", [("00000000:17:00.0", "0000:17:00.0"), ("0000:AB:00.1", "0000:ab:00.1"),
                                      ("17:00.0", "0000:17:00.0"), ("00000001:01:02.3", "0001:01:02.3")])
def test_normalize_bus_id(raw, want):
    assert formats.normalize_bus_id(raw) == want


def test_cpuinfo_blocks_match_this_machine():
    blocks = formats.cpuinfo(open("/proc/cpuinfo").read())
    assert len(blocks) == psutil.cpu_count(logical=True)
    assert sorted(int(b["processor"]) for b in blocks) == list(range(len(blocks)))
