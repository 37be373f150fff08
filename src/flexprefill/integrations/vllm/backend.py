"""The vLLM attention backend: vLLM's FlashAttention backend with long prefill chunks replaced.

* :class:`FlexPrefillMetadataBuilder` builds FlashAttention's metadata as vLLM does and, when
  a step holds prefill chunks whose context reaches ``min_seq_len``, plans them on the host
  (:func:`plan.plan_step`, no device sync) and builds a second FlashAttention metadata in
  which those requests have no keys.
* :class:`FlexPrefillImpl` runs FlashAttention's ``forward`` unchanged on a step without
  sparse chunks and on every layer that cannot run FlexPrefill exactly (sliding window,
  ALiBi, soft-cap, sinks, quantized KV cache, head sizes the kernels do not take, encoder or
  cross attention, layers outside ``layers``).  On the other layers it runs FlashAttention
  over the other requests (the sparse ones see no keys, so FlashAttention writes nothing
  but zeros there) and then FlexPrefill over the sparse chunks, whose rows it overwrites.

The FlexPrefill path runs in eager mode only: full CUDA graphs are limited to uniform decode
batches (:meth:`FlexPrefillMetadataBuilder.get_cudagraph_support`), which hold no prefill
chunk, and vLLM's torch.compile treats attention as one opaque op, so the Python branch
here runs between the captured pieces.  Under a graph capture it runs FlashAttention only.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from ...api import SUPPORTED_HEAD_DIMS
from ...options import use_options
from .attention import sparse_prefill_forward
from .plan import SparseBatch, plan_step, to_device
from .settings import VllmSettings, layer_index, load_settings

__all__ = ["FlexPrefillBackend", "FlexPrefillImpl", "FlexPrefillMetadata", "FlexPrefillMetadataBuilder"]

_log = logging.getLogger(__name__)
_LOGGED: set[str] = set()


def _log_once(msg: str, *args) -> None:
    key = msg % args
    if key not in _LOGGED:
        _LOGGED.add(key)
        _log.info(msg, *args)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _settings(vllm_config: VllmConfig | None) -> VllmSettings:
    return load_settings(getattr(vllm_config, "additional_config", None) if vllm_config is not None else None)


class FlexPrefillBackend(FlashAttentionBackend):
    """vLLM's FlashAttention backend whose long prefill chunks run FlexPrefill (``CUSTOM``)."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["FlexPrefillImpl"]:
        return FlexPrefillImpl

    @staticmethod
    def get_builder_cls() -> type["FlexPrefillMetadataBuilder"]:
        return FlexPrefillMetadataBuilder

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        # the sparse kernels' tile configs follow the longest chunk of the step
        return False


