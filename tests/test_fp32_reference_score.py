"""scripts/fp32_reference_score.py: a run scored as vllm_run.py scores (log p(token | the tokens before it),
every token but the first) against the tiny checkpoint in float32.  Runs whose logprobs are float32's differ
by ~0, runs computed in bfloat16 (standing in for stock vLLM) by a little."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fp32_reference_score.py"
_spec = importlib.util.spec_from_file_location("fp32_reference_score", SCRIPT)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from lvllm_cli.tiny_models import write_tiny_model

    d = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(arch, d / arch, seed=1) for arch in ("qwen3_next", "qwen3_moe")}


def sequences(n: int = 4) -> list[list[int]]:
    """As vllm_run.py scores them: a prompt of byte tokens, then 24 generated ones."""
    rng = random.Random(0)
    return [[rng.randrange(3, 259) for _ in range(rng.randrange(5, 40))] + [rng.randrange(3, 512) for _ in range(24)]
            for _ in range(n)]


def hf_logprobs(model_dir, seqs, dtype) -> list[list[float | None]]:
    """vllm_run.py's score.logprobs: entry i is log p(seq[i] | seq[:i]), None for the first token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    rows = []
    with torch.no_grad():
        for s in seqs:
            logp = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].float(), dim=-1)
            rows.append([None] + [logp[i - 1, s[i]].item() for i in range(1, len(s))])
    return rows


def write_run(path: Path, seqs, logprobs) -> Path:
    path.write_text(json.dumps({"load_s": 1.0, "lvllm": False, "eager": False, "single": [], "batch": [],
                                "score": {"sequences": seqs, "logprobs": logprobs}}))
    return path


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_moe"])
def test_bf16_run_differs_a_little_fp32_run_not_at_all(arch, models, tmp_path, capsys):
    seqs = sequences()
    bf16 = hf_logprobs(models[arch], seqs, torch.bfloat16)
    stock = write_run(tmp_path / f"{arch}-stock.json", seqs, bf16)
    fp32 = write_run(tmp_path / f"{arch}-fp32.json", seqs, hf_logprobs(models[arch], seqs, torch.float32))
    out = tmp_path / "report.json"
    report = ref.main([str(models[arch]), str(stock), str(fp32), "--out", str(out)])

    tokens = sum(len(s) - 1 for s in seqs)
    vs_stock, vs_fp32 = report["vs_fp32"][f"{arch}-stock"], report["vs_fp32"][f"{arch}-fp32"]
    assert vs_stock["scored_tokens"] == vs_fp32["scored_tokens"] == tokens
    assert 1e-3 < vs_stock["mean_abs_logprob_diff"] < 0.3 and vs_stock["max_abs_logprob_diff"] < 3
    assert vs_fp32["max_abs_logprob_diff"] < 1e-4  # transformers' default kernels vs the script's eager ones
    diffs = [abs(x - y) for a, b in zip(bf16, report["fp32_logprobs"]) for x, y in zip(a[1:], b[1:])]
    assert vs_stock["max_abs_logprob_diff"] == round(max(diffs), 6)
    assert report["run_vs_run"][f"{arch}-fp32 vs {arch}-stock"]["scored_tokens"] == tokens
    assert json.loads(out.read_text()) == report
    assert f"{arch}-stock vs fp32" in capsys.readouterr().out

    again = ref.main([str(models[arch]), str(write_run(tmp_path / "own.json", seqs, report["fp32_logprobs"]))])
    assert again["vs_fp32"]["own"] == {"scored_tokens": tokens, "max_abs_logprob_diff": 0.0, "mean_abs_logprob_diff": 0.0}


def split_checkpoint(model: Path, to: Path, part_bytes: int) -> list[Path]:
    """What gpu_open_measurements.sh next-dump leaves: the JSON files and `split -b` pieces of the weights."""
    to.mkdir()
    for p in model.glob("*.json"):
        shutil.copy(p, to / p.name)
    data = (model / "model.safetensors").read_bytes()
    parts = []
    for i in range(0, len(data), part_bytes):
        parts.append(to / f"model.safetensors.part{chr(97 + i // part_bytes // 26)}{chr(97 + i // part_bytes % 26)}")
        parts[-1].write_bytes(data[i:i + part_bytes])
    return parts


def test_split_checkpoint_is_joined(models, tmp_path):
    seqs = sequences(2)
    run = write_run(tmp_path / "run.json", seqs, hf_logprobs(models["qwen3_moe"], seqs, torch.bfloat16))
    whole = ref.main([str(models["qwen3_moe"]), str(run)])
    parts = split_checkpoint(models["qwen3_moe"], tmp_path / "next", 1 << 20)
    assert len(parts) > 2
    assert ref.main([str(tmp_path / "next"), str(run)]) == {**whole, "model": str(tmp_path / "next")}
    assert not (tmp_path / "next" / "model.safetensors").exists()  # joined elsewhere

    parts[1].unlink()
    with pytest.raises(SystemExit, match="a part is missing or cut short"):
        ref.main([str(tmp_path / "next"), str(run)])


def test_clear_errors(models, tmp_path):
    seqs = sequences(2)
    good = write_run(tmp_path / "stock.json", seqs, [[None] + [-1.0] * (len(s) - 1) for s in seqs])
    model = str(models["qwen3_moe"])

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"load_s": 1.0, "bench": []}))
    with pytest.raises(SystemExit, match=r"bench.json has no score section: .*vllm_run.py writes without --bench"):
        ref.main([model, str(bench)])

    other = write_run(tmp_path / "other.json", [seqs[0], seqs[1][:-1]], [[None] * len(seqs[0]), [None] * (len(seqs[1]) - 1)])
    with pytest.raises(SystemExit, match=r"other.json scores other sequences than .*stock.json .*at sequence 1.*--score"):
        ref.main([model, str(good), str(other)])

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"empty/config.json is missing"):
        ref.main([str(empty), str(good)])
    shutil.copy(models["qwen3_moe"] / "config.json", empty)
    with pytest.raises(SystemExit, match=r"empty has no weights: copy .*model.safetensors.part\*"):
        ref.main([str(empty), str(good)])

    too_big = write_run(tmp_path / "big.json", [[5, 600]], [[None, -1.0]])
    with pytest.raises(SystemExit, match="past .* vocab_size 512"):
        ref.main([model, str(too_big)])

    # The command line: the message on stderr, exit status 1, before torch is imported.
    p = subprocess.run([sys.executable, str(SCRIPT), model, str(bench)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "has no score section" in p.stderr and "Traceback" not in p.stderr
