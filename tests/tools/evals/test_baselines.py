import math

import pytest
import torch

from flexprefill import FlexPrefillConfig
from flexprefill_tools.evals.baselines import StreamingSelector, VerticalSlashFixedSelector
from flexprefill_tools.synthetic import structured_qkv


def _check_valid(sel, B, Hq, N, bs):
    nb = math.ceil(N / bs)
    assert sel.counts.shape == (B, Hq, nb) and sel.counts.dtype == torch.int32
    assert sel.indices.shape == (B, Hq, nb, nb) and sel.indices.dtype == torch.int32
    assert sel.seq_len == N and sel.block_size == bs
    assert sel.query_aware.shape == (B, Hq) and not sel.query_aware.any()
    mask = sel.to_mask()
    ar = torch.arange(nb)
    assert not (mask & (ar[None, :] > ar[:, None])).any(), "selection is not causal"
    assert mask[..., ar, ar].all(), "diagonal missing"
    assert mask[..., :, 0].all(), "sink block missing"
    # indices ascending, -1 past the count, consistent with the counts
    valid = torch.arange(nb) < sel.counts[..., None]
    assert ((sel.indices >= 0) == valid).all()
    idx = torch.where(valid, sel.indices, nb + torch.arange(nb))
    assert (idx[..., 1:] > idx[..., :-1]).all()
    assert (mask.sum(-1) == sel.counts).all()
    return mask


@pytest.mark.parametrize("N,bs,window,sink", [(1000, 64, 256, 64), (4097, 128, 1024, 128), (63, 32, 32, 32), (777, 64, 100, 200)])
def test_streaming_valid_and_exact_budget(N, bs, window, sink):
    q, k, _ = structured_qkv(2, N, 4, 2, 64, seed=0, dtype=torch.float32)
    sel = StreamingSelector(window=window, sink=sink)(q, k, config=FlexPrefillConfig(block_size=bs), softmax_scale=None)
    mask = _check_valid(sel, 2, 4, N, bs)
    nb = math.ceil(N / bs)
    wb, sb = math.ceil(window / bs), math.ceil(sink / bs)
    for r in range(nb):
        expect = set(range(min(sb, r + 1))) | set(range(max(0, r - wb + 1), r + 1))
        assert set(torch.nonzero(mask[0, 0, r]).flatten().tolist()) == expect
    assert (sel.counts <= wb + sb).all()


@pytest.mark.parametrize(
    "N,Hq,Hkv,bs,vertical,slash",
    [(1000, 4, 2, 64, 100, 200), (2048, 4, 1, 128, 300, 300), (500, 2, 2, 32, 5, 3), (130, 4, 4, 64, 1024, 2048)],
)
def test_vertical_slash_fixed_valid_and_budget(N, Hq, Hkv, bs, vertical, slash):
    q, k, _ = structured_qkv(2, N, Hq, Hkv, 64, seed=1, dtype=torch.float32)
    selector = VerticalSlashFixedSelector(vertical=vertical, slash=slash, last_q=64)
    sel = selector(q, k, config=FlexPrefillConfig(block_size=bs), softmax_scale=0.1)
    mask = _check_valid(sel, 2, Hq, N, bs)
    nb = math.ceil(N / bs)
    # budgets are block budgets: sink + ceil(vertical/bs) column blocks + diagonal + ceil(slash/bs) offsets
    assert (sel.counts <= 2 + math.ceil(vertical / bs) + math.ceil(slash / bs)).all()
    vert, slash_s = selector.scores(q, k, softmax_scale=0.1)
    assert torch.allclose(vert.sum(-1), torch.full_like(vert.sum(-1), min(64, N)), atol=1e-3)
    assert torch.allclose(slash_s.sum(-1), vert.sum(-1), atol=1e-3)
    v_blk, s_blk = selector.block_scores(q, k, block_size=bs, softmax_scale=0.1)
    assert torch.allclose(v_blk.sum(-1), vert.sum(-1), atol=1e-3)
    # each token offset counts in its floor and its ceil block offset (the ceil only when it is < nb)
    o = torch.arange(N)
    weight = 1.0 + ((o + bs - 1) // bs < nb).float()
    assert torch.allclose(s_blk.sum(-1), (slash_s * weight).sum(-1), atol=1e-3)
    # the heaviest column block and block offset are kept in every row they reach
    top_c, top_d = v_blk.argmax(-1), s_blk.argmax(-1)
    for b in range(2):
        for h in range(Hq):
            c, d = int(top_c[b, h]), int(top_d[b, h])
            assert mask[b, h, c:, c].all()
            rows = torch.arange(d, nb)
            assert mask[b, h, rows, rows - d].all()


def test_vertical_slash_fixed_tiny_budget_is_sparse():
    N, bs = 2048, 64
    q, k, _ = structured_qkv(1, N, 2, 1, 64, seed=2, dtype=torch.float32)
    sel = VerticalSlashFixedSelector(vertical=1, slash=1)(q, k, config=FlexPrefillConfig(block_size=bs))
    nb = N // bs
    # sink + one column block + diagonal + one block offset
    assert (sel.counts <= 4).all()
    assert sel.stats().density.max() <= 4 * nb / (nb * (nb + 1) / 2) + 1e-6


def test_vertical_slash_matches_brute_force_scores():
    N = 200
    q, k, _ = structured_qkv(1, N, 2, 1, 64, seed=3, dtype=torch.float32)
    selector = VerticalSlashFixedSelector(last_q=16)
    vert, slash = selector.scores(q, k, softmax_scale=0.125)
    s = 0.125 * q[0, N - 16 :, 0] @ k[0, :, 0].T
    pos = torch.arange(N - 16, N)
    s = s.masked_fill(torch.arange(N)[None, :] > pos[:, None], float("-inf"))
    a = torch.softmax(s, -1)
    assert torch.allclose(vert[0, 0], a.sum(0), atol=1e-5)
    brute = torch.zeros(N)
    for i in range(16):
        for j in range(int(pos[i]) + 1):
            brute[int(pos[i]) - j] += a[i, j]
    assert torch.allclose(slash[0, 0], brute, atol=1e-5)


def test_bad_settings_rejected():
    with pytest.raises(ValueError, match="window"):
        StreamingSelector(window=0)
    with pytest.raises(ValueError, match="vertical"):
        VerticalSlashFixedSelector(vertical=0)
