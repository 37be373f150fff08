"""The public operator: input checks, dense fallback, outputs users rely on."""

import math

import pytest
import torch

import flexprefill as fp
from flexprefill import reference as R
from flexprefill_tools.synthetic import structured_qkv


def _qkv(B=1, N=200, Hq=4, Hkv=2, D=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, N, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, N, Hkv, D, generator=g).to(dtype)
    return q, k, v


# --- configuration -----------------------------------------------------------------

@pytest.mark.parametrize(
    "kw,exc,word",
    [
        (dict(block_size=48), ValueError, "block_size"),
        (dict(block_size=True), ValueError, "block_size"),
        (dict(gamma=0.0), ValueError, "gamma"),
        (dict(gamma=1.5), ValueError, "gamma"),
        (dict(gamma="0.9"), TypeError, "gamma"),
        (dict(gamma=float("nan")), TypeError, "gamma"),
        (dict(tau=-0.1), ValueError, "tau"),
        (dict(min_budget=-1), ValueError, "min_budget"),
        (dict(max_budget=0), ValueError, "max_budget"),
        (dict(max_budget=1.5), TypeError, "max_budget"),
        (dict(min_seq_len=-5), ValueError, "min_seq_len"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(dense_above=0.0), ValueError, "dense_above"),
        (dict(dense_above=1.5), ValueError, "dense_above"),
        (dict(dense_above="0.8"), TypeError, "dense_above"),
    ],
)
def test_config_rejects_bad_values(kw, exc, word):
    with pytest.raises(exc, match=word):
        fp.FlexPrefillConfig(**kw)


def test_config_is_frozen_and_replace_validates():
    cfg = fp.FlexPrefillConfig()
    with pytest.raises(Exception):
        cfg.gamma = 0.5
    assert cfg.replace(gamma=0.95).gamma == 0.95
    with pytest.raises(ValueError, match="gamma"):
        cfg.replace(gamma=2.0)
    assert fp.FlexPrefillConfig(block_size=64, min_budget=100).min_budget_blocks == 2
    assert fp.FlexPrefillConfig(block_size=64, max_budget=129).max_budget_blocks == 3


# --- input checks ------------------------------------------------------------------

def _bad_inputs():
    q, k, v = _qkv()
    return [
        pytest.param((q[0], k, v), ValueError, "q must have 4 dims", id="rank"),
        pytest.param((q, k[:, :100], v[:, :100]), ValueError, "sequence length", id="length"),
        pytest.param((q, torch.cat([k, k]), v), ValueError, "batch size", id="batch"),
        pytest.param((q, k[..., :32], v), ValueError, "head dim", id="head-dim-mismatch"),
        pytest.param((q[:, :, :3], k, v), ValueError, "multiple of key/value heads", id="gqa"),
        pytest.param((q, k, v[:, :, :1]), ValueError, "heads", id="v-heads"),
        pytest.param((q.double(), k.double(), v.double()), TypeError, "dtype", id="float64"),
        pytest.param((q, k.half(), v), TypeError, "share a dtype", id="mixed-dtype"),
        pytest.param((q[..., :48], k[..., :48], v[..., :48]), ValueError, "head dim D=48", id="head-dim-48"),
        pytest.param((q[:, :0], k[:, :0], v[:, :0]), ValueError, "empty", id="empty"),
        pytest.param((q.numpy(), k, v), TypeError, "q must be a torch.Tensor", id="numpy"),
        pytest.param((q, k.to("meta"), v), ValueError, "device", id="device"),
    ]


@pytest.mark.parametrize("args,exc,msg", _bad_inputs())
def test_bad_inputs_raise_clear_errors(args, exc, msg):
    with pytest.raises(exc, match=msg):
        fp.flex_prefill_attention(*args)


def test_bad_keyword_arguments():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="config"):
        fp.flex_prefill_attention(q, k, v, config={"gamma": 0.9})
    with pytest.raises(ValueError, match="softmax_scale"):
        fp.flex_prefill_attention(q, k, v, softmax_scale=-1.0)
    with pytest.raises(TypeError):
        fp.flex_prefill_attention(q, k, v, fp.FlexPrefillConfig())  # keyword-only
    sel = fp.select_blocks(q, k, config=fp.FlexPrefillConfig(block_size=32))
    with pytest.raises(ValueError, match="selection"):
        fp.block_sparse_attention(q[:, :150], k[:, :150], v[:, :150], sel)
    with pytest.raises(TypeError, match="BlockSelection"):
        fp.block_sparse_attention(q, k, v, sel.to_mask())


# --- behaviour -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dense_fallback_below_min_seq_len(backend):
    q, k, v = _qkv(N=150, dtype=torch.float16 if backend == "triton" else torch.float32)
    cfg = fp.FlexPrefillConfig(block_size=32, min_seq_len=151, gamma=0.3, min_budget=0, backend=backend)
    out, lse, stats = fp.flex_prefill_attention(q, k, v, config=cfg, return_lse=True, return_stats=True)
    ref, ref_lse = R.dense_attention(q.float(), k.float(), v.float(), return_lse=True)
    assert stats.dense and stats.patterns()[0] == ["dense"] * 4
    assert torch.all(stats.density == 1)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)
    # at min_seq_len the search runs, and gamma=0.3 drops blocks
    _, stats = fp.flex_prefill_attention(q, k, v, config=cfg.replace(min_seq_len=150), return_stats=True)
    assert not stats.dense and bool((stats.density < 1).all())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("N,Hq,Hkv,bs", [(257, 4, 2, 32), (640, 2, 1, 64), (130, 2, 2, 128)])
