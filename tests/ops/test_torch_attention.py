"""The vectorised plain-torch block-sparse attention against the fp32 oracle.

Tolerance: the error against ``reference.py`` (fp32 on the dtype-rounded inputs) may be at
most twice the error of the same attention computed by PyTorch in the input dtype, plus a
small floor for fp32.  Outputs are poisoned with NaN so an unwritten row fails.
"""

import math

import pytest
import torch

from flexprefill import reference as R
from flexprefill.block_table import VarlenBlockSelection, compact_block_mask, mask_to_selection
from flexprefill.ops import torch_attention as TA

_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _qkv(B, N, Hq, Hkv, D, dtype, seed, n_k=None):
    g = torch.Generator().manual_seed(seed)
    n_k = n_k or N
    q = torch.randn(B, N, Hq, D, generator=g)
    k = torch.randn(B, n_k, Hkv, D, generator=g)
    v = torch.randn(B, n_k, Hkv, D, generator=g)
    return tuple(t.to(dtype) for t in (q, k, v))


def _mask(B, Hq, nb, density, seed, kind="random"):
    g = torch.Generator().manual_seed(seed + 7)
    mask = torch.rand(B, Hq, nb, nb, generator=g) < density
    mask |= torch.eye(nb, dtype=torch.bool)
    if kind == "empty_rows":
        mask[:, :, 1::3] = False
    elif kind == "full_rows":
        mask[:, :, ::2] = True
    elif kind == "no_diagonal":
        mask &= ~torch.eye(nb, dtype=torch.bool)
    return mask & torch.ones(nb, nb, dtype=torch.bool).tril()


