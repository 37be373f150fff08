"""Packed sequences, chunked prefill and padded batches through the public API.

A chunk is a sequence with n_q < n_k: its queries are the last n_q of n_k positions
(bottom-right causal, as FlashAttention).  The triton cases run in the interpreter on a CPU.
"""

import math

import pytest
import torch

import flexprefill as fp
from flexprefill import reference as R
from flexprefill_tools.synthetic import structured_qkv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [pytest.param("reference", id="reference"), pytest.param("triton", id="triton")]


def _dtype(backend):
    # the API takes fp32 on the CPU only
    return torch.float16 if backend == "triton" or DEV == "cuda" else torch.float32


def _cu(lens):
    return torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEV)


def _seqs(lens, Hq=4, Hkv=2, D=64, dtype=torch.float32, seed=0):
    """Independent structured sequences, as lists of [n, H, D] tensors."""
    out = [structured_qkv(1, n, Hq, Hkv, D, seed=seed + i, dtype=dtype, device=DEV) for i, n in enumerate(lens)]
    return [[t[0] for t in qkv] for qkv in out]


def test_varlen_equals_each_sequence_alone():
    # a sequence shorter than one block, one shorter than min_seq_len, two searched ones
    lens = [300, 20, 70, 193]
    for backend in ("reference", "triton"):
        dtype = _dtype(backend)
        seqs = _seqs(lens, dtype=dtype, seed=1)
        q, k, v = (torch.cat([s[i] for s in seqs]) for i in range(3))
        cfg = fp.FlexPrefillConfig(block_size=32, min_budget=64, gamma=0.8, min_seq_len=64, backend=backend)
        cu = _cu(lens)
        out, lse, stats = fp.flex_prefill_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), config=cfg, return_lse=True, return_stats=True)
        assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and stats.density.shape == (4, 4)
        for s, (sq, sk, sv) in enumerate(seqs):
            o1, l1, st1 = fp.flex_prefill_attention(sq[None], sk[None], sv[None], config=cfg, return_lse=True, return_stats=True)
            rows = slice(int(cu[s]), int(cu[s + 1]))
            torch.testing.assert_close(out[rows], o1[0], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(lse[:, rows], l1[0], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(stats.density[s], st1.density[0])
        # the 20-token sequence ran dense
        assert torch.isnan(stats.js_distance[1]).all() and (stats.density[1] == 1).all()
        assert bool((stats.density[[0, 3]] < 1).any()), "the long sequences should be sparse"


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_gamma_one_equals_full_prefill(backend):
    # one 333-token prompt in unaligned chunks [0, 75), [75, 200), [200, 333), all in one batch
    dtype = _dtype(backend)
    N, bounds = 333, [0, 75, 200, 333]
    q, k, v = (t[0] for t in structured_qkv(1, N, 4, 2, 64, seed=2, dtype=dtype, device=DEV))
    cfg = fp.FlexPrefillConfig(block_size=32, gamma=1.0, min_seq_len=0, backend=backend)
    full, full_lse = fp.flex_prefill_attention(q[None], k[None], v[None], config=cfg, return_lse=True)
    ref, ref_lse = R.dense_attention(q[None].float(), k[None].float(), v[None].float(), return_lse=True)
    qc = q  # the chunks' queries, in order
    kc = torch.cat([k[: bounds[i + 1]] for i in range(3)])
    vc = torch.cat([v[: bounds[i + 1]] for i in range(3)])
    cu_q = _cu([bounds[i + 1] - bounds[i] for i in range(3)])
    cu_k = _cu(bounds[1:])
    out, lse, stats = fp.flex_prefill_attention_varlen(qc, kc, vc, cu_q, cu_k, 133, N, config=cfg, return_lse=True, return_stats=True)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out, full[0], atol=tol, rtol=tol)
    torch.testing.assert_close(lse, full_lse[0], atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), ref[0].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse[0], atol=tol, rtol=tol)
    assert torch.allclose(stats.density, torch.ones_like(stats.density))
    assert int(stats.num_blocks[1, 0]) == sum(r + 1 for r in range(75 // 32, math.ceil(200 / 32)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_merge_of_prefix_and_own_keys_equals_the_chunk(backend):
    # what engines do: queries [P, N) over the cached prefix (all visible) and over their own
    # keys (causal), merged by LSE, equal the chunk's attention over keys [0, N)
    dtype = _dtype(backend)
    N, P, Hq, Hkv, D = 250, 90, 4, 2, 64
    q, k, v = (t[0] for t in structured_qkv(1, N, Hq, Hkv, D, seed=4, dtype=dtype, device=DEV))
    cfg = fp.FlexPrefillConfig(block_size=32, gamma=1.0, min_seq_len=0, backend=backend)
    scale = D**-0.5
    cu_q, cu_k = _cu([N - P]), _cu([N])
    chunk, chunk_lse = fp.flex_prefill_attention_varlen(q[P:], k, v, cu_q, cu_k, N - P, N, config=cfg, return_lse=True)
    own, own_lse = fp.flex_prefill_attention_varlen(q[P:], k[P:], v[P:], cu_q, cu_q, N - P, N - P, config=cfg, return_lse=True)
    # the prefix part: plain non-causal attention in fp32
    g = Hq // Hkv
    s = scale * torch.einsum("qhd,khd->hqk", q[P:].float(), k[:P].float().repeat_interleave(g, 1))
    pre_lse = torch.logsumexp(s, -1)  # [Hq, n_q]
    pre = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v[:P].float().repeat_interleave(g, 1))
    lse = torch.logaddexp(pre_lse, own_lse)
    merged = (torch.exp(pre_lse - lse).T[..., None] * pre) + (torch.exp(own_lse - lse).T[..., None] * own.float())
    tol = 3e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(lse, chunk_lse, atol=tol, rtol=tol)
    torch.testing.assert_close(merged, chunk.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_equals_varlen(backend):
    dtype = _dtype(backend)
    lens = [200, 17, 130]
    B, N = 3, 200
    seqs = _seqs(lens, dtype=dtype, seed=6)
    q, k, v = (torch.zeros(B, N, h, 64, dtype=dtype, device=DEV) for h in (4, 2, 2))
    for b, (sq, sk, sv) in enumerate(seqs):
        q[b, : lens[b]], k[b, : lens[b]], v[b, : lens[b]] = sq, sk, sv
    cfg = fp.FlexPrefillConfig(block_size=32, gamma=0.8, min_budget=32, min_seq_len=100, backend=backend)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out, lse, stats = fp.flex_prefill_attention(q, k, v, config=cfg, seq_lens=seq_lens, return_lse=True, return_stats=True)
    cu = _cu(lens)
    pq, pk, pv = (torch.cat([s[i] for s in seqs]) for i in range(3))
    vo, vl, vs = fp.flex_prefill_attention_varlen(pq, pk, pv, cu, cu, N, N, config=cfg, return_lse=True, return_stats=True)
    for b in range(B):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        torch.testing.assert_close(out[b, : lens[b]], vo[rows], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse[b, :, : lens[b]], vl[:, rows], atol=1e-6, rtol=1e-6)
        assert (out[b, lens[b] :] == 0).all() and torch.isneginf(lse[b, :, lens[b] :]).all()
    torch.testing.assert_close(stats.density, vs.density)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_operator_equals_its_two_halves(backend):
    dtype = _dtype(backend)
    q, k, v = (t[0] for t in structured_qkv(1, 400, 4, 2, 64, seed=8, dtype=dtype, device=DEV))
    # a 250-query chunk over a 150-token prefix and, in the same batch, a 100-token prompt
    qp, kp, vp = (torch.cat([t[150:], t[:100]]) for t in (q, k, v))
    kp, vp = torch.cat([k, k[:100]]), torch.cat([v, v[:100]])
    cu_q, cu_k = _cu([250, 100]), _cu([400, 100])
    cfg = fp.FlexPrefillConfig(block_size=64, min_budget=128, min_seq_len=0, backend=backend)
    out = fp.flex_prefill_attention_varlen(qp, kp, vp, cu_q, cu_k, 250, 400, config=cfg)
    sel = fp.select_blocks_varlen(qp, kp, cu_q, cu_k, 250, 400, config=cfg)
    assert isinstance(sel, fp.VarlenBlockSelection) and sel.counts.shape == (2, 4, 7)
    assert (sel.counts[0, :, :2] == 0).all() and (sel.counts[1, :, 2:] == 0).all()
    out2 = fp.block_sparse_attention_varlen(qp, kp, vp, sel, cu_q, cu_k, backend=backend)
    assert torch.equal(out, out2)
    dense = R.dense_attention_varlen(qp.float(), kp.float(), vp.float(), cu_q, cu_k)
    assert (out.float() - dense).norm() / dense.norm() < 0.5


def _bad_varlen():
    q, k, v = torch.randn(10, 4, 64), torch.randn(12, 2, 64), torch.randn(12, 2, 64)
    cq, ck = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 12], dtype=torch.int32)
    return [
        pytest.param((q, k, v, cq.long(), ck, 6, 8), TypeError, "cu_seqlens_q must be int32", id="cu-int64"),
        pytest.param((q, k, v, cq, ck.float(), 6, 8), TypeError, "cu_seqlens_k must be int32", id="cu-float"),
        pytest.param((q, k, v, cq, ck.to("meta"), 6, 8), ValueError, "cu_seqlens_k is on meta", id="cu-device"),
        pytest.param((q, k, v, cq, ck[:2], 6, 8), ValueError, "one per sequence", id="cu-count"),
        pytest.param((q, k, v, cq[None], ck, 6, 8), ValueError, "cu_seqlens_q must have shape", id="cu-rank"),
        pytest.param((q, k, v, cq, ck, 6.0, 8), TypeError, "max_seqlen_q", id="max-float"),
        pytest.param((q, k, v, cq, ck, 6, torch.tensor(8)), TypeError, "max_seqlen_k", id="max-tensor"),
        pytest.param((q, k, v, cq, ck, 9, 8), ValueError, "max_seqlen_q=9 > max_seqlen_k", id="max-order"),
        pytest.param((q[None], k, v, cq, ck, 6, 8), ValueError, "q must have 3 dims", id="q-rank"),
        pytest.param((q, k, v[:11], cq, ck, 6, 8), ValueError, "same \\[total_k, Hkv\\]", id="kv-rows"),
        pytest.param((q[:, :3], k, v, cq, ck, 6, 8), ValueError, "multiple of key/value heads", id="gqa"),
        pytest.param((q, k.half(), v, cq, ck, 6, 8), TypeError, "share a dtype", id="dtype"),
        # host-checkable values (CPU only: on CUDA reading them would be a sync)
        pytest.param((q, k, v, torch.tensor([0, 7, 10], dtype=torch.int32), ck, 7, 8), ValueError, "queries but 4 keys", id="nq-gt-nk"),
        pytest.param((q, k, v, torch.tensor([0, 6, 10], dtype=torch.int32), ck, 4, 8), ValueError, "max_seqlen", id="len-gt-max"),
        pytest.param((q, k, v, cq, torch.tensor([0, 8, 6], dtype=torch.int32), 6, 8), ValueError, "end at 12", id="cu-end"),
        pytest.param((q, k, v, cq, torch.tensor([0, 13, 12], dtype=torch.int32), 6, 13), ValueError, "non-decreasing", id="cu-monotone"),
    ]


