"""Logit soft-capping (``softcap``: scores ``s = scale * q.k`` become ``cap * tanh(s / cap)``
before the softmax) through the public operator, on every backend, against the fp32 oracle.

Dense batches, packed sequences with a chunk over a cached prefix, right-padded batches,
the short-sequence dense path, sliding windows and FlexAttention; the LSE is the capped one.
On a CPU the Triton kernels run in the interpreter (fp16/fp32; bf16 on the GPU).  Tolerance:
the error against ``reference.py`` (fp32 on the dtype-rounded inputs) may be at most twice
that of the same capped attention computed by PyTorch in the input dtype, plus a floor.
"""

import math

import pytest
import torch

import flexprefill as fp
from flexprefill import reference as R
from flexprefill.block_table import mask_to_selection
from flexprefill_tools.synthetic import structured_qkv

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
CAP = 1.5
_FLOOR = {F32: 1e-5, F16: 1e-4, BF16: 1e-3}
_LSE_FLOOR = 1e-4


def _backends():
    return ["triton", "torch"]


def _structured(B, N, Hq, Hkv, D, dtype, seed, n_k=None):
    n_k = n_k or N
    q, k, v = structured_qkv(B, n_k, Hq, Hkv, D, seed=seed, dtype=torch.float32, strength=2.0)
    return tuple(t.to(DEV, dtype) for t in (q[:, n_k - N:].contiguous(), k, v))


def _in_dtype(q, k, v, allowed, scale, cap):
    """The capped attention computed by PyTorch in the input dtype: its error sets the tolerance."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, 1)
    vh = v.transpose(1, 2).repeat_interleave(group, 1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = (cap * torch.tanh(s / cap)).float().masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0).to(q.dtype)
    return (p @ vh).transpose(1, 2), lse


def _assert_close_to(out, lse, ref, ref_lse, pt, pt_lse, dtype):
    """``out [.., H, D]``/``lse`` against the oracle, at twice PyTorch's in-dtype error."""
    assert out.dtype == dtype and not out.isnan().any()
    # the oracle's rows that see no key are NaN; the fast paths give zeros there
    empty = ref.isnan().any(-1)
    assert (out[empty] == 0).all()
    err = (out.float() - ref.float()).abs()[~empty]
    pt_err = (pt.float() - ref.float()).abs()[~empty]
    tol = 2 * pt_err.max().item() + _FLOOR[dtype]
    assert err.max().item() <= tol, (err.max().item(), tol)
    if lse is not None:
        lerr = (lse - ref_lse).abs()
        pt_lerr = (pt_lse - ref_lse).abs()
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        ltol = 2 * pt_lerr[finite].max().item() + _LSE_FLOOR
        assert lerr[finite].max().item() <= ltol, (lerr[finite].max().item(), ltol)


def _token_mask(sel, n_q, n_k):
    bs = sel.block_size
    bq = torch.arange(n_k - n_q, n_k, device=DEV) // bs
    bk = torch.arange(n_k, device=DEV) // bs
    causal = torch.arange(n_k, device=DEV)[None, :] <= torch.arange(n_k - n_q, n_k, device=DEV)[:, None]
    return sel.to_mask()[:, :, bq][:, :, :, bk] & causal


# --- the block-sparse attention over a given selection ---------------------------------


_SHAPES = {"N400-H4/2-D64-bs64": (400, 4, 2, 64, 64), "N333-H2/1-D128-bs32": (333, 2, 1, 128, 32),
           "N300-H2/2-D256-bs128": (300, 2, 2, 256, 128), "N400-H2/1-D80-bs64": (400, 2, 1, 80, 64)}
