"""The pattern search in plain PyTorch, every head at once: the search of the "torch" backend.

The plain-torch twin of this package's Triton search (it imports nothing from Triton).  It
computes exactly what :func:`flexprefill.reference.select_blocks` computes, with the same
operations in the same order per head (so the same fp32 roundings, the same ranks and the
same tie-breaking: stable sorts, lower index first), but batched over sequences and heads:
no Python loop over heads or blocks.  Tested head by head against the oracle in
tests/search/test_torch_search.py.
"""

from __future__ import annotations

import math

import torch

from ..block_table import BlockSelection, VarlenBlockSelection, compact_block_mask, mask_to_selection
from ..config import FlexPrefillConfig
from ..reference import block_means, estimated_block_distribution, js_distance, soft_cap

__all__ = ["select_blocks", "select_blocks_varlen"]

# bytes of the representative queries' fp32 scores computed at once (heads in chunks)
_SCORE_BYTES = 256 << 20


def select_blocks(q, k, *, config: FlexPrefillConfig | None = None, softmax_scale: float | None = None,
                  softcap: float | None = None) -> BlockSelection:
    """Steps 1-4 for a batch ``q [B, n_q, Hq, D]``, ``k [B, n_k, Hkv, D]`` (queries = last ``n_q`` positions;
    ``softcap``: the scores soft-capped, as in the oracle)."""
    cfg = config or FlexPrefillConfig()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    masks, query_aware, dist = select_masks(q, k, cfg, scale, softcap)
    return mask_to_selection(masks, block_size=cfg.block_size, seq_len=q.shape[1], query_aware=query_aware,
                             js_distance=dist)


def select_blocks_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                         config: FlexPrefillConfig | None = None, softmax_scale: float | None = None,
                         dense_below: int = 0, softcap: float | None = None) -> VarlenBlockSelection:
    """:func:`flexprefill.reference.select_blocks_varlen`, each sequence searched with all its heads at once
    (a loop over sequences only; reads ``cu_seqlens`` on the host)."""
    cfg = config or FlexPrefillConfig()
    Hq, D = q.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bs = cfg.block_size
    max_nb = math.ceil(max_seqlen_k / bs)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    S = len(cq) - 1
    masks = torch.zeros(S, Hq, max_nb, max_nb, dtype=torch.bool, device=q.device)
    query_aware = torch.zeros(S, Hq, dtype=torch.bool, device=q.device)
    dist = torch.full((S, Hq), float("nan"), device=q.device)
    for s in range(S):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        n_q, n_k = q1 - q0, k1 - k0
        nb = math.ceil(n_k / bs)
        if n_k < dense_below or n_q == 0:
            r0 = (n_k - n_q) // bs if n_q > 0 else nb
            full = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
            full[:r0] = False
            masks[s, :, :nb, :nb] = full
            continue
        m, qa, d = select_masks(q[None, q0:q1], k[None, k0:k1], cfg, scale, softcap)
        masks[s, :, :nb, :nb] = m[0]
        query_aware[s], dist[s] = qa[0], d[0]
    ar = torch.arange(max_nb, device=q.device)
    counts, indices = compact_block_mask(masks & (ar[None, :] <= ar[:, None]))
    return VarlenBlockSelection(
        counts=counts, indices=indices, block_size=bs, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, query_aware=query_aware, js_distance=dist,
    )


