"""The GGUF byte layout: read a file's metadata (never its tensor data) and
encode metadata exactly the way ggml's `gguf.cpp` writes it.

Why a reader of our own rather than `gguf.GGUFReader`: merging and splitting
must re-emit the key/value section byte for byte as llama.cpp does, name the
exact file and byte when a shard is damaged, and stay fast on 150k-token
vocabularies. GGUFReader memory-maps the file and builds a numpy view per
field part, and fails on damaged files with generic numpy errors. The gguf
package still supplies the type tables (value types, ggml block sizes), and
the tests check this reader against GGUFReader on the same files.

The rules followed here are those of ggml/src/gguf.cpp in llama.cpp (see
docs/notes/gguf.md for the revision): version 2 and 3 files are read, version
3 is written; `general.alignment` must be a u32 power of two (default 32);
tensor offsets must be the running sum of sizes padded to the alignment;
bools are normalised to 0/1 on write; a tensor's dimension count is written
as `ggml_n_dims` (trailing dimensions of size 1 dropped).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import CorruptGGUFError, NotGGUFError, TruncatedGGUFError

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # what ggml writes, whatever it read
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # ggml refuses tensor names of this length or more

KEY_ALIGNMENT = "general.alignment"
KEY_ARCHITECTURE = "general.architecture"
KEY_SPLIT_NO = "split.no"
KEY_SPLIT_COUNT = "split.count"
KEY_SPLIT_TENSORS_COUNT = "split.tensors.count"
SPLIT_KEYS = (KEY_SPLIT_NO, KEY_SPLIT_COUNT, KEY_SPLIT_TENSORS_COUNT)

VT = GGUFValueType

# struct formats of the fixed-size value types (little-endian is added at use)
_SCALAR_FMT = {
    VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h",
    VT.UINT32: "I", VT.INT32: "i", VT.FLOAT32: "f", VT.UINT64: "Q",
    VT.INT64: "q", VT.FLOAT64: "d", VT.BOOL: "b",
}
_NUMPY_DTYPE = {
    VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2",
    VT.UINT32: "<u4", VT.INT32: "<i4", VT.FLOAT32: "<f4", VT.UINT64: "<u8",
    VT.INT64: "<i8", VT.FLOAT64: "<f8", VT.BOOL: "<i1",
}
# the names ggml uses for value types (gguf_type_name)
VALUE_TYPE_NAMES = {
    VT.UINT8: "u8", VT.INT8: "i8", VT.UINT16: "u16", VT.INT16: "i16",
    VT.UINT32: "u32", VT.INT32: "i32", VT.FLOAT32: "f32", VT.BOOL: "bool",
    VT.STRING: "str", VT.ARRAY: "arr", VT.UINT64: "u64", VT.INT64: "i64",
    VT.FLOAT64: "f64",
}

_REDOWNLOAD = "the file is incomplete or damaged (interrupted download or copy?); fetch it again"


def pad(n: int, alignment: int) -> int:
    """`n` rounded up to a multiple of `alignment` (GGML_PAD)."""
    return (n + alignment - 1) // alignment * alignment


def ggml_n_dims(shape: Sequence[int]) -> int:
    """Dimension count as ggml writes it: trailing dimensions of 1 are dropped."""
    ne = list(shape) + [1] * (GGML_MAX_DIMS - len(shape))
    for i in range(GGML_MAX_DIMS - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type{type_id}"


def tensor_nbytes(shape: Sequence[int], type_id: int) -> int:
    """Bytes of a contiguous tensor (ggml_nbytes); shape in ggml order (ne)."""
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    ne = tuple(shape) or (1,)  # a 0-d tensor holds one element
    if any(n <= 0 for n in ne):
        return 0
    rows = 1
    for n in ne[1:]:
        rows *= n
    return ne[0] // block * type_size * rows


def _encode_str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _to_bytes(s: str) -> bytes:
    # surrogateescape: names that are not valid UTF-8 still round-trip exactly
    return s.encode("utf-8", "surrogateescape")


def _to_str(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class KV:
    """One metadata entry. `payload` is the canonical encoding of everything
    after the key and the type tag; `value` is the decoded form for display."""

    key: str
    vtype: GGUFValueType  # VT.ARRAY for arrays
    value: Any  # int/float/bool/str, or list[str] / numpy array for arrays
    payload: bytes
    elem_type: GGUFValueType | None = None

    def encode(self) -> bytes:
        return _encode_str(_to_bytes(self.key)) + struct.pack("<i", int(self.vtype)) + self.payload

    @property
    def type_name(self) -> str:
        if self.vtype == VT.ARRAY:
            return f"arr[{VALUE_TYPE_NAMES[self.elem_type]}]"
        return VALUE_TYPE_NAMES[self.vtype]


def make_kv(key: str, vtype: GGUFValueType, value: Any) -> KV:
    """A scalar KV (number, bool or string) encoded as ggml would."""
    if vtype == VT.STRING:
        return KV(key, vtype, value, _encode_str(_to_bytes(value)))
    if vtype == VT.BOOL:
        return KV(key, vtype, bool(value), struct.pack("<b", 1 if value else 0))
    if vtype not in _SCALAR_FMT:
        raise ValueError(f"make_kv: {vtype!r} is not a scalar type")
    return KV(key, vtype, value, struct.pack("<" + _SCALAR_FMT[vtype], value))


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous dimension (ne[0])
    type_id: int
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata, checked the way llama.cpp checks it on load."""

    path: Path
    version: int
    kvs: tuple[KV, ...]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int  # absolute file offset of the tensor data section
    file_size: int

    def get(self, key: str) -> KV | None:
        for kv in self.kvs:
            if kv.key == key:
                return kv
        return None

    def value(self, key: str, default: Any = None) -> Any:
        kv = self.get(key)
        return default if kv is None else kv.value

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class _Cursor:
    """Bounds-checked little-endian reads from a buffer, with errors naming the file."""

    def __init__(self, buf: Any, path: Path):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise TruncatedGGUFError(
                f"{self.path}: the file ends (at byte {self.size}) in the middle of {what}, which needs bytes "
                f"{self.pos}..{self.pos + n}",
                _REDOWNLOAD,
            )

    def take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(b)

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self._need(n, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", f"the length of {what}")
        return self.take(n, what)


def _corrupt(path: Path, what: str) -> CorruptGGUFError:
    return CorruptGGUFError(f"{path}: {what}", _REDOWNLOAD)


def _read_kv(cur: _Cursor, path: Path, index: int) -> KV:
    key_b = cur.string(f"the key of metadata entry {index}")
    if not key_b:
        raise _corrupt(path, f"metadata entry {index} has an empty key")
    key = _to_str(key_b)
    raw_type = cur.unpack("i", f"the type of metadata key '{key}'")
    try:
        vtype = VT(raw_type)
    except ValueError:
        raise _corrupt(path, f"metadata key '{key}' has unknown value type {raw_type}") from None

    if vtype == VT.STRING:
        s = cur.string(f"the value of metadata key '{key}'")
        return KV(key, vtype, _to_str(s), _encode_str(s))
    if vtype != VT.ARRAY:
        b = cur.take(struct.calcsize(_SCALAR_FMT[vtype]), f"the value of metadata key '{key}'")
        if vtype == VT.BOOL:
            return make_kv(key, vtype, b[0] != 0)
        (v,) = struct.unpack("<" + _SCALAR_FMT[vtype], b)
        return KV(key, vtype, v, b)

    raw_elem = cur.unpack("i", f"the element type of metadata key '{key}'")
    try:
        elem = VT(raw_elem)
    except ValueError:
        raise _corrupt(path, f"metadata key '{key}' is an array of unknown type {raw_elem}") from None
    if elem == VT.ARRAY:
        raise _corrupt(path, f"metadata key '{key}' is an array of arrays, which llama.cpp cannot read")
    n = cur.unpack("Q", f"the length of metadata array '{key}'")
    head = struct.pack("<iQ", int(elem), n)
    what = f"the value of metadata array '{key}' ({n} elements)"
    if elem == VT.STRING:
        # each string needs at least its 8-byte length: refuse absurd counts before looping
        cur._need(8 * n, what)
        items = [cur.string(what) for _ in range(n)]
        payload = head + b"".join(_encode_str(s) for s in items)
        return KV(key, vtype, [_to_str(s) for s in items], payload, elem)
    dtype = np.dtype(_NUMPY_DTYPE[elem])
    raw = cur.take(dtype.itemsize * n, what)
    arr = np.frombuffer(raw, dtype=dtype)
    if elem == VT.BOOL:
        arr = arr != 0
        raw = arr.astype("<i1").tobytes()
    return KV(key, vtype, arr, head + raw, elem)


def _read_tensor_info(cur: _Cursor, path: Path, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name_b = cur.string(f"the name of tensor {index}")
    name = _to_str(name_b)
    if len(name_b) >= GGML_MAX_NAME:
        raise _corrupt(path, f"tensor name '{name}' is {len(name_b)} bytes; llama.cpp allows at most {GGML_MAX_NAME - 1}")
    n_dims = cur.unpack("I", f"the dimension count of tensor '{name}'")
    if n_dims > GGML_MAX_DIMS:
        raise _corrupt(path, f"tensor '{name}' has {n_dims} dimensions; ggml allows at most {GGML_MAX_DIMS}")
    shape = tuple(cur.unpack("q", f"the shape of tensor '{name}'") for _ in range(n_dims))
    if any(n < 0 for n in shape):
        raise _corrupt(path, f"tensor '{name}' has a negative dimension {shape}")
    type_id = cur.unpack("i", f"the type of tensor '{name}'")
    try:
        block, _ = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        import gguf

        raise CorruptGGUFError(
            f"{path}: tensor '{name}' has ggml type id {type_id}, unknown to the installed gguf package "
            f"({getattr(gguf, '__version__', 'unknown version')})",
            "upgrade it: pip install -U gguf",
        ) from None
    row = shape[0] if shape else 1
    if row % block != 0:
        raise _corrupt(path, f"tensor '{name}' ({type_name(type_id)}) has rows of {row} elements, "
                             f"not a multiple of the block size {block}")
    offset = cur.unpack("Q", f"the data offset of tensor '{name}'")
    return name, shape, type_id, offset


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and check the metadata of a GGUF file; tensor data is never read.

    Raises NotGGUFError, CorruptGGUFError or TruncatedGGUFError with a
    message that names the file and the problem; OSError if unreadable.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 4:
            raise NotGGUFError(f"{path} is not a GGUF file (it is only {size} bytes long)",
                               "check the path; lvllm gguf reads .gguf model files")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path, size)


def _parse(buf: Any, path: Path, size: int) -> GGUFFile:
    cur = _Cursor(buf, path)
    magic = cur.take(4, "the magic")
    if magic != GGUF_MAGIC:
        raise NotGGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                           "check the path; lvllm gguf reads .gguf model files")
    version = cur.unpack("I", "the version")
    if version != 0 and version & 0xFFFF == 0:
        raise CorruptGGUFError(f"{path} is a big-endian GGUF", "llama.cpp and lvllm read little-endian GGUF only")
    if version in (0, 1) or version > GGUF_VERSION:
        raise CorruptGGUFError(f"{path} is GGUF version {version}; versions 2 and 3 are supported",
                               "convert it with a current llama.cpp or gguf-py")
    n_tensors = cur.unpack("q", "the tensor count")
    n_kv = cur.unpack("q", "the metadata count")
    # every entry takes well over one byte, so counts beyond the file size are corruption
    if not 0 <= n_tensors <= size or not 0 <= n_kv <= size:
        raise _corrupt(path, f"impossible header counts ({n_tensors} tensors, {n_kv} metadata entries)")

    kvs: list[KV] = []
    seen: set[str] = set()
    for i in range(n_kv):
        kv = _read_kv(cur, path, i)
        if kv.key in seen:
            raise _corrupt(path, f"metadata key '{kv.key}' appears twice")
        seen.add(kv.key)
        kvs.append(kv)

    alignment = DEFAULT_ALIGNMENT
    for kv in kvs:
        if kv.key == KEY_ALIGNMENT:
            if kv.vtype != VT.UINT32:
                raise _corrupt(path, f"'{KEY_ALIGNMENT}' must be a u32 but is a {kv.type_name}")
            alignment = kv.value
            if alignment == 0 or alignment & (alignment - 1):
                raise _corrupt(path, f"'{KEY_ALIGNMENT}' is {alignment}, not a power of two")

    raw_infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        info = _read_tensor_info(cur, path, i)
        if info[0] in names:
            raise _corrupt(path, f"tensor '{info[0]}' appears twice")
        names.add(info[0])
        raw_infos.append(info)

    data_offset = pad(cur.pos, alignment) if n_tensors else cur.pos
    tensors = []
    expected = 0
    for name, shape, type_id, offset in raw_infos:
        if offset != expected:
            raise _corrupt(path, f"tensor '{name}' has data offset {offset}, expected {expected} "
                                 f"(sizes padded to the alignment of {alignment})")
        nbytes = tensor_nbytes(shape, type_id)
        tensors.append(TensorInfo(name, shape, type_id, offset, nbytes))
        expected += pad(nbytes, alignment)

    if tensors:
        end = data_offset + tensors[-1].offset + tensors[-1].nbytes
        if end > size:
            raise TruncatedGGUFError(
                f"{path} is truncated: it is {size} bytes but its tensor data ends at byte {end} "
                f"({end - size} bytes missing)",
                _REDOWNLOAD,
            )
    return GGUFFile(path, version, tuple(kvs), tuple(tensors), alignment, data_offset, size)