_ATTENTION_CASES = [
    pytest.param(*_SHAPES[shape], dtype, backend, id=f"{shape}-{name}-{backend}", marks=marks)
    for shape, dtype, name, backend, marks in [
        ("N400-H4/2-D64-bs64", F16, "fp16", "triton", ()),
        ("N333-H2/1-D128-bs32", F32, "fp32", "triton", ()),
        ("N300-H2/2-D256-bs128", F16, "fp16", "triton", ()),
        ("N400-H2/1-D80-bs64", F32, "fp32", "triton", ()),
        ("N400-H4/2-D64-bs64", F32, "fp32", "torch", ()),
        ("N333-H2/1-D128-bs32", F16, "fp16", "torch", ()),
        ("N300-H2/2-D256-bs128", F32, "fp32", "torch", ()),
        ("N400-H4/2-D64-bs64", BF16, "bf16", "triton", pytest.mark.gpu),
        ("N300-H2/2-D256-bs128", BF16, "bf16", "triton", pytest.mark.gpu),
    ] if dtype != F32 or not CUDA
]


@pytest.mark.parametrize("N,Hq,Hkv,D,bs,dtype,backend", _ATTENTION_CASES)
def test_block_sparse_attention_matches_reference(N, Hq, Hkv, D, bs, dtype, backend):
    q, k, v = _structured(1, N, Hq, Hkv, D, dtype, seed=N)
    nb = math.ceil(N / bs)
    g = torch.Generator().manual_seed(N)
    mask = (torch.rand(1, Hq, nb, nb, generator=g) < 0.4) | torch.eye(nb, dtype=torch.bool)
    mask[:, 0, 1::3] = False  # rows with nothing selected: zeros and lse -inf
    sel = mask_to_selection(mask.tril().to(DEV), block_size=bs, seq_len=N,
                            query_aware=torch.zeros(1, Hq, dtype=torch.bool, device=DEV),
                            js_distance=torch.zeros(1, Hq, device=DEV))
    scale = D**-0.5
    out, lse = fp.block_sparse_attention(q, k, v, sel, softmax_scale=scale, return_lse=True, backend=backend,
                                         softcap=CAP)
    ref, ref_lse = R.block_sparse_attention(q.float(), k.float(), v.float(), sel, softmax_scale=scale, return_lse=True,
                                            softcap=CAP)
    pt, pt_lse = _in_dtype(q, k, v, _token_mask(sel, N, N), scale, CAP)
    _assert_close_to(out, lse, ref, ref_lse, pt, pt_lse, dtype)
    assert (~torch.isfinite(ref_lse)).any()  # rows without a key were compared (zeros)
    # the same output without the lse; and the cap matters here
    out2 = fp.block_sparse_attention(q, k, v, sel, softmax_scale=scale, backend=backend, softcap=CAP)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    plain = R.block_sparse_attention(q.float(), k.float(), v.float(), sel, softmax_scale=scale)
    assert (plain - ref).nan_to_num(0).abs().max() > 0.05


# --- the whole operator -----------------------------------------------------------------


