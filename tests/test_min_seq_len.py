"""The per-shape default of min_seq_len: the table lookup, and the operator and the
transformers integration using it when a config leaves the field None."""

import pytest
import torch

import flexprefill as fp
from flexprefill import config as C

transformers = pytest.importorskip("transformers")


def test_default_is_none_and_explicit_values_are_kept():
    assert fp.FlexPrefillConfig().min_seq_len is None
    cfg = fp.FlexPrefillConfig(min_seq_len=4096)
    assert cfg.min_seq_len_for(head_dim=128, q_heads=32, kv_heads=8, device="sm90") == 4096
    assert fp.FlexPrefillConfig(min_seq_len=0).min_seq_len == 0


@pytest.mark.parametrize("value, err", [(-1, ValueError), ("32k", TypeError), (1.5, TypeError), (True, TypeError)])
def test_bad_min_seq_len_is_refused(value, err):
    with pytest.raises(err, match="min_seq_len"):
        fp.FlexPrefillConfig(min_seq_len=value)


@pytest.mark.parametrize(
    "kind, D, Hq, Hkv, want",
    [
        pytest.param("sm90", 128, 32, 8, 16384, id="sm90-llama-32/8-d128"),
        pytest.param("sm90", 128, 8, 2, 16384, id="sm90-same-ratio-fewer-heads"),
        pytest.param("sm90", 256, 4, 1, 16384, id="sm90-gemma-4/1-d256"),
        pytest.param("sm90", 64, 9, 3, 32768, id="sm90-smollm2-9/3-d64"),
        pytest.param("sm90", 64, 14, 2, C.DEFAULT_MIN_SEQ_LEN, id="sm90-unmeasured-14/2-d64"),
        pytest.param("sm80", 128, 32, 8, C.DEFAULT_MIN_SEQ_LEN, id="sm80-unmeasured-device"),
        pytest.param("cpu", 64, 9, 3, 16384, id="cpu-smollm2-9/3-d64"),
        pytest.param("cpu", 128, 32, 8, C.DEFAULT_MIN_SEQ_LEN, id="cpu-unmeasured"),
    ],
)
def test_table_lookup_by_device_kind_head_dim_and_gqa_ratio(kind, D, Hq, Hkv, want):
    device = torch.device("cpu") if kind == "cpu" else kind
    assert C.default_min_seq_len(head_dim=D, q_heads=Hq, kv_heads=Hkv, device=device) == want
    assert fp.FlexPrefillConfig().min_seq_len_for(head_dim=D, q_heads=Hq, kv_heads=Hkv, device=device) == want


def test_every_table_value_is_a_sane_length():
    for (kind, D, G), n in C.MIN_SEQ_LEN_BY_SHAPE.items():
        assert kind == "cpu" or kind.startswith("sm"), kind
        assert D in (64, 80, 96, 128, 256) and G >= 1 and n >= 0


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        C.default_min_seq_len(head_dim=64, q_heads=9, kv_heads=2, device="cpu")
    with pytest.raises(ValueError, match="head_dim"):
        C.default_min_seq_len(head_dim=0, q_heads=4, kv_heads=2, device="cpu")


def test_device_kind():
    assert C.device_kind("cpu") == "cpu" and C.device_kind(torch.device("cpu")) == "cpu"


@pytest.mark.gpu
def test_device_kind_of_a_gpu_is_its_compute_capability():
    major, minor = torch.cuda.get_device_capability()
    assert C.device_kind("cuda") == C.device_kind(torch.device("cuda", torch.cuda.current_device())) == f"sm{major}{minor}"


def _qkv(N, Hq=4, Hkv=2, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, N, h, D, generator=g) for h in (Hq, Hkv, Hkv))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_operator_runs_dense_below_the_shapes_default(backend, monkeypatch):
    # a small break-even for the 4/2 d64 shape on the CPU: dense below it, searched from it on
    monkeypatch.setitem(C.MIN_SEQ_LEN_BY_SHAPE, ("cpu", 64, 2), 320)
    cfg = fp.FlexPrefillConfig(block_size=32, gamma=0.3, min_budget=0, backend=backend)
    q, k, v = _qkv(319)
    _, stats = fp.flex_prefill_attention(q, k, v, config=cfg, return_stats=True)
    assert stats.dense
    q, k, v = _qkv(320)
    _, stats = fp.flex_prefill_attention(q, k, v, config=cfg, return_stats=True)
    assert not stats.dense and bool((stats.density < 1).all())
    # another shape keeps the fallback: 320 tokens run dense
    q, k, v = _qkv(320, Hq=4, Hkv=4)
    assert fp.flex_prefill_attention(q, k, v, config=cfg, return_stats=True)[1].dense


def test_varlen_operator_uses_the_shapes_default(monkeypatch):
    monkeypatch.setitem(C.MIN_SEQ_LEN_BY_SHAPE, ("cpu", 64, 2), 300)
    cfg = fp.FlexPrefillConfig(block_size=32, gamma=0.3, min_budget=0, backend="torch")
    lens = [200, 400]
    q, k, v = (t[0] for t in _qkv(sum(lens)))
    cu = torch.tensor([0, 200, 600], dtype=torch.int32)
    _, stats = fp.flex_prefill_attention_varlen(q, k, v, cu, cu, 400, 400, config=cfg, return_stats=True)
    # the 200-token sequence ran dense (every block), the 400-token one was searched
    assert bool((stats.density[0] == 1).all()) and bool((stats.density[1] < 1).all())


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, vocab_size=128, max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def test_integration_uses_the_shapes_default(monkeypatch):
    from flexprefill.integrations import transformers as tf

    monkeypatch.setitem(C.MIN_SEQ_LEN_BY_SHAPE, ("cpu", 64, 2), 256)
    model = _tiny_llama()
    fp.patch(model, fp.FlexPrefillConfig(block_size=32, gamma=0.9, min_budget=0))
    try:
        paths = {}
        for n in (255, 256):
            model(input_ids=torch.randint(0, 128, (1, n)))
            paths[n] = {(r.path, r.reason) for r in tf.last_record(model, prefill=True).values()}
    finally:
        fp.unpatch(model)
    assert {p for p, _ in paths[256]} == {"flexprefill"}
    assert {reason for _, reason in paths[255]} == {"short"}
