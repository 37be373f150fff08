"""Exact sliding-window attention (the kernel's WINDOWED path) against masked attention in fp32."""

import math

import pytest
import torch

from flexprefill.block_table import window_selection
from flexprefill.ops.window_attention import sliding_window_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


def _qkv(B, N, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, N, h, D, generator=g).to(DEV, dtype) for h in (Hq, Hkv, Hkv))


def _masked(q, k, v, window, scale, dtype=torch.float32):
    """Attention with transformers' sliding mask (kv_idx > q_idx - window, kv_idx <= q_idx)."""
    N = q.shape[1]
    g = q.shape[2] // k.shape[2]
    i = torch.arange(N, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    qh = q.transpose(1, 2).to(dtype)
    kh = k.transpose(1, 2).repeat_interleave(g, 1).to(dtype)
    vh = v.transpose(1, 2).repeat_interleave(g, 1).to(dtype)
    s = (qh @ kh.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1).to(dtype) @ vh).transpose(1, 2), lse


@pytest.mark.parametrize(
    "B,N,Hq,Hkv,D,window,bs,dtype",
    [
        pytest.param(1, 700, 4, 1, 64, 200, 64, F16, id="N700-W200-bs64-fp16"),
        pytest.param(2, 333, 2, 2, 128, 64, 32, F32, id="B2-N333-W64-bs32-fp32"),
        pytest.param(1, 500, 2, 1, 64, 1, 64, F32, id="W1-only-self"),
        pytest.param(1, 300, 2, 1, 64, 5000, 128, F16, id="window-longer-than-N"),
        pytest.param(1, 640, 4, 2, 80, 100, 64, F16, id="D80-W100"),
        # windows on and one past a tile edge: bands whose first tile is the only masked one
        pytest.param(1, 1000, 2, 1, 64, 256, 64, F32, id="N1000-W256-tile-aligned"),
        pytest.param(1, 1000, 2, 1, 64, 257, 32, F16, id="N1000-W257-bs32"),
        pytest.param(1, 4100, 8, 2, 256, 512, 128, BF16, id="N4100-W512-D256-bf16", marks=pytest.mark.gpu),
    ],
)
def test_sliding_window_matches_masked_attention(B, N, Hq, Hkv, D, window, bs, dtype):
    q, k, v = _qkv(B, N, Hq, Hkv, D, dtype, seed=N + window)
    scale = 0.8 / math.sqrt(D)
    out, lse = sliding_window_attention(q, k, v, window=window, softmax_scale=scale, return_lse=True, block_size=bs)
    ref, ref_lse = _masked(q.float(), k.float(), v.float(), window, scale)
    pt, _ = _masked(q, k, v, window, scale, dtype=dtype)
    tol = 2 * (pt.float() - ref).abs().max().item() + (1e-5 if dtype == F32 else 0.0)
    assert out.shape == q.shape and out.dtype == dtype and not out.isnan().any()
    err = (out.float() - ref).abs().max().item()
    assert err <= tol, f"output error {err:.3g} > {tol:.3g}"
    assert (lse - ref_lse).abs().max().item() < 1e-3
    # windows change the answer: far keys matter in full causal attention
    if window < N // 2:
        full, _ = _masked(q.float(), k.float(), v.float(), N, scale)
        assert (full - ref).abs().max().item() > 10 * tol


@pytest.mark.gpu
@pytest.mark.parametrize("D,window", [(128, 300), (256, 512), (128, 1), (64, 700)],
                         ids=["D128-W300", "D256-W512", "D128-W1", "D64-W700"])
def test_sliding_window_on_the_hopper_ws_kernel(D, window):
    # the warp-specialised Gluon kernel with a window (Hopper only): every variant against
    # masked attention in fp32; the default path takes it at head dims 128 and 256
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("the Gluon kernels need an sm_90 GPU")
    from flexprefill.ops.sparse_attention import _hopper_kernel, _launch
    from flexprefill.ops.sparse_attention_hopper import ws_configs

    B, N, Hq, Hkv, bs = 2, 3000, 8, 2, 128
    q, k, v = _qkv(B, N, Hq, Hkv, D, BF16, seed=D + window)
    scale = 0.8 / math.sqrt(D)
    counts, indices = window_selection(B, Hq, N, bs, window, DEV)
    ref, ref_lse = _masked(q.float(), k.float(), v.float(), window, scale)
    pt, _ = _masked(q, k, v, window, scale, dtype=BF16)
    tol = 2 * (pt.float() - ref).abs().max().item()
    for c in ws_configs(D, bs):
        for pp in (False, True):
            for dyn in (True, False):
                cfg = dict(c, kernel="ws", PINGPONG=pp, DYNAMIC=dyn)
                out, lse = _launch(q, k, v, counts, indices, block_size=bs, softmax_scale=scale, return_lse=True,
                                   window=window, hopper_config=cfg)
                err = (out.float() - ref).abs().max().item()
                assert not out.isnan().any() and err <= tol, (f"output error {err:.3g} > {tol:.3g}", cfg)
                assert (lse - ref_lse).abs().max().item() < 1e-3, cfg
    assert (_hopper_kernel(q, k, v, bs) == "ws") == (D != 64)
    with pytest.raises(ValueError, match="only the warp-specialised kernel"):
        _launch(q, k, v, counts, indices, block_size=bs, softmax_scale=scale, return_lse=False, window=window,
                hopper_config=dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, num_warps=8))


def test_window_selection_lists_exactly_the_reached_blocks():
    N, bs = 1000, 64
    for window in (1, 63, 64, 65, 200, 2000):
        counts, indices = window_selection(1, 1, N, bs, window, DEV)
        nb = counts.shape[-1]
        i = torch.arange(N)
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        blk = torch.zeros(nb, nb, dtype=torch.bool)
        for r in range(nb):
            rows = allowed[r * bs : (r + 1) * bs]
            for c in range(nb):
                blk[r, c] = rows[:, c * bs : (c + 1) * bs].any()
        got = torch.zeros(nb, nb, dtype=torch.bool)
        for r in range(nb):
            for t in range(int(counts[0, 0, r])):
                got[r, int(indices[0, 0, r, t])] = True
        assert torch.equal(got, blk), f"window {window}"


def test_bad_window():
    q, k, v = _qkv(1, 64, 2, 1, 64, F32, seed=0)
    for w in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            sliding_window_attention(q, k, v, window=w, softmax_scale=0.1)


def test_window_selection_reuses_its_band_table():
    """Repeated calls of one shape share one cached table (views of it), other shapes get their own."""
    from flexprefill import block_table

    block_table._BAND_CACHE.clear()
    c1, i1 = window_selection(2, 3, 1000, 64, 200, DEV)
    c2, i2 = window_selection(1, 5, 1000, 64, 200, DEV)
    assert c1.shape == (2, 3, 16) and c2.shape == (1, 5, 16) and i1.shape[:3] == (2, 3, 16)
    assert c1.data_ptr() == c2.data_ptr() and i1.data_ptr() == i2.data_ptr()
    assert torch.equal(c1[0, 0], c2[0, 0]) and torch.equal(i1[0, 0], i2[0, 0])
    c3, _ = window_selection(1, 1, 1000, 64, 300, DEV)
    assert c3.data_ptr() != c1.data_ptr() and len(block_table._BAND_CACHE) == 2
    for w in range(1, 20):  # bounded
        window_selection(1, 1, 1000, 64, 400 + w, DEV)
    assert len(block_table._BAND_CACHE) == block_table._BAND_CACHE_SIZE
