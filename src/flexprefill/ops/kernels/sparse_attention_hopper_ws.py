"""Block-sparse causal attention forward for Hopper, warp-specialised and persistent (Gluon).
Tested on an H200 against the Triton kernel (GPU tests); limits: sm_90, triton's Gluon
``warp_specialize``, block size a multiple of 128, head dim 64/128/256, no interpreter.

The same contract as ``sparse_attention_fwd_hopper`` (block size a multiple of 128), plus
packed sequences (``VARLEN``: chunks over a cached prefix, tiles aligned to absolute
positions, FlashAttention's lse layout) and sliding windows (``WINDOWED``), with
FlashAttention-3's division of labour:
- one producer warp loads, by TMA, each query tile's Q (128 rows, two 64-row halves) and the
  K and V tiles of its selected blocks into rings of ``STAGES`` buffers, waiting on "empty"
  mbarriers only; it runs ahead into the next query tile while the consumers finish this one
  (the next tile's Q has its own buffer when ``Q_STAGES`` is 2), so a query tile's loads no
  longer sit between two tiles' matmuls;
- two consumer warpgroups take 64 query rows each of the same tile (same K/V buffers) with
  the intra-warpgroup overlap of ``sparse_attention_fwd_hopper`` (tile j's ``Q K^T`` and tile
  j-1's ``P V`` issued together, the softmax while ``P V`` runs), and release a buffer to the
  producer when their wgmma reading it completes; no CTA-wide barrier holds them in lockstep;
- ``PINGPONG``: the two warpgroups take turns issuing their matmuls (an mbarrier each), so one
  warpgroup's softmax overlaps the other's matmuls;
- persistent: one program per SM walks the query tiles, longest rows first; ``DYNAMIC``: each
  takes the next tile from a global counter (the producer draws it and hands it to the
  consumers in shared memory with the tile's Q), so heads of unequal density balance out;
  otherwise a fixed stride.

Configs and shared-memory limits live in ``ops.sparse_attention_hopper``.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .sparse_attention_hopper import _origins, _softmax_step, _tile_start, _write_out

ROWS_PER_WG = gl.constexpr(64)


@gluon.jit
def _tile(t, args, GROUP: gl.constexpr, BS: gl.constexpr, BLOCK_N: gl.constexpr, VARLEN: gl.constexpr):
    """Query tile t of the walk (rows top-down, longest first; a kv group's heads adjacent):
    (i_b, i_h, i_mt, i_r, p_idx, n_off, n_t, P, n_k, row0, q_row, q_col, k_row, k_col, v_row,
    v_col).  Positions are absolute: rows [P, n_k) are queries (dense: P = 0, n_k = N), the
    query at position p is packed row row0 + p; q/k/v_row and _col address the descriptors."""
    (q_desc, k_desc, v_desc, o, lse, counts, indices,
     stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
     stride_vb, stride_vn, stride_vh, stride_ob, stride_on, stride_oh,
     stride_cb, stride_ch, stride_ib, stride_ih, stride_ir,
     N, HKV, scale_log2, n_tiles, n_tiles_row, tile_counter,
     q_starts, q_ends, k_starts, k_ends, stride_lh, N_MT, window,
     q_smem, k_smem, v_smem, tile_smem, bars) = args
    BLOCK_M: gl.constexpr = 2 * ROWS_PER_WG
    R: gl.constexpr = BS // BLOCK_N
    rank = t // n_tiles_row
    rem = t % n_tiles_row
    i_g = rem % GROUP
    i_bk = rem // GROUP
    i_b = (i_bk // HKV).to(gl.int64)
    i_hk = (i_bk % HKV).to(gl.int64)
    i_h = i_hk * GROUP + i_g
    if VARLEN:
        # sequence i_b: queries are the last n_q of its n_k positions, q rows from q_starts,
        # k/v rows from k_starts; its tiles are aligned to absolute positions from P's tile,
        # N_MT of them, those past n_k empty
        q0 = gl.load(q_starts + i_b).to(gl.int64)
        k0 = gl.load(k_starts + i_b).to(gl.int64)
        n_k = gl.load(k_ends + i_b) - k0.to(gl.int32)
        P = n_k - (gl.load(q_ends + i_b) - q0.to(gl.int32))
        i_mt = P // BLOCK_M + N_MT - 1 - rank
        live = i_mt * BLOCK_M < n_k
        i_r = gl.where(live, i_mt // (BS // BLOCK_M), 0)
        row0 = q0 - P
        # a sequence's first row stands for the batch index, with the row stride as batch stride
        q_row, q_col, k_row, k_col, v_row, v_col = _origins(
            q0, k0, i_h, i_hk, stride_qn, stride_qn, stride_qh, stride_kn, stride_kn, stride_kh,
            stride_vn, stride_vn, stride_vh)
        q_row += i_mt * BLOCK_M - P
    else:
        n_k = N
        P = 0
        i_mt = (N + BLOCK_M - 1) // BLOCK_M - 1 - rank
        live = i_mt >= 0
        i_r = i_mt // (BS // BLOCK_M)
        row0 = i_b * 0
        q_row, q_col, k_row, k_col, v_row, v_col = _origins(
            i_b, i_b, i_h, i_hk, stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
            stride_vb, stride_vn, stride_vh)
        q_row += i_mt * BLOCK_M
    # the selection of this query block: ascending and causal, so a selected diagonal block is
    # the last entry; its key tiles up to this query tile's last row come after the others
    p_idx = indices + i_b * stride_ib + i_h * stride_ih + i_r * stride_ir
    n_sel = gl.load(counts + i_b * stride_cb + i_h * stride_ch + i_r, mask=live, other=0)
    last = gl.load(p_idx + gl.maximum(n_sel - 1, 0), mask=n_sel > 0, other=-1)
    has_diag = last == i_r
    n_off = (n_sel - has_diag.to(gl.int32)) * R
    q_hi = gl.minimum((i_mt + 1) * BLOCK_M, n_k)
    n_t = n_off + gl.where(has_diag, (q_hi - i_r * BS + BLOCK_N - 1) // BLOCK_N, 0)
    return i_b, i_h, i_mt, i_r, p_idx, n_off, n_t, P, n_k, row0, q_row, q_col, k_row, k_col, v_row, v_col


@gluon.jit
def _softmax_tile(s, m, l, j, n_off, i_r, p_idx, o_m, o_hi, scale_log2, window, col_layout: gl.constexpr,
                  BS: gl.constexpr, BLOCK_N: gl.constexpr, WINDOWED: gl.constexpr):
    """``_softmax_step`` of tile j; ``WINDOWED``: keys visible only when o_m - o_n < window.
    The window mask (and the guard that keeps exp2 away from -inf - -inf for a row that has
    seen no key yet) runs only on tiles whose first key some row of this warpgroup does not
    see (its last row ``o_hi`` is the strictest): in a band of window / BLOCK_N tiles, the
    first one; every other tile takes the plain step."""
    if WINDOWED:
        n0 = _tile_start(p_idx, j, n_off, i_r, BS, BLOCK_N)
        if n0 <= o_hi - window:
            o_n = gl.expand_dims(n0 + gl.arange(0, BLOCK_N, layout=col_layout), 0)
            vis = o_n > gl.expand_dims(o_m, 1) - window
            if j >= n_off:
                vis = vis & (o_n <= gl.expand_dims(o_m, 1))
            sw = gl.where(vis, s * scale_log2, float("-inf"))
            m_new = gl.maximum(m, gl.max(sw, 1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(sw - gl.expand_dims(m_safe, 1))
            alpha = gl.exp2(m - m_safe)
            l_new = l * alpha + gl.sum(p, 1)
        else:
            m_new, l_new, p, alpha = _softmax_step(s, m, l, j, n_off, n0, o_m, scale_log2, col_layout, BLOCK_N)
        return m_new, l_new, p, alpha
    else:
        return _softmax_step(s, m, l, j, n_off, i_r * BS + (j - n_off) * BLOCK_N, o_m, scale_log2, col_layout, BLOCK_N)


@gluon.jit
def _first_tile(tile_counter, DYNAMIC: gl.constexpr):
    if DYNAMIC:
        return gl.atomic_add(tile_counter, 1)
    else:
        return gl.program_id(0)


@gluon.jit
def _next_tile(t, tile_counter, DYNAMIC: gl.constexpr):
    if DYNAMIC:
        return gl.atomic_add(tile_counter, 1)
    else:
        return t + gl.num_programs(0)


@gluon.jit
def _put_tile(slot, t):
    """The producer hands a tile id to the consumers through shared memory (before the arrive
    on the slot's Q barrier that releases it)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    slot.store(gl.full([1], t, gl.int32, layout=layout))


@gluon.jit
def _get_tile(slot):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    return gl.max(slot.load(layout), 0)


@gluon.jit
def _producer(wg, args,
              GROUP: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, RETURN_LSE: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_STAGES: gl.constexpr, PINGPONG: gl.constexpr,
              DYNAMIC: gl.constexpr, VARLEN: gl.constexpr, WINDOWED: gl.constexpr):
    (q_desc, k_desc, v_desc, o, lse, counts, indices,
     stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
     stride_vb, stride_vn, stride_vh, stride_ob, stride_on, stride_oh,
     stride_cb, stride_ch, stride_ib, stride_ih, stride_ir,
     N, HKV, scale_log2, n_tiles, n_tiles_row, tile_counter,
     q_starts, q_ends, k_starts, k_ends, stride_lh, N_MT, window,
     q_smem, k_smem, v_smem, tile_smem, bars) = args
    q_full, q_empty, k_full, k_empty, v_full, v_empty, sched = bars
    it = 0
    tc = 0
    t = _first_tile(tile_counter, DYNAMIC)
    while t < n_tiles:
        (i_b, i_h, i_mt, i_r, p_idx, n_off, n_t, P, n_k, row0,
         q_row, q_col, k_row, k_col, v_row, v_col) = _tile(t, args, GROUP, BS, BLOCK_N, VARLEN)

        qb = tc % Q_STAGES
        mbarrier.wait(q_empty.index(qb), ((tc // Q_STAGES) & 1) ^ 1)
        if DYNAMIC:
            _put_tile(tile_smem.index(qb), t)
        mbarrier.expect(q_full.index(qb), 2 * q_desc.block_type.nbytes)
        for h in gl.static_range(2):
            tma.async_copy_global_to_shared(q_desc, [q_row + h * ROWS_PER_WG, q_col], q_full.index(qb),
                                            q_smem.index(qb * 2 + h))
        # the consumers' order: K_0, then (K_j, V_{j-1}) for j = 1 .. n_t - 1, then V_{n_t - 1}
        for j in range(0, n_t + 1):
            if j < n_t:
                b = (it + j) % STAGES
                mbarrier.wait(k_empty.index(b), (((it + j) // STAGES) & 1) ^ 1)
                n0 = _tile_start(p_idx, j, n_off, i_r, BS, BLOCK_N)
                mbarrier.expect(k_full.index(b), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [k_row + n0, k_col], k_full.index(b), k_smem.index(b))
            if j > 0:
                b = (it + j - 1) % STAGES
                mbarrier.wait(v_empty.index(b), (((it + j - 1) // STAGES) & 1) ^ 1)
                n0 = _tile_start(p_idx, j - 1, n_off, i_r, BS, BLOCK_N)
                mbarrier.expect(v_full.index(b), v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(v_desc, [v_row + n0, v_col], v_full.index(b), v_smem.index(b))
        it += n_t
        tc += 1
        t = _next_tile(t, tile_counter, DYNAMIC)
    if DYNAMIC:
        # no tile left: the consumers read a tile id past the last one from the next Q slot
        qb = tc % Q_STAGES
        mbarrier.wait(q_empty.index(qb), ((tc // Q_STAGES) & 1) ^ 1)
        _put_tile(tile_smem.index(qb), t)
        mbarrier.arrive(q_full.index(qb))


@gluon.jit
def _consumer(wg, args,
              GROUP: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, RETURN_LSE: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_STAGES: gl.constexpr, PINGPONG: gl.constexpr,
              DYNAMIC: gl.constexpr, VARLEN: gl.constexpr, WINDOWED: gl.constexpr):
    (q_desc, k_desc, v_desc, o, lse, counts, indices,
     stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
     stride_vb, stride_vn, stride_vh, stride_ob, stride_on, stride_oh,
     stride_cb, stride_ch, stride_ib, stride_ih, stride_ir,
     N, HKV, scale_log2, n_tiles, n_tiles_row, tile_counter,
     q_starts, q_ends, k_starts, k_ends, stride_lh, N_MT, window,
     q_smem, k_smem, v_smem, tile_smem, bars) = args
    q_full, q_empty, k_full, k_empty, v_full, v_empty, sched = bars
    dtype: gl.constexpr = q_desc.dtype
    BLOCK_M: gl.constexpr = 2 * ROWS_PER_WG
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    s_zero = gl.zeros([ROWS_PER_WG, BLOCK_N], gl.float32, layout=s_layout)
    o_d = gl.arange(0, D, layout=col_o)
    mine = sched.index(wg)
    other = sched.index(1 - wg)
    if PINGPONG:
        # warpgroup 0 issues first: warpgroup 1 opens its turn
        mbarrier.arrive(other, pred=wg == 1)
    it = 0
    tc = 0
    turn = 0
    if DYNAMIC:
        mbarrier.wait(q_full.index(0), 0)
        t = _get_tile(tile_smem.index(0))
    else:
        t = gl.program_id(0)
    while t < n_tiles:
        (i_b, i_h, i_mt, i_r, p_idx, n_off, n_t, P, n_k, row0,
         q_row, q_col, k_row, k_col, v_row, v_col) = _tile(t, args, GROUP, BS, BLOCK_N, VARLEN)
        r0 = i_mt * BLOCK_M + wg * ROWS_PER_WG
        o_m = r0 + gl.arange(0, ROWS_PER_WG, layout=row_s)
        o_hi = r0 + ROWS_PER_WG - 1
        m = gl.full([ROWS_PER_WG], float("-inf"), gl.float32, layout=row_s)
        l = gl.zeros([ROWS_PER_WG], gl.float32, layout=row_s)
        acc = gl.zeros([ROWS_PER_WG, D], gl.float32, layout=o_layout)
        p = gl.zeros([ROWS_PER_WG, BLOCK_N], dtype, layout=p_layout)
        qb = tc % Q_STAGES
        q = q_smem.index(qb * 2 + wg)
        if not DYNAMIC:  # (dynamic: waited for before reading the tile id)
            mbarrier.wait(q_full.index(qb), (tc // Q_STAGES) & 1)

        if n_t > 0:
            b = it % STAGES
            mbarrier.wait(k_full.index(b), (it // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(mine, turn & 1)
            s_tok = warpgroup_mma(q, k_smem.index(b).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if PINGPONG:
                mbarrier.arrive(other)
                turn += 1
            s = warpgroup_mma_wait(0, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(b))
            m, l, p_f, alpha = _softmax_tile(s, m, l, 0, n_off, i_r, p_idx, o_m, o_hi, scale_log2, window, col_s,
                                             BS, BLOCK_N, WINDOWED)
            p = gl.convert_layout(p_f.to(dtype), p_layout)

        for j in range(1, n_t):
            cur = (it + j) % STAGES
            prv = (it + j - 1) % STAGES
            mbarrier.wait(k_full.index(cur), ((it + j) // STAGES) & 1)
            mbarrier.wait(v_full.index(prv), ((it + j - 1) // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(mine, turn & 1)
            s_tok = warpgroup_mma(q, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            acc_tok = warpgroup_mma(p, v_smem.index(prv), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(other)
                turn += 1
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(cur))
            m, l, p_f, alpha = _softmax_tile(s, m, l, j, n_off, i_r, p_idx, o_m, o_hi, scale_log2, window, col_s,
                                             BS, BLOCK_N, WINDOWED)
            acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
            mbarrier.arrive(v_empty.index(prv))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p = gl.convert_layout(p_f.to(dtype), p_layout)

        # every Q K^T of this tile has completed: its Q buffer is free
        mbarrier.arrive(q_empty.index(qb))
        if n_t > 0:
            prv = (it + n_t - 1) % STAGES
            mbarrier.wait(v_full.index(prv), ((it + n_t - 1) // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(mine, turn & 1)
            acc_tok = warpgroup_mma(p, v_smem.index(prv), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(other)
                turn += 1
            acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
            mbarrier.arrive(v_empty.index(prv))
        it += n_t
        tc += 1

        _write_out(acc, m, l, o, lse, i_b, i_h, r0, P, n_k, row0, o_d, HKV, stride_ob, stride_on, stride_oh, stride_lh,
                   GROUP, ROWS_PER_WG, RETURN_LSE, VARLEN, row_s, row_o)
        if DYNAMIC:
            qn = tc % Q_STAGES
            mbarrier.wait(q_full.index(qn), (tc // Q_STAGES) & 1)
            t = _get_tile(tile_smem.index(qn))
        else:
            t += gl.num_programs(0)


@gluon.jit(do_not_specialize=["window"])
def sparse_attention_fwd_hopper_ws(
    q_desc, k_desc, v_desc, o, lse, counts, indices, tile_counter,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_ir,
    N, HKV, scale_log2, B,
    q_starts, q_ends, k_starts, k_ends, stride_lh, N_MT, window,
    GROUP: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, RETURN_LSE: gl.constexpr,
    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_STAGES: gl.constexpr, PINGPONG: gl.constexpr,
    DYNAMIC: gl.constexpr, VARLEN: gl.constexpr, WINDOWED: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Grid: (programs,), num_warps 4 (consumer warpgroup 0; warpgroup 1 and the producer warp
    are the warp-specialised workers).  q_desc tiles are 64 x D, k/v_desc BLOCK_N x D."""
    dtype: gl.constexpr = q_desc.dtype
    BLOCK_M: gl.constexpr = 2 * ROWS_PER_WG
    n_tiles_row = B * HKV * GROUP
    if VARLEN:
        n_tiles = N_MT * n_tiles_row
    else:
        n_tiles = ((N + BLOCK_M - 1) // BLOCK_M) * n_tiles_row

    q_smem = gl.allocate_shared_memory(dtype, [2 * Q_STAGES, ROWS_PER_WG, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    q_full = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_STAGES, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    sched = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    tile_smem = gl.allocate_shared_memory(gl.int32, [Q_STAGES, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    for st in gl.static_range(Q_STAGES):
        mbarrier.init(q_full.index(st), count=1)
        mbarrier.init(q_empty.index(st), count=2)
    for st in gl.static_range(STAGES):
        mbarrier.init(k_full.index(st), count=1)
        mbarrier.init(k_empty.index(st), count=2)
        mbarrier.init(v_full.index(st), count=1)
        mbarrier.init(v_empty.index(st), count=2)
    for st in gl.static_range(2):
        mbarrier.init(sched.index(st), count=1)
    bars = (q_full, q_empty, k_full, k_empty, v_full, v_empty, sched)
    common = (q_desc, k_desc, v_desc, o, lse, counts, indices,
              stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh, stride_ob, stride_on, stride_oh,
              stride_cb, stride_ch, stride_ib, stride_ih, stride_ir,
              N, HKV, scale_log2, n_tiles, n_tiles_row, tile_counter,
              q_starts, q_ends, k_starts, k_ends, stride_lh, N_MT, window,
              q_smem, k_smem, v_smem, tile_smem, bars)
    gl.warp_specialize([
        (_consumer, (0, common, GROUP, D, BS, RETURN_LSE, BLOCK_N, STAGES, Q_STAGES, PINGPONG, DYNAMIC, VARLEN, WINDOWED)),
        (_consumer, (1, common, GROUP, D, BS, RETURN_LSE, BLOCK_N, STAGES, Q_STAGES, PINGPONG, DYNAMIC, VARLEN, WINDOWED)),
        (_producer, (0, common, GROUP, D, BS, RETURN_LSE, BLOCK_N, STAGES, Q_STAGES, PINGPONG, DYNAMIC, VARLEN, WINDOWED)),
    ], [4, 1], [CONSUMER_REGS, 24])
