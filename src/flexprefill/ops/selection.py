"""FlexPrefill's pattern search on the device: Triton for the streamed scores, batched
PyTorch for the rest.  No host sync and no Python loop over data-dependent values, so
a fixed shape can be captured in a CUDA graph.  Semantics match
``flexprefill.reference.select_blocks`` exactly (same ranks, same tie-breaking).
"""

from __future__ import annotations

import math

import torch
import triton

from ..config import FlexPrefillConfig
from ..reference import js_distance
from ..selection import BlockSelection, compact_block_mask
from .kernels.selection import rep_block_mass_kernel, rep_row_stats_kernel

__all__ = ["select_blocks_fast", "representative_block_scores", "block_means"]

_LOG2E = 1.4426950408889634
# elements of one [heads, nb, nb] working set of the query-aware search; bounds its
# temporaries (sort keys and indices) to roughly 100 MB whatever the length
_CHUNK_ELEMS = 1 << 22


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-block mean over real rows, [B, N, H, D] -> [B, nb, H, D] fp32, without an fp32 copy of x."""
    B, N, H, D = x.shape
    nbf = N // block_size
    parts = []
    if nbf:
        parts.append(x[:, : nbf * block_size].unflatten(1, (nbf, block_size)).sum(2, dtype=torch.float32) / block_size)
    if N % block_size:
        tail = x[:, nbf * block_size :]
        parts.append(tail.sum(1, keepdim=True, dtype=torch.float32) / tail.shape[1])
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def representative_block_scores(q, k, *, block_size: int, scale: float):
    """Vertical and slash block mass of the last ``block_size`` queries, fp32 [B, Hq, nb] each."""
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    nb = math.ceil(N / block_size)
    n_rep = min(block_size, N)
    BR = block_size
    BD = max(16, triton.next_power_of_2(D))
    BK = 64 if BD <= 128 else 32
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    # enough splits to fill the device several times over
    keys_per_split = max(BK, triton.next_power_of_2(max(1, N // max(1, 512 // max(1, B * Hq)))))
    keys_per_split = min(keys_per_split, 8192)
    keys_per_split = math.ceil(keys_per_split / BK) * BK
    num_splits = math.ceil(N / keys_per_split)
    dev = q.device
    m = torch.empty(B * Hq, num_splits, BR, dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    scale_log2 = scale * _LOG2E
    common_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    rep_row_stats_kernel[(B * Hq, num_splits)](
        q, k, m, l, *common_strides,
        N, n_rep, keys_per_split, num_splits, Hq, Hq // Hkv, scale_log2,
        D=D, BD=BD, BR=BR, BK=BK, num_warps=4,
    )
    m_all = m.amax(dim=1)
    m_safe = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    l_all = (l * torch.exp2(m - m_safe[:, None])).sum(dim=1)
    lse2 = (m_safe + torch.log2(l_all)).contiguous()

    vert = torch.empty(B * Hq, nb, dtype=torch.float32, device=dev)
    part = torch.empty(B * Hq, nb, 2, dtype=torch.float32, device=dev)
    rep_block_mass_kernel[(B * Hq, nb)](
        q, k, lse2, vert, part, *common_strides,
        N, n_rep, nb, Hq, Hq // Hkv, scale_log2,
        D=D, BD=BD, BR=BR, BS=block_size, BK=min(BK, block_size), num_warps=4,
    )
    # key block c seen from the last query block sits at offset nb-1-c, from the one
    # before at nb-2-c: flip both parts and shift the second by one
    hi = part[..., 1].flip(-1)
    lo = part[..., 0].flip(-1)
    slash = hi.clone()
    slash[:, :-1] += lo[:, 1:]
    return vert.view(B, Hq, nb), slash.view(B, Hq, nb)


def _count_to_mass(scores: torch.Tensor, gamma: float, sorted_desc: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the fewest largest entries whose sum reaches ``gamma`` of the row total (int64 [...])."""
    n = scores.shape[-1]
    if gamma >= 1.0:
        return torch.full(scores.shape[:-1], n, dtype=torch.int64, device=scores.device)
    if sorted_desc is None:
        sorted_desc = torch.sort(scores, dim=-1, descending=True, stable=True).values
    cum = sorted_desc.cumsum(-1)
    return ((cum < gamma * cum[..., -1:]).sum(-1) + 1).clamp_max(n)


