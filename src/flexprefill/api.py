"""Public entry points: input checks, backend choice, dispatch.

Layout at this boundary: ``q [B, N, Hq, D]``, ``k, v [B, N, Hkv, D]``, causal,
``Hq % Hkv == 0`` (query head ``h`` reads KV head ``h // (Hq // Hkv)``).
"""

from __future__ import annotations

import math

import torch

from . import reference
from .config import FlexPrefillConfig
from .selection import BlockSelection, PatternStats

__all__ = ["flex_prefill_attention", "select_blocks", "block_sparse_attention", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
_GPU_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_config(config) -> FlexPrefillConfig:
    if config is None:
        return FlexPrefillConfig()
    if not isinstance(config, FlexPrefillConfig):
        raise TypeError(f"config must be a FlexPrefillConfig or None, got {type(config).__name__}")
    return config


def _check_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale={softmax_scale!r} must be a float or None")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale={softmax_scale!r} must be a finite positive number")
    return float(softmax_scale)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dims [B, N, H, D], got shape {tuple(t.shape)}")


def _check_qkv(q, k, v=None) -> None:
    names = ("q", "k") if v is None else ("q", "k", "v")
    tensors = (q, k) if v is None else (q, k, v)
    for n, t in zip(names, tensors):
        _check_tensor(n, t)
    B, N, Hq, D = q.shape
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != q.device:
            raise ValueError(f"q is on {q.device} but {n} is on {t.device}; put them on one device")
        if t.dtype != q.dtype:
            raise TypeError(f"q is {q.dtype} but {n} is {t.dtype}; q, k and v must share a dtype")
        if t.shape[0] != B:
            raise ValueError(f"batch size differs: q has {B}, {n} has {t.shape[0]}")
        if t.shape[1] != N:
            raise ValueError(
                f"sequence length differs: q has {N}, {n} has {t.shape[1]} (use flex_prefill_attention_varlen for a cached prefix)"
            )
        if t.shape[3] != D:
            raise ValueError(f"head dim differs: q has {D}, {n} has {t.shape[3]}")
    if v is not None and v.shape[2] != k.shape[2]:
        raise ValueError(f"k has {k.shape[2]} heads but v has {v.shape[2]}")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if N == 0 or B == 0:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}; need B >= 1 and N >= 1")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} is not supported; accepted: {SUPPORTED_HEAD_DIMS}")
    allowed = _GPU_DTYPES if q.is_cuda else _CPU_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"dtype {q.dtype} is not supported on {q.device.type}; accepted: {allowed}")


def _backend(config: FlexPrefillConfig, device: torch.device) -> str:
    if config.backend == "reference":
        return "reference"
    if config.backend == "triton":
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                f"got tensors on {device}. Use backend='auto' or 'reference' on the CPU."
            )
        return "triton"
    return "triton" if device.type == "cuda" else "reference"


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_blocks(q, k, *, config: FlexPrefillConfig | None = None, softmax_scale: float | None = None) -> BlockSelection:
    """Choose each head's pattern and its key blocks (steps 1-4 of FlexPrefill).

    Args:
        q: [B, N, Hq, D] queries.  k: [B, N, Hkv, D] keys, ``Hq % Hkv == 0``.
        config: settings (default ``FlexPrefillConfig()``).
        softmax_scale: default ``1/sqrt(D)``; used in every estimate.

    Returns:
        :class:`BlockSelection` with ``counts`` int32 [B, Hq, nb] and ascending
        ``indices`` int32 [B, Hq, nb, nb], plus the per-head pattern and JS distance.
    """
    cfg = _check_config(config)
    _check_qkv(q, k)
    scale = _check_scale(softmax_scale, q.shape[-1])
    if _backend(cfg, q.device) == "reference":
        return reference.select_blocks(q, k, config=cfg, softmax_scale=scale)
    from .ops.selection import select_blocks_fast

    return select_blocks_fast(q, k, config=cfg, softmax_scale=scale)