def data_offsets(nbytes: Iterable[int], alignment: int) -> list[int]:
    """Offsets of consecutive tensors in a data section (gguf_add_tensor)."""
    offsets, at = [], 0
    for n in nbytes:
        offsets.append(at)
        at += pad(n, alignment)
    return offsets


def encode_metadata(kvs: Sequence[KV], tensors: Sequence[TensorInfo], alignment: int) -> bytes:
    """Header, KVs and tensor infos padded to `alignment`: the bytes that
    precede the data section, as gguf_get_meta_data returns them. Tensor
    offsets are recomputed for the given order; `TensorInfo.offset` is ignored."""
    out = bytearray(GGUF_MAGIC)
    out += struct.pack("<Iqq", GGUF_VERSION, len(tensors), len(kvs))
    for kv in kvs:
        out += kv.encode()
    for t, offset in zip(tensors, data_offsets((t.nbytes for t in tensors), alignment)):
        n_dims = ggml_n_dims(t.shape)
        ne = list(t.shape) + [1] * (GGML_MAX_DIMS - len(t.shape))
        out += _encode_str(_to_bytes(t.name))
        out += struct.pack(f"<I{n_dims}q", n_dims, *ne[:n_dims])
        out += struct.pack("<iQ", t.type_id, offset)
    out += bytes(pad(len(out), alignment) - len(out))
    return bytes(out)


def output_size(meta_len: int, tensors: Sequence[TensorInfo], alignment: int) -> int:
    """Total file size: metadata, then each tensor padded to the alignment."""
    return meta_len + sum(pad(t.nbytes, alignment) for t in tensors)
