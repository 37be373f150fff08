"""The block sets of the pattern search on the device (step 4 of FlexPrefill): each head's
vertical-slash set (sink + top columns, diagonal + top offsets), the query-aware ranking,
and their union per row compacted into the block table, in one Triton pass per row
(``assemble_rows_kernel``) or, for ``max_budget``, in PyTorch ops."""

from __future__ import annotations

import torch
import triton

from ..block_table import compact_block_mask
from ..config import FlexPrefillConfig
from ..options import options
from ..ops.kernels.search import assemble_rows_kernel
from . import gamma as G

__all__ = ["assemble", "assemble_torch", "vs_sets", "chunk_elems_for", "compact_index_dtype", "per_head"]

# elements of one [heads, nb, nb] working set of the query-aware search (its scores, their
# sort, ~27 bytes per element at the peak: an H200 profile at 128k, 32 heads, 4M elements,
# held 112 MB over the same search without it).  Eagerly the working set grows with the
# bytes of q + k + v (15% of them) from 2^22 up to 2^23 elements: fewer, larger chunks cost
# less host time (the 128k search is host-bound).  Not below 2^22: sized down to 15% for
# SmolLM2's small heads (one head per chunk at 128k) the search took 32% of the operator
# instead of 19.5% (H200 suite), for 15% instead of 28.5% memory
_CHUNK_ELEMS = 1 << 22
_CHUNK_FRACTION = 0.15
_CHUNK_BYTES_PER_ELEM = 27


def chunk_elems_for(q: torch.Tensor, k: torch.Tensor) -> int:
    """Working-set elements of an eager query-aware search over these q and k (v as k)."""
    qkv = q.numel() * q.element_size() + 2 * k.numel() * k.element_size()
    return int(min(1 << 23, max(_CHUNK_ELEMS, _CHUNK_FRACTION * qkv / _CHUNK_BYTES_PER_ELEM)))


# the set assembly as one Triton pass per row (False: the PyTorch ops it replaced, kept for
# max_budget, which caps rows by score, and for timing the two: benchmarks/profile_search_parts.py)
_FUSED_ASSEMBLY = True


def _clamp(n: torch.Tensor, lo: int, hi: int | None, nb: int) -> torch.Tensor:
    n = n.clamp_min(lo)
    if hi is not None:
        n = n.clamp_max(hi)
    return n.clamp_max(nb)


def vs_sets(vert, slash, *, gamma: float, min_b: int, max_b: int | None, nb_h: torch.Tensor | None, floor: bool):
    """Per head, the kept columns (sink + top n_v) and diagonals (offset 0 + top n_s), bool [BH, nb] each.

    With ``floor`` also the sets of the ``min_b`` best (the query-aware heads' floor).  One
    sort of the stacked scores serves the budgets and every set.
    """
    nb = vert.shape[-1]
    vs = torch.stack((vert, slash))  # [2, BH, nb]
    srt = G.sort_desc(vs)
    n = _clamp(G.count_to_mass(vs, gamma, srt.values), min_b, max_b, nb)
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
    return G.top_n(prio, keep) & mask


