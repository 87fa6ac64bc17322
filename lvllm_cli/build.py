"""`lvllm build`: rebuild the lk_moe engine module in place, from the C++ sources the wheel ships.

The wheel carries `lvllm_cli/native/*.cpp|*.h` and a copy of the project's
CMakeLists.txt next to them (a source checkout has it at the root), so an
installed lvllm can compile its engine for the CPU it runs on (`--native`:
-march=native) or again portably (e.g. against a newer libstdc++).

Steps, every one of which leaves the installed module untouched when it fails:
find the tools (cmake, a C++ compiler, nanobind, ninja or make) → check the
package directory is writable → configure and build in a temporary directory
→ load the new module in a fresh process and ask it what it is → replace the
installed `_lk_moe*.so` atomically (a process that has the old one loaded
keeps its copy) → load it from the package in a fresh process again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

MIN_CMAKE = (3, 18)
MODULE = "_lk_moe"


class BuildError(Exception):
    """A build that cannot go on; the message names the problem and the fix."""

    def __init__(self, message: str, code: int = 1, log_tail: list[str] | None = None):
        super().__init__(message)
        self.code = code
        self.log_tail = log_tail or []


@dataclass
class Tools:
    cmake: str
    cmake_version: str
    compiler: str
    generator: str  # "Ninja" or "Unix Makefiles"
    make_program: str


def installed_package_dir() -> Path:
    import lvllm_cli

    return Path(lvllm_cli.__file__).resolve().parent


# ---- what is needed --------------------------------------------------------------------------


def _which(name: str, env: Mapping[str, str], python: str) -> str | None:
    """On PATH, else next to the interpreter (pip's cmake/ninja in a venv that is not activated)."""
    found = shutil.which(name, path=env.get("PATH", ""))
    if found:
        return found
    beside = Path(python).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def find_tools(env: Mapping[str, str] | None = None, python: str | None = None) -> Tools:
    env = os.environ if env is None else env
    python = python or sys.executable
    cmake = _which("cmake", env, python)
    if cmake is None:
        raise BuildError("cmake not found: pip install cmake ninja (or: apt install cmake ninja-build)")
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, timeout=30, env=dict(env)).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{cmake} does not run ({e}): pip install --force-reinstall cmake") from None
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        raise BuildError(f"{cmake} --version says nothing usable: pip install cmake")
    version = tuple(int(x) for x in m.groups() if x is not None)
    if version[:2] < MIN_CMAKE:
        raise BuildError(f"cmake {'.'.join(map(str, version))} is older than {'.'.join(map(str, MIN_CMAKE))}: pip install -U cmake")
    compiler = None
    if env.get("CXX"):
        compiler = _which(env["CXX"].split()[0], env, python)
        if compiler is None:
            raise BuildError(f"CXX={env['CXX']} is not an executable: fix CXX or unset it")
    else:
        for name in ("c++", "g++", "clang++"):
            compiler = _which(name, env, python)
            if compiler:
                break
    if compiler is None:
        raise BuildError("no C++ compiler found (c++, g++, clang++ or $CXX): apt install g++ (dnf install gcc-c++), "
                         "or set CXX to your compiler")
    if _module_missing("nanobind", python, env):
        raise BuildError(f"nanobind is not installed in this Python ({python}): pip install nanobind "
                         "(or pip install 'lvllm[build]' for every build tool)")
    ninja = _which("ninja", env, python)
    if ninja:
        return Tools(cmake, ".".join(map(str, version)), compiler, "Ninja", ninja)
    make = _which("make", env, python)
    if make:
        return Tools(cmake, ".".join(map(str, version)), compiler, "Unix Makefiles", make)
    raise BuildError("neither ninja nor make found: pip install ninja")


def _module_missing(name: str, python: str, env: Mapping[str, str]) -> bool:
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        import importlib.util

        return importlib.util.find_spec(name) is None
    r = subprocess.run([python, "-c", f"import {name}"], capture_output=True, env=dict(env))
    return r.returncode != 0


