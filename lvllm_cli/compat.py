"""What lvllm works with: the supported vLLM range and torch builds known to be bad.

One place, read by doctor and by the vLLM plugin.
"""

from __future__ import annotations

import re

# PEP 440 specifiers, both must hold.  vLLM's MoE seams we patch were checked in
# 0.26.0 and 0.33.0 (docs: DESIGN.md section 4).
SUPPORTED_VLLM = (">=0.26", "<0.34")

# torch releases that must not be used, by release number (local tag ignored).
BAD_TORCH = {"2.9.0": "known to produce garbage with vLLM"}


def release(version: str) -> tuple[int, ...]:
    """'0.26.1rc1.dev5+g1234' -> (0, 26, 1); '2.9.0+cu128' -> (2, 9, 0).  ValueError if none."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


_OPS = {">=": lambda c: c >= 0, ">": lambda c: c > 0, "<=": lambda c: c <= 0, "<": lambda c: c < 0, "==": lambda c: c == 0}


def satisfies(version: str, specifiers=SUPPORTED_VLLM) -> bool:
    """Release-number comparison against simple specifiers ('>=0.26', '<0.34').

    Pre-releases compare by their release number, so 0.34.0rc1 is outside '<0.34',
    as PEP 440 has it.
    """
    v = release(version)
    for spec in specifiers:
        m = re.fullmatch(r"\s*(>=|<=|==|>|<)\s*(\S+)\s*", spec)
        if not m:
            raise ValueError(f"unsupported specifier {spec!r}")
        if not _OPS[m.group(1)](_cmp(v, release(m.group(2)))):
            return False
    return True


def bad_torch_reason(version: str) -> str | None:
    """Why this torch must not be used, or None."""
    try:
        parts = release(version)
        key = ".".join(str(p) for p in parts + (0,) * (3 - len(parts)))
    except ValueError:
        return None
    return BAD_TORCH.get(key)


SUPPORTED_VLLM_MIN = SUPPORTED_VLLM[0].lstrip(">=")
SUPPORTED_VLLM_MAX_EXCLUSIVE = SUPPORTED_VLLM[1].lstrip("<")


def vllm_supported(version: str) -> bool:
    """True when `version` lies in the supported range; unparsable versions are not supported."""
    try:
        return satisfies(version)
    except ValueError:
        return False


def supported_range_text() -> str:
    return ",".join(SUPPORTED_VLLM)
