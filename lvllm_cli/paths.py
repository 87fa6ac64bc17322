"""Where lvllm keeps its own files (generated demo models, metrics, user profiles)."""

from __future__ import annotations

import os
from pathlib import Path


def lvllm_home() -> Path:
    """$LVLLM_HOME, else $XDG_CACHE_HOME/lvllm, else ~/.cache/lvllm (created by whoever writes into it)."""
    env = os.environ.get("LVLLM_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "lvllm"
    return Path.home() / ".cache" / "lvllm"


def user_profiles_dir() -> Path:
    return lvllm_home() / "profiles"
