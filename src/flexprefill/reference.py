"""FlexPrefill in plain PyTorch, fp32, one head at a time: the oracle for every test.

Readable over fast: loops over batches and heads, token-level masks.  Follows
shared/design/ALGORITHM.md step by step.  Works on CPU and GPU tensors.
Layout: q [B, N, Hq, D], k and v [B, N, Hkv, D].
"""

from __future__ import annotations

import math

import torch

from .config import FlexPrefillConfig
from .selection import BlockSelection, PatternStats, mask_to_selection, num_causal_blocks

__all__ = [
    "block_means",
    "representative_block_scores",
    "estimated_block_distribution",
    "js_distance",
    "count_to_mass",
    "select_blocks",
    "block_sparse_attention",
    "dense_attention",
    "flex_prefill_attention",
]

_EPS = 1e-10


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block of ``block_size`` tokens, real rows only: [B, N, H, D] -> [B, nb, H, D] fp32."""
    B, N, H, D = x.shape
    nb = math.ceil(N / block_size)
    out = torch.empty(B, nb, H, D, dtype=torch.float32, device=x.device)
    for c in range(nb):
        out[:, c] = x[:, c * block_size : (c + 1) * block_size].float().mean(dim=1)
    return out


def _block_of(pos: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.div(pos, block_size, rounding_mode="floor")


def representative_block_scores(q, k, *, block_size: int, scale: float):
    """Steps 1-2: attention of the last ``block_size`` queries, pooled to blocks.

    Returns ``vert_blk`` and ``slash_blk``, both fp32 [B, Hq, nb] and summing to 1 per
    head: ``vert_blk[c]`` is the mean attention mass the representative queries put on
    key block ``c``; ``slash_blk[d]`` the mean mass they put on key blocks ``d`` blocks
    behind their own query block (each (query, key) pair counted in the block pair it
    actually hits, so this is exact in block space).
    """
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    nb = math.ceil(N / block_size)
    n_rep = min(block_size, N)
    pos_q = torch.arange(N - n_rep, N, device=q.device)
    pos_k = torch.arange(N, device=q.device)
    key_blk = _block_of(pos_k, block_size)
    offset_blk = _block_of(pos_q, block_size)[:, None] - key_blk[None, :]  # [n_rep, N]
    vert = torch.zeros(B, Hq, nb, dtype=torch.float32, device=q.device)
    slash = torch.zeros(B, Hq, nb, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(Hq):
            qh = q[b, N - n_rep :, h].float()
            kh = k[b, :, h // group].float()
            s = scale * qh @ kh.T
            s = s.masked_fill(pos_k[None, :] > pos_q[:, None], float("-inf"))
            a = torch.softmax(s, dim=-1) / n_rep  # [n_rep, N], rows of 1/n_rep
            vert[b, h].index_add_(0, key_blk, a.sum(0))
            causal = offset_blk >= 0
            slash[b, h].index_add_(0, offset_blk[causal], a[causal])
    return vert, slash


def estimated_block_distribution(q, k, *, block_size: int, scale: float) -> torch.Tensor:
    """Step 3's estimate: softmax(scale * mean(Q_hat) . K_bar^T) over key blocks, fp32 [B, Hq, nb]."""
    B, N, Hq, D = q.shape
    group = Hq // k.shape[2]
    n_rep = min(block_size, N)
    q_hat = q[:, N - n_rep :].float().mean(dim=1)  # [B, Hq, D]
    k_bar = block_means(k, block_size).repeat_interleave(group, dim=2)  # [B, nb, Hq, D]
    logits = scale * torch.einsum("bhd,bchd->bhc", q_hat, k_bar)
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


