"""Launcher of the block-sparse causal attention kernel (step 5 of FlexPrefill).

No host sync: the per-row block counts are read by the kernel, never on the host, so
a fixed shape can be captured in a CUDA graph (after a first call has autotuned).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math

import torch
import triton

from ..config import BLOCK_SIZES
from ..options import interpreting, options
from .autotune import autotune_configs, length_bucket
from .kernels.sparse_attention import sparse_attention_fwd_kernel

__all__ = ["sparse_attention", "sparse_attention_varlen"]

_LOG2E = 1.4426950408889634

# a few configs per head-dim bucket (padded head dim <= 64, <= 128, <= 256); tiles are
# clamped to the selection block size by the prune below.  A sweep of 64 configs on an
# H200 (benchmarks/sweep_kernel_configs.py) found
# no config outside this space within 1% of the best of each head dim
_SPACE = {
    64: [
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4),
    ],
    128: [
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ],
    256: [
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
    ],
}
# the interpreter's one config divides every block size and runs both sub-tiling paths
_INTERPRET = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)


def _set_tma_blocks(nargs):
    """Autotune pre-hook: the descriptors' tile shape follows the config's BLOCK_N."""
    if nargs.get("TMA"):
        for name in ("k_desc", "v_desc"):
            nargs[name].block_shape = [nargs["BLOCK_N"], nargs["BD"]]


def _prune(configs, named_args, **kwargs):
    """Clamp tiles to the selection block size and drop the duplicates that makes."""
    bs = {**named_args, **kwargs}["BS"]
    kept, seen = [], set()
    for c in configs:
        bm, bn = min(c.kwargs["BLOCK_M"], bs), min(c.kwargs["BLOCK_N"], bs)
        # small tiles do not feed 8 warps
        warps = min(c.num_warps, 4) if bm * bn < 64 * 64 else c.num_warps
        sig = (bm, bn, warps, c.num_stages)
        if sig not in seen:
            seen.add(sig)
            kept.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=warps, num_stages=c.num_stages,
                                      pre_hook=_set_tma_blocks))
    return kept


# one autotuner per head-dim bucket, keyed on (padded head dim, block size, varlen, length
# bucket); triton adds the dtypes.  ``N_BUCKET`` (unused by the body) is the key's length
# class: with configs tuned on the first (8k) call, the H200 suite measured d256 at 0.60-0.64
# of cuDNN's TFLOP/s at 128k (densities 5-60%); keyed on the length class, 0.80-0.94.  Each
# power of two from 8k to 128k tunes once
sparse_attention_fwd_tuned = {
    bd: triton.autotune(
        configs=autotune_configs(space, interpret=_INTERPRET, pre_hook=_set_tma_blocks),
        key=["BD", "BS", "VARLEN", "WINDOWED", "DIAG_FIRST", "SOFTCAP", "N_BUCKET"],
        prune_configs_by={"early_config_prune": _prune},
    )(sparse_attention_fwd_kernel)
    for bd, space in _SPACE.items()
}


def _row_view(t, D: int):
    """``(rows, stride_n)`` of a view of ``t`` ([B, N, H, D] or [N, H, D]) as a 2-D matrix whose
    rows are tokens, in which every (sequence, head) slice is a block of ``D`` columns starting
    at a row and a column; None when TMA cannot address it that way (a tile would run into
    the next head, rows not 16-byte aligned, a batch stride not a whole number of rows)."""
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    sn, sh, sb = t.stride(-3), t.stride(-2), (t.stride(0) if t.dim() == 4 else 0)
    heads = t.shape[-2]
    esz = t.element_size()
    if t.stride(-1) != 1 or sn <= 0 or (sn * esz) % 16 or t.data_ptr() % 16 or sb % sn:
        return None
    # heads either whole rows apart (head-major storage) or side by side within a row
    if sh % sn and not (sh >= D and (heads - 1) * sh + D <= sn):
        return None
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return -(-extent // sn), sn


def _tma_descriptors(k, v, D: int, BD: int):
    """Tensor descriptors for the off-diagonal K/V tiles, or None where the layout does not allow them.

    Each descriptor views its tensor as ``[rows, stride_n]`` (``_row_view``).  Needs ``D`` a
    power of 2 >= 64 (so a tile holds no other head's columns), 16-byte aligned rows, Hopper
    or newer (or the interpreter, which is how CI tests this path).  ``Options.tma`` off
    turns it off.
    """
    if not options().tma or D != BD:
        return None
    if not interpreting():
        if not k.is_cuda or torch.cuda.get_device_capability(k.device)[0] < 9:
            return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # triton < 3.4
        return None
    descs = []
    for t in (k, v):
        view = _row_view(t, D)
        if view is None:
            return None
        rows, sn = view
        descs.append(TensorDescriptor(t, [rows, sn], [sn, 1], [BD, BD]))
    return descs


def sparse_attention(q, k, v, counts, indices, *, block_size: int, softmax_scale: float, return_lse: bool = False,
                     softcap: float | None = None):
    """Exact causal attention of each query block over its selected key blocks.

    Args:
        q: [B, N, Hq, D]; k, v: [B, N, Hkv, D], ``Hq % Hkv == 0`` (query head ``h``
            reads kv head ``h // (Hq // Hkv)``).  Any strides; the last dim is made
            contiguous if it is not.  fp16/bf16 (fp32 under the interpreter).
        counts: int32 [B, Hq, nb], ``nb = ceil(N / block_size)``: blocks per query block.
        indices: int32 [B, Hq, nb, nb]: ascending key-block ids, -1 past the count.
            Broadcast (stride 0) batch and head dims are fine; int16 is taken too (the
            operator's own selections, half the memory, while ``nb < 2**15``).
        block_size: 32, 64 or 128.
        softmax_scale: scale of the scores.
        return_lse: also return the log-sum-exp.
        softcap: None or a positive float: scores ``s`` become ``softcap * tanh(s / softcap)``
            before the softmax.  Such calls run the Triton kernel on every GPU (the Gluon
            kernels for Hopper do not cap).

    Returns:
        ``out`` [B, N, Hq, D] in the input dtype, and ``lse`` fp32 [B, Hq, N] (natural log, of
        the capped scores) when ``return_lse``.  A row with no selected key gives zeros and lse ``-inf``.
    """
    return _launch(q, k, v, counts, indices, block_size=block_size, softmax_scale=softmax_scale, return_lse=return_lse,
                   softcap=softcap)


def _check(q, k, v, counts, indices, block_size, narrow_indices=False):
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size!r} is not supported; accepted: {BLOCK_SIZES}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, N, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, N, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != N or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={B}, N={N}, Hkv, D={D}]")
    if k.shape[2] == 0 or Hq % k.shape[2] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[2]})")
    if D > 256:
        raise ValueError(f"head dim D={D} is not supported; at most 256")
    nb = math.ceil(N / block_size)
    if counts.dtype != torch.int32 or tuple(counts.shape) != (B, Hq, nb):
        raise ValueError(f"counts must be int32 [{B}, {Hq}, {nb}], got {counts.dtype} {tuple(counts.shape)}")
    if narrow_indices:
        shape_ok = indices.dim() == 4 and tuple(indices.shape[:3]) == (B, Hq, nb) and indices.shape[3] >= 1
    else:
        shape_ok = tuple(indices.shape) == (B, Hq, nb, nb)
    if indices.dtype not in (torch.int32, torch.int16) or not shape_ok:
        raise ValueError(f"indices must be int32 (or int16) [{B}, {Hq}, {nb}, {nb}], got {indices.dtype} {tuple(indices.shape)}")
    for name, t in (("k", k), ("v", v), ("counts", counts), ("indices", indices)):
        if t.device != q.device:
            raise ValueError(f"q is on {q.device} but {name} is on {t.device}")


def _launch(q, k, v, counts, indices, *, block_size, softmax_scale, return_lse, config=None, out=None, lse=None,
            window=None, hopper_config=None, softcap=None):
    """Launch with autotuning, or with ``config`` = dict(BLOCK_M, BLOCK_N, num_warps, num_stages)
    (the Triton kernel), or with ``hopper_config`` = dict(BLOCK_M, BLOCK_N, num_warps, STAGES)
    (the Gluon kernel for Hopper, ``sparse_attention_hopper``; ``kernel="ws"`` in it: the
    warp-specialised persistent one, which takes dict(BLOCK_N, STAGES, Q_STAGES, PINGPONG),
    for block sizes that are multiples of 128; without either, a Gluon kernel is used where
    ``_hopper_kernel`` says so).

    ``out`` and ``lse`` may be given (tests poison them to catch unwritten rows).  ``window``:
    a sliding window on top of the selection (then ``indices`` may be narrower than ``nb``:
    it needs room for the largest count only).  ``softcap``: soft-capped logits, on the Triton
    kernel only (a ``hopper_config`` with it is refused).
    """
    _check(q, k, v, counts, indices, block_size, narrow_indices=window is not None)
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # expanded (stride 0) selections stay views: only the last dim must be dense
    counts = counts if counts.stride(-1) == 1 else counts.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    if out is None:
        out = torch.empty(B, N, Hq, D, dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(B, Hq, N, dtype=torch.float32, device=q.device)
    hopper = None
    if hopper_config is not None:
        _refuse_hopper_softcap(hopper_config, softcap)
        hopper = hopper_config.get("kernel", "tiled")
        if window is not None and hopper != "ws":
            raise ValueError(f"hopper_config {hopper_config}: only the warp-specialised kernel (kernel='ws') takes a window")
    elif config is None:
        hopper = _hopper_kernel(q, k, v, block_size, ws_only=window is not None, softcap=softcap)
    if hopper is not None:
        from .sparse_attention_hopper import launch_hopper, launch_hopper_ws

        hc = {key: val for key, val in (hopper_config or {}).items() if key != "kernel"}
        kw = dict(window=window) if hopper == "ws" else {}
        launch = launch_hopper_ws if hopper == "ws" else launch_hopper
        launch(q, k, v, counts, indices, out, lse if return_lse else None, block_size=block_size,
               softmax_scale=softmax_scale, config=hc or None, **kw)
        return (out, lse) if return_lse else out
    _launch_triton(q, k, v, counts, indices, out, lse if return_lse else None, block_size=block_size,
                   softmax_scale=softmax_scale, window=window, config=config, softcap=softcap)
    return (out, lse) if return_lse else out


def _refuse_hopper_softcap(hopper_config, softcap) -> None:
    if softcap is not None:
        raise ValueError(
            f"hopper_config {hopper_config} with softcap={softcap!r}: the Gluon kernels do not soft-cap; "
            "leave hopper_config unset (soft-capped calls run the Triton kernel)"
        )


# the Gluon kernel each head dim takes by default on Hopper (block size a multiple of 128 for
# "ws"; other block sizes keep the Triton kernel there).  On an H200 (32/8 heads
# at 128k, 5-60% density, TFLOP/s on the computed blocks over cuDNN's):
# head dim 64: the tiled kernel 0.91-0.99 against the Triton kernel's 0.86-0.92 (the
# warp-specialised one 0.79-0.86); head dim 128: the warp-specialised kernel
# 0.87-0.95 against the Triton kernel's 0.77-0.90 (the tiled one 0.78-0.87);
# head dim 256: 0.90-0.93 against 0.79-0.92 (tiled 0.81-0.94)
HOPPER_DEFAULT_KERNELS = {64: "tiled", 128: "ws", 256: "ws"}


def _dense_strides(q, k, v, out, counts, indices) -> tuple:
    """The stride arguments both dense-path kernels take, in their order: (batch, token, head)
    of q, k, v and out, (batch, head) of counts, (batch, head, row) of indices."""
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *counts.stride()[:2],
            *indices.stride()[:3])


def _hopper_kernel(q, k, v, block_size: int, *, ws_only: bool = False, softcap: float | None = None) -> str | None:
    """Which Gluon kernel for Hopper the dense path runs (``ops.sparse_attention_hopper``):
    "tiled", "ws" (warp-specialised, persistent) or None (the Triton kernel).  Needs an sm_90
    GPU, fp16/bf16, q/k/v addressable by tensor descriptors and triton's Gluon; then
    ``_hopper_policy``.  ``ws_only`` (packed or windowed calls, which the tiled kernel does
    not take): the warp-specialised kernel where the dense path would run it, else None.
    ``softcap``: soft-capped calls always run the Triton kernel (the Gluon kernels do not cap)."""
    if softcap is not None:
        return None
    if interpreting() or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return None
    D = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or not _gluon_available():
        return None
    kernel = _hopper_policy(options().hopper_kernel, D, block_size, _ws_available())
    if kernel is None or (ws_only and kernel != "ws") or any(_row_view(t, D) is None for t in (q, k, v)):
        return None
    return kernel


def _hopper_policy(choice: str, D: int, block_size: int, ws_ok: bool) -> str | None:
    """The Hopper kernel for head dim ``D`` and a block size by ``Options.hopper_kernel``
    (``choice``): "auto" ``HOPPER_DEFAULT_KERNELS``, "tiled" the tiled kernel for head dims 64,
    128, 256, "ws" the warp-specialised one, "off" none.  The warp-specialised kernel needs block sizes
    that are multiples of 128 and a triton whose Gluon has the list form of ``warp_specialize``
    (``ws_ok``); without them ``ws`` falls back to the tiled kernel and the defaults to the
    Triton kernel (at head dims 128 and 256 the tiled kernel measured no faster than it)."""
    if choice == "off" or block_size < 64 or D not in (64, 128, 256):
        return None
    kernel = HOPPER_DEFAULT_KERNELS.get(D) if choice == "auto" else choice
    if kernel == "ws" and (block_size % 128 or not ws_ok):
        kernel = "tiled" if choice == "ws" else None
    return kernel


@functools.lru_cache(maxsize=None)
def _ws_available() -> bool:
    """Whether this triton can build the warp-specialised kernel: Gluon's ``warp_specialize``
    taking a list of (function, arguments) (triton 3.6, 3.7; 3.5 had another signature)."""
    if not _gluon_available():
        return False
    try:
        from triton.experimental.gluon import language as gl

        return next(iter(inspect.signature(gl.warp_specialize).parameters)) == "functions_and_args"
    except (ImportError, AttributeError, TypeError, ValueError, StopIteration):
        return False


def kernel_name(q, k, v, block_size: int, *, packed_or_windowed: bool = False, softcap: float | None = None) -> str:
    """The kernel a ``sparse_attention`` call on these inputs runs (``packed_or_windowed``: a
    ``sparse_attention_varlen`` call or one with a window; ``softcap``: a soft-capped call, always
    "triton"): "gluon-ws", "gluon-tiled" (Hopper) or "triton"; benchmarks record it with their rows."""
    kernel = _hopper_kernel(q, k, v, block_size, ws_only=packed_or_windowed, softcap=softcap)
    return {"ws": "gluon-ws", "tiled": "gluon-tiled", None: "triton"}[kernel]


@functools.lru_cache(maxsize=None)
def _gluon_available() -> bool:
    """Whether this triton has Gluon's Hopper API (triton >= 3.5); older ones keep the Triton kernel."""
    try:
        importlib.import_module(".kernels.sparse_attention_hopper", __package__)
    except (ImportError, AttributeError):
        return False
    return True


def _diag_first(BD: int) -> bool:
    """Whether the kernel runs the diagonal block before the others (``DIAG_FIRST``; its loads
    then overlap the selection's).  Default: for padded head dim 64 only.  On the H200 at 128k
    first was +0.7 to +3.0 points of cuDNN's TFLOP/s at head
    dim 64 (5-60% density), -2.7 to +1.3 at 128 and 10-17 points worse at 256 (a second
    pipelined loop's buffers).  ``Options.diag_first`` True / False forces it on / off."""
    forced = options().diag_first
    if forced is not None:
        return forced
    return BD == 64


# the tiles autotuning (or ``config``) gives; every other parameter of the kernel is named below
_TILE_META = ("BLOCK_M", "BLOCK_N")


@functools.lru_cache(maxsize=None)
def _kernel_params() -> tuple:
    return tuple(p for p in inspect.signature(sparse_attention_fwd_kernel.fn).parameters if p not in _TILE_META)


def _kernel_args(**named) -> tuple:
    """The Triton kernel's arguments in its parameter order, from their names (all but the
    tiles): a name missing or unknown fails here, not as a shifted positional argument.
    Passed positionally, constexprs included (every triton version hands those to the prune)."""
    params = _kernel_params()
    missing = [p for p in params if p not in named]
    unknown = [n for n in named if n not in params]
    if missing or unknown:
        raise TypeError(f"sparse_attention_fwd_kernel arguments: missing {missing}, unknown {unknown}")
    return tuple(named[p] for p in params)


def _launch_triton(q, k, v, counts, indices, out, lse, *, block_size: int, softmax_scale: float, window=None,
                   varlen=None, config=None, softcap=None):
    """The one launcher of the Triton kernel (``kernels.sparse_attention``), for dense batches,
    packed sequences and windows alike; inputs checked and laid out by the caller.

    q [B, N, Hq, D], k/v [B, N, Hkv, D], out like q, lse fp32 [B, Hq, N] or None; or with
    ``varlen`` = (q_starts, q_ends, k_starts, k_ends, max_seqlen_q, max_seqlen_k): packed
    q [total_q, Hq, D], k/v [total_k, Hkv, D], lse [Hq, total_q].  ``window``: a sliding
    window on top of the selection.  ``softcap``: soft-capped scores (``SOFTCAP``).  ``config``:
    dict(BLOCK_M, BLOCK_N, num_warps, num_stages) instead of autotuning.  Returns triton's
    handle of the launched kernel."""
    Hq, D = q.shape[-2:]
    Hkv = k.shape[-2]
    group = Hq // Hkv
    # an fp32 stand-in when no lse is asked: the autotuner keys on argument dtypes, so
    # both variants then share one tuning
    lse_arg = lse if lse is not None else torch.empty(1, dtype=torch.float32, device=q.device)
    BD = max(64, triton.next_power_of_2(D))
    descs = _tma_descriptors(k, v, D, BD)
    names = ("stride_qb", "stride_qn", "stride_qh", "stride_kb", "stride_kn", "stride_kh", "stride_vb", "stride_vn",
             "stride_vh", "stride_ob", "stride_on", "stride_oh", "stride_cb", "stride_ch", "stride_ib", "stride_ih",
             "stride_ir")
    if varlen is None:
        B, N = q.shape[:2]
        strides = _dense_strides(q, k, v, out, counts, indices)
        # sequence bounds and the lse head stride are unused by the dense path
        bounds = dict(q_starts=counts, q_ends=counts, k_starts=counts, k_ends=counts, stride_lh=0)

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_M"]) * group, B * Hkv)
    else:
        q_starts, q_ends, k_starts, k_ends, max_seqlen_q, N = varlen
        S = q_starts.shape[0]
        # a packed tensor has no batch dim: batch strides 0
        strides = (0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1),
                   0, out.stride(0), out.stride(1), counts.stride(0), counts.stride(1), *indices.stride()[:3])
        bounds = dict(q_starts=q_starts, q_ends=q_ends, k_starts=k_starts, k_ends=k_ends,
                      stride_lh=lse_arg.stride(0) if lse is not None else 0)

        def grid(meta):
            # a chunk's queries span at most cdiv(n_q, BLOCK_M) + 1 tiles aligned to absolute positions
            return ((triton.cdiv(max_seqlen_q, meta["BLOCK_M"]) + 1) * group, S * Hkv)
    args = _kernel_args(
        q=q, k=k, v=v, o=out, lse=lse_arg, counts=counts, indices=indices,
        k_desc=descs[0] if descs else k, v_desc=descs[1] if descs else v,
        **dict(zip(names, strides)), **bounds,
        N=N, HKV=Hkv, scale_log2=softmax_scale * _LOG2E, N_BUCKET=length_bucket(N),
        window=0 if window is None else int(window),
        # the capped score cap * tanh(scale * q.k / cap), in the log2 domain
        cap_scale=0.0 if softcap is None else softmax_scale / softcap,
        cap_log2=0.0 if softcap is None else softcap * _LOG2E,
        GROUP=group, D=D, BD=BD, BS=block_size, RETURN_LSE=lse is not None, VARLEN=varlen is not None,
        TMA=descs is not None, WINDOWED=window is not None, DIAG_FIRST=_diag_first(BD), SOFTCAP=softcap is not None,
    )
    return _run(args, grid, BD, block_size, config, descs)


def _run(args, grid, BD, block_size, config, descs):
    """Launch; returns triton's handle of the launched kernel (registers, spills: benchmarks/probe_tiles.py)."""
    if config is None:
        return sparse_attention_fwd_tuned[BD][grid](*args)
    cfg = dict(config)
    if block_size % cfg["BLOCK_M"] or block_size % cfg["BLOCK_N"]:
        raise ValueError(f"config {config} tiles must divide block_size={block_size}")
    for d in descs or ():
        d.block_shape = [cfg["BLOCK_N"], BD]
    return sparse_attention_fwd_kernel[grid(cfg)](*args, **cfg)


def sparse_attention_varlen(
    q, k, v, counts, indices, q_starts, q_ends, k_starts, k_ends, max_seqlen_q: int, max_seqlen_k: int, *,
    block_size: int, softmax_scale: float, return_lse: bool = False, config=None, out=None, lse=None, window=None,
    hopper_config=None, softcap: float | None = None,
):
    """Block-sparse causal attention of packed sequences (chunks over a cached prefix).

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D] (rows of all sequences, any row order).
        counts: int32 [S, Hq, max_nb]; indices: int32 [S, Hq, max_nb, max_nb], rows by
            absolute query block, ``max_nb = ceil(max_seqlen_k / block_size)`` (stride-0
            head dims are fine).
        q_starts, q_ends, k_starts, k_ends: int32 [S] on the device: sequence ``s`` has
            query rows ``[q_starts[s], q_ends[s])`` and key rows ``[k_starts[s], k_ends[s])``;
            its ``n_q`` queries are the last ``n_q`` of its ``n_k`` positions
            (``n_q <= n_k``, lengths at most the maxima: not checked, no host sync).
        max_seqlen_q, max_seqlen_k: Python ints, the grid size.
        config: dict(BLOCK_M, BLOCK_N, num_warps, num_stages) instead of autotuning (the
            Triton kernel); ``hopper_config``: a config of the warp-specialised Gluon kernel
            (``ops.sparse_attention_hopper.ws_configs``), which otherwise runs where
            ``_hopper_kernel`` picks it (Hopper, block size a multiple of 128; windows too).
        window: a sliding window on absolute positions on top of the selection (``indices``
            may then be narrower than ``max_nb``).
        softcap: soft-capped scores, as in :func:`sparse_attention` (the Triton kernel only).
        out, lse: preallocated outputs (rows outside every sequence are left as given).

    Returns:
        ``out`` [total_q, Hq, D] in the input dtype, and ``lse`` fp32 [Hq, total_q] (natural log).
    """
    total_q, Hq, D = q.shape
    Hkv = k.shape[1]
    S = q_starts.shape[0]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    counts = counts if counts.stride(-1) == 1 else counts.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    if out is None:
        out = torch.empty(total_q, Hq, D, dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(Hq, total_q, dtype=torch.float32, device=q.device)
    if hopper_config is not None:
        _refuse_hopper_softcap(hopper_config, softcap)
    if hopper_config is not None or (config is None and _hopper_kernel(q, k, v, block_size, ws_only=True, softcap=softcap)):
        from .sparse_attention_hopper import launch_hopper_ws

        launch_hopper_ws(q, k, v, counts, indices, out, lse if return_lse else None, block_size=block_size,
                         softmax_scale=softmax_scale, config=hopper_config, window=window,
                         varlen=(q_starts, q_ends, k_starts, k_ends, max_seqlen_q, max_seqlen_k))
        return (out, lse) if return_lse else out
    _launch_triton(q, k, v, counts, indices, out, lse if return_lse else None, block_size=block_size,
                   softmax_scale=softmax_scale, window=window, config=config, softcap=softcap,
                   varlen=(q_starts, q_ends, k_starts, k_ends, max_seqlen_q, max_seqlen_k))
    return (out, lse) if return_lse else out
