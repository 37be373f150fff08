"""FlexPrefill: context-aware, per-head dynamic block-sparse attention for long prefill."""

from . import reference
from .api import block_sparse_attention, flex_prefill_attention, select_blocks
from .config import FlexPrefillConfig
from .integrations import patch, register, unpatch
from .selection import BlockSelection, PatternStats

__version__ = "0.1.0"

__all__ = [
    "FlexPrefillConfig",
    "BlockSelection",
    "PatternStats",
    "flex_prefill_attention",
    "select_blocks",
    "block_sparse_attention",
    "reference",
    "patch",
    "unpatch",
    "register",
    "__version__",
]
