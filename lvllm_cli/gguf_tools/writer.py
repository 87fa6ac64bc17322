"""Carry out a layout: each output file is its metadata followed by byte
ranges copied from input files, each padded with zeros to the alignment.
Both merge and split reduce to this."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .copyio import Copier, StagedOutputs, write_all

ProgressFn = Callable[[int, int], None]  # (bytes written so far, bytes to write in all)


@dataclass(frozen=True)
class CopyStep:
    src: Path
    offset: int  # absolute offset in src
    nbytes: int
    pad: int  # zero bytes written after the copy


@dataclass(frozen=True)
class OutputPlan:
    path: Path
    metadata: bytes
    steps: tuple[CopyStep, ...]

    @property
    def size(self) -> int:
        return len(self.metadata) + sum(s.nbytes + s.pad for s in self.steps)


def _runs(steps: Sequence[CopyStep], sources: dict[Path, io.FileIO]) -> list[CopyStep]:
    """Fuse consecutive steps whose source layout already equals the output
    layout (same file, the next tensor right after this one's padding, and
    that padding all zeros in the source): one long copy per run instead of
    one per tensor. The output bytes are the same; only the calls change."""
    runs: list[CopyStep] = []
    for step in steps:
        last = runs[-1] if runs else None
        if (last is not None and last.src == step.src and last.offset + last.nbytes + last.pad == step.offset
                and _zeros_in(sources[step.src], last.offset + last.nbytes, last.pad)):
            runs[-1] = CopyStep(last.src, last.offset, last.nbytes + last.pad + step.nbytes, step.pad)
        else:
            runs.append(step)
    return runs


def _zeros_in(src: io.FileIO, offset: int, n: int) -> bool:
    return n == 0 or os.pread(src.fileno(), n, offset) == bytes(n)


def write_outputs(plans: Sequence[OutputPlan], *, progress: ProgressFn | None = None,
                  copier: Copier | None = None) -> int:
    """Write every planned file, all or nothing; returns the bytes written."""
    copier = copier or Copier()
    total = sum(p.size for p in plans)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    sources: dict[Path, io.FileIO] = {}
    try:
        with StagedOutputs([p.path for p in plans]) as staged:
            for plan, dst in zip(plans, staged.files):
                write_all(dst, plan.metadata)
                advance(len(plan.metadata))
                for step in plan.steps:
                    if step.src not in sources:
                        sources[step.src] = copier.open_source(step.src)
                for step in _runs(plan.steps, sources):
                    copier.copy(sources[step.src], step.offset, step.nbytes, dst, advance)
                    if step.pad:
                        write_all(dst, bytes(step.pad))
                        advance(step.pad)
                if dst.tell() != plan.size:  # a bug here would silently corrupt the model
                    raise AssertionError(f"{plan.path}: wrote {dst.tell()} bytes, planned {plan.size}")
            staged.commit()
    finally:
        for src in sources.values():
            src.close()
    return total
