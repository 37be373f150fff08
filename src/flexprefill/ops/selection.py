"""FlexPrefill's pattern search on the device: Triton for the streamed scores, batched
PyTorch for the rest.  No host sync and no Python loop over data-dependent values, so
a fixed shape can be captured in a CUDA graph.  Semantics match
``flexprefill.reference.select_blocks`` exactly (same ranks, same tie-breaking).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import FlexPrefillConfig
from ..reference import js_distance
from ..block_table import BlockSelection, chunk_rows, compact_block_mask
from .kernels.selection import (
    assemble_rows_kernel, block_mean_kernel, block_mean_varlen_kernel, combine_splits_kernel, radix_final_kernel, radix_hist_kernel,
    rep_block_mass_kernel, rep_row_stats_kernel,
)

__all__ = [
    "compact_index_dtype",
    "select_blocks_fast",
    "clear_graph_cache",
    "representative_block_scores",
    "block_means",
    "select_blocks_varlen_fast",
    "representative_block_scores_varlen",
    "block_means_varlen",
    "full_causal_selection_varlen",
]

_LOG2E = 1.4426950408889634
# elements of one [heads, nb, nb] working set of the query-aware search (its scores, their
# sort, ~27 bytes per element at the peak: an H200 profile at 128k, 32 heads, 4M elements,
# held 112 MB over the same search without it).  Eagerly the working set grows with the
# bytes of q + k + v (15% of them) from 2^22 up to 2^23 elements: fewer, larger chunks cost
# less host time (the 128k search is host-bound).  Not below 2^22: sized down to 15% for
# SmolLM2's small heads (one head per chunk at 128k) the search took 32% of the operator
# instead of 19.5% (H200 suite, 9200aa8 against c8d7dfd), for 15% instead of 28.5% memory
_CHUNK_ELEMS = 1 << 22
_CHUNK_FRACTION = 0.15
_CHUNK_BYTES_PER_ELEM = 27


def _chunk_elems_for(q: torch.Tensor, k: torch.Tensor) -> int:
    """Working-set elements of an eager query-aware search over these q and k (v as k)."""
    qkv = q.numel() * q.element_size() + 2 * k.numel() * k.element_size()
    return int(min(1 << 23, max(_CHUNK_ELEMS, _CHUNK_FRACTION * qkv / _CHUNK_BYTES_PER_ELEM)))
# the set assembly as one Triton pass per row (False: the PyTorch ops it replaced, kept for
# max_budget, which caps rows by score, and for timing the two: benchmarks/profile_search_parts.py)
_FUSED_ASSEMBLY = True


def block_means(x: torch.Tensor, block_size: int, *, rep: int = 0, blocks: bool = True,
                src: torch.Tensor | None = None) -> torch.Tensor:
    """Per-block mean over real rows, [B, N, H, D] -> fp32 [B, nb, H, D], in one Triton pass.

    With ``rep > 0`` one more entry after the blocks: the mean of the last ``rep`` rows
    ([B, nb + 1, H, D]; only that one, [B, 1, H, D], when ``blocks`` is False).  ``src``
    (int64 [1] on x's device): read the rows at the address it holds instead of x's (which
    then only gives dtype and layout; see :func:`_search_graphed`)."""
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
# (results/h200/search_b2cf59e, same run): faster at 4/1/256 32k and 128k (4096 and 1024 x 4
# head-blocks), 9/3/64 32k and 128k (2304, 9216), 32/8/128 32k (8192: 0.857 -> 0.701 ms), slower
# at 32/8/128 128k (32768: 4.75 -> 5.48 ms, the statistics it writes outweigh the pass it saves)
_BLOCK_STATS_MAX = 1 << 14


def _block_stats_enabled(rows: int, nb: int) -> bool:
    """Whether the representative rows' first pass stores each key block's row max and sum, so
    the block-mass pass reads them instead of a second pass over the keys (half the QK^T and exp
    work of the two passes).  ``rows``: sequences x query heads, ``nb``: key blocks.
    ``FLEXPREFILL_REP_BLOCK_STATS=1`` always, ``=0`` never, unset: while ``rows * nb <=``
    ``_BLOCK_STATS_MAX``.  Both paths are tested against each other and the oracle."""
    flag = os.environ.get("FLEXPREFILL_REP_BLOCK_STATS", "auto")
    if flag in ("0", "1"):
        return flag == "1"
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


def representative_block_scores(q, k, *, block_size: int, scale: float, src: tuple | None = None):
    """Vertical and slash block mass of the last ``block_size`` queries, fp32 [B, Hq, nb] each.

    ``src``: two int64 [1] tensors holding the addresses to read q and k from (q and k then
    give dtype and layout only; see :func:`_search_graphed`)."""
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
    rep_row_stats_kernel[(B * Hq, num_splits)](
        q, k, m, l, *common_strides,
        N, n_rep, keys_per_split, num_splits, Hq, Hq // Hkv, scale_log2,
        m, m, m, m, *srcs, mb, lb, nb,
        D=D, BD=BD, BR=BR, BK=BK, INDIRECT=src is not None, BLOCK_STATS=bst, BS=block_size, num_warps=4,
    )
    lse2 = _combine(m, l)

    vert = torch.empty(B * Hq, nb, dtype=torch.float32, device=dev)
    part = torch.empty(B * Hq, nb, 2, dtype=torch.float32, device=dev)
    rep_block_mass_kernel[(B * Hq, nb)](
        q, k, lse2, vert, part, *common_strides,
        N, n_rep, nb, Hq, Hq // Hkv, scale_log2,
        vert, vert, vert, vert, *srcs, mb, lb,
        D=D, BD=BD, BR=BR, BS=block_size, BK=min(BK, block_size), INDIRECT=src is not None, FROM_STATS=bst,
        num_warps=4,
    )
    # key block c seen from the last query block sits at offset nb-1-c, from the one
    # before at nb-2-c: flip both parts and shift the second by one
    hi = part[..., 1].flip(-1)
    lo = part[..., 0].flip(-1)
    slash = hi.clone()
    slash[:, :-1] += lo[:, 1:]
    return vert.view(B, Hq, nb), slash.view(B, Hq, nb)


# rows longer than this are scanned in two levels (see _cumsum_rows)
_SCAN_TILE = 1024


def _cumsum_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.cumsum(-1)`` for fp32 rows of any length, in two levels when rows are long.

    CUDA's scan along the last dimension runs one row per thread block: a few rows of a
    million entries (the query-aware search at 128k, nb*nb per head) took 13 ms of a 22 ms
    search on an H200.  Scanning tiles of 1024 entries, then the tile totals, keeps every
    launch wide.  Sums are grouped differently from a flat scan, so results may differ in
    the last bits of fp32.
    """
    n = x.shape[-1]
    if n <= 4 * _SCAN_TILE:
        return x.cumsum(-1)
    pad = (-n) % _SCAN_TILE
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    tiles = xp.unflatten(-1, (xp.shape[-1] // _SCAN_TILE, _SCAN_TILE)).cumsum(-1)
    totals = tiles[..., -1]
    tiles += (totals.cumsum(-1) - totals)[..., None]
    out = tiles.flatten(-2)
    return out[..., :n] if pad else out


def _count_to_mass(scores: torch.Tensor, gamma: float, sorted_desc: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the fewest largest entries whose sum reaches ``gamma`` of the row total (int64 [...])."""
    n = scores.shape[-1]
    if gamma >= 1.0:
        return torch.full(scores.shape[:-1], n, dtype=torch.int64, device=scores.device)
    if sorted_desc is None:
        sorted_desc = torch.sort(scores, dim=-1, descending=True, stable=True).values
    cum = _cumsum_rows(sorted_desc)
    return ((cum < gamma * cum[..., -1:]).sum(-1) + 1).clamp_max(n)


def _radix_enabled() -> bool:
    return os.environ.get("FLEXPREFILL_RADIX_SELECT", "1") != "0"


# list entries per program of a radix pass (at least; more past _RADIX_MAX_SPLITS splits:
# every program reads all splits' histograms of the pass before), and per loop step.  At
# 4096 a pass over SmolLM2's 32k ranking (9 heads x 33k entries, 81 programs) took ~10 us
# (search_kernels_b60ecbd); 1024 spreads it over 4x the programs: the 9 passes 88.8 -> 67.8 us
# there, Gemma 3's (4 heads) 87.3 -> 40.1 us (search_kernels_c2ada11)
_RADIX_PER_SPLIT = 1024
_RADIX_MAX_SPLITS = 128
_RADIX_BT = 1024


def _threshold_entry(flat: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``flat`` (fp32 [H, T], entries >= 0), the value (fp32 [H]) and position (int64
    [H]) of its ``_count_to_mass`` -th entry in (value desc, position asc) order: where the
    running sum of the largest entries first reaches ``gamma`` of the row total.

    By radix selection on the fp32 bit patterns (10 launches, no sort, no [H, T] temporaries)
    for ``gamma < 1`` when ``FLEXPREFILL_RADIX_SELECT`` is not ``0``; else by a stable sort.
    The running sums are grouped differently from a sorted cumsum, so where a partial sum
    lies within fp32 rounding of the goal the two may pick neighbouring entries.
    """
    H, T = flat.shape
    if gamma >= 1.0 or not _radix_enabled():
        srt = torch.sort(flat, dim=-1, descending=True, stable=True)
        last = (_count_to_mass(flat, gamma, srt.values) - 1)[:, None]
        return srt.values.gather(1, last).squeeze(1), srt.indices.gather(1, last).squeeze(1)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    dev = flat.device
    per_split = max(_RADIX_PER_SPLIT, triton.cdiv(triton.cdiv(T, _RADIX_MAX_SPLITS), _RADIX_BT) * _RADIX_BT)
    per_split = min(per_split, triton.cdiv(T, _RADIX_BT) * _RADIX_BT)
    splits = triton.cdiv(T, per_split)
    bsplit = triton.next_power_of_2(splits)
    part_cnt = torch.empty(9, H, splits, 16, dtype=torch.int32, device=dev)
    part_sum = torch.empty(9, H, splits, 16, dtype=torch.float32, device=dev)
    st_bits = torch.empty(8, H, dtype=torch.int32, device=dev)
    st_above = torch.empty(8, H, dtype=torch.float32, device=dev)
    st_n_above = torch.empty(8, H, dtype=torch.int32, device=dev)
    st_goal = torch.empty(H, dtype=torch.float32, device=dev)
    state = (st_bits, st_above, st_n_above, st_goal)
    for p in range(9):
        radix_hist_kernel[(H, splits)](
            flat, part_cnt, part_sum, *state, T, flat.stride(0), H, splits, per_split, float(gamma),
            P=p, BSPLIT=bsplit, BT=_RADIX_BT, num_warps=4,
        )
    thr = torch.empty(H, dtype=torch.float32, device=dev)
    thr_pos = torch.empty(H, dtype=torch.int64, device=dev)
    radix_final_kernel[(H,)](
        flat, part_cnt, thr, thr_pos, *state, T, flat.stride(0), H, splits, per_split,
        BSPLIT=bsplit, BT=_RADIX_BT, num_warps=4,
    )
    return thr, thr_pos


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


def _vs_sets(vert, slash, *, gamma: float, min_b: int, max_b: int | None, nb_h: torch.Tensor | None, floor: bool):
    """Per head, the kept columns (sink + top n_v) and diagonals (offset 0 + top n_s), bool [BH, nb] each.

    With ``floor`` also the sets of the ``min_b`` best (the query-aware heads' floor).  One
    sort of the stacked scores serves the budgets and every set.
    """
    nb = vert.shape[-1]
    vs = torch.stack((vert, slash))  # [2, BH, nb]
    srt = torch.sort(vs, dim=-1, descending=True, stable=True)
    n = _clamp(_count_to_mass(vs, gamma, srt.values), min_b, max_b, nb)
    if nb_h is not None:
        n = torch.minimum(n, nb_h)
    rank = torch.empty_like(srt.indices).scatter_(-1, srt.indices, torch.arange(nb, device=vs.device).expand_as(srt.indices))
    sel = rank < n[..., None]
    sel[..., 0] = True
    out = [sel[0], sel[1]]
    if floor:
        floor_n = min(min_b, nb) if nb_h is None else nb_h.clamp_max(min_b)[..., None]
        fl = rank < floor_n
        fl[..., 0] = True
        out += [fl[0], fl[1]]
    return out


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


def _tri_flat(nb: int, device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Flat positions ``r * nb + c`` of the causal (row, col) pairs, row-major: the query-aware
    ranking sorts these nb(nb+1)/2 entries, not all nb^2 (the others are 0 and never reached:
    the gamma count stops at the last positive entry, whose running sum is the total).
    ``dtype`` int32 halves it where it only feeds ``index_select`` (nb^2 < 2^31)."""
    tri = torch.tril_indices(nb, nb, device=device, dtype=dtype)
    return tri[0] * nb + tri[1]


def _qa_scores(q_bar, k_bar, *, scale: float, nb: int, live_c, rows_c, not_causal, tri_flat, keep_s: bool = True):
    """The query-aware ranking's scores of a head chunk: ``s``, the block-mean attention
    softmax per row [heads, nb, nb] (None unless ``keep_s``), and ``flat``, its causal entries
    (positions ``tri_flat``) divided by the number of rows.

    Each [heads, nb, nb] buffer is freed as soon as the next is made and the rest is done in
    place, so at most two of them are live (the logits and their softmax); the values are
    those of the out-of-place forms."""
    logits = torch.baddbmm(q_bar.new_empty(()), q_bar, k_bar.transpose(1, 2), beta=0.0, alpha=scale)
    s = torch.softmax(logits.masked_fill_(not_causal, float("-inf")), dim=-1)
    del logits
    if live_c is not None:
        # only the chunk's rows take part; the flat mass is divided by their number
        s.masked_fill_(~live_c, 0.0)
    flat = s.flatten(1).index_select(1, tri_flat)
    if not keep_s:
        s = None
    flat.div_(rows_c[:, None] if rows_c is not None else nb)
    return s, flat


def _assemble(vert, slash, query_aware, q_bar, k_bar, *, cfg: FlexPrefillConfig, scale: float,
              nb_h=None, live_h=None, rows_h=None, short_h=None, chunk_elems: int = _CHUNK_ELEMS,
              index_dtype: torch.dtype = torch.int32, out=None):
    """Block sets of every head from its scores, compacted: counts int32 [BH, nb], indices int32 [BH, nb, nb].

    Arguments as :func:`_assemble_torch`.  The sets are built and compacted row by row in
    one Triton pass (``assemble_rows_kernel``): per head chunk of the query-aware ranking
    only its scores, their sort and the threshold entry run as PyTorch ops; without it,
    one launch for every head.  ``max_budget`` takes the PyTorch path.
    """
    if cfg.max_budget_blocks is not None or not _FUSED_ASSEMBLY:
        return _assemble_torch(vert, slash, query_aware, q_bar, k_bar, cfg=cfg, scale=scale, nb_h=nb_h, live_h=live_h,
                               rows_h=rows_h, short_h=short_h, chunk_elems=chunk_elems, index_dtype=index_dtype, out=out)
    BH, nb = vert.shape
    dev = vert.device
    use_qa = cfg.tau > 0
    sets = _vs_sets(vert, slash, gamma=cfg.gamma, min_b=cfg.min_budget_blocks, max_b=None, nb_h=nb_h, floor=use_qa)
    u8 = [t.contiguous().view(torch.uint8) for t in sets]
    counts, indices = _outputs(out, BH, nb, index_dtype, dev)
    live = live_h.contiguous().view(torch.uint8) if live_h is not None else u8[0]
    short = short_h.contiguous().view(torch.uint8) if short_h is not None else u8[0]
    qa = query_aware.contiguous().view(torch.uint8)
    bc = min(256, max(16, triton.next_power_of_2(nb)))
    flags = dict(LIVE=live_h is not None, SHORT=short_h is not None, BC=bc, num_warps=4)
    if not use_qa:
        assemble_rows_kernel[(BH, nb)](
            u8[0], u8[1], u8[0], u8[1], vert, vert, counts, qa, live, short, counts, indices, nb, 0, 0, QA=False, **flags
        )
        return counts, indices
    ar = torch.arange(nb, device=dev)
    not_causal = ar[None, :] > ar[:, None]
    tri_flat = _tri_flat(nb, dev, torch.int32 if nb * nb < 2**31 else torch.int64)
    chunk = max(1, chunk_elems // (nb * nb))
    for h0 in range(0, BH, chunk):
        h1 = min(BH, h0 + chunk)
        _, flat = _qa_scores(q_bar[h0:h1], k_bar[h0:h1], scale=scale, nb=nb,
                          live_c=live_h[h0:h1, :, None] if live_h is not None else None,
                          rows_c=rows_h[h0:h1] if rows_h is not None else None, not_causal=not_causal, tri_flat=tri_flat,
                          keep_s=False)
        # the n-th entry of the ranking: every entry before it in (value desc, position asc) is kept
        thr, thr_pos = _threshold_entry(flat, cfg.gamma)
        assemble_rows_kernel[(h1 - h0, nb)](
            u8[0], u8[1], u8[2], u8[3], flat, thr, thr_pos, qa, live, short, counts, indices, nb, h0, flat.stride(0),
            QA=True, **flags
        )
        del flat
    return counts, indices


def _outputs(out, BH: int, nb: int, index_dtype: torch.dtype, device):
    """(counts int32 [BH, nb], indices [BH, nb, nb]): ``out`` where given (a graph's outputs,
    made outside its pool), else new tensors."""
    if out is None:
        return (torch.empty(BH, nb, dtype=torch.int32, device=device),
                torch.empty(BH, nb, nb, dtype=index_dtype, device=device))
    counts, indices = out
    if (counts.shape != (BH, nb) or counts.dtype != torch.int32 or indices.shape != (BH, nb, nb)
            or indices.dtype != index_dtype):
        raise AssertionError(f"flexprefill internal: graph outputs {tuple(counts.shape)} {counts.dtype} / "
                             f"{tuple(indices.shape)} {indices.dtype} do not fit {BH} heads of {nb} blocks, {index_dtype}")
    return counts, indices


def _assemble_torch(vert, slash, query_aware, q_bar, k_bar, *, cfg: FlexPrefillConfig, scale: float,
                    nb_h=None, live_h=None, rows_h=None, short_h=None, chunk_elems: int = _CHUNK_ELEMS,
                    index_dtype: torch.dtype = torch.int32, out=None):
    """Block sets of every head from its scores, compacted: counts int32 [BH, nb], indices int32 [BH, nb, nb].

    ``vert, slash`` fp32 [BH, nb]; ``query_aware`` bool [BH]; ``q_bar, k_bar`` fp32 block
    means [BH, nb, D] (``k_bar`` already per query head; both unused when ``tau == 0``).
    Packed sequences add ``nb_h`` (blocks of each head's sequence) [BH], ``live_h`` (rows
    of the chunk) bool [BH, nb], ``rows_h`` (their number) fp32 [BH] and ``short_h`` (heads
    that take every causal block of their rows) bool [BH].  Heads are processed a fixed
    number at a time whatever the data, so a shape always issues the same launches.
    ``out``: (counts, indices) to write instead of new tensors (a graph's, see _capture).
    """
    BH, nb = vert.shape
    dev = vert.device
    min_b, max_b = cfg.min_budget_blocks, cfg.max_budget_blocks
    use_qa = cfg.tau > 0
    sets = _vs_sets(vert, slash, gamma=cfg.gamma, min_b=min_b, max_b=max_b, nb_h=nb_h, floor=use_qa)
    ar = torch.arange(nb, device=dev)
    causal = ar[None, :] <= ar[:, None]
    not_causal = ~causal
    eye = ar[None, :] == ar[:, None]
    off = (ar[:, None] - ar[None, :]).clamp_min(0)
    if use_qa:
        tri_flat = _tri_flat(nb, dev)
    counts, indices = _outputs(out, BH, nb, index_dtype, dev)
    chunk = max(1, chunk_elems // (nb * nb))
    for h0 in range(0, BH, chunk):
        sl = slice(h0, min(BH, h0 + chunk))
        mask = sets[0][sl, None, :] | sets[1][sl][:, off]
        if max_b is not None:
            score = torch.maximum(vert[sl, None, :], slash[sl][:, off])
        live_c = live_h[sl][:, :, None] if live_h is not None else None
        if use_qa:
            s, flat = _qa_scores(q_bar[sl], k_bar[sl], scale=scale, nb=nb, live_c=live_c,
                                 rows_c=rows_h[sl] if rows_h is not None else None, not_causal=not_causal, tri_flat=tri_flat)
            srt = torch.sort(flat, dim=-1, descending=True, stable=True)
            kept = _top_n(flat, _count_to_mass(flat, cfg.gamma, srt.values), srt.indices)
            sel = torch.zeros(s.shape[0], nb * nb, dtype=torch.bool, device=dev).index_copy_(1, tri_flat, kept).view_as(s)
            del srt, flat, kept
            # the floor sets carry the sink column, so every row keeps it
            qa_mask = sel | sets[2][sl, None, :] | sets[3][sl][:, off] | eye
            is_qa = query_aware[sl][:, None, None]
            mask = torch.where(is_qa, qa_mask, mask)
            if max_b is not None:
                score = torch.where(is_qa, s, score)
        mask &= causal
        if live_c is not None:
            mask &= live_c
        if max_b is not None:
            mask = _cap_rows(mask, score, max_b, eye, causal)
        if short_h is not None:
            mask = torch.where(short_h[sl][:, None, None], causal & live_c, mask)
        counts[sl], indices[sl] = compact_block_mask(mask)
    return counts, indices


# --- the assembly as a CUDA graph where launches, not the GPU, bound its time -----------
#
# (Since 4fddf74 the dense search puts its passes over q and k into the same graph too, see
# _search_graphed; packed sequences and FLEXPREFILL_SEARCH_GRAPH=0 graph what follows.)
# The dense search graphs everything after its passes over q and k: the estimate, the JS
# distance and pattern of each head, the query-aware ranking and the fused set assembly.
# At nb <= 256 blocks (N <= 32k at block 128) their host cost exceeds their GPU time, and
# one graph replay per shape replaces them (H200, 32k, 32 heads, tau 0.1: 1.31 ms against
# 3.31 ms eager with the fused assembly, selection_profile_4721308.json; 1.62 against 2.15
# ms before it).  With the PyTorch assembly, at 512 blocks the graph's small head chunks
# made it slower than eager (64k: 5.1 ms against 3.4 ms, selection_profile_35240a9.json), so
# the limit is 256; not re-measured with the fused assembly.  Its inputs are small (scores
# and block means, [BH, nb(, D)]) and are copied into the graph's own buffers, so the
# caller's q, k, v are never copied.  The graph's memory pool (the temporaries of one head
# chunk of the ranking, 92 MB at 32k) stays reserved while the graph is cached: at most
# _GRAPH_CACHE shapes, LRU, and ``clear_graph_cache()`` frees them.  Off with
# FLEXPREFILL_SELECTION_GRAPHS=0; never used while the caller is itself capturing a graph.

_GRAPH_MAX_NB = 256
_GRAPH_CACHE = 4
# inside a graph more head chunks cost no host time, and the pool it keeps is the peak of
# one chunk's temporaries (~140 B per element): 2^19 elements keep it near 70 MB (an H200
# measurement with 2^22 elements held 276 MB at 32k, 32 heads)
_GRAPH_CHUNK_ELEMS = 1 << 19
# Past 256 blocks a graph pays when the whole ranking is small (BH * nb^2 <= 2^24 elements:
# small-head models, or 64k with 32 heads), where the eager search is bound by its ~150
# launches.  H200, radix threshold, compare_search_b8bf318: SmolLM2 9/3/64 at 128k 1.46 ms
# graphed vs 4.19 eager, at 64k 0.69 vs 2.41; Gemma 3 4/1/256 at 64k 0.51 vs 1.78; Llama
# 32/8/128 at 64k 1.77 vs 3.36, but at 128k (2^25 elements) 4.89 vs 4.39.  Those graphs take
# head chunks of 2^21 elements (the radix threshold needs none of the sort's temporaries);
# a cached graph then keeps ~90 MB at SmolLM2's 128k, its returned tables included (16-70 MB
# at 32k; compare_search_c335050).  FLEXPREFILL_SELECTION_GRAPH_MAX_ELEMS sets the limit
# (0: 256 blocks only)
_GRAPH_MAX_ELEMS = 1 << 24
_GRAPH_CHUNK_ELEMS_LARGE = 1 << 21


def _graph_chunk(nb: int) -> int:
    """Head-chunk elements of the ranking inside a graph.  With the radix threshold, 2^21 at
    every size: at 32k one chunk instead of two cut the graphed search from 0.509 to 0.399 ms
    on SmolLM2 (9/3/64; pool 28 MB either way) and from 1.193 to 0.930 ms on the Llama shape
    (pool 48 -> 68 MB; H200, search_kernels_b60ecbd).  The sort keeps 2^19 up to 256 blocks."""
    if _radix_enabled() or nb > _GRAPH_MAX_NB:
        return _GRAPH_CHUNK_ELEMS_LARGE
    return _GRAPH_CHUNK_ELEMS


def _graph_pays(bh: int, nb: int) -> bool:
    if nb <= _GRAPH_MAX_NB:
        return True
    flag = os.environ.get("FLEXPREFILL_SELECTION_GRAPH_MAX_ELEMS")
    limit = int(flag) if flag else _GRAPH_MAX_ELEMS
    return bh * nb * nb <= limit


_graphs: "OrderedDict[tuple, tuple]" = OrderedDict()
# One memory pool per device shared by every cached search graph: a graph's temporaries are
# only live during its replay and every replay's outputs are cloned at once on the same
# stream, so graphs of different shapes may reuse each other's memory; the cache then keeps
# the largest graph's pool instead of the sum over up to _GRAPH_CACHE shapes.  (Replays of
# two shapes on two streams at once would race; so would two replays of one shape with
# private pools, as both write the graph's static outputs.)  FLEXPREFILL_GRAPH_POOL=private:
# one pool per graph, as before.
#
# The pool is seeded: the CUDA caching allocator gives every request of 1-10 MB a 20 MB
# segment of its own (a request of 10 MB or more gets a segment of its size, rounded to 2
# MB), and a graph's pool keeps its segments for good.  So a capture may first take one
# block a little larger than the peak of the search's live requests over 1 MB and free it
# at once; the search's requests are then carved out of it.  The graph's counts and indices
# live outside the pool (see _capture), so all of the pool is free between replays.  Which
# seed, if any, is found by trial calls in a private pool set up as the shared pool is (its
# free segments, then the seed): the one the capture grows the pool least with (none where
# other shapes' segments already hold the requests).  FLEXPREFILL_GRAPH_SEED=0: no seed.
# Measured on an H200: README, "Search graph memory".
_pools: dict = {}
_capture_streams: dict = {}
_SEED_MIN = 10 << 20  # the allocator's kMinLargeAlloc: smaller large requests take 20 MB segments
_SEED_ROUND = 2 << 20  # its kRoundLarge
_SEED_TRIALS = 4  # trial calls at most per capture (see _choose_seed)
# (measured need and largest request, free bytes and wholly free segments found, seed taken,
# large segments added past it, the trials' (seed, added)) of the last captures, for benchmarks
seed_log: list = []


def clear_graph_cache() -> None:
    """Drop the cached CUDA graphs of the pattern search (frees their memory pool)."""
    _graphs.clear()
    _pools.clear()


def _graph_pool(device):
    """The shared pool handle of ``device`` (None: a private pool per graph)."""
    if os.environ.get("FLEXPREFILL_GRAPH_POOL", "shared") == "private":
        return None
    key = torch.device(device).index
    if key not in _pools:
        _pools[key] = torch.cuda.graph_pool_handle()
    return _pools[key]


def _capture_stream(device):
    """One capture stream per device: a pool's free blocks are reused only by allocations on
    the stream that freed them, so every capture into the shared pool uses the same one (see
    also _capture)."""
    key = torch.device(device).index
    if key not in _capture_streams:
        _capture_streams[key] = torch.cuda.Stream(device=device)
    return _capture_streams[key]


def _seeding() -> bool:
    return os.environ.get("FLEXPREFILL_GRAPH_SEED", "1") != "0"


class _LargePeak(TorchDispatchMode):
    """Records the peak of the caching allocator's large-pool bytes (requests over 1 MB) above
    their level at entry, sampled after every op, and the most one op added (a bound on its
    largest request; allocations come from ops; a transient workspace an op frees before
    returning is not seen)."""

    def __init__(self, device):
        super().__init__()
        self.device = device
        self.base = self.peak = 0
        self.largest = self.kept = 0

    def now(self) -> int:
        return torch.cuda.memory_stats(self.device).get("allocated_bytes.large_pool.current", 0)

    def __enter__(self):
        self.base = self.peak = self.now()
        self.largest = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.now()
        out = func(*args, **(kwargs or {}))
        after = self.now()
        self.peak = max(self.peak, after)
        self.largest = max(self.largest, after - before)
        return out

    @property
    def bytes(self) -> int:
        return self.peak - self.base


def _pool_large(segments, pool, stream) -> tuple[int, int, list]:
    """(bytes of, free bytes in, sizes of the wholly free ones of) ``pool``'s large segments
    (``torch.cuda.memory_snapshot()`` entries) that allocations on ``stream`` may use."""
    size = free = 0
    empty = []
    for seg in segments:
        if (tuple(seg.get("segment_pool_id", (0, 0))) != tuple(pool) or seg.get("segment_type") != "large"
                or seg.get("stream") != stream.cuda_stream):
            continue
        size += seg.get("total_size", 0)
        blocks = seg.get("blocks", [])
        free += sum(blk["size"] for blk in blocks if blk.get("state") == "inactive")
        if blocks and all(blk.get("state") == "inactive" for blk in blocks):
            empty.append(seg.get("total_size", 0))
    return size, free, empty


def _round_seed(n: int) -> int:
    """``n`` bytes as a seed block: rounded up to 2 MB, at least 10 MB (a segment of its own size)."""
    return max(_SEED_MIN, -(-n // _SEED_ROUND) * _SEED_ROUND)


def _choose_seed(trial, need: int, request: int, tries: int = _SEED_TRIALS) -> tuple[int, list]:
    """(seed bytes, [(seed, bytes added past it), ...] of the trials made).

    ``trial(seed)`` returns the bytes the capture would add to the pool past a seed block of
    ``seed`` bytes (0: no seed); the seed taken adds the least, ``seed + added``.  Tried in
    turn: none; ``need`` (the peak of requests over 1 MB) and an eighth more (at least 2 MB:
    the requests' order leaves holes); then a quarter more each time, at least the largest
    request ``request``, until a seed holds everything or ``tries`` are made."""
    log = [(0, trial(0))]
    if log[0][1] == 0 or need <= 0:
        return 0, log
    best = (log[0][1], 0)
    seed = _round_seed(need + max(need // 8, _SEED_ROUND))
    while len(log) < tries:
        added = trial(seed)
        log.append((seed, added))
        if seed + added < best[0]:
            best = (seed + added, seed)
        if added == 0:
            break
        seed = _round_seed(seed + max(seed // 4, request))
    return best[1], log


def _trial_added(run, static, device, stream, empty: list, seed: int, peak=None) -> int:
    """Bytes ``run(out=static)`` adds to a pool whose large segments are ``empty`` (sizes, all
    free) after a seed block of ``seed`` bytes, found by running it on ``stream`` in a
    private pool set up so (the caching allocator places the requests there as it will in
    the capture: same allocator, same requests, same free blocks).  ``peak``: a _LargePeak
    to record the call with."""
    mp = torch.cuda.MemPool()
    with torch.cuda.stream(stream), torch.cuda.use_mem_pool(mp, device=device):
        blocks = [torch.empty(n, dtype=torch.uint8, device=device) for n in (*empty, seed) if n]
        del blocks
        with peak if peak is not None else contextlib.nullcontext():
            outs = run(out=static)
        del outs
        if peak is not None:
            # what stays allocated past the call (a workspace made on first use) is no part
            # of what the graph will need
            peak.kept = max(0, peak.now() - peak.base)
    size = _pool_large(torch.cuda.memory_snapshot(), mp.id, stream)[0]
    del mp
    return size - sum(empty) - seed


def _graphs_enabled() -> bool:
    return os.environ.get("FLEXPREFILL_SELECTION_GRAPHS", "1") != "0"


def _graph_applies(t: torch.Tensor, bh: int, nb: int) -> bool:
    """Whether a search over ``bh`` heads of ``nb`` blocks on ``t``'s device runs from a graph:
    on CUDA, graphs on, the caller not capturing one itself, and a graph pays (_graph_pays)."""
    return t.is_cuda and _graphs_enabled() and not torch.cuda.is_current_stream_capturing() and _graph_pays(bh, nb)


# graph keys whose capture failed: they stay eager (a warning says so once)
_ungraphable: set = set()


def _capture(key, device, fallback: str, run):
    """(graph, outputs) of ``run()`` captured in a CUDA graph, or None, with a warning and
    ``key`` marked ungraphable, where the capture (or a kernel) fails: the caller then stays
    correct, only slower.

    ``run(out=None)`` returns (counts, indices, ...); given ``out``, it writes counts and
    indices there.  A first call warms up (compilation, autotuning) and gives their shapes;
    the graph then writes them into tensors made outside its pool (the [heads, nb, nb] table
    is the largest tensor of the search: inside the pool it stayed live in the middle of the
    seed, and the requests after it did not fit around it), so that everything the graph
    allocates in its pool is free between replays.  Then trial calls, writing into those, in
    a private pool set up as the graph's pool is, find the seed block that adds the least to
    it (_trial_added, _choose_seed).

    Warm-up and capture run on the device's one capture stream: cuBLAS keeps a workspace per
    stream (32 MB and more on Hopper, allocated on the stream's first matmul and never
    freed), so a fresh side stream per capture left one behind each time, and a first matmul
    inside the capture put one into the graph's pool."""
    stream = torch.cuda.current_stream(device)
    cap = _capture_stream(device)
    cap.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    pool = _graph_pool(device)
    # the seed's trial calls need torch.cuda.MemPool (torch >= 2.7)
    seeding = pool is not None and _seeding() and hasattr(torch.cuda, "use_mem_pool")
    try:
        with torch.cuda.stream(cap):
            outs = run()
        stream.wait_stream(cap)
        # made on the caller's stream, where the replays run and the cache frees them
        static = (torch.empty_like(outs[0]), torch.empty_like(outs[1]))
        del outs
        cap.wait_stream(stream)
        seed = 0
        if seeding:
            size0, free, empty = _pool_large(torch.cuda.memory_snapshot(), pool, cap)
            try:
                peak = _LargePeak(device)
                added0 = _trial_added(run, static, device, cap, empty, 0, peak)
                need, request = peak.bytes - peak.kept, peak.largest
                seed, trials = _choose_seed(
                    lambda n: added0 if n == 0 else _trial_added(run, static, device, cap, empty, n), need, request)
            except Exception as e:  # a MemPool API this torch lacks: capture without a seed
                import warnings

                warnings.warn(f"flexprefill: the search graph's pool seed could not be sized "
                              f"({type(e).__name__}: {str(e)[:200]}); captured without one", RuntimeWarning, stacklevel=4)
                seeding, seed = False, 0
            stream.wait_stream(cap)
        with torch.cuda.graph(graph, pool=pool, stream=cap):
            if seed:
                # a block of the pool's own, freed at once: the capture's requests split it
                seed_block = torch.empty(seed, dtype=torch.uint8, device=device)
                del seed_block
            outs = run(out=static)
        stream.wait_stream(cap)
        if seeding:
            # what the capture added to the pool past the seed (requests the seed did not hold)
            grown = _pool_large(torch.cuda.memory_snapshot(), pool, cap)[0] - size0 - seed
            seed_log.append(dict(need=need, request=request, free=free, empty=sum(empty), seed=seed, grown=grown,
                                 trials=trials))
            del seed_log[:-16]
    except Exception as e:  # a capture this torch/triton/driver refuses
        import warnings

        stream.wait_stream(cap)
        warnings.warn(f"flexprefill: the pattern search could not be captured in a CUDA graph "
                      f"({type(e).__name__}: {str(e)[:200]}); {fallback}", RuntimeWarning, stacklevel=4)
        _ungraphable.add(key)
        return None
    return graph, outs


def _cache(key, entry):
    """Keep ``entry`` under ``key``, the least recently used past _GRAPH_CACHE dropped."""
    _graphs[key] = entry
    while len(_graphs) > _GRAPH_CACHE:
        _graphs.popitem(last=False)
    return entry


def _assemble_any(tensors: dict, *, cfg: FlexPrefillConfig, scale: float, fn=None, chunk_elems: int = _CHUNK_ELEMS,
                  index_dtype: torch.dtype = torch.int32):
    """``fn(**tensors)`` (default :func:`_assemble`), replayed from a cached CUDA graph when
    that pays (see above).  ``fn`` returns a tuple of tensors; the graph's are cloned out.
    ``chunk_elems`` sizes the eager path's head chunks (a graph uses its own)."""
    fn = _assemble if fn is None else fn
    vert = tensors["vert"]
    if not _graph_applies(vert, vert.numel() // max(1, vert.shape[-1]), vert.shape[-1]):
        return fn(**tensors, cfg=cfg, scale=scale, chunk_elems=chunk_elems, index_dtype=index_dtype)
    key = (fn.__name__, cfg, float(scale), vert.device, index_dtype,
           tuple((n, None if t is None else (tuple(t.shape), t.dtype)) for n, t in tensors.items()))
    if key in _ungraphable:
        return fn(**tensors, cfg=cfg, scale=scale, chunk_elems=chunk_elems, index_dtype=index_dtype)
    graph_chunk = _graph_chunk(vert.shape[-1])
    entry = _graphs.get(key)
    if entry is None:
        static = {n: (None if t is None else t.clone()) for n, t in tensors.items()}
        captured = _capture(key, vert.device, "it runs eagerly for this shape", lambda out=None: fn(
            **static, cfg=cfg, scale=scale, chunk_elems=graph_chunk, index_dtype=index_dtype, out=out))
        if captured is None:
            return fn(**tensors, cfg=cfg, scale=scale, chunk_elems=chunk_elems, index_dtype=index_dtype)
        entry = _cache(key, (captured[0], static, captured[1]))
    else:
        _graphs.move_to_end(key)
    graph, static, outs = entry
    for n, t in tensors.items():
        if t is not None:
            static[n].copy_(t)
    graph.replay()
    return tuple(o.clone() for o in outs)


def _dense_tail(vert, slash, q_hat, k_bar, q_bar, *, cfg: FlexPrefillConfig, scale: float, chunk_elems: int = _CHUNK_ELEMS,
                index_dtype: torch.dtype = torch.int32, out=None):
    """Everything of the dense search after the passes over q and k: the estimate, the JS
    distance and pattern of each head, the block sets (one graph replays it all).

    ``vert, slash`` fp32 [B, Hq, nb]; ``q_hat`` fp32 [B, Hq, D]; ``k_bar`` fp32 [B, nb, Hkv, D];
    ``q_bar`` fp32 [B, nb, Hq, D] or None (``tau == 0``).  Returns counts int32 [B*Hq, nb],
    indices int32 [B*Hq, nb, nb], js distance fp32 [B, Hq], query_aware bool [B, Hq].
    """
    nb = vert.shape[-1]
    group = q_hat.shape[1] // k_bar.shape[2]
    k_bar_q = k_bar.repeat_interleave(group, dim=2) if group > 1 else k_bar
    a_est = torch.softmax(scale * torch.einsum("bhd,bchd->bhc", q_hat, k_bar_q), dim=-1)
    dist = js_distance(vert, a_est)
    query_aware = dist < cfg.tau
    qb = kb = None
    if cfg.tau > 0:
        qb, kb = _per_head(q_bar), _per_head(k_bar_q)
    counts, indices = _assemble(vert.reshape(-1, nb), slash.reshape(-1, nb), query_aware.reshape(-1), qb, kb,
                                cfg=cfg, scale=scale, chunk_elems=chunk_elems, index_dtype=index_dtype, out=out)
    return counts, indices, dist, query_aware


def _per_head(x: torch.Tensor) -> torch.Tensor:
    """[B, nb, H, D] -> [B*H, nb, D] (contiguous)."""
    B, nb, H, D = x.shape
    return x.permute(0, 2, 1, 3).reshape(B * H, nb, D)


def compact_index_dtype(nb: int) -> torch.dtype:
    """The narrowest index dtype the kernel takes for ``nb`` blocks: int16 below 2^15 blocks
    (halves the [.., nb, nb] table: 151 MB instead of 302 MB for 9 heads at 256k), else int32.
    ``FLEXPREFILL_INT16_BLOCK_IDS=0`` keeps int32."""
    if os.environ.get("FLEXPREFILL_INT16_BLOCK_IDS", "1") == "0":
        return torch.int32
    return torch.int16 if nb < (1 << 15) else torch.int32


def _search(q, k, *, cfg: FlexPrefillConfig, scale: float, chunk_elems: int, index_dtype: torch.dtype,
            src: tuple | None = None, out=None):
    """The whole dense search: the passes over q and k, then :func:`_dense_tail` (its
    graph, where that pays, unless ``src`` says this runs inside the whole search's graph).

    ``src``: two int64 [1] tensors holding the addresses of q and k (see :func:`_search_graphed`);
    ``out``: the (counts, indices) that graph writes (with ``src`` only)."""
    N = q.shape[1]
    bs = cfg.block_size
    vert, slash = representative_block_scores(q, k, block_size=bs, scale=scale, src=src)
    k_bar = block_means(k, bs, src=None if src is None else src[1])  # [B, nb, Hkv, D]
    # the block means of q (when tau > 0) and the mean of the representative queries, as two
    # tensors: one [B, nb + 1, Hq, D] buffer passes 1 MB (the allocator's small-block limit)
    # where [B, nb, Hq, D] just fits (Gemma 3's 4 x 256 dims at 32k), and inside a graph one
    # request over 1 MB makes its pool keep a 20 MB segment
    q_src = None if src is None else src[0]
    q_hat = block_means(q, bs, rep=min(bs, N), blocks=False, src=q_src)[:, 0]  # [B, Hq, D]
    q_bar = block_means(q, bs, src=q_src) if cfg.tau > 0 else None  # [B, nb, Hq, D]
    tensors = dict(vert=vert, slash=slash, q_hat=q_hat, k_bar=k_bar, q_bar=q_bar)
    if src is not None:
        return _dense_tail(**tensors, cfg=cfg, scale=scale, chunk_elems=chunk_elems, index_dtype=index_dtype, out=out)
    return _assemble_any(tensors, cfg=cfg, scale=scale, fn=_dense_tail, chunk_elems=chunk_elems, index_dtype=index_dtype)


# --- the whole search as one CUDA graph ----------------------------------------------
#
# Where a graph pays (_graph_pays), the passes over q and k join it too: their kernels take
# q's and k's addresses from two device words (INDIRECT), which each call sets with two
# fills before the replay, so the graph reads the caller's tensors wherever they are, with
# no copy of them.  One call is then two fills, a replay and four output clones, against
# ~20 eager launches (3 Triton kernels at 20-40 us of host time each, the block means, the
# graph's input copies) before.  Needs q and k with unit last stride at 16-byte aligned
# addresses; the key holds their shapes, strides and dtypes.  Otherwise, and with
# FLEXPREFILL_SEARCH_GRAPH=0, the passes run eagerly and only the tail is graphed.

def _search_graph_enabled() -> bool:
    return os.environ.get("FLEXPREFILL_SEARCH_GRAPH", "1") != "0"


def _search_graphed(q, k, *, cfg: FlexPrefillConfig, scale: float, index_dtype: torch.dtype):
    """:func:`_search` replayed from a cached CUDA graph, or None where that does not apply."""
    B, N, Hq, _ = q.shape
    nb = math.ceil(N / cfg.block_size)
    if (
        not _graph_applies(q, B * Hq, nb)
        or not _search_graph_enabled()
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or q.data_ptr() % 16
        or k.data_ptr() % 16
    ):
        return None
    key = ("search", cfg, float(scale), q.device, index_dtype,
           tuple(q.shape), q.stride(), q.dtype, tuple(k.shape), k.stride(), k.dtype)
    if key in _ungraphable:
        return None
    entry = _graphs.get(key)
    if entry is None:
        src = (torch.empty(1, dtype=torch.int64, device=q.device), torch.empty(1, dtype=torch.int64, device=q.device))
    else:
        src = entry[1]
    # the addresses this call's kernels read (the capture's warm-up call reads them too)
    src[0].fill_(q.data_ptr())
    src[1].fill_(k.data_ptr())
    if entry is None:
        chunk = _graph_chunk(nb)

        def run(out=None):
            return _search(q, k, cfg=cfg, scale=scale, chunk_elems=chunk, index_dtype=index_dtype, src=src, out=out)

        captured = _capture(key, q.device, "its passes over q and k run eagerly for this shape", run)
        if captured is None:
            return None
        entry = _cache(key, (captured[0], src, captured[1]))
    else:
        _graphs.move_to_end(key)
    graph, _, outs = entry
    graph.replay()
    return tuple(o.clone() for o in outs)


def select_blocks_fast(q, k, *, config: FlexPrefillConfig, softmax_scale: float,
                       index_dtype: torch.dtype = torch.int32) -> BlockSelection:
    """Device version of :func:`flexprefill.reference.select_blocks` (inputs already checked).

    ``index_dtype``: int32 (the public :class:`BlockSelection` contract) or int16 (the
    operator's own selections, see :func:`compact_index_dtype`)."""
    cfg = config
    B, N, Hq, D = q.shape
    nb = math.ceil(N / cfg.block_size)
    out = _search_graphed(q, k, cfg=cfg, scale=softmax_scale, index_dtype=index_dtype)
    if out is None:
        out = _search(q, k, cfg=cfg, scale=softmax_scale, chunk_elems=_chunk_elems_for(q, k), index_dtype=index_dtype)
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


def _lengths(q_starts, q_ends, k_starts, k_ends):
    return (q_ends - q_starts).long(), (k_ends - k_starts).long()


def representative_block_scores_varlen(q, k, q_starts, q_ends, k_starts, k_ends, max_seqlen_k: int, *, block_size: int, scale: float):
    """Vertical and slash block mass of each sequence's last ``min(bs, n_q)`` queries, fp32 [S, Hq, max_nb] (0 past a sequence)."""
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
    rep_row_stats_kernel[(S * Hq, num_splits)](
        q, k, m, l, *strides,
        N, 0, keys_per_split, num_splits, Hq, Hq // Hkv, scale_log2, *bounds, m, m, mb, lb, nb,
        D=D, BD=BD, BR=BR, BK=BK, VARLEN=True, BLOCK_STATS=bst, BS=block_size, num_warps=4,
    )
    lse2 = _combine(m, l)

    vert = torch.empty(S * Hq, nb, dtype=torch.float32, device=dev)
    part = torch.empty(S * Hq, nb, 2, dtype=torch.float32, device=dev)
    rep_block_mass_kernel[(S * Hq, nb)](
        q, k, lse2, vert, part, *strides,
        N, 0, nb, Hq, Hq // Hkv, scale_log2, *bounds, vert, vert, mb, lb,
        D=D, BD=BD, BR=BR, BS=block_size, BK=min(BK, block_size), VARLEN=True, FROM_STATS=bst, num_warps=4,
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


def _live_rows(q_starts, q_ends, k_starts, k_ends, max_nb: int, block_size: int):
    """Bool [S, max_nb]: absolute query blocks holding queries of the chunk; and blocks per sequence [S]."""
    n_q, n_k = _lengths(q_starts, q_ends, k_starts, k_ends)
    first, end = chunk_rows(n_q, n_k, block_size)
    r = torch.arange(max_nb, device=q_starts.device)[None, :]
    return (r >= first[:, None]) & (r < end[:, None]), end


def full_causal_selection_varlen(q_starts, q_ends, k_starts, k_ends, Hq: int, max_seqlen_k: int, block_size: int):
    """Every causal block of each chunk's rows: counts int32 [S, Hq, max_nb], indices int32 [S, Hq, max_nb, max_nb].

    Broadcast over heads (stride 0); built on the device without a sync.
    """
    max_nb = math.ceil(max_seqlen_k / block_size)
    live, _ = _live_rows(q_starts, q_ends, k_starts, k_ends, max_nb, block_size)
    r = torch.arange(max_nb, device=q_starts.device)
    counts = torch.where(live, r[None, :] + 1, 0).to(torch.int32)
    keep = live[:, :, None] & (r[None, :] <= r[:, None])[None]
    indices = torch.where(keep, r[None, None, :], -1).to(torch.int32)
    S = counts.shape[0]
    return counts[:, None].expand(S, Hq, max_nb), indices[:, None].expand(S, Hq, max_nb, max_nb)


def _js_distance_masked(p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
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


def select_blocks_varlen_fast(
    q, k, q_starts, q_ends, k_starts, k_ends, max_seqlen_k: int, *,
    config: FlexPrefillConfig, softmax_scale: float, dense_below: int = 0, index_dtype: torch.dtype = torch.int32,
):
    """Device version of :func:`flexprefill.reference.select_blocks_varlen` (inputs already checked).

    Returns ``counts`` int32 [S, Hq, max_nb], ``indices`` [S, Hq, max_nb, max_nb] of ``index_dtype``
    (int32, or int16 for the operator's own use),
    ``query_aware`` bool [S, Hq], ``js_distance`` fp32 [S, Hq].  No host sync.
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
    n_q, n_k = _lengths(*bounds)
    live, nb_s = _live_rows(*bounds, nb, bs)  # [S, nb], [S]
    ar = torch.arange(nb, device=dev)
    col_ok = ar[None, :] < nb_s[:, None]  # [S, nb]

    vert, slash = representative_block_scores_varlen(q, k, *bounds, max_seqlen_k, block_size=bs, scale=scale)
    k_bar = block_means_varlen(k, k_starts, k_ends, k_starts, k_ends, nb, block_size=bs)  # [S, nb, Hkv, D]
    # mean of the representative queries (the last min(bs, n_q) rows of each sequence)
    n_rep = n_q.clamp(min=0, max=bs)
    o_r = torch.arange(bs, device=dev)
    m_rep = o_r[None, :] < n_rep[:, None]
    rows = torch.where(m_rep, q_ends.long()[:, None] - n_rep[:, None] + o_r[None, :], 0)
    q_rep = q[rows.flatten()].view(S, bs, Hq, D)
    q_hat = (q_rep * m_rep[:, :, None, None]).sum(1, dtype=torch.float32) / n_rep.clamp_min(1)[:, None, None]
    k_bar_q = k_bar.repeat_interleave(group, dim=2) if group > 1 else k_bar
    logits = (scale * torch.einsum("shd,schd->shc", q_hat, k_bar_q)).masked_fill(~col_ok[:, None, :], float("-inf"))
    a_est = torch.softmax(logits, dim=-1)
    dist = _js_distance_masked(vert, a_est, col_ok[:, None, :])
    short = (n_k < dense_below) | (n_q == 0)  # [S]: every causal block, no search
    query_aware = (dist < cfg.tau) & ~short[:, None]
    dist = torch.where(short[:, None], float("nan"), dist)

    q_bar = kb = None
    if cfg.tau > 0:
        q_bar = _per_head(block_means_varlen(q, *bounds, nb, block_size=bs))  # [S*Hq, nb, D]
        kb = _per_head(k_bar_q)
    tensors = dict(
        vert=vert.reshape(-1, nb), slash=slash.reshape(-1, nb), query_aware=query_aware.reshape(-1), q_bar=q_bar, k_bar=kb,
        nb_h=nb_s.repeat_interleave(Hq), live_h=live.repeat_interleave(Hq, dim=0),
        rows_h=live.sum(-1).clamp_min(1).float().repeat_interleave(Hq), short_h=short.repeat_interleave(Hq),
    )
    counts, indices = _assemble_any(tensors, cfg=cfg, scale=scale, chunk_elems=_chunk_elems_for(q, k),
                                    index_dtype=index_dtype)
    return counts.view(S, Hq, nb), indices.view(S, Hq, nb, nb), query_aware, dist