@pytest.mark.parametrize("dtype,backend", [
    pytest.param(F16, "triton", id="fp16-triton"), pytest.param(F32, "torch", id="fp32-torch"),
    pytest.param(BF16, "triton", id="bf16-triton", marks=pytest.mark.gpu),
])
def test_operator_selection_and_output_match_reference(dtype, backend):
    # gamma < 1: the operator's capped selection is the oracle's (block counts per head), and
    # the output is the oracle's capped attention over it
    if CUDA and dtype == F32:
        pytest.skip("fp32 is a CPU dtype of the API")
    B, N, Hq, Hkv, D, bs = 1, 512, 4, 2, 64, 64
    q, k, v = _structured(B, N, Hq, Hkv, D, dtype, seed=3)
    cfg = fp.FlexPrefillConfig(block_size=bs, gamma=0.8, tau=0.2, min_budget=bs, min_seq_len=0, backend=backend)
    out, lse, stats = fp.flex_prefill_attention(q, k, v, config=cfg, return_lse=True, return_stats=True, softcap=CAP)
    qf, kf, vf = q.float(), k.float(), v.float()
    want = R.select_blocks(qf, kf, config=cfg, softcap=CAP).stats()
    near = (want.js_distance - cfg.tau).abs() < 1e-4
    assert torch.equal(stats.query_aware | near, want.query_aware | near)
    # the device search's radix threshold may take one ranked entry more or less per head
    slack = 0 if backend == "torch" and dtype == F32 else 1
    assert int((stats.num_blocks - want.num_blocks)[~near].abs().max()) <= slack
    assert float(stats.density.mean()) < 0.9, "the selection should be sparse"
    # the output: the oracle's capped attention over the operator's own selection
    sel = fp.select_blocks(q, k, config=cfg, softcap=CAP)
    assert torch.equal(sel.stats().num_blocks, stats.num_blocks)
    ref, ref_lse = R.block_sparse_attention(qf, kf, vf, sel, return_lse=True, softcap=CAP)
    pt, pt_lse = _in_dtype(q, k, v, _token_mask(sel, N, N), D**-0.5, CAP)
    _assert_close_to(out, lse, ref, ref_lse, pt, pt_lse, dtype)
    # the uncapped search picks other blocks
    assert not torch.equal(R.select_blocks(qf, kf, config=cfg).stats().num_blocks, want.num_blocks)


@pytest.mark.parametrize("backend", _backends())
def test_dense_path_below_min_seq_len_is_capped(backend):
    # the short-sequence path: SDPA cannot cap, so the full causal table runs with the cap
    dtype = F16 if CUDA or backend == "triton" else F32
    q, k, v = _structured(1, 300, 4, 2, 64, dtype, seed=5)
    cfg = fp.FlexPrefillConfig(min_seq_len=1000, backend=backend)
    ref, ref_lse = R.dense_attention(q.float(), k.float(), v.float(), return_lse=True, softcap=CAP)
    pt, pt_lse = _in_dtype(q, k, v, torch.ones(300, 300, dtype=torch.bool, device=DEV).tril(), 64**-0.5, CAP)
    out, stats = fp.flex_prefill_attention(q, k, v, config=cfg, return_stats=True, softcap=CAP)
    assert stats.dense
    _assert_close_to(out, None, ref, None, pt, None, dtype)
    out, lse = fp.flex_prefill_attention(q, k, v, config=cfg, return_lse=True, softcap=CAP)
    _assert_close_to(out, lse, ref, ref_lse, pt, pt_lse, dtype)


