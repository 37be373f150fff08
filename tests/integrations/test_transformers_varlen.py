"""transformers integration: padded batches and prefill over a cached prefix run FlexPrefill.

The masks come from transformers' own ``sdpa_mask`` (what the model builds).  With gamma=1
FlexPrefill selects every causal block, so the logits on valid positions must equal SDPA's;
padding rows come back as zeros (finite).  Masks that are not exactly causal + padding fall
back to SDPA with reason "custom_mask".
"""

import os

import pytest
import torch

import transformers  # the test extra brings it

import flexprefill  # noqa: E402
from flexprefill.integrations import transformers as tf  # noqa: E402
from flexprefill_tools.hf_compat import with_cache  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import sdpa_mask  # noqa: E402

from tiny_llama import COMMON, EXACT  # noqa: E402
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GPU = torch.cuda.is_available()


def _model(arch: str = "llama", qk_scale: float = 8.0):
    torch.manual_seed(0)
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**COMMON), transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = transformers.Qwen2Config(**COMMON), transformers.Qwen2ForCausalLM
    elif arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(**COMMON, layer_types=["sliding_attention", "full_attention"], sliding_window=64)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    model = cls(cfg).eval()
    # sharper attention than random init so that errors show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
    return model


@pytest.fixture(scope="module")
def llama():
    return _model("llama")


def _ids(n, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, COMMON["vocab_size"], (batch, n), generator=g)


def _pad(n, pads, side):
    """2D attention mask [B, n]: ``pads[b]`` padding tokens on the left or the right."""
    mask = torch.ones(len(pads), n, dtype=torch.long)
    for b, p in enumerate(pads):
        if p:
            if side == "left":
                mask[b, :p] = 0
            else:
                mask[b, n - p :] = 0
    return mask


def _records(model, prefill=False):
    return tf.last_record(model, prefill=prefill)


def _paths(model, prefill=False):
    return {i: (r.path, r.reason, r.varlen) for i, r in _records(model, prefill).items()}


def _close_on(valid, out, ref, tol=1e-4):
    """out == ref on the valid positions; out finite everywhere."""
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[valid], ref[valid], atol=tol, rtol=tol)


# --- whole models ----------------------------------------------------------------------


@pytest.mark.parametrize("arch,side", [("llama", "left"), ("llama", "right"), ("qwen2", "right"), ("gemma3", "left")])
@torch.no_grad()
def test_padded_batch_equals_sdpa(arch, side):
    model = _model(arch)
    n = 130
    ids = _ids(n, 3, seed=1)
    mask = _pad(n, [0, 37, 101], side)
    ref = model(ids, attention_mask=mask).logits
    flexprefill.patch(model, EXACT, collect_stats=True)
    try:
        out = model(ids, attention_mask=mask).logits
        recs = _records(model)
    finally:
        flexprefill.unpatch(model)
    _close_on(mask.bool(), out, ref)
    full = [1] if arch == "gemma3" else [0, 1]
    if arch == "gemma3":
        assert (recs[0].path, recs[0].reason) == ("dense", "sliding_window")
    for i in full:
        r = recs[i]
        assert (r.path, r.reason, r.varlen) == ("flexprefill", "", True)
        assert r.lengths == ((130, 130), (93, 93), (29, 29))
        assert r.stats.density.shape == (3, 4) and torch.all(r.stats.density == 1.0)


