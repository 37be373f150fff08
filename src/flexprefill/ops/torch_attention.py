"""Block-sparse causal attention in vectorised plain PyTorch: the fast path on the CPU, runs on any device.

Every (sequence, query head, query block) with a non-empty row of the block table is one
work item.  q, k and v are laid out once in absolute blocks; items are sorted by their
block count and cut into chunks whose gathered key/value blocks stay under a memory
budget, cache-sized on the CPU (padded to the chunk's largest count and masked).  No Python
loop over heads or blocks: the loop is over chunks only.  Per chunk, on the CPU: PyTorch's fused CPU
attention kernel over the blocks below the diagonal (padded slots masked on the key axis)
and a second, causal call over the diagonal blocks, merged by their LSE.  Elsewhere, and
for sliding windows: two batched matmuls in the input dtype (fp32 for fp16 on the CPU,
where fp16 matmuls are slow) and an fp32 softmax with the token-level mask.  A row with no
selected key gives 0 and lse ``-inf``, as the Triton kernel and FlashAttention do.  Soft-capped
scores (``softcap``) take the batched matmuls too: the fused CPU kernel cannot cap them.  Tested
against ``reference.py`` in tests/ops/test_torch_attention.py.
"""

from __future__ import annotations

import math

import torch

from ..block_table import band_table, full_causal_selection

__all__ = ["sparse_attention", "sparse_attention_varlen", "sliding_window_attention",
           "sliding_window_attention_varlen", "dense_causal_attention"]

# bytes of the gathered keys and values (and scores, on the bmm path) of one chunk.  On the
# CPU a chunk stays in the last-level cache, so the attention reads the blocks the gather just
# wrote from cache, not from memory (8 MiB: 1.5x faster than 128 MiB at 8k on a 32 MiB L3)
_CHUNK_BYTES = 128 << 20
_CHUNK_BYTES_CPU = 8 << 20
_NO_MASK_IF_FULL = True  # (a switch for benchmarks)


def _matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32
    return dtype


def sparse_attention(q, k, v, counts, indices, *, block_size: int, softmax_scale: float, return_lse: bool = False,
                     window: int | None = None, softcap: float | None = None):
    """Block-sparse causal attention of a batch.

    Args:
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D], ``Hq % Hkv == 0``.
        counts: int [B, Hq, nb]; indices: int [B, Hq, nb, W] ascending, -1 past the count
            (``W <= nb``; stride-0 batch/head dims are fine), ``nb = ceil(N / block_size)``.
        softmax_scale: scale of the scores.
        return_lse: also return ``lse`` fp32 [B, Hq, N] (natural log).
        window: optional sliding window on top of the table: query ``i`` sees keys ``j > i - window``.
        softcap: optional logit soft-cap: scores ``s`` become ``softcap * tanh(s / softcap)``.

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype, and ``lse`` when asked.
    """
    B, N, Hq, D = q.shape
    starts = torch.arange(B, device=q.device, dtype=torch.int64) * N
    res = sparse_attention_varlen(
        q.reshape(B * N, Hq, D), k.reshape(B * N, *k.shape[2:]), v.reshape(B * N, *v.shape[2:]), counts, indices,
        starts, starts + N, starts, starts + N, block_size=block_size, softmax_scale=softmax_scale,
        return_lse=return_lse, window=window, softcap=softcap,
    )
    if not return_lse:
        return res.view(B, N, Hq, -1)
    out, lse = res
    return out.view(B, N, Hq, -1), lse.view(Hq, B, N).transpose(0, 1).contiguous()


