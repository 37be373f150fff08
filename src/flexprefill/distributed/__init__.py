"""Context parallelism: FlexPrefill with the sequence of one long prefill split over ranks.

The sequence is split zig-zag (:mod:`.layout`); each rank searches the patterns of its own
query blocks with small collectives (:mod:`.search`) and receives exactly the key/value
blocks its selection reads (:mod:`.exchange`, :mod:`.attention`).  Built on
``torch.distributed``: NCCL for CUDA tensors, gloo for CPU tensors.  See
docs/context_parallel.md.
"""

from .attention import EXCHANGES, block_sparse_attention_cp, flex_prefill_attention_cp, select_blocks_cp
from .comm import CommStats
from .exchange import exchange_volume
from .layout import zigzag_chunks, zigzag_positions, zigzag_shard, zigzag_unshard
from .search import LocalBlockSelection

__all__ = [
    "flex_prefill_attention_cp",
    "select_blocks_cp",
    "block_sparse_attention_cp",
    "LocalBlockSelection",
    "CommStats",
    "EXCHANGES",
    "exchange_volume",
    "zigzag_chunks",
    "zigzag_positions",
    "zigzag_shard",
    "zigzag_unshard",
]
