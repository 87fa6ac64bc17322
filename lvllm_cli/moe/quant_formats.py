"""Checkpoint formats of quantized experts -> lk_moe's canonical quantized form.

The engine takes, per expert projection of shape [out, in] (gate/up: [I, H],
down: [H, I]):
  codes   int4: int8 [out, in] with values in [-8, 7]   (w = code * scale)
          fp8:  uint8 [out, in], the e4m3 bytes
  scales  float32 [out, groups], groups = ceil(in / G) (G = 0: one per row)

Converters (one per published packing, symmetric int4 only; each refuses what
it cannot represent with a message naming the tensor and the format):
  from_compressed_tensors_int4  weight_packed int32 [out, ceil(in/8)] (code+8 in
                                nibble k%8 of word k//8), weight_scale [out, in/G]
  from_gptq_int4                qweight int32 [in/8, out] (nibble k%8 of row k//8),
                                qzeros int32 [in/G, out/8], scales [in/G, out], g_idx
  from_awq_int4                 qweight int32 [in, out/8] (nibble i holds column
                                8j + AWQ_ORDER[i]), qzeros likewise, scales [in/G, out]
  from_fp8                      weight e4m3 [out, in], block scales
                                [ceil(out/bo), ceil(in/bi)], per-channel [out, 1] or per-tensor
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a word holds column 8j + AWQ_ORDER[i]


class UnsupportedQuantization(ValueError):
    """A checkpoint tensor in a form lk_moe cannot run; the message says which and why."""


@dataclass
class Quantized:
    codes: np.ndarray  # int8 (int4 values) or uint8 (fp8 bytes), [out, in]
    scales: np.ndarray  # float32 [out, groups]
    group: int  # 0: one scale per row
    kind: str  # "int4" or "fp8"


def _np(a, what: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch
        t = a.detach().cpu()
        if str(t.dtype).startswith("torch.float8"):
            t = t.view(__import__("torch").uint8)
        elif str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(a)


def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 [..., n] -> uint8 [..., n, 8]: nibble i is bits 4i..4i+3."""
    w = words.astype(np.uint32)
    return ((w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).astype(np.uint8)


def _check_group(group: int, n_in: int, name: str) -> int:
    if group in (-1, 0) or group >= n_in:
        return 0
    if group % 32:
        raise UnsupportedQuantization(f"{name}: group size {group} is not a multiple of 32 (lk_moe's k-pairs and panels)")
    return group


def from_compressed_tensors_int4(weight_packed, weight_scale, shape, *, group: int, name: str = "weight") -> Quantized:
    """compressed-tensors pack-quantized, 4 bits, symmetric (no zero point)."""
    packed = _np(weight_packed, name).astype(np.int32)
    n_out, n_in = (int(v) for v in _np(shape, name).reshape(-1)[-2:])
    if packed.shape != (n_out, (n_in + 7) // 8):
        raise UnsupportedQuantization(f"{name}: weight_packed has shape {packed.shape}, expected {(n_out, (n_in + 7) // 8)} for {n_out}x{n_in}")
    codes = (_nibbles(packed).reshape(n_out, -1)[:, :n_in].astype(np.int16) - 8).astype(np.int8)
    return _with_scales(codes, weight_scale, group, n_out, n_in, name, transpose=False)


def _with_scales(codes, scales, group, n_out, n_in, name, *, transpose: bool) -> Quantized:
    s = _np(scales, name).astype(np.float32)
    if transpose:
        s = s.T
    g = _check_group(group, n_in, name)
    want = (n_out, (n_in + g - 1) // g if g else 1)
    if s.shape != want:
        raise UnsupportedQuantization(f"{name}: scales have shape {s.shape}, expected {want} (group {group or 'per channel'})")
    return Quantized(np.ascontiguousarray(codes), np.ascontiguousarray(s), g, "int4")


_SYMMETRIC_FIX = ("lk_moe runs symmetric int4 only: use a symmetric checkpoint (GPTQ sym=true, or compressed-tensors "
                  "pack-quantized with symmetric weights) or keep these layers on the GPU with LVLLM_GPU_LAYERS")


def _check_packed(a: np.ndarray, want: tuple[int, int], tensor: str, fmt: str) -> None:
    if a.shape != want:
        raise UnsupportedQuantization(f"{tensor}: {fmt} tensor of shape {a.shape}, expected {want}")


def _zero_groups(group: int, n_in: int, name: str) -> int:
    """Rows of qzeros / scales: one per group along the input (one when per channel)."""
    g = _check_group(group, n_in, name)
    return -(-n_in // g) if g else 1


def _check_midpoint(zeros: np.ndarray, tensor: str, fmt: str) -> None:
    """Symmetric int4 stores code + 8: every zero point must be that midpoint, 8."""
    off = np.argwhere(zeros != 8)
    if len(off):
        (r, c), v = off[0], int(zeros[tuple(off[0])])
        raise UnsupportedQuantization(
            f"{tensor}: {fmt} zero point {v} at group {r}, column {c} ({len(off)} of {zeros.size} are not 8: an "
            f"asymmetric checkpoint); {_SYMMETRIC_FIX}")


def from_gptq_int4(qweight, qzeros, scales, g_idx=None, *, group: int, v2: bool = False, shape=None,
                   name: str = "weight") -> Quantized:
    """AutoGPTQ, 4 bits, symmetric, no activation reordering (desc_act=False). `shape` (out, in), when
    given, is checked against qweight; v1 checkpoints store zero - 1 (7), gptq_v2 ones the zero (8)."""
    qw = _np(qweight, name).astype(np.int32)
    n_in, n_out = qw.shape[0] * 8, qw.shape[1]
    if shape is not None:
        n_out, n_in = shape
        _check_packed(qw, (n_in // 8, n_out), f"{name}.qweight", "GPTQ")
    codes_u = _nibbles(qw).transpose(0, 2, 1).reshape(n_in, n_out)  # [in, out]
    g = _check_group(group, n_in, name)
    if g_idx is not None:
        gi = _np(g_idx, name).astype(np.int64)
        if not np.array_equal(gi, np.arange(n_in) // (g or n_in)):
            raise UnsupportedQuantization(f"{name}.g_idx: GPTQ with activation reordering (desc_act) is not supported "
                                          "on the CPU: use a checkpoint quantized with desc_act=false or keep these "
                                          "layers on the GPU with LVLLM_GPU_LAYERS")
    qz = _np(qzeros, name).astype(np.int32)
    _check_packed(qz, (_zero_groups(group, n_in, name), n_out // 8), f"{name}.qzeros", "GPTQ")
    zeros = _nibbles(qz).reshape(-1, n_out).astype(np.int16) + (0 if v2 else 1)
    _check_midpoint(zeros, f"{name}.qzeros", "GPTQ" + (" (v2)" if v2 else " (stored as zero - 1)"))
    codes = (codes_u.astype(np.int16) - 8).astype(np.int8).T
    return _with_scales(codes, scales, g, n_out, n_in, name, transpose=True)


def from_awq_int4(qweight, qzeros, scales, *, group: int, shape=None, name: str = "weight") -> Quantized:
    """AutoAWQ GEMM packing; only checkpoints whose zero points are all 8 (symmetric) are accepted.
    `shape` (out, in), when given, is checked against qweight."""
    qw = _np(qweight, name).astype(np.int32)
    n_in, n_out = qw.shape[0], qw.shape[1] * 8
    if shape is not None:
        n_out, n_in = shape
        _check_packed(qw, (n_in, n_out // 8), f"{name}.qweight", "AWQ")

    def unpack(words):
        nib = _nibbles(words)  # [rows, out/8, 8]: nibble i
        out = np.empty(nib.shape, dtype=np.uint8)
        out[..., list(AWQ_ORDER)] = nib
        return out.reshape(words.shape[0], -1)

    qz = _np(qzeros, name).astype(np.int32)
    _check_packed(qz, (_zero_groups(group, n_in, name), n_out // 8), f"{name}.qzeros", "AWQ")
    _check_midpoint(unpack(qz), f"{name}.qzeros", "AWQ")
    codes = (unpack(qw).astype(np.int16) - 8).astype(np.int8).T  # [out, in]
    return _with_scales(codes, scales, group, n_out, n_in, name, transpose=True)


def from_fp8(weight, scale, *, block: tuple[int, int] | None, name: str = "weight") -> Quantized:
    """e4m3 weights with block scales (block=(bo, bi), e.g. (128, 128)), per-channel [out, 1] or per-tensor."""
    w = _np(weight, name)
    if w.dtype != np.uint8:
        raise UnsupportedQuantization(f"{name}: expected float8_e4m3fn weights, got {w.dtype}")
    n_out, n_in = w.shape
    s = _np(scale, name).astype(np.float32)
    if block is not None:
        bo, bi = block
        if bi % 32:
            raise UnsupportedQuantization(f"{name}: fp8 block {block}: the input block must be a multiple of 32")
        want = ((n_out + bo - 1) // bo, (n_in + bi - 1) // bi)
        if s.shape != want:
            raise UnsupportedQuantization(f"{name}: block scales have shape {s.shape}, expected {want} for block {block}")
        rows = np.repeat(s, bo, axis=0)[:n_out]
        return Quantized(np.ascontiguousarray(w), np.ascontiguousarray(rows), bi if bi < n_in else 0, "fp8")
    if s.size == 1:
        rows = np.full((n_out, 1), float(s.reshape(-1)[0]), dtype=np.float32)
    elif s.reshape(-1).shape[0] == n_out:
        rows = s.reshape(n_out, 1)
    else:
        raise UnsupportedQuantization(f"{name}: fp8 scale of shape {s.shape} is neither per-tensor nor per-channel for {n_out} rows")
    return Quantized(np.ascontiguousarray(w), np.ascontiguousarray(rows), 0, "fp8")


def dequantize(q: Quantized) -> np.ndarray:
    """float32 [out, in]: the weights the engine computes with (for bf16-at-load and for tests)."""
    if q.kind == "int4":
        vals = q.codes.astype(np.float32)
    else:
        b = q.codes.astype(np.int32)
        e, m = (b >> 3) & 15, b & 7
        mag = np.where(e == 0, m / 512.0, (1.0 + m / 8.0) * np.exp2(e - 7.0))
        vals = np.where(b & 0x80, -mag, mag).astype(np.float32)
    n_in = q.codes.shape[1]
    g = q.group or n_in
    return vals * np.repeat(q.scales, g, axis=1)[:, :n_in]
