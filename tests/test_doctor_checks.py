"""Doctor verdicts: the four reference machines, fabricated Python stacks, and the edge cases."""

from dataclasses import replace as dc_replace

import pytest

from fixtures.sysfs import (AVX2_VM, DESKTOP, EPYC_NPS4, FLAGS_SSE_ONLY, XEON_SNC, GiB, GpuSpec, MiB, replace,
                            write_tree)
from lvllm_cli.doctor import FAIL, OK, WARN, kernel_variant, run_checks, worst
from lvllm_cli.probe import probe
from lvllm_cli.pystack import LibStdcxx, NativeModule, PythonStack


def good_stack(**kw) -> PythonStack:
    s = PythonStack(
        python="3.12.3", torch_version="2.11.0+cu128", torch_cuda="12.8", vllm_version="0.30.1",
        native=NativeModule(loaded=True, path="/x/_lk_moe.so", best_isa="avx512_bf16", build_flavour="portable"),
        libnuma_path="/usr/lib/libnuma.so.1",
        libstdcxx=LibStdcxx(path="/usr/lib/libstdc++.so.6", provides=["3.4.20", "3.4.21", "3.4.30"],
                            required=["3.4.21"]),
        nofile_soft=1024, nofile_hard=1048576, cpu_affinity=list(range(384)),
    )
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def by_check(findings):
    out = {}
    for f in findings:
        assert f.status in (OK, WARN, FAIL)
        assert f.evidence
        assert f.status == OK or f.fix, f  # every warn/fail says what to do
        out[f.check] = f
    return out


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return {name: probe(write_tree(tmp_path_factory.mktemp(name), spec))
            for name, spec in [("desktop", DESKTOP), ("xeon", XEON_SNC), ("epyc", EPYC_NPS4), ("vm", AVX2_VM)]}


def statuses(findings):
    return {f.check: f.status for f in findings}


def test_desktop_verdicts(trees):
    f = by_check(run_checks(trees["desktop"], None))
    assert f["cpu isa"].status == OK and "avx2" in f["cpu isa"].evidence
    assert f["numa"].status == OK and "one node" in f["numa"].evidence
    assert f["gpu0 pcie"].status == WARN and "x8 of gen4 x16" in f["gpu0 pcie"].evidence
    assert f["gpu0 numa"].status == OK  # one node: -1 is no problem
    assert f["cpu governor"].status == WARN and "powersave" in f["cpu governor"].evidence
    assert f["numa balancing"].status == OK
    assert "torch" not in f  # a captured machine: its Python is unknown
    assert worst(list(f.values())) == WARN


def test_xeon_snc_verdicts(trees):
    m = trees["xeon"]
    f = by_check(run_checks(m, None))
    assert kernel_variant(m, None) == "amx"
    assert f["cpu isa"].status == OK and "amx" in f["cpu isa"].evidence
    assert f["numa"].status == OK and f["numa"].evidence.startswith("4 nodes")
    assert f["numa balancing"].status == WARN and "numa_balancing=0" in f["numa balancing"].fix
    assert f["gpu0 numa"].evidence.endswith("node 0 (CPUs 0-13,56-69)")
    assert "node 2" in f["gpu1 numa"].evidence
    assert f["gpu0 pcie"].status == OK
    assert f["gpu1 pcie"].status == OK and "idle" in f["gpu1 pcie"].evidence  # gen1 at P8 is normal
    assert f["transparent hugepages"].status == OK
    assert worst(list(f.values())) == WARN


def test_epyc_nps4_verdicts(trees):
    m = trees["epyc"]
    f = by_check(run_checks(m, good_stack()))
    assert f["cpu isa"].status == OK and "avx512_bf16" in f["cpu isa"].evidence
    assert f["numa"].status == OK and f["numa"].evidence.startswith("8 nodes")
    assert "node 1" in f["gpu0 numa"].evidence and "node 5" in f["gpu1 numa"].evidence
    assert f["cpu governor"].status == OK
    assert f["numa balancing"].status == OK
    assert f["torch"].status == OK and f["vllm"].status == OK
    assert all(x.status == OK for x in f.values()), [x for x in f.values() if x.status != OK]
    assert worst(list(f.values())) == OK


