"""The transformers integration on tiny random models of many architectures, against eager.

With gamma=1 (every causal block selected) FlexPrefill must reproduce transformers' own eager
attention: logits of a prefill, of a left-padded batch and of a chunk prefilled over a cache,
and greedy tokens.  Each layer's record must say which path it took: the fast path where the
integration can be exact, an exact fallback (with its reason) where it cannot.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import transformers  # the test extra brings it

import flexprefill  # noqa: E402
from flexprefill import FlexPrefillConfig  # noqa: E402
from flexprefill.integrations import transformers as tf  # noqa: E402
from flexprefill_tools.hf_compat import cache_of, with_cache  # noqa: E402

# block 32, no minimum length or budget: the sparse operator really runs at these lengths
EXACT = FlexPrefillConfig(gamma=1.0, min_seq_len=0, block_size=32, min_budget=0)
N = 160  # tokens of a plain prefill (5 blocks; sliding windows of 64 bind)
VOCAB = 128
WINDOW = 64
TOL = dict(atol=2e-4, rtol=2e-4)

BASE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# models whose head dim is hidden / heads: two heads of 64
WIDE = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1, moe_intermediate_size=64, n_group=1,
           topk_group=1)
MLA = dict(num_key_value_heads=4, head_dim=32, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, **MOE)

FP, DENSE = ("flexprefill", ""), "dense"


@dataclasses.dataclass
class Arch:
    config: str
    model: str
    kwargs: dict
    # (path, reason) per layer of the plain prefill; a callable for keys that are module names
    paths: dict
    kind: str = "causal"  # "causal", "encoder" or "seq2seq"
    sink: bool = False  # the fast layers fold attention sinks in
    warns: str = ""  # a one-time warning the patched forward must give
    softcap: float | None = None  # the logit soft-cap every layer's record must carry


def _arch(config, model, paths, *, base=BASE, kind="causal", sink=False, warns="", softcap=None, **kw):
    return Arch(config, model, {**base, **kw}, paths, kind, sink, warns, softcap)


SLIDE = (DENSE, "sliding_window")  # sliding layers on the CPU: exact (the windowed kernel is CUDA-only)
ARCHS = [
    pytest.param(_arch("LlamaConfig", "LlamaForCausalLM", {0: FP, 1: FP}), id="llama-gqa"),
    pytest.param(_arch("Qwen2Config", "Qwen2ForCausalLM", {0: FP, 1: FP}), id="qwen2-bias"),
    pytest.param(_arch("Qwen3Config", "Qwen3ForCausalLM", {0: FP, 1: FP}), id="qwen3-qknorm"),
    pytest.param(_arch("Olmo2Config", "Olmo2ForCausalLM", {0: FP, 1: FP}), id="olmo2-qknorm"),
    pytest.param(_arch("GemmaConfig", "GemmaForCausalLM", {0: FP, 1: FP}, num_key_value_heads=1), id="gemma-mqa"),
    pytest.param(_arch("GraniteConfig", "GraniteForCausalLM", {0: FP, 1: FP}), id="granite"),
    pytest.param(_arch("MixtralConfig", "MixtralForCausalLM", {0: FP, 1: FP}, num_local_experts=2,
                       num_experts_per_tok=1), id="mixtral-moe"),
    pytest.param(_arch("Phi3Config", "Phi3ForCausalLM", {0: FP, 1: FP}, hidden_size=256, head_dim=None), id="phi3"),
    pytest.param(_arch("PhiConfig", "PhiForCausalLM", {0: FP, 1: FP}, base=WIDE, partial_rotary_factor=0.5),
                 id="phi-partial-rotary"),
    pytest.param(_arch("StableLmConfig", "StableLmForCausalLM", {0: FP, 1: FP}, base=WIDE, num_key_value_heads=1,
                       partial_rotary_factor=0.25), id="stablelm-partial-rotary-mqa"),
    pytest.param(_arch("GPTNeoXConfig", "GPTNeoXForCausalLM", {0: FP, 1: FP}, base=WIDE, rotary_pct=0.25),
                 id="gpt-neox-partial-rotary"),
    pytest.param(_arch("GPT2Config", "GPT2LMHeadModel", {0: FP, 1: FP},
                       base=dict(n_embd=128, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=1024,
                                 bos_token_id=1, eos_token_id=2)), id="gpt2"),
    pytest.param(_arch("FalconConfig", "FalconForCausalLM", {0: FP, 1: FP}, base=WIDE, multi_query=True,
                       new_decoder_architecture=False), id="falcon-mqa"),
    # ALiBi arrives as an additive float mask: not causal + padding, so exact
    pytest.param(_arch("FalconConfig", "FalconForCausalLM", {0: (DENSE, "custom_mask"), 1: (DENSE, "custom_mask")},
                       base=WIDE, alibi=True), id="falcon-alibi"),
    pytest.param(_arch("MistralConfig", "MistralForCausalLM", {0: SLIDE, 1: SLIDE}, sliding_window=WINDOW),
                 id="mistral-window"),
    pytest.param(_arch("Starcoder2Config", "Starcoder2ForCausalLM", {0: SLIDE, 1: SLIDE}, hidden_size=256,
                       head_dim=None, sliding_window=WINDOW), id="starcoder2-window"),
    pytest.param(_arch("Gemma3TextConfig", "Gemma3ForCausalLM", {0: SLIDE, 1: FP}, sliding_window=WINDOW,
                       layer_types=["sliding_attention", "full_attention"]), id="gemma3-window"),
    pytest.param(_arch("Cohere2Config", "Cohere2ForCausalLM", {0: SLIDE, 1: FP}, sliding_window=WINDOW,
                       layer_types=["sliding_attention", "full_attention"]), id="cohere2-window"),
    pytest.param(_arch("Olmo3Config", "Olmo3ForCausalLM", {0: SLIDE, 1: FP}, sliding_window=WINDOW,
                       layer_types=["sliding_attention", "full_attention"]), id="olmo3-window"),
    # Exaone 4 keeps sliding_window on every layer: its full layer must still be a full one
    pytest.param(_arch("Exaone4Config", "Exaone4ForCausalLM", {0: SLIDE, 1: FP}, sliding_window=WINDOW,
                       sliding_window_pattern=2), id="exaone4-window"),
    pytest.param(_arch("Llama4TextConfig", "Llama4ForCausalLM",
                       {0: (DENSE, "chunked_attention"), 1: FP}, attention_chunk_size=WINDOW,
                       no_rope_layers=[1, 0], num_local_experts=1, intermediate_size_mlp=128,
                       interleave_moe_layer_step=2), id="llama4-chunked"),
    pytest.param(_arch("GptOssConfig", "GptOssForCausalLM", {0: SLIDE, 1: FP}, sink=True, sliding_window=WINDOW,
                       num_local_experts=2, num_experts_per_tok=1, layer_types=["sliding_attention", "full_attention"]),
                 id="gpt-oss-sinks"),
    pytest.param(_arch("GraniteSWAConfig", "GraniteSWAForCausalLM", {0: SLIDE, 1: FP}, sink=True,
                       sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
                 id="granite-swa-sinks"),
    # soft-capped logits: the full layers run FlexPrefill with the cap, the sliding ones exact; a
    # scale of 1/2 (query_pre_attn_scalar 4) gives scores the cap of 2 bends
    pytest.param(_arch("Gemma2Config", "Gemma2ForCausalLM", {0: SLIDE, 1: FP}, softcap=2.0, sliding_window=WINDOW,
                       attn_logit_softcapping=2.0, query_pre_attn_scalar=4), id="gemma2-softcap"),
    pytest.param(_arch("VaultGemmaConfig", "VaultGemmaForCausalLM", {0: SLIDE, 1: FP}, softcap=2.0,
                       attn_logit_softcapping=2.0, query_pre_attn_scalar=4), id="vaultgemma-softcap"),
    pytest.param(_arch("DeepseekV2Config", "DeepseekV2ForCausalLM", {0: FP, 1: FP},
                       **{**MLA, "q_lora_rank": None}), id="deepseek-v2-mla"),
    pytest.param(_arch("DeepseekV3Config", "DeepseekV3ForCausalLM", {0: FP, 1: FP}, **MLA), id="deepseek-v3-mla"),
    # MLA with a value head dim unlike the query's: exact, and the record names the value head dim
    pytest.param(_arch("DeepseekV3Config", "DeepseekV3ForCausalLM",
                       {0: (DENSE, "unsupported_value_head_dim"), 1: (DENSE, "unsupported_value_head_dim")},
                       warns="value head dim 32", **{**MLA, "v_head_dim": 32}), id="deepseek-v3-mla-dv32"),
    pytest.param(_arch("DeepseekV32Config", "DeepseekV32ForCausalLM", {0: (DENSE, "indices"), 1: (DENSE, "indices")},
                       warns="indexer", index_topk=48, index_head_dim=32, index_n_heads=2, **MLA),
                 id="deepseek-v32-indexer"),
    pytest.param(_arch("BertConfig", "BertForMaskedLM", None, base=WIDE, kind="encoder"), id="bert-encoder"),
    pytest.param(_arch("BartConfig", "BartForConditionalGeneration", None, kind="seq2seq",
                       base=dict(d_model=128, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                 decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                 vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)),
                 id="bart-seq2seq"),
    pytest.param(_arch("T5Config", "T5ForConditionalGeneration", None, kind="seq2seq",
                       base=dict(d_model=64, d_kv=64, d_ff=128, num_layers=1, num_heads=2, vocab_size=VOCAB,
                                 pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)), id="t5-seq2seq"),
]


def _build(arch: Arch):
    torch.manual_seed(0)
    cfg = getattr(transformers, arch.config)(**{k: v for k, v in arch.kwargs.items() if v is not None})
    model = getattr(transformers, arch.model)(cfg).eval()
    # random weights give near-uniform attention: sharpen it so a dropped term shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight", "q.weight", "k.weight",
                              "query_key_value.weight", "c_attn.weight", "Wqkv.weight", "kv_b_proj.weight",
                              "q_b_proj.weight")):
                p.mul_(3.0)
            elif name.endswith("sinks"):
                p.copy_(torch.linspace(-1.0, 3.0, p.numel()))  # sinks that matter, different per head
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = 0
    return model


def _ids(n, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n), generator=g)


def _left_padded(n=128, pad=40):
    ids = _ids(n, batch=2, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def _paths(model, prefill=True):
    return {k: (r.path, r.reason) for k, r in tf.last_record(model, prefill=prefill).items()}


def _forward(model, arch, ids, mask=None):
    if arch.kind == "seq2seq":
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, : ids.shape[1] // 2 + 1],
                     decoder_attention_mask=None if mask is None else mask[:, : ids.shape[1] // 2 + 1]).logits
    return model(input_ids=ids, attention_mask=mask).logits


class _Pair:
    """One tiny model, run with transformers' eager attention and with FlexPrefill."""

    def __init__(self, arch: Arch):
        self.arch = arch
        self.model = _build(arch)
        self.model.set_attn_implementation("eager")

    def both(self, fn):
        ref = fn(self.model)
        flexprefill.patch(self.model, EXACT)
        try:
            out = fn(self.model)
            paths = _paths(self.model)
            records = tf.last_record(self.model, prefill=True)
        finally:
            flexprefill.unpatch(self.model)
        assert self.model.config._attn_implementation == "eager"
        return ref, out, paths, records


