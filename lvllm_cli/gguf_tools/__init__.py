"""GGUF tools: read metadata, split and merge, byte-compatible with llama.cpp's
`llama-gguf-split`. Named gguf_tools so that `import gguf` keeps meaning the
gguf-py library. Pure functions here; lvllm_cli/commands/gguf.py is the CLI."""

from .errors import (CorruptGGUFError, DuplicateTensorError, GGUFToolError, InsufficientSpaceError,
                     MissingShardError, NotGGUFError, OutputExistsError, OutputPathError, ShardSetError,
                     SplitPlanError, TruncatedGGUFError)
from .format import GGUFFile, TensorInfo, read_gguf
from .info import read_info
from .merge import MergeResult, merge, plan_merge
from .names import parse_shard_name, shard_path
from .shards import ShardSet, validate_shards
from .split import SplitResult, group_tensors, plan_split, split
from .units import human_bytes, parse_size

__all__ = [
    "CorruptGGUFError", "DuplicateTensorError", "GGUFToolError", "InsufficientSpaceError", "MissingShardError",
    "NotGGUFError", "OutputExistsError", "OutputPathError", "ShardSetError", "SplitPlanError", "TruncatedGGUFError",
    "GGUFFile", "TensorInfo", "read_gguf", "read_info", "MergeResult", "merge", "plan_merge", "parse_shard_name",
    "shard_path", "ShardSet", "validate_shards", "SplitResult", "group_tensors", "plan_split", "split",
    "human_bytes", "parse_size",
]
