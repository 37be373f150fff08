"""Exact causal sliding-window attention (the local layers of Gemma 3, Mistral) through the
block-sparse kernel: it runs over the band of key blocks the window reaches and applies the
window per token, O(N * window) work where SDPA with a mask does O(N^2).
"""

from __future__ import annotations

from ..block_table import window_selection
from .sparse_attention import _launch, sparse_attention_varlen

__all__ = ["sliding_window_attention", "sliding_window_attention_varlen"]

_BLOCK = 128


def _check_window(window) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be an int >= 1 (tokens)")


def sliding_window_attention(q, k, v, *, window: int, softmax_scale: float, return_lse: bool = False,
                             block_size: int = _BLOCK, softcap: float | None = None):
    """Exact causal sliding-window attention: query ``i`` sees keys ``i - window < j <= i``
    (the convention of transformers' ``sliding_window``).

    Args:
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D], ``Hq % Hkv == 0``; CUDA fp16/bf16 (or any
            device under ``TRITON_INTERPRET=1``).
        window: tokens, >= 1.
        softmax_scale: scale of the scores.
        return_lse: also return ``lse`` fp32 [B, Hq, N] (natural log).
        block_size: 32, 64 or 128: the tile grid of the band.
        softcap: None or a positive float: soft-capped scores (the Triton kernel on every GPU).

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype, and ``lse`` when asked.
    """
    _check_window(window)
    B, N, Hq, _ = q.shape
    counts, indices = window_selection(B, Hq, N, block_size, window, q.device)
    return _launch(q, k, v, counts, indices, block_size=block_size, softmax_scale=softmax_scale,
                   return_lse=return_lse, window=window, softcap=softcap)


def sliding_window_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                                    window: int, softmax_scale: float, return_lse: bool = False, block_size: int = _BLOCK,
                                    softcap: float | None = None):
    """:func:`sliding_window_attention` of packed sequences: ``q [total_q, Hq, D]``, ``k, v
    [total_k, Hkv, D]``, int32 ``cu_seqlens``; a sequence with more keys than queries is a chunk
    over a cached prefix (its queries are the last positions).  The window is on absolute
    positions, so a chunk sees the prefix keys within the window.  Returns ``out [total_q, Hq, D]``
    and ``lse [Hq, total_q]`` when asked."""
    _check_window(window)
    S = cu_seqlens_q.numel() - 1
    Hq = q.shape[1]
    counts, indices = window_selection(S, Hq, max_seqlen_k, block_size, window, q.device)
    return sparse_attention_varlen(
        q, k, v, counts, indices, cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:],
        max_seqlen_q, max_seqlen_k, block_size=block_size, softmax_scale=softmax_scale, return_lse=return_lse,
        window=window, softcap=softcap,
    )

