"""The one block-index format shared by every selection method and every executor.

A selection says, per (batch, query head, query block ``r``), which key blocks the
queries of block ``r`` attend to: ``counts[b, h, r]`` of them, listed in ascending
order in ``indices[b, h, r, :counts]`` (entries past the count are -1).  This is the
layout of FlashAttention's and FlexAttention's block-sparse tensors (``kv_num_blocks``,
``kv_indices``), so a selection can be handed to either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockSelection", "PatternStats", "mask_to_selection", "compact_block_mask", "num_causal_blocks"]


def num_causal_blocks(num_blocks: int) -> int:
    """Blocks of a causal block grid of ``num_blocks`` rows: ``nb * (nb + 1) / 2``."""
    return num_blocks * (num_blocks + 1) // 2


@dataclass
class PatternStats:
    """What the pattern search chose, per (batch, query head).

    ``query_aware``: bool [B, Hq], True where the head took the query-aware pattern.
    ``js_distance``: fp32 [B, Hq], sqrt(JSD) between the true and the estimated
    block distribution of the last queries (NaN where no search ran).
    ``num_blocks``: int64 [B, Hq], selected key blocks summed over query blocks.
    ``density``: fp32 [B, Hq], ``num_blocks`` over the causal grid ``nb*(nb+1)/2``.
    ``dense``: True when the operator ran dense attention (short sequence).
    """

    query_aware: torch.Tensor
    js_distance: torch.Tensor
    num_blocks: torch.Tensor
    density: torch.Tensor
    dense: bool = False

    def patterns(self) -> list[list[str]]:
        """Pattern names per batch and head ("query_aware", "vertical_slash" or "dense").

        Copies to the host: call it for reporting, not inside a captured graph.
        """
        if self.dense:
            return [["dense"] * self.query_aware.shape[1] for _ in range(self.query_aware.shape[0])]
        qa = self.query_aware.cpu().tolist()
        return [["query_aware" if x else "vertical_slash" for x in row] for row in qa]


@dataclass
class BlockSelection:
    """Selected key blocks of every query block, per batch and query head.

    ``counts``: int32 [B, Hq, nb]; ``indices``: int32 [B, Hq, nb, nb], ascending,
    -1 past the count; ``query_aware`` bool [B, Hq]; ``js_distance`` fp32 [B, Hq].
    ``seq_len`` is the number of tokens N, ``nb = ceil(N / block_size)``.
    """

    counts: torch.Tensor
    indices: torch.Tensor
    block_size: int
    seq_len: int
    query_aware: torch.Tensor
    js_distance: torch.Tensor

    @property
    def num_q_blocks(self) -> int:
        return self.counts.shape[-1]

    def to_mask(self) -> torch.Tensor:
        """Dense bool block mask [B, Hq, nb, nb] (True = computed)."""
        nb = self.num_q_blocks
        valid = torch.arange(self.indices.shape[-1], device=self.counts.device) < self.counts[..., None].long()
        mask = torch.zeros(*self.counts.shape, nb + 1, dtype=torch.bool, device=self.counts.device)
        cols = torch.where(valid, self.indices.long(), nb)
        mask.scatter_(-1, cols, True)
        return mask[..., :nb]

    def stats(self) -> PatternStats:
        num = self.counts.sum(-1, dtype=torch.int64)
        density = num.float() / num_causal_blocks(self.num_q_blocks)
        return PatternStats(self.query_aware, self.js_distance, num, density)


def compact_block_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool block mask [..., nb, nb] -> (counts int32 [..., nb], ascending indices int32 [..., nb, nb], -1 padded).

    A cumulative sum gives each kept block its slot, a scatter writes it there: no sort,
    no host sync.  Entries above the block diagonal must already be False.
    """
    nb = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    slot = torch.where(mask, mask.cumsum(-1) - 1, nb)
    cols = torch.arange(nb, dtype=torch.int32, device=mask.device).expand_as(mask)
    out = torch.full((*mask.shape[:-1], nb + 1), -1, dtype=torch.int32, device=mask.device)
    out.scatter_(-1, slot, cols)
    return counts, out[..., :nb]


def mask_to_selection(
    mask: torch.Tensor,
    *,
    block_size: int,
    seq_len: int,
    query_aware: torch.Tensor,
    js_distance: torch.Tensor,
) -> BlockSelection:
    """Turn a bool block mask [B, H, nb, nb] into a :class:`BlockSelection`.

    Entries above the block diagonal are dropped (causal).  No host sync.
    """
    nb = mask.shape[-1]
    ar = torch.arange(nb, device=mask.device)
    counts, indices = compact_block_mask(mask & (ar[None, :] <= ar[:, None]))
    return BlockSelection(
        counts=counts,
        indices=indices,
        block_size=block_size,
        seq_len=seq_len,
        query_aware=query_aware,
        js_distance=js_distance,
    )
