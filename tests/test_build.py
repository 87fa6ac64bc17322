"""`lvllm build`: a real compile of the engine into a copy of the installed package, and the ways it
must fail without touching the module that is there."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import lvllm_cli
from lvllm_cli.build import BuildError, find_tools, parse_progress, source_root

INSTALLED = Path(lvllm_cli.__file__).resolve().parent


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _module(package: Path) -> Path:
    found = sorted(package.glob("_lk_moe*.so"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def package_copy(tmp_path) -> Path:
    """A copy of the installed lvllm_cli (sources, CMakeLists.txt and module) to build into."""
    dst = tmp_path / "site" / "lvllm_cli"
    shutil.copytree(INSTALLED, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def lvllm(*args, env=None, cwd=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvllm_cli", *map(str, args)], capture_output=True, text=True,
                          env=env or dict(os.environ), cwd=cwd or tempfile.gettempdir(), timeout=600, **kw)


def test_the_wheel_carries_what_an_in_place_build_needs():
    assert (INSTALLED / "native" / "CMakeLists.txt").is_file()
    assert source_root(INSTALLED) == INSTALLED / "native"
    for name in ("engine.cpp", "bindings.cpp", "kernels_avx2.cpp", "kernels_amx.cpp", "engine.h"):
        assert (INSTALLED / "native" / name).is_file(), name


def test_native_build_into_a_copy(package_copy):
    installed_module = _module(INSTALLED)
    before_installed = _digest(installed_module)
    old = _module(package_copy)
    before = _digest(old)
    r = lvllm("build", "--native", "--json", "--into", package_copy)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["flavour"] == "native" and out["native"] is True and out["replaced"] is True
    assert Path(out["module"]) == old and _digest(old) != before
    assert sorted(p.name for p in package_copy.iterdir() if p.name.startswith(".")) == []  # no temporary left
    # a fresh process importing the package copy gets the new module, and it agrees with the report
    probe = ("import json, lvllm_cli, lvllm_cli._lk_moe as m; print(json.dumps([lvllm_cli.__file__, m.build_flavour(), "
             "m.best_isa(), m.kernel_name('bfloat16'), m.kernel_name('float16')]))")
    env = dict(os.environ, PYTHONPATH=str(package_copy.parent))
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    assert got.returncode == 0, got.stderr
    where, flavour, isa, bf16, fp16 = json.loads(got.stdout)
    assert Path(where).parent == package_copy
    assert (flavour, isa, bf16, fp16) == ("native", out["best_isa"], out["kernels"]["bfloat16"], out["kernels"]["float16"])
    # the engine of the running environment was not touched
    assert _digest(installed_module) == before_installed


def _path_without_compiler(tmp_path) -> str:
    """A PATH with the real cmake binary (not a wrapper script: pyenv shims, pip's entry point) and
    nothing else, so no C++ compiler."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    script = tmp_path / "where.cmake"
    script.write_text('message("${CMAKE_COMMAND}")\n')
    real = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True).stderr.strip()
    assert Path(real).is_file(), real
    (bin_dir / "cmake").symlink_to(real)
    return str(bin_dir)


def test_missing_compiler_is_reported_and_nothing_changes(tmp_path, package_copy):
    old = _module(package_copy)
    before = _digest(old)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env["PATH"] = _path_without_compiler(tmp_path)
    r = lvllm("build", "--into", package_copy, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no C++ compiler found" in r.stderr and "apt install g++" in r.stderr and "Traceback" not in r.stderr
    assert _digest(old) == before
    env["CXX"] = "/nonexistent/g++"
    r = lvllm("build", "--into", package_copy, env=env)
    assert r.returncode == 1 and "CXX=/nonexistent/g++ is not an executable" in r.stderr


def test_missing_cmake_and_nanobind(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    fake_python = tmp_path / "python"  # a "Python" without cmake beside it and without nanobind
    fake_python.write_text("#!/bin/sh\nexit 1\n")
    fake_python.chmod(0o755)
    with pytest.raises(BuildError, match="cmake not found: pip install cmake"):
        find_tools({"PATH": str(empty)}, python=str(fake_python))
    with pytest.raises(BuildError, match=r"nanobind is not installed in this Python .*pip install nanobind"):
        find_tools({"PATH": os.environ["PATH"] + os.pathsep + str(Path(sys.executable).parent)}, python=str(fake_python))


def _read_only_run(package: Path, *args) -> subprocess.CompletedProcess:
    """lvllm build with `package` read-only: chmod for a normal user; for root (whom modes do not
    stop) a read-only bind mount in a private user and mount namespace."""
    argv = [sys.executable, "-m", "lvllm_cli", "build", "--into", str(package), *args]
    if os.geteuid() != 0:
        package.chmod(0o555)
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=600)
        finally:
            package.chmod(0o755)
    script = f'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(package), *argv], capture_output=True,
                          text=True, cwd=tempfile.gettempdir(), timeout=600)


def test_read_only_package_is_refused_before_compiling(package_copy):
    old = _module(package_copy)
    before = _digest(old)
    r = _read_only_run(package_copy)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"cannot write to {package_copy}" in r.stderr and "pip install --user" in r.stderr and "venv" in r.stderr
    assert "configuring" not in r.stderr  # refused before any compile
    assert _digest(old) == before


def test_not_a_package(tmp_path):
    r = lvllm("build", "--into", tmp_path)
    assert r.returncode == 2 and "has no engine sources" in r.stderr


def test_progress_lines_of_ninja_and_make():
    s = parse_progress("[3/26] Building CXX object CMakeFiles/_lk_moe.dir/lvllm_cli/native/engine.cpp.o")
    assert (s.what, s.done, s.total, s.percent) == ("engine.cpp", 3, 26, None)
    s = parse_progress("[ 42%] Building CXX object CMakeFiles/_lk_moe.dir/kernels_amx.cpp.o")
    assert (s.what, s.done, s.percent) == ("kernels_amx.cpp", None, 42)
    assert parse_progress("[26/26] Linking CXX shared module _lk_moe.cpython-311-x86_64-linux-gnu.so").what == "linking"
    assert parse_progress("[100%] Built target _lk_moe").percent == 100
    for other in ("/src/engine.cpp:12:3: warning: unused variable 'x'", "-- Configuring done", "[rank0]: x", "[9/3] x"):
        assert parse_progress(other) is None


def test_plain_progress_display_shows_steps_and_compiler_messages():
    import io

    from rich.console import Console

    from lvllm_cli.commands.build import _Display

    buf = io.StringIO()
    with _Display(Console(file=buf, width=200), live=False, quiet=False) as d:
        d.phase("configuring")
        for line in ("-- The CXX compiler identification is GNU 13.2.0",
                     "[1/3] Building CXX object CMakeFiles/_lk_moe.dir/pool.cpp.o",
                     "/src/pool.cpp:9:1: warning: unused [-Wunused]",
                     "[3/3] Linking CXX shared module _lk_moe.so"):
            d.line(line, parse_progress(line))
    assert buf.getvalue().splitlines() == ["lvllm build: configuring", "lvllm build: [1/3] pool.cpp",
                                           "/src/pool.cpp:9:1: warning: unused [-Wunused]", "lvllm build: [3/3] linking"]
    quiet = io.StringIO()
    with _Display(Console(file=quiet), live=False, quiet=True) as d:
        d.phase("configuring")
        d.line("[1/3] Building CXX object x.cpp.o", parse_progress("[1/3] Building CXX object x.cpp.o"))
    assert quiet.getvalue() == ""
