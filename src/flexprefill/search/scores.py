"""Scores of the pattern search on the device: the representative queries' vertical and
slash block mass (streamed over the keys in Triton), block means, the block-pooled estimate
and its Jensen-Shannon distance to the true distribution (steps 1-3 of FlexPrefill)."""

from __future__ import annotations

import math

import torch
import triton

from ..ops.kernels.search import (
    block_mean_kernel, block_mean_varlen_kernel, combine_splits_kernel, rep_block_mass_kernel, rep_row_stats_kernel,
)
from ..options import options
from ..reference import js_distance, soft_cap

__all__ = [
    "block_means",
    "block_means_varlen",
    "representative_block_scores",
    "representative_block_scores_varlen",
    "dense_passes",
    "estimate_pattern",
    "js_distance_masked",
]

_LOG2E = 1.4426950408889634


def _cap_args(scale: float, softcap: float | None) -> dict:
    """The search kernels' soft-cap arguments: ``cap * tanh(scale * q.k / cap)`` in the log2 domain."""
    if softcap is None:
        return dict(cap_scale=0.0, cap_log2=0.0, SOFTCAP=False)
    return dict(cap_scale=scale / softcap, cap_log2=softcap * _LOG2E, SOFTCAP=True)


def block_means(x: torch.Tensor, block_size: int, *, rep: int = 0, blocks: bool = True,
                src: torch.Tensor | None = None) -> torch.Tensor:
    """Per-block mean over real rows, [B, N, H, D] -> fp32 [B, nb, H, D], in one Triton pass.

    With ``rep > 0`` one more entry after the blocks: the mean of the last ``rep`` rows
    ([B, nb + 1, H, D]; only that one, [B, 1, H, D], when ``blocks`` is False).  ``src``
    (int64 [1] on x's device): read the rows at the address it holds instead of x's (which
    then only gives dtype and layout: a CUDA graph's kernels read the caller's rows wherever they are)."""
    B, N, H, D = x.shape
    nb = math.ceil(N / block_size)
    c0 = 0 if blocks else nb
    nb_out = (nb if blocks else 0) + (1 if rep > 0 else 0)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(B, nb_out, H, D, dtype=torch.float32, device=x.device)
    if out.numel():
        BD = max(16, triton.next_power_of_2(D))
        block_mean_kernel[(B * nb_out, H)](
            x, out, x if src is None else src, x.stride(0), x.stride(1), x.stride(2), N, nb_out, c0, rep, H,
            D=D, BD=BD, BS=block_size, BT=max(1, min(block_size, 8192 // BD)), INDIRECT=src is not None, num_warps=4,
        )
    return out


def _combine(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """:func:`_combine_splits` in one launch (contiguous [rows, splits, BR] fp32 inputs)."""
    rows, splits, br = m.shape
    out = torch.empty(rows, br, dtype=torch.float32, device=m.device)
    combine_splits_kernel[(rows,)](m, l, out, splits, BR=br, num_warps=1 if br <= 64 else 2)
    return out


def _combine_splits(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Per-row log2-sum-exp from per-split maxima and sums [rows, splits, BR] -> [rows, BR]."""
    m_all = m.amax(dim=1)
    m_safe = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    l_all = (l * torch.exp2(m - m_safe[:, None])).sum(dim=1)
    return (m_safe + torch.log2(l_all)).contiguous()


# heads x key blocks up to which the one-pass block statistics are used by default; measured
# on an H200 in one run: faster at 4/1/256 32k and 128k (4096 and 1024 x 4
# head-blocks), 9/3/64 32k and 128k (2304, 9216), 32/8/128 32k (8192: 0.857 -> 0.701 ms), slower
# at 32/8/128 128k (32768: 4.75 -> 5.48 ms, the statistics it writes outweigh the pass it saves)
_BLOCK_STATS_MAX = 1 << 14


def _block_stats_enabled(rows: int, nb: int) -> bool:
    """Whether the representative rows' first pass stores each key block's row max and sum, so
    the block-mass pass reads them instead of a second pass over the keys (half the QK^T and exp
    work of the two passes).  ``rows``: sequences x query heads, ``nb``: key blocks.
    ``Options.rep_block_stats`` True always, False never, None: while ``rows * nb <=``
    ``_BLOCK_STATS_MAX``.  Both paths are tested against each other and the oracle."""
    forced = options().rep_block_stats
    if forced is not None:
        return forced
    return rows * nb <= _BLOCK_STATS_MAX


def _keys_per_split(N: int, rows: int, BK: int, align: int) -> int:
    """Keys per program of the first pass: enough splits to fill the device several times
    over, at most 8192, a multiple of ``align`` (BK, or the block size for block stats)."""
    kps = max(BK, triton.next_power_of_2(max(1, N // max(1, 512 // max(1, rows)))))
    kps = min(kps, 8192)
    return math.ceil(kps / align) * align


def _block_stats_buffers(on: bool, rows: int, nb: int, BR: int, dummy: torch.Tensor):
    """The per-block row max and sum of the first pass, fp32 [rows, nb, BR] each (or unused stand-ins)."""
    if not on:
        return dummy, dummy
    mb = torch.empty(rows, nb, BR, dtype=torch.float32, device=dummy.device)
    return mb, torch.empty_like(mb)


def _first_pass_plan(q, k, rows: int, N: int, nb: int, block_size: int):
    """What the first pass over the keys needs, for the dense and the packed search alike:
    q and k with unit last stride, the padded head dim BD, the key tile BK, whether block
    statistics are kept, the keys per program and the number of programs per row, and the
    fp32 buffers (row max m, row sum l: [rows, num_splits, block_size]; block max/sum mb, lb)."""
    BD = max(16, triton.next_power_of_2(q.shape[-1]))
    BK = 64 if BD <= 128 else 32
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    bst = _block_stats_enabled(rows, nb)
    if bst:
        BK = min(BK, block_size)
    keys_per_split = _keys_per_split(N, rows, BK, block_size if bst else BK)
    num_splits = math.ceil(N / keys_per_split)
    m = torch.empty(rows, num_splits, block_size, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    mb, lb = _block_stats_buffers(bst, rows, nb, block_size, m)
    return q, k, BD, BK, bst, keys_per_split, num_splits, m, l, mb, lb


def representative_block_scores(q, k, *, block_size: int, scale: float, src: tuple | None = None,
                                softcap: float | None = None):
    """Vertical and slash block mass of the last ``block_size`` queries, fp32 [B, Hq, nb] each.

    ``src``: two int64 [1] tensors holding the addresses to read q and k from (q and k then
    give dtype and layout only, as in :func:`block_means`).  ``softcap``: the scores soft-capped."""
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    nb = math.ceil(N / block_size)
    n_rep = min(block_size, N)
    BR = block_size
    q, k, BD, BK, bst, keys_per_split, num_splits, m, l, mb, lb = _first_pass_plan(q, k, B * Hq, N, nb, block_size)
    dev = q.device
    scale_log2 = scale * _LOG2E
    common_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    srcs = (m, m) if src is None else src
    cap = _cap_args(scale, softcap)
    rep_row_stats_kernel[(B * Hq, num_splits)](
        q, k, m, l, *common_strides,
        N, n_rep, keys_per_split, num_splits, Hq, Hq // Hkv, scale_log2,
        m, m, m, m, *srcs, mb, lb, nb,
        D=D, BD=BD, BR=BR, BK=BK, INDIRECT=src is not None, BLOCK_STATS=bst, BS=block_size, num_warps=4, **cap,
    )
    lse2 = _combine(m, l)

    vert = torch.empty(B * Hq, nb, dtype=torch.float32, device=dev)
    part = torch.empty(B * Hq, nb, 2, dtype=torch.float32, device=dev)
    rep_block_mass_kernel[(B * Hq, nb)](
        q, k, lse2, vert, part, *common_strides,
        N, n_rep, nb, Hq, Hq // Hkv, scale_log2,
        vert, vert, vert, vert, *srcs, mb, lb,
        D=D, BD=BD, BR=BR, BS=block_size, BK=min(BK, block_size), INDIRECT=src is not None, FROM_STATS=bst,
        num_warps=4, **cap,
    )
    # key block c seen from the last query block sits at offset nb-1-c, from the one
    # before at nb-2-c: flip both parts and shift the second by one
    hi = part[..., 1].flip(-1)
    lo = part[..., 0].flip(-1)
    slash = hi.clone()
    slash[:, :-1] += lo[:, 1:]
    return vert.view(B, Hq, nb), slash.view(B, Hq, nb)


def _lengths(q_starts, q_ends, k_starts, k_ends):
    return (q_ends - q_starts).long(), (k_ends - k_starts).long()


def representative_block_scores_varlen(q, k, q_starts, q_ends, k_starts, k_ends, max_seqlen_k: int, *, block_size: int,
                                       scale: float, softcap: float | None = None):
    """Vertical and slash block mass of each sequence's last ``min(bs, n_q)`` queries, fp32 [S, Hq, max_nb]
    (0 past a sequence; ``softcap``: the scores soft-capped)."""
    total_k, Hkv, D = k.shape
    Hq = q.shape[1]
    S = q_starts.shape[0]
    nb = math.ceil(max_seqlen_k / block_size)
    BR = block_size
    N = max_seqlen_k
    q, k, BD, BK, bst, keys_per_split, num_splits, m, l, mb, lb = _first_pass_plan(q, k, S * Hq, N, nb, block_size)
    dev = q.device
    scale_log2 = scale * _LOG2E
    strides = (0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1))
    bounds = (q_starts, q_ends, k_starts, k_ends)
    cap = _cap_args(scale, softcap)
    rep_row_stats_kernel[(S * Hq, num_splits)](
        q, k, m, l, *strides,
        N, 0, keys_per_split, num_splits, Hq, Hq // Hkv, scale_log2, *bounds, m, m, mb, lb, nb,
        D=D, BD=BD, BR=BR, BK=BK, VARLEN=True, BLOCK_STATS=bst, BS=block_size, num_warps=4, **cap,
    )
    lse2 = _combine(m, l)

    vert = torch.empty(S * Hq, nb, dtype=torch.float32, device=dev)
    part = torch.empty(S * Hq, nb, 2, dtype=torch.float32, device=dev)
    rep_block_mass_kernel[(S * Hq, nb)](
        q, k, lse2, vert, part, *strides,
        N, 0, nb, Hq, Hq // Hkv, scale_log2, *bounds, vert, vert, mb, lb,
        D=D, BD=BD, BR=BR, BS=block_size, BK=min(BK, block_size), VARLEN=True, FROM_STATS=bst, num_warps=4, **cap,
    )
    # key block c seen from the last query block sits at offset nb_s-1-c, from the one
    # before at nb_s-2-c: slash[d] = hi[nb_s-1-d] + lo[nb_s-2-d], per sequence
    _, n_k = _lengths(*bounds)
    nb_s = ((n_k + block_size - 1) // block_size).repeat_interleave(Hq)[:, None]  # [S*Hq, 1]
    d = torch.arange(nb, device=dev)[None, :]
    i_hi, i_lo = nb_s - 1 - d, nb_s - 2 - d
    hi = part[..., 1].gather(1, i_hi.clamp_min(0))
    lo = part[..., 0].gather(1, i_lo.clamp_min(0))
    slash = torch.where(i_hi >= 0, hi, 0.0) + torch.where(i_lo >= 0, lo, 0.0)
    return vert.view(S, Hq, nb), slash.view(S, Hq, nb)


def block_means_varlen(x, x_starts, x_ends, k_starts, k_ends, max_nb: int, *, block_size: int) -> torch.Tensor:
    """Per absolute block mean of packed rows, fp32 [S, max_nb, H, D] (0 where a block holds no row).

    Sequence ``s``'s rows of ``x`` are the last ``n_x`` of its ``n_k`` positions.
    """
    total, H, D = x.shape
    S = x_starts.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(S, max_nb, H, D, dtype=torch.float32, device=x.device)
    BD = max(16, triton.next_power_of_2(D))
    block_mean_varlen_kernel[(S * max_nb, H)](
        x, out, x_starts, x_ends, k_starts, k_ends, x.stride(0), x.stride(1), max_nb, H,
        D=D, BD=BD, BS=block_size, BT=32, num_warps=4,
    )
    return out


def js_distance_masked(p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`flexprefill.reference.js_distance` over the ``valid`` entries of the last dim only."""
    eps = 1e-10
    p = torch.where(valid, p.float() + eps, 0.0)
    q = torch.where(valid, q.float() + eps, 0.0)
    p = p / p.sum(-1, keepdim=True)
    q = q / q.sum(-1, keepdim=True)
    m = 0.5 * (p + q)
    m_safe = torch.where(valid, m, 1.0)
    kl_p = torch.where(valid, p * (torch.where(valid, p, 1.0) / m_safe).log(), 0.0)
    kl_q = torch.where(valid, q * (torch.where(valid, q, 1.0) / m_safe).log(), 0.0)
    jsd = 0.5 * kl_p.sum(-1) + 0.5 * kl_q.sum(-1)
    return jsd.clamp_min(0).sqrt()



def dense_passes(q, k, *, block_size: int, scale: float, tau: float, src: tuple | None = None,
                 softcap: float | None = None) -> dict:
    """The passes of the dense search over q [B, N, Hq, D] and k [B, N, Hkv, D]: ``vert``, ``slash``
    fp32 [B, Hq, nb], ``q_hat`` (mean of the representative queries) fp32 [B, Hq, D], ``k_bar``
    fp32 [B, nb, Hkv, D] and ``q_bar`` fp32 [B, nb, Hq, D] (None when ``tau == 0``).

    ``src``: two int64 [1] tensors holding the addresses to read q and k from (see :func:`block_means`);
    ``softcap``: the representative scores soft-capped."""
    N = q.shape[1]
    bs = block_size
    vert, slash = representative_block_scores(q, k, block_size=bs, scale=scale, src=src, softcap=softcap)
    k_bar = block_means(k, bs, src=None if src is None else src[1])  # [B, nb, Hkv, D]
    # the block means of q (when tau > 0) and the mean of the representative queries, as two
    # tensors: one [B, nb + 1, Hq, D] buffer passes 1 MB (the allocator's small-block limit)
    # where [B, nb, Hq, D] just fits (Gemma 3's 4 x 256 dims at 32k), and inside a graph one
    # request over 1 MB makes its pool keep a 20 MB segment
    q_src = None if src is None else src[0]
    q_hat = block_means(q, bs, rep=min(bs, N), blocks=False, src=q_src)[:, 0]  # [B, Hq, D]
    q_bar = block_means(q, bs, src=q_src) if tau > 0 else None  # [B, nb, Hq, D]
    return dict(vert=vert, slash=slash, q_hat=q_hat, k_bar=k_bar, q_bar=q_bar)


def estimate_pattern(vert, q_hat, k_bar, *, scale: float, tau: float, softcap: float | None = None):
    """Step 3 of a dense batch: the block-pooled estimate ``softmax(scale * q_hat . k_bar)`` (its
    logits soft-capped by ``softcap``), its Jensen-Shannon distance to ``vert`` fp32 [B, Hq] and the
    query-aware heads bool [B, Hq] (distance below ``tau``); also ``k_bar`` per query head [B, nb, Hq, D]."""
    group = q_hat.shape[1] // k_bar.shape[2]
    k_bar_q = k_bar.repeat_interleave(group, dim=2) if group > 1 else k_bar
    a_est = torch.softmax(soft_cap(scale * torch.einsum("bhd,bchd->bhc", q_hat, k_bar_q), softcap), dim=-1)
    dist = js_distance(vert, a_est)
    return dist, dist < tau, k_bar_q
