"""Public entry points: input checks, backend choice, dispatch.

Layout at this boundary: ``q [B, N, Hq, D]``, ``k, v [B, N, Hkv, D]``, causal,
``Hq % Hkv == 0`` (query head ``h`` reads KV head ``h // (Hq // Hkv)``); or packed
``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` with ``cu_seqlens`` (the ``*_varlen``
functions, FlashAttention's varlen call).

Packed sequences and chunked prefill (the ``*_varlen`` functions).  Sequence ``s`` has
queries ``q[cu_seqlens_q[s]:cu_seqlens_q[s+1]]`` (``n_q`` rows) and keys/values
``k[cu_seqlens_k[s]:cu_seqlens_k[s+1]]`` (``n_k`` rows).  When ``n_k > n_q`` the queries
are the *last* ``n_q`` positions: a chunk over a cached prefix of ``P = n_k - n_q``
keys, bottom-right causal alignment as FlashAttention defines it: query ``i`` sits at
absolute position ``P + i`` and sees keys ``j <= P + i``.  Blocks are aligned to
absolute positions (key block ``c`` = keys ``[c*bs, (c+1)*bs)``; query block ``r`` = the
chunk's queries in ``[r*bs, (r+1)*bs)``, so a chunk's first query block is partial when
``P % bs != 0``).  The pattern search of a chunk is the full-sequence search restricted
to the chunk: representative queries = its last ``min(bs, n_q)`` queries (over all
``n_k`` keys); selection rows = absolute query blocks ``floor(P/bs) .. ceil(n_k/bs)-1``,
each keeping the sink block and its diagonal block; vertical/slash offsets are measured
between absolute query and key blocks; the query-aware scores use the chunk's rows
only.  With ``gamma=1`` a chunk equals the matching rows of a full prefill.

What is checked where: dtypes, shapes, devices and that the maxima are ints are
checked on the host.  The *values* of ``cu_seqlens`` (monotone, start at 0, end at
``total``, ``n_q <= n_k``, lengths within the maxima) live on the device and are not
read there (no host sync): violating them gives undefined results on CUDA.  On the
CPU (host memory) they are checked and raise ``ValueError``.
"""

from __future__ import annotations

import math

import torch

from . import reference
from .config import FlexPrefillConfig
from .block_table import BlockSelection, PatternStats, VarlenBlockSelection

__all__ = [
    "flex_prefill_attention",
    "select_blocks",
    "block_sparse_attention",
    "flex_prefill_attention_varlen",
    "select_blocks_varlen",
    "block_sparse_attention_varlen",
    "sliding_window_attention",
    "sliding_window_attention_varlen",
    "SUPPORTED_HEAD_DIMS",
]

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


def _check_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap={softcap!r} must be a float or None (the cap of softcap * tanh(scores / softcap))")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap={softcap!r} must be a finite positive number or None (None: no soft-capping)")
    return float(softcap)


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
        _require_triton()
        return "triton"
    if config.backend == "torch":
        return "torch"
    if device.type == "cuda":
        _require_triton()
        return "triton"
    return "torch"


def _check_no_grad(*named) -> None:
    """The Triton and Gluon kernels have no backward: refuse inputs that would need one,
    rather than return outputs whose gradients are silently missing."""
    if not torch.is_grad_enabled():
        return
    needs = [name for name, t in named if t.requires_grad]
    if needs:
        raise RuntimeError(
            f"{', '.join(needs)} require grad, but the Triton backend has no backward pass; use "
            "backend='torch' or backend='reference' (plain PyTorch, differentiable) or run under torch.no_grad()"
        )


