"""Dense causal attention: the short-sequence path of the operator.

Without an LSE, PyTorch SDPA (cuDNN / FlashAttention on the GPU).  With an LSE, the
block-sparse kernel on the full causal selection, built on the device without a sync.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .sparse_attention import sparse_attention

__all__ = ["dense_causal_attention", "full_causal_selection"]

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
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=softmax_scale, **gqa
        )
        return out.transpose(1, 2)
    B, N, Hq, _ = q.shape
    counts, indices = full_causal_selection(B, Hq, N, _BLOCK, q.device)
    return sparse_attention(q, k, v, counts, indices, block_size=_BLOCK, softmax_scale=softmax_scale, return_lse=True)
