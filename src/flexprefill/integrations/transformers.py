"""FlexPrefill as a transformers (5.x) attention implementation named ``"flexprefill"``.

Importing this module registers the attention function with ``AttentionInterface`` and
:func:`flexprefill_mask` with ``AttentionMaskInterface`` under the same name.  Its masks are
transformers' ``sdpa_mask``: ``None`` for a plain causal prefill, a decode step or the first
prefill into an empty static cache (no N x N mask is built), a materialised boolean mask
``[B, 1, n, K]`` for padding, packing, sliding windows and cached prefixes; except the
sliding window of a plain prefill, which is an empty placeholder tensor (the windowed
kernel needs no mask; a fallback to SDPA builds the real one, once per forward).

Which calls run FlexPrefill (full-attention layers, causal, n > 1 queries):

* no mask, ``n == K``: the batched operator :func:`flex_prefill_attention`;
* no mask, ``K > n`` (SDPA reads this as top-left causal: an empty static cache): the
  batched operator over the first ``n`` keys, as SDPA does;
* a materialised mask that is exactly *causal + padding*: per batch element one
  contiguous range of valid keys ``[s, e)`` and bottom-right causal queries, i.e. allowed
  ``(b, i, j)`` iff ``s_b <= j < e_b`` and ``j <= i + off_b``.  That covers left and
  right padding, a cached prefix (chunked prefill, ``n < K``), both together, and
  static caches (keys past ``e`` unused).  The valid query rows (``s_b <= i + off_b <
  e_b``) and key rows of every element are packed and run through
  :func:`flex_prefill_attention_varlen` (one sequence per element; ``n_k = e - s``, the
  queries are its last ``n_q`` positions).  The other query rows are padding and their
  output is zeros: rows that see nothing (left padding; SDPA gives zeros too) and rows
  that see every valid key but not their own position (right padding; SDPA attends them
  to the valid keys).  No valid position reads a padding row.
  A sequence with ``n_k < min_seq_len`` runs dense inside the operator; when every
  element is that short the layer runs SDPA ("short").

The mask is read on the host to decide (one small device-to-host copy per mask tensor:
every layer of a forward shares the mask, so the analysis is memoised on that tensor).
The derived parameters are checked against *every* entry of the mask (in row chunks, on
the mask's device) before FlexPrefill runs; anything else (packed sequences, sliding
windows, bidirectional or image-token blocks, additive biases, a mask that does not
broadcast as ``[B or 1, Hq or 1, n, K]``) runs SDPA with reason "custom_mask".

Sliding-window layers (Gemma 3's local layers, Mistral) get no FlexPrefill pattern: they are
exact by design.  On CUDA they run the block kernel on the band of blocks the window reaches,
with the window applied per token: O(N * window) work where SDPA with a materialised mask does
O(N^2).  A plain prefill (the placeholder above) calls :func:`flexprefill.sliding_window_attention`;
a real mask that is exactly *causal window + padding* (the fit above plus
``j > i + off_b - window``, checked entry by entry, once per mask tensor: left or right
padding, a cached prefix, Gemma 3's sliding cache) packs the valid rows for
:func:`flexprefill.sliding_window_attention_varlen`.  Other sliding calls run SDPA
("sliding_window"), as do all of them on the CPU.

Everything else runs exact attention as transformers itself runs it: its SDPA function, or
the model's own ``eager_attention_forward`` where SDPA would drop something.  Every keyword
argument a model passes is honoured exactly on the fast paths (``scaling``, ``is_causal``,
``sliding_window``, attention sinks ``s_aux``/``sinks``, the logit soft-cap ``softcap``), has
no effect on the attention math (``position_ids``, ``use_cache``, ...), or sends the call to
the exact path with a one-time warning naming it (``position_bias``, ``indices``,
``cu_seq_lens_*``, ``output_attentions``, and any argument this module does not know):
:func:`_triage` decides, in one place.  Attention sinks join each row's softmax exactly from
the operator's log-sum-exp (``out * sigmoid(lse - sink)``), with no kernel change; with a
soft-cap that log-sum-exp is the capped one, as the sink joins the capped scores.  A row that sees no key
gives finite values on every path (zeros on the fast ones and SDPA, eager's own values on
eager).  :class:`LayerRecord` says which path ran and why.

Layout adapter: transformers gives ``query [B, Hq, n, D]`` and ``key, value [B, Hkv, K, D]``
(not repeated for GQA) and wants ``out [B, n, Hq, D]``; the operator takes ``[B, N, H, D]``
or packed ``[total, H, D]``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..api import (
    SUPPORTED_HEAD_DIMS,
    block_sparse_attention,
    flex_prefill_attention,
    flex_prefill_attention_varlen,
    sliding_window_attention,
    sliding_window_attention_varlen,
)
from ..config import FlexPrefillConfig
from ..reference import too_dense
from ..options import interpreting
from ..block_table import PatternStats

__all__ = [
    "NAME",
    "LayerRecord",
    "attention_forward",
    "flexprefill_mask",
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

    ``path``: "flexprefill", "window" (a sliding-window layer on the exact windowed kernel:
    O(N * window) work, no approximation) or "dense" (exact attention as transformers runs it:
    its SDPA function, or the model's own eager function; ``exact`` says which).
    ``reason``: why it was dense ("" for flexprefill): "decode" (one query), "short" (every
    sequence has fewer than ``min_seq_len`` keys), "custom_mask" (a mask that is not exactly
    causal + padding), "sliding_window" (a sliding layer the windowed kernel does not take:
    the CPU, a mask that is not causal window + padding, or no mask because the window does
    not bind), "chunked_attention" (a chunked layer whose chunk binds), "layer_type:<type>"
    (a ``config.layer_types`` entry that is not full, sliding or chunked attention),
    "layer_not_selected", "not_causal", "dropout", "position_bias", "packed" (FlashAttention's
    ``cu_seq_lens_*`` / ``max_length_*``), "softcap" (a ``softcap`` that is not a positive
    number), "output_attentions", "indices" (a top-k indexer's keys, folded into the mask),
    "sinks" (sink logits of an unexpected shape), "unknown_kwarg:<names>" (an argument this
    module does not know), "dense_above" (a custom selector's blocks were denser than
    ``config.dense_above``; without a selector the operator decides and ``stats.dense`` says
    so), "selector_varlen" (a custom selector, which takes a plain batch only, on a padded or
    cached-prefix call), "unsupported_head_dim" (query/key), "unsupported_value_head_dim"
    (value head dim differs from the query's), "unsupported_dtype".
    ``varlen``: the call ran :func:`flex_prefill_attention_varlen` on the packed valid rows
    (padding and/or a cached prefix); ``lengths``: then the ``(n_q, n_k)`` of each packed
    sequence (batch elements with at least one valid query, in batch order).
    ``stats``: :class:`PatternStats` of a FlexPrefill call when stats collection is on (per
    packed sequence and head when ``varlen``).
    ``sink``: the layer's attention-sink logits (``s_aux``) joined each row's softmax on the fast
    path (exactly, from the operator's log-sum-exp).  ``exact``: "sdpa" or "eager" on the dense path.
    ``softcap``: the logit soft-cap the call's scores took (``softcap * tanh(s / softcap)``, Gemma 2),
    on whichever path ran (a dense one is then the model's eager: SDPA cannot cap); None without one.
    """

    path: str
    reason: str
    q_len: int
    k_len: int
    stats: PatternStats | None = None
    varlen: bool = False
    lengths: tuple | None = None
    sink: bool = False
    exact: str = ""
    softcap: float | None = None


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


