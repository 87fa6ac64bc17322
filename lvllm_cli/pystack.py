"""The Python side of the machine: torch, vLLM, our native module and the libraries it needs.

`gather_stack()` looks (cheaply: torch is never imported, ten seconds is the
budget for all of doctor); the checks in lvllm_cli.doctor judge the result,
so they can be tested with fabricated stacks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field

_GLIBCXX = re.compile(rb"GLIBCXX_(\d+(?:\.\d+)+)")


@dataclass
class NativeModule:
    loaded: bool = False
    path: str | None = None
    error: str | None = None  # why it did not import
    best_isa: str | None = None  # the kernel family it dispatches to
    features: dict[str, bool] = field(default_factory=dict)
    build_flavour: str | None = None  # "portable" or "native"


@dataclass
class LibStdcxx:
    path: str | None = None  # the libstdc++ the dynamic loader gives our module
    provides: list[str] = field(default_factory=list)  # GLIBCXX versions it defines
    required: list[str] = field(default_factory=list)  # GLIBCXX versions our module needs
    error: str | None = None


@dataclass
class PythonStack:
    python: str = ""
    torch_version: str | None = None  # None: not installed
    torch_cuda: str | None = None  # CUDA version torch was built for; None: CPU-only build
    vllm_version: str | None = None
    native: NativeModule = field(default_factory=NativeModule)
    libnuma_path: str | None = None
    libnuma_error: str | None = None  # None when libnuma.so.1 loads
    libstdcxx: LibStdcxx = field(default_factory=LibStdcxx)
    nofile_soft: int | None = None
    nofile_hard: int | None = None  # -1: unlimited
    lk_isa_env: str | None = None  # LK_ISA, the user's cap on the kernel family
    cpu_affinity: list[int] | None = None  # CPUs this process may run on (taskset, container cpuset)


def gather_stack() -> PythonStack:
    s = PythonStack(python=sys.version.split()[0])
    s.torch_version, s.torch_cuda = _torch()
    s.vllm_version = _dist_version("vllm")
    s.native = _native()
    s.lk_isa_env = os.environ.get("LK_ISA") or None
    try:
        s.cpu_affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        s.cpu_affinity = None
    s.libnuma_path, s.libnuma_error = _libnuma()
    s.libstdcxx = _libstdcxx(s.native.path)
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        s.nofile_soft, s.nofile_hard = _limit(soft), _limit(hard)
    except (ImportError, OSError, ValueError):
        pass
    return s


def _limit(v: int) -> int:
    import resource

    return -1 if v == resource.RLIM_INFINITY else int(v)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:
        return None


def _torch() -> tuple[str | None, str | None]:
    """torch's version and CUDA build, read from its files: importing torch costs seconds."""
    version = _dist_version("torch")
    if version is None:
        return None, None
    try:
        spec = importlib.util.find_spec("torch")
        locations = list(spec.submodule_search_locations or []) if spec else []
        with open(os.path.join(locations[0], "version.py"), encoding="utf-8") as f:
            text = f.read()
    except (OSError, IndexError, ImportError, ValueError):
        return version, None
    m = re.search(r"^cuda(?:\s*:[^=\n]*)?=\s*(?:'([^']*)'|\"([^\"]*)\"|None)", text, flags=re.M)
    cuda = (m.group(1) or m.group(2)) if m else None
    return version, cuda or None


def _native() -> NativeModule:
    n = NativeModule()
    try:
        spec = importlib.util.find_spec("lvllm_cli._lk_moe")
        n.path = spec.origin if spec else None
    except (ImportError, ValueError):
        n.path = None
    try:
        from lvllm_cli import _lk_moe
    except Exception as e:  # ImportError, OSError from the loader (missing GLIBCXX, wrong arch)
        n.error = f"{type(e).__name__}: {e}"
        return n
    n.loaded = True
    n.path = getattr(_lk_moe, "__file__", n.path)
    try:
        n.best_isa = str(_lk_moe.best_isa())
        n.features = {str(k): bool(v) for k, v in dict(_lk_moe.cpu_features()).items()}
        n.build_flavour = str(_lk_moe.build_flavour())
    except Exception as e:
        n.error = f"loaded but does not answer: {type(e).__name__}: {e}"
    return n


def _libnuma() -> tuple[str | None, str | None]:
    # The engine dlopen()s exactly this soname at run time.
    try:
        ctypes.CDLL("libnuma.so.1")
    except OSError as e:
        return None, str(e)
    return _mapped("libnuma.so") or ctypes.util.find_library("numa") or "libnuma.so.1", None


def _libstdcxx(module_path: str | None) -> LibStdcxx:
    out = LibStdcxx()
    if module_path:
        out.required = _versions_in(module_path)
    path = _mapped("libstdc++.so")
    if path is None:
        try:  # the same search the loader does for our module (it has no RPATH)
            ctypes.CDLL("libstdc++.so.6")
            path = _mapped("libstdc++.so")
        except OSError as e:
            out.error = str(e)
            return out
    out.path = path
    if path:
        out.provides = _versions_in(path)
    return out


def _mapped(name: str) -> str | None:
    """The file of an already-loaded shared library whose name contains `name`."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and name in os.path.basename(parts[5].strip()):
                    return parts[5].strip()
    except OSError:
        pass
    return None


def _versions_in(path: str) -> list[str]:
    """GLIBCXX_x.y.z names in an ELF file (its version definitions or needs), sorted by number."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    found = {m.group(1).decode() for m in _GLIBCXX.finditer(data)}
    return sorted(found, key=version_key)


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())
