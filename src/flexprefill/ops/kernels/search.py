"""Kernels of the pattern search: the representative queries' block-pooled attention streamed
over the keys, block means, the split combine, the row assembly and the radix threshold.
Tested against flexprefill.reference on CPU (interpreter, fp16/fp32), bf16 on GPU.  Limits: D <= 256, n_rep <= 128.

``rep_row_stats_kernel`` / ``rep_block_mass_kernel``: per (sequence, query head), the softmax
attention of the last ``n_rep <= bs`` queries over all keys without materialising the
[n_rep, N] matrix: a first pass gathers each row's max and sum over key splits
(flash-decoding style), a second recomputes each key block's probabilities and reduces them
to the block's vertical mass and its share of the two block diagonals the rows can sit on
(or, with ``BLOCK_STATS`` / ``FROM_STATS``, the first pass stores each key block's row max
and sum and the second reads them).  ``VARLEN`` switches to packed sequences (per-sequence
row bounds loaded in the kernel, queries = the last positions of a chunk over a cached
prefix); programs past a sequence's keys do no work.  ``INDIRECT``: q and k are read at the
addresses two device words hold (a CUDA graph's inputs).  ``SOFTCAP``: the scores are
soft-capped (``cap * tanh(s / cap)``, as in the attention they stand for; ``kernels.softcap``).
``assemble_rows_kernel``: each row's kept blocks from the head's column, diagonal and ranked
sets, compacted in one pass.
"""

import triton
import triton.language as tl

from .softcap import scores_log2


@triton.jit
def _indirect(x, src):
    """The tensor whose address ``src`` (int64 [1]) holds, typed as ``x`` (``INDIRECT``: a
    captured CUDA graph reads its inputs wherever the caller's tensors are on each replay;
    torch's allocations are 512-byte aligned, and the caller checks the addresses are)."""
    return tl.multiple_of(tl.load(src).to(x.dtype), 16)


