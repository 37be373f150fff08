"""The block-sparse attention kernel and the dense fallback against the fp32 oracle.

On a CPU-only machine the kernels run in the Triton interpreter (tests/conftest.py).
Tolerance: the kernel's error against ``reference.block_sparse_attention`` (fp32 on the
dtype-rounded inputs) may be at most twice the error of the same attention computed by
PyTorch in the input dtype, plus a small floor for fp32 where that error is ~0.
"""

import dataclasses
import functools
import math

import pytest
import torch

import flexprefill as fp
from flexprefill import reference as R
from flexprefill.config import FlexPrefillConfig
from flexprefill.block_table import full_causal_selection
from flexprefill.ops.dense_attention import dense_causal_attention
from flexprefill.ops.sparse_attention import _launch, kernel_name, sparse_attention
from flexprefill.block_table import mask_to_selection
from flexprefill_tools.synthetic import structured_qkv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_FLOOR = {torch.float32: 1e-5, torch.float16: 0.0, torch.bfloat16: 0.0}


def _qkv(B, N, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, Hq, D, generator=g)
    k = torch.randn(B, N, Hkv, D, generator=g)
    v = torch.randn(B, N, Hkv, D, generator=g)
    return tuple(t.to(device=DEV, dtype=dtype) for t in (q, k, v))


def _random_selection(B, Hq, N, bs, density, seed, diagonal=True):
    nb = math.ceil(N / bs)
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(B, Hq, nb, nb, generator=g) < density
    if diagonal:
        mask |= torch.eye(nb, dtype=torch.bool)
    return mask_to_selection(
        mask.to(DEV),
        block_size=bs,
        seq_len=N,
        query_aware=torch.zeros(B, Hq, dtype=torch.bool, device=DEV),
        js_distance=torch.zeros(B, Hq, device=DEV),
    )


def _token_mask(sel, N):
    blk = torch.arange(N, device=DEV) // sel.block_size
    bm = sel.to_mask()
    causal = torch.ones(N, N, dtype=torch.bool, device=DEV).tril()
    return bm[:, :, blk][:, :, :, blk] & causal


