"""The one rule for transformers' attention keyword arguments, and attention sinks on the fast paths.

Every keyword argument is honoured exactly or sends the call to an exact path (transformers'
SDPA or the model's own eager function) with a one-time warning naming it; sinks join each
row's softmax through the operator's log-sum-exp: ``out * sigmoid(lse - sink)``.
"""

import warnings

import pytest
import torch

import transformers  # the test extra brings it

import flexprefill  # noqa: E402
from flexprefill import FlexPrefillConfig  # noqa: E402
from flexprefill.integrations import transformers as tf  # noqa: E402

EXACT = FlexPrefillConfig(gamma=1.0, min_seq_len=0, block_size=32, min_budget=0)


def _llama_attention():
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   num_hidden_layers=1, vocab_size=16)
    cfg._attn_implementation = "flexprefill"
    mod = transformers.models.llama.modeling_llama.LlamaAttention(cfg, layer_idx=0).eval()
    return mod


def _qkv(n=96, hq=4, hkv=2, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, n, d, generator=g)
    k = torch.randn(1, hkv, n, d, generator=g)
    v = torch.randn(1, hkv, n, d, generator=g)
    return q, k, v


def test_sink_scaling_is_the_sink_softmax():
    # softmax over [x_1..x_n, s] restricted to the keys == softmax(x) * sigmoid(lse(x) - s)
    g = torch.Generator().manual_seed(0)
    x, v, s = torch.randn(3, 5, 7, generator=g), torch.randn(3, 7, 4, generator=g), torch.randn(5, generator=g)
    full = torch.cat([x, s[None, :, None].expand(3, 5, 1)], -1).softmax(-1)[..., :-1]
    want = full @ v  # [3, 5, 4]
    out = x.softmax(-1) @ v
    got = tf._sink_scaled(out[:, None], x.logsumexp(-1)[:, None], s)[:, 0]
    torch.testing.assert_close(got, want)
    empty = tf._sink_scaled(out[:, None], torch.full((3, 1, 5), float("-inf")), s)
    assert torch.equal(empty, torch.zeros_like(empty))  # a row that sees nothing gives zeros


@pytest.mark.parametrize("name", ["some_future_feature", "block_indices"])
@torch.no_grad()
def test_unknown_keyword_runs_exact_eager_with_one_warning(name, monkeypatch):
    mod = _llama_attention()
    q, k, v = _qkv()
    seen = {}
    original = transformers.models.llama.modeling_llama.eager_attention_forward

    def eager(module, query, key, value, mask, **kw):
        seen.update(kw)
        return original(module, query, key, value, mask, **kw)

    monkeypatch.setattr(transformers.models.llama.modeling_llama, "eager_attention_forward", eager)
    tf._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out, _ = tf.attention_forward(mod, q, k, v, None, scaling=0.125, **{name: torch.ones(3)})
    msgs = [str(w.message) for w in caught]
    assert sum(name in m for m in msgs) == 1, msgs  # once, naming the argument
    rec = tf._LAST
    assert getattr(mod, rec).path == "dense" and getattr(mod, rec).exact == "eager"
    assert getattr(mod, rec).reason == f"unknown_kwarg:{name}"
    assert name in seen  # the model's eager function got it
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True, scale=0.125).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_inert_and_unset_arguments_keep_the_fast_path():
    mod = _llama_attention()
    q, k, v = _qkv()
    tf.set_default_config(EXACT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, _ = tf.attention_forward(
                mod, q, k, v, None, scaling=0.125, position_ids=torch.arange(96)[None], use_cache=True,
                sliding_window=None, softcap=None, s_aux=None, indices=None, position_bias=None,
                output_attentions=False, cu_seq_lens_q=None, some_future_feature=None,
            )
    finally:
        tf.set_default_config(None)
    assert getattr(mod, tf._LAST).path == "flexprefill"
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True, scale=0.125).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw,reason,exact", [
    (dict(softcap=-1.0), "softcap", "eager"),
    (dict(position_bias=torch.zeros(1, 4, 96, 96)), "position_bias", "sdpa"),
    (dict(cu_seq_lens_q=torch.tensor([0, 96]), cu_seq_lens_k=torch.tensor([0, 96])), "packed", "sdpa"),
    (dict(output_attentions=True), "output_attentions", "eager"),
    (dict(is_causal=False), "not_causal", "sdpa"),
])
@torch.no_grad()
def test_arguments_with_an_exact_path(kw, reason, exact):
    mod = _llama_attention()
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf.attention_forward(mod, q, k, v, None, scaling=0.125, **kw)
    rec = getattr(mod, tf._LAST)
    assert (rec.path, rec.reason, rec.exact) == ("dense", reason, exact)


