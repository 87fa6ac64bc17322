"""Real GGUF files for the tests, written by gguf-py's GGUFWriter (an
implementation independent of lvllm_cli.gguf_tools), and readers/writers to
build the bytes we expect from llama.cpp's rules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf.quants import quantize

HIDDEN = 256  # one Q4_K block per row
EXPERTS = 5
EXPERT_FF = 45  # rows of gate/up: 5*45*144 bytes is not a multiple of 32
VOCAB = 37


def _tokens(rng: np.random.Generator, n: int) -> list[str]:
    alphabet = list("abcdefghijklmnopqrstuvwxyz") + ["▁", "é", "中", "\n", "<", ">"]
    return [f"<tok{i}>" if i < 3 else "".join(rng.choice(alphabet, size=rng.integers(1, 6))) + str(i) for i in range(n)]


def moe_tensors(rng: np.random.Generator, n_layers: int) -> list[tuple[str, np.ndarray, QT]]:
    """A small qwen3moe-like tensor set: F32 norms, F16, Q8_0 and Q4_K, 3-D experts, odd byte sizes."""

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def q8(*shape):
        return quantize(f32(*shape), QT.Q8_0)

    def q4k(*shape):  # gguf-py cannot quantize Q4_K: random blocks of the right size
        *lead, cols = shape
        return rng.integers(0, 256, size=(*lead, cols // 256 * 144), dtype=np.uint8)

    ts: list[tuple[str, np.ndarray, QT]] = [
        ("token_embd.weight", f32(VOCAB, HIDDEN).astype(np.float16), QT.F16),
    ]
    for i in range(n_layers):
        ts += [
            (f"blk.{i}.attn_norm.weight", f32(HIDDEN), QT.F32),
            (f"blk.{i}.attn_q.weight", q8(33, HIDDEN), QT.Q8_0),
            (f"blk.{i}.attn_k.weight", q8(7, HIDDEN), QT.Q8_0),
            (f"blk.{i}.attn_output.weight", f32(HIDDEN, 35).astype(np.float16), QT.F16),
            (f"blk.{i}.ffn_gate_inp.weight", f32(EXPERTS, HIDDEN), QT.F32),
            (f"blk.{i}.ffn_gate_exps.weight", q4k(EXPERTS, EXPERT_FF, HIDDEN), QT.Q4_K),
            (f"blk.{i}.ffn_up_exps.weight", q4k(EXPERTS, EXPERT_FF, HIDDEN), QT.Q4_K),
            (f"blk.{i}.ffn_down_exps.weight", q8(EXPERTS, HIDDEN, 96), QT.Q8_0),
        ]
    ts += [
        ("output_norm.weight", f32(HIDDEN), QT.F32),
        ("output.weight", f32(VOCAB, 17).astype(np.float16), QT.F16),
    ]
    return ts


def moe_kvs(rng: np.random.Generator, n_layers: int) -> list[tuple[str, Any, VT, VT | None]]:
    """(key, value, type, array element type), every GGUF value type used once."""
    tokens = _tokens(rng, VOCAB)
    return [
        ("general.type", "model", VT.STRING, None),
        ("general.name", f"tiny-qwen3moe-{rng.integers(1000)}", VT.STRING, None),
        ("qwen3moe.block_count", n_layers, VT.UINT32, None),
        ("qwen3moe.context_length", 4096, VT.UINT32, None),
        ("qwen3moe.embedding_length", HIDDEN, VT.UINT32, None),
        ("qwen3moe.expert_count", EXPERTS, VT.UINT32, None),
        ("qwen3moe.expert_used_count", 2, VT.UINT32, None),
        ("qwen3moe.rope.freq_base", float(rng.uniform(1e4, 1e6)), VT.FLOAT32, None),
        ("qwen3moe.attention.layer_norm_rms_epsilon", 1e-6, VT.FLOAT64, None),
        ("test.u8", int(rng.integers(256)), VT.UINT8, None),
        ("test.i8", -int(rng.integers(128)), VT.INT8, None),
        ("test.u16", int(rng.integers(65536)), VT.UINT16, None),
        ("test.i16", -int(rng.integers(32768)), VT.INT16, None),
        ("test.i32", -int(rng.integers(2**31)), VT.INT32, None),
        ("test.u64", int(rng.integers(2**63)), VT.UINT64, None),
        ("test.i64", -int(rng.integers(2**62)), VT.INT64, None),
        ("test.flag", True, VT.BOOL, None),
        ("test.flags", [bool(x) for x in rng.integers(0, 2, 9)], VT.ARRAY, VT.BOOL),
        ("tokenizer.ggml.model", "gpt2", VT.STRING, None),
        ("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
        ("tokenizer.ggml.scores", [float(x) for x in rng.standard_normal(VOCAB).astype(np.float32)], VT.ARRAY, VT.FLOAT32),
        ("tokenizer.ggml.token_type", [int(x) for x in rng.integers(1, 6, VOCAB)], VT.ARRAY, VT.INT32),
        ("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}", VT.STRING, None),
    ]


def write_gguf(path: os.PathLike[str] | str, kvs: Iterable[tuple[str, Any, VT, VT | None]],
               tensors: Iterable[tuple[str, np.ndarray, QT]], *, alignment: int | None = None,
               arch: str | None = None, **writer_options: Any) -> Path:
    """A GGUF with exactly these KVs in this order (no automatic
    general.architecture unless `arch`), then these tensors in this order.
    writer_options go to gguf.GGUFWriter (e.g. split_max_tensors: its own splitter)."""
    w = gguf.GGUFWriter(path, arch or "unused", **writer_options)
    w.kv_data[0].clear()
    if arch:
        w.add_architecture()
    for key, value, vtype, sub in kvs:
        w.add_key_value(key, value, vtype, sub_type=sub)
    if alignment is not None:
        w.data_alignment = alignment
    for name, data, qtype in tensors:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def write_moe_model(path: os.PathLike[str] | str, *, seed: int, n_layers: int = 3,
                    alignment: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    kvs = moe_kvs(rng, n_layers)
    if alignment is not None:
        kvs.insert(1, ("general.alignment", alignment, VT.UINT32, None))
    return write_gguf(path, kvs, moe_tensors(rng, n_layers), alignment=alignment, arch="qwen3moe")


def read_kvs(path: os.PathLike[str] | str) -> list[tuple[str, Any, VT, VT | None]]:
    """KVs as gguf-py's GGUFReader sees them, in file order, ready for write_gguf."""
    r = gguf.GGUFReader(path)
    out = []
    for f in r.fields.values():
        if f.name.startswith("GGUF."):  # the reader's pseudo-fields for the header
            continue
        main = f.types[0]
        sub = f.types[-1] if main == VT.ARRAY else None
        value = f.contents()
        out.append((f.name, value, main, sub))
    return out


def read_tensors(path: os.PathLike[str] | str) -> list[tuple[str, np.ndarray, QT]]:
    r = gguf.GGUFReader(path)
    return [(t.name, np.array(t.data), t.tensor_type) for t in r.tensors]


def tensor_bytes(path: os.PathLike[str] | str) -> dict[str, bytes]:
    """name -> raw tensor bytes, via GGUFReader."""
    r = gguf.GGUFReader(path)
    return {t.name: np.ascontiguousarray(t.data).tobytes() for t in r.tensors}


def split_kvs(index: int, count: int, n_tensors: int) -> list[tuple[str, Any, VT, VT | None]]:
    """The three split keys in the order llama.cpp's gguf.cpp leaves them."""
    return [
        ("split.no", index, VT.UINT16, None),
        ("split.tensors.count", n_tensors, VT.INT32, None),
        ("split.count", count, VT.UINT16, None),
    ]


def without_split_keys(kvs: Sequence[tuple[str, Any, VT, VT | None]]) -> list[tuple[str, Any, VT, VT | None]]:
    return [kv for kv in kvs if not kv[0].startswith("split.")]


def dir_listing(d: os.PathLike[str] | str) -> set[str]:
    return set(os.listdir(d))
