"""Launcher of the Gluon block-sparse attention kernel for Hopper (``kernels.sparse_attention_hopper``).

Same arguments and outputs as the dense path of ``ops.sparse_attention`` (which calls this
where ``_hopper_kernel`` picks it); the tiled kernel autotuned per (head dim, block size, length
class), the warp-specialised one with one config per head dim.
No host sync.
"""

from __future__ import annotations

import functools

import torch
import triton

from .autotune import length_bucket
from .sparse_attention import _LOG2E, _dense_strides, _row_view

__all__ = ["launch_hopper", "hopper_configs", "launch_hopper_ws", "ws_configs"]

# tile configs per head dim (BLOCK_M = 16 x num_warps: one 64-row wgmma per warpgroup);
# shared memory: q BLOCK_M x D + STAGES x 2 x BLOCK_N x D, 16-bit.  Kept from two H200 runs
# (5-60% density at 128k), one config each (the others tried
# were never the fastest, and one config leaves no autotuning noise): at head dim 64 one
# warpgroup per CTA with three CTAs per SM (64x128, 2 stages: 0.91-0.96 of cuDNN), at 256
# two warpgroups (128x64); at 128 none beat the Triton kernel (128x128: 1-5 points behind,
# 64x64 and 64x32 with two CTAs per SM further behind).  Under block size 64 tiles clamp to 64
_SPACE = {
    64: [dict(BLOCK_M=64, BLOCK_N=128, STAGES=2, num_warps=4)],
    128: [dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, num_warps=8)],
    256: [dict(BLOCK_M=128, BLOCK_N=64, STAGES=2, num_warps=8)],
}
# the H200's shared memory per block (227 KB) less the barriers and some slack
SMEM_LIMIT = 232448 - 1024


def smem_bytes(D, BLOCK_M, BLOCK_N, STAGES, **_):
    """Shared memory of a config (16-bit q, k, v tiles)."""
    return 2 * D * (BLOCK_M + 2 * STAGES * BLOCK_N)


# one config per head dim; shared memory 2 x D x (Q_STAGES x 128 + 2 x STAGES x BLOCK_N), 16-bit.
# On the H200 at 128k, 5-60% density, over two runs: ping-pong off, as it was within -3..+3 points at head dim 128 over two runs,
# -4..+1 at 256 and 2-10 behind at 64 (the intra-warpgroup overlap already keeps
# the tensor cores busy); the tile counter on, 0.5-6.5 points ahead of the fixed stride on random
# selections and what made the operator faster than the Triton kernel on the suite's
# structured inputs (with the stride it was 14-35% slower there: heads of unequal density)
_WS_SPACE = {
    64: [dict(BLOCK_N=128, STAGES=3, Q_STAGES=2, PINGPONG=False, DYNAMIC=True)],
    128: [dict(BLOCK_N=128, STAGES=2, Q_STAGES=2, PINGPONG=False, DYNAMIC=True)],
    256: [dict(BLOCK_N=64, STAGES=2, Q_STAGES=1, PINGPONG=False, DYNAMIC=True)],
}


def ws_smem_bytes(D, BLOCK_N, STAGES, Q_STAGES, **_):
    """Shared memory of a warp-specialised config (16-bit q, k, v tiles)."""
    from .kernels.sparse_attention_hopper_ws import ROWS_PER_WG

    return 2 * D * (Q_STAGES * 2 * int(ROWS_PER_WG) + 2 * STAGES * BLOCK_N)


def hopper_configs(D: int, block_size: int, space: list[dict] | None = None) -> list[dict]:
    """The tile configs tried for head dim ``D`` (tiles clamped to the block size, duplicates and
    configs over the shared memory dropped); ``space``: other configs than the kernel's own."""
    kept = []
    for c in (_SPACE[D] if space is None else space):
        c = dict(c, BLOCK_M=min(c["BLOCK_M"], block_size), BLOCK_N=min(c["BLOCK_N"], block_size))
        c["num_warps"] = c["BLOCK_M"] // 16
        if c not in kept and smem_bytes(D, **c) <= SMEM_LIMIT:
            kept.append(c)
    return kept


def _smem_layout(block_shape, dtype):
    """The shared-memory layout of a TMA tile of a 16-bit tensor (what wgmma reads)."""
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for(block_shape, gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def _descriptor(t, D: int, rows_per_tile: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    rows, sn = _row_view(t, D)
    return TensorDescriptor(t, [rows, sn], [sn, 1], [rows_per_tile, D], _smem_layout([rows_per_tile, D], t.dtype))


def _set_blocks(nargs):
    """Autotune pre-hook: the descriptors' tile shapes follow the config."""
    for name, rows in (("q_desc", nargs["BLOCK_M"]), ("k_desc", nargs["BLOCK_N"]), ("v_desc", nargs["BLOCK_N"])):
        d = nargs[name]
        d.block_shape = [rows, d.block_shape[1]]
        d.layout = _smem_layout(d.block_shape, d.base.dtype)


@functools.lru_cache(maxsize=None)
def _tuned(D: int, block_size: int):
    from .kernels.sparse_attention_hopper import sparse_attention_fwd_hopper

    configs = [triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "STAGES")}, num_warps=c["num_warps"],
                             maxnreg=c.get("maxnreg"), pre_hook=_set_blocks) for c in hopper_configs(D, block_size)]
    return triton.autotune(configs=configs, key=["D", "BS", "N_BUCKET"])(sparse_attention_fwd_hopper)


