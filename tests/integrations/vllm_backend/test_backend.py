"""The vLLM glue against vLLM's own classes: registration, the metadata builder and the impl's
split of a step between FlashAttention and FlexPrefill.  Skipped where vLLM is not installed.

On a machine without CUDA, FlashAttention's kernel is replaced by a paged reference with its
semantics (bottom-right causal over ``seq_lens[r]`` keys read through the block table; a
request given no keys gets zeros), so the orchestration is tested here and the real kernel
in the GPU tests (``test_vllm_gpu.py``)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

fa = pytest.importorskip("vllm.v1.attention.backends.flash_attn", reason="needs vLLM (pip install 'flexprefill[vllm]')")

from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

from flexprefill.integrations.vllm import BACKEND_PATH, register  # noqa: E402
from flexprefill.integrations.vllm.settings import ENV_VAR, load_settings  # noqa: E402
from vllm_step import make_step  # noqa: E402

SETTINGS = {"gamma": 1.0, "block_size": 32, "min_budget": 32, "min_seq_len": 256, "backend": "torch"}
MIXED = [(300, 1), (250, 90), (0, 40), (0, 300), (70, 1), (100, 50)]


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setenv(ENV_VAR, json.dumps(SETTINGS))
    from flexprefill.integrations.vllm import backend as B

    return B


def _common(step) -> CommonAttentionMetadata:
    qsl = step.query_start_loc
    n_q = qsl[1:] - qsl[:-1]
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=step.seq_lens, num_reqs=step.seq_lens.numel(),
        num_actual_tokens=int(qsl[-1]), max_query_len=int(n_q.max()), max_seq_len=int(step.seq_lens.max()),
        block_table_tensor=step.block_table, slot_mapping=step.slot_mapping, seq_lens_cpu_upper_bound=step.seq_lens,
    )


def _builder(B):
    """A builder without a model: FlashAttention's build needs these fields only when it does
    not schedule ahead of time (as on a machine without FlashAttention 3)."""
    b = object.__new__(B.FlexPrefillMetadataBuilder)
    b.aot_schedule, b.aot_sliding_window, b.use_full_cuda_graph = False, (-1, -1), False
    b.max_cudagraph_size, b.max_num_splits, b.dcp_world_size, b.device = None, 0, 1, torch.device("cpu")
    b.cache_config, b.kv_cache_dtype = SimpleNamespace(cache_dtype="auto"), torch.float16
    b.settings = load_settings(None)
    b.decode_threshold = 1
    b._sparse_layers = True
    return b


def _paged_reference(self, layer, query, key, value, kv_cache, md, output, *args, **kwargs):
    key_cache, value_cache = kv_cache.unbind(1)
    P = key_cache.shape[1]
    qsl = md.query_start_loc.tolist()
    for r, n_k in enumerate(md.seq_lens.tolist()):
        lo, hi = qsl[r], qsl[r + 1]
        if hi == lo:
            continue
        if n_k == 0:
            output[lo:hi] = 0
            continue
        pos = torch.arange(n_k)
        pages = md.block_table[r].long()[pos // P]
        k, v = key_cache[pages, pos % P].float(), value_cache[pages, pos % P].float()
        g = query.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.einsum("qhd,khd->hqk", query[lo:hi].float(), k) * self.scale
        qpos = torch.arange(n_k - (hi - lo), n_k)[:, None]
        s = s.masked_fill(pos[None, :] > qpos, float("-inf"))
        output[lo:hi] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(output.dtype)
    return output


def test_register_makes_custom_resolve_to_the_backend():
    register()
    register()
    assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
    cls = AttentionBackendEnum.CUSTOM.get_class()
    assert cls.get_name() == "CUSTOM" and issubclass(cls, fa.FlashAttentionBackend)
    assert cls.get_builder_cls().__name__ == "FlexPrefillMetadataBuilder"


def test_full_cuda_graphs_only_for_uniform_batches(backend):
    support = backend.FlexPrefillMetadataBuilder.get_cudagraph_support(SimpleNamespace(additional_config={}), None)
    assert support.value <= AttentionCGSupport.UNIFORM_BATCH.value


def test_build_plans_the_sparse_chunks_and_empties_them_for_flash_attention(backend):
    step = make_step(MIXED, seed=1)
    md = _builder(backend).build(0, _common(step))
    assert isinstance(md, backend.FlexPrefillMetadata) and isinstance(md, fa.FlashAttentionMetadata)
    assert md.sparse.plan.req_idx == (1, 3)
    assert torch.equal(md.seq_lens, step.seq_lens)
    want = step.seq_lens.clone()
    want[[1, 3]] = 0
    assert torch.equal(md.rest.seq_lens, want)
    assert torch.equal(md.rest.block_table, step.block_table)


def test_build_of_a_decode_step_or_a_batch_of_sparse_chunks(backend):
    b = _builder(backend)
    md = b.build(0, _common(make_step([(300, 1), (500, 1)])))
    assert md.sparse is None and md.rest is None
    md = b.build(0, _common(make_step([(0, 300), (260, 20)])))
    assert md.sparse.plan.covers_batch and md.rest is None


def test_update_block_table_moves_the_sparse_rows_too(backend):
    step = make_step(MIXED, seed=1)
    b = _builder(backend)
    md = b.build(0, _common(step))
    other = step.block_table.flip(0).contiguous()
    new = b.update_block_table(md, other, step.slot_mapping)
    assert torch.equal(new.sparse.block_table, other[[1, 3]])
    assert torch.equal(new.rest.block_table, other) and torch.equal(new.block_table, other)


def _impl(backend, **kw):
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        return backend.FlexPrefillImpl(4, 64, 1 / math.sqrt(64), 2, None, kw.get("sliding_window"), "auto", None)


class _Layer:
    def __init__(self, name="model.layers.0.self_attn.attn"):
        self.layer_name, self.head_size_v = name, 64


def test_impl_splits_the_step_and_equals_flash_attention_at_gamma_one(backend, monkeypatch):
    monkeypatch.setattr(fa.FlashAttentionImpl, "forward", _paged_reference)
    step = make_step(MIXED, dtype=torch.float32, seed=2)
    md = _builder(backend).build(0, _common(step))
    impl = _impl(backend)
    out = torch.full_like(step.query, float("nan"))
    impl.forward(_Layer(), step.query, None, None, step.kv_cache, md, out)
    dense = torch.full_like(out, float("nan"))
    _paged_reference(impl, None, step.query, None, None, step.kv_cache, md, dense)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)


def test_layers_that_cannot_run_flexprefill_run_flash_attention_on_the_whole_step(backend, monkeypatch):
    calls = []

    def spy(self, layer, query, key, value, kv_cache, md, output, *a, **k):
        calls.append(md)
        return output

    monkeypatch.setattr(fa.FlashAttentionImpl, "forward", spy)
    step = make_step(MIXED, seed=3)
    md = _builder(backend).build(0, _common(step))
    out = torch.zeros_like(step.query)
    sliding = _impl(backend, sliding_window=128)
    assert sliding.fallback_reason(_Layer()) == "sliding window"
    sliding.forward(_Layer(), step.query, None, None, step.kv_cache, md, out)
    assert calls == [md]
    monkeypatch.setenv(ENV_VAR, json.dumps({**SETTINGS, "layers": [1]}))
    other = _impl(backend)
    assert other.fallback_reason(_Layer()) == "not in the layers setting"
    assert other.fallback_reason(_Layer("model.layers.1.self_attn.attn")) is None
