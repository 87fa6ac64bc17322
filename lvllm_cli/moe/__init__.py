"""The CPU side of routed experts: the lk_moe engine's Python face and the plugin's vLLM-free core."""

from lvllm_cli.moe.layer import MoELayer, get_engine

__all__ = ["MoELayer", "get_engine"]