# --- reading a materialised mask ------------------------------------------------------

# elements of the mask compared per step of the check (bounds its temporaries)
_CHECK_ELEMS = 1 << 24
# an additive float mask must be 0 where allowed and below this where not (exp underflows)
_MASKED_BELOW = -1e4


@dataclass(eq=False)
class _Layout:
    """What a materialised mask ``[B or 1, Hq or 1, n, K]`` means for the operator.

    ``reason`` is "" when the mask is exactly causal + padding; then ``plain`` says it is
    the plain causal mask over ``n == K`` keys (the batched operator needs no packing), and
    ``seqs`` lists ``(b, r0, r1, s, e)`` per batch element with a valid query: query rows
    ``[r0, r1)`` over key rows ``[s, e)``, bottom-right causal.
    """

    batch: int
    n: int
    k: int
    reason: str = ""
    plain: bool = False
    seqs: tuple = ()
    _packed: dict = field(default_factory=dict)

    @property
    def max_q(self) -> int:
        return max(r1 - r0 for _, r0, r1, _, _ in self.seqs)

    @property
    def max_k(self) -> int:
        return max(e - s for _, _, _, s, e in self.seqs)

    def packing(self, device):
        """Gather indices and cu_seqlens of the valid rows on ``device`` (built once)."""
        got = self._packed.get(device)
        if got is None:
            qb, qi, kb, kj, cu_q, cu_k = [], [], [], [], [0], [0]
            for b, r0, r1, s, e in self.seqs:
                qb.append(torch.full((r1 - r0,), b, dtype=torch.long))
                qi.append(torch.arange(r0, r1))
                kb.append(torch.full((e - s,), b, dtype=torch.long))
                kj.append(torch.arange(s, e))
                cu_q.append(cu_q[-1] + r1 - r0)
                cu_k.append(cu_k[-1] + e - s)
            idx = [torch.cat(t).to(device) for t in (qb, qi, kb, kj)]
            cus = [torch.tensor(c, dtype=torch.int32).to(device) for c in (cu_q, cu_k)]
            got = self._packed[device] = (*idx, *cus)
        return got


# the last analysed masks: (weak reference, its version counter, call shape and window,
# layout), most recent last; every layer of a forward gets the same mask tensor (one per
# layer type: full and sliding), so the host copy happens once per mask and forward
_MEMO: list = []
_MEMO_SIZE = 4