@triton.jit
def _rep_tile(b_q, b_m, b_l, p_kh, k_lo, n_k, pos_q, m_r, o_d, m_d, stride_kn, scale_log2, cap_scale, cap_log2,
              BK: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online row max and sum (log2 domain) of the representative rows over keys [k_lo, k_lo + BK)."""
    o_k = k_lo + tl.arange(0, BK)
    m_k = o_k < n_k
    p_k = p_kh + o_k[:, None] * stride_kn + o_d[None, :]
    # [BK, BD]
    b_k = tl.load(p_k, mask=m_k[:, None] & m_d[None, :], other=0.0)
    # [BR, BK]
    b_s = scores_log2(tl.dot(b_q, tl.trans(b_k)), scale_log2, cap_scale, cap_log2, SOFTCAP)
    m_s = m_r[:, None] & m_k[None, :] & (o_k[None, :] <= pos_q[:, None])
    b_s = tl.where(m_s, b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    # rows that saw no key yet keep -inf: guard the exp against -inf - -inf
    b_safe = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_l = b_l * tl.exp2(b_m - b_safe) + tl.sum(tl.exp2(b_s - b_safe[:, None]), 1)
    return b_mn, b_l


@triton.jit
def _every(cond, o):
    """The scalar condition ``cond`` for every entry of ``o``, as a boolean tensor: combining
    it with a tensor directly is the same on the GPU, but triton 3.9's interpreter splats a
    scalar comparison into int32, which masked loads and stores refuse."""
    return tl.where(cond, o == o, o != o)


@triton.jit
def _rep_rows(q, k, i_b, i_h, i_hk, o_r, o_d, stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
              N, N_REP, q_starts, q_ends, k_starts, k_ends, BR: tl.constexpr, VARLEN: tl.constexpr):
    """Sequence i_b's representative rows for head i_h (K/V head i_hk): its key count, the
    number of rows, their positions among the keys, pointers to the rows of q [BR, BD] and
    to the head's first key.  ``VARLEN``: the queries are the last rows before q_ends[i_b],
    the keys rows [k_starts, k_ends) (a chunk over a cached prefix sits at its end)."""
    if VARLEN:
        q_end = tl.load(q_ends + i_b).to(tl.int64)
        k_row0 = tl.load(k_starts + i_b).to(tl.int64)
        n_k = tl.load(k_ends + i_b).to(tl.int64) - k_row0
        n_rep = tl.minimum(q_end - tl.load(q_starts + i_b).to(tl.int64), BR)
        pos_q = n_k - n_rep + o_r
        p_q = q + (q_end - n_rep + o_r[:, None]) * stride_qn + i_h * stride_qh + o_d[None, :]
        p_kh = k + k_row0 * stride_kn + i_hk * stride_kh
    else:
        n_k = N
        n_rep = N_REP
        pos_q = N - N_REP + o_r
        p_q = q + i_b * stride_qb + i_h * stride_qh + pos_q[:, None] * stride_qn + o_d[None, :]
        p_kh = k + i_b * stride_kb + i_hk * stride_kh
    return n_k, n_rep, pos_q, p_q, p_kh


@triton.jit
def rep_row_stats_kernel(
    q, k, m_out, l_out,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    N, N_REP, KEYS_PER_SPLIT, NUM_SPLITS, HQ, GROUP, scale_log2,
    q_starts, q_ends, k_starts, k_ends, q_src, k_src, mb_out, lb_out, NB, cap_scale, cap_log2,
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, VARLEN: tl.constexpr = False,
    INDIRECT: tl.constexpr = False, BLOCK_STATS: tl.constexpr = False, BS: tl.constexpr = 128,
    SOFTCAP: tl.constexpr = False,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_split = tl.program_id(1).to(tl.int64)
    if INDIRECT:
        q, k = _indirect(q, q_src), _indirect(k, k_src)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_hk = i_h // GROUP

    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    start = i_split * KEYS_PER_SPLIT
    n_k, n_rep, pos_q, p_q, p_kh = _rep_rows(q, k, i_b, i_h, i_hk, o_r, o_d, stride_qb, stride_qn, stride_qh,
                                             stride_kb, stride_kn, stride_kh, N, N_REP, q_starts, q_ends,
                                             k_starts, k_ends, BR, VARLEN)
    if VARLEN:
        # splits past the sequence's keys run no iteration
        n_iter = tl.minimum(KEYS_PER_SPLIT, n_k - start)
    else:
        n_iter = KEYS_PER_SPLIT
    m_r = o_r < n_rep
    m_d = o_d < D
    # [BR, BD]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)

    b_m = tl.full([BR], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BR], dtype=tl.float32)
    if BLOCK_STATS:
        # per key block (splits start on block bounds) its rows' max and sum, stored for
        # the block-mass pass, which then needs no second pass over the keys
        for c0 in range(0, n_iter, BS):
            b_mb = tl.full([BR], float("-inf"), dtype=tl.float32)
            b_lb = tl.zeros([BR], dtype=tl.float32)
            for k1 in range(0, BS, BK):
                b_mb, b_lb = _rep_tile(b_q, b_mb, b_lb, p_kh, start + c0 + k1, n_k, pos_q, m_r, o_d, m_d, stride_kn,
                                       scale_log2, cap_scale, cap_log2, BK, SOFTCAP)
            i_c = (start + c0) // BS
            o_blk = (i_bh * NB + i_c) * BR + o_r
            tl.store(mb_out + o_blk, b_mb, mask=_every(i_c < NB, o_r))
            tl.store(lb_out + o_blk, b_lb, mask=_every(i_c < NB, o_r))
            b_mn = tl.maximum(b_m, b_mb)
            b_safe = tl.where(b_mn == float("-inf"), 0.0, b_mn)
            b_l = b_l * tl.exp2(b_m - b_safe) + b_lb * tl.exp2(b_mb - b_safe)
            b_m = b_mn
    else:
        for k0 in range(0, n_iter, BK):
            b_m, b_l = _rep_tile(b_q, b_m, b_l, p_kh, start + k0, n_k, pos_q, m_r, o_d, m_d, stride_kn, scale_log2,
                                 cap_scale, cap_log2, BK, SOFTCAP)

    o_out = (i_bh * NUM_SPLITS + i_split) * BR + o_r
    tl.store(m_out + o_out, b_m)
    tl.store(l_out + o_out, b_l)


@triton.jit
def rep_block_mass_kernel(
    q, k, lse2, vert, part,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    N, N_REP, NB, HQ, GROUP, scale_log2,
    q_starts, q_ends, k_starts, k_ends, q_src, k_src, mb, lb, cap_scale, cap_log2,
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
    VARLEN: tl.constexpr = False, INDIRECT: tl.constexpr = False, FROM_STATS: tl.constexpr = False,
    SOFTCAP: tl.constexpr = False,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    if INDIRECT:
        q, k = _indirect(q, q_src), _indirect(k, k_src)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_hk = i_h // GROUP

    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    n_k, n_rep, pos_q, p_q, p_kh = _rep_rows(q, k, i_b, i_h, i_hk, o_r, o_d, stride_qb, stride_qn, stride_qh,
                                             stride_kb, stride_kn, stride_kh, N, N_REP, q_starts, q_ends,
                                             k_starts, k_ends, BR, VARLEN)
    if VARLEN:
        nb = (n_k + BS - 1) // BS
        # key blocks past the sequence run no iteration and store zeros
        n_iter = tl.where(i_c < nb, BS, 0)
    else:
        nb = NB
        n_iter = BS
    m_r = o_r < n_rep
    m_d = o_d < D
    b_lse = tl.load(lse2 + i_bh * BR + o_r, mask=m_r, other=0.0)
    if FROM_STATS:
        # the first pass's per-block row max and sum: the mass is sum * 2^(max - lse)
        m_b = m_r & _every(n_iter > 0, o_r)
        b_mb = tl.load(mb + (i_bh * NB + i_c) * BR + o_r, mask=m_b, other=float("-inf"))
        b_lb = tl.load(lb + (i_bh * NB + i_c) * BR + o_r, mask=m_b, other=0.0)
        b_row = tl.where(b_mb == float("-inf"), 0.0, b_lb * tl.exp2(b_mb - b_lse))
    else:
        # [BR, BD]
        b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)
        # [BR]
        b_row = tl.zeros([BR], dtype=tl.float32)
        for k0 in range(0, n_iter, BK):
            o_k = i_c * BS + k0 + tl.arange(0, BK)
            m_k = o_k < n_k
            p_k = p_kh + o_k[:, None] * stride_kn + o_d[None, :]
            # [BK, BD]
            b_k = tl.load(p_k, mask=m_k[:, None] & m_d[None, :], other=0.0)
            # [BR, BK]
            b_s = scores_log2(tl.dot(b_q, tl.trans(b_k)), scale_log2, cap_scale, cap_log2, SOFTCAP)
            m_s = m_r[:, None] & m_k[None, :] & (o_k[None, :] <= pos_q[:, None])
            b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
            b_row += tl.sum(b_p, 1)

    # rows in the last query block see this key block at offset nb-1-c, the others at nb-2-c
    m_last = pos_q >= (nb - 1) * BS
    if VARLEN:
        # a chunk without queries has no representative row
        n_div = tl.maximum(n_rep, 1).to(tl.float32)
    else:
        n_div = N_REP
    b_hi = tl.sum(tl.where(m_last, b_row, 0.0), 0) / n_div
    b_lo = tl.sum(tl.where(m_last, 0.0, b_row), 0) / n_div
    tl.store(vert + i_bh * NB + i_c, b_hi + b_lo)
    tl.store(part + (i_bh * NB + i_c) * 2, b_lo)
    tl.store(part + (i_bh * NB + i_c) * 2 + 1, b_hi)


@triton.jit
def block_mean_kernel(
    x, out, x_src, stride_xb, stride_xn, stride_xh, N, NB_OUT, C0, N_REP, H,
    D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, INDIRECT: tl.constexpr = False,
):
    # program (batch b, output block j), head h: the fp32 mean of x's rows of block c = C0 + j,
    # [c*BS, min((c+1)*BS, N)); past the last block (c = cdiv(N, BS)) of the last N_REP rows
    i_bj = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    if INDIRECT:
        x = _indirect(x, x_src)
    i_b = i_bj // NB_OUT
    i_c = C0 + i_bj % NB_OUT
    is_block = i_c * BS < N
    lo = tl.where(is_block, i_c * BS, N - N_REP)
    hi = tl.where(is_block, tl.minimum(i_c * BS + BS, N), N)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_xh = x + i_b * stride_xb + i_h * stride_xh
    # [BT, BD]: rows summed elementwise, one reduction across them at the end
    b_acc = tl.zeros([BT, BD], dtype=tl.float32)
    for t in range(lo, hi, BT):
        o_t = t + tl.arange(0, BT)
        b_acc += tl.load(p_xh + o_t[:, None] * stride_xn + o_d[None, :], mask=(o_t[:, None] < hi) & m_d[None, :],
                         other=0.0).to(tl.float32)
    b_sum = tl.sum(b_acc, 0)
    tl.store(out + (i_bj * H + i_h) * D + o_d, b_sum / (hi - lo).to(tl.float32), mask=m_d)


@triton.jit
def block_mean_varlen_kernel(
    x, out, x_starts, x_ends, k_starts, k_ends,
    stride_xn, stride_xh, NB, H,
    D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr,
):
    # program (sequence s, absolute block c), head h: mean of the rows of x at absolute
    # positions [c*BS, (c+1)*BS), where x's rows are the last n_x of the sequence's n_k
    i_sc = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_s = i_sc // NB
    i_c = i_sc % NB
    x0 = tl.load(x_starts + i_s).to(tl.int64)
    n_x = tl.load(x_ends + i_s).to(tl.int64) - x0
    n_k = tl.load(k_ends + i_s).to(tl.int64) - tl.load(k_starts + i_s).to(tl.int64)
    off = n_k - n_x
    lo = tl.maximum(i_c * BS - off, 0)
    hi = tl.maximum(tl.minimum((i_c + 1) * BS - off, n_x), lo)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # [BD]
    b_acc = tl.zeros([BD], dtype=tl.float32)
    for t in range(lo, hi, BT):
        o_t = t + tl.arange(0, BT)
        p_x = x + (x0 + o_t[:, None]) * stride_xn + i_h * stride_xh + o_d[None, :]
        # [BT, BD]
        b_x = tl.load(p_x, mask=(o_t[:, None] < hi) & m_d[None, :], other=0.0)
        b_acc += tl.sum(b_x.to(tl.float32), 0)
    b_mean = b_acc / tl.maximum(hi - lo, 1).to(tl.float32)
    tl.store(out + (i_sc * H + i_h) * D + o_d, b_mean, mask=m_d)


@triton.jit
def combine_splits_kernel(m, l, out, NUM_SPLITS, BR: tl.constexpr):
    """Per row, the log2-sum-exp of the first pass's per-split maxima and sums
    ([rows, splits, BR] each -> [rows, BR]); a row that saw no key gives -inf."""
    i_row = tl.program_id(0).to(tl.int64)
    o_r = tl.arange(0, BR)
    base = i_row * NUM_SPLITS * BR
    b_m = tl.full([BR], float("-inf"), dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        b_m = tl.maximum(b_m, tl.load(m + base + s * BR + o_r))
    b_safe = tl.where(b_m == float("-inf"), 0.0, b_m)
    b_l = tl.zeros([BR], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        b_l += tl.load(l + base + s * BR + o_r) * tl.exp2(tl.load(m + base + s * BR + o_r) - b_safe)
    tl.store(out + i_row * BR + o_r, b_safe + tl.log2(b_l))


@triton.jit
def assemble_rows_kernel(
    vsel, ssel, fvsel, fssel, flat, thr, thr_pos, query_aware, live, short, counts, indices,
    NB, H0, stride_flat,
    QA: tl.constexpr, LIVE: tl.constexpr, SHORT: tl.constexpr, BC: tl.constexpr,
):
    """One row (head ``H0 + program_id(0)``, query block ``program_id(1)``) of the block sets,
    built and compacted in one pass: the kept key blocks in ascending order, -1 after them.

    A vertical-slash head keeps column ``c`` when ``vsel[c]`` (its kept columns) or
    ``ssel[r - c]`` (its kept diagonals).  A query-aware head (``QA``) keeps the entries of
    its flat causal score list ``flat`` (row-major over c <= r) that rank before the
    threshold entry (value ``thr``, list position ``thr_pos``; ties go to the lower
    position, as a stable descending sort orders them) plus its floor sets and the
    diagonal.  ``LIVE`` rows outside the chunk keep nothing; ``SHORT`` heads keep every
    causal block of their live rows.  Sets are uint8 [BH, NB]; ``flat``, ``thr``,
    ``thr_pos`` are indexed by the head's position in the chunk.
    """
    i_l = tl.program_id(0).to(tl.int64)
    i_h = H0 + i_l
    r = tl.program_id(1).to(tl.int64)
    keep_row = True
    if LIVE:
        keep_row = tl.load(live + i_h * NB + r) != 0
    all_causal = False
    if SHORT:
        all_causal = tl.load(short + i_h) != 0
    is_qa = False
    t = 0.0
    p_t = 0
    if QA:
        is_qa = tl.load(query_aware + i_h) != 0
        t = tl.load(thr + i_l)
        p_t = tl.load(thr_pos + i_l)
    tri0 = r * (r + 1) // 2
    p_row = indices + (i_h * NB + r) * NB
    n_kept = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, r + 1, BC):
        c = c0 + tl.arange(0, BC)
        m_c = c <= r
        keep = (tl.load(vsel + i_h * NB + c, mask=m_c, other=0) != 0) | (
            tl.load(ssel + i_h * NB + (r - c), mask=m_c, other=0) != 0
        )
        if QA:
            if is_qa:
                x = tl.load(flat + i_l * stride_flat + tri0 + c, mask=m_c, other=0.0)
                pos = tri0 + c
                ranked = (x > t) | ((x == t) & (pos <= p_t))
                floor = (tl.load(fvsel + i_h * NB + c, mask=m_c, other=0) != 0) | (
                    tl.load(fssel + i_h * NB + (r - c), mask=m_c, other=0) != 0
                )
                keep = ranked | floor | (c == r)
        if SHORT:
            keep = keep | _every(all_causal, c)
        keep = keep & m_c & _every(keep_row, c)
        k32 = keep.to(tl.int32)
        slot = n_kept + tl.cumsum(k32, 0) - 1
        tl.store(p_row + slot, c.to(indices.dtype.element_ty), mask=keep)
        n_kept += tl.sum(k32, 0)
    tl.store(counts + i_h * NB + r, n_kept)
    for c0 in range((n_kept // BC) * BC, NB, BC):
        c = c0 + tl.arange(0, BC)
        tl.store(p_row + c, tl.full([BC], -1, indices.dtype.element_ty), mask=(c >= n_kept) & (c < NB))


# --- the query-aware ranking's threshold entry, by radix selection --------------------
#
# Per head, the entry of the flat score list at which the running sum in (value desc,
# position asc) order first reaches G = gamma * total, without sorting: scores are >= 0,
# so their fp32 bit patterns order like their values.  Eight passes of 4 bits (MSB first)
# each histogram the entries that match the bits chosen so far (count and sum per digit,
# per split of the list) and pick the digit where the running sum reaches G; a ninth pass
# counts the entries equal to the chosen value per split; the last kernel finds which of
# those ties is the threshold (the running sum of the ties reaches G) and its position.


@triton.jit
def _radix_digit(p, i_h, H, gamma, part_cnt, part_sum, st_bits, st_above, st_n_above, st_goal,
                 SPLITS, BSPLIT: tl.constexpr):
    """The digit of pass ``p`` (from its per-split histograms) and the state after it:
    (bits so far, sum and count of the entries ranked above them, goal G)."""
    o_s = tl.arange(0, BSPLIT)
    o_g = tl.arange(0, 16)
    m_s = o_s < SPLITS
    p_part = ((p * H + i_h) * SPLITS + o_s[:, None]) * 16 + o_g[None, :]
    cnt = tl.sum(tl.load(part_cnt + p_part, mask=m_s[:, None], other=0), 0)
    sm = tl.sum(tl.load(part_sum + p_part, mask=m_s[:, None], other=0.0), 0)
    if p == 0:
        bits = tl.zeros([], dtype=tl.int32)
        above = tl.zeros([], dtype=tl.float32)
        n_above = tl.zeros([], dtype=tl.int32)
        goal = gamma * tl.sum(sm, 0)
    else:
        bits = tl.load(st_bits + (p - 1) * H + i_h)
        above = tl.load(st_above + (p - 1) * H + i_h)
        n_above = tl.load(st_n_above + (p - 1) * H + i_h)
        goal = tl.load(st_goal + i_h)
    # running sums from the top digit down: suffix[d] = sum of digits >= d
    ge = o_g[None, :] >= o_g[:, None]
    suffix = tl.sum(tl.where(ge, sm[None, :], 0.0), 1)
    n_suffix = tl.sum(tl.where(ge, cnt[None, :], 0), 1)
    nonempty = cnt > 0
    reach = ((above + suffix) >= goal) & nonempty
    # the highest digit where the running sum reaches the goal; if rounding keeps every
    # digit short of it, the lowest non-empty one (the last entries of the order)
    d_reach = tl.max(tl.where(reach, o_g, -1), 0)
    d_low = tl.min(tl.where(nonempty, o_g, 16), 0)
    d = tl.where(d_reach >= 0, d_reach, d_low)
    pick = o_g == d
    above = above + tl.sum(tl.where(pick, suffix - sm, 0.0), 0)
    n_above = n_above + tl.sum(tl.where(pick, n_suffix - cnt, 0), 0)
    bits = bits | (d << (28 - 4 * p))
    return bits, above, n_above, goal


@triton.jit
def radix_hist_kernel(
    flat, part_cnt, part_sum, st_bits, st_above, st_n_above, st_goal,
    T, stride_flat, H, SPLITS, PER_SPLIT, gamma,
    P: tl.constexpr, BSPLIT: tl.constexpr, BT: tl.constexpr,
):
    """Pass ``P`` (0-7) over split ``program_id(1)`` of head ``program_id(0)``'s list: per
    digit ``(bits >> (28 - 4P)) & 15``, the count and sum of the entries whose higher bits
    are the ones chosen by the passes before (chosen here from their histograms; split 0
    stores that state for the next pass).  ``P == 8``: the count of entries equal to the
    chosen value, in digit 0."""
    i_h = tl.program_id(0)
    i_s = tl.program_id(1)
    if P > 0:
        bits, above, n_above, goal = _radix_digit(P - 1, i_h, H, gamma, part_cnt, part_sum, st_bits, st_above,
                                                  st_n_above, st_goal, SPLITS, BSPLIT)
        if i_s == 0:
            tl.store(st_bits + (P - 1) * H + i_h, bits)
            tl.store(st_above + (P - 1) * H + i_h, above)
            tl.store(st_n_above + (P - 1) * H + i_h, n_above)
            if P == 1:
                tl.store(st_goal + i_h, goal)
    else:
        bits = tl.zeros([], dtype=tl.int32)
    o_g = tl.arange(0, 16)
    cnt = tl.zeros([16], dtype=tl.int32)
    sm = tl.zeros([16], dtype=tl.float32)
    lo = i_s * PER_SPLIT
    for t0 in range(0, PER_SPLIT, BT):
        o_t = lo + t0 + tl.arange(0, BT)
        m_t = o_t < T
        # + 0.0 turns a -0.0 into +0.0 (scores are >= 0: their bit patterns order like them)
        x = tl.load(flat + i_h.to(tl.int64) * stride_flat + o_t, mask=m_t, other=0.0) + 0.0
        xb = x.to(tl.int32, bitcast=True)
        if P == 8:
            cnt += tl.where(o_g == 0, tl.sum((m_t & (xb == bits)).to(tl.int32), 0), 0)
        else:
            if P == 0:
                match = m_t
            else:
                match = m_t & ((xb >> (32 - 4 * P)) == (bits >> (32 - 4 * P)))
            dig = (xb >> (28 - 4 * P)) & 15
            hit = match[:, None] & (dig[:, None] == o_g[None, :])
            cnt += tl.sum(hit.to(tl.int32), 0)
            sm += tl.sum(tl.where(hit, x[:, None], 0.0), 0)
    p_out = ((P * H + i_h) * SPLITS + i_s) * 16 + o_g
    tl.store(part_cnt + p_out, cnt)
    tl.store(part_sum + p_out, sm)


@triton.jit
def radix_final_kernel(
    flat, part_cnt, thr, thr_pos, st_bits, st_above, st_n_above, st_goal,
    T, stride_flat, H, SPLITS, PER_SPLIT,
    BSPLIT: tl.constexpr, BT: tl.constexpr,
):
    """Head ``program_id(0)``: the threshold value (bits of pass 7) and the list position of
    the tie at which the running sum reaches the goal (ties in position order)."""
    i_h = tl.program_id(0)
    bits = tl.load(st_bits + 7 * H + i_h)
    above = tl.load(st_above + 7 * H + i_h)
    goal = tl.load(st_goal + i_h)
    v = bits.to(tl.float32, bitcast=True)
    o_s = tl.arange(0, BSPLIT)
    m_s = o_s < SPLITS
    eq = tl.load(part_cnt + ((8 * H + i_h) * SPLITS + o_s) * 16, mask=m_s, other=0)
    n_eq = tl.sum(eq, 0)
    # ties needed: the fewest m >= 1 with above + m * v >= goal, at most all of them
    need = tl.where(v > 0, tl.ceil((goal - above) / tl.where(v > 0, v, 1.0)), 1.0)
    m = tl.minimum(tl.maximum(need, 1.0), n_eq.to(tl.float32)).to(tl.int32)
    # the split holding the m-th tie, then its position there
    cum = tl.cumsum(eq, 0)
    i_s = tl.sum((cum < m).to(tl.int32), 0)
    before = tl.sum(tl.where(o_s < i_s, eq, 0), 0)
    seen = before
    pos = -1
    lo = i_s * PER_SPLIT
    for t0 in range(0, PER_SPLIT, BT):
        o_t = lo + t0 + tl.arange(0, BT)
        m_t = o_t < T
        x = tl.load(flat + i_h.to(tl.int64) * stride_flat + o_t, mask=m_t, other=0.0) + 0.0
        hit = (m_t & (x.to(tl.int32, bitcast=True) == bits)).to(tl.int32)
        rank = seen + tl.cumsum(hit, 0)
        found = (hit > 0) & (rank == m)
        pos = tl.maximum(pos, tl.max(tl.where(found, o_t, -1), 0))
        seen += tl.sum(hit, 0)
    tl.store(thr + i_h, v)
    tl.store(thr_pos + i_h, pos.to(tl.int64))
