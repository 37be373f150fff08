"""FlexPrefill's pattern search with the sequence split over ranks: each rank gets the block
lists of its own query blocks, and no rank ever holds more than its own queries and keys.

What crosses ranks (``N`` tokens, ``nb`` blocks, ``P`` ranks):

1. The representative queries (the last ``block_size`` queries, on rank 0, which holds the
   last chunk) are broadcast: ``bs x Hq x D`` in the input dtype.
2. Each rank scores them against its own keys.  Softmax normaliser: every rank's row max
   and sum of exponentials (``2 x Hq x bs`` fp32) are all-gathered and combined.  Each rank
   pools its keys' attention into the global vertical and slash bins; one all-reduce of
   ``2 x Hq x nb`` fp32 sums them.
3. The block means of the keys (``nb x Hkv x D`` fp32) are all-gathered, so every rank has
   the estimate, the JS distance and the pattern of every head.  The block means of the
   queries stay local: a rank scores only its own query blocks.
4. Vertical-slash heads need nothing more.  A query-aware head keeps the fewest entries of
   its flattened block scores (all query blocks, all ranks) reaching gamma: a global
   threshold, found by a radix selection on the fp32 bit patterns, four passes of 256-bin
   histograms (counts and fp64 sums, ``2 x 256`` per head), each all-reduced; the entries on
   the threshold are taken in global (row, column) order, from an all-gather of each chunk's
   tie count.

Everything the single-process search computes per block (block means, the estimate, the
per-row query-aware scores, the vertical-slash expansion, the budgets and caps) is computed
here by the same functions on the same values; what differs is the order of two sums: the
softmax normaliser of the representative queries and the slash bins (partial sums per rank),
and the query-aware head's running mass (an fp64 histogram sum here, an fp32 running sum in
order there).  So the selection is the single-process one except where a decision sits
within fp32 rounding of its threshold (tests/distributed/ checks equality).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..block_table import compact_block_mask
from ..config import FlexPrefillConfig
from ..reference import estimate_from_means, js_distance
from ..search.torch_search import row_masks
from .comm import Comm
from .layout import zigzag_chunks, zigzag_owner, zigzag_positions

__all__ = ["LocalBlockSelection"]

# bytes of the representative queries' fp32 scores computed at once (heads in chunks)
_SCORE_BYTES = 256 << 20
# entries of the query-aware scores histogrammed at once (each takes ~24 bytes of temporaries)
_HIST_ENTRIES = 1 << 24


@dataclass
class LocalBlockSelection:
    """The block lists of one rank's query blocks in a context-parallel call.

    ``mask``: bool [B, Hq, R, nb], True where query block ``rows[i]`` reads key block ``c``
    (``R = 2 * blocks per chunk``: the early chunk's blocks, then the late one's; ``nb`` the
    blocks of the whole sequence).  ``rows``: int64 [R], the absolute query blocks.
    ``query_aware``, ``js_distance``: [B, Hq], the same on every rank.  ``seq_len``: tokens of
    the whole sequence.  ``dense``: every causal block (a short sequence, or ``dense_above``).
    """

    mask: torch.Tensor
    rows: torch.Tensor
    block_size: int
    seq_len: int
    world: int
    rank: int
    query_aware: torch.Tensor
    js_distance: torch.Tensor
    dense: bool = False

    @property
    def counts(self) -> torch.Tensor:
        """int32 [B, Hq, R]: key blocks per query block."""
        return self.mask.sum(-1, dtype=torch.int32)

    @property
    def indices(self) -> torch.Tensor:
        """int32 [B, Hq, R, nb]: the key blocks, ascending, -1 past the count (the block-table format)."""
        return compact_block_mask(self.mask)[1]

    @classmethod
    def from_global(cls, mask: torch.Tensor, *, world: int, rank: int, block_size: int, query_aware=None,
                    js_distance=None) -> "LocalBlockSelection":
        """Rank ``rank``'s rows of a whole-sequence block mask bool [B, Hq, nb, nb] (for example
        ``BlockSelection.to_mask()`` of a single-process search, or a hand-made table)."""
        B, Hq, nb, _ = mask.shape
        if nb % (2 * world):
            raise ValueError(f"the mask has {nb} query blocks, not a multiple of 2 * world = {2 * world}")
        rows = own_rows(nb // (2 * world), world, rank, mask.device)
        qa = query_aware if query_aware is not None else torch.zeros(B, Hq, dtype=torch.bool, device=mask.device)
        jd = js_distance if js_distance is not None else torch.full((B, Hq), float("nan"), device=mask.device)
        return cls(mask=mask[:, :, rows].contiguous(), rows=rows, block_size=block_size, seq_len=nb * block_size,
                   world=world, rank=rank, query_aware=qa, js_distance=jd)


def own_rows(blocks_per_chunk: int, world: int, rank: int, device) -> torch.Tensor:
    """Absolute query blocks of rank ``rank``'s two chunks, in local order (int64)."""
    a, b = zigzag_chunks(world, rank)
    ar = torch.arange(blocks_per_chunk, device=device)
    return torch.cat([a * blocks_per_chunk + ar, b * blocks_per_chunk + ar])


