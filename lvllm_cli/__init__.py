"""lvllm: serve huge MoE models from one workstation (CPU experts + GPU rest, stock vLLM)."""

__version__ = "0.1.0"