@pytest.mark.parametrize("pads", [[0, 0], [0, 45]], ids=["no_padding", "left_padding"])
@torch.no_grad()
def test_chunked_prefill_over_cache_equals_sdpa(llama, pads):
    n, cut = 150, 70
    ids = _ids(n, 2, seed=2)
    mask = _pad(n, pads, "left")

    def two_chunks():
        cache = transformers.DynamicCache(config=llama.config)
        first = llama(ids[:, :cut], attention_mask=mask[:, :cut], use_cache=True, **with_cache(llama, cache)).logits
        rec_first = _paths(llama)
        rest = llama(ids[:, cut:], attention_mask=mask, use_cache=True, **with_cache(llama, cache)).logits
        return torch.cat([first, rest], 1), rec_first, _records(llama)

    ref, _, _ = two_chunks()
    flexprefill.patch(llama, EXACT)
    try:
        out, first, second = two_chunks()
    finally:
        flexprefill.unpatch(llama)
    _close_on(mask.bool(), out, ref)
    # the first chunk: plain causal (no mask at all) or padded; the second reads the cache
    assert first == {i: ("flexprefill", "", bool(pads[1])) for i in (0, 1)}
    for r in second.values():
        assert (r.path, r.reason, r.varlen) == ("flexprefill", "", True)
        assert (r.q_len, r.k_len) == (n - cut, n)
        assert r.lengths == ((n - cut, n), (n - cut, n - pads[1]))
    # and the chunks equal one full prefill (gamma=1)
    torch.testing.assert_close(out[mask.bool()], llama(ids, attention_mask=mask).logits[mask.bool()], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_static_cache_prefill_equals_sdpa(llama):
    n, cut = 112, 48
    ids = _ids(n, 2, seed=3)

    def run(mask):
        cache = transformers.StaticCache(config=llama.config, max_cache_len=144)
        m1 = None if mask is None else mask[:, :cut]
        a = llama(ids[:, :cut], attention_mask=m1, use_cache=True, **with_cache(llama, cache)).logits
        recs = [_paths(llama)]
        b = llama(ids[:, cut:], attention_mask=mask, use_cache=True, **with_cache(llama, cache)).logits
        recs.append(_paths(llama))
        return torch.cat([a, b], 1), recs

    for mask in (None, _pad(n, [0, 30], "left")):
        ref, _ = run(mask)
        flexprefill.patch(llama, EXACT)
        try:
            out, recs = run(mask)
        finally:
            flexprefill.unpatch(llama)
        valid = torch.ones(2, n, dtype=torch.bool) if mask is None else mask.bool()
        _close_on(valid, out, ref)
        # an empty static cache without padding gets no mask (SDPA: top-left causal over the
        # first keys): the batched operator; with padding or a filled cache: packed rows
        assert recs[0] == {i: ("flexprefill", "", mask is not None) for i in (0, 1)}
        assert recs[1] == {i: ("flexprefill", "", True) for i in (0, 1)}


@torch.no_grad()
def test_generate_after_padded_prefill_matches_sdpa(llama):
    n = 120
    ids = _ids(n, 3, seed=4)
    mask = _pad(n, [0, 20, 77], "left")
    dense = llama.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    flexprefill.patch(llama, EXACT)
    try:
        sparse = llama.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert _paths(llama) == {i: ("dense", "decode", False) for i in (0, 1)}
        assert _paths(llama, prefill=True) == {i: ("flexprefill", "", True) for i in (0, 1)}
    finally:
        flexprefill.unpatch(llama)
    assert torch.equal(sparse, dense)


@torch.no_grad()
def test_sequence_shorter_than_min_seq_len_in_a_batch(llama):
    n = 160
    ids = _ids(n, 2, seed=5)
    mask = _pad(n, [0, 100], "right")  # lengths 160 and 60
    mask3 = _pad(n, [15, 100], "left")  # 145 and 60 tokens in 160 positions
    ref = llama(ids, attention_mask=mask).logits
    ref3 = llama(ids, attention_mask=mask3).logits
    # the long sequence is searched, the short one runs dense inside the operator
    cfg = EXACT.replace(min_seq_len=100)
    flexprefill.patch(llama, cfg, collect_stats=True)
    try:
        out = llama(ids, attention_mask=mask).logits
        recs = _records(llama)
        for r in recs.values():
            assert (r.path, r.varlen, r.lengths) == ("flexprefill", True, ((160, 160), (60, 60)))
            assert not torch.isnan(r.stats.js_distance[0]).any()  # searched
            assert torch.isnan(r.stats.js_distance[1]).all()  # ran dense inside the operator
        _close_on(mask.bool(), out, ref)
        # every sequence short: SDPA, decided from the key length alone or from the mask
        flexprefill.patch(llama, cfg.replace(min_seq_len=161))
        out2 = llama(ids, attention_mask=mask).logits
        assert _paths(llama) == {i: ("dense", "short", False) for i in (0, 1)}
        flexprefill.patch(llama, cfg.replace(min_seq_len=150))
        out3 = llama(ids, attention_mask=mask3).logits
        assert _paths(llama) == {i: ("dense", "short", False) for i in (0, 1)}
    finally:
        flexprefill.unpatch(llama)
    torch.testing.assert_close(out2, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out3, ref3, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mask_is_read_once_per_forward(llama, monkeypatch):
    calls = []
    real = tf._analyse_mask
    monkeypatch.setattr(tf, "_analyse_mask", lambda *a: calls.append(a[1:]) or real(*a))
    ids = _ids(100, 2, seed=6)
    mask = _pad(100, [0, 9], "left")
    flexprefill.patch(llama, EXACT)
    try:
        llama(ids, attention_mask=mask)
        assert calls == [(2, 4, 100, 100, None)]  # two layers, one analysis (one host sync); no window
        llama(ids, attention_mask=mask)
        assert len(calls) == 2  # a new forward builds a new mask
    finally:
        flexprefill.unpatch(llama)


@torch.no_grad()
def test_selector_hook_is_not_given_padded_batches(llama):
    ids = _ids(100, 2, seed=7)
    mask = _pad(100, [0, 9], "left")
    ref = llama(ids, attention_mask=mask).logits

    def selector(q, k, *, config, softmax_scale):
        raise AssertionError("a custom selector takes plain batches only")

    flexprefill.patch(llama, EXACT, selector=selector)
    try:
        out = llama(ids, attention_mask=mask).logits
        assert _paths(llama) == {i: ("dense", "selector_varlen", False) for i in (0, 1)}
    finally:
        flexprefill.unpatch(llama)
    torch.testing.assert_close(out, ref)


# --- the attention function on masks built by transformers ------------------------------


def _module(cfg=EXACT):
    import types

    mod = types.SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=2, training=False, config=types.SimpleNamespace())
    setattr(mod, tf._STATE, tf._PatchState(cfg, None, None, False, []))
    return mod


def _qkv(B, n, K, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 4, n, 64, generator=g) * 2
    k = torch.randn(B, 2, K, 64, generator=g) * 2
    v = torch.randn(B, 2, K, 64, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _case(kind, B, n, P, g):
    """2D padding over the ``P + n`` positions of a chunk after a prefix of ``P``."""
    total = P + n
    pad = torch.ones(B, total, dtype=torch.bool)
    for b in range(B):
        r = lambda hi: int(torch.randint(0, max(1, hi), (1,), generator=g))  # noqa: E731
        if kind in ("left", "both"):
            pad[b, : r(total)] = False
        if kind in ("right", "both"):
            cut = r(n)
            if cut:
                pad[b, total - cut :] = False
        if kind == "hole" and b == B - 1:
            pad[b, 3:9] = False
    return pad


def _check(mask, pad2d, P, out, ref, expect_reason, mod):
    rec = getattr(mod, tf._LAST)
    assert rec.reason == expect_reason, (rec, mask.shape)
    assert torch.isfinite(out).all()
    if expect_reason:
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        return
    valid = pad2d[:, P:]  # [B, n]: query rows that are real tokens
    tol = 5e-3 if out.dtype == torch.float16 else 1e-4
    torch.testing.assert_close(out[valid].float(), ref[valid].float(), atol=tol, rtol=tol)
    assert torch.all(out[~valid] == 0)


@pytest.mark.parametrize("kind", ["none", "left", "right", "both", "hole"])
def test_attention_function_on_transformers_masks(kind):
    g = torch.Generator().manual_seed(["none", "left", "right", "both", "hole"].index(kind))
    mod = _module()
    for trial in range(3):
        B = 1 + trial
        n = int(torch.randint(40, 130, (1,), generator=g))
        P = [0, 70, 33][trial]
        pad2d = _case(kind, B, n, P, g)
        extra = 20 if trial == 2 else 0  # a static cache: unused slots past the tokens
        K = P + n + extra
        am = torch.cat([pad2d, torch.zeros(B, extra, dtype=torch.bool)], 1)
        mask = sdpa_mask(batch_size=B, q_length=n, kv_length=K, q_offset=P, attention_mask=am, allow_is_causal_skip=False)
        q, k, v = _qkv(B, n, K, seed=trial)
        ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.125)
        out, _ = tf.attention_forward(mod, q, k, v, mask, scaling=0.125)
        empty = ~pad2d.any(-1)
        expect = "custom_mask" if kind == "hole" or bool(empty.all()) else ""
        _check(mask, pad2d, P, out, ref, expect, mod)
        rec = getattr(mod, tf._LAST)
        if not expect:
            assert rec.varlen == (kind != "none" or P > 0 or extra > 0)


def test_masks_that_are_not_causal_plus_padding_run_sdpa():
    mod = _module()
    n = 96
    q, k, v = _qkv(2, n, n, seed=9)
    ar = torch.arange(n)
    causal = (ar[:, None] >= ar[None, :])[None, None].expand(2, 1, n, n)
    window = causal & (ar[:, None] - ar[None, :] < 40)
    seg = (ar >= 50).long()
    packed = causal & (seg[:, None] == seg[None, :])
    prefix_lm = causal | ((ar[:, None] < 10) & (ar[None, :] < 10))
    one_row_blind = causal & ~((ar[:, None] == 50) & (ar[None, :] == 50))
    right = causal & (ar[None, :] < 70)  # right padding: accepted
    heads_differ = torch.cat([right[:, :1], causal[:, :1], right[:, :1], right[:, :1]], 1)
    bias = torch.zeros(2, 1, n, n).masked_fill(~causal, float("-inf")) + 0.5 * causal  # a bias, not a mask
    hole = causal & ((ar[None, :] < 20) | (ar[None, :] >= 30))
    # every row sees the keys before it, not itself: exactly causal with the queries one
    # position later; row 0 sees nothing (SDPA gives zeros there too)
    strict = causal & (ar[:, None] != ar[None, :])
    all_rows = torch.ones(2, n, dtype=torch.bool)
    first_70 = all_rows.clone()
    first_70[:, 70:] = False
    cases = {
        "window": (window, "custom_mask", None),
        "packed": (packed, "custom_mask", None),
        "prefix_lm": (prefix_lm, "custom_mask", None),
        "one_row_blind": (one_row_blind, "custom_mask", None),
        "heads_differ": (heads_differ, "custom_mask", None),
        "bias": (bias, "custom_mask", None),
        "hole": (hole, "custom_mask", None),
        "right": (right, "", first_70),
        "right_additive": (torch.zeros(2, 1, n, n).masked_fill(~right, torch.finfo(torch.float32).min), "", first_70),
        "right_per_head": (right.expand(2, 4, n, n), "", first_70),
        "right_batch_broadcast": (right[:1], "", first_70),
        "strict": (strict, "", all_rows),
    }
    for name, (mask, reason, valid) in cases.items():
        ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.125)
        out, _ = tf.attention_forward(mod, q, k, v, mask, scaling=0.125)
        _check(mask, valid, 0, out, ref, reason, mod)
    # masks that do not fit the call's shapes: SDPA decides (and refuses them)
    for bad in (causal[..., : n - 1], right.expand(2, 2, n, n)):
        with pytest.raises(RuntimeError):
            tf.attention_forward(mod, q, k, v, bad, scaling=0.125)
        assert getattr(mod, tf._LAST).reason == "custom_mask"


