"""Entry point of the `vllm.general_plugins` group.

vLLM calls `register()` in every one of its processes before it builds the
model.  The CPU-experts replacement is only installed when LVLLM_MOE_CPU=1, so
an installed lvllm never changes stock vLLM behaviour by itself.
"""

from __future__ import annotations

import os


def register() -> None:
    if os.environ.get("LVLLM_MOE_CPU", "0") != "1":
        return
    # The routed-experts replacement lands with the plugin issue (#4).