def sparse_attention_varlen(q, k, v, counts, indices, q_starts, q_ends, k_starts, k_ends, *, block_size: int,
                            softmax_scale: float, return_lse: bool = False, window: int | None = None,
                            out=None, lse=None, softcap: float | None = None):
    """Block-sparse causal attention of packed sequences (or chunks over a cached prefix).

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D].
        counts: int [S, Hq, nb]; indices: int [S, Hq, nb, W], rows by absolute query block
            (the format of :class:`flexprefill.block_table.VarlenBlockSelection`).
        q_starts, q_ends, k_starts, k_ends: int [S]: sequence ``s`` has query rows
            ``[q_starts[s], q_ends[s])`` and key rows ``[k_starts[s], k_ends[s])``; its
            ``n_q <= n_k`` queries are the last ``n_q`` of its ``n_k`` positions.
        window: optional sliding window on absolute positions.
        softcap: optional logit soft-cap, as in :func:`sparse_attention`.
        out, lse: optional preallocated outputs (rows outside every sequence are left as given).

    Returns:
        ``out`` [total_q, Hq, D] in the input dtype, and ``lse`` fp32 [Hq, total_q] when asked.

    Reads the block counts on the host (one sync on CUDA) to size the chunks.
    """
    total_q, Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    group = Hq // Hkv
    bs = block_size
    dev = q.device
    S, _, nb = counts.shape
    if out is None:
        out = torch.zeros(total_q, Hq, Dv, dtype=q.dtype, device=dev)
    if return_lse and lse is None:
        lse = torch.full((Hq, total_q), float("-inf"), dtype=torch.float32, device=dev)
    q_starts, q_ends, k_starts, k_ends = (t.to(device=dev, dtype=torch.int64) for t in (q_starts, q_ends, k_starts, k_ends))
    n_q, n_k = q_ends - q_starts, k_ends - k_starts
    prefix = n_k - n_q
    # rows without a query of their sequence take no work even if the table lists blocks there
    r = torch.arange(nb, device=dev)
    live = ((r[None, :] + 1) * bs > prefix[:, None]) & (r[None, :] * bs < n_k[:, None])
    cnt = torch.where(live[:, None, :], counts.long(), 0).reshape(-1)
    order = torch.sort(cnt, descending=True, stable=True)
    n_items = int((order.values > 0).sum())
    if n_items == 0:
        return (out, lse) if return_lse else out
    items = order.indices[:n_items]
    item_cnt = order.values[:n_items].tolist()

    mm = _matmul_dtype(q.dtype, dev)
    # the fused CPU kernel's LSE carries no gradient, and the diagonal merge needs one: inputs
    # that need grad take the bmm path, which autograd differentiates exactly
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    fused = window is None and softcap is None and dev.type == "cpu" and _flash_cpu() is not None and not grad
    # absolute block layout [S * H * nb, bs, D]: item (s, h, r) is block (s*H + h)*nb + r of q,
    # its key block c of kv head hk is block (s*Hkv + hk)*nb + c; positions without a token are 0
    q_rows, q_ok = _rows(q_starts - prefix, prefix, n_k, nb * bs)
    k_rows, k_ok = _rows(k_starts, torch.zeros_like(n_k), n_k, nb * bs)
    qb_all = _blocked(q, q_rows, q_ok, bs, mm)
    kb_all = _blocked(k, k_rows, k_ok, bs, mm)
    vb_all = _blocked(v, k_rows, k_ok, bs, mm)
    ob_all = torch.zeros(S * Hq * nb, bs, Dv, dtype=torch.float32, device=dev)
    lb_all = torch.full((S * Hq * nb, bs), float("-inf"), dtype=torch.float32, device=dev) if return_lse else None
    elem = (D + Dv) * torch.finfo(mm).bits // 8
    budget = _CHUNK_BYTES_CPU if dev.type == "cpu" else _CHUNK_BYTES
    start = 0
    while start < n_items:
        width = item_cnt[start]
        # gathered keys and values (and, on the bmm path, the fp32 scores) stay under the budget
        per_item = width * bs * (elem if fused else elem + 12 * bs)
        n = max(1, min(n_items - start, budget // per_item))
        it = items[start:start + n]
        start += n
        s_i = it // (Hq * nb)
        h_i = (it // nb) % Hq
        r_i = it % nb
        idx = indices[s_i, h_i, r_i, :width].long()  # [n, width]
        kv_base = (s_i * Hkv + h_i // group) * nb
        qb = qb_all.index_select(0, it)
        if fused:
            o, row_lse = _chunk_fused(qb, idx, cnt[it], r_i, kb_all, vb_all, kv_base, softmax_scale)
        else:
            o, row_lse = _chunk_bmm(qb, idx, cnt[it], r_i, kb_all, vb_all, kv_base, n_k[s_i], softmax_scale, window,
                                    softcap, in_place=not grad)
        ob_all.index_copy_(0, it, o)
        if return_lse:
            lb_all.index_copy_(0, it, row_lse)
    # back to the packed rows
    ob_all = ob_all.view(S, Hq, nb * bs, Dv).transpose(1, 2)[q_ok]  # [total_q, Hq, Dv]
    out.index_copy_(0, q_rows[q_ok], ob_all.to(out.dtype))
    if return_lse:
        lb_all = lb_all.view(S, Hq, nb * bs).transpose(1, 2)[q_ok]  # [total_q, Hq]
        lse.index_copy_(1, q_rows[q_ok], lb_all.T.contiguous())
    return (out, lse) if return_lse else out


def _rows(row0, lo, hi, length):
    """Packed row ``row0 + p`` of absolute position ``p < length`` per sequence, and whether ``lo <= p < hi``."""
    p = torch.arange(length, device=row0.device)
    ok = (p[None, :] >= lo[:, None]) & (p[None, :] < hi[:, None])
    return torch.where(ok, row0[:, None] + p, 0), ok


def _blocked(x, rows, ok, bs, dtype):
    """Packed ``x [total, H, D]`` -> absolute blocks [S * H * nb, bs, D] in ``dtype`` (0 where ``ok`` is False)."""
    S, L = rows.shape
    t = x.index_select(0, rows.reshape(-1)).to(dtype).view(S, L, *x.shape[1:])
    t = t.masked_fill(~ok[:, :, None, None], 0)
    return t.transpose(1, 2).reshape(S * x.shape[1] * (L // bs), bs, x.shape[-1])


def _flash_cpu():
    """PyTorch's fused CPU attention kernel that also returns the LSE (None where this build lacks it)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _gather(blocks, base, idx):
    """Blocks ``base + idx`` [n, w] of ``blocks [*, bs, D]`` -> [n, w * bs, D]."""
    n, w = idx.shape
    return blocks.index_select(0, (base[:, None] + idx.clamp_min(0)).view(-1)).view(n, w * blocks.shape[1], -1)


def _chunk_fused(qb, idx, c_i, r_i, kb_all, vb_all, kv_base, scale):
    """One chunk through the fused CPU kernel: the blocks below the diagonal in one call (padded
    slots masked on the key axis), the diagonal blocks in a second, causal call, merged by LSE."""
    flash = _flash_cpu()
    n, bs, _ = qb.shape
    last = (c_i - 1).clamp_min(0)
    # ascending indices: the diagonal block, when listed, is the last one
    has_diag = idx.gather(1, last[:, None])[:, 0] == r_i
    n_off = c_i - has_diag.long()
    w_off = int(n_off.max())
    o = torch.zeros(n, bs, vb_all.shape[-1], dtype=torch.float32, device=qb.device)
    row_lse = torch.full((n, bs), float("-inf"), device=qb.device)
    if w_off > 0:
        slot_ok = (torch.arange(w_off, device=idx.device)[None, :] < n_off[:, None]) & (idx[:, :w_off] < r_i[:, None])
        kb = _gather(kb_all, kv_base, idx[:, :w_off])
        vb = _gather(vb_all, kv_base, idx[:, :w_off])
        if _NO_MASK_IF_FULL and bool(slot_ok.all()):
            # no padded slot (the common case in cache-sized chunks of equal widths): no mask to add
            o1, l1 = flash(qb[:, None], kb[:, None], vb[:, None], scale=scale)
        else:
            bias = torch.zeros(n, 1, 1, w_off, bs, dtype=kb.dtype, device=qb.device)
            bias.masked_fill_(~slot_ok[:, None, None, :, None], float("-inf"))
            o1, l1 = flash(qb[:, None], kb[:, None], vb[:, None], attn_mask=bias.view(n, 1, 1, w_off * bs), scale=scale)
        # the kernel gives lse 0 (not -inf) to a row without a visible key
        seen = slot_ok.any(-1)
        o = torch.where(seen[:, None, None], o1[:, 0].float(), 0.0)
        row_lse = torch.where(seen[:, None], l1[:, 0], float("-inf"))
    d = has_diag.nonzero()[:, 0]
    if d.numel():
        kd = _gather(kb_all, kv_base[d], r_i[d, None])
        vd = _gather(vb_all, kv_base[d], r_i[d, None])
        o2, l2 = flash(qb[d, None], kd[:, None], vd[:, None], is_causal=True, scale=scale)
        l1, l2 = row_lse[d], l2[:, 0]
        both = torch.logaddexp(l1, l2)
        o[d] = o[d] * (l1 - both).exp()[..., None] + o2[:, 0].float() * (l2 - both).exp()[..., None]
        row_lse[d] = both
    return o, row_lse


def _chunk_bmm(qb, idx, c_i, r_i, kb_all, vb_all, kv_base, n_k, scale, window, softcap=None, in_place=True):
    """One chunk with two batched matmuls and an fp32 softmax (any device, sliding windows, soft-caps);
    ``in_place=False`` keeps every step out of place, for autograd."""
    n, bs, _ = qb.shape
    width = idx.shape[1]
    ar = torch.arange(bs, device=qb.device)
    slot_ok = (torch.arange(width, device=idx.device)[None, :] < c_i[:, None]) & (idx <= r_i[:, None])
    kb = _gather(kb_all, kv_base, idx)
    vb = _gather(vb_all, kv_base, idx)
    kpos = (idx[:, :, None] * bs + ar).view(n, width * bs)
    ok = slot_ok.repeat_interleave(bs, 1) & (kpos < n_k[:, None])
    kpos = torch.where(ok, kpos, torch.iinfo(torch.int64).max)
    qpos = r_i[:, None] * bs + ar
    s = torch.bmm(qb, kb.transpose(1, 2)).float()  # [n, bs, width*bs]
    if softcap is not None:
        # the capped scores; the softmax below then takes them unscaled
        if in_place:
            s.mul_(scale / softcap).tanh_().mul_(softcap)
        else:
            s = torch.tanh(s * (scale / softcap)) * softcap
        scale = 1.0
    hide = kpos[:, None, :] > qpos[:, :, None]
    if window is not None:
        hide |= kpos[:, None, :] <= qpos[:, :, None] - window
    s = s.masked_fill_(hide, float("-inf")) if in_place else s.masked_fill(hide, float("-inf"))
    # the row maximum only shifts the exponent (and returns in the lse): no gradient through it
    m = s.detach().amax(-1, keepdim=True)
    # a row that sees no key stays -inf: keep exp away from -inf - -inf
    m = torch.where(m == float("-inf"), 0.0, m)
    if in_place:
        s.sub_(m).mul_(scale).exp_()
    else:
        s = ((s - m) * scale).exp()
    l = s.sum(-1, keepdim=True)
    l_safe = torch.where(l > 0, l, 1.0)
    o = torch.bmm(s.to(kb.dtype), vb).float() / l_safe
    row_lse = torch.where(l > 0, m * scale + l_safe.log(), float("-inf"))[..., 0]
    return o, row_lse


def sliding_window_attention(q, k, v, *, window: int, softmax_scale: float, return_lse: bool = False,
                             block_size: int = 128, softcap: float | None = None):
    """Exact causal sliding-window attention (query ``i`` sees keys ``i - window < j <= i``) over the
    band of key blocks the window reaches: O(N * window) work.  Shapes as :func:`sparse_attention`."""
    B, N, Hq, _ = q.shape
    counts, indices = band_table(math.ceil(N / block_size), block_size, window, q.device)
    nb = counts.shape[0]
    return sparse_attention(q, k, v, counts.expand(B, Hq, nb), indices.expand(B, Hq, *indices.shape),
                            block_size=block_size, softmax_scale=softmax_scale, return_lse=return_lse, window=window,
                            softcap=softcap)


def sliding_window_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k: int, *, window: int,
                                    softmax_scale: float, return_lse: bool = False, block_size: int = 128,
                                    softcap: float | None = None):
    """:func:`sliding_window_attention` of packed sequences (chunks see the cached keys in the window).
    Returns ``out [total_q, Hq, D]`` and ``lse [Hq, total_q]`` when asked."""
    S, Hq = cu_seqlens_q.numel() - 1, q.shape[1]
    counts, indices = band_table(math.ceil(max_seqlen_k / block_size), block_size, window, q.device)
    nb = counts.shape[0]
    return sparse_attention_varlen(
        q, k, v, counts.expand(S, Hq, nb), indices.expand(S, Hq, *indices.shape),
        cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:],
        block_size=block_size, softmax_scale=softmax_scale, return_lse=return_lse, window=window, softcap=softcap,
    )


def dense_causal_attention(q, k, v, *, softmax_scale: float, return_lse: bool = False, softcap: float | None = None):
    """Dense causal attention ``q [B, N, Hq, D]``, ``k, v [B, N, Hkv, D]``: torch SDPA without an LSE
    or a soft-cap (SDPA has neither), the full causal block table through :func:`sparse_attention` with one."""
    B, N, Hq, _ = q.shape
    if not return_lse and softcap is None:
        gqa = dict(enable_gqa=True) if Hq != k.shape[2] else {}
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=softmax_scale, **gqa
        )
        return out.transpose(1, 2)
    bs = 128
    counts, indices = full_causal_selection(B, Hq, N, bs, q.device)
    return sparse_attention(q, k, v, counts, indices, block_size=bs, softmax_scale=softmax_scale, return_lse=return_lse,
                            softcap=softcap)
