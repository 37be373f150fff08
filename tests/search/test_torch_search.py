"""The plain-torch search (all heads at once) against the oracle, head by head: the same
block counts and the same indices.  A head whose JS distance lies within 1e-6 of ``tau``
may take the other pattern on fp32 rounding alone: such heads are skipped, counted,
printed, and their number must stay small."""

import pytest
import torch

from flexprefill import FlexPrefillConfig
from flexprefill import reference as R
from flexprefill.search import torch_search as TS
from flexprefill_tools.synthetic import structured_qkv

_NEAR_TAU = 1e-6
_skipped = {"heads": 0, "compared": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_skipped():
    yield
    print(f"\ntorch_search: {_skipped['compared']} heads compared, {_skipped['heads']} skipped (JS within "
          f"{_NEAR_TAU} of tau)")
    assert _skipped["heads"] <= max(2, _skipped["compared"] // 200)


def _qkv(kind, B, N, Hq, Hkv, D, seed, n_k=None):
    n_k = n_k or N
    if kind == "structured":
        q, k, _ = structured_qkv(B, n_k, Hq, Hkv, D, dtype=torch.float32, seed=seed)
        return q[:, n_k - N:].contiguous(), k
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, Hq, D, generator=g), torch.randn(B, n_k, Hkv, D, generator=g)


def _compare(want, got, tau):
    torch.testing.assert_close(got.js_distance, want.js_distance, atol=1e-6, rtol=0, equal_nan=True)
    B, Hq = want.counts.shape[:2]
    skipped = 0
    for b in range(B):
        for h in range(Hq):
            if abs(want.js_distance[b, h].item() - tau) <= _NEAR_TAU:
                skipped += 1
                continue
            assert bool(got.query_aware[b, h]) == bool(want.query_aware[b, h]), (b, h)
            assert torch.equal(got.counts[b, h], want.counts[b, h]), (b, h)
            assert torch.equal(got.indices[b, h], want.indices[b, h]), (b, h)
    _skipped["heads"] += skipped
    _skipped["compared"] += B * Hq
    return skipped


CASES = [
    # N, Hq, Hkv, bs, gamma, tau, min_budget, max_budget
    (63, 4, 4, 32, 0.9, 0.1, 32, None),
    (63, 6, 2, 32, 1.0, 0.0, 32, None),
    (1000, 6, 2, 64, 0.9, 0.1, 128, None),
    (1000, 8, 1, 32, 0.95, 0.3, 64, 256),
    (1000, 4, 4, 64, 1.0, 0.5, 64, 320),
    (1000, 6, 3, 128, 0.5, 0.0, 0, None),
    (4097, 6, 2, 64, 0.9, 0.1, 256, 1024),
    (4097, 4, 1, 128, 0.99, 1.0, 1024, None),
]


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("N,Hq,Hkv,bs,gamma,tau,min_b,max_b", CASES)
def test_matches_oracle(kind, N, Hq, Hkv, bs, gamma, tau, min_b, max_b):
    q, k = _qkv(kind, 2 if N < 4000 else 1, N, Hq, Hkv, 64, seed=N + Hq)
    cfg = FlexPrefillConfig(block_size=bs, gamma=gamma, tau=tau, min_budget=min_b, max_budget=max_b, min_seq_len=0)
    want = R.select_blocks(q, k, config=cfg)
    got = TS.select_blocks(q, k, config=cfg)
    assert got.indices.shape == want.indices.shape and got.counts.dtype == want.counts.dtype
    _compare(want, got, tau)


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("n_q,n_k", [(1, 700), (100, 700), (256, 1000), (700, 700)])
def test_chunk_over_cached_prefix(kind, n_q, n_k):
    q, k = _qkv(kind, 1, n_q, 6, 2, 64, seed=n_q + n_k, n_k=n_k)
    cfg = FlexPrefillConfig(block_size=64, gamma=0.9, tau=0.2, min_budget=128, max_budget=512, min_seq_len=0)
    _compare(R.select_blocks(q, k, config=cfg), TS.select_blocks(q, k, config=cfg), cfg.tau)


def test_varlen_matches_oracle():
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k = [300, 1, 513, 64], [300, 400, 900, 64]
    q = torch.randn(sum(lens_q), 6, 64, generator=g)
    k = torch.randn(sum(lens_k), 2, 64, generator=g)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    cfg = FlexPrefillConfig(block_size=64, tau=0.2, min_budget=128, max_budget=448, min_seq_len=0)
    args = (q, k, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k))
    want = R.select_blocks_varlen(*args, config=cfg, dense_below=128)
    got = TS.select_blocks_varlen(*args, config=cfg, dense_below=128)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)
    assert torch.equal(got.query_aware, want.query_aware)
    torch.testing.assert_close(got.js_distance, want.js_distance, atol=1e-6, rtol=0, equal_nan=True)


def test_public_torch_backend_uses_it():
    import flexprefill as fp

    q, k = _qkv("structured", 1, 600, 4, 2, 64, seed=1)
    cfg = FlexPrefillConfig(block_size=64, min_seq_len=0, backend="torch")
    got = fp.select_blocks(q, k, config=cfg)
    want = R.select_blocks(q, k, config=cfg)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)


def test_head_chunks_change_nothing(monkeypatch):
    """The representative scores computed a few heads at a time give the same table."""
    q, k = _qkv("structured", 2, 1000, 6, 2, 64, seed=4)
    cfg = FlexPrefillConfig(block_size=64, tau=0.2, min_budget=128, min_seq_len=0)
    want = R.select_blocks(q, k, config=cfg)
    monkeypatch.setattr(TS, "_SCORE_BYTES", 1)
    _compare(want, TS.select_blocks(q, k, config=cfg), cfg.tau)
