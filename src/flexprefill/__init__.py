"""FlexPrefill: context-aware, per-head dynamic block-sparse attention for long prefill."""

from . import reference
from .api import (
    block_sparse_attention,
    block_sparse_attention_varlen,
    flex_prefill_attention,
    flex_prefill_attention_varlen,
    select_blocks,
    select_blocks_varlen,
    sliding_window_attention,
    sliding_window_attention_varlen,
)
from .config import FlexPrefillConfig
from .integrations import last_record, patch, register, unpatch
from .options import Options, options, set_options, use_options
from .block_table import BlockSelection, PatternStats, VarlenBlockSelection

__version__ = "0.1.0"

__all__ = [
    "FlexPrefillConfig",
    "Options",
    "options",
    "set_options",
    "use_options",
    "BlockSelection",
    "PatternStats",
    "flex_prefill_attention",
    "select_blocks",
    "block_sparse_attention",
    "VarlenBlockSelection",
    "flex_prefill_attention_varlen",
    "select_blocks_varlen",
    "block_sparse_attention_varlen",
    "sliding_window_attention",
    "sliding_window_attention_varlen",
    "reference",
    "patch",
    "unpatch",
    "register",
    "last_record",
    "__version__",
]