def _version(t: torch.Tensor) -> int:
    """The in-place version counter; inference tensors (``torch.inference_mode``) have none,
    and there the memo relies on the tensor's identity alone (transformers builds a new mask
    tensor for every forward)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _allowed(m: torch.Tensor) -> torch.Tensor:
    return m if m.dtype == torch.bool else m == 0


def _analyse_mask(mask: torch.Tensor, batch: int, heads: int, n: int, k: int, window: int | None = None) -> _Layout:
    """Fit ``allowed(b, i, j) = s_b <= j < e_b and j <= i + off_b`` (and ``j > i + off_b - window``
    with a sliding window) to the mask and check every entry against it (one device-to-host
    copy of 3 ints per element)."""
    lay = _Layout(batch, n, k)
    if (
        mask.dim() != 4
        or tuple(mask.shape[-2:]) != (n, k)
        or mask.shape[0] not in (1, batch)
        or mask.shape[1] not in (1, heads)
        or not (mask.dtype == torch.bool or mask.is_floating_point())
    ):
        lay.reason = "custom_mask"
        return lay
    bm, hm = mask.shape[:2]
    dev = mask.device
    ar_k = torch.arange(k, device=dev)
    if window is None:
        # the last query row sees [s, e) in every causal + padding mask (valid or right-padding row)
        seen = _allowed(mask[:, 0, n - 1, :])  # [bm, K]
    else:
        # with a window no single row sees them all: the keys any row sees
        seen = _allowed(mask[:, 0]).any(1)  # [bm, K]
    nonempty = seen.any(-1)
    s = torch.where(seen, ar_k, k).amin(-1)
    e = torch.where(seen, ar_k + 1, 0).amax(-1)
    # the first row that sees key e-1 is the last valid query row r1-1, so off = e - r1
    col_idx = (e - 1).clamp_min(0)[:, None, None].expand(bm, n, 1)
    col = _allowed(mask[:, 0].gather(2, col_idx).squeeze(-1))  # [bm, n]
    first_row = torch.where(col, torch.arange(n, device=dev), n).amin(-1)
    off = e - 1 - first_row
    zero = torch.zeros_like(s)
    s, e, off = (torch.where(nonempty, t, zero) for t in (s, e, off))  # an empty element: nothing allowed

    ok = torch.ones((), dtype=torch.bool, device=dev)
    rows = max(1, _CHECK_ELEMS // max(1, bm * hm * k))
    sv, ev, ov = s[:, None, None, None], e[:, None, None, None], off[:, None, None, None]
    jv = ar_k[None, None, None, :]
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        iv = torch.arange(i0, i1, device=dev)[None, None, :, None]
        want = (jv >= sv) & (jv < ev) & (jv <= iv + ov)  # [bm, 1, rows, K]
        if window is not None:
            want &= jv > iv + ov - window
        blk = mask[:, :, i0:i1]
        ok &= (_allowed(blk) == want).all()
        if blk.dtype != torch.bool:
            ok &= ((blk == 0) | (blk < _MASKED_BELOW)).all()
    vals = torch.cat([ok.long()[None], s.long(), e.long(), off.long()]).tolist()  # the one host sync
    if not vals[0]:
        lay.reason = "custom_mask"
        return lay
    s_l, e_l, off_l = vals[1 : 1 + bm], vals[1 + bm : 1 + 2 * bm], vals[1 + 2 * bm :]
    seqs = []
    for b in range(batch):
        sb, eb, ob = (t[b if bm > 1 else 0] for t in (s_l, e_l, off_l))
        if eb <= sb:
            continue  # every row masked: all padding, output zeros
        r0, r1 = max(0, sb - ob), eb - ob
        if not (0 <= sb < eb <= k and 0 <= r0 < r1 <= n and r1 - r0 <= eb - sb):
            lay.reason = "custom_mask"  # cannot happen for a mask that passed the check; stay exact
            return lay
        seqs.append((b, r0, r1, sb, eb))
    if not seqs:
        lay.reason = "custom_mask"  # nothing valid at all: leave it to SDPA
        return lay
    lay.seqs = tuple(seqs)
    lay.plain = n == k and len(seqs) == batch and all(x[1:] == (0, n, 0, n) for x in seqs)
    return lay


def _layout(mask: torch.Tensor, batch: int, heads: int, n: int, k: int, window: int | None = None) -> _Layout:
    key = (batch, heads, n, k, window)
    for i, (ref, version, shape, lay) in enumerate(_MEMO):
        if ref() is mask and version == _version(mask) and shape == key:
            _MEMO.append(_MEMO.pop(i))
            return lay
    lay = _analyse_mask(mask, batch, heads, n, k, window)
    _MEMO.append((weakref.ref(mask), _version(mask), key, lay))
    del _MEMO[:-_MEMO_SIZE]
    return lay


def _window_unsupported(query, key, value, window, cfg) -> bool:
    """True when the windowed kernel cannot take this call whatever the mask: CPU without
    ``backend="triton"`` (the interpreter, in tests), a head dim or dtype it does not run."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        return True
    if not (query.is_cuda or (cfg.backend == "triton" and interpreting())):
        return True
    D = query.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS or key.shape[-1] != D or value.shape[-1] != D:
        return True
    return query.is_cuda and query.dtype not in (torch.float16, torch.bfloat16)


