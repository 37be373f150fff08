"""The pattern search with logit soft-capping (``softcap``) against the oracle.

Every score of the search is capped (``cap * tanh(s / cap)``): the representative queries'
attention, the block-pooled estimate and the query-aware block logits, so the pattern is the
one of the capped attention.  The device search (Triton kernels, the interpreter on a CPU) and
the plain-torch search must pick the oracle's blocks; the caps used here bend the structured
inputs' scores enough that the capped pattern differs from the uncapped one.
"""

import pytest
import torch

import flexprefill as fp
from flexprefill import reference as R
from flexprefill.search import representative_block_scores, select_blocks_fast
from flexprefill.search import torch_search as TS
from flexprefill_tools.synthetic import structured_qkv

CAP = 1.5


def _inputs(B, N, Hq, Hkv, D, seed, n_k=None):
    n_k = n_k or N
    q, k, _ = structured_qkv(B, n_k, Hq, Hkv, D, seed=seed, dtype=torch.float32, strength=2.0)
    return q[:, n_k - N:].contiguous(), k


CASES = [
    pytest.param(1, 1000, 4, 2, 64, 64, id="N1000-H4/2-D64-bs64"),
    pytest.param(2, 300, 4, 1, 64, 32, id="B2-N300-H4/1-D64-bs32"),
    pytest.param(1, 700, 2, 2, 128, 128, id="N700-H2/2-D128-bs128"),
    pytest.param(1, 520, 2, 1, 256, 64, id="N520-H2/1-D256-bs64"),
]


