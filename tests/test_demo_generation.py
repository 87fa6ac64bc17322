"""`lvllm serve demo` writes the demo model whole or not at all (the generator is the lead's tiny_models)."""

import io
import json
import sys
import types

import pytest
import typer
from rich.console import Console

from lvllm_cli.commands.serve import _generate_demo
from lvllm_cli.profiles import Generate


def install_generator(monkeypatch, fn):
    mod = types.ModuleType("lvllm_cli.tiny_models")
    mod.write_tiny_model = fn
    monkeypatch.setitem(sys.modules, "lvllm_cli.tiny_models", mod)


def good_generator(arch, out_dir, seed=0):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"model_type": arch}))
    (out_dir / "model.safetensors").write_bytes(b"x" * 100)
    return out_dir


def test_generates_into_place(tmp_path, monkeypatch):
    calls = []
    install_generator(monkeypatch, lambda arch, out, seed=0: calls.append((arch, out)) or good_generator(arch, out))
    target = tmp_path / "home" / "demo-qwen3-moe"
    _generate_demo(Generate(arch="qwen3_moe", dir="demo-qwen3-moe"), target, Console(file=io.StringIO()))
    assert json.loads((target / "config.json").read_text()) == {"model_type": "qwen3_moe"}
    assert calls[0][0] == "qwen3_moe" and not calls[0][1].exists()  # written elsewhere, then renamed
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo-qwen3-moe"]  # no scratch left


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(arch, out_dir, seed=0):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise OSError("disk full")

    install_generator(monkeypatch, broken)
    target = tmp_path / "home" / "demo-qwen3-moe"
    with pytest.raises(OSError, match="disk full"):
        _generate_demo(Generate(arch="qwen3_moe", dir="demo-qwen3-moe"), target, Console(file=io.StringIO()))
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_refuses_a_foreign_directory(tmp_path, monkeypatch):
    install_generator(monkeypatch, good_generator)
    target = tmp_path / "demo-qwen3-moe"
    target.mkdir()
    (target / "half.bin").write_bytes(b"")
    with pytest.raises(typer.Exit):
        _generate_demo(Generate(arch="qwen3_moe", dir="demo-qwen3-moe"), target, Console(file=io.StringIO()))
    assert [p.name for p in target.iterdir()] == ["half.bin"]


def test_missing_generator_module_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lvllm_cli.tiny_models", None)  # import raises ImportError
    with pytest.raises(typer.Exit) as e:
        _generate_demo(Generate(arch="qwen3_moe", dir="d"), tmp_path / "d", Console(file=io.StringIO()))
    assert e.value.exit_code == 1