def _sink_scaled(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """``out [..., H, D]`` renormalised as if the sink logit ``sink [H]`` were one more key of every
    row's softmax (attention sinks: GPT-OSS's ``s_aux``), from the row's ``lse [..., H]`` (natural log,
    fp32).  With ``L = log sum_j exp(x_j)`` the sink softmax gives key ``j`` the weight
    ``exp(x_j) / (exp(L) + exp(s)) = softmax_j * exp(L) / (exp(L) + exp(s))``, so
    ``out_sink = out * sigmoid(L - s)``: exact, no kernel change.  A row that sees no key
    (``L = -inf``) gives zeros, as eager's softmax puts all its mass on the sink."""
    if sink is None:
        return out
    scale = torch.sigmoid(lse.float() - sink.float().to(lse.device))
    return (out.float() * scale[..., None]).to(out.dtype)


def _sliding(module, query, key, value, attention_mask, window, cfg, scale, dense, sink, softcap=None):
    """A sliding-window layer: the exact windowed kernel where the mask is a causal window
    (plain, padded or over a cached prefix), the exact path otherwise."""
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None or _window_unsupported(query, key, value, window, cfg):
        # no mask: transformers found the window does not bind, SDPA's causal path is exact
        return dense("sliding_window")
    B = query.shape[0]
    lazy = _lazy(attention_mask)
    if lazy is not None:
        if not (lazy["window"] == window and lazy["n"] == q_len == k_len and lazy["batch"] == B):
            return dense("sliding_window")
        plain = True
    else:
        lay = _layout(attention_mask, B, query.shape[1], q_len, k_len, window=window)
        if lay.reason:
            return dense("sliding_window")
        plain = lay.plain
    want_lse = sink is not None
    if plain:
        res = sliding_window_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), window=window, softmax_scale=scale,
            return_lse=want_lse, backend="triton", softcap=softcap,
        )
        out = _sink_scaled(res[0], res[1].transpose(1, 2), sink) if want_lse else res
        _record(module, LayerRecord("window", "", q_len, k_len, sink=want_lse, softcap=softcap))
        return out, None
    qb, qi, kb, kj, cu_q, cu_k = lay.packing(query.device)
    res = sliding_window_attention_varlen(
        query[qb, :, qi], key[kb, :, kj], value[kb, :, kj], cu_q, cu_k, lay.max_q, lay.max_k,
        window=window, softmax_scale=scale, return_lse=want_lse, backend="triton", softcap=softcap,
    )
    op = _sink_scaled(res[0], res[1].t(), sink) if want_lse else res
    out = query.new_zeros(B, q_len, query.shape[1], query.shape[-1])
    out[qb, qi] = op
    lens = tuple((r1 - r0, e - s) for _, r0, r1, s, e in lay.seqs)
    _record(module, LayerRecord("window", "", q_len, k_len, varlen=True, lengths=lens, sink=want_lse, softcap=softcap))
    return out, None


# layer types (``config.layer_types``) whose attention is causal, restricted only by what the mask says
_FULL_TYPES = ("full_attention", "chunked_attention")


def _layer_kind(module, layer_idx, kwargs, mask=None) -> tuple[str, int | None]:
    """What kind of layer this call is, as transformers decides it: ``("sliding_attention", window)``,
    ``("full_attention", None)`` or ``(another layer type, None)``.

    The model's own ``sliding_window=`` argument wins (it is the value of this very layer, None
    on full layers: Exaone 4 keeps ``module.sliding_window`` on every layer and passes it only on
    its local ones), then the placeholder mask of a plain windowed prefill, then
    ``config.layer_types[layer_idx]``, then a ``sliding_window`` attribute of the module.  Every
    decision is checked against the materialised mask before a fast path runs, so a wrong guess
    costs speed, never exactness."""
    lazy = _lazy(mask)
    if lazy is not None:
        return "sliding_attention", lazy["window"]
    types = getattr(getattr(module, "config", None), "layer_types", None)
    layer_type = None
    if types is not None and isinstance(layer_idx, int) and 0 <= layer_idx < len(types):
        layer_type = types[layer_idx]
    if "sliding_window" in kwargs:
        if kwargs["sliding_window"] is not None:
            return "sliding_attention", kwargs["sliding_window"]
        if layer_type in (None, "sliding_attention"):
            return "full_attention", None
        return layer_type, None
    if layer_type == "sliding_attention":
        window = getattr(module, "sliding_window", None) or getattr(module.config, "sliding_window", None)
        return layer_type, window
    if layer_type is not None:
        return layer_type, None
    window = getattr(module, "sliding_window", None)
    return ("sliding_attention", window) if window is not None else ("full_attention", None)


