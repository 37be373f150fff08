"""Offline models for FlexPrefill experiments: GGUFs shipped in PyPI packages, and a haystack text."""

from .loading import context_length, load
from .packages import MODELS, ChecksumError, MissingPackageError, gguf_path, haystack_text

__all__ = [
    "MODELS",
    "load",
    "gguf_path",
    "haystack_text",
    "context_length",
    "MissingPackageError",
    "ChecksumError",
]