def launch_hopper(q, k, v, counts, indices, out, lse, *, block_size: int, softmax_scale: float, config=None):
    """Write ``out`` (and ``lse`` when given) for q [B, N, Hq, D], k/v [B, N, Hkv, D] (checked by the caller).
    ``config``: dict(BLOCK_M, BLOCK_N, STAGES, num_warps[, maxnreg]) instead of autotuning."""
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    bm = (config or {}).get("BLOCK_M", 128)
    bn = (config or {}).get("BLOCK_N", 128)
    descs = (_descriptor(q, D, bm), _descriptor(k, D, bn), _descriptor(v, D, bn))
    lse_arg = lse if lse is not None else torch.empty(1, dtype=torch.float32, device=q.device)
    args = (
        *descs, out, lse_arg, counts, indices,
        *_dense_strides(q, k, v, out, counts, indices),
        N, Hkv, softmax_scale * _LOG2E, length_bucket(N),
        group, D, block_size, lse is not None,
    )

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * group, B * Hkv)

    if config is None:
        return _tuned(D, block_size)[grid](*args)
    from .kernels.sparse_attention_hopper import sparse_attention_fwd_hopper

    cfg = dict(config)
    if block_size % cfg["BLOCK_M"] or block_size % cfg["BLOCK_N"]:
        raise ValueError(f"hopper config {config} tiles must divide block_size={block_size}")
    extra = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}
    return sparse_attention_fwd_hopper[grid(cfg)](*args, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                                  STAGES=cfg["STAGES"], num_warps=cfg["num_warps"], **extra)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# registers per thread: 3 warpgroups (2 consumers, the producer warp's padded group) share the
# SM's 64K; each consumer warpgroup gets CONSUMER_REGS, the producer 24
_WS_MAXNREG = 168


def ws_configs(D: int, block_size: int) -> list[dict]:
    """The warp-specialised kernel's configs for head dim ``D`` ([] where it does not apply:
    block sizes that are not a multiple of its 128-row query tile)."""
    if block_size % 128:
        return []
    return [dict(c, BLOCK_N=min(c["BLOCK_N"], block_size)) for c in _WS_SPACE[D]
            if ws_smem_bytes(D, **c) <= SMEM_LIMIT]


def launch_hopper_ws(q, k, v, counts, indices, out, lse, *, block_size: int, softmax_scale: float, config=None,
                     varlen=None, window=None):
    """The warp-specialised persistent kernel (``kernels.sparse_attention_hopper_ws``): same
    arguments as ``launch_hopper``; ``config``: dict(BLOCK_N, STAGES, Q_STAGES, PINGPONG, DYNAMIC[,
    CONSUMER_REGS]) instead of the head dim's default.  Needs a block size multiple of 128.
    ``varlen``: (q_starts, q_ends, k_starts, k_ends, max_seqlen_q, max_seqlen_k) for packed
    q [total_q, Hq, D], k/v [total_k, Hkv, D], out likewise and lse [Hq, total_q], as
    ``ops.sparse_attention.sparse_attention_varlen`` takes them (checked by the caller).
    ``window``: a sliding window (key j visible from query i when i - j < window) on top of
    the selection, as the Triton kernel's ``WINDOWED``."""
    from .kernels.sparse_attention_hopper_ws import ROWS_PER_WG, sparse_attention_fwd_hopper_ws

    Hq, D = q.shape[-2:]
    Hkv = k.shape[-2]
    group = Hq // Hkv
    configs = ws_configs(D, block_size)
    if not configs:
        raise ValueError(f"the warp-specialised kernel needs block_size a multiple of 128, got {block_size}")
    cfg = dict(configs[0], **(config or {}))
    rows = int(ROWS_PER_WG)
    descs = (_descriptor(q, D, rows), _descriptor(k, D, cfg["BLOCK_N"]), _descriptor(v, D, cfg["BLOCK_N"]))
    lse_arg = lse if lse is not None else torch.empty(1, dtype=torch.float32, device=q.device)
    if varlen is None:
        B, N = q.shape[:2]
        strides = _dense_strides(q, k, v, out, counts, indices)
        # the packed-sequence arguments are unused (pointers stand in)
        bounds = (counts, counts, counts, counts, 0, 0, 0 if window is None else int(window))
        n_tiles = triton.cdiv(N, 2 * rows) * B * Hq
    else:
        q_starts, q_ends, k_starts, k_ends, max_seqlen_q, max_seqlen_k = varlen
        B, N = q_starts.shape[0], max_seqlen_k
        strides = (0, *q.stride()[:2], 0, *k.stride()[:2], 0, *v.stride()[:2], 0, *out.stride()[:2],
                   *counts.stride()[:2], *indices.stride()[:3])
        # a chunk's queries span at most cdiv(n_q, 128) + 1 tiles aligned to absolute positions
        n_mt = triton.cdiv(max_seqlen_q, 2 * rows) + 1
        bounds = (q_starts, q_ends, k_starts, k_ends, lse_arg.stride(0) if lse is not None else 0, n_mt,
                  0 if window is None else int(window))
        n_tiles = n_mt * B * Hq
    grid = (max(1, min(n_tiles, _num_sms(q.device))),)
    # DYNAMIC: the programs take query tiles from a counter (zeroed here, no host sync), so
    # heads and rows of unequal cost balance out; otherwise a fixed stride over the tiles
    counter = torch.zeros(1, dtype=torch.int32, device=q.device) if cfg["DYNAMIC"] else counts
    return sparse_attention_fwd_hopper_ws[grid](
        *descs, out, lse_arg, counts, indices, counter, *strides,
        N, Hkv, softmax_scale * _LOG2E, B, *bounds,
        group, D, block_size, lse is not None,
        cfg["BLOCK_N"], cfg["STAGES"], cfg["Q_STAGES"], cfg["PINGPONG"], cfg["DYNAMIC"], varlen is not None,
        window is not None, cfg.get("CONSUMER_REGS", 240), num_warps=4, maxnreg=_WS_MAXNREG)