def _is_sliding(module, layer_idx, kwargs) -> bool:
    return _layer_kind(module, layer_idx, kwargs)[0] == "sliding_attention"


# --- the one rule for transformers' keyword arguments ----------------------------------
#
# Every keyword argument a transformers model passes to its attention function is honoured
# exactly on every path, or it sends the call to an exact path (transformers' own SDPA or the
# model's own eager function); :func:`_triage` is the only place that decides.

# honoured by every path of this module (see attention_forward; ``softcap`` a positive number)
_HONOURED = frozenset({"is_causal", "sliding_window", "s_aux", "sinks", "softcap"})
# no effect on the attention math: bookkeeping of the model's forward, or facts the mask
# already encodes (positions; transformers' SDPA ignores them too)
_INERT = frozenset({
    "position_ids", "use_cache", "cache_position", "output_hidden_states", "return_dict",
    "output_router_logits", "encoder_hidden_states", "encoder_attention_mask", "deterministic",
    "past_key_values", "cache", "layer_past", "position_embeddings", "logits_to_keep",
})
# exact on transformers' SDPA (which honours position_bias; packing metadata of FlashAttention
# kernels that SDPA ignores as the mask carries the packing)
_EXACT_SDPA = frozenset({"position_bias", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})
# exact only on the model's eager function: attention weights asked for
_EXACT_EAGER = frozenset({"output_attentions"})
# a top-k indexer's keys (DeepSeek V3.2): folded into the mask as transformers does for SDPA
_INDEX = "indices"


def _set(value) -> bool:
    """transformers passes None (or False) for a feature that is off."""
    return value is not None and value is not False


def _triage(kwargs: dict, dropout) -> tuple[str, str, tuple]:
    """``(reason, executor, names)``: ``("", "", ())`` when the fast paths honour every argument,
    else why the call runs exact, on which executor ("sdpa" or "eager") and which arguments."""
    eager = [k for k, v in kwargs.items() if k in _EXACT_EAGER and _set(v)]
    unknown = [
        k for k, v in kwargs.items()
        if k not in _HONOURED and k not in _INERT and k not in _EXACT_SDPA and k not in _EXACT_EAGER
        and k != _INDEX and v is not None
    ]
    if unknown:
        return "unknown_kwarg:" + ",".join(sorted(unknown)), "eager", tuple(sorted(unknown))
    if eager:
        return eager[0], "eager", tuple(eager)
    if _set(kwargs.get(_INDEX)):
        return "indices", "sdpa", (_INDEX,)
    sdpa = [k for k, v in kwargs.items() if k in _EXACT_SDPA and _set(v)]
    if sdpa:
        return ("position_bias" if "position_bias" in sdpa else "packed"), "sdpa", tuple(sdpa)
    if dropout:
        return "dropout", "sdpa", ("dropout",)
    return "", "", ()


def _exact_message(module, reason, names, executor) -> str:
    what = {
        "softcap": "passes a softcap that is not a positive number",
        "indices": "restricts attention to an indexer's top-k keys (indices); FlexPrefill does not combine with it",
        "output_attentions": "asks for attention weights (output_attentions)",
        "position_bias": "adds a position bias (position_bias)",
        "packed": f"passes packed-sequence metadata ({', '.join(names)})",
    }.get(reason, f"passes {', '.join(names)}, which flexprefill does not know")
    return (
        f"{type(module).__name__} (layer {getattr(module, 'layer_idx', None)}) {what}; these calls run "
        f"exact {executor} attention as transformers does"
    )


def _sink(kwargs: dict) -> torch.Tensor | None:
    """The per-head sink logits ``[Hq]`` of ``s_aux`` / ``sinks``, or None."""
    for name in ("s_aux", "sinks"):
        s = kwargs.get(name)
        if s is not None:
            return s
    return None


def _softcap(kwargs: dict):
    """The logit soft-cap a call passes: ``(value or None, ok)``; ``ok`` is False for a value the
    operator does not take (not a finite positive Python number), which then runs eager."""
    cap = kwargs.get("softcap")
    if cap is None:
        return None, True
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (math.isfinite(cap) and cap > 0):
        return None, False
    return float(cap), True


def _sink_fits(sink, heads: int) -> bool:
    return isinstance(sink, torch.Tensor) and sink.numel() == heads and sink.dim() <= 1


def _eager_function(module):
    """The model's own ``eager_attention_forward`` (what ``attn_implementation="eager"`` runs)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _eager_mask(mask, query, key, is_causal):
    """The additive float mask transformers' eager attention takes, for SDPA's mask ``mask``:
    0 where allowed, ``finfo.min`` elsewhere (a row that sees nothing stays finite, as in eager);
    None becomes SDPA's ``is_causal`` (top-left) where it applies."""
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None:
        if not (is_causal and q_len > 1):
            return None
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()[None, None]
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


