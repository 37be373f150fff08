"""Gather of paged K/V (vLLM's cache layout) into packed contiguous rows.
Tested against a direct torch index on CPU (interpreter, fp16/fp32, page sizes 16/32/64, NHD
and HND strides, several sequences), bf16 on GPU.  Limits: D <= 256.

``gather_paged_kv_kernel``: program (tile, sequence, kv head) copies keys and values of
positions ``tile*BLOCK_T ..`` of one sequence: position ``t`` lives in page
``block_table[s, t // page_size]`` at slot ``t % page_size`` and goes to packed row
``cu_seqlens_k[s] + t``.  Positions past the sequence's length do no work.
"""

import triton
import triton.language as tl


@triton.jit
def gather_paged_kv_kernel(
    k_cache, v_cache, block_table, seq_lens, cu_seqlens_k, k_out, v_out,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_vp, stride_vs, stride_vh, stride_vd,
    stride_bt, stride_ko, stride_koh, stride_vo, stride_voh,
    page_size, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_h = tl.program_id(2).to(tl.int64)
    n = tl.load(seq_lens + i_s).to(tl.int64)
    row0 = tl.load(cu_seqlens_k + i_s).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    m_t = o_t < n
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    # [BLOCK_T]
    b_page = tl.load(block_table + i_s * stride_bt + o_t // page_size, mask=m_t, other=0).to(tl.int64)
    o_s = o_t % page_size
    m = m_t[:, None] & m_d[None, :]
    # [BLOCK_T, BLOCK_D]
    p_k = k_cache + (b_page * stride_kp + o_s * stride_ks + i_h * stride_kh)[:, None] + o_d[None, :] * stride_kd
    b_k = tl.load(p_k, mask=m, other=0.0)
    tl.store(k_out + ((row0 + o_t) * stride_ko + i_h * stride_koh)[:, None] + o_d[None, :], b_k, mask=m)
    p_v = v_cache + (b_page * stride_vp + o_s * stride_vs + i_h * stride_vh)[:, None] + o_d[None, :] * stride_vd
    b_v = tl.load(p_v, mask=m, other=0.0)
    tl.store(v_out + ((row0 + o_t) * stride_vo + i_h * stride_voh)[:, None] + o_d[None, :], b_v, mask=m)