_PAIRS: dict = {}


def _pair(arch: Arch) -> _Pair:
    key = id(arch)
    if key not in _PAIRS:
        _PAIRS.clear()  # one model alive at a time
        _PAIRS[key] = _Pair(arch)
    return _PAIRS[key]


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_prefill_logits_and_paths(arch):
    pair = _pair(arch)
    ids = _ids(N)
    tf._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref, out, paths, records = pair.both(lambda m: _forward(m, arch, ids))
    torch.testing.assert_close(out, ref, **TOL)
    if arch.kind == "causal":
        assert paths == arch.paths
    elif arch.kind == "encoder":
        assert {p for p in paths.values()} == {(DENSE, "not_causal")}
    else:
        # layer indices repeat: encoder self-, decoder self- and cross-attention keep their own keys
        assert all(isinstance(k, str) for k in paths) and len(paths) == 3
        cross = [k for k in paths if "encoder_attn" in k or "EncDecAttention" in k]
        assert len(cross) == 1 and paths[cross[0]][0] == DENSE  # not causal (T5: its position bias first)
        dec_self = [k for k in paths if k.startswith(("model.decoder", "decoder")) and k not in cross]
        want = (DENSE, "position_bias") if "t5" in arch.config.lower() else FP
        assert len(dec_self) == 1 and paths[dec_self[0]] == want
    fast = [r for r in records.values() if r.path == "flexprefill"]
    assert all(getattr(r, "sink", False) == arch.sink for r in fast)
    assert all(r.softcap == arch.softcap for r in records.values())
    msgs = [str(w.message) for w in caught if "flexprefill" in str(w.message)]
    if arch.warns:
        assert sum(arch.warns in m for m in msgs) == 1, msgs
    if arch.softcap is not None:
        assert not msgs, msgs  # a soft-cap is honoured, not a reason to warn


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_left_padded_batch(arch):
    pair = _pair(arch)
    ids, mask = _left_padded()
    ref, out, paths, _ = pair.both(lambda m: _forward(m, arch, ids, mask))
    assert torch.isfinite(out).all()  # no padding row may turn NaN and spread
    q_mask = mask if arch.kind != "seq2seq" else mask[:, : out.shape[1]]
    keep = q_mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], **TOL)
    if arch.kind == "causal":
        # the padded batch keeps the fast layers fast (packed varlen rows)
        assert all(paths[k] == FP for k, want in arch.paths.items() if want == FP)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.values[0].kind == "causal"])