def _torch_in_dtype(q, k, v, allowed, scale):
    """The same attention computed by PyTorch in the input dtype: its error sets the tolerance."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.float().masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return (p @ vh).transpose(1, 2), lse


def _assert_matches(out, lse, q, k, v, sel, scale, rows=None):
    """Every row of ``out``/``lse`` against the oracle (``rows``: bool [B, Hq, N] to compare)."""
    ref, ref_lse = R.block_sparse_attention(q.float(), k.float(), v.float(), sel, softmax_scale=scale, return_lse=True)
    pt, pt_lse = _torch_in_dtype(q, k, v, _token_mask(sel, q.shape[1]), scale)
    if rows is None:
        rows = torch.ones(ref_lse.shape, dtype=torch.bool, device=DEV)
    rows_o = rows.transpose(1, 2)  # [B, N, Hq]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any(), "NaN in the output"
    err = (out.float() - ref).abs().amax(-1)[rows_o].max().item()
    pt_err = (pt.float() - ref).abs().amax(-1)[rows_o].max().item()
    tol = 2 * pt_err + _FLOOR[q.dtype]

    assert err <= tol, f"output error {err:.3g} > tol {tol:.3g} (PyTorch in {q.dtype}: {pt_err:.3g})"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        assert not lse.isnan().any(), "NaN in the lse"
        lerr = (lse - ref_lse).abs()[rows].max().item()
        pt_lerr = (pt_lse - ref_lse).abs()[rows].max().item()
        ltol = 2 * pt_lerr + 1e-5

        assert lerr <= ltol, f"lse error {lerr:.3g} > tol {ltol:.3g} (PyTorch in {q.dtype}: {pt_lerr:.3g})"


F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16

RANDOM_CASES = [
    pytest.param(1, 1000, 4, 2, 64, 64, F16, 0.3, id="N1000-H4/2-D64-bs64-fp16"),
    pytest.param(1, 63, 2, 2, 64, 128, F32, 0.5, id="N63-H2/2-D64-bs128-fp32"),
    pytest.param(1, 1100, 4, 1, 128, 128, F16, 0.4, id="N1100-H4/1-D128-bs128-fp16"),
    pytest.param(1, 1000, 4, 4, 128, 32, F32, 0.15, id="N1000-H4/4-D128-bs32-fp32"),
    pytest.param(2, 300, 4, 2, 64, 32, F16, 0.5, id="B2-N300-H4/2-D64-bs32-fp16"),
    pytest.param(1, 1100, 2, 1, 256, 64, F16, 0.3, id="N1100-H2/1-D256-bs64-fp16"),
    pytest.param(1, 1000, 4, 2, 80, 64, F16, 0.3, id="N1000-H4/2-D80-bs64-fp16"),
    pytest.param(1, 4097, 32, 8, 128, 128, BF16, 0.2, id="N4097-H32/8-D128-bs128-bf16", marks=pytest.mark.gpu),
    pytest.param(1, 1000, 4, 2, 64, 64, BF16, 0.3, id="N1000-H4/2-D64-bs64-bf16", marks=pytest.mark.gpu),
    pytest.param(1, 1100, 8, 2, 96, 32, BF16, 0.3, id="N1100-H8/2-D96-bs32-bf16", marks=pytest.mark.gpu),
    pytest.param(1, 2048, 4, 1, 256, 128, BF16, 0.5, id="N2048-H4/1-D256-bs128-bf16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("B,N,Hq,Hkv,D,bs,dtype,density", RANDOM_CASES)
def test_random_selection_matches_reference(B, N, Hq, Hkv, D, bs, dtype, density):
    q, k, v = _qkv(B, N, Hq, Hkv, D, dtype, seed=N + D)
    sel = _random_selection(B, Hq, N, bs, density, seed=N)
    scale = D**-0.5
    out, lse = sparse_attention(q, k, v, sel.counts, sel.indices, block_size=bs, softmax_scale=scale, return_lse=True)
    _assert_matches(out, lse, q, k, v, sel, scale)
    # without the lse: same output
    out2 = sparse_attention(q, k, v, sel.counts, sel.indices, block_size=bs, softmax_scale=scale)
    assert torch.equal(out2, out)


@pytest.mark.parametrize(
    "N,Hq,Hkv,D,bs,dtype",
    [
        pytest.param(1000, 4, 2, 64, 64, F16, id="N1000-H4/2-D64-bs64-fp16"),
        pytest.param(1100, 4, 4, 128, 128, F32, id="N1100-H4/4-D128-bs128-fp32"),
        pytest.param(4097, 8, 2, 128, 128, BF16, id="N4097-H8/2-D128-bs128-bf16", marks=pytest.mark.gpu),
    ],
)
def test_flexprefill_selection_matches_reference(N, Hq, Hkv, D, bs, dtype):
    q, k, v = structured_qkv(1, N, Hq, Hkv, D, seed=3, dtype=dtype, device=DEV)
    cfg = FlexPrefillConfig(block_size=bs, min_budget=2 * bs, gamma=0.9)
    sel = R.select_blocks(q, k, config=cfg)
    assert sel.stats().density.mean() < 0.9, "the selection should be sparse"
    scale = 0.7 / math.sqrt(D)
    out, lse = sparse_attention(q, k, v, sel.counts, sel.indices, block_size=bs, softmax_scale=scale, return_lse=True)
    _assert_matches(out, lse, q, k, v, sel, scale)


# the tile shapes the GPU autotuner picks from (the interpreter's default is 32 x 32)
@pytest.mark.parametrize(
    "bm,bn,bs",
    [
        pytest.param(128, 128, 128, id="BM128-BN128-bs128"),
        pytest.param(128, 64, 128, id="BM128-BN64-bs128"),
        pytest.param(64, 32, 128, id="BM64-BN32-bs128"),
        pytest.param(64, 64, 64, id="BM64-BN64-bs64"),
    ],
)
def test_tile_configs_write_every_row(bm, bn, bs):
    B, N, Hq, Hkv, D = 1, 1100, 4, 2, 64
    q, k, v = _qkv(B, N, Hq, Hkv, D, F16, seed=bm + bn)
    sel = _random_selection(B, Hq, N, bs, 0.4, seed=bs)
    # poisoned buffers: a row the kernel does not write stays NaN
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, Hq, N), float("nan"), device=DEV)
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2)
    _launch(q, k, v, sel.counts, sel.indices, block_size=bs, softmax_scale=D**-0.5, return_lse=True, config=cfg, out=out, lse=lse)
    _assert_matches(out, lse, q, k, v, sel, D**-0.5)


def test_strided_inputs():
    # q, k, v as views into one packed projection, and a non-contiguous last dim
    B, N, Hq, Hkv, D, bs = 1, 500, 4, 2, 64, 64
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, N, Hq + 2 * Hkv, D, generator=g).to(DEV, F16)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv], qkv[:, :, Hq + Hkv :]
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    sel = _random_selection(B, Hq, N, bs, 0.5, seed=7)
    out, lse = sparse_attention(qt, k, v, sel.counts, sel.indices, block_size=bs, softmax_scale=0.125, return_lse=True)
    _assert_matches(out, lse, q.contiguous(), k.contiguous(), v.contiguous(), sel, 0.125)


def test_rows_without_diagonal_and_empty_rows():
    # a selection need not hold the diagonal; a row with no key gives zeros and lse -inf
    B, N, Hq, Hkv, D, bs = 1, 300, 2, 1, 64, 32
    q, k, v = _qkv(B, N, Hq, Hkv, D, F32, seed=11)
    sel = _random_selection(B, Hq, N, bs, 0.4, seed=11, diagonal=False)
    sel.counts[0, 0, 0] = 0
    sel.indices[0, 0, 0] = -1
    sel.counts[0, 1, 5] = 0
    sel.indices[0, 1, 5] = -1
    out, lse = sparse_attention(q, k, v, sel.counts, sel.indices, block_size=bs, softmax_scale=D**-0.5, return_lse=True)
    blk = torch.arange(N, device=DEV) // bs
    has_key = sel.counts[:, :, blk] > 0  # [B, Hq, N]
    assert (~has_key).sum() > 0 and (~sel.to_mask().diagonal(dim1=-2, dim2=-1)).sum() > 2
    assert (out.transpose(1, 2)[~has_key] == 0).all()
    assert torch.isneginf(lse[~has_key]).all()
    _assert_matches(out, torch.where(has_key, lse, 0.0), q, k, v, sel, D**-0.5, rows=has_key)


@pytest.mark.parametrize(
    "B,N,Hq,Hkv,D,dtype",
    [
        pytest.param(1, 1000, 4, 2, 64, F16, id="N1000-H4/2-D64-fp16"),
        pytest.param(2, 63, 2, 1, 128, F32, id="B2-N63-H2/1-D128-fp32"),
        pytest.param(1, 4097, 8, 2, 128, BF16, id="N4097-H8/2-D128-bf16", marks=pytest.mark.gpu),
        # the shapes of the packaged models, where the SDPA path asks cuDNN first
        pytest.param(2, 3001, 4, 1, 256, BF16, id="B2-N3001-H4/1-D256-bf16", marks=pytest.mark.gpu),
        pytest.param(1, 8192, 9, 3, 64, F16, id="N8192-H9/3-D64-fp16", marks=pytest.mark.gpu),
    ],
)
def test_dense_causal_attention(B, N, Hq, Hkv, D, dtype):
    q, k, v = _qkv(B, N, Hq, Hkv, D, dtype, seed=N)
    scale = 0.9 / math.sqrt(D)
    counts, indices = full_causal_selection(B, Hq, N, 128, DEV)
    full = mask_to_selection(
        torch.ones(B, Hq, counts.shape[-1], counts.shape[-1], dtype=torch.bool, device=DEV),
        block_size=128, seq_len=N, query_aware=torch.zeros(B, Hq, dtype=torch.bool, device=DEV),
        js_distance=torch.zeros(B, Hq, device=DEV),
    )
    assert torch.equal(counts, full.counts) and torch.equal(indices, full.indices)
    out, lse = dense_causal_attention(q, k, v, softmax_scale=scale, return_lse=True)
    _assert_matches(out, lse, q, k, v, full, scale)
    ref, ref_lse = R.dense_attention(q.float(), k.float(), v.float(), softmax_scale=scale, return_lse=True)
    pt, _ = _torch_in_dtype(q, k, v, _token_mask(full, N), scale)
    tol = 2 * (pt.float() - ref).abs().max().item() + _FLOOR[dtype]
    # SDPA path (no lse) and kernel path agree with the dense oracle
    sdpa = dense_causal_attention(q, k, v, softmax_scale=scale)
    assert sdpa.shape == q.shape and sdpa.dtype == dtype
    assert (sdpa.float() - ref).abs().max().item() <= tol
    assert (out.float() - ref).abs().max().item() <= tol


def test_rejects_bad_block_size_and_selection_shape():
    q, k, v = _qkv(1, 100, 2, 1, 64, F32, seed=0)
    sel = _random_selection(1, 2, 100, 32, 0.5, seed=0)
    with pytest.raises(ValueError, match="block_size"):
        sparse_attention(q, k, v, sel.counts, sel.indices, block_size=48, softmax_scale=0.1)
    with pytest.raises(ValueError, match="counts"):
        sparse_attention(q, k, v, sel.counts, sel.indices, block_size=64, softmax_scale=0.1)
    with pytest.raises(ValueError, match="counts"):
        sparse_attention(q, k, v, sel.counts.long(), sel.indices, block_size=32, softmax_scale=0.1)
    with pytest.raises(ValueError, match=r"indices must be int32 \(or int16\)"):
        sparse_attention(q, k, v, sel.counts, sel.indices.long(), block_size=32, softmax_scale=0.1)


def test_int16_indices_give_the_same_output():
    q, k, v = _qkv(1, 300, 4, 2, 64, F16, seed=3)
    sel = _random_selection(1, 4, 300, 32, 0.4, seed=3)
    kw = dict(block_size=32, softmax_scale=0.125, return_lse=True)
    out, lse = sparse_attention(q, k, v, sel.counts, sel.indices, **kw)
    out16, lse16 = sparse_attention(q, k, v, sel.counts, sel.indices.to(torch.int16), **kw)
    assert torch.equal(out, out16) and torch.equal(lse, lse16)


@pytest.mark.gpu
def test_no_host_sync_and_cuda_graph():
    B, N, Hq, Hkv, D, bs = 1, 4096, 8, 2, 128, 128
    q, k, v = _qkv(B, N, Hq, Hkv, D, BF16, seed=5)
    sel = _random_selection(B, Hq, N, bs, 0.3, seed=5)
    kw = dict(block_size=bs, softmax_scale=D**-0.5, return_lse=True)
    _assert_no_sync_and_graph(lambda: sparse_attention(q, k, v, sel.counts, sel.indices, **kw),
                              lambda: dense_causal_attention(q, k, v, softmax_scale=D**-0.5, return_lse=True))


def _assert_no_sync_and_graph(fn, *others):
    """``fn`` (and ``others``) after a first call (which may autotune and sync) make no host
    sync, and a CUDA graph of ``fn`` replays its (out, lse) exactly."""
    out, lse = fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        for other in others:
            other()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = fn()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_out, out) and torch.equal(g_lse, lse)


@pytest.mark.parametrize("bs", [32, 64, 128])
def test_gpu_config_space_fits_every_block_size(bs):
    # the GPU autotuner's prune runs only on a device: check its clamping here
    import triton

    from flexprefill.ops.autotune import autotune_configs, interpreting
    from flexprefill.ops.sparse_attention import _SPACE, _prune

    if interpreting():
        assert len(autotune_configs(_SPACE[128], interpret=dict(BLOCK_M=32, BLOCK_N=32))) == 1
    for space in _SPACE.values():
        configs = [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in space]
        kept = _prune(configs, {"BS": bs})
        sigs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
        assert kept and len(set(sigs)) == len(sigs)
        assert all(bs % bm == 0 and bs % bn == 0 for bm, bn, _, _ in sigs)


def _layouts(B, N, Hkv, D, dtype, seed):
    """K as the kernel may get it: token-major [B, N, H, D], a head-major view of [B, H, N, D],
    and a slice of a wider last dim (heads side by side, rows with a gap)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, N, Hkv, D, generator=g).to(DEV, dtype)
    head_major = base.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(B, N, Hkv, 2 * D, device=DEV, dtype=dtype)
    wide[..., :D] = base
    return {"token-major": base, "head-major": head_major, "sliced": wide[..., :D]}