@pytest.mark.parametrize("backend", _backends())
def test_varlen_and_padded_batches_match_reference(backend):
    # packed: a plain sequence, a chunk over a 250-token prefix, one below min_seq_len (dense);
    # gamma=1 so every backend computes the same blocks, and the output is the capped attention
    dtype = F16 if CUDA or backend == "triton" else F32
    lens_q, lens_k = [200, 80, 40], [200, 200, 40]
    seqs = [_structured(1, nq, 4, 2, 64, dtype, seed=nk + i, n_k=nk) for i, (nq, nk) in enumerate(zip(lens_q, lens_k))]
    q, k, v = (torch.cat([s[i][0] for s in seqs]) for i in range(3))
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)  # noqa: E731
    cfg = fp.FlexPrefillConfig(block_size=32, gamma=1.0, min_budget=0, min_seq_len=64, backend=backend)
    args = (q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k))
    out, lse = fp.flex_prefill_attention_varlen(*args, config=cfg, return_lse=True, softcap=CAP)
    ref, ref_lse = R.dense_attention_varlen(q.float(), k.float(), v.float(), cu(lens_q), cu(lens_k), return_lse=True,
                                            softcap=CAP)
    for s, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        rows = slice(sum(lens_q[:s]), sum(lens_q[:s + 1]))
        allowed = torch.arange(nk, device=DEV)[None, :] <= torch.arange(nk - nq, nk, device=DEV)[:, None]
        pt, pt_lse = _in_dtype(q[None, rows], seqs[s][1], seqs[s][2], allowed, 64**-0.5, CAP)
        _assert_close_to(out[None, rows], lse[None, :, rows], ref[None, rows], ref_lse[None, :, rows], pt, pt_lse, dtype)
    # a right-padded batch (seq_lens): each sequence alone, padding rows zeros and lse -inf
    B, N = 2, 160
    qb, kb, vb = _structured(B, N, 4, 2, 64, dtype, seed=11)
    lens = torch.tensor([160, 130], dtype=torch.int32, device=DEV)
    cfg = cfg.replace(min_seq_len=0)
    out, lse = fp.flex_prefill_attention(qb, kb, vb, config=cfg, seq_lens=lens, return_lse=True, softcap=CAP)
    assert (out[1, 130:] == 0).all() and torch.isneginf(lse[1, :, 130:]).all()
    for b, n in enumerate(lens.tolist()):
        ref, ref_lse = R.dense_attention(*(t[b:b + 1, :n].float() for t in (qb, kb, vb)), return_lse=True, softcap=CAP)
        pt, pt_lse = _in_dtype(*(t[b:b + 1, :n] for t in (qb, kb, vb)),
                               torch.ones(n, n, dtype=torch.bool, device=DEV).tril(), 64**-0.5, CAP)
        _assert_close_to(out[b:b + 1, :n], lse[b:b + 1, :, :n], ref, ref_lse, pt, pt_lse, dtype)


@pytest.mark.parametrize("backend", _backends())
def test_sliding_window_matches_reference(backend):
    dtype = F16 if CUDA or backend == "triton" else F32
    N, window = 300, 100
    q, k, v = _structured(1, N, 4, 1, 64, dtype, seed=6)
    out, lse = fp.sliding_window_attention(q, k, v, window=window, return_lse=True, backend=backend, softcap=CAP)
    ref, ref_lse = R.dense_attention(q.float(), k.float(), v.float(), window=window, return_lse=True, softcap=CAP)
    i = torch.arange(N, device=DEV)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    pt, pt_lse = _in_dtype(q, k, v, allowed, 64**-0.5, CAP)
    _assert_close_to(out, lse, ref, ref_lse, pt, pt_lse, dtype)
    # packed: the same sequence whole, and its last 120 queries as a chunk over the prefix
    cu_q = torch.tensor([0, N, N + 120], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, N, 2 * N], dtype=torch.int32, device=DEV)
    args = (torch.cat([q[0], q[0, N - 120:]]), torch.cat([k[0], k[0]]), torch.cat([v[0], v[0]]), cu_q, cu_k, N, N)
    out_v, lse_v = fp.sliding_window_attention_varlen(*args, window=window, return_lse=True, backend=backend,
                                                      softcap=CAP)
    _assert_close_to(out_v[None, :N], lse_v[None, :, :N], ref, ref_lse, pt, pt_lse, dtype)
    _assert_close_to(out_v[None, N:], lse_v[None, :, N:], ref[:, N - 120:], ref_lse[..., N - 120:],
                     pt[:, N - 120:], pt_lse[..., N - 120:], dtype)


def test_sink_merges_through_the_capped_lse():
    # out * sigmoid(lse - sink) equals the softmax over the capped scores and one sink logit
    from flexprefill.integrations.transformers import _sink_scaled

    dtype = F16
    N = 200
    q, k, v = _structured(1, N, 4, 2, 64, dtype, seed=8)
    sink = torch.linspace(-1.0, 3.0, 4, device=DEV)
    cfg = fp.FlexPrefillConfig(block_size=64, gamma=1.0, min_budget=0, min_seq_len=0, backend="triton")
    out, lse = fp.flex_prefill_attention(q, k, v, config=cfg, return_lse=True, softcap=CAP)
    got = _sink_scaled(out, lse.transpose(1, 2), sink)
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))
    kh, vh = kh.repeat_interleave(2, 1), vh.repeat_interleave(2, 1)
    s = CAP * torch.tanh(qh @ kh.transpose(-1, -2) * 64**-0.5 / CAP)
    s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool, device=DEV).tril(), float("-inf"))
    s = torch.cat([s, sink[None, :, None, None].expand(1, 4, N, 1)], -1)
    want = (s.softmax(-1)[..., :-1] @ vh).transpose(1, 2)
    assert (got.float() - want).abs().max().item() < 2e-3


