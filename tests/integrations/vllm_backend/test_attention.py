"""FlexPrefill over the sparse chunks of a hand-built vLLM step (paged cache, mixed batch)
against the operator on the contiguous K/V, and against dense attention at gamma=1.
No vLLM needed: the forward of the sparse chunks takes plain tensors."""

import math

import pytest
import torch

import flexprefill as fp
from flexprefill.integrations.vllm.attention import sparse_prefill_forward
from flexprefill.integrations.vllm.plan import plan_step, to_device
from vllm_step import make_step

CFG = fp.FlexPrefillConfig(block_size=32, min_budget=32, min_seq_len=256, gamma=0.9, backend="torch")


def _run(step, cfg, gather_backend="torch"):
    plan = plan_step(step.query_start_loc, step.seq_lens, min_seq_len=cfg.min_seq_len)
    batch = to_device(plan, step.block_table)
    out = torch.full_like(step.query, float("nan"))
    scale = 1 / math.sqrt(step.query.shape[-1])
    sparse_prefill_forward(step.query, step.key_cache, step.value_cache, batch, out, config=cfg,
                           softmax_scale=scale, gather_backend=gather_backend)
    return plan, out, scale


def _dense_chunk(q, k, v, scale):
    """Bottom-right causal attention of a chunk of n_q queries over n_k keys, fp32."""
    n_q, Hq, _ = q.shape
    n_k, Hkv, _ = k.shape
    g = Hq // Hkv
    qf, kf, vf = q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", qf, kf) * scale
    pos = torch.arange(n_k - n_q, n_k)[:, None]
    s = s.masked_fill(torch.arange(n_k)[None, :] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vf)


# decode, sparse chunk over a prefix, short prefill, sparse first chunk, decode, short chunk
MIXED = [(300, 1), (250, 90), (0, 40), (0, 300), (70, 1), (100, 50)]


@pytest.mark.parametrize("gather_backend", ["torch", "triton"])
def test_sparse_rows_equal_the_operator_on_contiguous_kv(gather_backend):
    step = make_step(MIXED, Hq=4, Hkv=2, D=64, page_size=16, seed=1)
    plan, out, scale = _run(step, CFG, gather_backend)
    assert plan.req_idx == (1, 3)
    qsl = step.query_start_loc.tolist()
    rows = [slice(qsl[r], qsl[r + 1]) for r in plan.req_idx]
    # the same packed call on the contiguous K/V: bit for bit
    want = fp.flex_prefill_attention_varlen(
        torch.cat([step.query[s] for s in rows]), torch.cat([step.keys[r] for r in plan.req_idx]),
        torch.cat([step.values[r] for r in plan.req_idx]), plan.cu_seqlens_q, plan.cu_seqlens_k,
        plan.max_seqlen_q, plan.max_seqlen_k, config=CFG, softmax_scale=scale)
    assert torch.equal(torch.cat([out[s] for s in rows]), want)
    # and each chunk run alone, to fp16 rounding
    for r, s in zip(plan.req_idx, rows):
        n, n_k = s.stop - s.start, step.keys[r].shape[0]
        alone = fp.flex_prefill_attention_varlen(
            step.query[s], step.keys[r], step.values[r], torch.tensor([0, n], dtype=torch.int32),
            torch.tensor([0, n_k], dtype=torch.int32), n, n_k, config=CFG, softmax_scale=scale)
        torch.testing.assert_close(out[s], alone, atol=2e-3, rtol=2e-3)


def test_other_rows_are_left_as_given():
    step = make_step(MIXED, seed=2)
    plan, out, _ = _run(step, CFG)
    qsl = step.query_start_loc.tolist()
    sparse_rows = torch.zeros(step.query.shape[0], dtype=torch.bool)
    for r in plan.req_idx:
        sparse_rows[qsl[r]:qsl[r + 1]] = True
    assert bool(out[~sparse_rows].isnan().all())
    assert bool(out[sparse_rows].isfinite().all())


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gamma_one_equals_dense_bottom_right_causal(layout):
    cfg = CFG.replace(gamma=1.0)
    step = make_step([(10, 1), (333, 77), (0, 280)], Hq=4, Hkv=1, D=64, page_size=32, layout=layout,
                     dtype=torch.float32, seed=4)
    plan, out, scale = _run(step, cfg)
    qsl = step.query_start_loc.tolist()
    for r in plan.req_idx:
        got = out[qsl[r]:qsl[r + 1]]
        want = _dense_chunk(step.query[qsl[r]:qsl[r + 1]], step.keys[r], step.values[r], scale)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_adjacent_chunks_use_the_row_range():
    step = make_step([(0, 300), (400, 64), (5, 1)], seed=6)
    plan, out, scale = _run(step, CFG)
    assert plan.contiguous and not plan.covers_batch
    assert bool(out[:364].isfinite().all()) and bool(out[364:].isnan().all())
