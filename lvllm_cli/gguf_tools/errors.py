"""Errors raised by the GGUF tools.

Every error carries what went wrong (`message`) and what the user can do
about it (`fix`), so the CLI can print both without a traceback.
"""

from __future__ import annotations


class GGUFToolError(Exception):
    """Base class: a problem the user can act on."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} ({self.fix})"


class NotGGUFError(GGUFToolError):
    """The file does not start with the GGUF magic."""


class CorruptGGUFError(GGUFToolError):
    """The file is a GGUF but its metadata is malformed or unsupported."""


class TruncatedGGUFError(CorruptGGUFError):
    """The file ends before its metadata or tensor data does."""


class ShardSetError(GGUFToolError):
    """The shards of a split model do not form a complete, consistent set."""


class MissingShardError(ShardSetError):
    """One or more shard files are absent."""


class DuplicateTensorError(ShardSetError):
    """The same tensor name appears twice across the shards."""


class OutputPathError(GGUFToolError):
    """The output path cannot be used (a directory, an input, no parent)."""


class OutputExistsError(OutputPathError):
    """The output exists and --force was not given."""


class InsufficientSpaceError(GGUFToolError):
    """The destination filesystem cannot hold the output."""


class SplitPlanError(GGUFToolError):
    """The requested split limits cannot be satisfied."""
