"""A block selection run by PyTorch FlexAttention (``torch.nn.attention.flex_attention``).

The selection's off-diagonal blocks become FlexAttention "full" blocks (no mask_mod
evaluated), each row's diagonal block a "partial" block with the token-level causal
mask.  Compiled on CUDA (the fused Triton kernel skips unlisted blocks); in eager mode
FlexAttention evaluates ``mask_mod`` on every (query, key) pair and ignores the block
lists, so there the mask_mod also looks the block up in the selection.  A logit soft-cap
(``softcap``) is a ``score_mod``: FlexAttention hands it the scaled score, before the mask.
Tested on CPU (eager and compiled) against ``flexprefill.reference.block_sparse_attention``.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import torch

from ..block_table import BlockSelection

__all__ = ["flex_attention_from_selection", "selection_to_block_mask", "compiled_flex_attention"]


@functools.lru_cache(maxsize=None)
def compiled_flex_attention(dynamic: bool | None = None):
    """``torch.compile(flex_attention)``, built once per ``dynamic`` setting and cached.

    ``dynamic=None`` is torch.compile's default: the first shape is compiled static,
    a second shape recompiles with the changed sizes symbolic.
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


def causal_mask_mod(b, h, q_idx, kv_idx):
    # one module-level function: a new closure per call could count as a new graph for torch.compile
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=None)
def softcap_score_mod(softcap: float):
    """FlexAttention ``score_mod`` of a logit soft-cap: ``softcap * tanh(score / softcap)`` of the
    scaled score; one function per cap value (cached, so torch.compile sees the same one again)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


def _from_kv_blocks_kwargs() -> dict:
    from torch.nn.attention.flex_attention import BlockMask

    # compute_q_blocks (the transposed lists only the backward needs) is not in every release
    params = inspect.signature(BlockMask.from_kv_blocks).parameters
    return {"compute_q_blocks": False} if "compute_q_blocks" in params else {}


def selection_to_block_mask(selection: BlockSelection, *, exact_mask_mod: bool = False):
    """FlexAttention ``BlockMask`` of a selection (KV and Q block size = the selection's).

    ``exact_mask_mod=False``: mask_mod is plain causal, right for the compiled kernel,
    which only visits listed blocks.  ``exact_mask_mod=True``: mask_mod is causal AND
    "block selected", needed by eager FlexAttention (which ignores the block lists);
    it costs a dense bool block mask [B, Hq, nb, nb].
    """
    from torch.nn.attention.flex_attention import BlockMask

    counts, indices = selection.counts, selection.indices
    bs, N = selection.block_size, selection.seq_len
    nb = counts.shape[-1]
    rows = torch.arange(nb, device=counts.device, dtype=torch.int32)
    # indices are ascending and never above the diagonal: a selected diagonal is the last entry
    last = indices.gather(-1, (counts.long() - 1).clamp_min(0)[..., None])[..., 0]
    has_diag = ((counts > 0) & (last == rows)).to(torch.int32)
    full_num = (counts - has_diag).contiguous()
    full_idx = indices.clamp_min(0).contiguous()
    part_num = has_diag.contiguous()
    part_idx = rows.view(1, 1, nb, 1).expand(*counts.shape, nb).contiguous()

    if exact_mask_mod:
        block_on = selection.to_mask()

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & block_on[b, h, q_idx // bs, kv_idx // bs]

    else:
        mask_mod = causal_mask_mod

    return BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(N, N),
        **_from_kv_blocks_kwargs(),
    )


def flex_attention_from_selection(
    q,
    k,
    v,
    selection: BlockSelection,
    *,
    softmax_scale: float | None = None,
    layout: str = "BNHD",
    block_mask=None,
    compiled: bool | None = None,
    compile_dynamic: bool | None = None,
    softcap: float | None = None,
):
    """Causal attention of each query block over its selected key blocks, by FlexAttention.

    Args:
        q: [B, N, Hq, D] (``layout="BNHD"``, the project's boundary) or [B, Hq, N, D]
            (``layout="BHND"``, FlexAttention's own, no transposes).
        k, v: [B, N, Hkv, D] or [B, Hkv, N, D]; ``Hq % Hkv == 0`` (GQA via ``enable_gqa``).
        selection: :class:`BlockSelection` (counts [B, Hq, nb], ascending indices, -1 padded).
        softmax_scale: default ``1/sqrt(D)``.
        block_mask: a ``BlockMask`` from :func:`selection_to_block_mask` to reuse (a
            benchmark builds it once, outside the timed region).
        compiled: run ``torch.compile(flex_attention)`` (cached); default True on CUDA,
            False elsewhere.
        compile_dynamic: ``dynamic`` of that torch.compile (None: compile the first
            shape static, recompile with symbolic sizes when one changes).
        softcap: None or a positive float: scores ``s`` become ``softcap * tanh(s / softcap)``
            (a ``score_mod``).

    Returns:
        ``out`` in the layout of ``q``, input dtype.
    """
    if layout not in ("BNHD", "BHND"):
        raise ValueError(f"layout={layout!r} is not supported; accepted: 'BNHD', 'BHND'")
    if not isinstance(selection, BlockSelection):
        raise TypeError(f"selection must be a BlockSelection, got {type(selection).__name__}")
    if layout == "BNHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    B, Hq, N, D = q.shape
    if selection.seq_len != N or tuple(selection.counts.shape) != (B, Hq, math.ceil(N / selection.block_size)):
        raise ValueError(
            f"selection (counts {tuple(selection.counts.shape)}, N={selection.seq_len}) does not fit q "
            f"with B={B}, Hq={Hq}, N={N}"
        )
    if compiled is None:
        compiled = q.is_cuda
    if block_mask is None:
        block_mask = selection_to_block_mask(selection, exact_mask_mod=not compiled)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    gqa = k.shape[1] != Hq
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap={softcap!r} must be None or a finite positive number")
        mods = dict(score_mod=softcap_score_mod(float(softcap)))
    else:
        mods = {}
    if compiled:
        out = compiled_flex_attention(compile_dynamic)(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                                                       **mods)
    else:
        from torch.nn.attention.flex_attention import flex_attention

        with warnings.catch_warnings():
            # eager is deliberate here (CPU, tests): silence "called without torch.compile"
            warnings.simplefilter("ignore", UserWarning)
            out = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, **mods)
    return out.transpose(1, 2) if layout == "BNHD" else out
