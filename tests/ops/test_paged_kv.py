"""The paged K/V gather against a direct index of the contiguous K/V (Triton interpreter on
the CPU, the GPU where there is one)."""

import pytest
import torch

from flexprefill.integrations.vllm.plan import plan_step, to_device
from flexprefill.ops.paged_kv import gather_paged_kv

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "vllm_backend"))
from vllm_step import make_step  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _gather(step, backend, min_seq_len=1):
    plan = plan_step(step.query_start_loc, step.seq_lens, min_seq_len=min_seq_len)
    kc, vc = step.key_cache.to(DEV), step.value_cache.to(DEV)
    batch = to_device(plan, step.block_table.to(DEV))
    k, v = gather_paged_kv(kc, vc, batch.block_table, batch.seq_lens, batch.cu_seqlens_k, total_k=plan.total_k,
                           max_seqlen_k=plan.max_seqlen_k, backend=backend)
    want_k = torch.cat([step.keys[r] for r in plan.req_idx]).to(DEV)
    want_v = torch.cat([step.values[r] for r in plan.req_idx]).to(DEV)
    return k, v, want_k, want_v


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("page_size, layout, D, dtype", [
    pytest.param(16, "NHD", 64, torch.float16, id="P16-NHD-D64-f16"),
    pytest.param(32, "HND", 128, torch.float16, id="P32-HND-D128-f16"),
    pytest.param(64, "NHD", 80, torch.float32, id="P64-NHD-D80-f32"),
])
def test_gather_equals_the_contiguous_kv(backend, page_size, layout, D, dtype):
    # chunks over prefixes that end mid-page, a first chunk, a one-token row
    step = make_step([(45, 30), (0, 97), (130, 1), (7, 200)], page_size=page_size, layout=layout, D=D,
                     dtype=dtype, seed=3)
    k, v, want_k, want_v = _gather(step, backend)
    assert k.shape == want_k.shape and k.is_contiguous()
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.gpu
def test_gather_bf16_on_gpu():
    step = make_step([(3000, 500), (0, 1000)], page_size=16, D=128, dtype=torch.bfloat16, seed=5)
    k, v, want_k, want_v = _gather(step, "auto")
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_gather_refuses_a_table_too_short_for_the_length():
    step = make_step([(0, 40)], page_size=16)
    bt = step.block_table[:, :2]
    with pytest.raises(ValueError, match="reach"):
        gather_paged_kv(step.key_cache, step.value_cache, bt, step.seq_lens, torch.tensor([0, 40]), total_k=40,
                        max_seqlen_k=40)


def test_gather_refuses_mismatched_caches():
    step = make_step([(0, 40)], page_size=16)
    with pytest.raises(ValueError, match="must match"):
        gather_paged_kv(step.key_cache, step.value_cache.float(), step.block_table, step.seq_lens,
                        torch.tensor([0, 40]), total_k=40, max_seqlen_k=40)