def _check_selection(selection, q) -> None:
    if not isinstance(selection, BlockSelection):
        raise TypeError(f"selection must be a BlockSelection, got {type(selection).__name__}")
    B, N, Hq, _ = q.shape
    nb = math.ceil(N / selection.block_size)
    if selection.seq_len != N or tuple(selection.counts.shape) != (B, Hq, nb):
        raise ValueError(
            f"selection was made for counts shape {tuple(selection.counts.shape)} and N={selection.seq_len}, "
            f"but q needs ({B}, {Hq}, {nb}) and N={N}"
        )
    if selection.counts.device != q.device:
        raise ValueError(f"selection is on {selection.counts.device} but q is on {q.device}")


def block_sparse_attention(
    q, k, v, selection: BlockSelection, *, softmax_scale: float | None = None, return_lse: bool = False, backend: str = "auto"
):
    """Exact causal attention of each query block over its selected key blocks.

    Args:
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D].
        selection: from :func:`select_blocks` (or any method producing the same format).
        return_lse: also return the log-sum-exp [B, Hq, N] (fp32, natural log).
        backend: "auto", "triton" or "reference".

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype, and ``lse`` when asked.
    """
    _check_qkv(q, k, v)
    _check_selection(selection, q)
    scale = _check_scale(softmax_scale, q.shape[-1])
    if _backend(FlexPrefillConfig(backend=backend), q.device) == "reference":
        return reference.block_sparse_attention(q, k, v, selection, softmax_scale=scale, return_lse=return_lse)
    from .ops.sparse_attention import sparse_attention

    return sparse_attention(
        q, k, v, selection.counts, selection.indices, block_size=selection.block_size, softmax_scale=scale, return_lse=return_lse
    )


def flex_prefill_attention(
    q,
    k,
    v,
    *,
    config: FlexPrefillConfig | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    return_stats: bool = False,
):
    """FlexPrefill causal attention: per-head pattern search, then block-sparse attention.

    Args:
        q: [B, N, Hq, D] queries (fp16/bf16 on CUDA; fp16/bf16/fp32 on CPU).
        k, v: [B, N, Hkv, D] keys and values, ``Hq % Hkv == 0``.  D in 64, 80, 96, 128, 256.
        config: :class:`FlexPrefillConfig` (default settings when None).
        softmax_scale: default ``1/sqrt(D)``.
        return_lse: also return ``lse`` [B, Hq, N] fp32 (natural log).
        return_stats: also return :class:`PatternStats` (pattern, JS distance,
            selected blocks, density per batch and head).

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype; then ``lse`` and/or ``stats`` when asked,
        in that order.  Sequences with ``N < config.min_seq_len`` run dense attention.
    """
    cfg = _check_config(config)
    _check_qkv(q, k, v)
    scale = _check_scale(softmax_scale, q.shape[-1])
    backend = _backend(cfg, q.device)
    if backend == "reference":
        return reference.flex_prefill_attention(
            q, k, v, config=cfg, softmax_scale=scale, return_lse=return_lse, return_stats=return_stats
        )
    B, N, Hq, _ = q.shape
    stats: PatternStats
    if N < cfg.min_seq_len:
        from .ops.dense import dense_causal_attention

        res = dense_causal_attention(q, k, v, softmax_scale=scale, return_lse=return_lse)
        stats = reference.dense_stats(B, Hq, N, cfg.block_size, q.device)
    else:
        from .ops.selection import select_blocks_fast
        from .ops.sparse_attention import sparse_attention

        sel = select_blocks_fast(q, k, config=cfg, softmax_scale=scale)
        res = sparse_attention(
            q, k, v, sel.counts, sel.indices, block_size=cfg.block_size, softmax_scale=scale, return_lse=return_lse
        )
        stats = sel.stats()
    res = res if isinstance(res, tuple) else (res,)
    if return_stats:
        res = res + (stats,)
    return res[0] if len(res) == 1 else res
