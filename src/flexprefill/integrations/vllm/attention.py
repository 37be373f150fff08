"""FlexPrefill over the sparse prefill chunks of one vLLM step, reading K/V from the paged cache.

The chunk's K/V were written to the cache before attention runs (vLLM updates the cache
first), so the whole context, cached prefix and chunk, is read through the block table.
This module does not import vLLM: it takes plain tensors and a :class:`SparseBatch`.
"""

from __future__ import annotations

import torch

from ...api import flex_prefill_attention_varlen
from ...config import FlexPrefillConfig
from ...ops.paged_kv import gather_paged_kv
from .plan import SparseBatch

__all__ = ["sparse_prefill_forward"]


def sparse_prefill_forward(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           batch: SparseBatch, output: torch.Tensor, *, config: FlexPrefillConfig,
                           softmax_scale: float, gather_backend: str = "auto") -> torch.Tensor:
    """Write FlexPrefill's output for the chunks of ``batch`` into their rows of ``output``.

    Args:
        query: [num_tokens, Hq, D], the step's packed queries (any row stride).
        key_cache, value_cache: [num_pages, page_size, Hkv, D], one layer's paged cache.
        batch: the step's sparse chunks (:func:`plan.to_device`).
        output: [num_tokens, Hq, D]; only the chunks' rows are written.
        config: the FlexPrefill settings; softmax_scale: the layer's scale.

    Returns:
        ``output``.
    """
    plan = batch.plan
    k, v = gather_paged_kv(key_cache, value_cache, batch.block_table, batch.seq_lens, batch.cu_seqlens_k,
                           total_k=plan.total_k, max_seqlen_k=plan.max_seqlen_k, backend=gather_backend)
    if batch.rows is None:
        lo, hi = plan.q_start[0], plan.q_end[-1]
        q = query[lo:hi]
    else:
        q = query.index_select(0, batch.rows)
    out = flex_prefill_attention_varlen(
        q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k,
        config=config, softmax_scale=softmax_scale,
    )
    if batch.rows is None:
        output[lo:hi].copy_(out)
    else:
        output.index_copy_(0, batch.rows, out.to(output.dtype))
    return output