def source_root(package_dir: Path) -> Path:
    """The CMake project of this package: native/ in an installed wheel, the checkout root in a source tree."""
    package_dir = Path(package_dir)
    native = package_dir / "native"
    if not (native / "engine.cpp").is_file():
        raise BuildError(f"{package_dir} has no engine sources (native/*.cpp): is it an lvllm_cli package? "
                         "Reinstall lvllm from a wheel or a source checkout", code=2)
    if (native / "CMakeLists.txt").is_file():
        return native
    if (package_dir.parent / "CMakeLists.txt").is_file():
        return package_dir.parent
    raise BuildError(f"no CMakeLists.txt in {native} (an lvllm wheel older than `lvllm build`?): "
                     "pip install --force-reinstall --no-deps lvllm", code=2)


def check_writable(package_dir: Path) -> None:
    """Fail before compiling, not after: create and remove a file where the module goes."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".lvllm-build-", dir=package_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BuildError(
            f"cannot write to {package_dir} ({e.strerror or e}): lvllm is installed where you may not change it. "
            "Run lvllm build as the user who installed it, or install lvllm where you can write: "
            "pip install --user lvllm, or inside a virtual environment (python -m venv)"
        ) from None


# ---- configure and build -----------------------------------------------------------------------


def configure_argv(tools: Tools, src: Path, build_dir: Path, native: bool, python: str) -> list[str]:
    return [
        tools.cmake, "-S", str(src), "-B", str(build_dir), "-G", tools.generator,
        f"-DCMAKE_MAKE_PROGRAM={tools.make_program}", f"-DCMAKE_CXX_COMPILER={tools.compiler}",
        "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={python}", f"-DLK_NATIVE={'ON' if native else 'OFF'}",
    ]  # fmt: skip


def build_argv(tools: Tools, build_dir: Path, jobs: int) -> list[str]:
    return [tools.cmake, "--build", str(build_dir), "--parallel", str(jobs)]


@dataclass
class Step:
    """One line of build progress: `done` of `total` steps (ninja), or `percent` (make)."""

    what: str  # the file being compiled, or "linking"
    done: int | None = None
    total: int | None = None
    percent: int | None = None


_NINJA = re.compile(r"^\[(\d+)/(\d+)\]\s+(.*)$")
_MAKE = re.compile(r"^\[\s*(\d+)%\]\s+(.*)$")


def parse_progress(line: str) -> Step | None:
    """A progress line of ninja ('[3/17] Building CXX object .../engine.cpp.o') or make
    ('[ 23%] Building CXX object ...'); None for anything else (compiler messages)."""
    line = line.rstrip()
    m = _NINJA.match(line)
    if m:
        done, total, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        return Step(_what(rest), done=done, total=total) if total >= done else None
    m = _MAKE.match(line)
    if m and int(m.group(1)) <= 100:
        return Step(_what(m.group(2)), percent=int(m.group(1)))
    return None


def _what(rest: str) -> str:
    if rest.startswith("Linking"):
        return "linking"
    m = re.search(r"([\w.+-]+\.(?:cpp|cc|cxx|c))(?:\.o)?\b", rest)
    return m.group(1) if m else rest.split()[-1] if rest.split() else rest


def _run(argv: list[str], env: Mapping[str, str], on_line: Callable[[str], None], log: list[str]) -> int:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=dict(env), text=True, errors="replace", bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line.rstrip("\n"))
        on_line(line.rstrip("\n"))
    return proc.wait()


def _hint(log: list[str]) -> str:
    text = "\n".join(log[-400:])
    if re.search(r"Could NOT find Python.*(Development|Include|missing: Python_INCLUDE)", text, re.S):
        return "the Python development headers are missing: apt install python3-dev (or python3.X-dev for your Python)"
    if "nanobind" in text and "Could not find a package configuration file" in text:
        return "CMake did not find nanobind: pip install nanobind"
    if re.search(r"unrecognized command.line option|unknown argument", text):
        return "the compiler is too old for this CPU's instructions: install g++ 11 or newer and set CXX"
    if re.search(r"No space left on device", text):
        return "the disk is full (the build runs in $TMPDIR)"
    return "read the compiler messages above"


@dataclass
class BuildResult:
    module: Path
    flavour: str
    best_isa: str
    kernels: dict[str, str]
    native: bool
    seconds: float
    compiler: str
    generator: str
    replaced: Path | None = None  # the module file that was there before (same path), if any
    log_tail: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "module": str(self.module), "flavour": self.flavour, "best_isa": self.best_isa,
            "kernels": self.kernels, "native": self.native, "seconds": round(self.seconds, 1),
            "compiler": self.compiler, "generator": self.generator, "replaced": self.replaced is not None,
        }  # fmt: skip


_ASK = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lvllm_cli._lk_moe", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
print(json.dumps({"flavour": m.build_flavour(), "best_isa": m.best_isa(),
                  "kernels": {w: m.kernel_name(w) for w in ("bfloat16", "float16")}}))
"""


