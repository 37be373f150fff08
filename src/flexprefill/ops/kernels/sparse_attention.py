"""Block-sparse causal attention forward (FlashAttention-2 style, online softmax in fp32, exp2).
Tested against flexprefill.reference on CPU (interpreter, fp16/fp32, D 64/80/128/256, bs 32/64/128,
GQA 1/2/4; soft-capped too), the dense path on an H200 (bf16).  Limits: BLOCK_M, BLOCK_N divide the block size; D <= 256.

``VARLEN`` switches to packed sequences: per-sequence row bounds loaded in the kernel, queries =
the last n_q of n_k positions (bottom-right causal, tiles aligned to absolute positions).
``WINDOWED`` adds a sliding window (key j visible from query i when ``i - j < window``, the
transformers convention) on top of whichever blocks the selection lists.
``DIAG_FIRST`` runs the diagonal block before the listed off-diagonal ones (its loads need
no selection entry; the launcher turns it on for head dim 64, where it measured faster).
Triton's automatic warp specialization (``tl.range(..., warp_specialize=True)`` on the
off-diagonal loop) did not help on the H200 with triton 3.6: with 8 warps within 1.5% of the
same config without it, with 4 warps the pass failed.
``TMA`` loads the off-diagonal K/V tiles through host-built tensor descriptors (Hopper's bulk
copy engine) instead of pointer tensors; the launcher picks it (see ``ops.sparse_attention``).
``SOFTCAP`` soft-caps the logits (Gemma 2): the natural-unit score ``s = scale * q.k`` becomes
``cap * tanh(s / cap)``, then goes to the log2 domain; ``cap_scale = scale / cap`` and
``cap_log2 = cap * log2(e)`` come from the launcher.  Without it the code is the uncapped one.
Autotuning spaces and launch logic live in ``ops.sparse_attention``.
"""

import triton
import triton.language as tl

from .softcap import scores_log2 as _scores_log2