def _require_triton() -> None:
    """Triton is an optional dependency (CPU torch wheels do not bring it): imported only here,
    where a kernel path is about to run."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError(
            'the Triton backend needs triton: pip install "flexprefill[triton]" '
            "(or use backend='reference' on any device)"
        ) from e


def _interpreting() -> bool:
    from .options import interpreting

    return interpreting()


def select_blocks(q, k, *, config: FlexPrefillConfig | None = None, softmax_scale: float | None = None,
                  softcap: float | None = None) -> BlockSelection:
    """Choose each head's pattern and its key blocks (steps 1-4 of FlexPrefill).

    Args:
        q: [B, N, Hq, D] queries.  k: [B, N, Hkv, D] keys, ``Hq % Hkv == 0``.
        config: settings (default ``FlexPrefillConfig()``).
        softmax_scale: default ``1/sqrt(D)``; used in every estimate.
        softcap: None or a positive float: every score of the search becomes
            ``softcap * tanh(score / softcap)`` (logit soft-capping, Gemma 2), so the
            pattern is that of the capped attention.

    Returns:
        :class:`BlockSelection` with ``counts`` int32 [B, Hq, nb] and ascending
        ``indices`` int32 [B, Hq, nb, nb], plus the per-head pattern and JS distance.
    """
    cfg = _check_config(config)
    _check_qkv(q, k)
    scale = _check_scale(softmax_scale, q.shape[-1])
    softcap = _check_softcap(softcap)
    be = _backend(cfg, q.device)
    if be == "reference":
        return reference.select_blocks(q, k, config=cfg, softmax_scale=scale, softcap=softcap)
    if be == "torch":
        from .search import torch_search

        with torch.no_grad():  # the selection is integer: no gradient flows through the search
            return torch_search.select_blocks(q, k, config=cfg, softmax_scale=scale, softcap=softcap)
    from .search import select_blocks_fast

    return select_blocks_fast(q, k, config=cfg, softmax_scale=scale, softcap=softcap)


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
    q, k, v, selection: BlockSelection, *, softmax_scale: float | None = None, return_lse: bool = False, backend: str = "auto",
    softcap: float | None = None,
):
    """Exact causal attention of each query block over its selected key blocks.

    Args:
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D].
        selection: from :func:`select_blocks` (or any method producing the same format).
        return_lse: also return the log-sum-exp [B, Hq, N] (fp32, natural log; of the
            capped scores with ``softcap``).
        softcap: None or a positive float: scores ``s = scale * q.k`` become
            ``softcap * tanh(s / softcap)`` before the softmax.
        backend: "auto" (triton on CUDA tensors, torch on the CPU), "triton", "torch" or "reference".

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype, and ``lse`` when asked.
    """
    _check_qkv(q, k, v)
    _check_selection(selection, q)
    scale = _check_scale(softmax_scale, q.shape[-1])
    softcap = _check_softcap(softcap)
    be = _backend(FlexPrefillConfig(backend=backend), q.device)
    if be == "reference":
        return reference.block_sparse_attention(q, k, v, selection, softmax_scale=scale, return_lse=return_lse,
                                                softcap=softcap)
    if be == "torch":
        from .ops import torch_attention

        return torch_attention.sparse_attention(
            q, k, v, selection.counts, selection.indices, block_size=selection.block_size, softmax_scale=scale,
            return_lse=return_lse, softcap=softcap,
        )
    _check_no_grad(("q", q), ("k", k), ("v", v))
    from .ops.sparse_attention import sparse_attention

    return sparse_attention(
        q, k, v, selection.counts, selection.indices, block_size=selection.block_size, softmax_scale=scale,
        return_lse=return_lse, softcap=softcap,
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
    seq_lens=None,
    softcap: float | None = None,
):
    """FlexPrefill causal attention: per-head pattern search, then block-sparse attention.

    Args:
        q: [B, N, Hq, D] queries (fp16/bf16 on CUDA; fp16/bf16/fp32 on CPU).
        k, v: [B, N, Hkv, D] keys and values, ``Hq % Hkv == 0``.  D in 64, 80, 96, 128, 256.
        config: :class:`FlexPrefillConfig` (default settings when None).
        softmax_scale: default ``1/sqrt(D)``.
        softcap: None (default) or a positive float: logit soft-capping (Gemma 2,
            VaultGemma), scores ``s = softmax_scale * q.k`` become ``softcap * tanh(s / softcap)``
            before the softmax, in the attention and in every score of the pattern search.
        return_lse: also return ``lse`` [B, Hq, N] fp32 (natural log; of the capped scores).
        return_stats: also return :class:`PatternStats` (pattern, JS distance,
            selected blocks, density per batch and head).
        seq_lens: optional int32 [B] on q's device: valid lengths of a right-padded batch
            (``0 <= seq_lens[b] <= N``; values checked on the CPU only).  Each sequence is
            attended alone over its first ``seq_lens[b]`` tokens, exactly as
            :func:`flex_prefill_attention_varlen` on the packed rows; padded rows of
            ``out`` are zeros and of ``lse`` ``-inf``; a sequence shorter than
            ``min_seq_len`` runs dense; density is against each sequence's own grid.

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype; then ``lse`` and/or ``stats`` when asked,
        in that order.  Sequences with ``N < config.min_seq_len`` run dense attention, and
        so does a call whose selection is denser than ``config.dense_above`` when that is
        set (one host sync; not with ``return_lse`` or ``seq_lens``; ``stats.dense`` is then
        True and ``stats`` describe the selection that was not used).
    """
    cfg = _check_config(config)
    _check_qkv(q, k, v)
    cfg = cfg.resolved(q, k)
    scale = _check_scale(softmax_scale, q.shape[-1])
    softcap = _check_softcap(softcap)
    backend = _backend(cfg, q.device)
    if backend == "triton":
        _check_no_grad(("q", q), ("k", k), ("v", v))
    if seq_lens is not None:
        _check_seq_lens(seq_lens, q)
        return _padded(q, k, v, seq_lens, cfg, scale, backend, return_lse, return_stats, softcap)
    if backend == "reference":
        return reference.flex_prefill_attention(
            q, k, v, config=cfg, softmax_scale=scale, return_lse=return_lse, return_stats=return_stats, softcap=softcap
        )
    if backend == "torch":
        return _flex_prefill_torch(q, k, v, cfg, scale, return_lse, return_stats, softcap)
    B, N, Hq, _ = q.shape
    stats: PatternStats
    if N < cfg.min_seq_len:
        from .ops.dense_attention import dense_causal_attention

        res = dense_causal_attention(q, k, v, softmax_scale=scale, return_lse=return_lse, softcap=softcap)
        stats = reference.dense_stats(B, Hq, N, cfg.block_size, q.device)
    else:
        from .search import compact_index_dtype, select_blocks_fast
        from .ops.sparse_attention import sparse_attention

        # the operator's own selection never leaves it: int16 block ids where they fit
        sel = select_blocks_fast(q, k, config=cfg, softmax_scale=scale, softcap=softcap,
                                 index_dtype=compact_index_dtype(math.ceil(N / cfg.block_size)))
        stats = sel.stats()
        if not return_lse and reference.too_dense(sel.counts, cfg):
            from .ops.dense_attention import dense_causal_attention

            res = dense_causal_attention(q, k, v, softmax_scale=scale, softcap=softcap)
            stats.dense = True
        else:
            res = sparse_attention(
                q, k, v, sel.counts, sel.indices, block_size=cfg.block_size, softmax_scale=scale, return_lse=return_lse,
                softcap=softcap,
            )
    res = res if isinstance(res, tuple) else (res,)
    if return_stats:
        res = res + (stats,)
    return res[0] if len(res) == 1 else res


def _flex_prefill_torch(q, k, v, cfg, scale, return_lse, return_stats, softcap=None):
    """The operator on the "torch" backend: dense below ``min_seq_len`` (SDPA, or the full block
    table where SDPA cannot: an lse or a soft-cap), else search + torch attention."""
    from .ops import torch_attention

    B, N, Hq, _ = q.shape
    if N < cfg.min_seq_len:
        res = torch_attention.dense_causal_attention(q, k, v, softmax_scale=scale, return_lse=return_lse, softcap=softcap)
        stats = reference.dense_stats(B, Hq, N, cfg.block_size, q.device)
    else:
        sel = select_blocks(q, k, config=cfg, softmax_scale=scale, softcap=softcap)
        stats = sel.stats()
        if not return_lse and reference.too_dense(sel.counts, cfg):
            res = torch_attention.dense_causal_attention(q, k, v, softmax_scale=scale, softcap=softcap)
            stats.dense = True
        else:
            res = torch_attention.sparse_attention(
                q, k, v, sel.counts, sel.indices, block_size=cfg.block_size, softmax_scale=scale, return_lse=return_lse,
                softcap=softcap,
            )
    res = res if isinstance(res, tuple) else (res,)
    if return_stats:
        res = res + (stats,)
    return res[0] if len(res) == 1 else res


# --- packed sequences, chunked prefill, padded batches ---------------------------------


def _check_cu(name: str, cu, q) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor [n_seq + 1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as in FlashAttention), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape [n_seq + 1] with n_seq >= 1, got {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; put it on q's device")


def _check_max(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be a Python int (it sizes the grid without a host sync)")
    if value < 1:
        raise ValueError(f"{name}={value!r} must be >= 1")


def _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k) -> None:
    names = ("q", "k") if v is None else ("q", "k", "v")
    tensors = (q, k) if v is None else (q, k, v)
    for n, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{n} must have 3 dims [total, H, D] (packed), got shape {tuple(t.shape)}")
    total_q, Hq, D = q.shape
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != q.device:
            raise ValueError(f"q is on {q.device} but {n} is on {t.device}; put them on one device")
        if t.dtype != q.dtype:
            raise TypeError(f"q is {q.dtype} but {n} is {t.dtype}; q, k and v must share a dtype")
        if t.shape[2] != D:
            raise ValueError(f"head dim differs: q has {D}, {n} has {t.shape[2]}")
    if v is not None and tuple(v.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same [total_k, Hkv]")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if total_q == 0 or k.shape[0] == 0:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}, k {tuple(k.shape)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} is not supported; accepted: {SUPPORTED_HEAD_DIMS}")
    allowed = _GPU_DTYPES if q.is_cuda else _CPU_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"dtype {q.dtype} is not supported on {q.device.type}; accepted: {allowed}")
    _check_cu("cu_seqlens_q", cu_q, q)
    _check_cu("cu_seqlens_k", cu_k, q)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_q.numel()} entries but cu_seqlens_k has {cu_k.numel()}; one per sequence + 1")
    _check_max("max_seqlen_q", max_q)
    _check_max("max_seqlen_k", max_k)
    if max_q > max_k:
        raise ValueError(f"max_seqlen_q={max_q} > max_seqlen_k={max_k}: every sequence needs n_q <= n_k")
    if q.device.type == "cpu":
        # host memory: the values can be checked for free (on CUDA that would be a sync)
        _check_cu_values(cu_q, cu_k, total_q, k.shape[0], max_q, max_k)


def _check_cu_values(cu_q, cu_k, total_q, total_k, max_q, max_k) -> None:
    for name, cu, total, mx in (("cu_seqlens_q", cu_q, total_q, max_q), ("cu_seqlens_k", cu_k, total_k, max_k)):
        lens = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != total:
            raise ValueError(f"{name} must start at 0 and end at {total} (the packed rows), got {cu[0].item()} .. {cu[-1].item()}")
        if bool((lens < 0).any()):
            raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")
        if int(lens.max()) > mx:
            raise ValueError(f"a sequence in {name} has {int(lens.max())} tokens > max_seqlen={mx}")
    n_q, n_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    bad = (n_q > n_k).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"sequence {bad[0]} has {int(n_q[bad[0]])} queries but {int(n_k[bad[0]])} keys; need n_q <= n_k")


def _check_seq_lens(seq_lens, q) -> None:
    if not isinstance(seq_lens, torch.Tensor):
        raise TypeError(f"seq_lens must be an int32 torch.Tensor [B] or None, got {type(seq_lens).__name__}")
    if seq_lens.dtype != torch.int32:
        raise TypeError(f"seq_lens must be int32, got {seq_lens.dtype}")
    B, N = q.shape[:2]
    if tuple(seq_lens.shape) != (B,):
        raise ValueError(f"seq_lens must have shape [B={B}], got {tuple(seq_lens.shape)}")
    if seq_lens.device != q.device:
        raise ValueError(f"seq_lens is on {seq_lens.device} but q is on {q.device}")
    if q.device.type == "cpu" and bool(((seq_lens < 0) | (seq_lens > N)).any()):
        raise ValueError(f"seq_lens must lie in [0, N={N}], got {seq_lens.tolist()}")


def select_blocks_varlen(
    q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
    config: FlexPrefillConfig | None = None, softmax_scale: float | None = None, softcap: float | None = None,
) -> VarlenBlockSelection:
    """The pattern search (steps 1-4) of each sequence (or chunk) of a packed batch.

    Args:
        q: [total_q, Hq, D]; k: [total_k, Hkv, D].
        cu_seqlens_q, cu_seqlens_k: int32 [n_seq + 1] on q's device (see the module docstring
            for chunked prefill: ``n_k > n_q`` means the queries are the last positions).
        max_seqlen_q, max_seqlen_k: Python ints, at least every sequence's length.
        softcap: as in :func:`select_blocks`.

    Returns:
        :class:`VarlenBlockSelection`: ``counts`` int32 [n_seq, Hq, max_nb], ``indices``
        int32 [n_seq, Hq, max_nb, max_nb] by absolute query block,
        ``max_nb = ceil(max_seqlen_k / block_size)``.  No sequence runs dense here
        (``min_seq_len`` applies in :func:`flex_prefill_attention_varlen` only).
    """
    cfg = _check_config(config)
    _check_varlen(q, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = _check_scale(softmax_scale, q.shape[-1])
    softcap = _check_softcap(softcap)
    return _select_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, scale, 0, softcap=softcap)


def _select_varlen(q, k, cu_q, cu_k, max_q, max_k, cfg, scale, dense_below,
                   index_dtype: torch.dtype = torch.int32, softcap: float | None = None) -> VarlenBlockSelection:
    be = _backend(cfg, q.device)
    if be in ("reference", "torch"):
        from .search import torch_search

        impl = reference if be == "reference" else torch_search
        with torch.no_grad():  # the selection is integer: no gradient flows through the search
            return impl.select_blocks_varlen(
                q, k, cu_q, cu_k, max_q, max_k, config=cfg, softmax_scale=scale, dense_below=dense_below,
                softcap=softcap,
            )
    from .block_table import full_causal_selection_varlen
    from .search import select_blocks_varlen_fast

    bounds = (cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])
    S, Hq = cu_q.numel() - 1, q.shape[1]
    if max_k < dense_below:
        counts, indices = full_causal_selection_varlen(*bounds, Hq, max_k, cfg.block_size)
        qa = torch.zeros(S, Hq, dtype=torch.bool, device=q.device)
        dist = torch.full((S, Hq), float("nan"), device=q.device)
    else:
        counts, indices, qa, dist = select_blocks_varlen_fast(
            q, k, *bounds, max_k, config=cfg, softmax_scale=scale, dense_below=dense_below, index_dtype=index_dtype,
            softcap=softcap,
        )
    return VarlenBlockSelection(
        counts=counts, indices=indices, block_size=cfg.block_size, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=max_q, max_seqlen_k=max_k, query_aware=qa, js_distance=dist,
    )


def _check_varlen_selection(selection, q) -> None:
    if not isinstance(selection, VarlenBlockSelection):
        raise TypeError(f"selection must be a VarlenBlockSelection (from select_blocks_varlen), got {type(selection).__name__}")
    S = selection.cu_seqlens_q.numel() - 1
    max_nb = math.ceil(selection.max_seqlen_k / selection.block_size)
    want = (S, q.shape[1], max_nb)
    if tuple(selection.counts.shape) != want or tuple(selection.indices.shape) != want + (max_nb,):
        raise ValueError(
            f"selection counts {tuple(selection.counts.shape)} / indices {tuple(selection.indices.shape)} "
            f"do not fit {S} sequences, {q.shape[1]} heads and max_seqlen_k={selection.max_seqlen_k}"
        )
    if selection.counts.device != q.device:
        raise ValueError(f"selection is on {selection.counts.device} but q is on {q.device}")


def block_sparse_attention_varlen(
    q, k, v, selection: VarlenBlockSelection, cu_seqlens_q, cu_seqlens_k, *,
    softmax_scale: float | None = None, return_lse: bool = False, backend: str = "auto", softcap: float | None = None,
):
    """Exact causal attention of each sequence's query blocks over their selected key blocks.

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D].
        selection: from :func:`select_blocks_varlen` (its ``max_seqlen_q/k`` size the grid).
        cu_seqlens_q, cu_seqlens_k: int32 [n_seq + 1], as given to the selection.
        return_lse: also return ``lse`` fp32 [Hq, total_q] (natural log; FlashAttention's varlen layout).
        softcap: as in :func:`block_sparse_attention`.
        backend: "auto" (triton on CUDA tensors, torch on the CPU), "triton", "torch" or "reference".

    Returns:
        ``out`` [total_q, Hq, D] in the input dtype, and ``lse`` when asked.
    """
    if not isinstance(selection, VarlenBlockSelection):
        raise TypeError(f"selection must be a VarlenBlockSelection (from select_blocks_varlen), got {type(selection).__name__}")
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, selection.max_seqlen_q, selection.max_seqlen_k)
    _check_varlen_selection(selection, q)
    scale = _check_scale(softmax_scale, q.shape[-1])
    softcap = _check_softcap(softcap)
    be = _backend(FlexPrefillConfig(backend=backend), q.device)
    if be == "reference":
        return reference.block_sparse_attention_varlen(
            q, k, v, selection, cu_seqlens_q, cu_seqlens_k, softmax_scale=scale, return_lse=return_lse, softcap=softcap
        )
    if be == "torch":
        from .ops import torch_attention

        return torch_attention.sparse_attention_varlen(
            q, k, v, selection.counts, selection.indices,
            cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:],
            block_size=selection.block_size, softmax_scale=scale, return_lse=return_lse, softcap=softcap,
        )
    _check_no_grad(("q", q), ("k", k), ("v", v))
    from .ops.sparse_attention import sparse_attention_varlen

    return sparse_attention_varlen(
        q, k, v, selection.counts, selection.indices,
        cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:],
        selection.max_seqlen_q, selection.max_seqlen_k,
        block_size=selection.block_size, softmax_scale=scale, return_lse=return_lse, softcap=softcap,
    )


def flex_prefill_attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    config: FlexPrefillConfig | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    return_stats: bool = False,
    softcap: float | None = None,
):
    """FlexPrefill over a packed batch of sequences, or of prefill chunks over cached prefixes.

    Mirrors FlashAttention's ``flash_attn_varlen_func`` (causal, bottom-right aligned).

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D], ``Hq % Hkv == 0``; D in 64, 80, 96, 128, 256.
        cu_seqlens_q, cu_seqlens_k: int32 [n_seq + 1] on q's device, cumulative lengths from 0.
            Sequence ``s`` with ``n_q`` queries and ``n_k >= n_q`` keys: its queries are the
            last ``n_q`` of its ``n_k`` positions (chunked prefill over a prefix of ``n_k - n_q``
            cached keys).  Values are not read on the host on CUDA (see the module docstring).
        max_seqlen_q, max_seqlen_k: Python ints >= every ``n_q`` / ``n_k`` (grid sizes, no sync).
        config, softmax_scale, softcap: as in :func:`flex_prefill_attention`.  A sequence with
            ``n_k < config.min_seq_len`` runs dense attention (every causal block of its rows).
        return_lse: also return ``lse`` fp32 [Hq, total_q] (natural log), FlashAttention's
            varlen layout: merge chunks or key ranges with it.
        return_stats: also return :class:`PatternStats` per (sequence, head); density is
            against the causal blocks of the chunk's rows; ``dense`` is True when
            ``max_seqlen_k < min_seq_len``.

    Returns:
        ``out`` [total_q, Hq, D] in the input dtype; then ``lse`` and/or ``stats`` when asked.
    """
    cfg = _check_config(config)
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    cfg = cfg.resolved(q, k)
    scale = _check_scale(softmax_scale, q.shape[-1])
    softcap = _check_softcap(softcap)
    if _backend(cfg, q.device) == "reference":
        return reference.flex_prefill_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            config=cfg, softmax_scale=scale, return_lse=return_lse, return_stats=return_stats, softcap=softcap,
        )
    if _backend(cfg, q.device) == "torch":
        return _flex_prefill_varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, scale,
                                          return_lse, return_stats, softcap)
    _check_no_grad(("q", q), ("k", k), ("v", v))
    from .search import compact_index_dtype
    from .ops.sparse_attention import sparse_attention_varlen

    sel = _select_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, scale, cfg.min_seq_len,
                         index_dtype=compact_index_dtype(math.ceil(max_seqlen_k / cfg.block_size)), softcap=softcap)
    res = sparse_attention_varlen(
        q, k, v, sel.counts, sel.indices,
        cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:],
        max_seqlen_q, max_seqlen_k, block_size=cfg.block_size, softmax_scale=scale, return_lse=return_lse,
        softcap=softcap,
    )
    res = res if isinstance(res, tuple) else (res,)
    if return_stats:
        stats = sel.stats()
        stats.dense = max_seqlen_k < cfg.min_seq_len
        res = res + (stats,)
    return res[0] if len(res) == 1 else res


def _flex_prefill_varlen_torch(q, k, v, cu_q, cu_k, max_q, max_k, cfg, scale, return_lse, return_stats, softcap=None):
    """:func:`flex_prefill_attention_varlen` on the "torch" backend."""
    from .ops import torch_attention

    sel = _select_varlen(q, k, cu_q, cu_k, max_q, max_k, cfg, scale, cfg.min_seq_len, softcap=softcap)
    res = torch_attention.sparse_attention_varlen(
        q, k, v, sel.counts, sel.indices, cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:],
        block_size=cfg.block_size, softmax_scale=scale, return_lse=return_lse, softcap=softcap,
    )
    res = res if isinstance(res, tuple) else (res,)
    if return_stats:
        stats = sel.stats()
        stats.dense = max_k < cfg.min_seq_len
        res = res + (stats,)
    return res[0] if len(res) == 1 else res


def _padded(q, k, v, seq_lens, cfg, scale, backend, return_lse, return_stats, softcap=None):
    """A right-padded batch as packed sequences: rows ``b*N .. b*N + seq_lens[b]``."""
    B, N, Hq, D = q.shape
    if backend in ("reference", "torch"):
        lens = seq_lens.tolist()
        cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(B)], dtype=torch.int32, device=q.device)
        pack = lambda t: torch.cat([t[b, : lens[b]] for b in range(B)])  # noqa: E731
        qp, kp, vp = pack(q), pack(k), pack(v)
        if backend == "reference":
            o, l, stats = reference.flex_prefill_attention_varlen(
                qp, kp, vp, cu, cu, N, N, config=cfg, softmax_scale=scale, return_lse=True, return_stats=True,
                softcap=softcap,
            )
        else:
            o, l, stats = _flex_prefill_varlen_torch(qp, kp, vp, cu, cu, N, N, cfg, scale, True, True, softcap)
        out = torch.zeros_like(q)
        lse = torch.full((B, Hq, N), float("-inf"), device=q.device)
        for b in range(B):
            out[b, : lens[b]] = o[cu[b] : cu[b + 1]]
            lse[b, :, : lens[b]] = l[:, cu[b] : cu[b + 1]]
    else:
        from .ops.sparse_attention import sparse_attention_varlen

        starts = torch.arange(B, dtype=torch.int32, device=q.device) * N
        ends = starts + seq_lens
        qf, kf, vf = (t.reshape(B * N, *t.shape[2:]) for t in (q, k, v))
        from .block_table import full_causal_selection_varlen
        from .search import compact_index_dtype, select_blocks_varlen_fast

        if N < cfg.min_seq_len:
            counts, indices = full_causal_selection_varlen(starts, ends, starts, ends, Hq, N, cfg.block_size)
            qa = torch.zeros(B, Hq, dtype=torch.bool, device=q.device)
            dist = torch.full((B, Hq), float("nan"), device=q.device)
        else:
            counts, indices, qa, dist = select_blocks_varlen_fast(
                qf, kf, starts, ends, starts, ends, N, config=cfg, softmax_scale=scale, dense_below=cfg.min_seq_len,
                index_dtype=compact_index_dtype(math.ceil(N / cfg.block_size)), softcap=softcap,
            )
        out = torch.zeros(B * N, Hq, D, dtype=q.dtype, device=q.device)
        lse = torch.full((Hq, B * N), float("-inf"), device=q.device) if return_lse else None
        sparse_attention_varlen(
            qf, kf, vf, counts, indices, starts, ends, starts, ends, N, N,
            block_size=cfg.block_size, softmax_scale=scale, return_lse=return_lse, out=out, lse=lse, softcap=softcap,
        )
        out = out.view(B, N, Hq, D)
        if return_lse:
            lse = lse.view(Hq, B, N).transpose(0, 1).contiguous()
        sel = BlockSelection(
            counts=counts, indices=indices, block_size=cfg.block_size, seq_len=N,
            query_aware=qa, js_distance=dist, seq_lens=seq_lens,
        )
        stats = sel.stats()
        stats.dense = N < cfg.min_seq_len
    res = (out, lse) if return_lse else (out,)
    if return_stats:
        res = res + (stats,)
    return res[0] if len(res) == 1 else res


# --- exact sliding-window attention (the local layers of Gemma 3, Mistral) -------------


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window={window!r} must be a Python int (tokens)")
    if window < 1:
        raise ValueError(f"window={window!r} must be >= 1 (tokens; a query sees keys i - window < j <= i)")
    return window


def sliding_window_attention(
    q, k, v, *, window: int, softmax_scale: float | None = None, return_lse: bool = False, backend: str = "auto",
    softcap: float | None = None,
):
    """Exact causal sliding-window attention: query ``i`` sees keys ``i - window < j <= i``
    (transformers' ``sliding_window`` convention).  No pattern search, no approximation.

    On CUDA the block kernel runs over the band of key blocks the window reaches and applies
    the window per token: O(N * window) work, no N x N mask.

    Args:
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D], ``Hq % Hkv == 0``; D in 64, 80, 96, 128, 256.
        window: tokens, >= 1 (``window >= N`` is plain causal attention).
        softmax_scale: default ``1/sqrt(D)``.
        return_lse: also return ``lse`` [B, Hq, N] fp32 (natural log).
        backend: "auto" (Triton on CUDA, torch on the CPU), "triton", "torch" or "reference".
        softcap: None or a positive float: scores ``s`` become ``softcap * tanh(s / softcap)``
            before the softmax (Gemma 2's sliding layers).

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype, and ``lse`` when asked.
    """
    _check_qkv(q, k, v)
    window = _check_window(window)
    scale = _check_scale(softmax_scale, q.shape[-1])
    softcap = _check_softcap(softcap)
    be = _backend(FlexPrefillConfig(backend=backend), q.device)
    if be == "reference":
        return reference.dense_attention(q, k, v, softmax_scale=scale, return_lse=return_lse, window=window, softcap=softcap)
    if be == "torch":
        from .ops import torch_attention

        return torch_attention.sliding_window_attention(q, k, v, window=window, softmax_scale=scale, return_lse=return_lse,
                                                        softcap=softcap)
    _check_no_grad(("q", q), ("k", k), ("v", v))
    from .ops.window_attention import sliding_window_attention as _swa

    return _swa(q, k, v, window=window, softmax_scale=scale, return_lse=return_lse, softcap=softcap)


def sliding_window_attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
    window: int, softmax_scale: float | None = None, return_lse: bool = False, backend: str = "auto",
    softcap: float | None = None,
):
    """:func:`sliding_window_attention` over packed sequences or prefill chunks over cached
    prefixes (arguments as :func:`flex_prefill_attention_varlen`; the window is on absolute
    positions, so a chunk sees the cached keys within the window; ``softcap`` as in
    :func:`sliding_window_attention`).

    Returns:
        ``out`` [total_q, Hq, D] in the input dtype, and ``lse`` [Hq, total_q] when asked.
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    window = _check_window(window)
    scale = _check_scale(softmax_scale, q.shape[-1])
    softcap = _check_softcap(softcap)
    be = _backend(FlexPrefillConfig(backend=backend), q.device)
    if be == "reference":
        return reference.dense_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=scale, return_lse=return_lse, window=window, softcap=softcap
        )
    if be == "torch":
        from .ops import torch_attention

        return torch_attention.sliding_window_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, window=window, softmax_scale=scale, return_lse=return_lse,
            softcap=softcap,
        )
    _check_no_grad(("q", q), ("k", k), ("v", v))
    from .ops.window_attention import sliding_window_attention_varlen as _swa_varlen

    return _swa_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        window=window, softmax_scale=scale, return_lse=return_lse, softcap=softcap,
    )
