"""lvllm_cli.atomic: the one "whole file or nothing" writer (saved plans, captures, engine figures, lvllm build)."""

import os
import stat
import threading

import pytest

from lvllm_cli.atomic import replacing, write_atomically


def test_writes_text_and_bytes_with_the_mode(tmp_path):
    p = write_atomically(tmp_path / "plan.json", "{}\n")
    assert p.read_text() == "{}\n" and stat.S_IMODE(p.stat().st_mode) == 0o600
    write_atomically(p, b"\x00\x01", mode=0o755)
    assert p.read_bytes() == b"\x00\x01" and stat.S_IMODE(p.stat().st_mode) == 0o755
    assert os.listdir(tmp_path) == ["plan.json"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "x.so"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing(p, binary=True) as f:
            f.write(b"half of the new")
            raise RuntimeError("compiler died")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.so"]


def test_a_planted_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "d" / "lk_moe-1.prom"
    target.parent.mkdir()
    target.symlink_to(victim)
    write_atomically(target, "figures")
    assert victim.read_text() == "precious" and not target.is_symlink() and target.read_text() == "figures"


def test_readers_never_see_half_a_file(tmp_path):
    p = tmp_path / "f"
    a, b = "a" * 200_000, "b" * 300_000
    write_atomically(p, a)
    stop = threading.Event()
    seen = set()

    def reader():
        while not stop.is_set():
            seen.add(p.read_text())

    t = threading.Thread(target=reader)
    t.start()
    for i in range(30):
        write_atomically(p, a if i % 2 else b)
    stop.set()
    t.join()
    assert seen <= {a, b} and seen
    assert [n for n in os.listdir(tmp_path) if n != "f"] == []
