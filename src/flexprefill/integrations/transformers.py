"""FlexPrefill as a transformers (5.x) attention implementation named ``"flexprefill"``.

Importing this module registers the attention function with ``AttentionInterface`` and
transformers' own ``sdpa_mask`` with ``AttentionMaskInterface`` under the same name, so
masks are exactly SDPA's: ``None`` for a plain causal prefill or a decode step (no N x N
mask is built), a materialised mask for padding, packing, sliding windows and cached
prefixes.  The attention function runs FlexPrefill only for a causal prefill without a
cache prefix or padding on a full-attention layer, and hands every other call to
transformers' SDPA function unchanged (or to an exact eager path when the layer soft-caps
its logits, which SDPA cannot do).

Layout adapter: transformers gives ``query [B, Hq, N, D]`` and ``key, value [B, Hkv, N, D]``
(not repeated for GQA) and wants ``out [B, N, Hq, D]``; the operator takes ``[B, N, H, D]``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..api import SUPPORTED_HEAD_DIMS, block_sparse_attention, flex_prefill_attention
from ..config import FlexPrefillConfig
from ..selection import PatternStats

__all__ = [
    "NAME",
    "LayerRecord",
    "attention_forward",
    "register",
    "patch",
    "unpatch",
    "is_patched",
    "set_default_config",
    "get_default_config",
    "last_record",
    "last_stats",
    "clear_records",
]

NAME = "flexprefill"

# attributes set on attention modules (plain python objects: not submodules, not saved)
_STATE = "_flexprefill_state"
_LAST = "_flexprefill_last"
_LAST_PREFILL = "_flexprefill_last_prefill"

_DEFAULT_CONFIG = FlexPrefillConfig()
_DEFAULT_COLLECT = False
_WARNED: set[str] = set()


@dataclass
class LayerRecord:
    """What one attention layer did in its last call.

    ``path``: "flexprefill" or "dense" (transformers' SDPA, or exact eager for soft-capping).
    ``reason``: why it was dense ("" for flexprefill), e.g. "decode", "short", "cached_prefix",
    "padding_mask", "sliding_window", "layer_not_selected", "softcap".
    ``stats``: :class:`PatternStats` of a FlexPrefill call when stats collection is on.
    """

    path: str
    reason: str
    q_len: int
    k_len: int
    stats: PatternStats | None = None


@dataclass
class _PatchState:
    config: FlexPrefillConfig | None
    layers: frozenset | None
    selector: Callable | None
    collect_stats: bool
    previous: list


def set_default_config(config: FlexPrefillConfig | None = None, *, collect_stats: bool | None = None) -> None:
    """Settings for models that use ``attn_implementation="flexprefill"`` without a per-model
    config from :func:`patch` (a per-model config wins).  ``None`` restores ``FlexPrefillConfig()``."""
    global _DEFAULT_CONFIG, _DEFAULT_COLLECT
    if config is not None and not isinstance(config, FlexPrefillConfig):
        raise TypeError(f"config must be a FlexPrefillConfig or None, got {type(config).__name__}")
    _DEFAULT_CONFIG = config if config is not None else FlexPrefillConfig()
    if collect_stats is not None:
        _DEFAULT_COLLECT = bool(collect_stats)


def get_default_config() -> FlexPrefillConfig:
    return _DEFAULT_CONFIG


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"flexprefill: {msg}", RuntimeWarning, stacklevel=3)


def _is_plain_causal(mask: torch.Tensor, n: int) -> bool:
    """True when a materialised 4D mask [B, 1 or H, n, n] is exactly the causal mask (host sync;
    only reached when transformers built a mask anyway)."""
    if mask.dim() != 4 or mask.shape[-2:] != (n, n):
        return False
    tril = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == tril).all())
    # additive float mask: 0 where allowed, a huge negative number elsewhere
    allowed = mask == 0
    return bool((allowed == tril).all()) and bool((mask.masked_fill(tril, -math.inf) < -1e4).all())


def _is_sliding(module, layer_idx, kwargs) -> bool:
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None:
        return True
    layer_types = getattr(getattr(module, "config", None), "layer_types", None)
    if layer_types is not None and layer_idx is not None and layer_idx < len(layer_types):
        return layer_types[layer_idx] != "full_attention"
    return False


def _softcap_eager(module, query, key, value, attention_mask, scaling, softcap, is_causal):
    """Exact attention with tanh soft-capping of the logits, fp32 softmax; SDPA's mask semantics."""
    groups = query.shape[1] // key.shape[1]
    q_len, k_len = query.shape[2], key.shape[2]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    if attention_mask is None and is_causal and q_len > 1 and k_len > q_len:
        # as sdpa_attention_forward: no mask and a longer key only happens for an empty static cache
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    s = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    s = softcap * torch.tanh(s / softcap)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            s = s.masked_fill(~attention_mask, -math.inf)
        else:
            s = s + attention_mask.float()
    elif is_causal and q_len > 1:
        causal = torch.ones(q_len, key.shape[2], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~causal, -math.inf)
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, value.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _record(module, rec: LayerRecord) -> None:
    setattr(module, _LAST, rec)
    if rec.q_len > 1:
        setattr(module, _LAST_PREFILL, rec)


def _dense(module, query, key, value, attention_mask, layer_idx, reason, kwargs, *, dropout, scaling):
    _record(module, LayerRecord("dense", reason, query.shape[2], key.shape[2]))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """transformers attention function: FlexPrefill for a long causal prefill, SDPA otherwise.

    Args:
        query: [B, Hq, N, D]; key, value: [B, Hkv, Nk, D] (GQA by head index).
        attention_mask: None (plain causal or decode) or the mask ``sdpa_mask`` built.
        scaling: softmax scale (default ``1/sqrt(D)``).

    Returns:
        ``(out [B, N, Hq, D], None)``.
    """
    state: _PatchState | None = getattr(module, _STATE, None)
    cfg = (state.config if state is not None else None) or _DEFAULT_CONFIG
    layer_idx = getattr(module, "layer_idx", None)
    q_len, k_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal

    dense = lambda reason: _dense(  # noqa: E731
        module, query, key, value, attention_mask, layer_idx, reason, kwargs, dropout=dropout, scaling=scaling
    )
    # soft-capped logits (Gemma 2 passes ``softcap``): neither FlexPrefill nor SDPA can, so exact eager
    softcap = kwargs.pop("softcap", None)
    if softcap is not None:
        _warn_once(
            "softcap",
            f"layer {layer_idx} soft-caps attention logits ({softcap}); FlexPrefill and SDPA cannot, "
            "so these layers run exact eager attention",
        )
        _record(module, LayerRecord("dense", "softcap", q_len, k_len))
        return _softcap_eager(module, query, key, value, attention_mask, scaling, softcap, is_causal)
    if getattr(module, "attn_logit_softcapping", None) is not None:
        # the module has a cap but its forward does not pass it (Gemma 3): transformers' own
        # sdpa and eager ignore it, so dense SDPA is the model's behaviour; FlexPrefill stays off
        _warn_once(
            "softcap_attr",
            f"layer {layer_idx} has attn_logit_softcapping={module.attn_logit_softcapping} but does not pass it "
            "to the attention function; running dense SDPA as transformers does",
        )
        return dense("softcap")

    if not is_causal:
        return dense("not_causal")
    if q_len == 1:
        return dense("decode")
    if q_len != k_len:
        return dense("cached_prefix")
    if _is_sliding(module, layer_idx, kwargs):
        return dense("sliding_window")
    if state is not None and state.layers is not None and layer_idx not in state.layers:
        return dense("layer_not_selected")
    if dropout and module.training:
        return dense("dropout")
    if kwargs.get("position_bias") is not None:
        return dense("position_bias")
    if attention_mask is not None and not _is_plain_causal(attention_mask, q_len):
        return dense("padding_mask")
    if q_len < cfg.min_seq_len:
        return dense("short")
    D = query.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS or key.shape[-1] != D or value.shape[-1] != D:
        _warn_once(f"head_dim{D}", f"head dim {D} is not supported (accepted: {SUPPORTED_HEAD_DIMS}); dense SDPA runs")
        return dense("unsupported_head_dim")
    if query.is_cuda and query.dtype not in (torch.float16, torch.bfloat16):
        _warn_once(f"dtype{query.dtype}", f"{query.dtype} on CUDA is not supported (fp16/bf16); dense SDPA runs")
        return dense("unsupported_dtype")

    scale = scaling if scaling is not None else D**-0.5
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    collect = state.collect_stats if state is not None else _DEFAULT_COLLECT
    selector = state.selector if state is not None else None
    stats = None
    if selector is not None:
        sel = selector(q, k, config=cfg, softmax_scale=scale)
        out = block_sparse_attention(q, k, v, sel, softmax_scale=scale, backend=cfg.backend)
        if collect:
            stats = sel.stats()
    elif collect:
        out, stats = flex_prefill_attention(q, k, v, config=cfg, softmax_scale=scale, return_stats=True)
    else:
        out = flex_prefill_attention(q, k, v, config=cfg, softmax_scale=scale)
    _record(module, LayerRecord("flexprefill", "", q_len, k_len, stats))
    return out, None


def register() -> None:
    """Register ``"flexprefill"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    # SDPA's masks: None whenever is_causal suffices, so no N x N mask for a causal prefill
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()


def _attention_modules(model) -> list:
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and "Attention" in type(m).__name__ and hasattr(m, "config")
    ]


def _configs(model) -> list:
    """Every config object whose ``_attn_implementation`` may change with ``set_attn_implementation``."""
    from transformers import PreTrainedModel

    seen, out = set(), []

    def add(c):
        if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation_internal"):
            seen.add(id(c))
            out.append(c)

    add(getattr(model, "config", None))
    for key in getattr(model.config, "sub_configs", {}) or {}:
        add(getattr(model.config, key, None))
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            add(m.config)
    return out


def is_patched(model) -> bool:
    return getattr(model, _STATE, None) is not None


def patch(
    model,
    config: FlexPrefillConfig | None = None,
    *,
    layers=None,
    selector: Callable | None = None,
    collect_stats: bool = False,
):
    """Switch a loaded transformers model to FlexPrefill attention; undo with :func:`unpatch`.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention uses ``AttentionInterface``.
        config: :class:`FlexPrefillConfig` for this model (default: the global default config).
        layers: layer indices that may use FlexPrefill (default all full-attention layers).
        selector: optional ``(q, k, *, config, softmax_scale) -> BlockSelection`` used instead of
            FlexPrefill's own pattern search (q [B, N, Hq, D], k [B, N, Hkv, D]).
        collect_stats: keep each layer's :class:`PatternStats` for :func:`last_stats`
            (costs a little compute per layer, no host sync).

    Returns:
        the model (patched in place).
    """
    if config is not None and not isinstance(config, FlexPrefillConfig):
        raise TypeError(f"config must be a FlexPrefillConfig or None, got {type(config).__name__}")
    if selector is not None and not callable(selector):
        raise TypeError(f"selector must be callable or None, got {type(selector).__name__}")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx: cannot patch it")
    if layers is not None:
        known = {m.layer_idx for m in modules}
        layers = frozenset(int(i) for i in layers)
        bad = sorted(layers - known)
        if bad:
            raise ValueError(f"layers={sorted(layers)}: no attention layer with index {bad}; layers are 0..{max(known)}")
    register()
    previous = getattr(model, _STATE).previous if is_patched(model) else [
        (c, c._attn_implementation_internal) for c in _configs(model)
    ]
    if not is_patched(model):
        model.set_attn_implementation(NAME)
        if not all(getattr(m.config, "_attn_implementation", None) == NAME for m in modules):
            for c, impl in previous:
                c._attn_implementation_internal = impl
            raise RuntimeError(
                f"{type(model).__name__} did not switch its attention to {NAME!r} "
                "(it does not dispatch through transformers' AttentionInterface)"
            )
    state = _PatchState(config, layers, selector, bool(collect_stats), previous)
    setattr(model, _STATE, state)
    for m in modules:
        setattr(m, _STATE, state)
    return model


def unpatch(model) -> bool:
    """Restore the attention implementation the model had before :func:`patch`, exactly.

    Returns False (and does nothing) when the model is not patched.
    """
    state: _PatchState | None = getattr(model, _STATE, None)
    if state is None:
        return False
    for c, impl in state.previous:
        c._attn_implementation_internal = impl
    for m in [model, *model.modules()]:
        for attr in (_STATE, _LAST, _LAST_PREFILL):
            if attr in m.__dict__:
                delattr(m, attr)
    return True


def last_record(model, *, prefill: bool = False) -> dict[int, LayerRecord]:
    """Per layer, what its last attention call did (path, reason, lengths, stats if collected).

    ``prefill=True``: the last call with more than one query instead (decode steps skipped).
    """
    attr = _LAST_PREFILL if prefill else _LAST
    out = {}
    for i, m in enumerate(_attention_modules(model)):
        rec = getattr(m, attr, None)
        if rec is not None:
            out[m.layer_idx if m.layer_idx is not None else i] = rec
    return out


def last_stats(model) -> dict[int, PatternStats]:
    """:class:`PatternStats` of the layers that ran FlexPrefill in the last prefill (call with more
    than one query; later decode steps do not clear it).  Empty unless stats collection is on
    (``patch(..., collect_stats=True)`` or ``set_default_config(..., collect_stats=True)``)."""
    out = {}
    for i, m in enumerate(_attention_modules(model)):
        rec = getattr(m, _LAST_PREFILL, None)
        if rec is not None and rec.stats is not None:
            out[m.layer_idx if m.layer_idx is not None else i] = rec.stats
    return out


def clear_records(model) -> None:
    for m in _attention_modules(model):
        for attr in (_LAST, _LAST_PREFILL):
            if attr in m.__dict__:
                delattr(m, attr)