def _fold_indices(mask, indices, query, key, is_causal):
    """The mask restricted to the top-k keys ``indices [B, n, topk]`` of an indexer, as
    transformers builds it for eager and SDPA (DeepSeek V3.2); negative entries select nothing."""
    B, _, q_len, k_len = *query.shape[:3], key.shape[2]
    if (
        not isinstance(indices, torch.Tensor) or indices.dim() != 3 or indices.shape[:2] not in ((B, q_len), (1, q_len))
        or indices.dtype.is_floating_point
    ):
        raise NotImplementedError(
            f"flexprefill: indices of shape {tuple(getattr(indices, 'shape', ()))} (expected top-k key ids "
            f"[B={B}, n={q_len}, topk]); run this model with attn_implementation='sdpa' or 'eager'"
        )
    idx = indices.long()
    idx = torch.where(idx < 0, k_len, idx)
    keep = torch.zeros(*idx.shape[:2], k_len + 1, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)
    keep = keep[..., :k_len].unsqueeze(1)  # [B, 1, n, K]
    if mask is None:
        if is_causal and q_len > 1:
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=idx.device).tril()[None, None]
        else:
            return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def _exact(module, query, key, value, attention_mask, reason, kwargs, *, dropout, scaling, executor="sdpa"):
    """The call as transformers itself runs it: its SDPA function, or the model's own eager
    function where SDPA would drop an argument (sinks, soft-capping, attention weights, anything
    this module does not know)."""
    if any(_set(kwargs.get(k)) for k in ("s_aux", "sinks", "softcap")):
        executor = "eager"  # SDPA would drop the sink, and refuses softcap
    cap = kwargs.get("softcap")
    cap = float(cap) if isinstance(cap, (int, float)) and not isinstance(cap, bool) else None
    _record(module, LayerRecord("dense", reason, query.shape[2], key.shape[2], exact=executor, softcap=cap))
    mask = _real_mask(attention_mask)
    kwargs = dict(kwargs)
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if _set(kwargs.get(_INDEX)):
        mask = _fold_indices(mask, kwargs[_INDEX], query, key, is_causal)
    kwargs.pop(_INDEX, None)
    if executor == "eager":
        eager = _eager_function(module)
        if eager is None:
            raise NotImplementedError(
                f"flexprefill: {type(module).__name__} (layer {getattr(module, 'layer_idx', None)}) needs its "
                f"eager attention for {reason!r} and its module defines no eager_attention_forward; "
                "run it with attn_implementation='eager'"
            )
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        kwargs.pop("is_causal", None)
        return eager(
            module, query, key, value, _eager_mask(mask, query, key, is_causal), dropout=dropout, scaling=scaling,
            **kwargs,
        )
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _record(module, rec: LayerRecord) -> None:
    setattr(module, _LAST, rec)
    if rec.q_len > 1:
        setattr(module, _LAST_PREFILL, rec)


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
    """transformers attention function: FlexPrefill for a long causal prefill (padded or over a
    cached prefix too, see the module docstring), exact attention otherwise.

    Args:
        query: [B, Hq, n, D]; key, value: [B, Hkv, K, D] (GQA by head index), ``K >= n``.
        attention_mask: None (plain causal, decode or an empty static cache) or the mask
            ``sdpa_mask`` built (boolean), or a 4D mask the caller passed (bool or additive).
        scaling: softmax scale (default ``1/sqrt(D)``).
        kwargs: what the model passes; each is honoured exactly or sends the call to an exact
            path (see :func:`_triage`), with a one-time warning naming it.

    Returns:
        ``(out [B, N, Hq, D], None)`` (the eager path returns its attention weights).
    """
    state: _PatchState | None = getattr(module, _STATE, None)
    cfg = (state.config if state is not None else None) or _DEFAULT_CONFIG
    layer_idx = getattr(module, "layer_idx", None)
    q_len, k_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal

    def dense(reason, executor="sdpa"):
        return _exact(
            module, query, key, value, attention_mask, reason, kwargs, dropout=dropout, scaling=scaling,
            executor=executor,
        )

    reason, executor, names = _triage(kwargs, dropout)
    if reason:
        if reason != "dropout":
            _warn_once(",".join(names), _exact_message(module, reason, names, executor))
        return dense(reason, executor)
    sink = _sink(kwargs)
    if sink is not None and not _sink_fits(sink, query.shape[1]):
        _warn_once("sink_shape", f"attention sinks of shape {tuple(sink.shape)} (expected [{query.shape[1]}]); exact eager runs")
        return dense("sinks", "eager")
    softcap, cap_ok = _softcap(kwargs)
    if not cap_ok:
        _warn_once("softcap_value", f"softcap={kwargs['softcap']!r} is not a positive number; exact eager runs")
        return dense("softcap", "eager")
    if "softcap" not in kwargs and getattr(module, "attn_logit_softcapping", None) is not None:
        # the module has a cap but its forward does not pass it (Gemma 3's attribute): every
        # attention implementation of transformers, eager included, takes the cap from the
        # argument only, so the model runs uncapped, and so does FlexPrefill
        _warn_once(
            "softcap_attr",
            f"layer {layer_idx} has attn_logit_softcapping={module.attn_logit_softcapping} but does not pass it "
            "to the attention function; transformers' attention does not apply it, so flexprefill does not either",
        )

    if not is_causal:
        return dense("not_causal")
    if q_len == 1:
        return dense("decode")
    kind, window = _layer_kind(module, layer_idx, kwargs, attention_mask)
    if kind == "sliding_attention":
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return _sliding(module, query, key, value, attention_mask, window, cfg, scale, dense, sink, softcap)
    if kind not in _FULL_TYPES:
        _warn_once(f"layer_type:{kind}", f"layer type {kind!r} is not causal attention FlexPrefill knows; exact attention runs")
        return dense(f"layer_type:{kind}")
    if state is not None and state.layers is not None and layer_idx not in state.layers:
        return dense("layer_not_selected")
    # query [B, Hq, N, D], key [B, Hkv, N, D]
    min_seq_len = cfg.min_seq_len_for(head_dim=query.shape[-1], q_heads=query.shape[1], kv_heads=key.shape[1],
                                      device=query.device)
    # no sequence can be longer than the keys there are: short without reading any mask
    if (q_len if attention_mask is None else k_len) < min_seq_len:
        return dense("short")
    B = query.shape[0]
    lay = None
    if attention_mask is None:
        # SDPA's is_causal is top-left: with a longer key (an empty static cache) only the
        # first q_len keys take part, as sdpa_attention_forward slices them; a chunked layer
        # without a mask is one whose chunk does not bind (transformers materialises it otherwise)
        min_k = q_len
    else:
        lay = _layout(attention_mask, B, query.shape[1], q_len, k_len)
        if lay.reason:
            return dense("chunked_attention" if kind == "chunked_attention" else lay.reason)
        min_k = q_len if lay.plain else lay.max_k
        if lay.plain:
            lay = None
    if min_k < min_seq_len:
        return dense("short")
    D, Dv = query.shape[-1], value.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS or key.shape[-1] != D:
        _warn_once(
            f"head_dim{D}", f"query/key head dim {D} is not supported (accepted: {SUPPORTED_HEAD_DIMS}); exact attention runs"
        )
        return dense("unsupported_head_dim")
    if Dv != D:
        _warn_once(
            f"value_head_dim{Dv}-{D}",
            f"value head dim {Dv} differs from the query/key head dim {D} (the kernels need them equal); "
            "exact attention runs",
        )
        return dense("unsupported_value_head_dim")
    if query.is_cuda and query.dtype not in (torch.float16, torch.bfloat16):
        _warn_once(f"dtype{query.dtype}", f"{query.dtype} on CUDA is not supported (fp16/bf16); exact attention runs")
        return dense("unsupported_dtype")

    scale = scaling if scaling is not None else D**-0.5
    collect = state.collect_stats if state is not None else _DEFAULT_COLLECT
    selector = state.selector if state is not None else None
    # the pattern search ignores a sink: it adds the same term to every row's denominator, so
    # it rescales all key masses of a row alike and leaves which blocks reach gamma unchanged
    want_lse = sink is not None
    stats = None
    if lay is not None:
        if selector is not None:
            return dense("selector_varlen")
        qb, qi, kb, kj, cu_q, cu_k = lay.packing(query.device)
        # [B, H, N, D] indexed at (b, :, i): the advanced dims go first -> [total, H, D]
        qp, kp, vp = query[qb, :, qi], key[kb, :, kj], value[kb, :, kj]
        res = flex_prefill_attention_varlen(
            qp, kp, vp, cu_q, cu_k, lay.max_q, lay.max_k, config=cfg, softmax_scale=scale,
            return_lse=want_lse, return_stats=collect, softcap=softcap,
        )
        res = res if isinstance(res, tuple) else (res,)
        op = _sink_scaled(res[0], res[1].t(), sink) if want_lse else res[0]
        stats = res[-1] if collect else None
        out = query.new_zeros(B, q_len, query.shape[1], D)
        out[qb, qi] = op
        lens = tuple((r1 - r0, e - s) for _, r0, r1, s, e in lay.seqs)
        _record(module, LayerRecord("flexprefill", "", q_len, k_len, stats, varlen=True, lengths=lens, sink=want_lse,
                                    softcap=softcap))
        return out, None

    if k_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if selector is not None:
        sel = selector(q, k, config=cfg, softmax_scale=scale)
        if too_dense(sel.counts, cfg):
            # as the operator does with dense_above: this selection would not pay
            return dense("dense_above")
        res = block_sparse_attention(q, k, v, sel, softmax_scale=scale, return_lse=want_lse, backend=cfg.backend,
                                     softcap=softcap)
        if collect:
            stats = sel.stats()
    else:
        res = flex_prefill_attention(q, k, v, config=cfg, softmax_scale=scale, return_lse=want_lse, return_stats=collect,
                                     softcap=softcap)
        if collect:
            res, stats = (res[:-1], res[-1]) if want_lse else (res[0], res[1])
    out = _sink_scaled(res[0], res[1].transpose(1, 2), sink) if want_lse else res
    _record(module, LayerRecord("flexprefill", "", q_len, k_len, stats, sink=want_lse, softcap=softcap))
    return out, None


