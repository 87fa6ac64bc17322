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


def test_demo_profile_facts_are_the_shape_tiny_models_writes():
    """Until the demo model exists, tune/serve --dry-run plan from the profile's facts: they must
    describe the model that will be written, or the plan changes once it is."""
    from lvllm_cli.profiles import builtin_profiles
    from lvllm_cli.tiny_models import TINY, _config

    demo = builtin_profiles()["demo"]
    written = _config(TINY[demo.generate.arch])
    assert demo.facts, "the demo profile has no facts"
    for key, value in demo.facts.items():
        expected = written["dtype"] if key == "torch_dtype" else written[key]
        assert value == expected, f"demo.yaml facts.{key} = {value!r}, tiny_models writes {expected!r}"


def test_missing_transformers_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    install_generator(monkeypatch, good_generator)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    target = tmp_path / "home" / "demo-qwen3-moe"
    with pytest.raises(typer.Exit) as e:
        _generate_demo(Generate(arch="qwen3_moe", dir="demo-qwen3-moe"), target, Console(file=io.StringIO()))
    err = capsys.readouterr().err
    assert e.value.exit_code == 1
    assert "transformers" in err and "pip install 'lvllm[vllm]'" in err and "pip install transformers" in err
    assert not target.exists()


def test_generator_errors_are_clean(tmp_path, monkeypatch, capsys):
    def unusable(arch, out_dir, seed=0):
        raise RuntimeError("making a tiny qwen3_moe checkpoint needs torch and transformers (installed with vLLM): boom")

    install_generator(monkeypatch, unusable)
    with pytest.raises(typer.Exit) as e:
        _generate_demo(Generate(arch="qwen3_moe", dir="d"), tmp_path / "d", Console(file=io.StringIO()))
    assert e.value.exit_code == 1 and "cannot write the demo model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_profile_with_an_arch_lvllm_cannot_write_is_refused(tmp_path):
    from lvllm_cli.profiles import ProfileError, load_profile_file

    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\ngenerate:\n  arch: llama\n  dir: mine\n")
    with pytest.raises(ProfileError, match=r"mine.yaml:3: generate.arch: .*can write: qwen3_moe"):
        load_profile_file(f)