@pytest.mark.parametrize("B,N,Hq,Hkv,D,bs,block_stats", [
    pytest.param(*c.values, bst, id=f"{c.id}-{'stats' if bst else 'two-pass'}")
    for c, bst in zip(CASES, (False, True, True, False))
] + [pytest.param(*CASES[1].values, False, id=f"{CASES[1].id}-two-pass")])
def test_representative_scores_match_reference(B, N, Hq, Hkv, D, bs, block_stats):
    q, k = _inputs(B, N, Hq, Hkv, D, seed=N)
    scale = D**-0.5
    fp.set_options(rep_block_stats=block_stats)
    v1, s1 = representative_block_scores(q, k, block_size=bs, scale=scale, softcap=CAP)
    v0, s0 = R.representative_block_scores(q, k, block_size=bs, scale=scale, softcap=CAP)
    torch.testing.assert_close(v1, v0, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(s1, s0, atol=2e-6, rtol=1e-4)
    vt, st = TS.representative_block_scores(q, k, block_size=bs, scale=scale, softcap=CAP)
    torch.testing.assert_close(vt, v0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st, s0, atol=1e-6, rtol=1e-5)
    # the cap changes the scores (the check above can fail)
    vu, _ = R.representative_block_scores(q, k, block_size=bs, scale=scale)
    assert (vu - v0).abs().max() > 1e-3


CONFIGS = [
    pytest.param(dict(tau=0.1, gamma=0.9), id="default"),
    pytest.param(dict(tau=1.0, gamma=0.9), id="all-query-aware"),
    pytest.param(dict(tau=0.0, gamma=0.6), id="vertical-slash-g0.6"),
    pytest.param(dict(tau=1.0, gamma=0.8, max_budget=192), id="qa-max192"),
]


def _assert_device_equals_reference(fast, ref, tau):
    """As the uncapped search tests: equal decisions away from tau, equal blocks, or (the radix
    threshold summing in another order) one ranked entry more or less per head."""
    torch.testing.assert_close(fast.js_distance, ref.js_distance, atol=1e-4, rtol=1e-3)
    near = (ref.js_distance - tau).abs() < 1e-4
    assert torch.equal(fast.query_aware | near, ref.query_aware | near)
    if near.any():
        return
    if not (torch.equal(fast.counts, ref.counts) and torch.equal(fast.indices, ref.indices)):
        per_head = (fast.counts.sum(-1) - ref.counts.sum(-1)).abs()
        assert int(per_head.max()) <= 1, per_head


@pytest.mark.parametrize("B,N,Hq,Hkv,D,bs,cfg_kw", [
    pytest.param(*c.values, *k.values, id=f"{c.id}-{k.id}")
    for c, k in ((CASES[0], CONFIGS[0]), (CASES[0], CONFIGS[2]), (CASES[1], CONFIGS[1]), (CASES[1], CONFIGS[3]),
                 (CASES[2], CONFIGS[1]), (CASES[2], CONFIGS[2]))
])
def test_selection_equals_reference(B, N, Hq, Hkv, D, bs, cfg_kw):
    q, k = _inputs(B, N, Hq, Hkv, D, seed=7 + N)
    cfg = fp.FlexPrefillConfig(block_size=bs, min_budget=bs, min_seq_len=0, **cfg_kw)
    scale = D**-0.5
    ref = R.select_blocks(q, k, config=cfg, softmax_scale=scale, softcap=CAP)
    fast = select_blocks_fast(q, k, config=cfg, softmax_scale=scale, softcap=CAP)
    _assert_device_equals_reference(fast, ref, cfg.tau)
    # the plain-torch search: the oracle's roundings, so the same blocks exactly (away from tau)
    got = TS.select_blocks(q, k, config=cfg, softmax_scale=scale, softcap=CAP)
    torch.testing.assert_close(got.js_distance, ref.js_distance, atol=1e-6, rtol=0)
    if not ((ref.js_distance - cfg.tau).abs() < 1e-6).any():
        assert torch.equal(got.counts, ref.counts) and torch.equal(got.indices, ref.indices)


def test_the_cap_changes_the_pattern():
    # what the tests above compare is not the uncapped pattern: capping flattens the scores,
    # so the gamma rule keeps more blocks, and the estimate's distance moves
    q, k = _inputs(1, 1000, 4, 2, 64, seed=1007)
    for cfg_kw in ({"tau": 0.0, "gamma": 0.6}, {"tau": 1.0, "gamma": 0.9}):
        cfg = fp.FlexPrefillConfig(block_size=64, min_budget=64, min_seq_len=0, **cfg_kw)
        capped = R.select_blocks(q, k, config=cfg, softcap=CAP)
        plain = R.select_blocks(q, k, config=cfg)
        assert int(capped.counts.sum()) > int(plain.counts.sum()), cfg_kw
        assert (capped.js_distance - plain.js_distance).abs().max() > 1e-3


@pytest.mark.parametrize("tau", [0.3])
def test_varlen_selection_equals_reference(tau):
    # packed sequences and a chunk over a cached prefix, each searched with the cap
    lens_q, lens_k = [300, 130, 257], [300, 400, 257]
    seqs = [_inputs(1, nq, 4, 2, 64, seed=nk + i, n_k=nk) for i, (nq, nk) in enumerate(zip(lens_q, lens_k))]
    q = torch.cat([s[0][0] for s in seqs])
    k = torch.cat([s[1][0] for s in seqs])
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    cfg = fp.FlexPrefillConfig(block_size=64, tau=tau, gamma=0.8, min_budget=64, min_seq_len=0)
    args = (q, k, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k))
    ref = R.select_blocks_varlen(*args, config=cfg, softcap=CAP)
    near = (ref.js_distance - tau).abs() < 1e-4
    for backend in ("torch", "triton"):
        got = fp.select_blocks_varlen(*args, config=cfg.replace(backend=backend), softcap=CAP)
        torch.testing.assert_close(got.js_distance, ref.js_distance, atol=1e-4, rtol=1e-3)
        assert torch.equal(got.query_aware | near, ref.query_aware | near)
        if not near.any():
            per_head = (got.counts.sum(-1) - ref.counts.sum(-1)).abs()
            assert int(per_head.max()) <= (0 if backend == "torch" else 1), (backend, per_head)
    uncapped = R.select_blocks_varlen(*args, config=cfg)
    assert not torch.equal(uncapped.counts, ref.counts)
