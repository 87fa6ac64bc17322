"""Every way a merge or split can be refused: a clear message, and no file
left behind (neither OUT nor a temporary)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf_helpers import dir_listing, read_tensors, split_kvs, write_gguf, write_moe_model

from lvllm_cli.gguf_tools import (DuplicateTensorError, GGUFToolError, InsufficientSpaceError, MissingShardError, NotGGUFError,
                                  OutputExistsError, OutputPathError, ShardSetError, SplitPlanError,
                                  TruncatedGGUFError, merge, split)
from lvllm_cli.gguf_tools.copyio import Copier, DiskUsage


@pytest.fixture()
def shards(tmp_path):
    (tmp_path / "src").mkdir()
    model = write_moe_model(tmp_path / "src" / "m.gguf", seed=int(np.random.default_rng().integers(1 << 30)))
    result = split(model, tmp_path / "m", max_tensors=6)
    assert len(result.outputs) == 5
    return list(result.outputs)


def refused(tmp_path, exc, match, first, out="merged.gguf", **kw):
    before = dir_listing(tmp_path)
    with pytest.raises(exc, match=match) as info:
        merge(first, tmp_path / out if out else None, **kw)
    assert dir_listing(tmp_path) == before, "a refused merge must leave no file behind"
    assert info.value.fix, "every refusal says how to fix it"
    return info.value


def test_missing_shard(tmp_path, shards):
    shards[2].unlink()
    e = refused(tmp_path, MissingShardError, "1 of 5 shards are missing", shards[0])
    assert "m-00003-of-00005.gguf" in e.message


def test_truncated_shard(tmp_path, shards):
    with open(shards[3], "r+b") as f:
        f.truncate(os.path.getsize(shards[3]) - 200)
    e = refused(tmp_path, TruncatedGGUFError, "truncated", shards[0])
    assert str(shards[3]) in e.message


def test_shard_that_is_not_gguf(tmp_path, shards):
    shards[1].write_bytes(np.random.default_rng(1).bytes(4096))
    e = refused(tmp_path, NotGGUFError, "not a GGUF", shards[0])
    assert str(shards[1]) in e.message


def test_first_file_not_gguf(tmp_path):
    p = tmp_path / "x-00001-of-00002.gguf"
    p.write_text("hello, not a model")
    (tmp_path / "x-00002-of-00002.gguf").write_text("neither")
    refused(tmp_path, NotGGUFError, "not a GGUF", p)


def _rewrite_shard(path, index, count, n_tensors, tensors, kvs=()):
    """Replace a shard with one written by GGUFWriter with the given split keys."""
    path.unlink()
    write_gguf(path, list(kvs) + split_kvs(index, count, n_tensors), tensors)


def test_wrong_split_count(tmp_path, shards):
    tensors = read_tensors(shards[4])
    _rewrite_shard(shards[4], 4, 6, 27, tensors)
    refused(tmp_path, ShardSetError, "says the model has 6 shards, but the file names say 5", shards[0])


def test_split_no_out_of_sequence(tmp_path, shards):
    a, b = shards[1], shards[2]
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    refused(tmp_path, ShardSetError, "holds shard number 3 .* but is named as shard 2", shards[0])


def test_tensor_count_mismatch(tmp_path, shards):
    tensors = read_tensors(shards[4])
    _rewrite_shard(shards[4], 4, 5, 27, tensors[:-1])
    refused(tmp_path, ShardSetError, "hold 26 tensors but 'split.tensors.count' says 27", shards[0])


def test_duplicate_tensor(tmp_path, shards):
    tensors = read_tensors(shards[4])
    dup = read_tensors(shards[1])[0]
    _rewrite_shard(shards[4], 4, 5, 27, tensors[:-1] + [dup])
    e = refused(tmp_path, DuplicateTensorError, f"tensor '{dup[0]}' is in both", shards[0])
    assert str(shards[1]) in e.message and str(shards[4]) in e.message


def test_mismatched_tensors_count_between_shards(tmp_path, shards):
    _rewrite_shard(shards[2], 2, 5, 99, read_tensors(shards[2]))
    refused(tmp_path, ShardSetError, "says the model has 99 tensors", shards[0])


def test_output_exists(tmp_path, shards):
    out = tmp_path / "merged.gguf"
    out.write_bytes(b"precious")
    refused(tmp_path, OutputExistsError, "already exists", shards[0])
    assert out.read_bytes() == b"precious"
    merge(shards[0], out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_output_is_an_input(tmp_path, shards):
    refused(tmp_path, OutputPathError, "is one of the input files", shards[0], out=shards[1].name, force=True)


def test_not_enough_disk_space(tmp_path, shards):
    seen = []

    def tiny_disk(path):
        seen.append(path)
        return DiskUsage(total=10**12, used=10**12 - 300_000, free=300_000)

    e = refused(tmp_path, InsufficientSpaceError, "not enough disk space", shards[0], disk_usage=tiny_disk)
    assert seen == [tmp_path] and "merged.gguf" in e.message


def test_shard_other_than_first(tmp_path, shards):
    e = refused(tmp_path, ShardSetError, "shard 3 of 5, not the first", shards[2])
    assert "m-00001-of-00005.gguf" in e.fix


def test_unsplit_file(tmp_path):
    model = write_moe_model(tmp_path / "plain.gguf", seed=2)
    refused(tmp_path, ShardSetError, "not a split GGUF", model)


def test_renamed_shard(tmp_path, shards):
    odd = shards[0].with_name("renamed.gguf")
    shards[0].rename(odd)
    e = refused(tmp_path, ShardSetError, "name does not end in -00001-of-00005.gguf", odd)
    assert "rename" in e.fix


def test_interrupted_merge_leaves_nothing(tmp_path, shards):
    before = dir_listing(tmp_path)

    def interrupt(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(shards[0], tmp_path / "merged.gguf", progress=interrupt, copier=Copier(chunk=4096))
    assert dir_listing(tmp_path) == before


@pytest.mark.parametrize("fast", [True, False])
def test_shard_shrinking_during_merge_is_caught(tmp_path, shards, fast):
    before = dir_listing(tmp_path)
    victim = shards[4]

    def shrink(done, total):
        if done > 0 and os.path.getsize(victim) > 1000:
            with open(victim, "r+b") as f:
                f.truncate(1000)

    with pytest.raises(TruncatedGGUFError, match="ended at byte"):
        merge(shards[0], tmp_path / "merged.gguf", progress=shrink,
              copier=Copier(use_copy_file_range=fast, chunk=4096, buffer_size=1000))
    assert dir_listing(tmp_path) == before


def test_split_refusals_leave_nothing(tmp_path):
    model = write_moe_model(tmp_path / "m.gguf", seed=4)
    before = dir_listing(tmp_path)
    with pytest.raises(SplitPlanError, match="alone is .* more than --max-size"):
        split(model, tmp_path / "s", max_size=1000)
    with pytest.raises(SplitPlanError, match="exactly one of"):
        split(model, tmp_path / "s")
    with pytest.raises(SplitPlanError, match="exactly one of"):
        split(model, tmp_path / "s", max_size=10**6, max_tensors=3)
    with pytest.raises(InsufficientSpaceError):
        split(model, tmp_path / "s", max_tensors=5,
              disk_usage=lambda p: DiskUsage(total=1, used=0, free=10_000))
    assert dir_listing(tmp_path) == before
    (tmp_path / "s-00002-of-00006.gguf").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="s-00002-of-00006.gguf already exists"):
        split(model, tmp_path / "s", max_tensors=5)
    assert (tmp_path / "s-00002-of-00006.gguf").read_bytes() == b"old"
    assert dir_listing(tmp_path) == before | {"s-00002-of-00006.gguf"}


def test_split_of_a_shard_is_refused(tmp_path, shards):
    with pytest.raises(GGUFToolError, match="itself one shard"):
        split(shards[0], tmp_path / "again", max_tensors=2)


def test_interrupted_split_leaves_nothing(tmp_path):
    model = write_moe_model(tmp_path / "m.gguf", seed=6)
    before = dir_listing(tmp_path)

    def interrupt(done, total):
        if done > total * 0.8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        split(model, tmp_path / "s", max_tensors=4, progress=interrupt, copier=Copier(chunk=2048))
    assert dir_listing(tmp_path) == before
