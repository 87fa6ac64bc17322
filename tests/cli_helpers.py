"""Helpers for driving the installed `lvllm` CLI in tests."""

from __future__ import annotations

import json
from pathlib import Path

import plan_machines as pm
from typer.testing import CliRunner

from lvllm_cli.cli import app


def machine_file(tmp_path: Path, name: str, machine=None) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps((machine or pm.ALL[name]()).to_dict()))
    return path


def run_cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)


def write_model_config(d: Path, **over) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_hidden_layers": 6,
        "hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 256, "num_experts": 16,
        "num_experts_per_tok": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64,
        "vocab_size": 5000, "max_position_embeddings": 8192, "torch_dtype": "bfloat16",
    }  # fmt: skip
    cfg.update(over)
    (d / "config.json").write_text(json.dumps(cfg))
    return d
