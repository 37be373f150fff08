"""Block-sparse causal attention forward for Hopper in Gluon (the dense, non-windowed contract of
``sparse_attention_fwd_kernel``).  Tested on an H200 against the Triton kernel (GPU tests);
limits: sm_90, 16-bit q/k/v laid out for tensor descriptors, head dim 64/128/256, no interpreter.

It exists for a schedule Triton's own pipeliner cannot express.

What differs from the Triton kernel (why it exists):
- FlashAttention-3's intra-warpgroup overlap: tile j's ``Q K^T`` and tile j-1's ``P V`` are
  issued back to back as asynchronous wgmma, then the kernel waits for ``Q K^T`` only and
  runs tile j's softmax while ``P V`` still runs on the tensor cores.  Triton 3.6 makes a wgmma
  whose result feeds anything but another wgmma's accumulator synchronous, so its loop
  serialises softmax and matmuls.
- One loop over the off-diagonal tiles and then the diagonal block's tiles, with K and V
  loaded by TMA into ``STAGES`` buffers each, a buffer refilled as soon as the wgmma reading
  it has completed (K after its ``Q K^T``, V after its ``P V``).

The layout check is ``ops.sparse_attention._row_view``; tile configs and shared-memory limits
live in ``ops.sparse_attention_hopper``.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

_LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _tile_start(p_idx, j, n_off, i_r, BS: gl.constexpr, BLOCK_N: gl.constexpr):
    """First key of tile j: the off-diagonal tiles of the listed blocks, then the diagonal block's."""
    R: gl.constexpr = BS // BLOCK_N
    off = j < n_off
    i_kb = gl.load(p_idx + j // R, mask=off, other=0).to(gl.int32)
    return gl.where(off, i_kb * BS + (j % R) * BLOCK_N, i_r * BS + (j - n_off) * BLOCK_N)


@gluon.jit
def _origins(b_q, b_kv, i_h, i_hk, stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
             stride_vb, stride_vn, stride_vh):
    """Where head i_h's q and kv head i_hk's k and v start, as (row, column) of their tensor
    descriptors, which view q, k, v as [rows, stride of the token dim] (the launcher checked
    the layouts): row off // stride_n, column off % stride_n, off = b x stride_b + head x
    stride_h.  b_q, b_kv: the batch index (packed sequences: their first row, stride_b = stride_n)."""
    off_q = b_q * stride_qb + i_h * stride_qh
    off_k = b_kv * stride_kb + i_hk * stride_kh
    off_v = b_kv * stride_vb + i_hk * stride_vh
    return ((off_q // stride_qn).to(gl.int32), (off_q % stride_qn).to(gl.int32),
            (off_k // stride_kn).to(gl.int32), (off_k % stride_kn).to(gl.int32),
            (off_v // stride_vn).to(gl.int32), (off_v % stride_vn).to(gl.int32))


@gluon.jit
def _block_list(counts, indices, i_b, i_h, i_r, i_mt, N, stride_cb, stride_ch, stride_ib, stride_ih, stride_ir,
                BS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Query tile i_mt's key tiles, (p_idx, n_off, n_t): its block row's selection ``p_idx``
    (ascending and causal, so a selected diagonal block is the last entry), ``n_off`` tiles of
    the off-diagonal blocks, then the diagonal block's tiles up to the tile's last row, ``n_t``
    in all (``_tile_start`` gives each tile's first key)."""
    p_idx = indices + i_b * stride_ib + i_h * stride_ih + i_r * stride_ir
    n_sel = gl.load(counts + i_b * stride_cb + i_h * stride_ch + i_r)
    last = gl.load(p_idx + gl.maximum(n_sel - 1, 0), mask=n_sel > 0, other=-1)
    has_diag = last == i_r
    n_off = (n_sel - has_diag.to(gl.int32)) * (BS // BLOCK_N)
    q_hi = gl.minimum((i_mt + 1) * BLOCK_M, N)
    n_t = n_off + gl.where(has_diag, (q_hi - i_r * BS + BLOCK_N - 1) // BLOCK_N, 0)
    return p_idx, n_off, n_t


@gluon.jit
def _write_out(acc, m, l, o, lse, i_b, i_h, r0, P, n_k, row0, o_d, HKV, stride_ob, stride_on, stride_oh, stride_lh,
               GROUP: gl.constexpr, ROWS: gl.constexpr, RETURN_LSE: gl.constexpr,
               VARLEN: gl.constexpr, row_s: gl.constexpr, row_o: gl.constexpr):
    """Normalise and store the rows at positions [r0, r0 + ROWS) of head i_h that are queries,
    and their lse; a row with no selected key gives 0 (and lse -inf), as FlashAttention does.
    Queries are positions [P, n_k) at packed rows row0 + position (dense: P = 0, n_k = N,
    row0 = 0); lse is [B, Hq, N], or with ``VARLEN`` FlashAttention's [Hq, total_q] (head
    stride ``stride_lh``).  ``o_d``: the head-dim columns (the caller's, so a kernel that
    makes them once outside its loops keeps them there)."""
    l_o = gl.convert_layout(l, row_o)
    l_safe = gl.where(l_o > 0, l_o, 1.0)
    out = acc * gl.expand_dims(1.0 / l_safe, 1)
    o_m_o = r0 + gl.arange(0, ROWS, layout=row_o)
    p_o = o + i_b * stride_ob + i_h * stride_oh + gl.expand_dims((row0 + o_m_o.to(gl.int64)) * stride_on, 1) + \
        gl.expand_dims(o_d, 0)
    if VARLEN:
        live_o = (o_m_o >= P) & (o_m_o < n_k)
    else:
        live_o = o_m_o < n_k
    gl.store(p_o, out.to(o.dtype.element_ty), mask=gl.expand_dims(live_o, 1))
    if RETURN_LSE:
        o_m = r0 + gl.arange(0, ROWS, layout=row_s)
        l_s = gl.where(l > 0, l, 1.0)
        b_lse = gl.where(l > 0, (m + gl.log2(l_s)) * _LN2, float("-inf"))
        if VARLEN:
            p_lse = lse + i_h * stride_lh + row0 + o_m
            live = (o_m >= P) & (o_m < n_k)
        else:
            p_lse = lse + (i_b * (HKV * GROUP) + i_h) * n_k + o_m
            live = o_m < n_k
        gl.store(p_lse, b_lse, mask=live)


@gluon.jit
def _load_tile(desc, bar, smem, row0, col, n0, pred):
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row0 + n0, col], bar, smem, pred=pred)


@gluon.jit
def _softmax_step(s, m, l, j, n_off, n0, o_m, scale_log2, col_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """Online softmax of one tile of scores: new max, sum, probabilities and the rescale factor.
    Diagonal-block tiles (j >= n_off) mask keys past each query (and so past the sequence)."""
    if j >= n_off:
        o_n = n0 + gl.arange(0, BLOCK_N, layout=col_layout)
        s = gl.where(gl.expand_dims(o_n, 0) <= gl.expand_dims(o_m, 1), s, float("-inf"))
    m_new = gl.maximum(m, gl.max(s, 1) * scale_log2)
    p = gl.exp2(s * scale_log2 - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m - m_new)
    l = l * alpha + gl.sum(p, 1)
    return m_new, l, p, alpha


@gluon.jit(do_not_specialize=["N_BUCKET"])
def sparse_attention_fwd_hopper(
    q_desc, k_desc, v_desc, o, lse, counts, indices,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_ir,
    N, HKV, scale_log2, N_BUCKET,
    GROUP: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, RETURN_LSE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    # the same tile order as the Triton kernel: a kv group's heads adjacent, longest rows first
    i_p = gl.program_id(0)
    i_bk = gl.program_id(1)
    n_mt = gl.num_programs(0) // GROUP
    i_g = i_p % GROUP
    i_b = (i_bk // HKV).to(gl.int64)
    i_hk = (i_bk % HKV).to(gl.int64)
    i_h = i_hk * GROUP + i_g
    i_mt = n_mt - 1 - i_p // GROUP
    i_r = i_mt // (BS // BLOCK_M)

    q_row, q_col, k_row, k_col, v_row, v_col = _origins(i_b, i_b, i_h, i_hk, stride_qb, stride_qn, stride_qh,
                                                        stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh)
    q_row += i_mt * BLOCK_M

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(st), count=1)
        mbarrier.init(v_bar.index(st), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem)

    # the selection of this query block (after the Q load is issued: its latency overlaps them)
    p_idx, n_off, n_t = _block_list(counts, indices, i_b, i_h, i_r, i_mt, N, stride_cb, stride_ch, stride_ib,
                                    stride_ih, stride_ir, BS, BLOCK_M, BLOCK_N)

    for st in gl.static_range(STAGES):
        n_first = _tile_start(p_idx, st, n_off, i_r, BS, BLOCK_N)
        _load_tile(k_desc, k_bar.index(st), k_smem.index(st), k_row, k_col, n_first, st < n_t)
        _load_tile(v_desc, v_bar.index(st), v_smem.index(st), v_row, v_col, n_first, st < n_t)

    o_m = i_mt * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
    m = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    p = gl.zeros([BLOCK_M, BLOCK_N], dtype, layout=p_layout)
    mbarrier.wait(q_bar, 0)

    # tile 0: scores and softmax (acc is still 0, so no rescale)
    if n_t > 0:
        mbarrier.wait(k_bar.index(0), 0)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
        n0 = _tile_start(p_idx, 0, n_off, i_r, BS, BLOCK_N)
        m, l, p_f, alpha = _softmax_step(s, m, l, 0, n_off, n0, o_m, scale_log2, col_s, BLOCK_N)
        p = gl.convert_layout(p_f.to(dtype), p_layout)
        # K buffer 0 is free: tile STAGES's keys
        gl.thread_barrier()
        n_next = _tile_start(p_idx, STAGES, n_off, i_r, BS, BLOCK_N)
        _load_tile(k_desc, k_bar.index(0), k_smem.index(0), k_row, k_col, n_next, STAGES < n_t)

    for j in range(1, n_t):
        cur = j % STAGES
        prv = (j - 1) % STAGES
        # tile j's scores, then tile j-1's P V, both asynchronous
        mbarrier.wait(k_bar.index(cur), (j // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_bar.index(prv), ((j - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p, v_smem.index(prv), acc, is_async=True)
        # the scores only: P V keeps running during this tile's softmax
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        gl.thread_barrier()
        n_next = _tile_start(p_idx, j + STAGES, n_off, i_r, BS, BLOCK_N)
        _load_tile(k_desc, k_bar.index(cur), k_smem.index(cur), k_row, k_col, n_next, j + STAGES < n_t)
        n0 = _tile_start(p_idx, j, n_off, i_r, BS, BLOCK_N)
        m, l, p_f, alpha = _softmax_step(s, m, l, j, n_off, n0, o_m, scale_log2, col_s, BLOCK_N)
        acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
        gl.thread_barrier()
        n_next = _tile_start(p_idx, j - 1 + STAGES, n_off, i_r, BS, BLOCK_N)
        _load_tile(v_desc, v_bar.index(prv), v_smem.index(prv), v_row, v_col, n_next, j - 1 + STAGES < n_t)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p = gl.convert_layout(p_f.to(dtype), p_layout)

    if n_t > 0:
        prv = (n_t - 1) % STAGES
        mbarrier.wait(v_bar.index(prv), ((n_t - 1) // STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(prv), acc)

    _write_out(acc, m, l, o, lse, i_b, i_h, i_mt * BLOCK_M, 0, N, 0, gl.arange(0, D, layout=col_o), HKV,
               stride_ob, stride_on, stride_oh, 0, GROUP, BLOCK_M, RETURN_LSE, False, row_s, row_o)
    mbarrier.invalidate(q_bar)
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(st))
        mbarrier.invalidate(v_bar.index(st))