def _in_dtype(q, k, v, allowed, scale):
    """The same attention computed by PyTorch in the input dtype: its error sets the tolerance."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    s = (qh @ kh.transpose(-1, -2)).float() * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0).to(q.dtype)
    return (p @ vh).transpose(1, 2)


def _token_mask(block_mask, n_q, n_k, bs):
    bq = torch.arange(n_k - n_q, n_k) // bs
    bk = torch.arange(n_k) // bs
    causal = torch.arange(n_k)[None, :] <= torch.arange(n_k - n_q, n_k)[:, None]
    return block_mask[:, :, bq][:, :, :, bk] & causal


def _check(out, lse, q, k, v, allowed, scale, ref_out, ref_lse):
    seen = allowed.any(-1)  # [B, Hq, N]: rows with a visible key
    assert out.dtype == q.dtype and not out.isnan().any(), "NaN (an unwritten row) in the output"
    ref_out = torch.where(seen.transpose(1, 2)[..., None], ref_out, 0.0)
    err = (out.float() - ref_out).abs().max().item()
    pt_err = (_in_dtype(q, k, v, allowed, scale).float() - ref_out).abs().max().item()
    assert err <= 2 * pt_err + _FLOOR[q.dtype], (err, pt_err)
    if lse is not None:
        assert torch.equal(lse.isinf(), ~seen)
        fin = seen
        tol = 1e-5 if q.dtype == torch.float32 else 2e-2
        assert (lse[fin] - ref_lse[fin]).abs().max().item() <= tol


CASES = [
    pytest.param(63, 4, 4, 64, 32, torch.float32, "random", id="N63-H4/4-D64-bs32-fp32"),
    pytest.param(1000, 6, 2, 80, 64, torch.float32, "random", id="N1000-H6/2-D80-bs64-fp32"),
    pytest.param(1000, 8, 2, 128, 128, torch.float16, "empty_rows", id="N1000-H8/2-D128-bs128-fp16-empty"),
    pytest.param(1000, 3, 1, 256, 64, torch.bfloat16, "full_rows", id="N1000-H3/1-D256-bs64-bf16-full"),
    pytest.param(4097, 4, 1, 64, 128, torch.bfloat16, "random", id="N4097-H4/1-D64-bs128-bf16"),
    pytest.param(4097, 3, 3, 64, 128, torch.float32, "no_diagonal", id="N4097-H3/3-D64-bs128-fp32-nodiag"),
    pytest.param(777, 6, 2, 64, 32, torch.float16, "random", id="N777-H6/2-D64-bs32-fp16"),
]


@pytest.mark.parametrize("N,Hq,Hkv,D,bs,dtype,kind", CASES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "bmm"])
def test_matches_reference(N, Hq, Hkv, D, bs, dtype, kind, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(TA, "_flash_cpu", lambda: None)
    B = 1 if N > 2000 else 2
    q, k, v = _qkv(B, N, Hq, Hkv, D, dtype, seed=N + D)
    nb = math.ceil(N / bs)
    mask = _mask(B, Hq, nb, 0.3, seed=N, kind=kind)
    sel = mask_to_selection(mask, block_size=bs, seq_len=N, query_aware=torch.zeros(B, Hq, dtype=torch.bool),
                            js_distance=torch.zeros(B, Hq))
    scale = 0.7 / math.sqrt(D)
    out, lse = TA.sparse_attention(q, k, v, sel.counts, sel.indices, block_size=bs, softmax_scale=scale, return_lse=True)
    assert lse.shape == (B, Hq, N)
    ref, ref_lse = R.block_sparse_attention(q.float(), k.float(), v.float(), sel, softmax_scale=scale, return_lse=True)
    _check(out, lse, q, k, v, _token_mask(mask, N, N, bs), scale, ref, ref_lse)
    assert torch.equal(TA.sparse_attention(q, k, v, sel.counts, sel.indices, block_size=bs, softmax_scale=scale), out)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "bmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varlen_chunks_over_cached_prefix(dtype, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(TA, "_flash_cpu", lambda: None)
    bs, Hq, Hkv, D = 64, 6, 2, 64
    # (n_q, n_k): full sequence, chunk with an unaligned prefix, one query, a chunk with an aligned prefix
    lens = [(300, 300), (150, 437), (1, 200), (128, 256)]
    max_nb = math.ceil(max(nk for _, nk in lens) / bs)
    g = torch.Generator().manual_seed(3)
    qs, ks, vs, masks = [], [], [], []
    for i, (nq, nk) in enumerate(lens):
        q, k, v = _qkv(1, nq, Hq, Hkv, D, dtype, seed=10 + i, n_k=nk)
        qs.append(q[0]), ks.append(k[0]), vs.append(v[0])
        nb = math.ceil(nk / bs)
        m = torch.zeros(Hq, max_nb, max_nb, dtype=torch.bool)
        m[:, :nb, :nb] = _mask(1, Hq, nb, 0.4, seed=i)[0]
        m[:, : (nk - nq) // bs] = False
        masks.append(m)
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    cu_q = torch.tensor([0] + [sum(a for a, _ in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(b for _, b in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    counts, indices = compact_block_mask(torch.stack(masks))
    sel = VarlenBlockSelection(counts, indices, bs, cu_q, cu_k, max(a for a, _ in lens), max(b for _, b in lens),
                               torch.zeros(len(lens), Hq, dtype=torch.bool), torch.zeros(len(lens), Hq))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((Hq, q.shape[0]), float("nan"))
    TA.sparse_attention_varlen(q, k, v, counts, indices, cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], block_size=bs,
                               softmax_scale=0.125, return_lse=True, out=out, lse=lse)
    ref, ref_lse = R.block_sparse_attention_varlen(q.float(), k.float(), v.float(), sel, cu_q, cu_k,
                                                   softmax_scale=0.125, return_lse=True)
    for i, (nq, nk) in enumerate(lens):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        allowed = _token_mask(torch.stack(masks)[i : i + 1], nq, nk, bs)
        _check(out[None, q0:q1], lse[None, :, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], allowed, 0.125,
               ref[None, q0:q1], ref_lse[None, :, q0:q1])


@pytest.mark.parametrize("window", [1, 100, 256, 5000], ids=lambda w: f"w{w}")
def test_sliding_window_matches_reference(window):
    q, k, v = _qkv(2, 1000, 4, 2, 64, torch.float32, seed=window)
    out, lse = TA.sliding_window_attention(q, k, v, window=window, softmax_scale=0.125, return_lse=True, block_size=64)
    ref, ref_lse = R.dense_attention(q, k, v, softmax_scale=0.125, return_lse=True, window=window)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_causal_with_and_without_lse(dtype):
    q, k, v = _qkv(1, 300, 6, 3, 64, dtype, seed=5)
    ref, ref_lse = R.dense_attention(q.float(), k.float(), v.float(), softmax_scale=0.125, return_lse=True)
    out = TA.dense_causal_attention(q, k, v, softmax_scale=0.125)
    out2, lse = TA.dense_causal_attention(q, k, v, softmax_scale=0.125, return_lse=True)
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    for o in (out, out2):
        assert (o.float() - ref).abs().max().item() <= tol
    assert (lse - ref_lse).abs().max().item() <= (1e-5 if dtype == torch.float32 else 2e-2)
