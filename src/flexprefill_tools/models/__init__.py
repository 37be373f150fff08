"""Offline models for FlexPrefill experiments: GGUFs shipped in PyPI packages, and a haystack text."""

from .loading import context_length, hf_folder, load
from .packages import MODELS, ChecksumError, MissingPackageError, gguf_path, haystack_text

__all__ = [
    "MODELS",
    "load",
    "hf_folder",
    "gguf_path",
    "haystack_text",
    "context_length",
    "MissingPackageError",
    "ChecksumError",
]