def _tri_flat(nb: int, device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Flat positions ``r * nb + c`` of the causal (row, col) pairs, row-major: the query-aware
    ranking sorts these nb(nb+1)/2 entries, not all nb^2 (the others are 0 and never reached:
    the gamma count stops at the last positive entry, whose running sum is the total).
    ``dtype`` int32 halves it where it only feeds ``index_select`` (nb^2 < 2^31)."""
    tri = torch.tril_indices(nb, nb, device=device, dtype=dtype)
    return tri[0] * nb + tri[1]


def _qa_scores(q_bar, k_bar, *, scale: float, nb: int, live_c, rows_c, not_causal, tri_flat, keep_s: bool = True,
               softcap: float | None = None):
    """The query-aware ranking's scores of a head chunk: ``s``, the block-mean attention
    softmax per row [heads, nb, nb] (None unless ``keep_s``; its logits soft-capped by
    ``softcap``), and ``flat``, its causal entries (positions ``tri_flat``) divided by the number of rows.

    Each [heads, nb, nb] buffer is freed as soon as the next is made and the rest is done in
    place, so at most two of them are live (the logits and their softmax); the values are
    those of the out-of-place forms."""
    logits = torch.baddbmm(q_bar.new_empty(()), q_bar, k_bar.transpose(1, 2), beta=0.0, alpha=scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
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


def assemble(vert, slash, query_aware, q_bar, k_bar, *, cfg: FlexPrefillConfig, scale: float,
             nb_h=None, live_h=None, rows_h=None, short_h=None, chunk_elems: int = _CHUNK_ELEMS,
             index_dtype: torch.dtype = torch.int32, out=None, softcap: float | None = None):
    """Block sets of every head from its scores, compacted: counts int32 [BH, nb], indices int32 [BH, nb, nb].

    Arguments as :func:`assemble_torch`.  The sets are built and compacted row by row in
    one Triton pass (``assemble_rows_kernel``): per head chunk of the query-aware ranking
    only its scores, their sort and the threshold entry run as PyTorch ops; without it,
    one launch for every head.  ``max_budget`` takes the PyTorch path.
    """
    if cfg.max_budget_blocks is not None or not _FUSED_ASSEMBLY:
        return assemble_torch(vert, slash, query_aware, q_bar, k_bar, cfg=cfg, scale=scale, nb_h=nb_h, live_h=live_h,
                              rows_h=rows_h, short_h=short_h, chunk_elems=chunk_elems, index_dtype=index_dtype, out=out,
                              softcap=softcap)
    BH, nb = vert.shape
    dev = vert.device
    use_qa = cfg.tau > 0
    sets = vs_sets(vert, slash, gamma=cfg.gamma, min_b=cfg.min_budget_blocks, max_b=None, nb_h=nb_h, floor=use_qa)
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
                            rows_c=rows_h[h0:h1] if rows_h is not None else None, not_causal=not_causal,
                            tri_flat=tri_flat, keep_s=False, softcap=softcap)
        # the n-th entry of the ranking: every entry before it in (value desc, position asc) is kept
        thr, thr_pos = G.threshold_entry(flat, cfg.gamma)
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


def assemble_torch(vert, slash, query_aware, q_bar, k_bar, *, cfg: FlexPrefillConfig, scale: float,
                   nb_h=None, live_h=None, rows_h=None, short_h=None, chunk_elems: int = _CHUNK_ELEMS,
                   index_dtype: torch.dtype = torch.int32, out=None, softcap: float | None = None):
    """Block sets of every head from its scores, compacted: counts int32 [BH, nb], indices int32 [BH, nb, nb].

    ``vert, slash`` fp32 [BH, nb]; ``query_aware`` bool [BH]; ``q_bar, k_bar`` fp32 block
    means [BH, nb, D] (``k_bar`` already per query head; both unused when ``tau == 0``).
    Packed sequences add ``nb_h`` (blocks of each head's sequence) [BH], ``live_h`` (rows
    of the chunk) bool [BH, nb], ``rows_h`` (their number) fp32 [BH] and ``short_h`` (heads
    that take every causal block of their rows) bool [BH].  Heads are processed a fixed
    number at a time whatever the data, so a shape always issues the same launches.
    ``out``: (counts, indices) to write instead of new tensors (a CUDA graph's static outputs).
    ``softcap``: the query-aware ranking's block logits soft-capped.
    """
    BH, nb = vert.shape
    dev = vert.device
    min_b, max_b = cfg.min_budget_blocks, cfg.max_budget_blocks
    use_qa = cfg.tau > 0
    sets = vs_sets(vert, slash, gamma=cfg.gamma, min_b=min_b, max_b=max_b, nb_h=nb_h, floor=use_qa)
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
                                 rows_c=rows_h[sl] if rows_h is not None else None, not_causal=not_causal, tri_flat=tri_flat,
                                 softcap=softcap)
            kept = G.keep_to_mass(flat, cfg.gamma)
            sel = torch.zeros(s.shape[0], nb * nb, dtype=torch.bool, device=dev).index_copy_(1, tri_flat, kept).view_as(s)
            del flat, kept
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


def per_head(x: torch.Tensor) -> torch.Tensor:
    """[B, nb, H, D] -> [B*H, nb, D] (contiguous)."""
    B, nb, H, D = x.shape
    return x.permute(0, 2, 1, 3).reshape(B * H, nb, D)


def compact_index_dtype(nb: int) -> torch.dtype:
    """The narrowest index dtype the kernel takes for ``nb`` blocks: int16 below 2^15 blocks
    (halves the [.., nb, nb] table: 151 MB instead of 302 MB for 9 heads at 256k), else int32.
    ``Options.int16_block_ids`` off keeps int32."""
    if not options().int16_block_ids:
        return torch.int32
    return torch.int16 if nb < (1 << 15) else torch.int32

