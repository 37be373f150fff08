"""The varlen (packed / chunked-prefill) device path against the fp32 oracle.

Sequences are (n_q, n_k) pairs: n_q < n_k is a chunk over a cached prefix of n_k - n_q
keys (its queries are the last positions).  On a CPU-only machine the kernels run in the
Triton interpreter (tests/conftest.py); bf16 cases need a GPU.
"""

import math

import pytest
import torch

import flexprefill as fp
from flexprefill import reference as R
from flexprefill.config import FlexPrefillConfig
from flexprefill.block_table import full_causal_selection_varlen
from flexprefill.search import (
    block_means_varlen,
    representative_block_scores,
    representative_block_scores_varlen,
    select_blocks_varlen_fast,
)
from flexprefill.ops.sparse_attention import sparse_attention_varlen
from flexprefill.block_table import VarlenBlockSelection, compact_block_mask
from flexprefill_tools.synthetic import structured_qkv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16

# a full sequence, one shorter than a block, chunks with aligned and unaligned prefixes,
# a one-query chunk and a chunk without queries
SEQS = [(300, 300), (20, 20), (150, 407), (1, 90), (64, 192), (0, 50)]


def _packed(seqs, Hq, Hkv, D, dtype, seed, structured=False):
    qs, ks, vs = [], [], []
    for i, (n_q, n_k) in enumerate(seqs):
        if structured:
            q, k, v = structured_qkv(1, n_k, Hq, Hkv, D, seed=seed + i, dtype=torch.float32)
        else:
            g = torch.Generator().manual_seed(seed + i)
            q, k, v = (torch.randn(1, n_k, h, D, generator=g) for h in (Hq, Hkv, Hkv))
        qs.append(q[0, n_k - n_q :])
        ks.append(k[0])
        vs.append(v[0])
    q, k, v = (torch.cat(t).to(DEV, dtype) for t in (qs, ks, vs))
    cu_q = torch.tensor([0] + [sum(a for a, _ in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + [sum(b for _, b in seqs[: i + 1]) for i in range(len(seqs))], dtype=torch.int32, device=DEV)
    return q, k, v, cu_q, cu_k, max(a for a, _ in seqs), max(b for _, b in seqs)


def _bounds(cu_q, cu_k):
    return cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]


def _random_selection(cu_q, cu_k, Hq, max_k, bs, density, seed):
    """Random blocks on each chunk's rows (diagonal kept), as a VarlenBlockSelection."""
    S = cu_q.numel() - 1
    nb = math.ceil(max_k / bs)
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(S, Hq, nb, nb, generator=g) < density).to(DEV) | torch.eye(nb, dtype=torch.bool, device=DEV)
    full, _ = full_causal_selection_varlen(*_bounds(cu_q, cu_k), Hq, max_k, bs)
    live = full > 0  # [S, Hq, nb]: rows holding queries
    ar = torch.arange(nb, device=DEV)
    counts, indices = compact_block_mask(mask & live[..., None] & (ar[None, :] <= ar[:, None]))
    return VarlenBlockSelection(
        counts=counts, indices=indices, block_size=bs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=int((cu_q[1:] - cu_q[:-1]).max()), max_seqlen_k=max_k,
        query_aware=torch.zeros(S, Hq, dtype=torch.bool, device=DEV), js_distance=torch.zeros(S, Hq, device=DEV),
    )


