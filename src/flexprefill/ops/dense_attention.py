"""Dense causal attention: the short-sequence path of the operator.

Without an LSE, PyTorch SDPA, on CUDA with cuDNN asked first (the fastest dense kernel on
Hopper; torch's default order differs between versions), then flash, memory-efficient, math.
With an LSE or a logit soft-cap (SDPA has neither), the block-sparse kernel on the full causal
selection, built on the device without a sync.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..block_table import full_causal_selection
from ..options import options

__all__ = ["dense_causal_attention"]

_BLOCK = 128


def _sdpa_order(device: torch.device):
    """The SDPA backends of the dense path: on CUDA cuDNN first, then torch's own choices
    (FlashAttention, memory-efficient, math) for what cuDNN refuses.  ``Options.dense_cudnn``
    off keeps torch's default order (a no-op context)."""
    if device.type != "cuda" or not options().dense_cudnn:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: the list is a set, torch picks in its own order
        return sdpa_kernel(order)


def dense_causal_attention(q, k, v, *, softmax_scale: float, return_lse: bool = False, softcap: float | None = None):
    """Causal attention over every key ``j <= i``.

    Args:
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D], ``Hq % Hkv == 0``.
        softmax_scale: scale of the scores.
        return_lse: also return ``lse`` fp32 [B, Hq, N] (natural log).
        softcap: None or a positive float: soft-capped scores (``softcap * tanh(s / softcap)``).

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype, and ``lse`` when asked.
    """
    if not return_lse and softcap is None:
        Hq, Hkv = q.shape[2], k.shape[2]
        gqa = dict(enable_gqa=True) if Hq != Hkv else {}
        with _sdpa_order(q.device):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=softmax_scale, **gqa
            )
        return out.transpose(1, 2)
    B, N, Hq, _ = q.shape
    counts, indices = full_causal_selection(B, Hq, N, _BLOCK, q.device)
    from .sparse_attention import sparse_attention

    return sparse_attention(q, k, v, counts, indices, block_size=_BLOCK, softmax_scale=softmax_scale,
                            return_lse=return_lse, softcap=softcap)