def test_gamma_one_is_dense_attention(backend, N, Hq, Hkv, bs):
    dtype = torch.float16 if backend == "triton" else torch.float32
    q, k, v = _qkv(N=N, Hq=Hq, Hkv=Hkv, dtype=dtype, seed=N)
    cfg = fp.FlexPrefillConfig(block_size=bs, gamma=1.0, min_seq_len=0, backend=backend)
    out, lse, stats = fp.flex_prefill_attention(q, k, v, config=cfg, return_lse=True, return_stats=True)
    ref, ref_lse = R.dense_attention(q.float(), k.float(), v.float(), return_lse=True)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (1, Hq, N)
    assert torch.all(stats.density == 1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_operator_equals_its_two_halves(backend):
    dtype = torch.float16 if backend == "triton" else torch.float32
    q, k, v = structured_qkv(2, 700, 4, 2, 64, seed=1, dtype=dtype)
    cfg = fp.FlexPrefillConfig(block_size=64, min_seq_len=0, min_budget=128, backend=backend)
    out, stats = fp.flex_prefill_attention(q, k, v, config=cfg, return_stats=True)
    sel = fp.select_blocks(q, k, config=cfg)
    out2 = fp.block_sparse_attention(q, k, v, sel, backend=backend)
    assert torch.equal(out, out2)
    assert torch.equal(stats.num_blocks, sel.counts.sum(-1).long())
    nb = math.ceil(700 / 64)
    torch.testing.assert_close(stats.density, stats.num_blocks.float() / (nb * (nb + 1) / 2))
    # the selection keeps most of the attention on structured inputs: close to dense
    dense = R.dense_attention(q.float(), k.float(), v.float())
    err = (out.float() - dense).norm() / dense.norm()
    assert err < 0.5, err
    assert bool((stats.density < 1).any())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dense_above_runs_dense_attention_on_a_near_dense_selection(backend):
    """Random inputs keep most blocks: with dense_above under their density the call is exact
    dense attention (stats say dense); at 1.0, or with an LSE asked, it stays sparse."""
    dtype = torch.float16 if backend == "triton" else torch.float32
    q, k, v = _qkv(N=640, dtype=dtype, seed=4)
    cfg = fp.FlexPrefillConfig(block_size=32, min_seq_len=0, min_budget=64, backend=backend)
    sparse, st = fp.flex_prefill_attention(q, k, v, config=cfg, return_stats=True)
    density = float(st.density.mean())
    assert 0.5 < density < 1 and not st.dense
    out, st2 = fp.flex_prefill_attention(q, k, v, config=cfg.replace(dense_above=0.5), return_stats=True)
    assert st2.dense and st2.patterns()[0][0] == "dense"
    assert torch.equal(st2.num_blocks, st.num_blocks)  # the selection that was not used
    dense = R.dense_attention(q.float(), k.float(), v.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (out.float() - dense).abs().max().item() < tol
    assert (sparse.float() - dense).abs().max().item() > 10 * tol  # the fallback changed the answer
    same = fp.flex_prefill_attention(q, k, v, config=cfg.replace(dense_above=1.0))
    assert torch.equal(same, sparse)
    with_lse, _ = fp.flex_prefill_attention(q, k, v, config=cfg.replace(dense_above=0.5), return_lse=True)
    assert torch.equal(with_lse, sparse)


def test_return_signature_combinations():
    q, k, v = _qkv(N=100)
    cfg = fp.FlexPrefillConfig(block_size=32, min_seq_len=0, backend="reference")
    out = fp.flex_prefill_attention(q, k, v, config=cfg)
    assert isinstance(out, torch.Tensor)
    out, lse = fp.flex_prefill_attention(q, k, v, config=cfg, return_lse=True)
    assert lse.dtype == torch.float32
    out, stats = fp.flex_prefill_attention(q, k, v, config=cfg, return_stats=True)
    assert isinstance(stats, fp.PatternStats)
    out, lse, stats = fp.flex_prefill_attention(q, k, v, config=cfg, return_lse=True, return_stats=True)
    assert stats.patterns()[0][0] in ("query_aware", "vertical_slash")


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    import importlib

    O = importlib.import_module("flexprefill.options")

    monkeypatch.setattr(O, "_TRITON_INTERPRET", False)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        fp.flex_prefill_attention(q, k, v, config=fp.FlexPrefillConfig(backend="triton"))


def test_auto_backend_on_cpu_uses_torch():
    q, k, v = _qkv(N=96)
    cfg = fp.FlexPrefillConfig(block_size=32, min_seq_len=0)
    out = fp.flex_prefill_attention(q, k, v, config=cfg)
    assert torch.equal(out, fp.flex_prefill_attention(q, k, v, config=cfg.replace(backend="torch")))
    ref = R.flex_prefill_attention(q, k, v, config=cfg)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