def test_vm_verdicts(trees):
    f = by_check(run_checks(trees["vm"], None))
    assert f["cpu isa"].status == OK and "avx2" in f["cpu isa"].evidence
    assert f["transparent hugepages"].status == WARN
    assert f["gpus"].status == WARN and "no NVIDIA GPU" in f["gpus"].evidence
    assert f["cpu governor"].status == OK and "not exposed" in f["cpu governor"].evidence
    assert not any(k.startswith("gpu0") for k in f)


def test_no_avx2_fails(tmp_path):
    m = probe(write_tree(tmp_path, replace(AVX2_VM, flags=FLAGS_SSE_ONLY)))
    f = by_check(run_checks(m, None))
    assert f["cpu isa"].status == FAIL
    assert "avx2" in f["cpu isa"].evidence and "fma" in f["cpu isa"].evidence
    assert worst(list(f.values())) == FAIL


def test_unbalanced_memory_and_interleaving(tmp_path):
    m = probe(write_tree(tmp_path / "a", replace(XEON_SNC, mem_per_node_override={3: 32 * GiB})))
    f = by_check(run_checks(m, None))
    assert f["numa"].status == WARN and "unbalanced" in f["numa"].evidence
    # two sockets shown as one node: the BIOS interleaves memory
    m = probe(write_tree(tmp_path / "b", replace(XEON_SNC, nodes_per_socket=0, gpus=[])))
    f = by_check(run_checks(m, None))
    assert f["numa"].status == WARN and "interleav" in f["numa"].evidence


def test_gpu_numa_unknown_on_multi_node(tmp_path):
    m = probe(write_tree(tmp_path, replace(XEON_SNC, gpus=[GpuSpec("0000:41:00.0", -1)])))
    f = by_check(run_checks(m, None))
    assert f["gpu0 numa"].status == WARN


def test_gen_drop_under_load_warns(tmp_path):
    m = probe(write_tree(tmp_path, replace(DESKTOP, gpus=[GpuSpec("0000:01:00.0", -1, gen_cur=3, pstate=0)])))
    f = by_check(run_checks(m, None))
    assert f["gpu0 pcie"].status == WARN and "gen3 x16 of gen4 x16" in f["gpu0 pcie"].evidence


def test_gpu_without_driver(tmp_path):
    spec = replace(AVX2_VM, gpus=[GpuSpec("0000:65:00.0", -1, in_nvml=False)], nvml_error="NVML: Driver Not Loaded")
    m = probe(write_tree(tmp_path, spec))
    assert by_check(run_checks(m, None))["gpus"].status == WARN  # captured: just not recorded
    live = dc_replace(m, sysroot="/")  # the same facts seen on the machine itself: the driver is broken
    f = by_check(run_checks(live, None))
    assert f["gpus"].status == FAIL and "Driver Not Loaded" in f["gpus"].evidence


def test_small_shm_warns(tmp_path):
    m = probe(write_tree(tmp_path, replace(DESKTOP, shm_bytes=64 * MiB)))
    f = by_check(run_checks(m, None))
    assert f["/dev/shm"].status == WARN and "64 MiB" in f["/dev/shm"].evidence


def test_thp_never_warns(tmp_path):
    m = probe(write_tree(tmp_path, replace(DESKTOP, thp_enabled="always madvise [never]")))
    assert by_check(run_checks(m, None))["transparent hugepages"].status == WARN


# --- the Python stack -----------------------------------------------------------