def representative_block_scores(q, k, *, block_size: int, scale: float, softcap: float | None = None):
    """:func:`flexprefill.reference.representative_block_scores`, all heads at once: vert, slash fp32 [B, Hq, nb]."""
    B, n_q, Hq, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    nb = math.ceil(N / block_size)
    n_rep = min(block_size, n_q)
    dev = q.device
    pos_q = torch.arange(N - n_rep, N, device=dev)
    pos_k = torch.arange(N, device=dev)
    key_blk = torch.div(pos_k, block_size, rounding_mode="floor")
    offset_blk = torch.div(pos_q, block_size, rounding_mode="floor")[:, None] - key_blk[None, :]  # [n_rep, N]
    causal = offset_blk >= 0
    future = pos_k[None, :] > pos_q[:, None]
    # the oracle adds the causal pairs row-major over (query, key); here every pair is added in
    # that order, the others (weight 0) into a spare bin nb: the same sums in the same order
    bins = torch.where(causal, offset_blk, nb).view(-1)
    X, G = B * Hq, B * Hkv
    kh = k.float().permute(0, 2, 3, 1).reshape(G, D, N)
    if n_rep < 16:
        # few queries: one matmul per query head, K repeated (small products take other matmul
        # kernels, whose roundings would differ from the oracle's per-head products)
        kh = kh.repeat_interleave(group, dim=0)
        G, group = X, 1
    # the query heads of one KV head side by side: [G, group * n_rep, D] against that head's keys,
    # one matmul per KV head (no copy of K per query head; the same products, bit for bit)
    qh = q[:, n_q - n_rep:].float().permute(0, 2, 1, 3).reshape(G, group * n_rep, D)
    vert = torch.zeros(X, nb, dtype=torch.float32, device=dev)
    slash = torch.zeros(X, nb + 1, dtype=torch.float32, device=dev)
    # KV heads in chunks: the scores of one chunk stay under _SCORE_BYTES
    step = max(1, _SCORE_BYTES // max(1, group * n_rep * N * 4))
    for g0 in range(0, G, step):
        g1 = min(G, g0 + step)
        h0, h1 = g0 * group, g1 * group
        s = soft_cap(torch.matmul(scale * qh[g0:g1], kh[g0:g1]), softcap).view(h1 - h0, n_rep, N)
        s.masked_fill_(future, float("-inf"))
        a = torch.softmax(s, dim=-1).div_(n_rep)  # [n, n_rep, N]
        del s
        vert[h0:h1].scatter_add_(1, key_blk.expand(h1 - h0, N), a.sum(1))
        slash[h0:h1].scatter_add_(1, bins.expand(h1 - h0, -1), a.view(h1 - h0, -1))
    vert, slash = vert.view(B, Hq, nb), slash.view(B, Hq, nb + 1)
    return vert, slash[:, :, :nb].contiguous()


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim, largest first (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


def _count_to_mass(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per row of ``scores [..., n]``: the fewest entries, largest first, whose sum reaches ``gamma`` of the total."""
    n = scores.shape[-1]
    if gamma >= 1.0:
        return torch.full(scores.shape[:-1], n, dtype=torch.int64, device=scores.device)
    cum = torch.sort(scores, descending=True, stable=True).values.cumsum(-1)
    return ((cum < gamma * cum[..., -1:]).sum(-1) + 1).clamp_max(n)


def _vertical_slash(vert, slash, n_v, n_s, rows=None, with_score=True):
    """Block masks [X, R, nb] of the sink, the diagonal, the top ``n_v`` columns and top ``n_s`` offsets
    (``n_v, n_s`` int [X]) on the query blocks ``rows`` (int [R], absolute; default all ``nb``), and the
    score each block was chosen by (None unless ``with_score``: only the per-row cap reads it)."""
    X, nb = vert.shape
    vsel = _rank(vert) < n_v[:, None]
    vsel[:, 0] = True
    ssel = _rank(slash) < n_s[:, None]
    ssel[:, 0] = True
    r = (torch.arange(nb, device=vert.device) if rows is None else rows)[:, None]
    c = torch.arange(nb, device=vert.device)[None, :]
    off = (r - c).clamp_min(0)
    mask = (vsel[:, None, :] | ssel[:, off]) & (c <= r)
    if not with_score:
        return mask, None
    score = torch.maximum(vert[:, None, :].expand(X, r.shape[0], nb), slash[:, off])
    return mask, score


def top_mass(flat: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per row of ``flat [A, n]``: the fewest entries, largest first (ties: lower index first), whose
    sum reaches ``gamma`` of the row's total, as a bool mask [A, n]."""
    return _rank(flat) < _count_to_mass(flat, gamma)[:, None]


def select_masks(q, k, cfg: FlexPrefillConfig, scale: float, softcap: float | None = None):
    """:func:`flexprefill.reference._select_masks`, all heads at once: masks [B, Hq, nb, nb], query_aware, JS [B, Hq]."""
    n_q = q.shape[1]
    N = k.shape[1]
    P = N - n_q
    bs = cfg.block_size
    nb = math.ceil(N / bs)
    r0 = P // bs if n_q > 0 else nb

    vert, slash = representative_block_scores(q, k, block_size=bs, scale=scale, softcap=softcap)
    a_est = estimated_block_distribution(q, k, block_size=bs, scale=scale, softcap=softcap)
    dist = js_distance(vert, a_est)
    query_aware = dist < cfg.tau
    masks = torch.zeros(q.shape[0], q.shape[2], nb, nb, dtype=torch.bool, device=q.device)
    if nb - r0 == 0:
        return masks, query_aware, dist
    q_bar = k_bar = None
    if bool(query_aware.any()):
        q_bar = block_means(q, bs, offset=P)[:, r0:]
        k_bar = block_means(k, bs)
    rows = torch.arange(r0, nb, device=q.device)
    masks[:, :, r0:] = row_masks(vert, slash, query_aware, q_bar, k_bar, rows, cfg=cfg, scale=scale,
                                 num_rows=nb - r0, select=top_mass, softcap=softcap)
    return masks, query_aware, dist


def row_masks(vert, slash, query_aware, q_bar, k_bar, rows, *, cfg: FlexPrefillConfig, scale: float, num_rows: int,
              select=top_mass, softcap: float | None = None):
    """Step 4 on some query blocks of a search whose steps 1-3 are done: bool masks [B, Hq, R, nb].

    Args:
        vert, slash: fp32 [B, Hq, nb], the pooled scores of the whole sequence.
        query_aware: bool [B, Hq].
        q_bar: fp32 [B, R, Hq, D], the block means of the queries of ``rows``; k_bar: fp32
            [B, nb, Hkv, D], of all keys (both may be None when no head is query-aware).
        rows: int [R], the absolute query blocks to build (each holds queries).
        num_rows: the query blocks of the whole chunk, over which a query-aware head's
            flattened scores are normalised.
        select: ``select(flat [A, R * nb], gamma) -> bool [A, R * nb]``, the entries a
            query-aware head keeps (:func:`top_mass` when ``rows`` are all the chunk's rows;
            a split search passes its collective version).
        softcap: the logit soft-cap of the query-aware scores, or None.

    Each row depends on ``rows`` only through its own index, except the query-aware ranking,
    which ``select`` sees whole.
    """
    B, Hq, nb = vert.shape
    R = rows.numel()
    X = B * Hq
    min_b, max_b = cfg.min_budget_blocks, cfg.max_budget_blocks
    dev = vert.device
    vert, slash = vert.reshape(X, nb), slash.reshape(X, nb)
    qa = query_aware.reshape(X)
    c = torch.arange(nb, device=dev)
    causal = c[None, :] <= rows[:, None]  # [R, nb]
    eye = c[None, :] == rows[:, None]

    # vertical-slash heads: budgets from the gamma rule, clamped
    def clamp(n):
        n = n.clamp_min(min_b)
        if max_b is not None:
            n = n.clamp_max(max_b)
        return n.clamp_max(nb)

    n_v, n_s = clamp(_count_to_mass(vert, cfg.gamma)), clamp(_count_to_mass(slash, cfg.gamma))
    mask, score = _vertical_slash(vert, slash, n_v, n_s, rows, with_score=max_b is not None)

    aware = qa.nonzero()[:, 0]
    if aware.numel():
        D = q_bar.shape[-1]
        group = Hq // k_bar.shape[2]
        qb = q_bar.permute(0, 2, 1, 3).reshape(X, R, D)[aware]  # [A, R, D]
        kb = k_bar.permute(0, 2, 3, 1).repeat_interleave(group, dim=1).reshape(X, D, nb)[aware]
        logits = soft_cap(torch.matmul(scale * qb, kb), softcap)  # [A, R, nb]
        s_rows = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        flat = s_rows.reshape(-1, R * nb) / num_rows
        sel = select(flat, cfg.gamma).view(-1, R, nb)
        n_min = torch.full((aware.numel(),), min(min_b, nb), dtype=torch.int64, device=dev)
        floor, _ = _vertical_slash(vert[aware], slash[aware], n_min, n_min, rows, with_score=False)
        m_qa = (sel | floor | eye) & causal
        m_qa[:, :, 0] = True
        mask[aware] = m_qa
        if score is not None:
            score[aware] = s_rows
    if max_b is not None:
        # at most max_b blocks per row by score; the sink and the diagonal always stay
        prio = score.clone()
        prio[:, :, 0] = float("inf")
        prio[:, eye] = float("inf")
        prio[~mask] = float("-inf")
        floor_n = torch.where(rows == 0, max(max_b, 1), max(max_b, 2))
        n = torch.minimum(mask.sum(-1), floor_n)
        mask = (_rank(prio) < n[..., None]) & mask
    return mask.view(B, Hq, R, nb)
