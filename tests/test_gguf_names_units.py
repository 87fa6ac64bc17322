"""Shard names (llama_split_path / llama_split_prefix) and size parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lvllm_cli.gguf_tools import human_bytes, parse_shard_name, parse_size, shard_path
from lvllm_cli.gguf_tools.names import split_prefix


@given(stem=st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(lambda s: s not in (".", "..")),
       count=st.integers(1, 200000), data=st.data())
def test_shard_names_round_trip(stem, count, data):
    index = data.draw(st.integers(0, count - 1))
    p = shard_path(Path("/models") / stem, index, count)
    assert p.name == f"{stem}-{index + 1:05d}-of-{count:05d}.gguf"  # llama.cpp's "%s-%05d-of-%05d.gguf"
    name = parse_shard_name(p)
    assert name is not None and name.number == index + 1 and name.count == count
    assert name.prefix == Path("/models") / stem
    assert name.path_of(index) == p
    assert name.merged_path == Path("/models") / f"{stem}.gguf"


@pytest.mark.parametrize("bad", ["model.gguf", "m-1-of-5.gguf", "m-000001-of-00005.gguf", "m-00001-of-00005.bin",
                                 "-00001-of-00005.gguf", "m-00000-of-00005.gguf"])
def test_names_llama_cpp_would_not_write(bad):
    assert parse_shard_name(bad) is None


def test_split_prefix_drops_gguf_suffix():
    assert split_prefix("out/model.gguf") == Path("out/model")
    assert split_prefix("out/model") == Path("out/model")


def test_parse_size():
    assert parse_size("50G") == 50 * 1000**3  # llama-gguf-split's G
    assert parse_size("128M") == 128 * 1000**2
    assert parse_size("1.5GiB") == 3 * 1024**3 // 2
    assert parse_size("4096") == 4096
    assert parse_size(" 2 tb ") == 2 * 1000**4
    for bad in ("", "G", "-5G", "5Q", "0", "1.2.3M"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.50 KiB"
    assert human_bytes(5 * 1024**3) == "5.00 GiB"
