"""Page-cache hints of merge/split (pagecache.py): the drop-behind and
write-behind arithmetic, and on real files that merge and split leave the
files they read out of the page cache (checked with mincore) while writing
the same bytes."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf_helpers import moe_kvs, write_gguf
from hypothesis import given
from hypothesis import strategies as st

from lvllm_cli.gguf_tools import merge, pagecache, split
from lvllm_cli.gguf_tools.copyio import Copier
from lvllm_cli.gguf_tools.pagecache import DROP_ALIGN, write_behind_ranges

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def assert_tiles(ranges, start: int, stop: int, align: int) -> None:
    """ranges cover [start, stop) in order, nothing twice, nothing skipped,
    every boundary a multiple of align."""
    pos = start
    for off, n in ranges:
        assert n > 0 and off == pos and off % align == 0 and (off + n) % align == 0
        pos += n
    assert pos == stop


@given(chunks=st.lists(st.integers(1, 5000), min_size=1, max_size=60), lag=st.integers(1, 20000),
       align=st.sampled_from([1, 7, 512, 4096]))
def test_write_behind_drops_every_byte_once_lag_bytes_behind(chunks, lag, align):
    end, dropped = 0, []
    for n in chunks:
        end += n
        flush, drop = write_behind_ranges(end, n, lag, align)
        assert flush == (end - n, n)
        if drop is not None:
            assert drop[0] + drop[1] <= end - lag  # only bytes written at least `lag` ago
            dropped.append(drop)
    assert_tiles(dropped, 0, max(0, end - lag) // align * align, align)


@given(start=st.integers(0, 10000), steps=st.lists(st.integers(1, 5000), min_size=1, max_size=60),
       align=st.sampled_from([1, 7, 512, 4096]))
def test_drop_read_cuts_at_the_alignment_and_misses_nothing(start, steps, align):
    calls = []
    pos = start
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pagecache, "_fadvise", lambda fd, off, n, advice: calls.append((off, n)))
        for n in steps:
            pagecache.drop_read(3, pos, n, align)
            pos += n
    assert_tiles(calls, start // align * align, pos // align * align, align)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def resident_pages(path) -> tuple[int, int]:
    """(pages of path that are in the page cache, pages in all), by mincore."""
    size = os.path.getsize(path)
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = -(-size // PAGE)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec), pages


def cached_clean(path) -> None:
    """Every page of `path` clean (DONTNEED drops only those) and cached."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        while f.read(1 << 20):
            pass
    assert resident_pages(path)[0] == resident_pages(path)[1]


def assert_dropped(path) -> None:
    """What may stay cached of a file merge or split has read: the bytes
    after the last DROP_ALIGN cut."""
    left, pages = resident_pages(path)
    allowed = DROP_ALIGN // PAGE + 1
    assert allowed < pages / 3  # or the check says little
    assert left <= allowed, (path.name, left, pages)


@pytest.fixture()
def fadvise_works(tmp_path):
    """DONTNEED must really drop clean pages here (it does on ext4/xfs/btrfs;
    tmpfs keeps them: nothing to test there)."""
    if not (hasattr(os, "posix_fadvise") and hasattr(os, "sysconf")):
        pytest.skip("no posix_fadvise on this platform: merge copies without hints")
    probe = tmp_path / "probe.bin"
    probe.write_bytes(os.urandom(64 * PAGE))
    cached_clean(probe)
    fd = os.open(probe, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    left, _ = resident_pages(probe)
    probe.unlink()
    if left:
        pytest.skip(f"the filesystem of {tmp_path} ignores POSIX_FADV_DONTNEED (tmpfs?)")


def big_model(path):
    """24 tensors of about 1 MiB (odd sizes, so padded): files several times
    DROP_ALIGN, which the checks need."""
    rng = np.random.default_rng()
    tensors = [(f"blk.{i}.ffn_up_exps.weight", rng.standard_normal(2**18 + 7 * i + 1).astype(np.float32), QT.F32)
               for i in range(24)]
    return write_gguf(path, moe_kvs(rng, 24), tensors, arch="qwen3moe")


# chunks smaller than DROP_ALIGN: several steps per cut, like the folio
# boundaries that fall inside the 32 MiB steps of a real merge
CHUNK = 256 * 1024


@pytest.mark.parametrize("use_copy_file_range", [False, True])
def test_merge_drops_the_shards_it_read_and_writes_the_same_bytes(tmp_path, fadvise_works, use_copy_file_range):
    shards = list(split(big_model(tmp_path / "model.gguf"), tmp_path / "s", max_tensors=8).outputs)
    for s in shards:
        cached_clean(s)

    plain = merge(shards[0], tmp_path / "plain.gguf", copier=Copier(manage_cache=False, chunk=CHUNK))
    # without the hints the shards stay cached: the check below can fail
    assert all(resident_pages(s)[0] == resident_pages(s)[1] for s in shards)

    hinted = merge(shards[0], tmp_path / "hinted.gguf",
                   copier=Copier(chunk=CHUNK, use_copy_file_range=use_copy_file_range))
    assert hinted.output.read_bytes() == plain.output.read_bytes() == merge(shards[0], tmp_path / "d.gguf").output.read_bytes()
    for s in shards:
        assert_dropped(s)


def test_split_drops_the_model_it_read_and_writes_the_same_bytes(tmp_path, fadvise_works):
    model = big_model(tmp_path / "model.gguf")
    cached_clean(model)
    plain = split(model, tmp_path / "plain", max_tensors=8, copier=Copier(manage_cache=False, chunk=CHUNK))
    assert resident_pages(model)[0] == resident_pages(model)[1]

    hinted = split(model, tmp_path / "hinted", max_tensors=8, copier=Copier(chunk=CHUNK))
    assert len(hinted.outputs) == len(plain.outputs) == 3
    for a, b in zip(hinted.outputs, plain.outputs):
        assert a.read_bytes() == b.read_bytes()
    assert_dropped(model)