def test_flex_attention_backend_takes_the_cap():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from flexprefill.backends import flex_attention_from_selection

    N, bs = 256, 64
    q, k, v = _structured(1, N, 4, 2, 64, F32 if not CUDA else F16, seed=9)
    sel = fp.select_blocks(q, k, config=fp.FlexPrefillConfig(block_size=bs, gamma=0.8, min_budget=0), softcap=CAP)
    out = flex_attention_from_selection(q, k, v, sel, compiled=False, softcap=CAP)
    ref = R.block_sparse_attention(q.float(), k.float(), v.float(), sel, softcap=CAP)
    assert (out.float() - ref).abs().max().item() < (1e-4 if q.dtype == F32 else 4e-3)
    with pytest.raises(ValueError, match="softcap"):
        flex_attention_from_selection(q, k, v, sel, compiled=False, softcap=0.0)


# --- input checks ----------------------------------------------------------------------


@pytest.mark.parametrize("bad,err", [(0.0, ValueError), (-2.0, ValueError), (float("nan"), ValueError),
                                     (float("inf"), ValueError), (True, TypeError), ("5", TypeError),
                                     (torch.tensor(5.0), TypeError)])
def test_bad_softcaps_are_refused(bad, err):
    q = torch.randn(1, 64, 2, 64)
    k = torch.randn(1, 64, 1, 64)
    sel = fp.select_blocks(q, k, config=fp.FlexPrefillConfig(block_size=32, min_budget=0))
    cu = torch.tensor([0, 64], dtype=torch.int32)
    calls = [
        lambda: fp.flex_prefill_attention(q, k, k, softcap=bad),
        lambda: fp.select_blocks(q, k, softcap=bad),
        lambda: fp.block_sparse_attention(q, k, k, sel, softcap=bad),
        lambda: fp.flex_prefill_attention_varlen(q[0], k[0], k[0], cu, cu, 64, 64, softcap=bad),
        lambda: fp.select_blocks_varlen(q[0], k[0], cu, cu, 64, 64, softcap=bad),
        lambda: fp.sliding_window_attention(q, k, k, window=8, softcap=bad),
        lambda: fp.sliding_window_attention_varlen(q[0], k[0], k[0], cu, cu, 64, 64, window=8, softcap=bad),
    ]
    for call in calls:
        with pytest.raises(err, match=r"softcap=.*(positive|float)"):
            call()
    # an int cap is a number: taken as a float
    out = fp.flex_prefill_attention(q, k, k, softcap=3, config=fp.FlexPrefillConfig(min_seq_len=0, block_size=32))
    torch.testing.assert_close(out, R.dense_attention(q, k, k, softcap=3.0), atol=1e-5, rtol=1e-5)


def test_hopper_config_with_a_cap_is_refused():
    # the Gluon kernels do not cap: asking for one with softcap is an error, not a silent drop
    from flexprefill.ops.sparse_attention import _launch, kernel_name

    q, k, v = (torch.randn(1, 128, h, 64, dtype=F16, device=DEV) for h in (2, 1, 1))
    sel = fp.select_blocks(q.float().cpu(), k.float().cpu(), config=fp.FlexPrefillConfig(block_size=64, gamma=1.0))
    counts, indices = sel.counts.to(DEV), sel.indices.to(DEV)
    with pytest.raises(ValueError, match="softcap"):
        _launch(q, k, v, counts, indices, block_size=64, softmax_scale=0.125, return_lse=False,
                hopper_config=dict(kernel="tiled", BLOCK_M=64, BLOCK_N=64, num_warps=4, STAGES=2), softcap=CAP)
    assert kernel_name(q, k, v, 128, softcap=CAP) == "triton"


