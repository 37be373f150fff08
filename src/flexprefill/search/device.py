"""The pattern search on the device (the entry points of :mod:`flexprefill.search`).

See the package's docstring."""

from __future__ import annotations

import math

import torch

from ..block_table import BlockSelection, chunk_row_mask
from ..config import FlexPrefillConfig
from ..reference import soft_cap
from . import block_sets, graph
from .block_sets import assemble, compact_index_dtype, per_head
from .graph import clear_graph_cache
from .scores import (
    block_means,
    block_means_varlen,
    dense_passes,
    estimate_pattern,
    js_distance_masked,
    representative_block_scores,
    representative_block_scores_varlen,
)

__all__ = [
    "select_blocks_fast",
    "select_blocks_varlen_fast",
    "clear_graph_cache",
    "compact_index_dtype",
    "dense_search",
    "dense_tail",
    "representative_block_scores",
    "representative_block_scores_varlen",
    "block_means",
    "block_means_varlen",
]


def dense_tail(vert, slash, q_hat, k_bar, q_bar, *, cfg: FlexPrefillConfig, scale: float,
               chunk_elems: int = block_sets._CHUNK_ELEMS, index_dtype: torch.dtype = torch.int32, out=None,
               softcap: float | None = None):
    """Everything of the dense search after the passes over q and k: the estimate, the JS
    distance and pattern of each head, the block sets.

    ``vert, slash`` fp32 [B, Hq, nb]; ``q_hat`` fp32 [B, Hq, D]; ``k_bar`` fp32 [B, nb, Hkv, D];
    ``q_bar`` fp32 [B, nb, Hq, D] or None (``tau == 0``).  Returns counts int32 [B*Hq, nb],
    indices [B*Hq, nb, nb] of ``index_dtype``, js distance fp32 [B, Hq], query_aware bool [B, Hq].
    ``out``: (counts, indices) to write (a CUDA graph's static outputs).  ``softcap``: the
    estimate's and the query-aware ranking's block logits soft-capped.
    """
    nb = vert.shape[-1]
    dist, query_aware, k_bar_q = estimate_pattern(vert, q_hat, k_bar, scale=scale, tau=cfg.tau, softcap=softcap)
    qb = kb = None
    if cfg.tau > 0:
        qb, kb = per_head(q_bar), per_head(k_bar_q)
    counts, indices = assemble(vert.reshape(-1, nb), slash.reshape(-1, nb), query_aware.reshape(-1), qb, kb,
                               cfg=cfg, scale=scale, chunk_elems=chunk_elems, index_dtype=index_dtype, out=out,
                               softcap=softcap)
    return counts, indices, dist, query_aware


def dense_search(q, k, *, cfg: FlexPrefillConfig, scale: float, chunk_elems: int, index_dtype: torch.dtype,
                 src: tuple | None = None, out=None, softcap: float | None = None):
    """The whole dense search, eagerly: the passes over q and k, then :func:`dense_tail`.

    ``src``: two int64 [1] tensors holding the addresses to read q and k from (q and k then
    give dtype and layout only); ``out``: (counts, indices) to write.  Both are how a CUDA
    graph binds its inputs and outputs (``graph.call_reading_inputs``)."""
    tensors = dense_passes(q, k, block_size=cfg.block_size, scale=scale, tau=cfg.tau, src=src, softcap=softcap)
    return dense_tail(**tensors, cfg=cfg, scale=scale, chunk_elems=chunk_elems, index_dtype=index_dtype, out=out,
                      softcap=softcap)


def select_blocks_fast(q, k, *, config: FlexPrefillConfig, softmax_scale: float,
                       index_dtype: torch.dtype = torch.int32, softcap: float | None = None) -> BlockSelection:
    """Device version of :func:`flexprefill.reference.select_blocks` (inputs already checked;
    ``softcap``: every score of the search soft-capped).

    ``index_dtype``: int32 (the public :class:`BlockSelection` contract) or int16 (the
    operator's own selections, see :func:`compact_index_dtype`).

    The whole search replays from one CUDA graph where that pays; else the passes over q and
    k run eagerly and the rest replays from a graph of its own where that pays; else all of
    it runs eagerly."""
    cfg = config
    B, N, Hq, D = q.shape
    nb = math.ceil(N / cfg.block_size)
    kw = dict(cfg=cfg, scale=float(softmax_scale), index_dtype=index_dtype, softcap=softcap)
    out = graph.call_reading_inputs(dense_search, q, k, heads=B * Hq, blocks=nb, **kw)
    if out is None:
        tensors = dense_passes(q, k, block_size=cfg.block_size, scale=softmax_scale, tau=cfg.tau, softcap=softcap)
        out = graph.call(dense_tail, tensors, chunk_elems=block_sets.chunk_elems_for(q, k), **kw)
    counts, indices, dist, query_aware = out
    return BlockSelection(
        counts=counts.view(B, Hq, nb),
        indices=indices.view(B, Hq, nb, nb),
        block_size=cfg.block_size,
        seq_len=N,
        query_aware=query_aware,
        js_distance=dist,
    )