@pytest.mark.parametrize("layout", ["token-major", "head-major", "sliced"])
@pytest.mark.parametrize("dtype", [F16, pytest.param(BF16, marks=pytest.mark.gpu)])
def test_tma_and_pointer_loads_agree(layout, dtype, monkeypatch):
    # the tensor-descriptor path (Hopper, and the interpreter) gives the pointer path's bits
    from flexprefill.ops.sparse_attention import _tma_descriptors

    B, N, Hq, Hkv, D, bs = 2, 700, 4, 2, 64, 64
    q, _, _ = _qkv(B, N, Hq, Hkv, D, dtype, seed=21)
    k = _layouts(B, N, Hkv, D, dtype, seed=22)[layout]
    v = _layouts(B, N, Hkv, D, dtype, seed=23)[layout]
    sel = _random_selection(B, Hq, N, bs, 0.4, seed=21)
    if DEV == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert _tma_descriptors(k, v, D, D) is not None, "this layout should take the descriptor path"
    cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    kw = dict(block_size=bs, softmax_scale=D**-0.5, return_lse=True, config=cfg)
    out_t, lse_t = _launch(q, k, v, sel.counts, sel.indices, **kw)
    fp.set_options(tma=False)
    assert _tma_descriptors(k, v, D, D) is None
    out_p, lse_p = _launch(q, k, v, sel.counts, sel.indices, **kw)
    assert torch.equal(out_t, out_p) and torch.equal(lse_t, lse_p)
    _assert_matches(out_t, lse_t, q, k.contiguous(), v.contiguous(), sel, D**-0.5)