@torch.no_grad()
def test_chunked_prefill_over_a_cache(arch):
    pair = _pair(arch)
    ids = _ids(N, seed=3)

    def run(m):
        first = m(input_ids=ids[:, :96], use_cache=True)
        return m(input_ids=ids[:, 96:], use_cache=True, **with_cache(m, cache_of(first))).logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref, out, paths, records = pair.both(run)
    torch.testing.assert_close(out, ref, **TOL)
    for k, want in pair.arch.paths.items():
        if want == FP:
            assert paths[k] == FP and records[k].varlen and records[k].lengths == ((N - 96, N),)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_greedy_tokens_of_a_padded_batch(arch):
    pair = _pair(arch)
    ids, mask = _left_padded(n=96, pad=30)
    if pair.arch.kind == "encoder":
        pytest.skip("an encoder does not generate")
    ref, out, _, _ = pair.both(
        lambda m: m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    )
    assert torch.equal(out, ref)


@torch.no_grad()
def test_dropping_the_softcap_or_alibi_would_be_caught(monkeypatch):
    # the matrix's logits checks can fail: the soft-cap and ALiBi's bias change eager's logits
    ids = _ids(N)
    for name in ("gemma2-softcap", "vaultgemma-softcap"):
        model = _build(next(p.values[0] for p in ARCHS if p.id == name))
        model.set_attn_implementation("eager")
        ref = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None  # the forward then passes softcap=None
        assert (model(ids).logits - ref).abs().max() > 1e-2, name
    falcon = next(p.values[0] for p in ARCHS if p.id == "falcon-alibi")
    model = _build(falcon)
    model.set_attn_implementation("eager")
    ref = model(ids).logits
    falcon_mod = transformers.models.falcon.modeling_falcon
    real = falcon_mod.build_alibi_tensor
    monkeypatch.setattr(falcon_mod, "build_alibi_tensor", lambda *a, **kw: torch.zeros_like(real(*a, **kw)))
    assert (model(ids).logits - ref).abs().max() > 1e-2


def test_bloom_without_attention_interface_is_refused():
    model = transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=128, n_layer=1, n_head=2,
                                                                   vocab_size=VOCAB))
    with pytest.raises((RuntimeError, ValueError)):
        flexprefill.patch(model, EXACT)
    assert not tf.is_patched(model)
