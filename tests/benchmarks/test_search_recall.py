"""benchmarks/search_recall.py: the exact block mass, the recall score and the variant search."""

import torch

import search_recall as SR
from flexprefill import FlexPrefillConfig, select_blocks
from flexprefill_tools.synthetic import structured_qkv


def _qkv(N=1000, Hq=6, Hkv=2, D=64, seed=0):
    q, k, v = structured_qkv(1, N, Hq, Hkv, D, dtype=torch.float32, seed=seed)
    return q, k


def test_block_mass_is_the_pooled_softmax():
    q, k = _qkv(N=300, Hq=2, Hkv=1)
    bs, scale = 64, 0.2
    mass = SR.block_mass(q, k, scale, bs, q_chunk=128)
    # rows sum to 1 and nothing lands above the diagonal
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass.sum(-1)))
    nb = mass.shape[-1]
    assert float(mass.triu(1).abs().max()) == 0.0
    # one block pair checked by hand: query block 2, key block 1, head 1
    s = (q[0, 128:192, 1] @ k[0, :, 0].T) * scale
    s = s.masked_fill(torch.arange(300)[None, :] > torch.arange(128, 192)[:, None], float("-inf"))
    want = torch.softmax(s, -1)[:, 64:128].sum(-1).mean()
    torch.testing.assert_close(mass[1, 2, 1], want)
    assert nb == 5


def test_score_of_full_and_diagonal_masks():
    q, k = _qkv(N=512, Hq=2, Hkv=1)
    mass = SR.block_mass(q, k, 0.2, 64)
    nb = mass.shape[-1]
    full = torch.ones(2, nb, nb, dtype=torch.bool)
    s = SR.score(mass, full)
    assert abs(s["density"] - 1.0) < 1e-9 and abs(s["recall"] - 1.0) < 1e-5 and s["rows_below_0_9"] == 0.0
    diag = torch.eye(nb, dtype=torch.bool).expand(2, nb, nb)
    d = SR.score(mass, diag)
    assert abs(d["density"] - nb / (nb * (nb + 1) / 2)) < 1e-9
    assert d["recall"] < 1.0 and d["worst_head_recall"] <= d["recall"]


def test_search_with_all_representatives_is_the_library_search():
    q, k = _qkv()
    cfg = FlexPrefillConfig(gamma=0.9, tau=0.3, min_budget=128, block_size=64, min_seq_len=0, backend="torch")
    masks, qa = SR.search_masks(q, k, cfg, 0.2, 64)
    ref = select_blocks(q, k, config=cfg, softmax_scale=0.2)
    nb = masks.shape[-1]
    assert torch.equal(masks & torch.ones(nb, nb, dtype=torch.bool).tril(), ref.to_mask())
    assert torch.equal(qa, ref.query_aware)
    # fewer representatives: still a causal selection with the sink and the diagonal
    few, _ = SR.search_masks(q, k, cfg, 0.2, 16)
    assert bool(few[..., 0].all()) and bool(torch.diagonal(few, dim1=-2, dim2=-1).all())
