"""split and merge on real GGUF files, against byte-exact references built
with gguf-py's GGUFWriter from llama.cpp's rules (see docs/notes/gguf.md)."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf_helpers import (dir_listing, read_kvs, read_tensors, split_kvs, tensor_bytes, without_split_keys,
                          write_gguf, write_moe_model)
from hypothesis import given, settings
from hypothesis import strategies as st

from lvllm_cli.gguf_tools import SplitPlanError, group_tensors, merge, read_gguf, split, validate_shards
from lvllm_cli.gguf_tools.copyio import Copier
from lvllm_cli.gguf_tools.format import pad


@pytest.fixture()
def model(tmp_path):
    return write_moe_model(tmp_path / "model.gguf", seed=int(np.random.default_rng().integers(1 << 30)))


def shard_names(prefix, n):
    return [prefix.with_name(f"{prefix.name}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


def expected_shards(model, groups, tmp_path):
    """Write, with GGUFWriter, the shards llama-gguf-split would write for these groups."""
    kvs, tensors = read_kvs(model), read_tensors(model)
    n = len(groups)
    paths = []
    for i, group in enumerate(groups):
        own = without_split_keys(kvs) if i == 0 else []
        p = tmp_path / f"expected-{i}.gguf"
        write_gguf(p, own + split_kvs(i, n, len(tensors)), [tensors[j] for j in group])
        paths.append(p)
    return paths


@pytest.mark.parametrize("max_tensors", [1, 6, 8, 27, 100])
def test_split_by_tensor_count_matches_llama_cpp_layout(model, tmp_path, max_tensors):
    n_tensors = len(read_tensors(model))
    result = split(model, tmp_path / "out", max_tensors=max_tensors)
    # llama.cpp: a new shard at every i > 0 with i % max_tensors == 0
    groups = [list(range(s, min(s + max_tensors, n_tensors))) for s in range(0, n_tensors, max_tensors)]
    assert list(result.outputs) == shard_names(tmp_path / "out", len(groups))
    for got, want in zip(result.outputs, expected_shards(model, groups, tmp_path)):
        assert got.read_bytes() == want.read_bytes(), got.name


def test_merge_is_byte_exact_against_independent_reference(model, tmp_path):
    result = split(model, tmp_path / "s", max_tensors=5)
    merged = merge(result.outputs[0], tmp_path / "merged.gguf")
    kvs, tensors = read_kvs(model), read_tensors(model)
    # llama.cpp: first shard's KVs; setting split.count to 0 moves it to the end
    ref = write_gguf(tmp_path / "ref.gguf", kvs + split_kvs(0, 0, len(tensors)), tensors)
    assert merged.output.read_bytes() == ref.read_bytes()
    assert merged.tensors == len(tensors) and merged.shards == len(result.outputs)
    assert merged.bytes_written == ref.stat().st_size


def test_round_trip_reproduces_tensors_and_metadata(model, tmp_path):
    result = split(model, tmp_path / "s", max_size=100_000)
    assert len(result.outputs) > 3
    for p in result.outputs:  # gguf-py reads every shard
        r = gguf.GGUFReader(p)
        assert r.fields["split.count"].contents() == len(result.outputs)
    out = merge(result.outputs[0]).output
    assert out == tmp_path / "s.gguf"
    assert tensor_bytes(out) == tensor_bytes(model)
    assert list(tensor_bytes(out)) == list(tensor_bytes(model))  # same order
    assert without_split_keys(read_kvs(out)) == read_kvs(model)


def test_resplitting_a_merged_file_gives_identical_shards(model, tmp_path):
    first = split(model, tmp_path / "a", max_tensors=7)
    merged = merge(first.outputs[0], tmp_path / "m.gguf").output
    again = split(merged, tmp_path / "b", max_tensors=7)
    assert [p.read_bytes() for p in again.outputs] == [p.read_bytes() for p in first.outputs]


def test_size_split_is_llama_cpp_greedy(model, tmp_path):
    f = read_gguf(model)
    limit = 150_000
    result = split(model, tmp_path / "s", max_size=limit)
    shards = [read_gguf(p) for p in result.outputs]
    sizes = [[pad(t.nbytes, 32) for t in s.tensors] for s in shards]
    assert [t.name for s in shards for t in s.tensors] == [t.name for t in f.tensors]
    for i, s in enumerate(sizes):
        assert sum(s) <= limit or len(s) == 1
        if i + 1 < len(sizes):  # the next tensor did not fit
            assert sum(s) + sizes[i + 1][0] > limit


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=40), limit=st.integers(1, 12000),
       first_empty=st.booleans())
def test_group_tensors_by_size_properties(sizes, limit, first_empty):
    padded = [pad(s, 32) for s in sizes]
    if padded[0] > limit:
        # llama.cpp gives up when the very first tensor alone is over the limit
        with pytest.raises(SplitPlanError, match="alone"):
            group_tensors(sizes, max_size=limit, no_tensor_first_split=first_empty)
        return
    groups = group_tensors(sizes, max_size=limit, no_tensor_first_split=first_empty)
    if first_empty:
        assert groups[0] == []
        groups = groups[1:]
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    for g in groups:  # within the limit, unless a lone tensor is bigger than it
        assert g and (sum(padded[i] for i in g) <= limit or len(g) == 1)
    for a, b in zip(groups, groups[1:]):  # greedy: the next tensor did not fit
        assert sum(padded[i] for i in a) + padded[b[0]] > limit


@given(n=st.integers(0, 60), k=st.integers(1, 20))
def test_group_tensors_by_count(n, k):
    groups = group_tensors([1] * n, max_tensors=k)
    if n == 0:
        assert groups == [[]]  # llama.cpp still writes one (empty) shard
        return
    assert [i for g in groups for i in g] == list(range(n))
    assert all(len(g) == k for g in groups[:-1]) and 0 < len(groups[-1]) <= k


def test_no_tensor_first_split(model, tmp_path):
    result = split(model, tmp_path / "s", max_tensors=10, no_tensor_first_split=True)
    first = read_gguf(result.outputs[0])
    assert first.tensors == () and first.value("general.name") is not None
    n = len(read_tensors(model))
    groups = [[]] + [list(range(s, min(s + 10, n))) for s in range(0, n, 10)]
    for got, want in zip(result.outputs, expected_shards(model, groups, tmp_path)):
        assert got.read_bytes() == want.read_bytes()
    out = merge(result.outputs[0], tmp_path / "m.gguf").output
    assert tensor_bytes(out) == tensor_bytes(model)


def test_merges_shards_written_by_gguf_py(tmp_path):
    # convert_hf_to_gguf.py --split-max-tensors writes shards through GGUFWriter
    rng = np.random.default_rng(5)
    from gguf_helpers import moe_kvs, moe_tensors

    kvs, tensors = moe_kvs(rng, 2), moe_tensors(rng, 2)
    write_gguf(tmp_path / "hf.gguf", kvs, tensors, arch="qwen3moe", split_max_tensors=4)
    first = tmp_path / "hf-00001-of-00005.gguf"
    out = merge(first, tmp_path / "m.gguf").output
    ref_kvs = [("general.architecture", "qwen3moe", VT.STRING, None)] + kvs + split_kvs(0, 0, len(tensors))
    ref = write_gguf(tmp_path / "ref.gguf", ref_kvs, tensors)
    assert out.read_bytes() == ref.read_bytes()


def test_non_default_alignment_is_honoured(tmp_path):
    model = write_moe_model(tmp_path / "a64.gguf", seed=3, alignment=64)
    result = split(model, tmp_path / "s", max_tensors=8)
    for p in result.outputs:
        f = read_gguf(p)
        assert f.alignment == 64 and f.data_offset % 64 == 0
        gguf.GGUFReader(p)  # gguf-py accepts the layout
    out = merge(result.outputs[0], tmp_path / "m.gguf").output
    assert tensor_bytes(out) == tensor_bytes(model)
    assert read_gguf(out).alignment == 64


def test_trailing_unit_dimensions_are_written_like_ggml(tmp_path):
    # gguf-py writes ne=[64, 1] with n_dims=2; ggml's writer says n_dims=1
    model = write_gguf(tmp_path / "t.gguf", [("x", 1, VT.UINT32, None)],
                       [("row", np.arange(64, dtype=np.float32).reshape(1, 64), QT.F32),
                        ("m", np.ones((3, 32), np.float32), QT.F32)])
    assert list(gguf.GGUFReader(model).tensors[0].shape) == [64, 1]
    shard = split(model, tmp_path / "s", max_tensors=10).outputs[0]
    assert list(gguf.GGUFReader(shard).tensors[0].shape) == [64]
    assert tensor_bytes(shard) == tensor_bytes(model)


def test_fallback_copy_path_gives_the_same_bytes(model, tmp_path):
    result = split(model, tmp_path / "s", max_tensors=6)
    fast = merge(result.outputs[0], tmp_path / "fast.gguf", copier=Copier(use_copy_file_range=True, chunk=1000))
    slow = merge(result.outputs[0], tmp_path / "slow.gguf",
                 copier=Copier(use_copy_file_range=False, chunk=1000, buffer_size=777))
    assert fast.output.read_bytes() == slow.output.read_bytes()


def test_progress_reports_every_byte(model, tmp_path):
    result = split(model, tmp_path / "s", max_tensors=6)
    calls = []
    merged = merge(result.outputs[0], tmp_path / "m.gguf", progress=lambda d, t: calls.append((d, t)),
                   copier=Copier(chunk=4096))
    size = merged.output.stat().st_size
    assert calls[0] == (0, size) and calls[-1] == (size, size)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    assert len(calls) > 20


def test_dry_run_writes_nothing(model, tmp_path):
    before = dir_listing(tmp_path)
    plan = split(model, tmp_path / "s", max_tensors=4, dry_run=True)
    assert dir_listing(tmp_path) == before
    assert len(plan.outputs) == 7 and sum(plan.tensors) == 27


def test_validate_shards_reports_the_set(model, tmp_path):
    result = split(model, tmp_path / "s", max_tensors=9)
    s = validate_shards(result.outputs[0])
    assert s.paths == list(result.outputs)
    assert s.tensors_count == 27 and s.name.count == 3


def test_merge_output_defaults(model, tmp_path):
    shards = split(model, tmp_path / "q4", max_tensors=10).outputs
    (tmp_path / "out").mkdir()
    into_dir = merge(shards[0], tmp_path / "out")
    assert into_dir.output == tmp_path / "out" / "q4.gguf"
    beside = merge(shards[0])
    assert beside.output == tmp_path / "q4.gguf"
    assert into_dir.output.read_bytes() == beside.output.read_bytes()
    mode = beside.output.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


class CountingCopier(Copier):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def copy(self, *args, **kw):
        self.calls += 1
        return super().copy(*args, **kw)


def test_contiguous_tensors_are_copied_in_one_run_and_dirty_padding_is_not(model, tmp_path):
    shards = split(model, tmp_path / "s", max_tensors=6).outputs
    clean = CountingCopier()
    merge(shards[0], tmp_path / "clean.gguf", copier=clean)
    assert clean.calls == len(shards)  # one run per shard

    # llama.cpp writes zeros as padding whatever the shard holds there
    f = read_gguf(shards[1])
    t = next(t for t in f.tensors[:-1] if pad(t.nbytes, 32) > t.nbytes)
    with open(shards[1], "r+b") as fh:
        fh.seek(f.data_offset + t.offset + t.nbytes)
        fh.write(b"\xff" * (pad(t.nbytes, 32) - t.nbytes))
    dirty = CountingCopier()
    out = merge(shards[0], tmp_path / "dirty.gguf", copier=dirty).output
    assert dirty.calls == len(shards) + 1
    assert out.read_bytes() == (tmp_path / "clean.gguf").read_bytes()
