"""Which vLLM releases lvllm's plugin is written for.

The range matches pyproject's `vllm` extra.  Only the release numbers count:
"0.26.0rc1", "0.26.1+cu128" and "0.26.1.dev3" all read as 0.26.x, and any
build of 0.34 (pre-releases included) is outside the range, because what
breaks the plugin is the release line's internals, not its pre-release tag.
"""

from __future__ import annotations

import re

SUPPORTED_VLLM_MIN = "0.26"
SUPPORTED_VLLM_MAX_EXCLUSIVE = "0.34"


def _release(version: str) -> tuple[int, ...]:
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not m:
        raise ValueError(f"not a version number: {version!r}")
    parts = [int(p) for p in m.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def vllm_supported(version: str) -> bool:
    """True when `version` lies in [SUPPORTED_VLLM_MIN, SUPPORTED_VLLM_MAX_EXCLUSIVE)."""
    try:
        rel = _release(version)
    except ValueError:
        return False
    return _release(SUPPORTED_VLLM_MIN) <= rel < _release(SUPPORTED_VLLM_MAX_EXCLUSIVE)


def supported_range_text() -> str:
    return f">={SUPPORTED_VLLM_MIN},<{SUPPORTED_VLLM_MAX_EXCLUSIVE}"
