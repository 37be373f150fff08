"""Read K/V out of a paged cache (vLLM's layout) into packed contiguous rows.

The cache holds ``[num_pages, page_size, Hkv, D]`` (any strides: vLLM's NHD and HND layouts
are views of one buffer); sequence ``s`` of ``seq_lens[s]`` tokens has position ``t`` in page
``block_table[s, t // page_size]`` at slot ``t % page_size``.  The result is the packed
``[total_k, Hkv, D]`` of :func:`flexprefill.flex_prefill_attention_varlen`, sequence ``s`` in
rows ``cu_seqlens_k[s] .. cu_seqlens_k[s+1]``.  Neither path reads the lengths on the host.
"""

from __future__ import annotations

import torch

__all__ = ["gather_paged_kv", "gather_paged_kv_torch"]

_BLOCK_T = 64


def _check(k_cache, v_cache, block_table, seq_lens, cu_seqlens_k, total_k, max_seqlen_k) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [num_pages, page_size, Hkv, D], got {got}")
    if tuple(k_cache.shape) != tuple(v_cache.shape) or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache {tuple(v_cache.shape)} "
                         f"{v_cache.dtype} must match")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_table must be an int32/int64 tensor [S, max_pages]")
    S = block_table.shape[0]
    for name, t, n in (("seq_lens", seq_lens, S), ("cu_seqlens_k", cu_seqlens_k, S + 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int32/int64 tensor of {n} entries (block_table has {S} rows)")
    for name, t in (("v_cache", v_cache), ("block_table", block_table), ("seq_lens", seq_lens), ("cu_seqlens_k", cu_seqlens_k)):
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device} but k_cache is on {k_cache.device}")
    for name, v in (("total_k", total_k), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r} must be a Python int >= 0 (it sizes the output without a host sync)")
    if max_seqlen_k > block_table.shape[1] * k_cache.shape[1]:
        raise ValueError(f"max_seqlen_k={max_seqlen_k} exceeds the block table's reach "
                         f"({block_table.shape[1]} pages of {k_cache.shape[1]})")


def gather_paged_kv(k_cache, v_cache, block_table, seq_lens, cu_seqlens_k, *, total_k: int, max_seqlen_k: int,
                    backend: str = "auto"):
    """Packed ``(k, v)`` of the listed sequences, each ``[total_k, Hkv, D]`` in the cache's dtype.

    Args:
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``, any strides.
        block_table: int32 [S, max_pages], the pages of each sequence.
        seq_lens: int [S], tokens of each sequence; cu_seqlens_k: int [S + 1], their packed offsets.
        total_k: ``cu_seqlens_k[-1]``; max_seqlen_k: at least every ``seq_lens[s]`` (Python ints).
        backend: "auto" (the Triton kernel on CUDA, torch indexing elsewhere), "triton"
            (also on the CPU under ``TRITON_INTERPRET=1``) or "torch".
    """
    _check(k_cache, v_cache, block_table, seq_lens, cu_seqlens_k, total_k, max_seqlen_k)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r} is not supported; accepted: ('auto', 'triton', 'torch')")
    if backend == "torch" or (backend == "auto" and not k_cache.is_cuda):
        return gather_paged_kv_torch(k_cache, v_cache, block_table, seq_lens, cu_seqlens_k, total_k=total_k)
    from .kernels.paged_kv import gather_paged_kv_kernel

    _, page_size, Hkv, D = k_cache.shape
    S = block_table.shape[0]
    k = torch.empty(total_k, Hkv, D, dtype=k_cache.dtype, device=k_cache.device)
    v = torch.empty_like(k)
    if total_k == 0 or S == 0 or max_seqlen_k == 0:
        return k, v
    block_d = max(16, 1 << (D - 1).bit_length())
    grid = (-(-max_seqlen_k // _BLOCK_T), S, Hkv)
    gather_paged_kv_kernel[grid](
        k_cache, v_cache, block_table, seq_lens, cu_seqlens_k, k, v,
        *k_cache.stride(), *v_cache.stride(), block_table.stride(0),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        page_size, D, BLOCK_T=_BLOCK_T, BLOCK_D=block_d, num_warps=4,
    )
    return k, v


def gather_paged_kv_torch(k_cache, v_cache, block_table, seq_lens, cu_seqlens_k, *, total_k: int):
    """The same gather by torch indexing (any device): a per-token page and slot index,
    16 bytes per gathered token, then one advanced index of each cache."""
    dev = k_cache.device
    page_size = k_cache.shape[1]
    S = block_table.shape[0]
    seq = torch.repeat_interleave(torch.arange(S, device=dev), seq_lens.long(), output_size=total_k)
    pos = torch.arange(total_k, device=dev) - cu_seqlens_k.long()[seq]
    pages = block_table.long()[seq, pos // page_size]
    slots = pos % page_size
    return k_cache[pages, slots], v_cache[pages, slots]