# attribute of the placeholder mask that stands for a plain causal sliding window
_LAZY = "_flexprefill_window"


def flexprefill_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    config=None,
    **kwargs,
):
    """transformers mask function of ``"flexprefill"``: SDPA's masks, except one case.

    SDPA's masks are None whenever ``is_causal`` suffices (no N x N mask for a causal
    prefill).  A *sliding-window* mask of a plain prefill (no padding, no cached prefix, no
    extra mask functions, more queries than the window) would be a materialised N x N
    boolean tensor (1 GB at 32k tokens, 16 GB at 128k); instead this returns an empty
    placeholder tensor that records the call.  The attention function runs the exact
    windowed kernel on it, or builds the real mask (once per placeholder) where it falls
    back to SDPA.  Checking for padding reads the 2D mask's ``all()`` (one small sync).
    """
    call = dict(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
        allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap, config=config, **kwargs,
    )
    window = getattr(config, "sliding_window", None)
    plain_window = (
        local_size is not None
        and window == local_size
        and getattr(config, "attention_chunk_size", None) is None
        and getattr(config, "is_causal", True)
        and allow_is_causal_skip  # transformers turns it off for extra (or/and/packed/block) masks
        and not allow_is_bidirectional_skip
        and not use_vmap
        and q_offset == 0
        and kv_offset == 0
        and kv_length == q_length
        and q_length > local_size
        and (attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all())))
    )
    if not plain_window:
        return sdpa_mask(**call)
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
    placeholder = torch.empty(0, dtype=torch.bool, device=device)
    setattr(placeholder, _LAZY, dict(window=int(local_size), batch=batch_size, n=q_length, call=call, dense=None))
    return placeholder


