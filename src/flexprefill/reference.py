"""FlexPrefill in plain PyTorch, fp32, one head at a time: the oracle for every test.

Readable over fast: loops over batches and heads, token-level masks.  Follows the
method's steps one by one.  Works on CPU and GPU tensors.
Layout: q [B, N, Hq, D], k and v [B, N, Hkv, D].

Chunked prefill: the per-sequence functions also accept ``k, v [B, n_k, Hkv, D]`` longer
than ``q [B, n_q, Hq, D]``.  The queries are then the *last* ``n_q`` positions (a cached
prefix of ``P = n_k - n_q`` keys, bottom-right causal alignment as in FlashAttention):
query ``i`` sits at absolute position ``P + i`` and sees keys ``j <= P + i``.  Blocks are
aligned to absolute positions; the selection's rows are absolute query blocks
``floor(P/bs) .. ceil(n_k/bs)-1`` (others empty).  With ``n_q == n_k`` nothing changes.
The ``*_varlen`` functions run these per sequence of a packed batch (``cu_seqlens``).
"""

from __future__ import annotations

import math

import torch

from .config import FlexPrefillConfig
from .block_table import (
    BlockSelection,
    PatternStats,
    VarlenBlockSelection,
    compact_block_mask,
    mask_to_selection,
    num_causal_blocks,
)

__all__ = [
    "soft_cap",
    "block_means",
    "representative_block_scores",
    "estimated_block_distribution",
    "estimate_from_means",
    "js_distance",
    "count_to_mass",
    "select_blocks",
    "block_sparse_attention",
    "dense_attention",
    "flex_prefill_attention",
    "select_blocks_varlen",
    "block_sparse_attention_varlen",
    "dense_attention_varlen",
    "flex_prefill_attention_varlen",
]

_EPS = 1e-10


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logit soft-capping (Gemma 2): ``softcap * tanh(scores / softcap)``; ``scores`` unchanged when
    ``softcap`` is None.  ``scores`` are the scaled ones (``scale * q . k``), capped before any mask."""
    if softcap is None:
        return scores
    return softcap * torch.tanh(scores / softcap)


def block_means(x: torch.Tensor, block_size: int, offset: int = 0) -> torch.Tensor:
    """Mean of each block of ``block_size`` tokens, real rows only: [B, N, H, D] -> [B, nb, H, D] fp32.

    Token ``i`` sits at absolute position ``offset + i``; block ``c`` covers absolute
    positions ``[c*bs, (c+1)*bs)``, ``nb = ceil((offset + N) / bs)``; a block holding no
    token is 0.
    """
    B, N, H, D = x.shape
    nb = math.ceil((offset + N) / block_size)
    out = torch.zeros(B, nb, H, D, dtype=torch.float32, device=x.device)
    for c in range(nb):
        lo, hi = max(c * block_size - offset, 0), min((c + 1) * block_size - offset, N)
        if hi > lo:
            out[:, c] = x[:, lo:hi].float().mean(dim=1)
    return out


def _block_of(pos: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.div(pos, block_size, rounding_mode="floor")


def representative_block_scores(q, k, *, block_size: int, scale: float, softcap: float | None = None):
    """Steps 1-2: attention of the last ``block_size`` queries, pooled to blocks (scores
    soft-capped by ``softcap`` when given, as the attention they stand for).

    Returns ``vert_blk`` and ``slash_blk``, both fp32 [B, Hq, nb] and summing to 1 per
    head: ``vert_blk[c]`` is the mean attention mass the representative queries put on
    key block ``c``; ``slash_blk[d]`` the mean mass they put on key blocks ``d`` blocks
    behind their own query block (each (query, key) pair counted in the block pair it
    actually hits, so this is exact in block space).  ``k`` may be longer than ``q``
    (chunk over a cached prefix): the representative queries are the chunk's last
    ``min(bs, n_q)`` queries, at absolute positions ``n_k - n_rep .. n_k - 1``.
    """
    B, n_q, Hq, D = q.shape
    N = k.shape[1]
    Hkv = k.shape[2]
    group = Hq // Hkv
    nb = math.ceil(N / block_size)
    n_rep = min(block_size, n_q)
    pos_q = torch.arange(N - n_rep, N, device=q.device)
    pos_k = torch.arange(N, device=q.device)
    key_blk = _block_of(pos_k, block_size)
    offset_blk = _block_of(pos_q, block_size)[:, None] - key_blk[None, :]  # [n_rep, N]
    vert = torch.zeros(B, Hq, nb, dtype=torch.float32, device=q.device)
    slash = torch.zeros(B, Hq, nb, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(Hq):
            qh = q[b, n_q - n_rep :, h].float()
            kh = k[b, :, h // group].float()
            s = soft_cap(scale * qh @ kh.T, softcap)
            s = s.masked_fill(pos_k[None, :] > pos_q[:, None], float("-inf"))
            a = torch.softmax(s, dim=-1) / n_rep  # [n_rep, N], rows of 1/n_rep
            vert[b, h].index_add_(0, key_blk, a.sum(0))
            causal = offset_blk >= 0
            slash[b, h].index_add_(0, offset_blk[causal], a[causal])
    return vert, slash


def estimated_block_distribution(q, k, *, block_size: int, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Step 3's estimate: softmax(scale * mean(Q_hat) . K_bar^T) over key blocks, fp32 [B, Hq, nb]
    (the logits soft-capped by ``softcap`` when given)."""
    n_q = q.shape[1]
    n_rep = min(block_size, n_q)
    q_hat = q[:, n_q - n_rep :].float().mean(dim=1)  # [B, Hq, D]
    return estimate_from_means(q_hat, block_means(k, block_size), scale=scale, softcap=softcap)


