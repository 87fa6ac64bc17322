"""Quantized experts kept quantized or widened to bf16 at load: the rule, the plan, tune's options.

Expectations are worked out here from the rule as docs/readme/tune.md states it
(engine time per generated token = P/128 x prefill_us + decode_us; bf16 needs a
10 % saving and must fit RAM), not read back from lvllm_cli.experts_format.
"""

import json

import plan_machines as pm
import pytest
from cli_helpers import machine_file, run_cli, write_model_config

from lvllm_cli.experts_format import KNOWN_SPEEDS, Speed, choose_experts_format
from lvllm_cli.plan import Request, build_plan
from lvllm_cli.profiles import resolve

GiB = 1 << 30


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for var in ("CUDA_VISIBLE_DEVICES", "LVLLM_EXPERTS_BF16"):
        monkeypatch.delenv(var, raising=False)


def decide(**kw):
    args = dict(method="int4", dtype="bfloat16", requested="auto", cpu_layers=10, quantized_bytes_per_layer=1 * GiB,
                bf16_bytes_per_layer=4 * GiB, ram_overhead_bytes=7 * GiB, ram_available_bytes=100 * GiB)  # fmt: skip
    args.update(kw)
    return choose_experts_format(**args)


# Speeds that make the arithmetic easy: bf16 decodes 3x slower and prefills 5x faster.
Q = Speed(decode_us=100.0, prefill_us=10000.0)
B = Speed(decode_us=300.0, prefill_us=2000.0)

# (case, overrides, widen, problem?, speed_matters)
CASES = [
    # RAM: 10 x 4 GiB + 7 GiB = 47 GiB of bf16 need; 47 GiB available fits, one byte less does not
    ("bf16 fits exactly, measured gain", dict(ram_available_bytes=47 * GiB, prompt_ratio=4, measured={"quantized": Q, "bf16": B}), True, False, True),
    ("bf16 one byte short", dict(ram_available_bytes=47 * GiB - 1, prompt_ratio=4, measured={"quantized": Q, "bf16": B}), False, False, False),
    # measured, P=4: quantized 4/128 x 10000 + 100 = 412.5 us, bf16 4/128 x 2000 + 300 = 362.5 us: 0.879 <= 0.9
    ("measured favours bf16", dict(prompt_ratio=4, measured={"quantized": Q, "bf16": B}), True, False, True),
    # measured, P=1: quantized 78.1 + 100 = 178.1, bf16 15.6 + 300 = 315.6: bf16 1.77x slower
    ("measured favours quantized", dict(prompt_ratio=1, measured={"quantized": Q, "bf16": B}), False, False, True),
    # P=3.75: quantized 3.75/128 x 10000 + 100 = 393.0, bf16 58.6 + 300 = 358.6 = 0.912: a 9 % saving is not enough
    ("measured 9 % saving keeps quantized", dict(prompt_ratio=3.75, measured={"quantized": Q, "bf16": B}), False, False, True),
    # P=3: quantized 334.4, bf16 346.9: no saving at all
    ("measured near tie keeps quantized", dict(prompt_ratio=3, measured={"quantized": Q, "bf16": B}), False, False, True),
    # known int4 ratios at the default P=4: 4/128 x 6699.0 + 216.0 = 425.3 vs 4/128 x 11321.3 + 791.3 = 1145.1
    ("known int4 ratios, default mix", dict(), False, False, True),
    # P=40: int4 2309.4 vs bf16 4329.2: int4 on int8 activations also prefills faster, so bf16 never pays
    ("known int4 ratios, prefill-heavy", dict(prompt_ratio=40), False, False, True),
    # P=8: fp8 8/128 x 23205.4 + 443.1 = 1893.4 vs bf16 1498.9 = 0.792
    ("known fp8 ratios, P=8", dict(method="fp8", prompt_ratio=8), True, False, True),
    # P=4: fp8 1168.3 vs bf16 1145.1 = 0.980: not 10 %
    ("known fp8 ratios, default mix", dict(method="fp8"), False, False, True),
    ("override quantized honoured against a bf16 win", dict(requested="quantized", prompt_ratio=40), False, False, False),
    ("override bf16 honoured against a quantized win", dict(requested="bf16", prompt_ratio=0), True, False, False),
    ("override bf16 refused when RAM is short", dict(requested="bf16", ram_available_bytes=40 * GiB), False, True, False),
    ("bf16 checkpoint: nothing changes", dict(method="none", requested="bf16", prompt_ratio=100), False, False, False),
    ("no CPU layer", dict(cpu_layers=0, requested="bf16", ram_available_bytes=1 * GiB), False, False, False),
]