def select_blocks(q, k, *, config: FlexPrefillConfig | None = None, softmax_scale: float | None = None) -> BlockSelection:
    """Steps 1-4: choose each head's pattern and its key blocks.  See ALGORITHM.md."""
    cfg = config or FlexPrefillConfig()
    B, N, Hq, D = q.shape
    group = Hq // k.shape[2]
    bs = cfg.block_size
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    nb = math.ceil(N / bs)
    min_b, max_b = cfg.min_budget_blocks, cfg.max_budget_blocks

    vert, slash = representative_block_scores(q, k, block_size=bs, scale=scale)
    a_est = estimated_block_distribution(q, k, block_size=bs, scale=scale)
    dist = js_distance(vert, a_est)
    query_aware = dist < cfg.tau

    q_bar = block_means(q, bs)
    k_bar = block_means(k, bs)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    masks = torch.zeros(B, Hq, nb, nb, dtype=torch.bool, device=q.device)
    for b in range(B):
        for h in range(Hq):
            if query_aware[b, h]:
                logits = scale * q_bar[b, :, h] @ k_bar[b, :, h // group].T
                s = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
                flat = s.flatten() / nb
                sel = _top(flat, count_to_mass(flat, cfg.gamma)).view(nb, nb)
                floor, _ = _vertical_slash(vert[b, h], slash[b, h], min(min_b, nb), min(min_b, nb))
                mask = (sel | floor | torch.eye(nb, dtype=torch.bool, device=q.device)) & causal
                mask[:, 0] = True
                score = s
            else:
                n_v = _clamp_budget(count_to_mass(vert[b, h], cfg.gamma), min_b, max_b, nb)
                n_s = _clamp_budget(count_to_mass(slash[b, h], cfg.gamma), min_b, max_b, nb)
                mask, score = _vertical_slash(vert[b, h], slash[b, h], n_v, n_s)
            if max_b is not None:
                mask = _cap_rows(mask, score, max_b)
            masks[b, h] = mask
    return mask_to_selection(masks, block_size=bs, seq_len=N, query_aware=query_aware, js_distance=dist)


def _attend(q, k, v, allowed, scale, return_lse):
    """Exact softmax attention in fp32 where ``allowed`` [B, Hq, N, N] is True."""
    B, N, Hq, D = q.shape
    group = Hq // k.shape[2]
    out = torch.empty(B, N, Hq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(Hq):
            s = scale * q[b, :, h].float() @ k[b, :, h // group].float().T
            s = s.masked_fill(~allowed[b, h], float("-inf"))
            lse[b, h] = torch.logsumexp(s, dim=-1)
            out[b, :, h] = torch.softmax(s, dim=-1) @ v[b, :, h // group].float()
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def block_sparse_attention(q, k, v, selection: BlockSelection, *, softmax_scale: float | None = None, return_lse: bool = False):
    """Step 5: causal attention of each query block over its selected key blocks, fp32."""
    B, N, Hq, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bs = selection.block_size
    blk = _block_of(torch.arange(N, device=q.device), bs)
    block_mask = selection.to_mask()  # [B, Hq, nb, nb]
    token_mask = block_mask[:, :, blk][:, :, :, blk]
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    return _attend(q, k, v, token_mask & causal, scale, return_lse)


def dense_attention(q, k, v, *, softmax_scale: float | None = None, return_lse: bool = False):
    """Dense causal attention in fp32 (GQA by head index), output in the input dtype."""
    B, N, Hq, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    return _attend(q, k, v, causal.expand(B, Hq, N, N), scale, return_lse)


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


def flex_prefill_attention(q, k, v, *, config=None, softmax_scale=None, return_lse=False, return_stats=False):
    """The whole operator in plain PyTorch (no input checks: see flexprefill.flex_prefill_attention)."""
    cfg = config or FlexPrefillConfig()
    B, N, Hq, _ = q.shape
    if N < cfg.min_seq_len:
        res = dense_attention(q, k, v, softmax_scale=softmax_scale, return_lse=return_lse)
        stats = dense_stats(B, Hq, N, cfg.block_size, q.device)
    else:
        sel = select_blocks(q, k, config=cfg, softmax_scale=softmax_scale)
        res = block_sparse_attention(q, k, v, sel, softmax_scale=softmax_scale, return_lse=return_lse)
        stats = sel.stats()
    res = res if isinstance(res, tuple) else (res,)
    if return_stats:
        res = res + (stats,)
    return res[0] if len(res) == 1 else res
