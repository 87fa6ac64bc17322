"""Page-cache hints for long streaming copies (merge and split).

A merge reads every byte of the shards once and writes it once. Left to
itself the kernel keeps all of it: the page cache fills with shard pages that
will not be read again and with dirty output pages that are written back
only once the dirty limits are hit, and from then on the copy stalls in page
reclaim and dirty throttling. On the dev VM (24 GiB RAM, virtio disk) that
held a 20 GB merge of cold shards at 0.37-0.53 GB/s and `cat` at
0.34-0.52 GB/s, with the disk busy 39-57 % of the time and kswapd scanning
2.8-3.8 million pages per copy. With the hints below the same merge ran at
1.01-1.07 GB/s with the disk busy 76-82 % and no page reclaim at all
(1.22-1.32 GB/s against `cat` at 0.36-0.46 in the final benchmark). Drop
behind alone or write behind alone left it at 0.44-0.53 GB/s; only both
together helped (docs/notes/gguf-perf.md has the measurements):

* read sequentially: POSIX_FADV_SEQUENTIAL on each source (doubles the
  readahead window; GNU cat does the same; not measured on its own);
* drop behind: POSIX_FADV_DONTNEED on the source bytes once copied;
* write behind: POSIX_FADV_DONTNEED on each output range as soon as it is
  written, which starts its writeback at once instead of at the dirty
  limit, and again `lag` bytes later, which drops it from the cache once it
  is clean. Pages still under writeback at that point are left to the
  kernel.

The drops also take pages that were cached before the copy (a shard read
twice loses its cache); the kernel keeps those mapped by another process.
All of these are hints: they never change the bytes, any error from them is
ignored, and platforms without posix_fadvise copy the same way without them.
"""

from __future__ import annotations

import os

_fadvise = getattr(os, "posix_fadvise", None)


def _advise(fd: int, offset: int, length: int, advice_name: str) -> None:
    if _fadvise is None or length < 0:
        return
    try:
        _fadvise(fd, offset, length, getattr(os, advice_name))
    except OSError:
        pass  # a hint only; pipes, some FUSE filesystems... refuse it


def read_sequentially(fd: int) -> None:
    """Tell the kernel this whole file will be read front to back."""
    _advise(fd, 0, 0, "POSIX_FADV_SEQUENTIAL")


# Linux caches file data in folios of up to 2 MiB (x86-64 with 4 KiB pages),
# each aligned to its own size in the file, and DONTNEED drops only the
# folios wholly inside its range. Cutting every dropped range at multiples
# of this size therefore drops each folio once it is passed. Cut at the
# chunk boundaries instead, the folio across each boundary stayed cached:
# 61 MiB of a 1 GiB source read in 32 MiB chunks on the dev VM, about one
# 2 MiB folio per boundary.
DROP_ALIGN = 2 * 1024 * 1024


def _cut(x: int, align: int) -> int:
    return x - x % align


def drop_read(fd: int, offset: int, length: int, align: int = DROP_ALIGN) -> None:
    """Source bytes [offset, offset+length) were just copied: forget them,
    from the last cut at or before `offset` (bytes read by the previous
    step, or the header) to the last cut at or before the end (the rest goes
    with the next step)."""
    start, stop = _cut(offset, align), _cut(offset + length, align)
    if stop > start:
        _advise(fd, start, stop - start, "POSIX_FADV_DONTNEED")


Range = tuple[int, int]  # (offset, length)


def write_behind_ranges(end: int, length: int, lag: int, align: int = DROP_ALIGN) -> tuple[Range, Range | None]:
    """For output bytes [end-length, end) just written: the range whose
    writeback to start (those bytes) and the range to drop (the same bytes
    `lag` earlier in the file, cut at multiples of `align`; None when that
    is empty). Called after each chunk of a contiguous copy, the dropped
    ranges tile the file up to the last cut `lag` bytes behind the written
    end."""
    start, stop = _cut(max(0, end - length - lag), align), _cut(max(0, end - lag), align)
    return (end - length, length), ((start, stop - start) if stop > start else None)


def write_behind(fd: int, end: int, length: int, lag: int) -> None:
    """Output bytes [end-length, end) were just written: start their
    writeback now (DONTNEED on dirty pages only starts it) and drop what was
    written `lag` bytes earlier, which should be on disk by now."""
    if length <= 0:
        return
    flush, drop = write_behind_ranges(end, length, lag)
    _advise(fd, *flush, "POSIX_FADV_DONTNEED")
    if drop is not None:
        _advise(fd, *drop, "POSIX_FADV_DONTNEED")