# --- packed sequences and chunked prefill -------------------------------------------
#
# Sequences are given by four int32 device tensors [S]: q rows [q_starts, q_ends), k rows
# [k_starts, k_ends) of the packed tensors (views of cu_seqlens, or the rows of a padded
# batch).  Nothing here reads them on the host: per-sequence lengths stay on the device
# and every tensor is padded to max_nb = ceil(max_seqlen_k / bs) blocks.


def select_blocks_varlen_fast(
    q, k, q_starts, q_ends, k_starts, k_ends, max_seqlen_k: int, *,
    config: FlexPrefillConfig, softmax_scale: float, dense_below: int = 0, index_dtype: torch.dtype = torch.int32,
    softcap: float | None = None,
):
    """Device version of :func:`flexprefill.reference.select_blocks_varlen` (inputs already checked;
    ``softcap``: every score of the search soft-capped).

    Returns ``counts`` int32 [S, Hq, max_nb], ``indices`` [S, Hq, max_nb, max_nb] of ``index_dtype``
    (int32, or int16 for the operator's own use),
    ``query_aware`` bool [S, Hq], ``js_distance`` fp32 [S, Hq].  No host sync.  The set
    assembly replays from a CUDA graph where that pays.
    """
    cfg = config
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    group = Hq // Hkv
    S = q_starts.shape[0]
    bs = cfg.block_size
    scale = softmax_scale
    nb = math.ceil(max_seqlen_k / bs)
    dev = q.device
    bounds = (q_starts, q_ends, k_starts, k_ends)
    n_q, n_k = (q_ends - q_starts).long(), (k_ends - k_starts).long()
    live, nb_s = chunk_row_mask(*bounds, nb, bs)  # [S, nb], [S]
    ar = torch.arange(nb, device=dev)
    col_ok = ar[None, :] < nb_s[:, None]  # [S, nb]

    vert, slash = representative_block_scores_varlen(q, k, *bounds, max_seqlen_k, block_size=bs, scale=scale,
                                                     softcap=softcap)
    k_bar = block_means_varlen(k, k_starts, k_ends, k_starts, k_ends, nb, block_size=bs)  # [S, nb, Hkv, D]
    # mean of the representative queries (the last min(bs, n_q) rows of each sequence)
    n_rep = n_q.clamp(min=0, max=bs)
    o_r = torch.arange(bs, device=dev)
    m_rep = o_r[None, :] < n_rep[:, None]
    rows = torch.where(m_rep, q_ends.long()[:, None] - n_rep[:, None] + o_r[None, :], 0)
    q_rep = q[rows.flatten()].view(S, bs, Hq, D)
    q_hat = (q_rep * m_rep[:, :, None, None]).sum(1, dtype=torch.float32) / n_rep.clamp_min(1)[:, None, None]
    k_bar_q = k_bar.repeat_interleave(group, dim=2) if group > 1 else k_bar
    logits = soft_cap(scale * torch.einsum("shd,schd->shc", q_hat, k_bar_q), softcap)
    logits = logits.masked_fill(~col_ok[:, None, :], float("-inf"))
    a_est = torch.softmax(logits, dim=-1)
    dist = js_distance_masked(vert, a_est, col_ok[:, None, :])
    short = (n_k < dense_below) | (n_q == 0)  # [S]: every causal block, no search
    query_aware = (dist < cfg.tau) & ~short[:, None]
    dist = torch.where(short[:, None], float("nan"), dist)

    q_bar = kb = None
    if cfg.tau > 0:
        q_bar = per_head(block_means_varlen(q, *bounds, nb, block_size=bs))  # [S*Hq, nb, D]
        kb = per_head(k_bar_q)
    tensors = dict(
        vert=vert.reshape(-1, nb), slash=slash.reshape(-1, nb), query_aware=query_aware.reshape(-1), q_bar=q_bar, k_bar=kb,
        nb_h=nb_s.repeat_interleave(Hq), live_h=live.repeat_interleave(Hq, dim=0),
        rows_h=live.sum(-1).clamp_min(1).float().repeat_interleave(Hq), short_h=short.repeat_interleave(Hq),
    )
    counts, indices = graph.call(assemble, tensors, chunk_elems=block_sets.chunk_elems_for(q, k), cfg=cfg,
                                 scale=float(scale), index_dtype=index_dtype, softcap=softcap)
    return counts.view(S, Hq, nb), indices.view(S, Hq, nb, nb), query_aware, dist