@pytest.mark.parametrize("case, overrides, widen, problem, speed_matters", CASES, ids=[c[0] for c in CASES])
def test_decision_table(case, overrides, widen, problem, speed_matters):
    d = decide(**overrides)
    assert d.widen is widen
    assert (d.problem is not None) is problem
    assert d.speed_matters is speed_matters
    layers = overrides.get("cpu_layers", 10)
    assert d.cpu_bytes_per_layer == (4 if widen else 1) * GiB
    assert d.quantized_ram_bytes == layers * GiB + 7 * GiB and d.bf16_ram_bytes == layers * 4 * GiB + 7 * GiB
    assert d.reason and "\n" not in d.reason
    if d.speed_matters:
        speeds = overrides.get("measured") or {"quantized": KNOWN_SPEEDS[overrides.get("method", "int4")], "bf16": KNOWN_SPEEDS["bf16"]}
        p = overrides.get("prompt_ratio", 4)
        cost = {k: p / 128 * s.prefill_us + s.decode_us for k, s in speeds.items()}
        assert d.bf16_cost_ratio == pytest.approx(cost["bf16"] / cost["quantized"], abs=1e-4)
        assert f"{d.bf16_cost_ratio:.2f}x" in d.reason
        assert ("measured on this machine" in d.reason) == ("measured" in overrides)
        assert ("docs/PERFORMANCE.md" in d.reason) == ("measured" not in overrides)


def test_reasons_and_messages_name_the_numbers_and_the_fix():
    d = decide(requested="bf16", ram_available_bytes=40 * GiB)
    assert d.problem.startswith("--experts-format bf16: not enough RAM")
    assert "47.0 GiB with the overheads" in d.problem and "40.0 GiB is available" in d.problem
    assert "use --experts-format quantized (it fits) or auto" in d.problem
    assert d.value == "int4 (bf16 refused)"
    d = decide(ram_available_bytes=40 * GiB)
    assert not d.widen and d.problem is None and d.reason.startswith("bf16 does not fit") and "40.0 GiB is available" in d.reason
    d = decide(method="none", requested="bf16")
    assert d.reason.startswith("bf16 checkpoint") and "--experts-format bf16 changes nothing" in d.reason and d.value == "bf16 (checkpoint)"
    assert decide(method="none", dtype="float16").reason.startswith("fp16 checkpoint")
    d = decide(requested="bf16", requested_by="LVLLM_EXPERTS_BF16=1 in the environment")
    assert d.widen and "as requested (LVLLM_EXPERTS_BF16=1 in the environment)" in d.reason
    d = decide(method="fp8", prompt_ratio=40)
    assert d.value == "bf16 (widened at load)" and "47.0 GiB of 100.0 GiB" in d.reason
    with pytest.raises(ValueError, match="expected one of auto, quantized, bf16"):
        decide(requested="fp16")
    with pytest.raises(ValueError, match="must be >= 0"):
        decide(prompt_ratio=-1)


def test_break_even_of_the_known_ratios():
    # bf16 = 0.9 x quantized:  P/128 x (11321.3 - 0.9 x prefill_q) = 0.9 x decode_q - 791.3
    fp8 = 128 * (791.3 - 0.9 * 443.1) / (0.9 * 23205.4 - 11321.3)  # 5.25
    assert decide(method="fp8").break_even_prompt_ratio == pytest.approx(fp8, abs=0.05) == 5.3
    assert not decide(method="fp8", prompt_ratio=fp8 - 0.05).widen and decide(method="fp8", prompt_ratio=fp8 + 0.05).widen
    assert "bf16 pays from --prompt-ratio 5.3" in decide(method="fp8").reason
    # int4 on int8 activations is faster than bf16 at both decode and prefill: no ratio makes bf16 pay
    assert decide().break_even_prompt_ratio is None
    assert not decide(prompt_ratio=1000).widen and "bf16 pays from" not in decide().reason


def test_known_speeds_are_the_performance_table():
    # docs/PERFORMANCE.md, "The engine alone on the same machine": µs per layer, decode M=1 and prefill M=128
    assert KNOWN_SPEEDS["bf16"] == Speed(791.3, 11321.3)
    assert KNOWN_SPEEDS["int4"] == Speed(216.0, 6699.0)
    assert KNOWN_SPEEDS["fp8"] == Speed(443.1, 23205.4)


# ---- in the plan -------------------------------------------------------------------------------


def bf16_layer_bytes(target_name: str) -> int:
    cfg = resolve(target_name).profile.facts_for(resolve(target_name).variant)
    E = cfg.get("num_experts") or cfg.get("n_routed_experts")
    return E * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * 2