def _lazy(mask) -> dict | None:
    return getattr(mask, _LAZY, None) if mask is not None else None


def _real_mask(mask):
    """``mask``, or the real SDPA mask a placeholder of :func:`flexprefill_mask` stands for (built once)."""
    lazy = _lazy(mask)
    if lazy is None:
        return mask
    if lazy["dense"] is None:
        lazy["dense"] = sdpa_mask(**lazy["call"])
    return lazy["dense"]


def register() -> None:
    """Register ``"flexprefill"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flexprefill_mask)


register()


def _attention_modules(model) -> list:
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and "Attention" in type(m).__name__ and hasattr(m, "config")
    ]


def _full_attention_layers(model) -> list[int]:
    """Indices of the model's full-attention layers (not sliding-window): where FlexPrefill runs."""
    return [m.layer_idx for m in _attention_modules(model) if not _is_sliding(m, m.layer_idx, {})]


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


@contextlib.contextmanager
def patched(model, config: FlexPrefillConfig | None = None, **kwargs):
    """:func:`patch` for the body of a ``with`` block (keyword arguments as there),
    :func:`unpatch` when it ends, also on an error."""
    patch(model, config, **kwargs)
    try:
        yield model
    finally:
        unpatch(model)


def _keyed_modules(model) -> list:
    """``(key, module)`` of every attention module: the key is ``layer_idx`` where those are
    unique (decoder-only models), else the module's name in the model (``"encoder.block.0.layer.0.
    SelfAttention"``): encoder self-, decoder self- and cross-attention share layer indices."""
    mods = _attention_modules(model)
    idx = [m.layer_idx for m in mods]
    if None not in idx and len(set(idx)) == len(idx):
        return list(zip(idx, mods))
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(m)], m) for m in mods]


def last_record(model, *, prefill: bool = False) -> dict:
    """Per attention layer, what its last attention call did (path, reason, lengths, stats if
    collected); keyed by layer index, or by module name where layer indices repeat (encoder-decoder
    models).

    ``prefill=True``: the last call with more than one query instead (decode steps skipped).
    """
    attr = _LAST_PREFILL if prefill else _LAST
    out = {}
    for key, m in _keyed_modules(model):
        rec = getattr(m, attr, None)
        if rec is not None:
            out[key] = rec
    return out


def last_stats(model) -> dict:
    """:class:`PatternStats` of the layers that ran FlexPrefill in the last prefill (call with more
    than one query; later decode steps do not clear it), keyed as :func:`last_record`.  Empty unless
    stats collection is on (``patch(..., collect_stats=True)`` or
    ``set_default_config(..., collect_stats=True)``)."""
    out = {}
    for key, m in _keyed_modules(model):
        rec = getattr(m, _LAST_PREFILL, None)
        if rec is not None and rec.stats is not None:
            out[key] = rec.stats
    return out


def clear_records(model) -> None:
    for m in _attention_modules(model):
        for attr in (_LAST, _LAST_PREFILL):
            if attr in m.__dict__:
                delattr(m, attr)