def test_tma_refuses_layouts_it_cannot_view():
    from flexprefill.ops.sparse_attention import _tma_descriptors

    k = torch.zeros(1, 64, 2, 80, dtype=F16, device=DEV)
    assert _tma_descriptors(k, k, 80, 128) is None  # padded head dim: a tile would hold the next head
    odd = torch.zeros(1, 64, 2, 65, dtype=F16, device=DEV)[..., :64]
    assert _tma_descriptors(odd, odd, 64, 64) is None  # rows of 130 bytes: not 16-byte aligned
    if DEV == "cpu":
        assert _tma_descriptors(k[..., :64], k[..., :64], 64, 64) is not None



# the diagonal block runs before the others (DIAG_FIRST, default) or after them; both
# orders against the oracle, on tile shapes with BLOCK_M < block size (a query tile sees one
# key tile of its diagonal) and BLOCK_N < block size, with and without selected diagonals
@pytest.mark.parametrize("diag_first", ["1", "0"])
@pytest.mark.parametrize(
    "N,D,bs,bm,bn,dtype,diagonal",
    [
        pytest.param(500, 64, 128, 128, 64, F16, True, id="N500-D64-bs128-BM128-BN64-fp16"),
        pytest.param(512, 128, 128, 64, 32, F32, False, id="N512-D128-bs128-BM64-BN32-no-diagonal-fp32"),
        pytest.param(250, 256, 64, 32, 64, F16, True, id="N250-D256-bs64-BM32-BN64-fp16"),
        pytest.param(4097, 128, 128, 128, 128, BF16, False, id="N4097-D128-no-diagonal-bf16", marks=pytest.mark.gpu),
    ],
)
def test_diagonal_order_matches_reference(monkeypatch, diag_first, N, D, bs, bm, bn, dtype, diagonal):
    from flexprefill.ops.sparse_attention import _diag_first

    fp.set_options(diag_first=None)
    assert _diag_first(64) and not _diag_first(128) and not _diag_first(256)  # the default
    fp.set_options(diag_first=diag_first == "1")
    assert _diag_first(D) == (diag_first == "1")
    B, Hq, Hkv = 1, 4, 2
    q, k, v = _qkv(B, N, Hq, Hkv, D, dtype, seed=N + bm)
    sel = _random_selection(B, Hq, N, bs, 0.3, seed=bn, diagonal=diagonal)
    sel.counts[0, 0, 1] = 0  # an empty row: zeros and lse -inf
    sel.indices[0, 0, 1] = -1
    scale = D**-0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, Hq, N), float("nan"), device=DEV)
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2)
    _launch(q, k, v, sel.counts, sel.indices, block_size=bs, softmax_scale=scale, return_lse=True, config=cfg, out=out, lse=lse)
    has_key = sel.counts[:, :, torch.arange(N, device=DEV) // bs] > 0
    assert (~has_key).any()
    assert (out.transpose(1, 2)[~has_key] == 0).all() and torch.isneginf(lse[~has_key]).all()
    _assert_matches(out, torch.where(has_key, lse, 0.0), q, k, v, sel, scale, rows=has_key)


# the Gluon kernel for Hopper (ops.sparse_attention_hopper): every tile config against the
# oracle, as the Triton kernel above; it needs an sm_90 GPU (no interpreter)
def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


HOPPER_CASES = [
    pytest.param(1, 4097, 8, 2, 128, 128, BF16, 0.2, "token-major", id="N4097-H8/2-D128-bs128-bf16"),
    pytest.param(2, 3001, 4, 1, 256, 128, BF16, 0.4, "head-major", id="B2-N3001-H4/1-D256-bs128-bf16-headmajor"),
    pytest.param(1, 2500, 9, 3, 64, 128, F16, 0.3, "sliced", id="N2500-H9/3-D64-bs128-fp16-sliced"),
    pytest.param(1, 1000, 4, 2, 64, 64, BF16, 0.5, "token-major", id="N1000-H4/2-D64-bs64-bf16"),
    pytest.param(1, 1100, 4, 2, 128, 64, F16, 0.3, "head-major", id="N1100-H4/2-D128-bs64-fp16-headmajor"),
    pytest.param(1, 100, 2, 1, 128, 128, BF16, 1.0, "token-major", id="N100-H2/1-D128-one-block"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,Hq,Hkv,D,bs,dtype,density,layout", HOPPER_CASES)
def test_hopper_kernel_matches_reference(B, N, Hq, Hkv, D, bs, dtype, density, layout):
    if not _hopper():
        pytest.skip("the Gluon kernel needs an sm_90 GPU")
    from flexprefill.ops.sparse_attention_hopper import hopper_configs, ws_configs

    q, k, v = _qkv(B, N, Hq, Hkv, D, dtype, seed=N + D)
    k = _layouts(B, N, Hkv, D, dtype, seed=1)[layout]
    v = _layouts(B, N, Hkv, D, dtype, seed=2)[layout]
    if layout == "head-major":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    sel = _random_selection(B, Hq, N, bs, density, seed=N)
    # query blocks that select nothing at all (count 0) give zeros and lse -inf
    counts = sel.counts.clone()
    counts[:, 0, 1::3] = 0
    empty = torch.zeros(B, Hq, N, dtype=torch.bool, device=DEV)
    empty[:, 0] = ((torch.arange(N, device=DEV) // bs) % 3 == 1)
    sel = dataclasses.replace(sel, counts=counts)
    scale = D**-0.5
    # the tiled kernel's configs, then the warp-specialised one's with and without ping-pong,
    # tiles drawn from a counter or by a fixed stride (persistent: 33-66 query tiles per
    # (batch, head) here, more tiles than the H200 has SMs)
    ws = [dict(c, kernel="ws", PINGPONG=pp, DYNAMIC=dyn) for c in ws_configs(D, bs) for pp in (True, False)
          for dyn in (True, False)]
    assert bool(ws) == (bs % 128 == 0)
    for cfg in hopper_configs(D, bs) + ws:
        for idx in (sel.indices, sel.indices.to(torch.int16)):
            out, lse = _launch(q, k, v, counts, idx, block_size=bs, softmax_scale=scale, return_lse=True,
                               hopper_config=cfg)
            _assert_matches(out, lse, q, k, v, sel, scale, rows=~empty)
            assert (out.transpose(1, 2)[empty] == 0).all() and (lse[empty] == float("-inf")).all(), cfg
        out2 = _launch(q, k, v, counts, sel.indices, block_size=bs, softmax_scale=scale, return_lse=False,
                       hopper_config=cfg)
        assert torch.equal(out2, out), cfg


@pytest.mark.gpu
def test_hopper_kernel_default_path_no_sync_and_graph(monkeypatch):
    if not _hopper():
        pytest.skip("the Gluon kernel needs an sm_90 GPU")
    import flexprefill.ops.sparse_attention_hopper as H

    calls = []
    for name in ("launch_hopper", "launch_hopper_ws"):
        real = getattr(H, name)
        monkeypatch.setattr(H, name, functools.partial(
            lambda real, name, *a, **kw: calls.append((name[len("launch_"):], a[0].shape[-1])) or real(*a, **kw),
            real, name))
    B, N, Hq, Hkv = 1, 4096, 8, 2
    sels = {bs: _random_selection(B, Hq, N, bs, 0.3, seed=5) for bs in (64, 128)}
    # (Options.hopper_kernel, head dim, block size) -> the kernel launched (None: Triton)
    expected = [
        ("auto", 64, 128, "hopper"), ("auto", 128, 128, "hopper_ws"), ("auto", 256, 128, "hopper_ws"),
        ("auto", 64, 64, "hopper"), ("auto", 128, 64, None),
        ("off", 64, 128, None), ("off", 128, 128, None),
        ("tiled", 128, 128, "hopper"), ("tiled", 256, 128, "hopper"),
        ("ws", 64, 128, "hopper_ws"), ("ws", 128, 64, "hopper"),
    ]
    for flag, D, bs, kernel in expected:
        fp.set_options(hopper_kernel=flag)
        q, k, v = _qkv(B, N, Hq, Hkv, D, BF16, seed=5)
        calls.clear()
        out, lse = sparse_attention(q, k, v, sels[bs].counts, sels[bs].indices, block_size=bs, softmax_scale=D**-0.5,
                                    return_lse=True)  # the first call of a shape autotunes (syncs)
        assert calls == ([(kernel, D)] if kernel else []), (flag, D, bs, calls)
        assert kernel_name(q, k, v, bs) == {"hopper": "gluon-tiled", "hopper_ws": "gluon-ws", None: "triton"}[kernel]
        # packed and windowed calls take only the warp-specialised kernel
        assert kernel_name(q, k, v, bs, packed_or_windowed=True) == ("gluon-ws" if kernel == "hopper_ws" else "triton")
        _assert_matches(out, lse, q, k, v, sels[bs], D**-0.5)
    # no host sync after the first call, and a CUDA graph replays it exactly (both Gluon kernels)
    fp.set_options(hopper_kernel="auto")
    for D, kernel in ((64, "hopper"), (128, "hopper_ws")):
        q, k, v = _qkv(B, N, Hq, Hkv, D, BF16, seed=5)
        kw = dict(block_size=128, softmax_scale=D**-0.5, return_lse=True)
        calls.clear()
        _assert_no_sync_and_graph(lambda: sparse_attention(q, k, v, sels[128].counts, sels[128].indices, **kw))
        assert calls and set(calls) == {(kernel, D)}


def test_hopper_config_space_fits_shared_memory_and_blocks():
    # runs on the CPU: the tile configs the Gluon kernel may get divide every block size it
    # takes, fit the H200's shared memory and use one warpgroup per 64 rows
    from flexprefill.ops.sparse_attention_hopper import SMEM_LIMIT, smem_bytes
    from flexprefill.ops.sparse_attention_hopper import hopper_configs

    for D in (64, 128, 256):
        for bs in (64, 128):
            configs = hopper_configs(D, bs)
            assert configs, (D, bs)
            for c in configs:
                assert bs % c["BLOCK_M"] == 0 and bs % c["BLOCK_N"] == 0, c
                assert c["num_warps"] * 16 == c["BLOCK_M"] and c["STAGES"] >= 2, c
                assert smem_bytes(D, **c) <= SMEM_LIMIT, c
    # a config over the limit is dropped
    assert smem_bytes(256, BLOCK_M=64, BLOCK_N=128, STAGES=2) > SMEM_LIMIT
    # the warp-specialised kernel: 128-row query tiles, so block sizes that are multiples of 128
    from flexprefill.ops.sparse_attention_hopper import ws_smem_bytes
    from flexprefill.ops.sparse_attention_hopper import ws_configs

    for D in (64, 128, 256):
        assert ws_configs(D, 64) == []
        for c in ws_configs(D, 128):
            assert 128 % c["BLOCK_N"] == 0 and c["STAGES"] >= 2 and c["Q_STAGES"] in (1, 2), c
            assert ws_smem_bytes(D, **c) <= SMEM_LIMIT, c
        assert ws_configs(D, 128)
    assert ws_smem_bytes(256, BLOCK_N=128, STAGES=2, Q_STAGES=2) > SMEM_LIMIT


def test_hopper_kernel_not_taken_off_hopper(monkeypatch):
    # without an sm_90 GPU (or under the interpreter, or with block size 32) the dense path
    # stays on the Triton kernel whatever Options.hopper_kernel says
    from flexprefill.ops.sparse_attention import _gluon_available, _hopper_kernel, kernel_name

    assert _gluon_available()  # CI's triton (>= 3.7) has Gluon's Hopper API
    q, k, v = _qkv(1, 256, 4, 2, 64, F16, seed=0)
    for flag in ("tiled", "ws", "off", "auto"):
        fp.set_options(hopper_kernel=flag)
        assert _hopper_kernel(q, k, v, 32) is None and kernel_name(q, k, v, 32) == "triton"
        assert kernel_name(q, k, v, 32, packed_or_windowed=True) == "triton"
        if not _hopper():
            assert _hopper_kernel(q, k, v, 128) is None and kernel_name(q, k, v, 128) == "triton"


def test_hopper_kernel_policy():
    # runs on the CPU: which Hopper kernel each (Options.hopper_kernel, head dim, block
    # size, triton with the warp-specialize API) gets; None = the Triton kernel
    from flexprefill.ops.sparse_attention import _hopper_policy, _ws_available

    assert _ws_available()  # CI's triton (>= 3.7) has Gluon's list-form warp_specialize
    table = {
        ("auto", 64, 128, True): "tiled", ("auto", 128, 128, True): "ws", ("auto", 256, 128, True): "ws",
        ("auto", 64, 64, True): "tiled", ("auto", 128, 64, True): None, ("auto", 256, 64, True): None,
        ("auto", 128, 128, False): None, ("auto", 256, 128, False): None, ("auto", 64, 128, False): "tiled",
        ("auto", 80, 128, True): None, ("auto", 128, 32, True): None,
        ("off", 64, 128, True): None, ("off", 128, 128, True): None,
        ("tiled", 64, 128, True): "tiled", ("tiled", 128, 128, True): "tiled", ("tiled", 256, 64, True): "tiled",
        ("ws", 64, 128, True): "ws", ("ws", 128, 64, True): "tiled", ("ws", 256, 128, False): "tiled",
        ("ws", 96, 128, True): None,
    }
    for (flag, D, bs, ws_ok), kernel in table.items():
        assert _hopper_policy(flag, D, bs, ws_ok) == kernel, (flag, D, bs, ws_ok)


def test_hopper_launchers_pass_the_kernels_parameters(monkeypatch):
    # runs on the CPU (the Gluon kernels cannot): each launcher's call binds to its kernel's
    # signature, constexprs included, so a parameter added to one side only fails here
    import inspect

    import flexprefill.ops.kernels.sparse_attention_hopper as KT
    import flexprefill.ops.kernels.sparse_attention_hopper_ws as KW
    import flexprefill.ops.sparse_attention_hopper as H

    calls = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                options = {k: kwargs.pop(k) for k in ("maxnreg", ) if k in kwargs}
                bound = inspect.signature(self.kernel.fn).bind(*args, **kwargs)
                calls.append((self.kernel.fn.__name__, grid, bound.arguments, options))

            return launch

    monkeypatch.setattr(KT, "sparse_attention_fwd_hopper", Spy(KT.sparse_attention_fwd_hopper))
    monkeypatch.setattr(KW, "sparse_attention_fwd_hopper_ws", Spy(KW.sparse_attention_fwd_hopper_ws))
    monkeypatch.setattr(H, "_num_sms", lambda device: 132)
    B, N, Hq, Hkv, D, bs = 2, 1000, 8, 2, 128, 128
    q, k, v = _qkv(B, N, Hq, Hkv, D, torch.bfloat16, seed=0)
    sel = _random_selection(B, Hq, N, bs, 0.5, seed=0)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, N)
    for launch, cfg in ((H.launch_hopper, H.hopper_configs(D, bs)[0]), (H.launch_hopper_ws, None)):
        calls.clear()
        launch(q, k, v, sel.counts, sel.indices, out, lse, block_size=bs, softmax_scale=D**-0.5, config=cfg)
        (name, grid, args, options), = calls
        assert args["N"] == N and args["HKV"] == Hkv and args["GROUP"] == Hq // Hkv and args["D"] == D
        assert args["BS"] == bs and args["RETURN_LSE"] is True and args["lse"] is lse and args["o"] is out
        if name.endswith("_ws"):
            # one program per SM (fewer when there are fewer query tiles), 4 warps + workers
            assert grid == (min(132, math.ceil(N / 128) * B * Hq), ) and args["num_warps"] == 4
            assert options == {"maxnreg": 168} and args["DYNAMIC"] and args["tile_counter"].tolist() == [0]
            assert args["B"] == B and args["q_desc"].block_shape == [64, D]
        else:
            assert grid == (math.ceil(N / cfg["BLOCK_M"]) * (Hq // Hkv), B * Hkv)
    # packed sequences: [total, H, D] rows, per-sequence bounds, lse [Hq, total_q]
    S, total_q, total_k = 3, 700, 1500
    qp, kp, vp = q.reshape(-1, Hq, D)[:total_q], k.reshape(-1, Hkv, D)[:total_k], v.reshape(-1, Hkv, D)[:total_k]
    bounds = [torch.tensor(b, dtype=torch.int32) for b in ([0, 300, 400], [300, 400, 700], [0, 500, 900], [500, 900, 1500])]
    nb = math.ceil(600 / bs)
    counts = torch.ones(S, Hq, nb, dtype=torch.int32)
    indices = torch.zeros(S, Hq, nb, nb, dtype=torch.int16)
    outp, lsep = torch.empty_like(qp), torch.empty(Hq, total_q)
    calls.clear()
    H.launch_hopper_ws(qp, kp, vp, counts, indices, outp, lsep, block_size=bs, softmax_scale=D**-0.5,
                       varlen=(*bounds, 300, 600))
    (name, grid, args, options), = calls
    assert args["VARLEN"] and args["B"] == S and args["N_MT"] == math.ceil(300 / 128) + 1 and args["N"] == 600
    assert args["stride_lh"] == total_q and args["stride_qb"] == 0 and args["stride_qn"] == Hq * D
    assert args["q_starts"] is bounds[0] and args["k_ends"] is bounds[3] and args["o"] is outp
    assert grid == (min(132, args["N_MT"] * S * Hq), )