def test_plan_widens_for_a_prefill_heavy_workload_and_counts_bf16_ram():
    # GLM-4.5-Air's fp8 experts: at 1 prompt token per generated one fp8's faster decode wins (bf16 1.41x the
    # time); at 40 bf16's faster prefill does (0.56x).  (int4 on int8 activations wins at any ratio.)
    m, name = pm.epyc_nps4(), "glm-4.5-air"
    kept = build_plan(m, resolve(name), Request(prompt_ratio=1))
    wide = build_plan(m, resolve(name), Request(prompt_ratio=40))
    assert not build_plan(m, resolve("glm-4.5-air:awq"), Request(prompt_ratio=40)).experts_format["widen"]
    assert kept.gpu_layers == wide.gpu_layers and kept.cpu_layers
    assert kept.env["LVLLM_EXPERTS_BF16"] == "0" and wide.env["LVLLM_EXPERTS_BF16"] == "1"
    overhead = 4 * GiB + 3 * GiB * len(wide.workers)
    assert kept.ram_needed_bytes == len(kept.cpu_layers) * resolve(name).facts.expert_bytes_per_layer() + overhead
    assert wide.ram_needed_bytes == len(wide.cpu_layers) * bf16_layer_bytes(name) + overhead
    assert wide.fits and wide.experts_format["widen"] and not kept.experts_format["widen"]
    row = next(c for c in wide.choices if c["setting"] == "experts format")
    assert row["value"] == "bf16 (widened at load)" and "0.56x" in row["why"]
    assert any(r.startswith("experts format = bf16 (widened at load): at 40 prompt tokens") for r in wide.reasons)
    assert "bf16, widened at load from fp8" in next(c["why"] for c in wide.choices if c["setting"] == "host RAM")
    d = wide.to_dict()
    assert d["experts_format"]["widen"] is True and d["experts_format"]["prompt_ratio"] == 40
    assert json.loads(json.dumps(d))["experts_format"]["bf16_ram_bytes"] == wide.ram_needed_bytes


def test_plan_refuses_bf16_that_does_not_fit():
    p = build_plan(pm.desktop(), resolve("qwen3-next:awq"), Request(experts_format="bf16"))
    assert not p.fits and p.env["LVLLM_EXPERTS_BF16"] == "0"
    assert any(x.startswith("--experts-format bf16: not enough RAM") for x in p.problems)
    # the RAM row shows what would run: the quantized experts
    assert p.ram_needed_bytes == build_plan(pm.desktop(), resolve("qwen3-next:awq")).ram_needed_bytes


@pytest.mark.parametrize("name", ["demo", "qwen3-coder-30b", "qwen3-next"])
def test_bf16_checkpoints_report_and_change_nothing(name):
    base = build_plan(pm.xeon_snc(), resolve(name))
    asked = build_plan(pm.xeon_snc(), resolve(name), Request(experts_format="bf16", prompt_ratio=100))
    assert base.experts_format["reason"].startswith("bf16 checkpoint") and base.experts_format["value"] == "bf16 (checkpoint)"
    assert asked.env == base.env and asked.ram_needed_bytes == base.ram_needed_bytes
    assert base.env["LVLLM_EXPERTS_BF16"] == "0"


# ---- tune and serve options --------------------------------------------------------------------


