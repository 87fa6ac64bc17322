"""Profiles: the shipped YAML files, the validator's messages, and NAME|DIR|FILE resolution."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from lvllm_cli.profiles import ProfileError, all_profiles, builtin_profiles, hf_cache_config, load_profile_text, resolve

REPO = Path(__file__).resolve().parents[1]

GOOD = textwrap.dedent(
    """\
    name: tiny
    description: a test profile
    model: org/tiny-moe
    facts:
      model_type: qwen3_moe
      num_hidden_layers: 4
      hidden_size: 256
      moe_intermediate_size: 128
      num_experts: 8
      num_experts_per_tok: 2
      num_attention_heads: 4
      num_key_value_heads: 2
      vocab_size: 1000
    vllm_args:
      enable-auto-tool-choice: true
      tool-call-parser: hermes
    settings:
      max_model_len: 4096
      gpu_layers: auto
    variants:
      fp8:
        model: org/tiny-moe-fp8
        facts:
          quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}
    """
)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.chdir(tmp_path)


def test_shipped_profiles_load_and_have_the_required_names():
    profs = builtin_profiles()
    assert {"qwen3-next", "qwen3-coder-30b", "glm-4.5-air", "demo"} <= set(profs)
    assert profs["qwen3-next"].model == "Qwen/Qwen3-Next-80B-A3B-Instruct"
    assert profs["qwen3-next"].variants["fp8"].model == "Qwen/Qwen3-Next-80B-A3B-Instruct-FP8"
    assert profs["qwen3-next"].variants["awq"].model.endswith("Qwen3-Next-80B-A3B-Instruct-AWQ-4bit")
    assert profs["qwen3-coder-30b"].model == "Qwen/Qwen3-Coder-30B-A3B-Instruct"
    assert profs["glm-4.5-air"].model == "zai-org/GLM-4.5-Air-FP8"
    assert profs["demo"].generate is not None and profs["demo"].model is None


def test_repo_profiles_dir_is_the_package_dir():
    # `profiles/` at the repo root is what users look for; the wheel ships lvllm_cli/profiles.
    root = REPO / "profiles"
    if (REPO / ".git").exists():  # in a checkout it is a symlink; an sdist carries copies
        assert root.is_symlink() and root.resolve() == (REPO / "lvllm_cli" / "profiles").resolve()
    pkg = REPO / "lvllm_cli" / "profiles"
    assert sorted(p.name for p in root.glob("*.yaml")) == sorted(p.name for p in pkg.glob("*.yaml"))
    assert all((pkg / p.name).read_text() == p.read_text() for p in root.glob("*.yaml"))
    # and what is installed is what is in the repo
    for p in root.glob("*.yaml"):
        installed = builtin_profiles()[yaml.safe_load(p.read_text())["name"]]
        assert installed.facts == yaml.safe_load(p.read_text())["facts"]


def test_good_profile_parses():
    p = load_profile_text(GOOD, "tiny.yaml")
    assert p.name == "tiny" and p.settings == {"max_model_len": 4096, "gpu_layers": None}
    assert p.facts_for("fp8")["quantization_config"]["quant_method"] == "fp8"
    assert "quantization_config" not in p.facts_for(None)


def _line_of_path(text: str, path: list[str]) -> int:
    """Line of a dotted key: each component searched for below its parent's line."""
    lines = text.splitlines()
    at = 0
    for comp in path:
        at = next(i for i in range(at, len(lines)) if lines[i].strip().startswith(comp + ":"))
    return at + 1


@pytest.mark.parametrize(
    "old, new, where, message",
    [
        ("  max_model_len: 4096", "  max_model_len: 4k", "settings.max_model_len", "expected a positive integer, got '4k'"),
        ("  max_model_len: 4096", "  max_modle_len: 4096", "settings.max_modle_len", "unknown key (did you mean 'max_model_len'?)"),
        ("settings:", "setings:", "setings", "did you mean 'settings'?"),
        ("  gpu_layers: auto", "  gpu_layers: some", "settings.gpu_layers", "expected 'auto' or a non-negative integer"),
        ("  tool-call-parser: hermes", "  max-model-len: 100", "vllm_args.max-model-len", "managed by lvllm: use settings.max_model_len"),
        ("  tool-call-parser: hermes", "  --tool-call-parser: hermes", "vllm_args.--tool-call-parser", "without leading dashes"),
        ("  tool-call-parser: hermes", "  api-key: secret", "vllm_args.api-key", "never store keys in a profile"),
        ("name: tiny", "name: Tiny Model", "name", "is not a valid profile name"),
        ("  num_experts: 8", "  num_experts: 0", "facts", "no MoE fields"),
        ("    model: org/tiny-moe-fp8", "    modl: org/tiny-moe-fp8", "variants.fp8.modl", "unknown key"),
        (
            "      quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}",
            "      quantization_config: {quant_method: int3}",
            "variants.fp8.facts",
            "'int3' is not supported",
        ),
    ],
)
def test_validator_points_at_the_bad_key(old, new, where, message):
    assert old in GOOD
    text = GOOD.replace(old, new)
    with pytest.raises(ProfileError) as e:
        load_profile_text(text, "tiny.yaml")
    msg = str(e.value)
    assert f": {where}: " in msg and message in msg
    # the line number is the bad key's own line
    assert msg.startswith(f"tiny.yaml:{_line_of_path(text, where.split('.'))}: ")


