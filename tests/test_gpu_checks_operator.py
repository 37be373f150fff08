"""The whole operator on a GPU at long lengths (bf16, structured inputs).

1. The device pattern search picks the fp32 oracle's blocks, N up to 131072.
2. gamma=1 is dense attention: its error against fp32 is that of bf16 SDPA.
3. gamma=0.9 keeps most of each row's softmax mass and stays close to dense.
4. No host sync in the operator, and a CUDA graph of it replays the same output.
"""

import pytest
import torch
import torch.nn.functional as F

import flexprefill as fp
from flexprefill import reference as R
from flexprefill.search import select_blocks_fast
from flexprefill_tools.synthetic import structured_qkv

pytestmark = pytest.mark.gpu


def _sdpa(q, k, v, scale):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def _truth(q, k, v, scale):
    """fp32 attention through the memory-efficient SDPA kernel (no N x N matrix), GQA by repetition."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[2] // k.shape[2]
    k = k.float().repeat_interleave(g, dim=2)
    v = v.float().repeat_interleave(g, dim=2)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale)
    return out.transpose(1, 2)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _slow_above(N, limit=100_000):
    return [pytest.mark.slow] if N > limit else []


SELECTION_CASES = [
    pytest.param(N, Hq, Hkv, D, bs, tau, marks=_slow_above(N), id=f"N{N}-H{Hq}/{Hkv}-D{D}-bs{bs}-tau{tau}")
    for N, Hq, Hkv, D, bs, tau in [
        (4097, 8, 2, 128, 128, 0.1),
        (32768, 8, 2, 128, 128, 0.1),
        (131072, 4, 1, 128, 128, 0.1),
        (20000, 4, 1, 256, 64, 0.3),
        (9000, 9, 3, 64, 32, 0.1),
    ]
]


@pytest.mark.parametrize("N,Hq,Hkv,D,bs,tau", SELECTION_CASES)
def test_device_search_selects_the_reference_blocks(N, Hq, Hkv, D, bs, tau):
    q, k, _ = structured_qkv(1, N, Hq, Hkv, D, seed=N + D, dtype=torch.bfloat16, device="cuda")
    cfg = fp.FlexPrefillConfig(block_size=bs, tau=tau)
    scale = D**-0.5
    fast = select_blocks_fast(q, k, config=cfg, softmax_scale=scale)
    ref = R.select_blocks(q, k, config=cfg, softmax_scale=scale)
    near = (ref.js_distance - tau).abs() < 1e-3
    # the query-aware decision agrees wherever the JS distance is not at the threshold
    agree = fast.query_aware == ref.query_aware
    assert bool((agree | near).all()), f"decisions differ away from tau: fast {fast.query_aware}, ref {ref.query_aware}"
    js_diff = (fast.js_distance - ref.js_distance).abs().max().item()
    assert js_diff < 1e-4, f"JS distance differs by {js_diff:.2e}"
    # float rounding (batched vs per-head matmuls) can move a block across the gamma cut:
    # on the heads whose decision agrees, at most 0.1% of the selected blocks may differ
    fast_mask, ref_mask = fast.to_mask(), ref.to_mask()
    a = agree[:, :, None, None].expand_as(ref_mask)
    differing = ((fast_mask != ref_mask) & a).sum().item() / max(1, (ref_mask & a).sum().item())
    assert differing < 1e-3, f"{differing:.2e} of the reference's blocks differ"


DENSE_CASES = [
    pytest.param(N, Hq, Hkv, D, bs, marks=_slow_above(N), id=f"N{N}-H{Hq}/{Hkv}-D{D}-bs{bs}")
    for N, Hq, Hkv, D, bs in [
        (4097, 8, 2, 128, 128),
        (32768, 32, 8, 128, 128),
        (131072, 8, 2, 128, 128),
        (16384, 4, 1, 256, 128),
        (8191, 9, 3, 64, 64),
        (10000, 8, 8, 96, 32),
    ]
]


@pytest.mark.parametrize("N,Hq,Hkv,D,bs", DENSE_CASES)
def test_gamma_one_is_dense_and_gamma_09_stays_close(N, Hq, Hkv, D, bs):
    q, k, v = structured_qkv(1, N, Hq, Hkv, D, seed=N, dtype=torch.bfloat16, device="cuda")
    scale = D**-0.5
    dense = _sdpa(q, k, v, scale)
    truth = _truth(q, k, v, scale)  # fp32, to scale the bf16 errors
    cfg1 = fp.FlexPrefillConfig(block_size=bs, gamma=1.0, min_seq_len=0)
    out1, lse1 = fp.flex_prefill_attention(q, k, v, config=cfg1, return_lse=True)
    cfg9 = fp.FlexPrefillConfig(block_size=bs, gamma=0.9, min_seq_len=0)
    out9, lse9, stats = fp.flex_prefill_attention(q, k, v, config=cfg9, return_lse=True, return_stats=True)
    assert torch.isfinite(lse1).all() and torch.isfinite(out1).all()
    # gamma=1: the error of bf16 SDPA on the same inputs, at most twice
    err1, err_sdpa = (out1.float() - truth).abs().max().item(), (dense.float() - truth).abs().max().item()
    assert err1 <= 2 * err_sdpa + 1e-6, f"gamma=1 max abs error {err1:.3e} vs bf16 SDPA's {err_sdpa:.3e}"
    rel1, rel_sdpa = _rel(out1, truth), _rel(dense, truth)
    assert rel1 <= 2 * rel_sdpa + 1e-6, f"gamma=1 rel error {rel1:.3e} vs bf16 SDPA's {rel_sdpa:.3e}"
    # gamma=0.9: exp(lse_sparse - lse_dense) is the share of each row's softmax mass the
    # selected blocks hold (the quantity gamma targets); a subset's mass is at most 1
    assert torch.isfinite(out9).all()
    mass = torch.exp(lse9 - lse1).flatten()
    assert mass.max().item() <= 1 + 1e-3, f"kept mass above 1: {mass.max().item()}"
    assert mass.mean().item() > 0.8, f"mean kept mass {mass.mean().item():.3f}"
    density = stats.density.mean().item()
    assert density < 0.9, f"gamma=0.9 kept {density:.2f} of the causal blocks"
    rel9 = _rel(out9, truth)
    assert rel9 < 0.5, f"gamma=0.9 rel error vs dense {rel9:.3f}"


def test_operator_no_host_sync_and_cuda_graph():
    q, k, v = structured_qkv(1, 16384, 8, 2, 128, seed=3, dtype=torch.bfloat16, device="cuda")
    cfg = fp.FlexPrefillConfig(block_size=128, min_seq_len=0)
    out = fp.flex_prefill_attention(q, k, v, config=cfg)  # warm-up: compiles and autotunes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fp.flex_prefill_attention(q, k, v, config=cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fp.flex_prefill_attention(q, k, v, config=cfg)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = fp.flex_prefill_attention(q, k, v, config=cfg)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, out), (static_out.float() - out.float()).abs().max().item()