_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _diagonal_pass(b_q, b_m, b_l, b_acc, p_kh, p_vh, o_m, o_d, m_d, i_r, has_diag, n_diag, n_k,
                   stride_kn, stride_vn, scale_log2, window, cap_scale, cap_log2,
                   BS: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr):
    """The first ``n_diag`` key tiles of diagonal block r: token causal mask and keys past n_k.
    Keys count only where ``has_diag`` (the block is selected): the tiles' loads do not wait
    for the selection's last entry."""
    for t in range(0, n_diag):
        o_n = i_r * BS + t * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < n_k
        p_k = p_kh + o_n[:, None] * stride_kn + o_d[None, :]
        p_v = p_vh + o_n[:, None] * stride_vn + o_d[None, :]
        # [BN, BD]
        b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
        # [BM, BN]
        b_s = _scores_log2(tl.dot(b_q, tl.trans(b_k)), scale_log2, cap_scale, cap_log2, SOFTCAP)
        b_vis = (o_n[None, :] <= o_m[:, None]) & m_n[None, :] & has_diag
        if WINDOWED:
            b_vis = b_vis & (o_n[None, :] > o_m[:, None] - window)
        b_s = tl.where(b_vis, b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        # a row that has seen no key yet stays at -inf: keep exp2 away from -inf - -inf
        b_safe = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_p = tl.exp2(b_s - b_safe[:, None])
        b_alpha = tl.exp2(b_m - b_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None]
        # [BN, BD]
        b_v = tl.load(p_v, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, acc=b_acc)
        b_m = b_mn
    return b_m, b_l, b_acc


@triton.jit(do_not_specialize=["N_BUCKET", "window"])
def sparse_attention_fwd_kernel(
    q, k, v, o, lse, counts, indices, k_desc, v_desc,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_ir,
    N, HKV, scale_log2,
    q_starts, q_ends, k_starts, k_ends, stride_lh, N_BUCKET, window, cap_scale, cap_log2,
    GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    RETURN_LSE: tl.constexpr, VARLEN: tl.constexpr, TMA: tl.constexpr, WINDOWED: tl.constexpr,
    DIAG_FIRST: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # axis 0 = (query tile, head of the kv group) with the group's heads adjacent, so they
    # run together and share their k/v blocks through l2; last tiles (longest rows) first
    i_p = tl.program_id(0).to(tl.int64)
    i_bk = tl.program_id(1).to(tl.int64)
    n_mt = tl.num_programs(0).to(tl.int64) // GROUP
    i_g = i_p % GROUP
    i_b = i_bk // HKV
    i_hk = i_bk % HKV
    i_h = i_hk * GROUP + i_g
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if VARLEN:
        # sequence i_b: queries are q rows [q0, q0 + n_q) at absolute positions [P, n_k),
        # keys are k rows [k0, k0 + n_k); tiles are aligned to absolute positions, the
        # first one holds position P, tiles past n_k do nothing
        q0 = tl.load(q_starts + i_b).to(tl.int64)
        k0 = tl.load(k_starts + i_b).to(tl.int64)
        n_k = tl.load(k_ends + i_b).to(tl.int64) - k0
        P = n_k - (tl.load(q_ends + i_b).to(tl.int64) - q0)
        i_mt = P // BLOCK_M + n_mt - 1 - i_p // GROUP
        live = i_mt * BLOCK_M < n_k
        i_r = tl.where(live, i_mt // (BS // BLOCK_M), 0)
        o_m = i_mt * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = (o_m >= P) & (o_m < n_k)
        # row of the packed tensors (clamped where masked)
        o_row = q0 + tl.where(m_m, o_m - P, 0)
        p_q = q + i_h * stride_qh + o_row[:, None] * stride_qn + o_d[None, :]
        off_k = k0 * stride_kn + i_hk * stride_kh
        off_v = k0 * stride_vn + i_hk * stride_vh
    else:
        n_k = N
        i_mt = n_mt - 1 - i_p // GROUP
        # tiles never straddle a query block: BLOCK_M divides BS
        i_r = i_mt // (BS // BLOCK_M)
        o_m = i_mt * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < N
        p_q = q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qn + o_d[None, :]
        off_k = i_b * stride_kb + i_hk * stride_kh
        off_v = i_b * stride_vb + i_hk * stride_vh
    p_kh = k + off_k
    p_vh = v + off_v
    if TMA:
        # the descriptors view k and v as [rows, row stride]: this (sequence, kv head) starts
        # at row off // stride_n, column off % stride_n (the launcher checked the layout)
        r_k = (off_k // stride_kn).to(tl.int32)
        c_k = (off_k % stride_kn).to(tl.int32)
        r_v = (off_v // stride_vn).to(tl.int32)
        c_v = (off_v % stride_vn).to(tl.int32)
    # [BM, BD]
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)

    p_idx = indices + i_b * stride_ib + i_h * stride_ih + i_r * stride_ir
    if VARLEN:
        n_sel = tl.load(counts + i_b * stride_cb + i_h * stride_ch + i_r, mask=live, other=0)
    else:
        n_sel = tl.load(counts + i_b * stride_cb + i_h * stride_ch + i_r)
    # ascending and causal, so a selected diagonal block is the last entry
    last = tl.load(p_idx + tl.maximum(n_sel - 1, 0), mask=n_sel > 0, other=-1)
    has_diag = last == i_r
    n_full = n_sel - has_diag.to(tl.int32)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    # [BM, BD]
    b_acc = tl.zeros([BLOCK_M, BD], dtype=tl.float32)
    # the diagonal block's key tiles up to this query tile's last row (the others are invisible)
    q_hi = tl.minimum((i_mt + 1) * BLOCK_M, n_k)
    n_diag_tiles = (q_hi - i_r * BS + BLOCK_N - 1) // BLOCK_N
    if DIAG_FIRST:
        # the diagonal block first: its loads need no selection entry, so their latency
        # overlaps the loads of the count and the last entry instead of following the loop
        if VARLEN:
            n_diag_tiles = tl.where(live, n_diag_tiles, 0)
        b_m, b_l, b_acc = _diagonal_pass(b_q, b_m, b_l, b_acc, p_kh, p_vh, o_m, o_d, m_d, i_r, has_diag, n_diag_tiles,
                                         n_k, stride_kn, stride_vn, scale_log2, window, cap_scale, cap_log2, BS,
                                         WINDOWED, BLOCK_N, SOFTCAP)

    # off-diagonal blocks c < r: fully visible and fully inside the sequence (only the
    # last block can be partial, and only its own row sees it), so no masks at all
    for t in range(0, n_full * (BS // BLOCK_N)):
        i_kb = tl.load(p_idx + t // (BS // BLOCK_N)).to(tl.int64)
        n0 = i_kb * BS + (t % (BS // BLOCK_N)) * BLOCK_N
        o_n = n0 + tl.arange(0, BLOCK_N)
        p_k = p_kh + o_n[:, None] * stride_kn + o_d[None, :]
        p_v = p_vh + o_n[:, None] * stride_vn + o_d[None, :]
        if TMA:
            # [BN, BD]
            b_k = k_desc.load([r_k + n0.to(tl.int32), c_k])
        elif BD == D:
            b_k = tl.load(p_k)
        else:
            b_k = tl.load(p_k, mask=m_d[None, :], other=0.0)
        # [BM, BN]
        b_s = tl.dot(b_q, tl.trans(b_k))
        if WINDOWED:
            # sliding window: key j visible from query i when i - j < window; a row may see
            # none of this tile's keys, so keep exp2 away from -inf - -inf as below
            b_s = tl.where(o_n[None, :] > o_m[:, None] - window,
                           _scores_log2(b_s, scale_log2, cap_scale, cap_log2, SOFTCAP), float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_s, 1))
            b_safe = tl.where(b_mn == float("-inf"), 0.0, b_mn)
            b_p = tl.exp2(b_s - b_safe[:, None])
            b_alpha = tl.exp2(b_m - b_safe)
        elif SOFTCAP:
            # every key of an off-diagonal tile is visible: no mask, the scores capped first
            b_s = _scores_log2(b_s, scale_log2, cap_scale, cap_log2, SOFTCAP)
            b_mn = tl.maximum(b_m, tl.max(b_s, 1))
            b_p = tl.exp2(b_s - b_mn[:, None])
            b_alpha = tl.exp2(b_m - b_mn)
        else:
            b_mn = tl.maximum(b_m, tl.max(b_s, 1) * scale_log2)
            b_p = tl.exp2(b_s * scale_log2 - b_mn[:, None])
            b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None]
        if TMA:
            # [BN, BD]
            b_v = v_desc.load([r_v + n0.to(tl.int32), c_v])
        elif BD == D:
            b_v = tl.load(p_v)
        else:
            b_v = tl.load(p_v, mask=m_d[None, :], other=0.0)
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, acc=b_acc)
        b_m = b_mn

    if not DIAG_FIRST:
        b_m, b_l, b_acc = _diagonal_pass(b_q, b_m, b_l, b_acc, p_kh, p_vh, o_m, o_d, m_d, i_r, has_diag,
                                         tl.where(has_diag, n_diag_tiles, 0), n_k, stride_kn, stride_vn, scale_log2,
                                         window, cap_scale, cap_log2, BS, WINDOWED, BLOCK_N, SOFTCAP)

    # a row with no selected key gives 0 (and lse -inf), as FlashAttention does
    # (the accumulator of such a row is still 0; dividing by 1 keeps it there)
    b_l_safe = tl.where(b_l > 0, b_l, 1.0)
    b_o = b_acc * (1.0 / b_l_safe)[:, None]
    if VARLEN:
        p_o = o + i_h * stride_oh + o_row[:, None] * stride_on + o_d[None, :]
    else:
        p_o = o + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_on + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    if RETURN_LSE:
        b_lse = tl.where(b_l > 0, (b_m + tl.log2(b_l_safe)) * _LN2, float("-inf"))
        if VARLEN:
            # FlashAttention's varlen layout [Hq, total_q]
            p_lse = lse + i_h * stride_lh + o_row
        else:
            p_lse = lse + (i_b * (HKV * GROUP) + i_h) * N + o_m
        tl.store(p_lse, b_lse, mask=m_m)
