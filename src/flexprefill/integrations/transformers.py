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

Everything else is handed to transformers' SDPA function unchanged (or to an exact eager
path when the layer soft-caps its logits, which SDPA cannot do); :class:`LayerRecord`
says which path ran and why.

Layout adapter: transformers gives ``query [B, Hq, n, D]`` and ``key, value [B, Hkv, K, D]``
(not repeated for GQA) and wants ``out [B, n, Hq, D]``; the operator takes ``[B, N, H, D]``
or packed ``[total, H, D]``.
"""

from __future__ import annotations

import contextlib
import math
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
    O(N * window) work, no approximation) or "dense" (transformers' SDPA, or exact eager for
    soft-capping).
    ``reason``: why it was dense ("" for flexprefill): "decode" (one query), "short" (every
    sequence has fewer than ``min_seq_len`` keys), "custom_mask" (a mask that is not exactly
    causal + padding), "sliding_window" (a sliding layer the windowed kernel does not take:
    the CPU, a mask that is not causal window + padding, or no mask because the window does
    not bind), "layer_not_selected", "not_causal", "dropout",
    "position_bias", "dense_above" (a custom selector's blocks were denser than
    ``config.dense_above``; without a selector the operator decides and ``stats.dense`` says
    so), "selector_varlen" (a custom selector, which takes a plain batch only,
    on a padded or cached-prefix call), "unsupported_head_dim", "unsupported_dtype", "softcap".
    ``varlen``: the call ran :func:`flex_prefill_attention_varlen` on the packed valid rows
    (padding and/or a cached prefix); ``lengths``: then the ``(n_q, n_k)`` of each packed
    sequence (batch elements with at least one valid query, in batch order).
    ``stats``: :class:`PatternStats` of a FlexPrefill call when stats collection is on (per
    packed sequence and head when ``varlen``).
    """

    path: str
    reason: str
    q_len: int
    k_len: int
    stats: PatternStats | None = None
    varlen: bool = False
    lengths: tuple | None = None


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


def _sliding(module, query, key, value, attention_mask, window, cfg, scale, dense):
    """A sliding-window layer: the exact windowed kernel where the mask is a causal window
    (plain, padded or over a cached prefix), SDPA otherwise."""
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
    if plain:
        out = sliding_window_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), window=window, softmax_scale=scale,
            backend="triton",
        )
        _record(module, LayerRecord("window", "", q_len, k_len))
        return out, None
    qb, qi, kb, kj, cu_q, cu_k = lay.packing(query.device)
    op = sliding_window_attention_varlen(
        query[qb, :, qi], key[kb, :, kj], value[kb, :, kj], cu_q, cu_k, lay.max_q, lay.max_k,
        window=window, softmax_scale=scale, backend="triton",
    )
    out = query.new_zeros(B, q_len, query.shape[1], query.shape[-1])
    out[qb, qi] = op
    lens = tuple((r1 - r0, e - s) for _, r0, r1, s, e in lay.seqs)
    _record(module, LayerRecord("window", "", q_len, k_len, varlen=True, lengths=lens))
    return out, None


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
    attention_mask = _real_mask(attention_mask)
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
    """transformers attention function: FlexPrefill for a long causal prefill (padded or over a
    cached prefix too, see the module docstring), SDPA otherwise.

    Args:
        query: [B, Hq, n, D]; key, value: [B, Hkv, K, D] (GQA by head index), ``K >= n``.
        attention_mask: None (plain causal, decode or an empty static cache) or the mask
            ``sdpa_mask`` built (boolean), or a 4D mask the caller passed (bool or additive).
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
        return _softcap_eager(module, query, key, value, _real_mask(attention_mask), scaling, softcap, is_causal)
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
    if _is_sliding(module, layer_idx, kwargs):
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return _sliding(module, query, key, value, attention_mask, window, cfg, scale, dense)
    if state is not None and state.layers is not None and layer_idx not in state.layers:
        return dense("layer_not_selected")
    if dropout and module.training:
        return dense("dropout")
    if kwargs.get("position_bias") is not None:
        return dense("position_bias")
    # no sequence can be longer than the keys there are: short without reading any mask
    if (q_len if attention_mask is None else k_len) < cfg.min_seq_len:
        return dense("short")
    B = query.shape[0]
    lay = None
    if attention_mask is None:
        # SDPA's is_causal is top-left: with a longer key (an empty static cache) only the
        # first q_len keys take part, as sdpa_attention_forward slices them
        min_k = q_len
    else:
        lay = _layout(attention_mask, B, query.shape[1], q_len, k_len)
        if lay.reason:
            return dense(lay.reason)
        min_k = q_len if lay.plain else lay.max_k
        if lay.plain:
            lay = None
    if min_k < cfg.min_seq_len:
        return dense("short")
    D = query.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS or key.shape[-1] != D or value.shape[-1] != D:
        _warn_once(f"head_dim{D}", f"head dim {D} is not supported (accepted: {SUPPORTED_HEAD_DIMS}); dense SDPA runs")
        return dense("unsupported_head_dim")
    if query.is_cuda and query.dtype not in (torch.float16, torch.bfloat16):
        _warn_once(f"dtype{query.dtype}", f"{query.dtype} on CUDA is not supported (fp16/bf16); dense SDPA runs")
        return dense("unsupported_dtype")

    scale = scaling if scaling is not None else D**-0.5
    collect = state.collect_stats if state is not None else _DEFAULT_COLLECT
    selector = state.selector if state is not None else None
    stats = None
    if lay is not None:
        if selector is not None:
            return dense("selector_varlen")
        qb, qi, kb, kj, cu_q, cu_k = lay.packing(query.device)
        # [B, H, N, D] indexed at (b, :, i): the advanced dims go first -> [total, H, D]
        qp, kp, vp = query[qb, :, qi], key[kb, :, kj], value[kb, :, kj]
        res = flex_prefill_attention_varlen(
            qp, kp, vp, cu_q, cu_k, lay.max_q, lay.max_k, config=cfg, softmax_scale=scale, return_stats=collect
        )
        op, stats = res if collect else (res, None)
        out = query.new_zeros(B, q_len, query.shape[1], D)
        out[qb, qi] = op
        lens = tuple((r1 - r0, e - s) for _, r0, r1, s, e in lay.seqs)
        _record(module, LayerRecord("flexprefill", "", q_len, k_len, stats, varlen=True, lengths=lens))
        return out, None

    if k_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if selector is not None:
        sel = selector(q, k, config=cfg, softmax_scale=scale)
        if too_dense(sel.counts, cfg):
            # as the operator does with dense_above: this selection would not pay
            return dense("dense_above")
        out = block_sparse_attention(q, k, v, sel, softmax_scale=scale, backend=cfg.backend)
        if collect:
            stats = sel.stats()
    elif collect:
        out, stats = flex_prefill_attention(q, k, v, config=cfg, softmax_scale=scale, return_stats=True)
    else:
        out = flex_prefill_attention(q, k, v, config=cfg, softmax_scale=scale)
    _record(module, LayerRecord("flexprefill", "", q_len, k_len, stats))
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
