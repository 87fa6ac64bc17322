"""Byte sizes: parsing what users type (--max-size 50G) and printing sizes."""

from __future__ import annotations

import re

# Decimal units follow llama-gguf-split (--split-max-size 50G = 50 * 1000^3);
# the binary ones are there for people who think in GiB.
_UNITS = {
    "": 1, "B": 1,
    "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2,
    "G": 1000**3, "GB": 1000**3, "T": 1000**4, "TB": 1000**4,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """'50G' -> 50_000_000_000; '1.5GiB' -> 1610612736; '4096' -> 4096.

    Raises ValueError with a message that says what is accepted."""
    m = _SIZE_RE.match(text)
    unit = m[2].upper() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read '{text}' as a size: use a number with an optional unit "
                         "(M, G, T = 1000^n bytes as in llama-gguf-split; MiB, GiB, TiB = 1024^n)")
    n = int(float(m[1]) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"size '{text}' must be positive")
    return n


def human_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
