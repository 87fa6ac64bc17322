"""Independent float64 reference for fused MoE experts, and random test data.

The reference follows vLLM's fused_experts definition directly in NumPy; it
shares no code with the engine.
"""

from __future__ import annotations

import numpy as np
import torch


def bf16_round(v):
    return torch.from_numpy(np.asarray(v, dtype=np.float32)).to(torch.bfloat16).double().numpy()


def int8_blocks(v, block=16):
    """Symmetric int8 with one scale per `block` values along the last axis (zero-padded), the
    rounding the engine's int8-activation kernels apply: scale = max|v| / 127, codes rounded to
    nearest even; returns the values the codes stand for."""
    v = np.asarray(v, dtype=np.float64)
    n = v.shape[-1]
    padded = np.zeros(v.shape[:-1] + (-(-n // block) * block,))
    padded[..., :n] = v
    b = padded.reshape(v.shape[:-1] + (-1, block)).astype(np.float32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint(b * inv), -128, 127)
    return (codes * (amax / np.float32(127)).astype(np.float64)).reshape(padded.shape)[..., :n]


def reference_moe(x, w13, w2, topk_ids, topk_weights, *, int8_below=0):
    """out[m] = sum_j w[m,j] * w2[e] @ (silu(gate_e @ x[m]) * (up_e @ x[m])), all in float64.
    int8_below: experts routed fewer tokens than this see x (as bf16, the format those kernels
    read) and h rounded by int8_blocks first."""
    x = np.asarray(x, dtype=np.float64)
    w13 = np.asarray(w13, dtype=np.float64)
    w2 = np.asarray(w2, dtype=np.float64)
    ids = np.asarray(topk_ids)
    tw = np.asarray(topk_weights, dtype=np.float64)
    M, H = x.shape
    I = w2.shape[2]
    out = np.zeros((M, H))
    for e in np.unique(ids):
        rows, slots = np.nonzero(ids == e)
        q8 = len(rows) < int8_below
        gu = (int8_blocks(bf16_round(x[rows])) if q8 else x[rows]) @ w13[e].T
        g, u = gu[:, :I], gu[:, I:]
        h = g / (1.0 + np.exp(-g)) * u
        np.add.at(out, rows, ((int8_blocks(h) if q8 else h) @ w2[e].T) * tw[rows, slots][:, None])
    return out


# Experts routed at least this many tokens dequantize the panel and run on bf16 activations (engine.cpp).
DEQUANT_ROWS = 32


def layer_reference(layer, x, w13, w2, topk_ids, topk_weights):
    """The float64 reference a quantized layer must match and the tolerance of rel_err: int8
    activations are emulated where the layer runs on them (int4 with VNNI), so a loading or
    packing error shows at the same 0.5-1 % scale either way."""
    if layer.int8_activations:
        return reference_moe(x, w13, w2, topk_ids, topk_weights, int8_below=DEQUANT_ROWS), 5e-3
    return reference_moe(x, w13, w2, topk_ids, topk_weights), 1e-2


def random_problem(M, k, E, H, I, *, seed, wdtype=torch.bfloat16, xdtype=torch.bfloat16):
    """Weights scaled like a trained layer (outputs of order 1), distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(wdtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(wdtype)
    x = torch.randn(M, H, generator=g).to(xdtype)
    ids = torch.argsort(torch.rand(M, E, generator=g), dim=1)[:, :k].to(torch.int32).contiguous()
    tw = torch.rand(M, k, generator=g, dtype=torch.float32)
    return x, w13, w2, ids, tw


def e4m3_ref(b: np.ndarray) -> np.ndarray:
    """e4m3fn decoding written from the format's definition (bias 7, subnormals 2^-6 * m/8)."""
    b = b.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 15, b & 7
    return sign * np.where(e == 0, m / 8.0 * 2.0**-6, (1.0 + m / 8.0) * 2.0 ** (e - 7.0))


def pack_words(nibbles: np.ndarray) -> np.ndarray:
    """[..., 8] nibbles -> int32 words, nibble i at bits 4i."""
    words = np.zeros(nibbles.shape[:-1], dtype=np.uint64)
    for i in range(8):
        words |= nibbles[..., i].astype(np.uint64) << np.uint64(4 * i)
    return words.astype(np.uint32).view(np.int32)


def pack_nibbles_ct(codes: np.ndarray) -> np.ndarray:
    """compressed-tensors pack-quantized from its published layout: code + 8 in nibble k % 8 of
    int32 word k // 8 along the input dimension (zero-padded to a whole word)."""
    out, n_in = codes.shape
    nib = np.zeros((out, -(-n_in // 8) * 8), dtype=np.int64)
    nib[:, :n_in] = codes.astype(np.int64) + 8
    return pack_words(nib.reshape(out, -1, 8))


def as_f64(t):
    return t.to(torch.float64).numpy()


def rel_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


AUTOAWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: nibble i of a word <- column 8j + order[i]


def pack_gptq(codes: np.ndarray) -> np.ndarray:
    """AutoGPTQ qweight from its published layout, for codes [out, in] in [-8, 7] (symmetric, stored as
    code + 8): int32 [in/8, out], nibble i of row r = input 8r + i."""
    out, n_in = codes.shape
    qu = (codes.T.astype(np.int64) + 8).reshape(n_in // 8, 8, out).transpose(0, 2, 1)  # [in/8, out, nibble]
    return pack_words(qu)


def pack_gptq_zeros(zeros: np.ndarray) -> np.ndarray:
    """[groups, out] stored zero points (v1 stores zero - 1: 7 for symmetric; gptq_v2 the zero, 8) ->
    GPTQ qzeros int32 [groups, out/8], nibble i of word j = column 8j + i."""
    g, out = zeros.shape
    return pack_words(zeros.reshape(g, out // 8, 8))


def pack_awq(codes: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM qweight from its published layout, for codes [out, in] in [-8, 7] stored as code + 8 (zero
    point 8): int32 [in, out/8], nibble i of word j in row k = column 8j + AUTOAWQ_PACK_ORDER[i] of input k."""
    out, n_in = codes.shape
    qu = (codes.T.astype(np.int64) + 8).reshape(n_in, out // 8, 8)
    return pack_words(qu[..., list(AUTOAWQ_PACK_ORDER)])


def pack_awq_zeros(zeros: np.ndarray) -> np.ndarray:
    """[groups, out] zero points -> AWQ qzeros int32 [groups, out/8], in AWQ's nibble order."""
    g, out = zeros.shape
    return pack_words(zeros.reshape(g, out // 8, 8)[..., list(AUTOAWQ_PACK_ORDER)])