def test_validator_whole_file_problems():
    with pytest.raises(ProfileError, match=r"tiny.yaml: \(top level\): the file is empty"):
        load_profile_text("", "tiny.yaml")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile_text("name: [unclosed", "tiny.yaml")
    with pytest.raises(ProfileError, match="exactly one of 'model'"):
        load_profile_text(GOOD.replace("model: org/tiny-moe\n", ""), "tiny.yaml")
    with pytest.raises(ProfileError, match="missing required key 'name'"):
        load_profile_text(GOOD.replace("name: tiny\n", ""), "tiny.yaml")
    with pytest.raises(ProfileError, match="expected a mapping of keys, got list"):
        load_profile_text("- a\n- b\n", "tiny.yaml")


def test_resolve_profile_and_variant():
    t = resolve("qwen3-next")
    assert t.model == "Qwen/Qwen3-Next-80B-A3B-Instruct" and t.facts.quant.method == "none"
    assert "profile qwen3-next" in t.facts.source
    t = resolve("qwen3-next:fp8")
    assert t.variant == "fp8" and t.facts.quant.block == (128, 128) and t.model.endswith("-FP8")
    assert resolve("qwen3-next", "awq").facts.quant.method == "int4"
    assert t.vllm_args["tool-call-parser"] == "hermes"


def test_resolve_errors_are_actionable():
    with pytest.raises(ProfileError) as e:
        resolve("qwen3-nxt")
    msg = str(e.value)
    assert "unknown profile 'qwen3-nxt'" in msg and "Did you mean 'qwen3-next'?" in msg
    for name in ("demo", "glm-4.5-air", "qwen3-coder-30b", "qwen3-next"):
        assert name in msg
    with pytest.raises(ProfileError, match="has no variant 'int2' \\(variants: fp8, awq\\)"):
        resolve("qwen3-next:int2")
    with pytest.raises(ProfileError, match="two variants"):
        resolve("qwen3-next:fp8", "awq")
    with pytest.raises(ProfileError, match="model directory ./missing does not exist"):
        resolve("./missing")
    with pytest.raises(ProfileError, match="give a profile name"):
        resolve("  ")


def _write_config(d: Path, **over) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_type": "qwen3_moe", "num_hidden_layers": 6, "hidden_size": 512, "moe_intermediate_size": 256,
        "num_experts": 16, "num_experts_per_tok": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "vocab_size": 5000, "max_position_embeddings": 8192, "torch_dtype": "bfloat16",
    }  # fmt: skip
    cfg.update(over)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_resolve_model_directory(tmp_path):
    d = _write_config(tmp_path / "my-model")
    t = resolve(str(d))
    assert t.model == str(d.resolve()) and t.model_dir == d.resolve() and t.profile is None
    assert t.facts.num_experts == 16 and t.settings.max_model_len == 8192  # capped by max_position_embeddings
    assert resolve("my-model").model_dir == d.resolve()  # a bare word that is no profile name
    with pytest.raises(ProfileError, match="only applies to profiles"):
        resolve(str(d), "fp8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match="config.json not found"):
        resolve("./empty")
    dense = _write_config(tmp_path / "dense")
    cfg = json.loads((dense / "config.json").read_text())
    del cfg["num_experts"]
    (dense / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ProfileError, match="config.json: no MoE fields"):
        resolve("./dense")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ProfileError, match="is not a directory"):
        resolve("./file.txt")


def test_profile_name_beats_a_directory_of_the_same_name(tmp_path):
    _write_config(tmp_path / "demo")
    assert resolve("demo").profile is not None
    assert resolve("./demo").profile is None


def test_profile_file_and_user_profiles(tmp_path):
    f = tmp_path / "tiny.yaml"
    f.write_text(GOOD)
    t = resolve(str(f))
    assert t.name == "tiny" and t.model == "org/tiny-moe"
    with pytest.raises(ProfileError, match="profile file nothere.yaml not found"):
        resolve("nothere.yaml")
    udir = Path(os.environ["LVLLM_HOME"]) / "profiles"
    udir.mkdir(parents=True)
    (udir / "tiny.yaml").write_text(GOOD)
    assert "tiny" in all_profiles() and resolve("tiny:fp8").model == "org/tiny-moe-fp8"
    (udir / "broken.yaml").write_text(GOOD.replace("name: tiny", "name: broken").replace("hidden_size: 256", "hidden_size: -1"))
    with pytest.raises(ProfileError, match=r"broken.yaml:\d+: facts: hidden_size"):
        all_profiles()


def test_local_config_overrides_profile_facts(tmp_path):
    # a hub checkpoint already in the Hugging Face cache: its config.json wins over the profile's facts
    snap = tmp_path / "hf" / "models--Qwen--Qwen3-Coder-30B-A3B-Instruct"
    _write_config(snap / "snapshots" / "abc123", num_experts=64)
    (snap / "refs").mkdir()
    (snap / "refs" / "main").write_text("abc123\n")
    assert hf_cache_config("Qwen/Qwen3-Coder-30B-A3B-Instruct") == snap / "snapshots" / "abc123" / "config.json"
    t = resolve("qwen3-coder-30b")
    assert t.facts.num_experts == 64 and t.facts.source.endswith("config.json")
    assert t.model == "Qwen/Qwen3-Coder-30B-A3B-Instruct"  # vLLM still gets the hub id
    assert resolve("qwen3-coder-30b:fp8").facts.num_experts == 128  # other repo, not cached


def test_demo_profile_uses_the_generated_model_when_present(tmp_path):
    t = resolve("demo")
    home = Path(os.environ["LVLLM_HOME"])
    assert t.generate is not None and t.model == str(home / "demo-qwen3-moe") and t.model_dir is None
    assert t.settings.gpu_layers == 1
    _write_config(home / "demo-qwen3-moe", num_hidden_layers=3)
    t = resolve("demo")
    assert t.generate is None and t.model_dir == home / "demo-qwen3-moe" and t.facts.num_layers == 3