def test_tune_json_and_table_carry_the_choice(tmp_path):
    mf = machine_file(tmp_path, "epyc_nps4")
    out = json.loads(run_cli("tune", "glm-4.5-air:awq", "--machine", mf, "--json", "--prompt-ratio", "40").stdout)
    assert out["experts_format"]["widen"] is False and out["experts_format"]["checkpoint"] == "int4"
    assert out["env"]["LVLLM_EXPERTS_BF16"] == "0"
    out = json.loads(run_cli("tune", "glm-4.5-air", "--machine", mf, "--json", "--prompt-ratio", "40").stdout)
    assert out["experts_format"]["widen"] is True and out["experts_format"]["checkpoint"] == "fp8"
    assert out["env"]["LVLLM_EXPERTS_BF16"] == "1"
    out = json.loads(run_cli("tune", "glm-4.5-air", "--machine", mf, "--json", "--prompt-ratio", "40", "--experts-format", "quantized").stdout)
    assert out["experts_format"]["widen"] is False and out["experts_format"]["requested"] == "quantized"
    r = run_cli("tune", "glm-4.5-air", "--machine", mf, "--prompt-ratio", "40", env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "experts format" in r.stdout and "bf16 (widened at load)" in r.stdout
    assert "LVLLM_EXPERTS_BF16=1" in r.stdout


def test_tune_bf16_refusal_and_bad_values(tmp_path):
    mf = machine_file(tmp_path, "desktop")
    r = run_cli("tune", "qwen3-next:awq", "--machine", mf, "--experts-format", "bf16", env={"COLUMNS": "250"})
    assert r.exit_code == 1 and "--experts-format bf16: not enough RAM" in r.stdout and "use --experts-format quantized" in r.stdout
    r = run_cli("tune", "qwen3-next:awq", "--machine", mf, "--experts-format", "fp16")
    assert r.exit_code == 2 and "--experts-format 'fp16': expected one of auto, quantized, bf16" in r.stderr
    r = run_cli("tune", "qwen3-next:awq", "--machine", mf, "--prompt-ratio", "-1")
    assert r.exit_code == 2 and "--prompt-ratio -1.0: must be >= 0" in r.stderr


def test_tune_takes_lvllm_experts_bf16_from_the_environment(tmp_path):
    mf = machine_file(tmp_path, "epyc_nps4")
    out = json.loads(run_cli("tune", "glm-4.5-air:awq", "--machine", mf, "--json", env={"LVLLM_EXPERTS_BF16": "1"}).stdout)
    assert out["experts_format"]["requested"] == "bf16" and out["env"]["LVLLM_EXPERTS_BF16"] == "1"
    assert "LVLLM_EXPERTS_BF16=1 in the environment" in out["experts_format"]["reason"]
    out = json.loads(run_cli("tune", "glm-4.5-air:awq", "--machine", mf, "--json", "--prompt-ratio", "40", env={"LVLLM_EXPERTS_BF16": "0"}).stdout)
    assert out["experts_format"]["requested"] == "quantized" and out["env"]["LVLLM_EXPERTS_BF16"] == "0"
    # the option wins over the environment
    out = json.loads(run_cli("tune", "glm-4.5-air:awq", "--machine", mf, "--json", "--experts-format", "auto", env={"LVLLM_EXPERTS_BF16": "1"}).stdout)
    assert out["experts_format"]["requested"] == "auto" and out["env"]["LVLLM_EXPERTS_BF16"] == "0"
    r = run_cli("tune", "glm-4.5-air:awq", "--machine", mf, env={"LVLLM_EXPERTS_BF16": "yes"})
    assert r.exit_code == 2 and "LVLLM_EXPERTS_BF16='yes' in the environment" in r.stderr


def test_serve_dry_run_sets_lvllm_experts_bf16_per_the_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    mf = machine_file(tmp_path, "epyc_nps4")
    for opts, expected in ((["--prompt-ratio", "1"], "0"), (["--prompt-ratio", "40"], "1"),
                           (["--prompt-ratio", "1", "--experts-format", "bf16"], "1"),
                           (["--prompt-ratio", "40", "--experts-format", "quantized"], "0")):
        r = run_cli("serve", "glm-4.5-air", "--machine", mf, "--dry-run", "--json", *opts)
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["env"]["LVLLM_EXPERTS_BF16"] == expected, opts
        assert out["plan"]["experts_format"]["widen"] is (expected == "1")
    r = run_cli("serve", "qwen3-next:awq", "--machine", machine_file(tmp_path, "desktop"), "--dry-run", "--experts-format", "bf16")
    assert r.exit_code == 1 and "--experts-format bf16: not enough RAM" in r.stderr and "does not fit" in r.stderr
    saved = tmp_path / "plan.json"
    assert run_cli("tune", "glm-4.5-air", "--machine", mf, "--prompt-ratio", "40", "--save", saved).exit_code == 0
    out = json.loads(run_cli("serve", "--plan", saved, "--dry-run", "--json").stdout)
    assert out["env"]["LVLLM_EXPERTS_BF16"] == "1"
    r = run_cli("serve", "--plan", saved, "--dry-run", "--experts-format", "quantized")
    assert r.exit_code == 2 and "--experts-format plan(s) anew" in r.stderr


def test_model_dir_with_fp8_experts(tmp_path):
    d = write_model_config(tmp_path / "m", quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    out = json.loads(run_cli("tune", d, "--machine", machine_file(tmp_path, "desktop"), "--json", "--prompt-ratio", "8", "--gpu-layers", "0").stdout)
    ef = out["experts_format"]
    assert ef["checkpoint"] == "fp8" and ef["widen"] is True and out["env"]["LVLLM_EXPERTS_BF16"] == "1"
    assert ef["cpu_bytes_per_layer"] == 16 * 3 * 512 * 256 * 2
