"""The mapping from a vLLM step's metadata to FlexPrefill's varlen inputs (no vLLM needed)."""

import pytest
import torch

from flexprefill.integrations.vllm.plan import plan_step, to_device
from vllm_step import make_step


def _plan(requests, min_seq_len, decode_threshold=1, pad_reqs=0):
    step = make_step(requests, pad_reqs=pad_reqs)
    return step, plan_step(step.query_start_loc, step.seq_lens, min_seq_len=min_seq_len,
                           decode_threshold=decode_threshold)


def test_mixed_step_classes_and_varlen_inputs():
    # decode, short prefill, sparse chunk over a prefix, decode, sparse first chunk, short chunk
    reqs = [(300, 1), (0, 40), (200, 90), (70, 1), (0, 260), (100, 50)]
    step, plan = _plan(reqs, min_seq_len=256)
    s = plan.split
    assert (s.num_decodes, s.num_short_prefills, s.num_sparse) == (2, 2, 2)
    assert (s.num_decode_tokens, s.num_short_prefill_tokens, s.num_sparse_tokens) == (2, 90, 350)
    assert plan.req_idx == (2, 4)
    qsl = step.query_start_loc.tolist()
    assert plan.q_start == (qsl[2], qsl[4]) and plan.q_end == (qsl[3], qsl[5])
    assert plan.seq_lens == (290, 260)
    assert plan.cu_seqlens_q.tolist() == [0, 90, 350] and plan.cu_seqlens_q.dtype == torch.int32
    assert plan.cu_seqlens_k.tolist() == [0, 290, 550] and plan.cu_seqlens_k.dtype == torch.int32
    assert (plan.max_seqlen_q, plan.max_seqlen_k) == (260, 290)
    assert not plan.contiguous and not plan.covers_batch
    assert (plan.total_q, plan.total_k) == (350, 550)


def test_context_reaching_min_seq_len_exactly_is_sparse_and_one_below_is_not():
    _, plan = _plan([(100, 156), (100, 155)], min_seq_len=256)
    assert plan.req_idx == (0,)
    assert plan.split.num_short_prefills == 1


def test_adjacent_chunks_are_one_row_range_and_cover_the_batch():
    _, plan = _plan([(0, 300), (500, 64)], min_seq_len=256)
    assert plan.contiguous and plan.covers_batch
    assert plan.q_start == (0, 300) and plan.q_end == (300, 364)


def test_no_sparse_request_gives_none():
    assert _plan([(5000, 1), (0, 100)], min_seq_len=256)[1] is None
    assert _plan([(5000, 1)] * 3, min_seq_len=256)[1] is None


def test_speculative_decode_rows_are_decodes_not_chunks():
    # 1 + 3 draft tokens over a long context: a decode row when decode_threshold = 4
    _, plan = _plan([(4000, 4), (0, 300)], min_seq_len=256, decode_threshold=4)
    assert plan.req_idx == (1,) and plan.split.num_decodes == 1
    _, plan = _plan([(4000, 4), (0, 300)], min_seq_len=256, decode_threshold=1)
    assert plan.req_idx == (0, 1)


def test_cuda_graph_padding_rows_belong_to_no_class():
    _, plan = _plan([(0, 300), (10, 1)], min_seq_len=256, pad_reqs=3)
    s = plan.split
    assert s.num_decodes + s.num_short_prefills + s.num_sparse == 2
    assert plan.req_idx == (0,) and not plan.covers_batch


def test_num_reqs_limits_the_rows_read():
    step = make_step([(0, 300), (0, 400)])
    plan = plan_step(step.query_start_loc, step.seq_lens, min_seq_len=256, num_reqs=1)
    assert plan.req_idx == (0,) and plan.covers_batch


@pytest.mark.parametrize("bad, match", [
    (dict(query_start_loc=torch.tensor([0, 5, 3])), "non-decreasing"),
    (dict(seq_lens=torch.tensor([5, 1])), "seq_len >= query_len"),
    (dict(seq_lens=torch.tensor([5.0, 9.0])), "1-D integer"),
    (dict(min_seq_len=-1), "min_seq_len"),
    (dict(decode_threshold=0), "decode_threshold"),
    (dict(num_reqs=3), "need at least"),
])
def test_bad_metadata_is_refused_with_the_argument_named(bad, match):
    kw = dict(query_start_loc=torch.tensor([0, 5, 8]), seq_lens=torch.tensor([5, 9]), min_seq_len=4,
              decode_threshold=1)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        plan_step(kw.pop("query_start_loc"), kw.pop("seq_lens"), **kw)


def test_to_device_takes_the_sparse_rows_of_the_block_table():
    step, plan = _plan([(10, 1), (200, 90), (0, 40), (0, 300)], min_seq_len=256)
    batch = to_device(plan, step.block_table)
    assert torch.equal(batch.block_table, step.block_table[[1, 3]])
    assert batch.seq_lens.tolist() == [290, 300] and batch.seq_lens.dtype == torch.int32
    qsl = step.query_start_loc.tolist()
    want = list(range(qsl[1], qsl[2])) + list(range(qsl[3], qsl[4]))
    assert batch.rows.tolist() == want
    # another KV-cache group: same requests, its own block table
    other = torch.arange(step.block_table.numel(), dtype=torch.int32).view_as(step.block_table)
    assert torch.equal(batch.with_block_table(other).block_table, other[[1, 3]])


def test_to_device_of_contiguous_chunks_has_no_row_index():
    step, plan = _plan([(0, 300), (0, 260)], min_seq_len=256)
    assert to_device(plan, step.block_table).rows is None