@dataclasses.dataclass
class FlexPrefillMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata of the whole step, plus the step's sparse chunks.

    Attributes:
        sparse: the prefill chunks that run FlexPrefill, or None (then every layer runs
            FlashAttention on the fields inherited here).
        rest: FlashAttention's metadata with the sparse requests given no keys, for the
            layers that run FlexPrefill; None when every request of the step is sparse.
    """

    sparse: SparseBatch | None = None
    rest: FlashAttentionMetadata | None = None


def _extend(md: FlashAttentionMetadata, sparse: SparseBatch | None, rest: FlashAttentionMetadata | None):
    values = {f.name: getattr(md, f.name) for f in dataclasses.fields(FlashAttentionMetadata)}
    return FlexPrefillMetadata(**values, sparse=sparse, rest=rest)


def _speculative_query_len(vllm_config: VllmConfig) -> int:
    """Query rows of a decode step: 1, or 1 + the draft tokens of speculative decoding."""
    spec = vllm_config.speculative_config
    n = getattr(spec, "num_speculative_tokens", None) if spec is not None else None
    if not n:
        return 1
    return 1 + (2 if getattr(spec, "parallel_drafting", False) else 1) * n


class FlexPrefillMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's builder, plus the plan of the step's sparse prefill chunks."""

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec) -> AttentionCGSupport:
        base = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        if not _settings(vllm_config).enabled:
            return base
        # a full graph replays the captured kernels without running forward's branch: keep
        # full graphs to uniform (decode) batches, which never hold a sparse chunk
        return base if base.value <= AttentionCGSupport.UNIFORM_BATCH.value else AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.settings = _settings(vllm_config)
        self.decode_threshold = _speculative_query_len(vllm_config)
        self._sparse_layers: bool | None = None

    def _has_sparse_layers(self) -> bool:
        """Whether a layer of this builder's group may run FlexPrefill (decided once, at the
        first build, when the layers exist)."""
        if self._sparse_layers is None:
            layers = get_layers_from_vllm_config(self.vllm_config, Attention, self.layer_names)
            self._sparse_layers = any(
                isinstance(layer.impl, FlexPrefillImpl) and layer.impl.fallback_reason(layer) is None
                for layer in layers.values()
            )
            if not self._sparse_layers:
                _log_once("flexprefill: no layer of %s can run FlexPrefill; FlashAttention runs all of them",
                          ", ".join(self.layer_names[:3]) + (" ..." if len(self.layer_names) > 3 else ""))
        return self._sparse_layers

    def _plan(self, cm: CommonAttentionMetadata):
        cfg = self.settings.config
        if not self.settings.enabled or cm.max_query_len <= self.decode_threshold or cm.max_seq_len < cfg.min_seq_len:
            return None
        if not self._has_sparse_layers():
            return None
        if cm.causal is not True or cm.mm_req_doc_ranges is not None:
            _log_once("flexprefill: a step with non-causal or bidirectional (multimodal prefix) ranges "
                      "runs FlashAttention")
            return None
        if self.dcp_world_size > 1:
            _log_once("flexprefill: decode context parallelism runs FlashAttention")
            return None
        seq_cpu = cm.seq_lens_cpu_upper_bound
        if seq_cpu is None:
            seq_cpu = cm._seq_lens_cpu
        if seq_cpu is None:
            # only reached on steps with a prefill chunk: one small copy
            seq_cpu = cm.seq_lens.cpu()
        return plan_step(cm.query_start_loc_cpu, seq_cpu, min_seq_len=cfg.min_seq_len,
                         decode_threshold=self.decode_threshold, num_reqs=cm.num_reqs)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> FlexPrefillMetadata:
        cm = common_attn_metadata
        plan = self._plan(cm)
        if plan is None:
            return _extend(super().build(common_prefix_len, cm, fast_build), None, None)
        rest = None
        if not plan.covers_batch:
            idx = torch.tensor(plan.req_idx, dtype=torch.int64).to(cm.seq_lens.device, non_blocking=True)
            seq_rest = cm.seq_lens.clone().index_fill_(0, idx, 0)
            # no cascade here: its suffix lengths would go negative for the emptied requests
            rest = super().build(0, cm.replace(seq_lens=seq_rest), fast_build)
            if rest.scheduler_metadata is not None:
                # the next build writes the builder's persistent scheduler buffer
                rest.scheduler_metadata = rest.scheduler_metadata.clone()
        md = super().build(common_prefix_len, cm, fast_build)
        return _extend(md, to_device(plan, cm.block_table_tensor), rest)

    def update_block_table(self, metadata, blk_table: torch.Tensor, slot_mapping: torch.Tensor):
        new = super().update_block_table(metadata, blk_table, slot_mapping)
        if isinstance(new, FlexPrefillMetadata):
            if new.sparse is not None:
                new.sparse = new.sparse.with_block_table(blk_table)
            if new.rest is not None:
                new.rest = super().update_block_table(new.rest, blk_table, slot_mapping)
        return new


class FlexPrefillImpl(FlashAttentionImpl):
    """FlashAttention's impl; long prefill chunks of eligible layers run FlexPrefill."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.settings = _settings(get_current_vllm_config_or_none())
        self._runs_flex: bool | None = None

    def fallback_reason(self, layer) -> str | None:
        """Why this layer runs FlashAttention on every step, or None when FlexPrefill may run."""
        if not self.settings.enabled:
            return "disabled in the settings"
        if self.attn_type != AttentionType.DECODER:
            return f"attention type {self.attn_type}"
        if self.sliding_window is not None and tuple(self.sliding_window) != (-1, -1):
            return "sliding window"
        if self.alibi_slopes is not None:
            return "ALiBi"
        if self.logits_soft_cap:
            return "logit soft-capping"
        if self.sinks is not None:
            return "attention sinks"
        if self.kv_cache_dtype not in ("auto", "float16", "bfloat16"):
            return f"KV cache dtype {self.kv_cache_dtype}"
        if self.head_size not in SUPPORTED_HEAD_DIMS:
            return f"head size {self.head_size} (FlexPrefill takes {SUPPORTED_HEAD_DIMS})"
        if getattr(layer, "head_size_v", self.head_size) != self.head_size:
            return "value head size differs from the key head size"
        if self.dcp_world_size > 1:
            return "decode context parallelism"
        if not self.settings.layer_enabled(layer_index(getattr(layer, "layer_name", ""))):
            return "not in the layers setting"
        return None

    def _flex_layer(self, layer) -> bool:
        if self._runs_flex is None:
            reason = self.fallback_reason(layer)
            self._runs_flex = reason is None
            name = getattr(layer, "layer_name", "?")
            if reason is None:
                _log_once("flexprefill: %s runs FlexPrefill on prefill chunks of >= %d context tokens", name,
                          self.settings.config.min_seq_len)
            else:
                _log_once("flexprefill: %s runs FlashAttention only (%s)", name, reason)
        return self._runs_flex

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        sparse = getattr(attn_metadata, "sparse", None)
        if (sparse is None or output_scale is not None or output_block_scale is not None
                or not self._flex_layer(layer) or _capturing(query)):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if attn_metadata.rest is not None:
            super().forward(layer, query, key, value, kv_cache, attn_metadata.rest, output)
        key_cache, value_cache = kv_cache.unbind(1)
        with use_options(**self.settings.options):
            sparse_prefill_forward(query, key_cache, value_cache, sparse, output,
                                   config=self.settings.config, softmax_scale=self.scale)
        return output