# --- on the GPU: bf16 against the fp32 oracle, the generic kernel and the Hopper dispatch ---


@pytest.mark.gpu
@pytest.mark.parametrize("D,bs", [(64, 128), (128, 128), (256, 128), (80, 64), (128, 64)])
def test_gpu_bf16_softcap_matches_reference(D, bs, monkeypatch):
    # the generic Triton kernel in bf16 (dense, packed with a chunk, windowed), and on Hopper
    # every softcap call stays on it: no Gluon kernel is launched where it would otherwise run
    import flexprefill.ops.sparse_attention_hopper as H
    from flexprefill.ops.sparse_attention import _hopper_kernel, kernel_name, sparse_attention

    launched = []
    for name in ("launch_hopper", "launch_hopper_ws"):
        monkeypatch.setattr(H, name, lambda *a, _n=name, **kw: launched.append(_n))
    N, Hq, Hkv = 4097, 8, 2
    q, k, v = _structured(1, N, Hq, Hkv, D, BF16, seed=D)
    cfg = fp.FlexPrefillConfig(block_size=bs, gamma=0.9, min_budget=bs, min_seq_len=0)
    out, lse, stats = fp.flex_prefill_attention(q, k, v, config=cfg, return_lse=True, return_stats=True, softcap=CAP)
    sel = fp.select_blocks(q, k, config=cfg, softcap=CAP)
    ref, ref_lse = R.block_sparse_attention(q.float(), k.float(), v.float(), sel, return_lse=True, softcap=CAP)
    pt, pt_lse = _in_dtype(q, k, v, _token_mask(sel, N, N), D**-0.5, CAP)
    assert torch.equal(stats.num_blocks, sel.stats().num_blocks)
    _assert_close_to(out, lse, ref, ref_lse, pt, pt_lse, BF16)
    # packed: the whole sequence and its last 1000 queries over the cached prefix
    cu_q = torch.tensor([0, N, N + 1000], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, N, 2 * N], dtype=torch.int32, device=DEV)
    vl = fp.flex_prefill_attention_varlen(torch.cat([q[0], q[0, N - 1000:]]), torch.cat([k[0], k[0]]),
                                          torch.cat([v[0], v[0]]), cu_q, cu_k, N, N,
                                          config=cfg.replace(gamma=1.0), softcap=CAP)
    dense_ref = R.dense_attention(q.float(), k.float(), v.float(), softcap=CAP)
    assert (vl[:N].float() - dense_ref[0]).abs().max().item() < 3e-2
    assert (vl[N:].float() - dense_ref[0, N - 1000:]).abs().max().item() < 3e-2
    # windowed
    w = fp.sliding_window_attention(q, k, v, window=1000, softcap=CAP)
    w_ref = R.dense_attention(q.float(), k.float(), v.float(), window=1000, softcap=CAP)
    assert (w.float() - w_ref).abs().max().item() < 3e-2
    assert not launched, launched
    assert kernel_name(q, k, v, bs, softcap=CAP) == "triton"
    assert kernel_name(q, k, v, bs, packed_or_windowed=True, softcap=CAP) == "triton"
    if _hopper_kernel(q, k, v, bs) is not None:
        # without the cap this call takes a Gluon kernel (the spy sees it): the dispatch is what
        # keeps the capped ones off it
        sel16 = fp.select_blocks(q, k, config=cfg)
        sparse_attention(q, k, v, sel16.counts, sel16.indices, block_size=bs, softmax_scale=D**-0.5)
        assert launched
