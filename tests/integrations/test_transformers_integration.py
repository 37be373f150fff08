"""transformers integration: tiny random-weight Llama, Qwen2, Gemma 3 (and Gemma 2 for soft-capping).

With gamma=1 FlexPrefill selects every causal block, so its logits must equal SDPA's; the
per-layer record says which path each layer took.
"""

import subprocess
import sys
import types
import warnings

import pytest
import torch

import transformers  # the test extra brings it

import flexprefill  # noqa: E402
from flexprefill import FlexPrefillConfig  # noqa: E402
from flexprefill.integrations import transformers as tf  # noqa: E402
from flexprefill_tools.hf_compat import cache_of, with_cache  # noqa: E402

N = 300
from tiny_llama import COMMON, EXACT  # noqa: E402


def _model(arch: str, qk_scale: float = 8.0, **extra):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**COMMON, **extra)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**COMMON, **extra)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            **COMMON, layer_types=["sliding_attention", "full_attention"], sliding_window=64, **extra
        )
        cls = transformers.Gemma3ForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**COMMON, sliding_window=64, **extra)
        cls = transformers.MistralForCausalLM
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(**COMMON, sliding_window=64, attn_logit_softcapping=5.0, **extra)
        cls = transformers.Gemma2ForCausalLM
    else:
        raise ValueError(arch)
    # random weights are small: scale them up so attention is far from uniform and errors show
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
    return model


def _ids(n=N, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, COMMON["vocab_size"], (batch, n), generator=g)


# the model with FlexPrefill for the block, given back as it came afterwards
_patched = tf.patched


def _paths(model, prefill=False):
    return {i: (r.path, r.reason) for i, r in tf.last_record(model, prefill=prefill).items()}


@pytest.fixture(scope="module")
def llama():
    return _model("llama")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@torch.no_grad()
def test_logits_equal_sdpa_and_unpatch_round_trips(arch):
    model = _model(arch)
    ids = _ids()
    assert model.config._attn_implementation == "sdpa"
    ref = model(ids).logits
    flexprefill.patch(model, EXACT, collect_stats=True)
    assert model.config._attn_implementation == "flexprefill"
    out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    paths = _paths(model)
    if arch == "gemma3":
        assert paths == {0: ("dense", "sliding_window"), 1: ("flexprefill", "")}
    else:
        assert paths == {0: ("flexprefill", ""), 1: ("flexprefill", "")}
    stats = tf.last_stats(model)
    assert set(stats) == {i for i, p in paths.items() if p[0] == "flexprefill"}
    for s in stats.values():
        assert torch.all(s.density == 1.0)
    assert flexprefill.unpatch(model) is True
    assert model.config._attn_implementation == "sdpa"
    assert tf.last_record(model) == {}
    assert torch.equal(model(ids).logits, ref)
    assert flexprefill.unpatch(model) is False


