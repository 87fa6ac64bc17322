"""lvllm_cli.gguf_tools.format against gguf-py's reader and writer on real files."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf_helpers import read_kvs, write_gguf, write_moe_model

from lvllm_cli.gguf_tools import CorruptGGUFError, NotGGUFError, TruncatedGGUFError, read_gguf
from lvllm_cli.gguf_tools.format import encode_metadata, ggml_n_dims, make_kv


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_moe_model(tmp_path_factory.mktemp("fmt") / "m.gguf", seed=11)


def test_reader_agrees_with_gguf_py(model):
    ours = read_gguf(model)
    ref = gguf.GGUFReader(model)
    assert [kv.key for kv in ours.kvs] == [k for k, *_ in read_kvs(model)]
    for kv, (key, value, vtype, sub) in zip(ours.kvs, read_kvs(model)):
        assert kv.vtype == vtype and kv.elem_type == sub, key
        if vtype == VT.ARRAY and sub != VT.STRING:
            np.testing.assert_array_equal(np.asarray(kv.value), np.asarray(value), err_msg=key)
        elif vtype in (VT.FLOAT32,):
            assert np.float32(kv.value) == np.float32(value), key
        else:
            assert kv.value == value, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for t, r in zip(ours.tensors, ref.tensors):
        assert t.type_id == int(r.tensor_type)
        assert list(t.shape) == [int(x) for x in r.shape]
        assert t.nbytes == int(r.n_bytes)
        assert ours.data_offset + t.offset == int(r.data_offset)
    assert ours.file_size == model.stat().st_size


def test_encode_metadata_reproduces_gguf_py_header(model):
    # gguf-py and ggml write the same canonical layout when no shape has trailing 1s
    f = read_gguf(model)
    raw = model.read_bytes()
    assert encode_metadata(f.kvs, f.tensors, f.alignment) == raw[: f.data_offset]


def test_ggml_n_dims_drops_trailing_ones():
    assert ggml_n_dims((64,)) == 1
    assert ggml_n_dims((64, 1)) == 1
    assert ggml_n_dims((64, 1, 1, 1)) == 1
    assert ggml_n_dims((64, 3, 1)) == 2
    assert ggml_n_dims((64, 1, 2)) == 3
    assert ggml_n_dims((1, 1, 1, 5)) == 4
    assert ggml_n_dims(()) == 1


def test_bools_are_normalised_like_ggml(tmp_path):
    p = write_gguf(tmp_path / "b.gguf", [("x.flag", True, VT.BOOL, None)], [("t", np.ones(32, np.float32), QT.F32)])
    raw = bytearray(p.read_bytes())
    # the bool byte follows the key "x.flag" and its type tag
    at = raw.index(b"x.flag") + len("x.flag") + 4
    assert raw[at] == 1
    raw[at] = 7
    p.write_bytes(bytes(raw))
    kv = read_gguf(p).get("x.flag")
    assert kv.value is True
    assert kv.encode() == make_kv("x.flag", VT.BOOL, True).encode()


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(NotGGUFError, match="not a GGUF file"):
        read_gguf(p)
    p.write_bytes(b"GG")
    with pytest.raises(NotGGUFError, match="only 2 bytes"):
        read_gguf(p)


@pytest.mark.parametrize("keep", [10, 100, 1500])
def test_truncated_metadata(model, tmp_path, keep):
    p = tmp_path / "t.gguf"
    p.write_bytes(model.read_bytes()[:keep])
    with pytest.raises(TruncatedGGUFError, match="ends"):
        read_gguf(p)


def test_truncated_tensor_data(model, tmp_path):
    p = tmp_path / "t.gguf"
    # the last tensor is padded, so cut into its bytes rather than the padding
    f = read_gguf(model)
    last = f.tensors[-1]
    end = f.data_offset + last.offset + last.nbytes
    p.write_bytes(model.read_bytes()[: end - 1])
    with pytest.raises(TruncatedGGUFError, match="1 bytes missing"):
        read_gguf(p)


def test_bad_alignment_type_and_value(tmp_path):
    t = [("t", np.ones(32, np.float32), QT.F32)]
    p = write_gguf(tmp_path / "a.gguf", [("general.alignment", 64, VT.UINT64, None)], t)
    with pytest.raises(CorruptGGUFError, match="must be a u32"):
        read_gguf(p)
    p = write_gguf(tmp_path / "b.gguf", [("general.alignment", 48, VT.UINT32, None)], t)
    with pytest.raises(CorruptGGUFError, match="not a power of two"):
        read_gguf(p)


def test_unknown_tensor_type_and_bad_offset(tmp_path):
    p = write_gguf(tmp_path / "u.gguf", [], [("a", np.ones(32, np.float32), QT.F32), ("b", np.ones(8, np.float32), QT.F32)])
    f = read_gguf(p)
    raw = bytearray(p.read_bytes())
    # tensor info of "a": name, n_dims=1, ne[0], type (i32), offset (u64)
    name_a = struct.pack("<Q", 1) + b"a"
    at = raw.index(name_a) + len(name_a) + 4 + 8
    assert struct.unpack_from("<i", raw, at)[0] == QT.F32
    bad = bytearray(raw)
    struct.pack_into("<i", bad, at, 999)
    p.write_bytes(bytes(bad))
    with pytest.raises(CorruptGGUFError, match="type id 999"):
        read_gguf(p)
    bad = bytearray(raw)
    name_b = struct.pack("<Q", 1) + b"b"
    at_b = raw.index(name_b) + len(name_b) + 4 + 8 + 4
    assert struct.unpack_from("<Q", raw, at_b)[0] == f.tensors[1].offset == 128
    struct.pack_into("<Q", bad, at_b, 96)
    p.write_bytes(bytes(bad))
    with pytest.raises(CorruptGGUFError, match="offset 96, expected 128"):
        read_gguf(p)