def _torch_in_dtype(q, k, v, cu_q, cu_k, sel, scale):
    """The same attention by PyTorch in the input dtype, per sequence: its error sets the tolerance."""
    out = torch.zeros_like(q)
    bm = sel.to_mask()
    group = q.shape[1] // k.shape[1]
    for s, (q0, q1, k0, k1) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())):
        n_q, n_k = q1 - q0, k1 - k0
        if n_q == 0:
            continue
        pos_q = torch.arange(n_k - n_q, n_k, device=DEV)
        pos_k = torch.arange(n_k, device=DEV)
        allowed = bm[s][:, pos_q // sel.block_size][:, :, pos_k // sel.block_size] & (pos_k[None, :] <= pos_q[:, None])
        qh = q[q0:q1].transpose(0, 1)
        kh = k[k0:k1].transpose(0, 1).repeat_interleave(group, 0)
        vh = v[k0:k1].transpose(0, 1).repeat_interleave(group, 0)
        sc = ((qh @ kh.transpose(-1, -2)) * scale).float().masked_fill(~allowed, float("-inf"))
        out[q0:q1] = (torch.softmax(sc, -1).to(q.dtype) @ vh).transpose(0, 1)
    return out


@pytest.mark.parametrize(
    "Hq,Hkv,D,bs,dtype,tiles",
    [
        pytest.param(4, 2, 64, 32, F16, None, id="H4/2-D64-bs32-fp16"),
        pytest.param(2, 2, 128, 64, F32, None, id="H2/2-D128-bs64-fp32"),
        pytest.param(4, 1, 64, 128, F16, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2), id="H4/1-D64-bs128-BM64-BN32-fp16"),
        pytest.param(8, 2, 128, 128, BF16, None, id="H8/2-D128-bs128-bf16", marks=pytest.mark.gpu),
        pytest.param(4, 2, 80, 64, BF16, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2), id="H4/2-D80-bs64-bf16", marks=pytest.mark.gpu),
    ],
)
def test_varlen_attention_matches_reference(Hq, Hkv, D, bs, dtype, tiles):
    q, k, v, cu_q, cu_k, max_q, max_k = _packed(SEQS, Hq, Hkv, D, dtype, seed=D + bs)
    sel = _random_selection(cu_q, cu_k, Hq, max_k, bs, 0.4, seed=bs)
    scale = 0.8 / math.sqrt(D)
    # poisoned outputs: a row the kernel does not write stays NaN
    out = torch.full_like(q, float("nan"))
    lse = torch.full((Hq, q.shape[0]), float("nan"), device=DEV)
    sparse_attention_varlen(
        q, k, v, sel.counts, sel.indices, *_bounds(cu_q, cu_k), max_q, max_k,
        block_size=bs, softmax_scale=scale, return_lse=True, config=tiles, out=out, lse=lse,
    )
    ref, ref_lse = R.block_sparse_attention_varlen(q.float(), k.float(), v.float(), sel, cu_q, cu_k, softmax_scale=scale, return_lse=True)
    pt = _torch_in_dtype(q, k, v, cu_q, cu_k, sel, scale)
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten rows"
    err = (out.float() - ref.float()).abs().max().item()
    tol = 2 * (pt.float() - ref.float()).abs().max().item() + (1e-5 if dtype == F32 else 0.0)
    assert err <= tol, f"output error {err:.3g} > {tol:.3g}"
    torch.testing.assert_close(lse, ref_lse, atol=2e-3 if dtype != F32 else 1e-5, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,D,dtype", [(8, 2, 128, BF16), (4, 1, 256, BF16), (6, 3, 64, F16)],
                         ids=["H8/2-D128-bf16", "H4/1-D256-bf16", "H6/3-D64-fp16"])
def test_varlen_hopper_ws_kernel_matches_reference(Hq, Hkv, D, dtype):
    # the warp-specialised Gluon kernel on packed sequences (Hopper only): every variant, int32
    # and int16 ids; a longer chunk gives each sequence several tiles and more tiles than SMs
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("the Gluon kernels need an sm_90 GPU")
    from flexprefill.ops.sparse_attention_hopper import ws_configs

    seqs = SEQS + [(700, 1500)]
    q, k, v, cu_q, cu_k, max_q, max_k = _packed(seqs, Hq, Hkv, D, dtype, seed=D)
    sel = _random_selection(cu_q, cu_k, Hq, max_k, 128, 0.4, seed=D)
    scale = 0.8 / math.sqrt(D)
    ref, ref_lse = R.block_sparse_attention_varlen(q.float(), k.float(), v.float(), sel, cu_q, cu_k, softmax_scale=scale,
                                                   return_lse=True)
    tol = 2 * (_torch_in_dtype(q, k, v, cu_q, cu_k, sel, scale).float() - ref.float()).abs().max().item()
    configs = [dict(c, PINGPONG=pp, DYNAMIC=dyn) for c in ws_configs(D, 128) for pp in (False, True) for dyn in (True, False)]
    assert configs
    for cfg in configs:
        for idx in (sel.indices, sel.indices.to(torch.int16)):
            out = torch.full_like(q, float("nan"))
            lse = torch.full((Hq, q.shape[0]), float("nan"), device=DEV)
            sparse_attention_varlen(q, k, v, sel.counts, idx, *_bounds(cu_q, cu_k), max_q, max_k, block_size=128,
                                    softmax_scale=scale, return_lse=True, out=out, lse=lse, hopper_config=cfg)
            assert not out.isnan().any() and not lse.isnan().any(), ("unwritten rows", cfg)
            err = (out.float() - ref.float()).abs().max().item()
            assert err <= tol, (f"output error {err:.3g} > {tol:.3g}", cfg)
            torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-3)
    # the default path takes it at head dims 128 and 256 (block size 128, no window)
    from flexprefill.ops.sparse_attention import _hopper_kernel

    assert (_hopper_kernel(q, k, v, 128) == "ws") == (D != 64)