@pytest.mark.parametrize("change,check,status,needle", [
    ({"torch_version": "2.9.0+cu128"}, "torch", FAIL, "garbage"),
    ({"torch_version": None, "torch_cuda": None}, "torch", WARN, "not installed"),
    ({"torch_cuda": None, "torch_version": "2.11.0+cpu"}, "torch", FAIL, "CPU-only"),
    ({"torch_cuda": "13.0"}, "torch", FAIL, "driver"),
    ({"torch_cuda": "12.9"}, "torch", WARN, "minor"),
    ({"vllm_version": "0.25.2"}, "vllm", FAIL, "outside"),
    ({"vllm_version": "0.34.0"}, "vllm", FAIL, "outside"),
    ({"vllm_version": None}, "vllm", WARN, "not installed"),
    ({"vllm_version": "0.26.0"}, "vllm", OK, "0.26.0"),
    ({"native": NativeModule(loaded=False, error="ImportError: libfoo.so: cannot open shared object file")},
     "engine", FAIL, "libfoo"),
    ({"libnuma_error": "libnuma.so.1: cannot open shared object file", "libnuma_path": None}, "libnuma", WARN,
     "bind"),
    ({"libstdcxx": LibStdcxx(path="/opt/conda/lib/libstdc++.so.6", provides=["3.4.28", "3.4.29"],
                             required=["3.4.29", "3.4.32"])}, "libstdc++", FAIL, "3.4.32"),
    ({"nofile_hard": 4096, "nofile_soft": 1024}, "open files", WARN, "4096"),
    ({"cpu_affinity": list(range(0, 8)) + [200]}, "cpu affinity", WARN, "9 of 384 CPUs (0-7,200)"),
    ({"nofile_hard": -1}, "open files", OK, "unlimited"),
    ({"lk_isa_env": "avx2", "native": NativeModule(loaded=True, best_isa="avx2", build_flavour="portable")},
     "cpu isa", WARN, "LK_ISA=avx2"),
    ({"lk_isa_env": "scalar", "native": NativeModule(loaded=True, best_isa="scalar", build_flavour="portable")},
     "cpu isa", FAIL, "LK_ISA=scalar forces"),
])
def test_stack_findings(trees, change, check, status, needle):
    f = by_check(run_checks(trees["epyc"], good_stack(**change)))
    assert f[check].status == status, f[check]
    assert needle in f[check].evidence + f[check].fix


def test_module_import_failure_with_glibcxx(trees):
    err = "ImportError: /lib/libstdc++.so.6: version `GLIBCXX_3.4.32' not found"
    stack = good_stack(native=NativeModule(loaded=False, error=err), libstdcxx=LibStdcxx(path=None, error="x"))
    f = by_check(run_checks(trees["epyc"], stack))
    assert f["engine"].status == FAIL and "lvllm build" in f["engine"].fix
    assert f["libstdc++"].status == FAIL and "GLIBCXX_3.4.32" in f["libstdc++"].evidence
    # without the engine's answer the variant comes from the flags
    assert kernel_variant(trees["epyc"], stack) == "avx512_bf16"


def test_libnuma_missing_is_fine_on_one_node(trees):
    f = by_check(run_checks(trees["desktop"], good_stack(libnuma_error="nope", libnuma_path=None,
                                                          torch_cuda="12.8")))
    assert f["libnuma"].status == OK


def test_amx_not_granted(trees):
    stack = good_stack(native=NativeModule(loaded=True, best_isa="avx512_bf16", build_flavour="portable"))
    f = by_check(run_checks(trees["xeon"], stack))
    assert f["cpu isa"].status == WARN and "5.16" in f["cpu isa"].evidence + f["cpu isa"].fix


@pytest.mark.parametrize("fraction,status", [(0.5, OK), (0.9, WARN), (1.2, FAIL)])
def test_model_fit(trees, fraction, status):
    m = trees["desktop"]
    need = int(m.memory.available_bytes * fraction)
    f = by_check(run_checks(m, None, model_bytes=need, model_note="config.json"))
    assert f["model fits in RAM"].status == status
    assert "config.json" in f["model fits in RAM"].evidence