@pytest.mark.parametrize("args,exc,msg", _bad_varlen())
def test_bad_varlen_inputs_raise_clear_errors(args, exc, msg):
    with pytest.raises(exc, match=msg):
        fp.flex_prefill_attention_varlen(*args)


def test_bad_seq_lens_and_selection():
    q, k, v = torch.randn(2, 50, 4, 64), torch.randn(2, 50, 2, 64), torch.randn(2, 50, 2, 64)
    with pytest.raises(TypeError, match="seq_lens must be int32"):
        fp.flex_prefill_attention(q, k, v, seq_lens=torch.tensor([50, 3]))
    with pytest.raises(ValueError, match="seq_lens must have shape"):
        fp.flex_prefill_attention(q, k, v, seq_lens=torch.tensor([50], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        fp.flex_prefill_attention(q, k, v, seq_lens=torch.tensor([51, 3], dtype=torch.int32))
    qp, kp, vp = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
    cu = torch.tensor([0, 50, 100], dtype=torch.int32)
    cfg = fp.FlexPrefillConfig(block_size=32, backend="reference")
    sel = fp.select_blocks_varlen(qp, kp, cu, cu, 50, 50, config=cfg)
    with pytest.raises(TypeError, match="VarlenBlockSelection"):
        fp.block_sparse_attention_varlen(qp, kp, vp, sel.to_mask(), cu, cu)
    with pytest.raises(ValueError, match="selection"):
        fp.block_sparse_attention_varlen(qp[:, :2], kp[:, :1], vp[:, :1], sel, cu, cu)


@pytest.mark.gpu
def test_bf16_varlen_chunk_matches_reference():
    N, P = 5000, 1234
    q, k, v = (t[0] for t in structured_qkv(1, N, 8, 2, 128, seed=9, dtype=torch.bfloat16, device="cuda"))
    cfg = fp.FlexPrefillConfig(min_seq_len=0)
    cu_q, cu_k = _cu([N - P, N]), _cu([N, N])
    qp, kp, vp = torch.cat([q[P:], q]), torch.cat([k, k]), torch.cat([v, v])
    out, lse = fp.flex_prefill_attention_varlen(qp, kp, vp, cu_q, cu_k, N, N, config=cfg, return_lse=True)
    sel = fp.select_blocks_varlen(qp, kp, cu_q, cu_k, N, N, config=cfg)
    ref, ref_lse = R.block_sparse_attention_varlen(qp.float(), kp.float(), vp.float(), sel, cu_q, cu_k, return_lse=True)
    assert (out.float() - ref).abs().max() < 3e-2
    assert (lse - ref_lse).abs().max() < 1e-2
    ref_sel = R.select_blocks_varlen(qp.float(), kp.float(), cu_q, cu_k, N, N, config=cfg)
    agree = (sel.to_mask() == ref_sel.to_mask()).float().mean()
    assert agree > 0.99, agree
