"""Block-pooled attention of the representative (last) queries, streamed over the keys.

Computes, per (batch, query head), the softmax attention of the last ``n_rep <= bs``
queries over all N keys without materialising the [n_rep, N] matrix: a first pass
gathers each row's max and sum over key splits (flash-decoding style), a second pass
recomputes each key block's probabilities and reduces them to the block's vertical
mass and to its share of the two block diagonals the rows can sit on.
Tested against flexprefill.reference on CPU (interpreter, fp16/fp32); bf16 on GPU.
Limits: head dim <= 256 (padded to a power of two), n_rep <= 128.
"""

import triton
import triton.language as tl


@triton.jit
def rep_row_stats_kernel(
    q, k, m_out, l_out,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    N, N_REP, KEYS_PER_SPLIT, NUM_SPLITS, HQ, GROUP, scale_log2,
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_split = tl.program_id(1).to(tl.int64)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_hk = i_h // GROUP

    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    pos_q = N - N_REP + o_r
    m_r = o_r < N_REP
    m_d = o_d < D
    p_q = q + i_b * stride_qb + i_h * stride_qh + pos_q[:, None] * stride_qn + o_d[None, :]
    # [BR, BD]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)

    b_m = tl.full([BR], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BR], dtype=tl.float32)
    start = i_split * KEYS_PER_SPLIT
    for k0 in range(0, KEYS_PER_SPLIT, BK):
        o_k = start + k0 + tl.arange(0, BK)
        m_k = o_k < N
        p_k = k + i_b * stride_kb + i_hk * stride_kh + o_k[:, None] * stride_kn + o_d[None, :]
        # [BK, BD]
        b_k = tl.load(p_k, mask=m_k[:, None] & m_d[None, :], other=0.0)
        # [BR, BK]
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
        m_s = m_r[:, None] & m_k[None, :] & (o_k[None, :] <= pos_q[:, None])
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        # rows that saw no key yet keep -inf: guard the exp against -inf - -inf
        b_safe = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_l = b_l * tl.exp2(b_m - b_safe) + tl.sum(tl.exp2(b_s - b_safe[:, None]), 1)
        b_m = b_mn

    o_out = (i_bh * NUM_SPLITS + i_split) * BR + o_r
    tl.store(m_out + o_out, b_m)
    tl.store(l_out + o_out, b_l)


@triton.jit
def rep_block_mass_kernel(
    q, k, lse2, vert, part,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    N, N_REP, NB, HQ, GROUP, scale_log2,
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_hk = i_h // GROUP

    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    pos_q = N - N_REP + o_r
    m_r = o_r < N_REP
    m_d = o_d < D
    p_q = q + i_b * stride_qb + i_h * stride_qh + pos_q[:, None] * stride_qn + o_d[None, :]
    # [BR, BD]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)
    b_lse = tl.load(lse2 + i_bh * BR + o_r, mask=m_r, other=0.0)

    # [BR]
    b_row = tl.zeros([BR], dtype=tl.float32)
    for k0 in range(0, BS, BK):
        o_k = i_c * BS + k0 + tl.arange(0, BK)
        m_k = o_k < N
        p_k = k + i_b * stride_kb + i_hk * stride_kh + o_k[:, None] * stride_kn + o_d[None, :]
        # [BK, BD]
        b_k = tl.load(p_k, mask=m_k[:, None] & m_d[None, :], other=0.0)
        # [BR, BK]
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
        m_s = m_r[:, None] & m_k[None, :] & (o_k[None, :] <= pos_q[:, None])
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_row += tl.sum(b_p, 1)

    # rows in the last query block see this key block at offset NB-1-c, the others at NB-2-c
    m_last = pos_q >= (NB - 1) * BS
    b_hi = tl.sum(tl.where(m_last, b_row, 0.0), 0) / N_REP
    b_lo = tl.sum(tl.where(m_last, 0.0, b_row), 0) / N_REP
    tl.store(vert + i_bh * NB + i_c, b_hi + b_lo)
    tl.store(part + (i_bh * NB + i_c) * 2, b_lo)
    tl.store(part + (i_bh * NB + i_c) * 2 + 1, b_hi)
