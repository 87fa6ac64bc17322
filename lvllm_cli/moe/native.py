"""The compiled engine module, imported with an error that says what to do."""

from __future__ import annotations


class EngineUnavailable(ImportError):
    pass


def load():
    try:
        from lvllm_cli import _lk_moe
    except ImportError as exc:  # pragma: no cover - exercised by doctor on broken installs
        raise EngineUnavailable(
            f"the lk_moe engine module did not load ({exc}); reinstall lvllm (pip install --force-reinstall lvllm) "
            "or rebuild it for this machine with `lvllm build`"
        ) from exc
    return _lk_moe