def ask_module(path: Path, python: str | None = None, env: Mapping[str, str] | None = None) -> dict:
    """Load the module file in a fresh process (a crash there cannot hurt us) and ask what it is."""
    try:
        r = subprocess.run([python or sys.executable, "-c", _ASK, str(path)], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ if env is None else env), cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        raise BuildError(f"loading {path} did not finish in 120 s") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        if r.returncode < 0:
            why = f"killed by signal {-r.returncode} ({why})"
        raise BuildError(f"the new module does not load: {why}", log_tail=r.stderr.strip().splitlines()[-20:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def install_module(built: Path, package_dir: Path) -> tuple[Path, bool]:
    """Copy the built module next to the installed one and rename it over it in one step."""
    from lvllm_cli.atomic import replacing

    target = Path(package_dir) / built.name
    existed = target.exists()
    try:
        with replacing(target, mode=0o755, binary=True) as out, open(built, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    except OSError as e:
        raise BuildError(f"cannot replace {target} ({e.strerror or e}); the old module is unchanged") from None
    return target, existed


def build(
    package_dir: Path | None = None,
    *,
    native: bool = False,
    jobs: int | None = None,
    on_line: Callable[[str], None] = lambda line: None,
    on_phase: Callable[[str], None] = lambda phase: None,
    env: Mapping[str, str] | None = None,
    python: str | None = None,
) -> BuildResult:
    """Rebuild `package_dir`'s engine module (default: the installed lvllm_cli) in place."""
    env = dict(os.environ if env is None else env)
    python = python or sys.executable
    package_dir = Path(package_dir) if package_dir is not None else installed_package_dir()
    if not package_dir.is_dir():
        raise BuildError(f"{package_dir} is not a directory", code=2)
    src = source_root(package_dir)
    tools = find_tools(env, python)
    check_writable(package_dir)
    jobs = jobs or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    t0 = time.monotonic()
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lvllm-build-") as tmp:
        build_dir = Path(tmp) / "build"
        on_phase("configuring")
        if _run(configure_argv(tools, src, build_dir, native, python), env, on_line, log) != 0:
            raise BuildError(f"cmake could not configure the build: {_hint(log)}", log_tail=log[-30:])
        on_phase("compiling")
        if _run(build_argv(tools, build_dir, jobs), env, on_line, log) != 0:
            raise BuildError(f"the build failed: {_hint(log)}", log_tail=log[-30:])
        built = sorted(build_dir.rglob(f"{MODULE}*.so"))
        if len(built) != 1:
            raise BuildError(f"the build produced {len(built)} {MODULE}*.so files in {build_dir}, expected one", log_tail=log[-30:])
        on_phase("checking the new module")
        fresh = ask_module(built[0], python, env)
        want = "native" if native else "portable"
        if fresh.get("flavour") != want:
            raise BuildError(f"the new module says it is a {fresh.get('flavour')!r} build, not {want!r}; the old module is unchanged")
        on_phase("installing")
        target, existed = install_module(built[0], package_dir)
    on_phase("loading it from the package")
    info = ask_module(target, python, env)
    return BuildResult(
        module=target, flavour=info["flavour"], best_isa=info["best_isa"], kernels=info["kernels"], native=native,
        seconds=time.monotonic() - t0, compiler=tools.compiler, generator=tools.generator,
        replaced=target if existed else None, log_tail=log[-10:],
    )