@torch.no_grad()
def test_sliding_layers_run_the_exact_window_kernel():
    # Gemma 3's sliding layer (window 64 < N) on the windowed kernel (the interpreter on CPU:
    # backend="triton"); a padded batch or a prompt inside the window stays on SDPA
    model = _model("gemma3")
    ids, short = _ids(), _ids(n=60)
    batch = _ids(n=200, batch=2)
    mask = torch.ones_like(batch)
    mask[0, :40] = 0
    ref, ref_short = model(ids).logits, model(short).logits
    ref_batch = model(batch, attention_mask=mask).logits
    with _patched(model, EXACT.replace(backend="triton")):
        out = model(ids).logits
        assert _paths(model) == {0: ("window", ""), 1: ("flexprefill", "")}
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        with torch.inference_mode():  # inference tensors have no version counter for the memo
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
        assert _paths(model) == {0: ("window", ""), 1: ("flexprefill", "")}
        torch.testing.assert_close(model(short).logits, ref_short, atol=1e-4, rtol=1e-4)
        assert _paths(model)[0] == ("dense", "sliding_window")
        # a left-padded batch: the valid rows are packed and run the varlen windowed kernel
        out_batch = model(batch, attention_mask=mask).logits
        rec = tf.last_record(model)[0]
        assert (rec.path, rec.varlen, rec.lengths) == ("window", True, ((160, 160), (200, 200)))
        torch.testing.assert_close(out_batch[1], ref_batch[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out_batch[0, 40:], ref_batch[0, 40:], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sliding_layers_over_a_cached_prefix():
    # chunked prefill: the sliding layer's chunk sees the cached keys within its window
    model = _model("gemma3")
    ids = _ids(seed=5)
    prefix = model(ids[:, :200], use_cache=True)
    ref = model(ids[:, 200:], **with_cache(model, cache_of(prefix))).logits
    with _patched(model, EXACT.replace(backend="triton")):
        prefix = model(ids[:, :200], use_cache=True)
        assert _paths(model)[0] == ("window", "")
        out = model(ids[:, 200:], **with_cache(model, cache_of(prefix))).logits
        rec = tf.last_record(model)[0]
        assert rec.path == "window" and rec.varlen and rec.lengths[0][0] == 100 and rec.lengths[0][1] > 100
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sliding_mask_of_a_plain_prefill_is_a_placeholder():
    # no N x N tensor for the window of a plain prefill; padded prompts get the real mask
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    model = _model("gemma3")
    ids = _ids()
    ref = model(ids).logits
    with _patched(model, EXACT):
        cfg = model.config
        emb = torch.zeros(2, N, COMMON["hidden_size"])
        pos = torch.arange(N)[None]
        lazy = create_sliding_window_causal_mask(cfg, emb, None, None, position_ids=pos)
        assert lazy is not None and lazy.numel() == 0 and tf._lazy(lazy)["window"] == 64
        real = tf._real_mask(lazy)
        i = torch.arange(N)
        want = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 64)
        assert real.shape[-2:] == (N, N) and torch.equal(real[0, 0], want) and tf._real_mask(lazy) is real
        pad = torch.ones(2, N, dtype=torch.long)
        pad[0, :10] = 0
        padded = create_sliding_window_causal_mask(cfg, emb, pad, None, position_ids=pos)
        assert padded.numel() == 2 * N * N
        # a full-attention layer's mask stays SDPA's (None for a plain causal prefill)
        assert create_causal_mask(cfg, emb, None, None, position_ids=pos) is None
        # on CPU the sliding layer falls back to SDPA on the materialised mask: same logits
        out = model(ids).logits
        assert _paths(model)[0] == ("dense", "sliding_window")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_generate_after_flexprefill_prefill_matches_sdpa(llama):
    ids = _ids(seed=2)
    dense = llama.generate(ids, max_new_tokens=6, do_sample=False)
    flexprefill.patch(llama, EXACT)
    try:
        sparse = llama.generate(ids, max_new_tokens=6, do_sample=False)
        # decode steps are dense, the prompt ran FlexPrefill
        assert _paths(llama) == {0: ("dense", "decode"), 1: ("dense", "decode")}
        assert _paths(llama, prefill=True) == {0: ("flexprefill", ""), 1: ("flexprefill", "")}
    finally:
        flexprefill.unpatch(llama)
    assert torch.equal(sparse, dense)


@torch.no_grad()
def test_short_prompt_runs_dense_and_cached_prefix_runs_varlen(llama):
    ids = _ids(seed=3)
    ref = llama(ids).logits
    ref_prefix = llama(ids[:, :200], use_cache=True)
    ref_chunk = llama(ids[:, 200:], **with_cache(llama, cache_of(ref_prefix))).logits
    flexprefill.patch(llama, EXACT.replace(min_seq_len=N + 1), collect_stats=True)
    try:
        torch.testing.assert_close(llama(ids).logits, ref, atol=1e-5, rtol=1e-5)
        assert _paths(llama) == {0: ("dense", "short"), 1: ("dense", "short")}
        assert tf.last_stats(llama) == {}
        flexprefill.patch(llama, EXACT)  # re-patch: new settings, same undo
        prefix = llama(ids[:, :200], use_cache=True)
        assert _paths(llama) == {0: ("flexprefill", ""), 1: ("flexprefill", "")}
        chunk = llama(ids[:, 200:], **with_cache(llama, cache_of(prefix))).logits
        # the chunk over the cached prefix runs FlexPrefill on packed rows (bottom-right causal)
        assert _paths(llama) == {0: ("flexprefill", ""), 1: ("flexprefill", "")}
        assert all(r.varlen for r in tf.last_record(llama).values())
        torch.testing.assert_close(chunk, ref_chunk, atol=1e-4, rtol=1e-4)
    finally:
        flexprefill.unpatch(llama)
    assert llama.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_padding_mask_runs_varlen(llama):
    ids = _ids(n=200, batch=2, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    ref = llama(ids, attention_mask=mask).logits
    ref_full = llama(ids, attention_mask=torch.ones_like(ids)).logits
    flexprefill.patch(llama, EXACT)
    try:
        out = llama(ids, attention_mask=mask).logits
        assert _paths(llama) == {0: ("flexprefill", ""), 1: ("flexprefill", "")}
        assert all(r.varlen for r in tf.last_record(llama).values())
        # an all-ones 2D mask is a plain causal prefill: FlexPrefill runs, batched
        full = llama(ids, attention_mask=torch.ones_like(ids)).logits
        assert _paths(llama) == {0: ("flexprefill", ""), 1: ("flexprefill", "")}
    finally:
        flexprefill.unpatch(llama)
    # valid positions equal SDPA's (padding rows of the attention are zeros, SDPA's are not)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full, ref_full, atol=1e-4, rtol=1e-4)


def test_mask_function_builds_no_mask_for_causal_prefill(llama):
    from transformers.masking_utils import create_causal_mask

    cfg = llama.config.__class__(**COMMON)
    cfg._attn_implementation = "flexprefill"
    emb = torch.zeros(2, 50, COMMON["hidden_size"])
    assert create_causal_mask(cfg, emb, None, None) is None
    assert create_causal_mask(cfg, emb, torch.ones(2, 50, dtype=torch.long), None) is None
    pad = torch.ones(2, 50, dtype=torch.long)
    pad[0, :5] = 0
    mask = create_causal_mask(cfg, emb, pad, None)
    assert mask is not None and mask.shape == (2, 1, 50, 50) and not bool(mask[0, 0, 10, 2])


@torch.no_grad()
def test_sparse_settings_differ_a_little_and_report_density():
    # sharper attention than the other tests so gamma=0.9 can drop blocks
    model = _model("llama", qk_scale=16.0)
    ids = _ids(seed=5)
    ref = model(ids).logits
    cfg = FlexPrefillConfig(block_size=32, min_seq_len=0, gamma=0.9, min_budget=32)
    flexprefill.patch(model, cfg, collect_stats=True)
    try:
        out = model(ids).logits
        stats = tf.last_stats(model)
    finally:
        flexprefill.unpatch(model)
    assert set(stats) == {0, 1}
    density = torch.cat([s.density.flatten() for s in stats.values()])
    assert density.min() < 1.0 and density.mean() > 0.5
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < 0.15
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@torch.no_grad()
def test_dense_above_makes_near_dense_layers_exact():
    """dense_above under the layers' densities: the sparse settings of the test above give SDPA's
    logits again, and the stats say each layer ran dense; with a custom selector too."""
    model = _model("llama", qk_scale=16.0)
    ids = _ids(seed=5)
    ref = model(ids).logits
    cfg = FlexPrefillConfig(block_size=32, min_seq_len=0, gamma=0.9, min_budget=32, dense_above=0.05)
    flexprefill.patch(model, cfg, collect_stats=True)
    try:
        out = model(ids).logits
        stats = tf.last_stats(model)
        assert set(stats) == {0, 1} and all(s.dense for s in stats.values())
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        flexprefill.patch(model, cfg, selector=flexprefill.select_blocks)
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
        assert _paths(model) == {0: ("dense", "dense_above"), 1: ("dense", "dense_above")}
    finally:
        flexprefill.unpatch(model)


@torch.no_grad()
def test_selector_hook_and_layers(llama):
    ids = _ids(seed=6)
    ref = llama(ids).logits
    calls = []

    def full_selector(q, k, *, config, softmax_scale):
        calls.append((tuple(q.shape), tuple(k.shape), config.block_size, softmax_scale))
        return flexprefill.select_blocks(q, k, config=config.replace(gamma=1.0), softmax_scale=softmax_scale)

    flexprefill.patch(llama, EXACT, selector=full_selector, layers=[1], collect_stats=True)
    try:
        out = llama(ids).logits
        assert _paths(llama) == {0: ("dense", "layer_not_selected"), 1: ("flexprefill", "")}
        assert set(tf.last_stats(llama)) == {1}
    finally:
        flexprefill.unpatch(llama)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # one call, layer 1, [B, N, H, D] layout, the model's own scale
    assert calls == [((1, N, 4, 64), (1, N, 2, 64), 32, pytest.approx(64**-0.5))]
    with pytest.raises(ValueError, match="layers"):
        flexprefill.patch(llama, EXACT, layers=[7])
    with pytest.raises(TypeError, match="selector"):
        flexprefill.patch(llama, EXACT, selector=3)
    assert not tf.is_patched(llama)


@torch.no_grad()
def test_attn_implementation_name_and_default_config():
    model = _model("llama")
    ids = _ids(n=160, seed=7)
    ref = model(ids).logits
    model.set_attn_implementation("flexprefill")
    tf.set_default_config(EXACT.replace(min_seq_len=100), collect_stats=True)
    try:
        out = model(ids).logits
        assert _paths(model) == {0: ("flexprefill", ""), 1: ("flexprefill", "")}
        assert set(tf.last_stats(model)) == {0, 1}
        # a per-model config wins over the default
        flexprefill.patch(model, EXACT.replace(min_seq_len=1000))
        model(ids)
        assert _paths(model) == {0: ("dense", "short"), 1: ("dense", "short")}
        flexprefill.unpatch(model)
        assert model.config._attn_implementation == "flexprefill"
    finally:
        tf.set_default_config(None, collect_stats=False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_softcap_runs_the_fast_paths_with_the_cap():
    # Gemma 2 (logit soft-cap 5, scores far past it): the sliding layer on the windowed kernel and
    # the full one on FlexPrefill, both with the cap (the interpreter on the CPU: backend="triton"),
    # against transformers' eager, which applies it; plain, left-padded and over a cached prefix
    model = _model("gemma2")
    ids = _ids(n=200, seed=8)
    batch = _ids(n=200, batch=2, seed=9)
    mask = torch.ones_like(batch)
    mask[0, :50] = 0
    model.set_attn_implementation("eager")
    ref = model(ids).logits
    ref_batch = model(batch, attention_mask=mask).logits
    first = model(ids[:, :120], use_cache=True)
    ref_chunk = model(ids[:, 120:], **with_cache(model, cache_of(first))).logits
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    uncapped = model(ids).logits
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 5.0
    assert (uncapped - ref).abs().max() > 0.1  # the cap matters here
    tf._WARNED.clear()
    with _patched(model, EXACT.replace(backend="triton")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(ids).logits
        assert not [w for w in caught if "flexprefill" in str(w.message)]
        recs = tf.last_record(model)
        assert [(r.path, r.softcap, r.varlen) for r in recs.values()] == [("window", 5.0, False),
                                                                           ("flexprefill", 5.0, False)]
        out_batch = model(batch, attention_mask=mask).logits
        assert [(r.path, r.varlen) for r in tf.last_record(model).values()] == [("window", True), ("flexprefill", True)]
        first = model(ids[:, :120], use_cache=True)
        out_chunk = model(ids[:, 120:], **with_cache(model, cache_of(first))).logits
        assert [r.path for r in tf.last_record(model).values()] == ["window", "flexprefill"]
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_batch[1], ref_batch[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_batch[0, 50:], ref_batch[0, 50:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_chunk, ref_chunk, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_softcap_attribute_without_the_argument_runs_uncapped():
    # a module holding attn_logit_softcapping but not passing it (Gemma 3's forward): transformers'
    # eager and SDPA both run uncapped, so FlexPrefill does too, with one warning saying so
    model = _model("gemma3", attn_logit_softcapping=1.0)
    assert model.model.layers[1].self_attn.attn_logit_softcapping == 1.0
    ids = _ids(seed=3)
    ref = model(ids).logits
    model.set_attn_implementation("eager")
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
    tf._WARNED.clear()
    with _patched(model, EXACT):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(ids).logits
        assert sum("does not pass it" in str(w.message) for w in caught) == 1
        recs = tf.last_record(model)
        assert (recs[1].path, recs[1].softcap) == ("flexprefill", None)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _fake_module(**kw):
    base = dict(layer_idx=0, is_causal=True, num_key_value_groups=2, training=False, config=types.SimpleNamespace())
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_dispatch_on_materialised_masks():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    n = 96
    q, k, v = torch.randn(1, 4, n, 64), torch.randn(1, 2, n, 64), torch.randn(1, 2, n, 64)
    mod = _fake_module()
    setattr(mod, tf._STATE, tf._PatchState(EXACT, None, None, False, []))
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    ref, _ = sdpa_attention_forward(mod, q, k, v, None, scaling=0.1)
    out, _ = tf.attention_forward(mod, q, k, v, causal, scaling=0.1)
    assert getattr(mod, tf._LAST).path == "flexprefill"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    additive = torch.zeros(1, 1, n, n).masked_fill(~causal, torch.finfo(torch.float32).min)
    tf.attention_forward(mod, q, k, v, additive, scaling=0.1)
    assert getattr(mod, tf._LAST).path == "flexprefill"
    window = causal & ~torch.ones(n, n, dtype=torch.bool).tril(-10)[None, None]
    ref_w, _ = sdpa_attention_forward(mod, q, k, v, window, scaling=0.1)
    out_w, _ = tf.attention_forward(mod, q, k, v, window, scaling=0.1)
    assert getattr(mod, tf._LAST).reason == "custom_mask"
    torch.testing.assert_close(out_w, ref_w)
    # an unsupported head dim falls back to SDPA with a warning instead of failing
    q48, k48, v48 = q[..., :48], k[..., :48], v[..., :48]
    with pytest.warns(RuntimeWarning, match="head dim 48"):
        out48, _ = tf.attention_forward(mod, q48, k48, v48, None, scaling=0.1)
    assert getattr(mod, tf._LAST).reason == "unsupported_head_dim"
    torch.testing.assert_close(out48, sdpa_attention_forward(mod, q48, k48, v48, None, scaling=0.1)[0])


def test_import_flexprefill_registers_before_transformers_is_imported():
    code = (
        "import sys, flexprefill\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "assert callable(flexprefill.last_record) and 'last_record' in flexprefill.__all__\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
        "assert 'flexprefill' in AttentionInterface._global_mapping\n"
        "assert 'flexprefill' in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@torch.no_grad()
def test_masks_of_both_layer_types_are_read_once_per_forward(monkeypatch):
    # sliding and full layers alternate: each mask is analysed once per forward, not per layer
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 4},
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], sliding_window=64,
    )
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    calls = []
    real = tf._analyse_mask
    monkeypatch.setattr(tf, "_analyse_mask", lambda *a: calls.append(a[-1]) or real(*a))
    ids = _ids(n=200, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    with _patched(model, EXACT.replace(backend="triton")):
        model(ids, attention_mask=mask)
        assert sorted(calls, key=str) == [64, None]
        assert [r.path for r in tf.last_record(model).values()] == ["window", "flexprefill"] * 2


@torch.no_grad()
def test_mistral_sliding_window_on_every_layer():
    # Mistral's window applies to every layer: all of them run the windowed kernel, none FlexPrefill
    model = _model("mistral")
    ids = _ids()
    ref = model(ids).logits
    with _patched(model, EXACT.replace(backend="triton")):
        out = model(ids).logits
        assert _paths(model) == {0: ("window", ""), 1: ("window", "")}
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_gemma3_generate_with_windowed_prefill_matches_sdpa():
    # prefill: placeholder sliding mask and the windowed kernel; decode steps: SDPA on real masks
    model = _model("gemma3")
    ids = _ids(seed=8)
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with _patched(model, EXACT.replace(backend="triton")):
        sparse = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert _paths(model, prefill=True) == {0: ("window", ""), 1: ("flexprefill", "")}
        assert _paths(model) == {0: ("dense", "decode"), 1: ("dense", "decode")}
    assert torch.equal(sparse, dense)


def test_patched_unpatches_on_error_and_lists_full_layers():
    model = _model("gemma3")
    assert tf._full_attention_layers(model) == [1]  # layer 0 is the sliding one
    with pytest.raises(RuntimeError, match="inside"):
        with tf.patched(model, EXACT, collect_stats=True):
            assert tf.is_patched(model)
            raise RuntimeError("inside")
    assert not tf.is_patched(model)