def test_fully_padded_element_gives_zeros():
    mod = _module()
    n = 64
    pad2d = torch.ones(2, n, dtype=torch.bool)
    pad2d[1] = False
    mask = sdpa_mask(batch_size=2, q_length=n, kv_length=n, attention_mask=pad2d, allow_is_causal_skip=False)
    q, k, v = _qkv(2, n, n, seed=10)
    ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.125)
    out, _ = tf.attention_forward(mod, q, k, v, mask, scaling=0.125)
    _check(mask, pad2d, 0, out, ref, "", mod)
    assert getattr(mod, tf._LAST).lengths == ((64, 64),)


@pytest.mark.skipif(not (GPU or INTERPRET), reason="needs CUDA or the Triton interpreter")
def test_triton_kernels_on_padded_and_chunked_masks():
    # the device path of the operator (Triton; the CPU interpreter here), fp16 as on a GPU
    dev = "cuda" if GPU else "cpu"
    dtype = torch.float16 if GPU else torch.float32
    mod = _module(EXACT.replace(backend="triton", min_seq_len=64))
    B, n = 2, 100
    for kind, P in (("left", 0), ("right", 0), ("both", 45)):
        pad2d = torch.ones(B, P + n, dtype=torch.bool)
        if kind == "left":
            pad2d[1, :50] = False  # 50 tokens: shorter than min_seq_len, dense in the operator
        elif kind == "right":
            pad2d[1, 60:] = False
        else:
            pad2d[1, :30] = False
            pad2d[1, -20:] = False
        pad2d = pad2d.to(dev)
        mask = sdpa_mask(
            batch_size=B, q_length=n, kv_length=P + n, q_offset=P, attention_mask=pad2d, allow_is_causal_skip=False,
            device=dev,
        )
        q, k, v = _qkv(B, n, P + n, seed=12, dtype=dtype, device=dev)
        ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.125)
        out, _ = tf.attention_forward(mod, q, k, v, mask, scaling=0.125)
        _check(mask, pad2d, P, out, ref, "", mod)
        assert getattr(mod, tf._LAST).varlen