def test_varlen_rep_scores_equal_each_sequence_alone():
    seqs = [(300, 300), (20, 20), (100, 100)]
    q, k, _, cu_q, cu_k, _, max_k = _packed(seqs, 4, 2, 64, F32, seed=3)
    vert, slash = representative_block_scores_varlen(q, k, *_bounds(cu_q, cu_k), max_k, block_size=32, scale=0.125)
    for s, (n, _) in enumerate(seqs):
        q0 = int(cu_q[s])
        v1, s1 = representative_block_scores(q[None, q0 : q0 + n], k[None, q0 : q0 + n], block_size=32, scale=0.125)
        nb = math.ceil(n / 32)
        torch.testing.assert_close(vert[s, :, :nb], v1[0], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(slash[s, :, :nb], s1[0], atol=2e-6, rtol=1e-4)
        assert (vert[s, :, nb:] == 0).all() and (slash[s, :, nb:] == 0).all()


@pytest.mark.parametrize("block_stats", ["0", "1"])
def test_varlen_rep_scores_and_block_means_of_chunks(block_stats, monkeypatch):
    # rep_block_stats: the block masses from the first pass's per-block row stats
    fp.set_options(rep_block_stats=block_stats == "1")
    seqs = [(150, 407), (1, 90), (64, 192), (0, 50)]
    q, k, _, cu_q, cu_k, _, max_k = _packed(seqs, 4, 2, 64, F32, seed=5)
    bs = 32
    vert, slash = representative_block_scores_varlen(q, k, *_bounds(cu_q, cu_k), max_k, block_size=bs, scale=0.125)
    nb_max = math.ceil(max_k / bs)
    q_bar = block_means_varlen(q, *_bounds(cu_q, cu_k), nb_max, block_size=bs)
    for s, (n_q, n_k) in enumerate(seqs):
        q0, k0 = int(cu_q[s]), int(cu_k[s])
        qc, kc = q[None, q0 : q0 + n_q], k[None, k0 : k0 + n_k]
        v0, s0 = R.representative_block_scores(qc, kc, block_size=bs, scale=0.125)
        nb = math.ceil(n_k / bs)
        torch.testing.assert_close(vert[s, :, :nb], v0[0], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(slash[s, :, :nb], s0[0], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(q_bar[s, :nb], R.block_means(qc, bs, offset=n_k - n_q)[0], atol=1e-6, rtol=1e-5)


CONFIGS = [
    pytest.param(dict(), id="default"),
    pytest.param(dict(tau=1.0), id="all-query-aware"),
    pytest.param(dict(tau=0.0, gamma=0.5), id="vertical-slash-g0.5"),
    pytest.param(dict(tau=1.0, min_budget=0, max_budget=64), id="qa-max64"),
]


@pytest.mark.parametrize("cfg_kw", CONFIGS)
def test_varlen_selection_equals_reference(cfg_kw):
    q, k, _, cu_q, cu_k, max_q, max_k = _packed(SEQS, 4, 2, 64, F32, seed=11, structured=True)
    cfg = FlexPrefillConfig(block_size=32, **{"min_budget": 64, **cfg_kw})
    scale = 0.125
    # sequences with n_k < 60 run dense (full rows, no search)
    counts, indices, qa, dist = select_blocks_varlen_fast(
        q, k, *_bounds(cu_q, cu_k), max_k, config=cfg, softmax_scale=scale, dense_below=60
    )
    ref = R.select_blocks_varlen(q, k, cu_q, cu_k, max_q, max_k, config=cfg, softmax_scale=scale, dense_below=60)
    torch.testing.assert_close(dist, ref.js_distance, atol=1e-4, rtol=1e-3, equal_nan=True)
    near = (ref.js_distance - cfg.tau).abs() < 1e-4
    assert torch.equal(qa | near, ref.query_aware | near)
    if not near.any():
        assert torch.equal(counts, ref.counts)
        assert torch.equal(indices, ref.indices)
    # rows outside each chunk are empty, and the chunk's rows keep sink and diagonal
    sel = VarlenBlockSelection(counts, indices, 32, cu_q, cu_k, max_q, max_k, qa, dist)
    full, _ = full_causal_selection_varlen(*_bounds(cu_q, cu_k), 4, max_k, 32)
    live = full > 0
    assert (counts[~live] == 0).all()
    mask = sel.to_mask()
    assert mask[..., 0][live].all() and mask.diagonal(dim1=-2, dim2=-1)[live].all()


@pytest.mark.gpu
def test_varlen_no_host_sync_and_cuda_graph():
    import flexprefill as fp

    q, k, v, cu_q, cu_k, max_q, max_k = _packed([(4096, 4096), (1000, 5000), (77, 77)], 8, 2, 128, BF16, seed=1)
    cfg = fp.FlexPrefillConfig(min_seq_len=1024)
    kw = dict(config=cfg, return_lse=True)
    out, lse = fp.flex_prefill_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fp.flex_prefill_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = fp.flex_prefill_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_out, out) and torch.equal(g_lse, lse)