def dense_selection(B: int, Hq: int, seq_len: int, block_size: int, comm: Comm, device) -> LocalBlockSelection:
    """Every causal block of this rank's rows (no search)."""
    nb = seq_len // block_size
    rows = own_rows(nb // (2 * comm.world), comm.world, comm.rank, device)
    mask = (torch.arange(nb, device=device)[None, :] <= rows[:, None]).expand(B, Hq, -1, -1)
    return LocalBlockSelection(
        mask=mask, rows=rows, block_size=block_size, seq_len=seq_len, world=comm.world, rank=comm.rank,
        query_aware=torch.zeros(B, Hq, dtype=torch.bool, device=device),
        js_distance=torch.full((B, Hq), float("nan"), device=device), dense=True,
    )


def search(q, k, cfg: FlexPrefillConfig, scale: float, comm: Comm) -> LocalBlockSelection:
    """Steps 1-4 for this rank's rows; ``q [B, 2L, Hq, D]``, ``k [B, 2L, Hkv, D]`` are its two chunks
    (inputs already checked, the same shapes on every rank)."""
    B, n_loc, Hq, D = q.shape
    P, r = comm.world, comm.rank
    bs = cfg.block_size
    N = P * n_loc
    nb = N // bs
    nbc = n_loc // 2 // bs
    dev = q.device
    rows = own_rows(nbc, P, r, dev)

    # step 1: the representative queries are the end of rank 0's late chunk
    n_rep = bs
    if r == 0:
        q_rep = q[:, n_loc - n_rep:].contiguous()
    else:
        q_rep = torch.empty(B, n_rep, Hq, D, dtype=q.dtype, device=dev)
    comm.broadcast(q_rep, src=0)
    vert, slash = representative_block_scores(q_rep, k, zigzag_positions(N, P, r, dev), seq_len=N, block_size=bs,
                                              scale=scale, comm=comm)

    # step 3: every block mean of the keys, on every rank
    k_bar = global_blocks(comm.all_gather(whole_block_means(k, bs)), P)  # [B, nb, Hkv, D]
    q_hat = q_rep.float().mean(dim=1)
    dist = js_distance(vert, estimate_from_means(q_hat, k_bar, scale=scale))
    query_aware = dist < cfg.tau

    # step 4 on this rank's rows; a query-aware head's threshold is collective
    q_bar = whole_block_means(q, bs) if bool(query_aware.any()) else None

    def select(flat, gamma):
        return collective_top_mass(flat, gamma, comm=comm)

    mask = row_masks(vert, slash, query_aware, q_bar, k_bar, rows, cfg=cfg, scale=scale, num_rows=nb, select=select)
    return LocalBlockSelection(mask=mask, rows=rows, block_size=bs, seq_len=N, world=P, rank=r,
                               query_aware=query_aware, js_distance=dist)


def whole_block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """:func:`flexprefill.reference.block_means` of ``x [B, n, H, D]`` whose ``n`` is a multiple of
    ``block_size``, in one reduction instead of one per block (the same values on the CPU:
    tests/distributed/)."""
    B, n, H, D = x.shape
    return x.reshape(B, n // block_size, block_size, H, D).float().mean(2)


def global_blocks(gathered: torch.Tensor, world: int) -> torch.Tensor:
    """Per-block tensors of every rank ``[P, B, 2 * nbc, ...]`` (local order) -> ``[B, nb, ...]`` in sequence order."""
    P, B, two_nbc = gathered.shape[:3]
    rest = gathered.shape[3:]
    g = gathered.view(P, B, 2, two_nbc // 2, *rest)
    # chunk c < P is rank c's early chunk; chunk 2P-1-r is rank r's late chunk
    early, late = g[:, :, 0], g[:, :, 1].flip(0)
    return torch.cat([early, late], dim=0).transpose(0, 1).reshape(B, P * two_nbc, *rest)


def representative_block_scores(q_rep, k, key_pos, *, seq_len: int, block_size: int, scale: float, comm: Comm):
    """Vertical and slash block scores fp32 [B, Hq, nb] of the whole sequence, from this rank's keys.

    ``q_rep [B, n_rep, Hq, D]``: the last ``n_rep`` queries of the sequence (positions
    ``N - n_rep .. N - 1``); ``k [B, n_loc, Hkv, D]`` this rank's keys at global positions
    ``key_pos`` int [n_loc].  As :func:`flexprefill.search.torch_search.representative_block_scores`,
    with the softmax normaliser and the pooled sums combined over the ranks.
    """
    B, n_rep, Hq, D = q_rep.shape
    n_loc, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    N = seq_len
    nb = math.ceil(N / block_size)
    dev = q_rep.device
    X = B * Hq
    pos_q = torch.arange(N - n_rep, N, device=dev)
    key_blk = torch.div(key_pos, block_size, rounding_mode="floor")
    offset_blk = torch.div(pos_q, block_size, rounding_mode="floor")[:, None] - key_blk[None, :]  # [n_rep, n_loc]
    future = key_pos[None, :] > pos_q[:, None]
    bins = torch.where(offset_blk >= 0, offset_blk, nb).view(-1)
    qh = q_rep.float().permute(0, 2, 1, 3).reshape(X, n_rep, D)
    kh = k.float().permute(0, 2, 3, 1).reshape(B * Hkv, D, n_loc)
    kv_of = torch.arange(X, device=dev) // group
    step = max(1, _SCORE_BYTES // max(1, n_rep * n_loc * 4))

    def scores(h0, h1):
        s = torch.matmul(scale * qh[h0:h1], kh.index_select(0, kv_of[h0:h1]))
        return s.masked_fill(future, float("-inf"))

    # the softmax normaliser over all ranks' keys: each rank's row max and sum of exponentials
    local = torch.empty(2, X, n_rep, dtype=torch.float32, device=dev)
    for h0 in range(0, X, step):
        h1 = min(X, h0 + step)
        s = scores(h0, h1)
        m = s.amax(-1)
        local[0, h0:h1] = m
        local[1, h0:h1] = torch.exp(s - torch.where(m == float("-inf"), 0.0, m)[..., None]).sum(-1)
    every = comm.all_gather(local)  # [P, 2, X, n_rep]
    m = every[:, 0].amax(0)
    z = (every[:, 1] * torch.exp(every[:, 0] - m)).sum(0)

    pooled = torch.zeros(2, X, nb + 1, dtype=torch.float32, device=dev)
    vert, slash = pooled[0], pooled[1]
    for h0 in range(0, X, step):
        h1 = min(X, h0 + step)
        a = torch.exp(scores(h0, h1) - m[h0:h1, :, None]) / z[h0:h1, :, None] / n_rep  # [n, n_rep, n_loc]
        vert[h0:h1].scatter_add_(1, key_blk.expand(h1 - h0, n_loc), a.sum(1))
        slash[h0:h1].scatter_add_(1, bins.expand(h1 - h0, -1), a.view(h1 - h0, -1))
    pooled = comm.all_reduce(pooled[:, :, :nb].contiguous())
    return pooled[0].view(B, Hq, nb), pooled[1].view(B, Hq, nb)


def collective_top_mass(flat: torch.Tensor, gamma: float, *, comm: Comm) -> torch.Tensor:
    """:func:`flexprefill.search.torch_search.top_mass` over the entries of every rank.

    ``flat`` fp32 [A, n] >= 0: this rank's part of each query-aware head's flattened block
    scores, its early chunk's rows then its late chunk's (each row ``nb`` entries, ``n = 2 * nbc * nb``).
    Returns bool [A, n]: the entries of the fewest, largest first, whose sum over all ranks
    reaches ``gamma`` of the head's total; entries equal to the last one kept are taken in
    global (row, column) order.  Every rank must call it with the same ``A``.  Heads are
    histogrammed a few at a time (at most ``_HIST_ENTRIES`` entries at once).
    """
    A, n = flat.shape
    if gamma >= 1.0:
        return torch.ones(A, n, dtype=torch.bool, device=flat.device)
    dev = flat.device
    step = max(1, _HIST_ENTRIES // max(1, n))
    spans = [(a0, min(A, a0 + step)) for a0 in range(0, A, step)]

    def bits(a0, a1):
        # non-negative fp32 values order as their bit patterns do; +0 and -0 both as 0
        f = flat[a0:a1]
        return torch.where(f > 0, f.view(torch.int32), 0).long()

    total = comm.all_reduce(torch.cat([flat[a0:a1].double().sum(-1) for a0, a1 in spans]))
    goal = gamma * total
    prefix = torch.zeros(A, dtype=torch.int64, device=dev)
    above = torch.zeros(A, dtype=torch.float64, device=dev)  # mass of the entries above the prefix
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(A, 256, dtype=torch.float64, device=dev)
        for a0, a1 in spans:
            b = bits(a0, a1)
            digit = torch.where((b >> (shift + 8)) == prefix[a0:a1, None], (b >> shift) & 255, 256)
            h = torch.zeros(a1 - a0, 257, dtype=torch.float64, device=dev)
            h.scatter_add_(1, digit, flat[a0:a1].double())
            hist[a0:a1] = h[:, :256]
        hist = comm.all_reduce(hist)
        # incl[d]: mass of the candidates whose digit is >= d (incl[256] = 0)
        incl = torch.cat([hist.flip(-1).cumsum(-1).flip(-1), torch.zeros(A, 1, dtype=hist.dtype, device=dev)], -1)
        # the largest digit whose candidates, with everything above, reach the goal
        reach = (above[:, None] + incl[:, :256]) >= goal[:, None]
        d = (reach.sum(-1) - 1).clamp_min(0)
        above = above + incl.gather(1, d[:, None] + 1)[:, 0]
        prefix = (prefix << 8) | d
    t = prefix.to(torch.int32).view(torch.float32).double()
    # the fewest ties that bring the kept mass to the goal
    need = torch.where(t > 0, torch.ceil((goal - above) / t.clamp_min(1e-300)), 1.0).clamp_min(1.0)
    keep = torch.empty(A, n, dtype=torch.bool, device=dev)
    ties = torch.empty(A, n, dtype=torch.bool, device=dev)
    for a0, a1 in spans:
        b = bits(a0, a1)
        keep[a0:a1] = b > prefix[a0:a1, None]
        ties[a0:a1] = b == prefix[a0:a1, None]
    # ties in global order: chunk by chunk (every rank's tie count per chunk), then in place
    two = ties.view(A, 2, -1)
    per_rank = comm.all_gather(two.sum(-1))  # [P, A, 2]
    P = comm.world
    order = [zigzag_owner(c, P) for c in range(2 * P)]
    per_chunk = torch.stack([per_rank[o, :, s] for o, s in order], dim=-1)  # [A, 2P]
    before = per_chunk.cumsum(-1) - per_chunk
    a, b = zigzag_chunks(P, comm.rank)
    start = torch.stack([before[:, a], before[:, b]], dim=-1)  # [A, 2]
    rank_in = start[:, :, None] + two.cumsum(-1) - 1
    keep |= (two & (rank_in < need[:, None, None])).view(A, n)
    return keep