def _top_n(scores: torch.Tensor, n: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``n[...]`` largest entries per row (ties: lower index first)."""
    if order is None:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank_ok = torch.arange(scores.shape[-1], device=scores.device) < n[..., None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank_ok)


def _clamp(n: torch.Tensor, lo: int, hi: int | None, nb: int) -> torch.Tensor:
    n = n.clamp_min(lo)
    if hi is not None:
        n = n.clamp_max(hi)
    return n.clamp_max(nb)


def _vs_sets(vert, slash, n_v, n_s):
    """Per head, the kept columns (sink + top n_v) and diagonals (offset 0 + top n_s): bool [BH, nb] each."""
    vsel = _top_n(vert, n_v)
    vsel[:, 0] = True
    ssel = _top_n(slash, n_s)
    ssel[:, 0] = True
    return vsel, ssel


def _expand_vs(vsel, ssel, off, causal):
    """Rows of the causal block grid from column and diagonal sets: [C, nb] x2 -> [C, nb, nb]."""
    return (vsel[:, None, :] | ssel[:, off]) & causal


def _cap_rows(mask, score, max_blocks: int, eye, causal):
    """Keep at most ``max_blocks`` per row by score; the sink and the diagonal always stay."""
    nb = mask.shape[-1]
    prio = score.masked_fill(~mask, float("-inf"))
    prio = prio.masked_fill(eye, float("inf"))
    prio[..., 0] = float("inf")
    limit = torch.full((nb,), max(max_blocks, 2), device=mask.device, dtype=torch.int64)
    limit[0] = max(max_blocks, 1)
    keep = torch.minimum(mask.sum(-1), limit)
    return _top_n(prio, keep) & mask


def select_blocks_fast(q, k, *, config: FlexPrefillConfig, softmax_scale: float) -> BlockSelection:
    """Device version of :func:`flexprefill.reference.select_blocks` (inputs already checked)."""
    cfg = config
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    bs = cfg.block_size
    scale = softmax_scale
    nb = math.ceil(N / bs)
    dev = q.device
    min_b, max_b = cfg.min_budget_blocks, cfg.max_budget_blocks

    vert, slash = representative_block_scores(q, k, block_size=bs, scale=scale)
    k_bar = block_means(k, bs)  # [B, nb, Hkv, D]
    n_rep = min(bs, N)
    q_hat = q[:, N - n_rep :].sum(1, dtype=torch.float32) / n_rep  # [B, Hq, D]
    k_bar_q = k_bar.repeat_interleave(group, dim=2) if group > 1 else k_bar
    a_est = torch.softmax(scale * torch.einsum("bhd,bchd->bhc", q_hat, k_bar_q), dim=-1)
    dist = js_distance(vert, a_est)
    query_aware = dist < cfg.tau

    BH = B * Hq
    vert_f = vert.reshape(BH, nb)
    slash_f = slash.reshape(BH, nb)
    qa_f = query_aware.reshape(BH)
    n_v = _clamp(_count_to_mass(vert_f, cfg.gamma), min_b, max_b, nb)
    n_s = _clamp(_count_to_mass(slash_f, cfg.gamma), min_b, max_b, nb)
    vsel, ssel = _vs_sets(vert_f, slash_f, n_v, n_s)
    use_qa = cfg.tau > 0
    if use_qa:
        floor_n = torch.full((BH,), min(min_b, nb), dtype=torch.int64, device=dev)
        floor_v, floor_s = _vs_sets(vert_f, slash_f, floor_n, floor_n)
        q_bar = block_means(q, bs).permute(0, 2, 1, 3).reshape(BH, nb, D)  # [BH, nb, D]
        k_bar_h = k_bar.permute(0, 2, 1, 3)  # [B, Hkv, nb, D]

    ar = torch.arange(nb, device=dev)
    causal = ar[None, :] <= ar[:, None]
    eye = ar[None, :] == ar[:, None]
    off = (ar[:, None] - ar[None, :]).clamp_min(0)
    counts = torch.empty(BH, nb, dtype=torch.int32, device=dev)
    indices = torch.empty(BH, nb, nb, dtype=torch.int32, device=dev)
    chunk = max(1, _CHUNK_ELEMS // (nb * nb))
    # a fixed number of chunks for a given shape: this loop never depends on data
    for h0 in range(0, BH, chunk):
        sl = slice(h0, min(BH, h0 + chunk))
        mask = _expand_vs(vsel[sl], ssel[sl], off, causal)
        if max_b is not None:
            score = torch.maximum(vert_f[sl, None, :], slash_f[sl][:, off])
        if use_qa:
            ids = torch.arange(sl.start, sl.stop, device=dev)
            kb = k_bar_h[ids // Hq, (ids % Hq) // group]  # [C, nb, D]
            logits = scale * torch.bmm(q_bar[sl], kb.transpose(1, 2))
            s = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            flat = s.flatten(1) / nb
            srt = torch.sort(flat, dim=-1, descending=True, stable=True)
            sel = _top_n(flat, _count_to_mass(flat, cfg.gamma, srt.values), srt.indices).view_as(s)
            del srt
            qa_mask = (sel | _expand_vs(floor_v[sl], floor_s[sl], off, causal) | eye) & causal
            qa_mask[..., 0] = True
            is_qa = qa_f[sl][:, None, None]
            mask = torch.where(is_qa, qa_mask, mask)
            if max_b is not None:
                score = torch.where(is_qa, s, score)
        if max_b is not None:
            mask = _cap_rows(mask, score, max_b, eye, causal)
        counts[sl], indices[sl] = compact_block_mask(mask)
    return BlockSelection(
        counts=counts.view(B, Hq, nb),
        indices=indices.view(B, Hq, nb, nb),
        block_size=bs,
        seq_len=N,
        query_aware=query_aware,
        js_distance=dist,
    )
