"""Dense causal attention: the short-sequence path of the operator; exact sliding-window attention.

Without an LSE, PyTorch SDPA, on CUDA with cuDNN asked first (the fastest dense kernel on
Hopper; torch's default order differs between versions), then flash, memory-efficient, math.
With an LSE, the block-sparse kernel on the full causal selection, built on the device without a sync.
Sliding-window layers (Gemma 3, Mistral) run the same kernel on the band of blocks the
window reaches, with the window applied per token: O(N * window) work where SDPA with a
mask does O(N^2).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .sparse_attention import _launch, sparse_attention, sparse_attention_varlen

__all__ = ["dense_causal_attention", "full_causal_selection", "window_selection", "sliding_window_attention",
           "sliding_window_attention_varlen"]

_BLOCK = 128


def full_causal_selection(B: int, Hq: int, N: int, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every causal block: counts int32 [B, Hq, nb] and indices int32 [B, Hq, nb, nb].

    Both are broadcast views (stride 0 over batch and heads): one [nb, nb] table in memory.
    """
    nb = math.ceil(N / block_size)
    r = torch.arange(nb, dtype=torch.int32, device=device)
    counts = (r + 1).expand(B, Hq, nb)
    indices = torch.where(r[None, :] <= r[:, None], r[None, :], -1).to(torch.int32).expand(B, Hq, nb, nb)
    return counts, indices


def _sdpa_order(device: torch.device):
    """The SDPA backends of the dense path: on CUDA cuDNN first, then torch's own choices
    (FlashAttention, memory-efficient, math) for what cuDNN refuses.  ``FLEXPREFILL_DENSE_CUDNN=0``
    keeps torch's default order (a no-op context)."""
    if device.type != "cuda" or os.environ.get("FLEXPREFILL_DENSE_CUDNN", "1") == "0":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: the list is a set, torch picks in its own order
        return sdpa_kernel(order)


def dense_causal_attention(q, k, v, *, softmax_scale: float, return_lse: bool = False):
    """Causal attention over every key ``j <= i``.

    Args:
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D], ``Hq % Hkv == 0``.
        softmax_scale: scale of the scores.
        return_lse: also return ``lse`` fp32 [B, Hq, N] (natural log).

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype, and ``lse`` when asked.
    """
    if not return_lse:
        Hq, Hkv = q.shape[2], k.shape[2]
        gqa = dict(enable_gqa=True) if Hq != Hkv else {}
        with _sdpa_order(q.device):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=softmax_scale, **gqa
            )
        return out.transpose(1, 2)
    B, N, Hq, _ = q.shape
    counts, indices = full_causal_selection(B, Hq, N, _BLOCK, q.device)
    return sparse_attention(q, k, v, counts, indices, block_size=_BLOCK, softmax_scale=softmax_scale, return_lse=True)


def _check_window(window) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be an int >= 1 (tokens)")


# band tables of recent (nb, block size, window, device) calls: a model's sliding layers
# all ask for the same one, and building it is ~10 small launches of host time per call
_BAND_CACHE: "OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_BAND_CACHE_SIZE = 8


def window_selection(B: int, Hq: int, N: int, block_size: int, window: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The key blocks a causal sliding window reaches: row block ``r`` lists blocks
    ``c <= r`` holding a key ``j > r * block_size - window`` (visible from the block's first row).

    Returns counts int32 [B, Hq, nb] and indices int32 [B, Hq, nb, w], ``w`` = the largest
    count (broadcast views of one [nb, w] table; -1 past each count).  The table is cached
    (a few recent shapes; it is read-only); one first built inside a CUDA graph capture is not.
    """
    nb = math.ceil(N / block_size)
    device = torch.device(device)
    key = (nb, block_size, window, device)
    hit = _BAND_CACHE.get(key)
    if hit is None:
        hit = _band_table(nb, block_size, window, device)
        # a table built inside a graph capture lives in the graph's pool: not kept
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _BAND_CACHE[key] = hit
            while len(_BAND_CACHE) > _BAND_CACHE_SIZE:
                _BAND_CACHE.popitem(last=False)
    else:
        _BAND_CACHE.move_to_end(key)
    counts, indices = hit
    return counts.expand(B, Hq, nb), indices.expand(B, Hq, *indices.shape)


def _band_table(nb: int, block_size: int, window: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """counts int32 [nb] and indices int32 [nb, w] of :func:`window_selection`."""
    r = torch.arange(nb, device=device)
    # first block whose last key c*bs + bs - 1 is > r*bs - window
    lo = torch.div(r * block_size - window - block_size + 1, block_size, rounding_mode="floor") + 1
    lo = lo.clamp_min(0)
    counts = (r - lo + 1).to(torch.int32)
    width = min(nb, (window + block_size - 2) // block_size + 2)
    t = torch.arange(width, device=device)
    indices = torch.where(t[None, :] < counts[:, None], lo[:, None] + t[None, :], -1).to(torch.int32)
    return counts, indices


def sliding_window_attention(q, k, v, *, window: int, softmax_scale: float, return_lse: bool = False,
                             block_size: int = _BLOCK):
    """Exact causal sliding-window attention: query ``i`` sees keys ``i - window < j <= i``
    (the convention of transformers' ``sliding_window``).

    Args:
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D], ``Hq % Hkv == 0``; CUDA fp16/bf16 (or any
            device under ``TRITON_INTERPRET=1``).
        window: tokens, >= 1.
        softmax_scale: scale of the scores.
        return_lse: also return ``lse`` fp32 [B, Hq, N] (natural log).
        block_size: 32, 64 or 128: the tile grid of the band.

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype, and ``lse`` when asked.
    """
    _check_window(window)
    B, N, Hq, _ = q.shape
    counts, indices = window_selection(B, Hq, N, block_size, window, q.device)
    return _launch(q, k, v, counts, indices, block_size=block_size, softmax_scale=softmax_scale,
                   return_lse=return_lse, window=window)


def sliding_window_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                                    window: int, softmax_scale: float, return_lse: bool = False, block_size: int = _BLOCK):
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
        window=window,
    )