def _capped_sink_attention(q, k, v, allowed, scale, cap, sink):
    """The softmax over each row's soft-capped scores and one sink logit per head (uncapped, as a
    sink is a logit of its own), restricted to the keys: what a model with both computes."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = cap * torch.tanh(q @ kr.transpose(-1, -2) * scale / cap)
    s = s.masked_fill(~allowed, float("-inf"))
    s = torch.cat([s, sink[None, :, None, None].expand(*s.shape[:-1], 1)], -1)
    return (s.softmax(-1)[..., :-1] @ vr).transpose(1, 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_softcap_and_sinks_together_are_exact(backend):
    # the sink joins the capped scores through the operator's lse, which is the capped one
    mod = _llama_attention()
    q, k, v = _qkv(n=96, seed=3)
    q = q * 4  # scores far past the cap
    sink = torch.linspace(-1.0, 2.0, 4)
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    want = _capped_sink_attention(q, k, v, causal, 0.125, 2.0, sink)
    # either term alone gives something else: the check can fail
    assert (_capped_sink_attention(q, k, v, causal, 0.125, 1e4, sink) - want).abs().max() > 0.05
    assert (_capped_sink_attention(q, k, v, causal, 0.125, 2.0, torch.full((4,), -1e4)) - want).abs().max() > 0.05
    # a left-padded batch of two takes the packed (varlen) path
    q2, k2, v2 = (torch.cat([t, t.flip(2)]) for t in (q, k, v))
    padded = causal & (torch.arange(n) >= torch.tensor([30, 0])[:, None, None, None])
    want2 = _capped_sink_attention(q2, k2, v2, padded, 0.125, 2.0, sink)
    tf.set_default_config(EXACT.replace(backend=backend))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, _ = tf.attention_forward(mod, q, k, v, None, scaling=0.125, softcap=2.0, s_aux=sink)
            rec = getattr(mod, tf._LAST)
            assert (rec.path, rec.sink, rec.softcap, rec.varlen) == ("flexprefill", True, 2.0, False)
            out2, _ = tf.attention_forward(mod, q2, k2, v2, padded, scaling=0.125, softcap=2.0, s_aux=sink)
            rec = getattr(mod, tf._LAST)
            assert (rec.path, rec.sink, rec.softcap, rec.varlen) == ("flexprefill", True, 2.0, True)
    finally:
        tf.set_default_config(None)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2[1], want2[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2[0, 30:], want2[0, 30:], atol=1e-5, rtol=1e-5)
    assert torch.equal(out2[0, :30], torch.zeros_like(out2[0, :30]))  # padding rows: zeros, not NaN


def _gpt_oss(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, vocab_size=128, max_position_embeddings=1024, sliding_window=64, num_local_experts=2,
        num_experts_per_tok=1, layer_types=["sliding_attention", "full_attention"],
    )
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.linspace(-1.0, 3.0, p.numel()))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(3.0)
    model.set_attn_implementation("eager")
    return model


@pytest.mark.slow
@torch.no_grad()
def test_sinks_on_the_triton_kernels_match_eager():
    # backend="triton" on the CPU: the interpreter runs the windowed and the sparse kernels
    model = _gpt_oss()
    ids = torch.randint(3, 128, (2, 160), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :40] = 0
    ref = model(ids).logits
    ref_pad = model(ids, attention_mask=mask).logits
    with tf.patched(model, FlexPrefillConfig(gamma=1.0, min_seq_len=0, block_size=32, min_budget=0, backend="triton")):
        out = model(ids).logits
        recs = tf.last_record(model)
        assert [(r.path, r.sink, r.varlen) for r in recs.values()] == [("window", True, False), ("flexprefill", True, False)]
        out_pad = model(ids, attention_mask=mask).logits
        recs = tf.last_record(model)
        assert [(r.path, r.sink, r.varlen) for r in recs.values()] == [("window", True, True), ("flexprefill", True, True)]
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    keep = mask.bool()
    torch.testing.assert_close(out_pad[keep], ref_pad[keep], atol=1e-3, rtol=1e-3)


@torch.no_grad()
def test_dropping_the_sink_would_be_caught():
    # the matrix's sink check can fail: the sinks of this model change its logits
    model = _gpt_oss()
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(5))
    ref = model(ids).logits
    for layer in model.model.layers:
        layer.self_attn.sinks.fill_(-1e4)
    assert (model(ids).logits - ref).abs().max() > 1e-2
