"""The one block-index format shared by every selection method and every executor.

A selection says, per (batch, query head, query block ``r``), which key blocks the
queries of block ``r`` attend to: ``counts[b, h, r]`` of them, listed in ascending
order in ``indices[b, h, r, :counts]`` (entries past the count are -1).  This is the
layout of FlashAttention's and FlexAttention's block-sparse tensors (``kv_num_blocks``,
``kv_indices``), so a selection can be handed to either.

Packed variable-length batches and chunked prefill (:class:`VarlenBlockSelection`) use
the same format with the batch axis read as "sequence" and rows indexed by *absolute*
query block: a sequence with ``n_k`` keys and ``n_q <= n_k`` queries holds its queries at
absolute positions ``P .. n_k - 1`` (``P = n_k - n_q``, the cached prefix), key block
``c`` covers absolute keys ``[c*bs, (c+1)*bs)`` and query block ``r`` the chunk's queries
in ``[r*bs, (r+1)*bs)``.  Rows ``floor(P/bs) .. ceil(n_k/bs)-1`` hold the chunk's queries
(the first may be partial when ``P % bs != 0``); every other row has count 0.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = [
    "BlockSelection",
    "VarlenBlockSelection",
    "PatternStats",
    "mask_to_selection",
    "compact_block_mask",
    "num_causal_blocks",
    "chunk_rows",
    "chunk_row_mask",
    "full_causal_selection",
    "full_causal_selection_varlen",
    "window_selection",
]


def num_causal_blocks(num_blocks: int) -> int:
    """Blocks of a causal block grid of ``num_blocks`` rows: ``nb * (nb + 1) / 2``."""
    return num_blocks * (num_blocks + 1) // 2


def chunk_rows(n_q: torch.Tensor, n_k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and end (exclusive) absolute query block of each chunk: ``floor(P/bs)``, ``ceil(n_k/bs)``.

    ``n_q``, ``n_k``: int tensors [S] of query and key counts (``P = n_k - n_q``).  A chunk
    without queries gets an empty range.  Device ops only, no sync.
    """
    n_q, n_k = n_q.long(), n_k.long()
    end = (n_k + block_size - 1) // block_size
    first = torch.where(n_q > 0, (n_k - n_q) // block_size, end)
    return first, end


def _to_mask(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    nb = indices.shape[-1]
    valid = torch.arange(nb, device=counts.device) < counts[..., None].long()
    mask = torch.zeros(*counts.shape, nb + 1, dtype=torch.bool, device=counts.device)
    cols = torch.where(valid, indices.long(), nb)
    mask.scatter_(-1, cols, True)
    return mask[..., :nb]


@dataclass
class PatternStats:
    """What the pattern search chose, per (batch, query head).

    ``query_aware``: bool [B, Hq], True where the head took the query-aware pattern.
    ``js_distance``: fp32 [B, Hq], sqrt(JSD) between the true and the estimated
    block distribution of the last queries (NaN where no search ran).
    ``num_blocks``: int64 [B, Hq], selected key blocks summed over query blocks.
    ``density``: fp32 [B, Hq], ``num_blocks`` over the causal grid ``nb*(nb+1)/2``.
    ``dense``: True when the operator ran dense attention (a short sequence, or a selection
    denser than ``FlexPrefillConfig.dense_above``).
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
    ``seq_lens``: optional int32 [B], the valid lengths of a right-padded batch; rows
    past a sequence's last block have count 0 and :meth:`stats` counts density against
    each sequence's own causal grid.
    """

    counts: torch.Tensor
    indices: torch.Tensor
    block_size: int
    seq_len: int
    query_aware: torch.Tensor
    js_distance: torch.Tensor
    seq_lens: torch.Tensor | None = None

    @property
    def num_q_blocks(self) -> int:
        return self.counts.shape[-1]

    def to_mask(self) -> torch.Tensor:
        """Dense bool block mask [B, Hq, nb, nb] (True = computed)."""
        return _to_mask(self.counts, self.indices)

    def stats(self) -> PatternStats:
        num = self.counts.sum(-1, dtype=torch.int64)
        if self.seq_lens is None:
            density = num.float() / num_causal_blocks(self.num_q_blocks)
        else:
            nb = (self.seq_lens.long() + self.block_size - 1) // self.block_size
            density = num.float() / (nb * (nb + 1) // 2).clamp_min(1)[:, None].float()
        return PatternStats(self.query_aware, self.js_distance, num, density)


@dataclass
class VarlenBlockSelection:
    """Selected key blocks of a packed batch of sequences (or chunks of them), per query head.

    ``counts``: int32 [S, Hq, max_nb]; ``indices``: int32 [S, Hq, max_nb, max_nb],
    ascending, -1 past the count, ``max_nb = ceil(max_seqlen_k / block_size)``.  Rows are
    absolute query blocks (see the module docstring): sequence ``s`` with ``n_q`` queries
    over ``n_k`` keys uses rows ``floor((n_k-n_q)/bs) .. ceil(n_k/bs)-1``; all other rows
    have count 0.  ``query_aware`` bool [S, Hq]; ``js_distance`` fp32 [S, Hq] (NaN where a
    sequence ran dense).  ``cu_seqlens_q``/``cu_seqlens_k`` int32 [S+1] and the two maxima
    are the ones the selection was made for.
    """

    counts: torch.Tensor
    indices: torch.Tensor
    block_size: int
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    query_aware: torch.Tensor
    js_distance: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return self.counts.shape[0]

    def to_mask(self) -> torch.Tensor:
        """Dense bool block mask [S, Hq, max_nb, max_nb] (True = computed)."""
        return _to_mask(self.counts, self.indices)

    def stats(self) -> PatternStats:
        """Per (sequence, head); density against the causal blocks of the chunk's rows."""
        num = self.counts.sum(-1, dtype=torch.int64)
        cu_q, cu_k = self.cu_seqlens_q.long(), self.cu_seqlens_k.long()
        first, end = chunk_rows(cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1], self.block_size)
        grid = end * (end + 1) // 2 - first * (first + 1) // 2
        density = num.float() / grid.clamp_min(1)[:, None].float()
        return PatternStats(self.query_aware, self.js_distance, num, density)


def compact_block_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool block mask [..., nb, nb] -> (counts int32 [..., nb], ascending indices int32 [..., nb, nb], -1 padded).

    A cumulative sum gives each kept block its slot, a scatter writes it there: no sort,
    no host sync.  Entries above the block diagonal must already be False.
    """
    nb = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    slot = torch.where(mask, mask.cumsum(-1, dtype=torch.int32) - 1, nb)
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


# --- fixed tables: every causal block, a sliding-window band ---------------------------


def chunk_row_mask(q_starts, q_ends, k_starts, k_ends, max_nb: int, block_size: int):
    """Bool [S, max_nb]: the absolute query blocks holding queries of each chunk; and the
    blocks of each sequence [S] (``ceil(n_k / bs)``).  Bounds as int32 device tensors [S]
    (rows ``[q_starts, q_ends)`` of q, ``[k_starts, k_ends)`` of k); no host sync."""
    n_q, n_k = (q_ends - q_starts).long(), (k_ends - k_starts).long()
    first, end = chunk_rows(n_q, n_k, block_size)
    r = torch.arange(max_nb, device=q_starts.device)[None, :]
    return (r >= first[:, None]) & (r < end[:, None]), end


def full_causal_selection(B: int, Hq: int, N: int, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every causal block: counts int32 [B, Hq, nb] and indices int32 [B, Hq, nb, nb].

    Both are broadcast views (stride 0 over batch and heads): one [nb, nb] table in memory.
    """
    nb = math.ceil(N / block_size)
    r = torch.arange(nb, dtype=torch.int32, device=device)
    counts = (r + 1).expand(B, Hq, nb)
    indices = torch.where(r[None, :] <= r[:, None], r[None, :], -1).to(torch.int32).expand(B, Hq, nb, nb)
    return counts, indices


def full_causal_selection_varlen(q_starts, q_ends, k_starts, k_ends, Hq: int, max_seqlen_k: int, block_size: int):
    """Every causal block of each chunk's rows: counts int32 [S, Hq, max_nb], indices int32 [S, Hq, max_nb, max_nb].

    Broadcast over heads (stride 0); built on the device without a sync.
    """
    max_nb = math.ceil(max_seqlen_k / block_size)
    live, _ = chunk_row_mask(q_starts, q_ends, k_starts, k_ends, max_nb, block_size)
    r = torch.arange(max_nb, device=q_starts.device)
    counts = torch.where(live, r[None, :] + 1, 0).to(torch.int32)
    keep = live[:, :, None] & (r[None, :] <= r[:, None])[None]
    indices = torch.where(keep, r[None, None, :], -1).to(torch.int32)
    S = counts.shape[0]
    return counts[:, None].expand(S, Hq, max_nb), indices[:, None].expand(S, Hq, max_nb, max_nb)


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
        hit = band_table(nb, block_size, window, device)
        # a table built inside a graph capture lives in the graph's pool: not kept
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _BAND_CACHE[key] = hit
            while len(_BAND_CACHE) > _BAND_CACHE_SIZE:
                _BAND_CACHE.popitem(last=False)
    else:
        _BAND_CACHE.move_to_end(key)
    counts, indices = hit
    return counts.expand(B, Hq, nb), indices.expand(B, Hq, *indices.shape)


def band_table(nb: int, block_size: int, window: int, device) -> tuple[torch.Tensor, torch.Tensor]:
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