def estimate_from_means(q_hat: torch.Tensor, k_bar: torch.Tensor, *, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Step 3's estimate from the mean representative query ``q_hat`` fp32 [B, Hq, D] and the
    block means of the keys ``k_bar`` fp32 [B, nb, Hkv, D]: fp32 [B, Hq, nb]."""
    group = q_hat.shape[1] // k_bar.shape[2]
    k_bar = k_bar.repeat_interleave(group, dim=2)  # [B, nb, Hq, D]
    logits = soft_cap(scale * torch.einsum("bhd,bchd->bhc", q_hat, k_bar), softcap)
    return torch.softmax(logits, dim=-1)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt(Jensen-Shannon divergence), natural log, over the last dim."""
    p = p.float() + _EPS
    q = q.float() + _EPS
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    m = 0.5 * (p + q)
    jsd = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    return jsd.clamp_min(0).sqrt()


def count_to_mass(scores: torch.Tensor, gamma: float) -> int:
    """Fewest entries of a 1-D score vector, taken largest first, whose sum reaches ``gamma`` of the total."""
    n = scores.numel()
    if gamma >= 1.0:
        return n
    cum = torch.sort(scores.flatten(), descending=True, stable=True).values.cumsum(0)
    return min(int((cum < gamma * cum[-1]).sum().item()) + 1, n)


def _top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` largest entries (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[:n]] = True
    return keep


def _clamp_budget(n: int, lo: int, hi: int | None, nb: int) -> int:
    n = max(n, lo)
    if hi is not None:
        n = min(n, hi)
    return min(n, nb)


def _vertical_slash(vert: torch.Tensor, slash: torch.Tensor, n_v: int, n_s: int):
    """Block mask [nb, nb] of the sink, the diagonal, the top ``n_v`` columns and top ``n_s`` offsets,
    and the score each kept block was chosen by (for the per-row cap)."""
    nb = vert.numel()
    vsel = _top(vert, n_v)
    vsel[0] = True
    ssel = _top(slash, n_s)
    ssel[0] = True
    r = torch.arange(nb, device=vert.device)[:, None]
    c = torch.arange(nb, device=vert.device)[None, :]
    off = (r - c).clamp_min(0)
    mask = (vsel[c.expand(nb, nb)] | ssel[off]) & (c <= r)
    score = torch.maximum(vert[c.expand(nb, nb)], slash[off])
    return mask, score


def _cap_rows(mask: torch.Tensor, score: torch.Tensor, max_blocks: int) -> torch.Tensor:
    """Keep at most ``max_blocks`` blocks per row by score; the sink and diagonal always stay."""
    nb = mask.shape[0]
    eye = torch.eye(nb, dtype=torch.bool, device=mask.device)
    prio = score.clone()
    prio[:, 0] = float("inf")
    prio[eye] = float("inf")
    prio[~mask] = float("-inf")
    out = torch.zeros_like(mask)
    for r in range(nb):
        n = min(int(mask[r].sum()), max(max_blocks, 2 if r > 0 else 1))
        out[r] = _top(prio[r], n) & mask[r]
    return out


def select_blocks(q, k, *, config: FlexPrefillConfig | None = None, softmax_scale: float | None = None,
                  softcap: float | None = None) -> BlockSelection:
    """Steps 1-4: choose each head's pattern and its key blocks (``softcap``: every score of the
    search soft-capped, as in the attention the selection is for)."""
    cfg = config or FlexPrefillConfig()
    N = q.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    masks, query_aware, dist = _select_masks(q, k, cfg, scale, softcap)
    return mask_to_selection(masks, block_size=cfg.block_size, seq_len=N, query_aware=query_aware, js_distance=dist)


def _select_masks(q, k, cfg: FlexPrefillConfig, scale: float, softcap: float | None = None):
    """Block masks [B, Hq, nb, nb] (absolute rows, ``nb = ceil(n_k/bs)``), query_aware and JS distance [B, Hq].

    ``q [B, n_q, Hq, D]`` are the last ``n_q`` of ``n_k`` positions.  Only the chunk's rows
    ``r0 = floor(P/bs) .. nb-1`` are filled: the query-aware scores ``S`` are computed and
    flattened over those rows only (divided by their number), the vertical-slash
    expansion, the sink and the diagonal are applied to those rows only.  ``softcap``
    caps the representative scores, the estimate's and the query-aware block logits.
    """
    B, n_q, Hq, D = q.shape
    N = k.shape[1]
    P = N - n_q
    group = Hq // k.shape[2]
    bs = cfg.block_size
    nb = math.ceil(N / bs)
    r0 = P // bs if n_q > 0 else nb
    rows = nb - r0
    min_b, max_b = cfg.min_budget_blocks, cfg.max_budget_blocks

    vert, slash = representative_block_scores(q, k, block_size=bs, scale=scale, softcap=softcap)
    a_est = estimated_block_distribution(q, k, block_size=bs, scale=scale, softcap=softcap)
    dist = js_distance(vert, a_est)
    query_aware = dist < cfg.tau

    q_bar = block_means(q, bs, offset=P)
    k_bar = block_means(k, bs)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    # rows that hold queries of this chunk
    live = (torch.arange(nb, device=q.device) >= r0)[:, None]
    masks = torch.zeros(B, Hq, nb, nb, dtype=torch.bool, device=q.device)
    for b in range(B):
        for h in range(Hq):
            if rows == 0:
                continue
            if query_aware[b, h]:
                logits = soft_cap(scale * q_bar[b, r0:, h] @ k_bar[b, :, h // group].T, softcap)
                s_rows = torch.softmax(logits.masked_fill(~causal[r0:], float("-inf")), dim=-1)
                flat = s_rows.flatten() / rows
                sel = torch.zeros(nb, nb, dtype=torch.bool, device=q.device)
                sel[r0:] = _top(flat, count_to_mass(flat, cfg.gamma)).view(rows, nb)
                s = torch.zeros(nb, nb, device=q.device)
                s[r0:] = s_rows
                floor, _ = _vertical_slash(vert[b, h], slash[b, h], min(min_b, nb), min(min_b, nb))
                mask = (sel | floor | torch.eye(nb, dtype=torch.bool, device=q.device)) & causal
                mask[:, 0] = True
                score = s
            else:
                n_v = _clamp_budget(count_to_mass(vert[b, h], cfg.gamma), min_b, max_b, nb)
                n_s = _clamp_budget(count_to_mass(slash[b, h], cfg.gamma), min_b, max_b, nb)
                mask, score = _vertical_slash(vert[b, h], slash[b, h], n_v, n_s)
            mask = mask & live
            if max_b is not None:
                mask = _cap_rows(mask, score, max_b)
            masks[b, h] = mask
    return masks, query_aware, dist


def _attend(q, k, v, allowed, scale, return_lse, softcap=None):
    """Exact softmax attention in fp32 where ``allowed`` [B, Hq, n_q, n_k] is True (scores
    soft-capped by ``softcap`` when given; the lse is that of the capped scores)."""
    B, N, Hq, D = q.shape
    group = Hq // k.shape[2]
    out = torch.empty(B, N, Hq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(Hq):
            s = soft_cap(scale * q[b, :, h].float() @ k[b, :, h // group].float().T, softcap)
            s = s.masked_fill(~allowed[b, h], float("-inf"))
            lse[b, h] = torch.logsumexp(s, dim=-1)
            out[b, :, h] = torch.softmax(s, dim=-1) @ v[b, :, h // group].float()
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def block_sparse_attention(q, k, v, selection: BlockSelection, *, softmax_scale: float | None = None, return_lse: bool = False,
                           softcap: float | None = None):
    """Step 5: causal attention of each query block over its selected key blocks, fp32."""
    D = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    return _block_sparse(q, k, v, selection.to_mask(), selection.block_size, scale, return_lse, softcap)


def _causal(n_q: int, n_k: int, device) -> torch.Tensor:
    """Token mask [n_q, n_k]: query ``i`` (absolute position ``n_k - n_q + i``) sees keys ``j <= n_k - n_q + i``."""
    pos_q = torch.arange(n_k - n_q, n_k, device=device)
    return torch.arange(n_k, device=device)[None, :] <= pos_q[:, None]


def _block_sparse(q, k, v, block_mask, bs, scale, return_lse, softcap=None):
    """Attention where the absolute block pair is in ``block_mask`` [B, Hq, >=nb, >=nb] and causal."""
    n_q, n_k = q.shape[1], k.shape[1]
    blk_q = _block_of(torch.arange(n_k - n_q, n_k, device=q.device), bs)
    blk_k = _block_of(torch.arange(n_k, device=q.device), bs)
    token_mask = block_mask[:, :, blk_q][:, :, :, blk_k]
    return _attend(q, k, v, token_mask & _causal(n_q, n_k, q.device), scale, return_lse, softcap)


def dense_attention(q, k, v, *, softmax_scale: float | None = None, return_lse: bool = False, window: int | None = None,
                    softcap: float | None = None):
    """Dense causal attention in fp32 (GQA by head index), output in the input dtype.

    ``k, v`` may be longer than ``q``: bottom-right alignment (the queries are the last positions).
    ``window``: a sliding window, key ``j`` visible from position ``i`` when ``i - window < j <= i``.
    ``softcap``: scores become ``softcap * tanh(scores / softcap)`` before the softmax.
    """
    B, N, Hq, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    causal = _causal(N, k.shape[1], q.device)
    if window is not None:
        pos_q = torch.arange(k.shape[1] - N, k.shape[1], device=q.device)
        causal = causal & (torch.arange(k.shape[1], device=q.device)[None, :] > pos_q[:, None] - window)
    return _attend(q, k, v, causal.expand(B, Hq, *causal.shape), scale, return_lse, softcap)


def dense_stats(B: int, Hq: int, N: int, block_size: int, device) -> PatternStats:
    """Stats of a dense run: every causal block computed, no search."""
    nb = math.ceil(N / block_size)
    return PatternStats(
        query_aware=torch.zeros(B, Hq, dtype=torch.bool, device=device),
        js_distance=torch.full((B, Hq), float("nan"), device=device),
        num_blocks=torch.full((B, Hq), num_causal_blocks(nb), dtype=torch.int64, device=device),
        density=torch.ones(B, Hq, device=device),
        dense=True,
    )


def too_dense(counts: torch.Tensor, cfg: FlexPrefillConfig) -> bool:
    """True when ``cfg.dense_above`` is set and the selection (counts [B, Hq, nb]) keeps more
    than that share of the causal blocks; reads one number on the host.  False while a CUDA
    graph is being captured (no host read is possible there)."""
    if cfg.dense_above is None:
        return False
    if counts.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    nb = counts.shape[-1]
    kept = counts.sum(dtype=torch.int64).item()
    return kept > cfg.dense_above * (counts.numel() // nb) * num_causal_blocks(nb)


def flex_prefill_attention(q, k, v, *, config=None, softmax_scale=None, return_lse=False, return_stats=False, softcap=None):
    """The whole operator in plain PyTorch (no input checks: see flexprefill.flex_prefill_attention)."""
    cfg = (config or FlexPrefillConfig()).resolved(q, k)
    B, N, Hq, _ = q.shape
    if N < cfg.min_seq_len:
        res = dense_attention(q, k, v, softmax_scale=softmax_scale, return_lse=return_lse, softcap=softcap)
        stats = dense_stats(B, Hq, N, cfg.block_size, q.device)
    else:
        sel = select_blocks(q, k, config=cfg, softmax_scale=softmax_scale, softcap=softcap)
        stats = sel.stats()
        if not return_lse and too_dense(sel.counts, cfg):
            res = dense_attention(q, k, v, softmax_scale=softmax_scale, softcap=softcap)
            stats.dense = True
        else:
            res = block_sparse_attention(q, k, v, sel, softmax_scale=softmax_scale, return_lse=return_lse, softcap=softcap)
    res = res if isinstance(res, tuple) else (res,)
    if return_stats:
        res = res + (stats,)
    return res[0] if len(res) == 1 else res


# --- packed variable-length batches and chunked prefill ----------------------------


def _bounds(cu_seqlens_q, cu_seqlens_k) -> list[tuple[int, int, int, int]]:
    """(q_start, q_end, k_start, k_end) per sequence; reads cu_seqlens on the host (oracle only)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _full_rows(nb: int, n_q: int, n_k: int, bs: int, device) -> torch.Tensor:
    """Every causal block of a chunk's rows: bool [nb, nb]."""
    r0 = (n_k - n_q) // bs if n_q > 0 else nb
    mask = torch.ones(nb, nb, dtype=torch.bool, device=device).tril()
    mask[:r0] = False
    return mask


def select_blocks_varlen(
    q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
    config: FlexPrefillConfig | None = None, softmax_scale: float | None = None, dense_below: int = 0,
    softcap: float | None = None,
) -> VarlenBlockSelection:
    """Steps 1-4 per sequence of a packed batch: ``q [total_q, Hq, D]``, ``k [total_k, Hkv, D]``.

    Each sequence is :func:`select_blocks` of its chunk (queries = last ``n_q`` of ``n_k``
    positions), laid out in absolute rows of a ``[S, Hq, max_nb, max_nb]`` grid.  A
    sequence with ``n_k < dense_below`` gets every causal block of its rows (no search,
    ``js_distance`` NaN, not query-aware).
    """
    cfg = config or FlexPrefillConfig()
    Hq, D = q.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bs = cfg.block_size
    max_nb = math.ceil(max_seqlen_k / bs)
    bounds = _bounds(cu_seqlens_q, cu_seqlens_k)
    S = len(bounds)
    masks = torch.zeros(S, Hq, max_nb, max_nb, dtype=torch.bool, device=q.device)
    query_aware = torch.zeros(S, Hq, dtype=torch.bool, device=q.device)
    dist = torch.full((S, Hq), float("nan"), device=q.device)
    for s, (q0, q1, k0, k1) in enumerate(bounds):
        n_q, n_k = q1 - q0, k1 - k0
        nb = math.ceil(n_k / bs)
        if n_k < dense_below or n_q == 0:
            masks[s, :, :nb, :nb] = _full_rows(nb, n_q, n_k, bs, q.device)
            continue
        m, qa, d = _select_masks(q[None, q0:q1], k[None, k0:k1], cfg, scale, softcap)
        masks[s, :, :nb, :nb] = m[0]
        query_aware[s], dist[s] = qa[0], d[0]
    ar = torch.arange(max_nb, device=q.device)
    counts, indices = compact_block_mask(masks & (ar[None, :] <= ar[:, None]))
    return VarlenBlockSelection(
        counts=counts, indices=indices, block_size=bs, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, query_aware=query_aware, js_distance=dist,
    )


def block_sparse_attention_varlen(
    q, k, v, selection: VarlenBlockSelection, cu_seqlens_q, cu_seqlens_k, *,
    softmax_scale: float | None = None, return_lse: bool = False, softcap: float | None = None,
):
    """Step 5 per sequence: ``out [total_q, Hq, D]``, ``lse [Hq, total_q]`` fp32 (FlashAttention's varlen layout)."""
    total_q, Hq, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    block_mask = selection.to_mask()
    out = torch.zeros(total_q, Hq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((Hq, total_q), float("-inf"), device=q.device)
    for s, (q0, q1, k0, k1) in enumerate(_bounds(cu_seqlens_q, cu_seqlens_k)):
        if q1 == q0:
            continue
        o, l = _block_sparse(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], block_mask[s : s + 1], selection.block_size, scale,
                             True, softcap)
        out[q0:q1], lse[:, q0:q1] = o[0], l[0]
    return (out, lse) if return_lse else out


def dense_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale: float | None = None, return_lse: bool = False,
                           window: int | None = None, softcap: float | None = None):
    """Dense causal attention per sequence (bottom-right aligned), fp32: ``out [total_q, Hq, D]``, ``lse [Hq, total_q]``
    (``window``, ``softcap``: as in :func:`dense_attention`)."""
    total_q, Hq, D = q.shape
    out = torch.zeros(total_q, Hq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((Hq, total_q), float("-inf"), device=q.device)
    for q0, q1, k0, k1 in _bounds(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0:
            continue
        o, l = dense_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], softmax_scale=softmax_scale, return_lse=True,
                               window=window, softcap=softcap)
        out[q0:q1], lse[:, q0:q1] = o[0], l[0]
    return (out, lse) if return_lse else out


def flex_prefill_attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
    config=None, softmax_scale=None, return_lse=False, return_stats=False, softcap=None,
):
    """The whole operator per sequence of a packed batch (no input checks).

    A sequence with ``n_k < config.min_seq_len`` runs dense attention (every causal block
    of its rows).  ``stats.dense`` is True when ``max_seqlen_k < min_seq_len`` (no search at all).
    """
    cfg = (config or FlexPrefillConfig()).resolved(q, k)
    sel = select_blocks_varlen(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        config=cfg, softmax_scale=softmax_scale, dense_below=cfg.min_seq_len, softcap=softcap,
    )
    res = block_sparse_attention_varlen(q, k, v, sel, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale, return_lse=return_lse,
                                        softcap=softcap)
    stats = sel.stats()
    stats.dense = max_seqlen_k < cfg.min_seq_len
    res = res if isinstance(res, tuple) else (res,)
    if return_stats:
        res = res + (stats,)
    return res[0] if len(res) == 1 else res
