"""`lvllm gguf ...` as a real subprocess: output, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import gguf
import numpy as np
import pytest
from gguf_helpers import dir_listing, tensor_bytes, write_moe_model


def lvllm(*args):
    # run from a neutral directory: `-m lvllm_cli` must import the installed package, not a checkout
    return subprocess.run([sys.executable, "-m", "lvllm_cli", "gguf", *map(str, args)],
                          capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=120)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_moe_model(tmp_path_factory.mktemp("cli") / "model.gguf",
                           seed=int(np.random.default_rng().integers(1 << 30)))


def test_info_json_matches_gguf_py(model):
    r = lvllm("info", model, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    ref = gguf.GGUFReader(model)
    assert data["schema"] == 1 and data["architecture"] == "qwen3moe"
    assert data["tensor_count"] == len(ref.tensors)
    assert data["tensor_bytes"] == sum(int(t.n_bytes) for t in ref.tensors)
    assert data["parameters"] == sum(int(t.n_elements) for t in ref.tensors)
    assert data["file_bytes"] == model.stat().st_size
    assert [t["name"] for t in data["tensors"]] == [t.name for t in ref.tensors]
    assert [t["type"] for t in data["tensors"]] == [t.tensor_type.name for t in ref.tensors]
    by_type = {}
    for t in ref.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    assert {e["type"]: e["bytes"] for e in data["tensor_types"]} == by_type
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert [m["key"] for m in data["metadata"]] == keys
    tokens = next(m for m in data["metadata"] if m["key"] == "tokenizer.ggml.tokens")
    assert tokens["length"] == len(ref.fields["tokenizer.ggml.tokens"].data)
    assert tokens["head"] == ref.fields["tokenizer.ggml.tokens"].contents()[:8]
    ex = data["experts"]
    assert ex["expert_count"] == 5 and [layer["layer"] for layer in ex["layers"]] == [0, 1, 2]
    want = {n.split(".")[2]: t.tensor_type.name for t in ref.tensors if (n := t.name).startswith("blk.0.ffn_")}
    assert ex["layers"][0]["tensors"] == want
    assert ex["runs"] == [{"first": 0, "last": 2, "tensors": want}]
    assert data["split"] is None


def test_split_merge_info_through_the_cli(model, tmp_path):
    r = lvllm("split", model, tmp_path / "m.gguf", "--max-size", "0.2M", "-q")
    assert r.returncode == 0, r.stderr
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) > 2 and all(p.name.endswith(f"-of-{len(shards):05d}.gguf") for p in shards)
    for p in shards:  # 0.2M = 200000 bytes of padded tensor data, as llama-gguf-split counts
        assert sum(-(-int(t.n_bytes) // 32) * 32 for t in gguf.GGUFReader(p).tensors) <= 200_000

    r = lvllm("info", shards[1], "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["split"]["count"] == len(shards) and data["split"]["complete"]
    assert data["files"] == [str(p) for p in shards]
    assert data["tensor_count"] == len(gguf.GGUFReader(model).tensors)
    one = json.loads(lvllm("info", shards[1], "--json", "--this-file").stdout)
    assert one["split"]["no"] == 1 and one["files"] == [str(shards[1])]

    r = lvllm("merge", shards[0], "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    merged = tmp_path / "m.gguf"
    assert out["output"] == str(merged) and out["bytes"] == merged.stat().st_size
    assert tensor_bytes(merged) == tensor_bytes(model)

    r = lvllm("info", merged)
    assert r.returncode == 0 and "qwen3moe" in r.stdout and "layers 0-2" in r.stdout


def test_refusals_are_clean(model, tmp_path):
    r = lvllm("merge", model)
    assert r.returncode == 1 and "not a split GGUF" in r.stderr and "Traceback" not in r.stderr
    r = lvllm("info", tmp_path / "nope.gguf")
    assert r.returncode == 1 and "nope.gguf" in r.stderr and "Traceback" not in r.stderr
    r = lvllm("split", model, tmp_path / "s", "--max-size", "lots")
    assert r.returncode == 2 and "cannot read 'lots' as a size" in r.stderr
    r = lvllm("split", model, tmp_path / "s")
    assert r.returncode == 1 and "exactly one of --max-size and --max-tensors" in r.stderr
    before = dir_listing(tmp_path)
    assert lvllm("split", model, tmp_path / "s", "--max-tensors", "9", "--dry-run").returncode == 0
    assert dir_listing(tmp_path) == before
    assert lvllm("split", model, tmp_path / "s", "--max-tensors", "9", "-q").returncode == 0
    r = lvllm("split", model, tmp_path / "s", "--max-tensors", "9", "-q")
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr
    (tmp_path / "s.gguf").write_bytes(b"x")
    r = lvllm("merge", tmp_path / "s-00001-of-00003.gguf")
    assert r.returncode == 1 and "already exists" in r.stderr
    assert (tmp_path / "s.gguf").read_bytes() == b"x"
