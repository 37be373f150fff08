"""The pattern search on the device: against the oracle, and the invariants users rely on."""

import math

import pytest
import torch

import flexprefill as fp
from flexprefill import reference as R
from flexprefill.search import representative_block_scores, select_blocks_fast
from flexprefill_tools.synthetic import structured_qkv


def _inputs(B, N, Hq, Hkv, D, seed, structured):
    if structured:
        q, k, _ = structured_qkv(B, N, Hq, Hkv, D, seed=seed, dtype=torch.float32)
        return q, k
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, Hq, D, generator=g), torch.randn(B, N, Hkv, D, generator=g)


CASES = [
    pytest.param(1, 1000, 4, 2, 64, 64, id="N1000-H4/2-D64-bs64"),
    pytest.param(2, 300, 4, 1, 64, 32, id="B2-N300-H4/1-D64-bs32"),
    pytest.param(1, 63, 2, 2, 64, 128, id="N63-H2/2-D64-bs128"),
    pytest.param(1, 1100, 4, 4, 128, 128, id="N1100-H4/4-D128-bs128"),
    pytest.param(1, 700, 4, 2, 80, 32, id="N700-H4/2-D80-bs32"),
    pytest.param(1, 520, 2, 1, 256, 64, id="N520-H2/1-D256-bs64"),
]


@pytest.mark.parametrize("B,N,Hq,Hkv,D,bs", CASES)
def test_representative_scores_match_reference(B, N, Hq, Hkv, D, bs):
    q, k = _inputs(B, N, Hq, Hkv, D, seed=N, structured=False)
    scale = D**-0.5
    v1, s1 = representative_block_scores(q, k, block_size=bs, scale=scale)
    v0, s0 = R.representative_block_scores(q, k, block_size=bs, scale=scale)
    torch.testing.assert_close(v1, v0, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(s1, s0, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(v1.sum(-1), torch.ones(B, Hq), atol=1e-5, rtol=0)
    torch.testing.assert_close(s1.sum(-1), torch.ones(B, Hq), atol=1e-5, rtol=0)


@pytest.mark.parametrize("B,N,Hq,Hkv,D,bs", CASES)
def test_representative_scores_from_block_stats(B, N, Hq, Hkv, D, bs, monkeypatch):
    """rep_block_stats=True (one pass over the keys storing each block's row max and
    sum, the masses from them): the two-pass result within fp32 rounding, and the oracle's."""
    q, k = _inputs(B, N, Hq, Hkv, D, seed=N + 1, structured=True)
    scale = D**-0.5
    fp.set_options(rep_block_stats=False)
    v0, s0 = representative_block_scores(q, k, block_size=bs, scale=scale)
    fp.set_options(rep_block_stats=True)
    v1, s1 = representative_block_scores(q, k, block_size=bs, scale=scale)
    torch.testing.assert_close(v1, v0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s1, s0, atol=1e-6, rtol=1e-5)
    vr, sr = R.representative_block_scores(q, k, block_size=bs, scale=scale)
    torch.testing.assert_close(v1, vr, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(s1, sr, atol=2e-6, rtol=1e-4)


def test_block_stats_default_follows_heads_times_blocks(monkeypatch):
    """Unset: one pass with block statistics while heads x key blocks <= 2^14 (measured faster
    up to 9216, slower at 32768); '0' and '1' force it off and on."""
    from flexprefill.search.scores import _block_stats_enabled

    fp.set_options(rep_block_stats=None)
    assert _block_stats_enabled(32, 256) and _block_stats_enabled(9, 1024) and _block_stats_enabled(4, 4096)
    assert not _block_stats_enabled(32, 1024) and not _block_stats_enabled(64, 512)
    fp.set_options(rep_block_stats=False)
    assert not _block_stats_enabled(1, 1)
    fp.set_options(rep_block_stats=True)
    assert _block_stats_enabled(32, 1024)


def test_representative_scores_fp16():
    q, k = _inputs(1, 777, 2, 1, 64, seed=3, structured=True)
    v0, s0 = R.representative_block_scores(q.half(), k.half(), block_size=64, scale=0.125)
    v1, s1 = representative_block_scores(q.half(), k.half(), block_size=64, scale=0.125)
    torch.testing.assert_close(v1, v0, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(s1, s0, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("N,bs", [(1000, 64), (256, 64), (63, 128), (700, 32)])
@pytest.mark.parametrize("blocks", [True, False])
def test_block_means_kernel(N, bs, blocks):
    """One Triton pass: the block means (partial last block over its real rows) and, after
    them, the mean of the last min(bs, N) rows; for a [B, H, N, D] tensor seen as [B, N, H, D]."""
    from flexprefill.search import block_means

    x = torch.randn(2, 3, N, 80, dtype=torch.float16).transpose(1, 2)  # strides of transformers' q
    rep = min(bs, N)
    got = block_means(x, bs, rep=rep, blocks=blocks)
    last = x[:, N - rep :].float().mean(1)
    if blocks:
        nb = math.ceil(N / bs)
        assert got.shape == (2, nb + 1, 3, 80)
        torch.testing.assert_close(got[:, :nb], R.block_means(x, bs), atol=1e-5, rtol=1e-5)
    else:
        assert got.shape == (2, 1, 3, 80)
    torch.testing.assert_close(got[:, -1], last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block_means(x, bs), R.block_means(x, bs), atol=1e-5, rtol=1e-5)


def test_indirect_inputs_read_the_addressed_tensors():
    """The whole-search graph's kernels read q and k at the addresses two device words hold
    (INDIRECT): given other tensors of the same layout, they compute on the addressed ones."""
    from flexprefill import search as S

    cfg = fp.FlexPrefillConfig(block_size=64, tau=0.2, gamma=0.9)
    q, k, _ = structured_qkv(1, 700, 4, 2, 64, seed=5, dtype=torch.float16)
    q2, k2, _ = structured_qkv(1, 700, 4, 2, 64, seed=6, dtype=torch.float16)
    src = (torch.tensor([q2.data_ptr()]), torch.tensor([k2.data_ptr()]))
    v0, s0 = representative_block_scores(q2, k2, block_size=64, scale=0.125)
    v1, s1 = representative_block_scores(q, k, block_size=64, scale=0.125, src=src)
    assert torch.equal(v0, v1) and torch.equal(s0, s1)
    assert torch.equal(S.block_means(k2, 64), S.block_means(k, 64, src=src[1]))
    kw = dict(cfg=cfg, scale=0.125, chunk_elems=1 << 22, index_dtype=torch.int16)
    want = S.dense_search(q2, k2, **kw)
    got = S.dense_search(q, k, **kw, src=src)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert not torch.equal(want[2], S.dense_search(q, k, **kw)[2])  # the inputs do differ (js distance)


CONFIGS = [
    pytest.param(dict(), id="default"),
    pytest.param(dict(tau=1.0), id="all-query-aware"),
    pytest.param(dict(tau=0.0, gamma=0.5), id="vertical-slash-g0.5"),
    pytest.param(dict(tau=1.0, min_budget=0, max_budget=192), id="qa-max192"),
    pytest.param(dict(tau=0.0, max_budget=128), id="vs-max128"),
    pytest.param(dict(gamma=1.0, tau=0.3), id="gamma1"),
]


@pytest.mark.parametrize("structured", [False, True], ids=["random", "structured"])
@pytest.mark.parametrize("cfg_kw", CONFIGS)
@pytest.mark.parametrize("B,N,Hq,Hkv,D,bs", CASES[:4])
def test_fast_selection_equals_reference(B, N, Hq, Hkv, D, bs, cfg_kw, structured):
    q, k = _inputs(B, N, Hq, Hkv, D, seed=7 + N, structured=structured)
    cfg = fp.FlexPrefillConfig(block_size=bs, min_budget=2 * bs, **cfg_kw) if "min_budget" not in cfg_kw else fp.FlexPrefillConfig(block_size=bs, **cfg_kw)
    scale = D**-0.5
    fast = select_blocks_fast(q, k, config=cfg, softmax_scale=scale)
    ref = R.select_blocks(q, k, config=cfg, softmax_scale=scale)
    torch.testing.assert_close(fast.js_distance, ref.js_distance, atol=1e-4, rtol=1e-3)
    # the decision may only differ where the distance sits on the threshold
    near = (ref.js_distance - cfg.tau).abs() < 1e-4
    assert torch.equal(fast.query_aware | near, ref.query_aware | near)
    if not near.any():
        if not (torch.equal(fast.counts, ref.counts) and torch.equal(fast.indices, ref.indices)):
            # the radix threshold sums in another order than the sorted cumsum: where a running
            # sum sits on the goal within fp32 rounding it may take one ranked entry more or
            # less; the sort path must then give the reference exactly
            with fp.use_options(radix_select=False):
                by_sort = select_blocks_fast(q, k, config=cfg, softmax_scale=scale)
            assert torch.equal(by_sort.counts, ref.counts) and torch.equal(by_sort.indices, ref.indices)
            per_head = (fast.counts.sum(-1) - ref.counts.sum(-1)).abs()
            assert int(per_head.max()) <= 1, per_head


def _full_columns_and_offsets(mask):
    """Columns (offsets) selected in every row that can see them."""
    nb = mask.shape[-1]
    r = torch.arange(nb)[:, None]
    c = torch.arange(nb)[None, :]
    causal = c <= r
    col_full = (mask | ~causal).all(0)
    off_full = torch.tensor([bool(torch.diagonal(mask, -d).all()) for d in range(nb)])
    return col_full, off_full


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_invariants(backend):
    q, k = _inputs(1, 1500, 4, 2, 64, seed=11, structured=True)
    bs = 64
    cfg = fp.FlexPrefillConfig(block_size=bs, min_budget=3 * bs, tau=0.0, gamma=0.8, backend=backend)
    sel = fp.select_blocks(q, k, config=cfg)
    mask = sel.to_mask()
    nb = math.ceil(1500 / bs)
    vert, slash = R.representative_block_scores(q, k, block_size=bs, scale=64**-0.5)
    assert mask[..., 0].all(), "every row keeps the sink block"
    assert torch.diagonal(mask, dim1=-2, dim2=-1).all(), "every row keeps its diagonal block"
    assert not mask.triu(1).any(), "nothing above the diagonal"
    for h in range(4):
        col_full, off_full = _full_columns_and_offsets(mask[0, h])
        # vertical-slash heads keep at least gamma of the estimated mass in both directions
        assert vert[0, h][col_full].sum() >= cfg.gamma - 1e-5
        assert slash[0, h][off_full].sum() >= cfg.gamma - 1e-5
        # and at least the minimum budget of columns and offsets
        assert int(col_full.sum()) >= min(cfg.min_budget_blocks, nb)
        assert int(off_full.sum()) >= min(cfg.min_budget_blocks, nb)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_max_budget_caps_rows(backend, tau):
    q, k = _inputs(1, 1200, 2, 1, 64, seed=5, structured=True)
    cfg = fp.FlexPrefillConfig(block_size=32, max_budget=100, tau=tau, backend=backend)
    sel = fp.select_blocks(q, k, config=cfg)
    cap = max(cfg.max_budget_blocks, 2)
    assert int(sel.counts.max()) <= cap
    mask = sel.to_mask()
    assert mask[..., 0].all() and torch.diagonal(mask, dim1=-2, dim2=-1).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gamma_one_selects_every_causal_block(backend):
    q, k = _inputs(2, 333, 4, 2, 64, seed=2, structured=False)
    sel = fp.select_blocks(q, k, config=fp.FlexPrefillConfig(block_size=32, gamma=1.0, backend=backend))
    nb = math.ceil(333 / 32)
    assert torch.equal(sel.counts, torch.arange(1, nb + 1, dtype=torch.int32).expand(2, 4, nb))
    assert torch.allclose(sel.stats().density, torch.ones(2, 4))


def test_tau_zero_disables_query_aware():
    q, k = _inputs(1, 640, 4, 2, 64, seed=9, structured=True)
    sel = fp.select_blocks(q, k, config=fp.FlexPrefillConfig(block_size=64, tau=0.0))
    assert not sel.query_aware.any()
    sel = fp.select_blocks(q, k, config=fp.FlexPrefillConfig(block_size=64, tau=10.0))
    assert sel.query_aware.all()


def test_custom_scale_changes_the_estimate():
    q, k = _inputs(1, 512, 2, 1, 64, seed=4, structured=True)
    cfg = fp.FlexPrefillConfig(block_size=64, tau=0.0, gamma=0.7, min_budget=0)
    a = fp.select_blocks(q, k, config=cfg, softmax_scale=0.125)
    b = fp.select_blocks(q, k, config=cfg, softmax_scale=0.02)
    assert not torch.equal(a.counts, b.counts)


def test_compact_block_mask_round_trip():
    g = torch.Generator().manual_seed(0)
    nb = 17
    mask = (torch.rand(3, 2, nb, nb, generator=g) < 0.4) & torch.ones(nb, nb, dtype=torch.bool).tril()
    sel = fp.block_table.mask_to_selection(
        mask, block_size=32, seq_len=nb * 32 - 5, query_aware=torch.zeros(3, 2, dtype=torch.bool), js_distance=torch.zeros(3, 2)
    )
    assert torch.equal(sel.to_mask(), mask)
    assert torch.equal(sel.counts, mask.sum(-1).int())
    valid = torch.arange(nb) < sel.counts[..., None]
    assert (sel.indices[~valid] == -1).all()
    inc = sel.indices[..., 1:] > sel.indices[..., :-1]
    assert (inc | ~valid[..., 1:]).all(), "indices ascend"


def test_qa_scores_keep_at_most_two_full_buffers():
    """The query-aware scores of a head chunk hold at most two [heads, nb, nb] buffers at once
    (the logits and their softmax; the rest in place), with the out-of-place forms' values."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from flexprefill.search import block_sets as BS

    c, nb, D = 3, 40, 16
    g = torch.Generator().manual_seed(0)
    q_bar, k_bar = torch.randn(c, nb, D, generator=g), torch.randn(c, nb, D, generator=g)
    ar = torch.arange(nb)
    not_causal = ar[None, :] > ar[:, None]
    tri_flat = BS._tri_flat(nb, "cpu", torch.int32)
    live = torch.rand(c, nb, 1, generator=g) > 0.3
    rows = live.sum((1, 2)).float()
    full = c * nb * nb * 4

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs, self.peak = {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= full:
                    self.refs[t.untyped_storage().data_ptr()] = weakref.ref(t)
            alive = [r for r in self.refs.values() if r() is not None]
            self.peak = max(self.peak, len(alive))
            return out

    for live_c, rows_c in ((None, None), (live, rows)):
        mode = Live()
        with mode:
            _, flat = BS._qa_scores(q_bar, k_bar, scale=0.3, nb=nb, live_c=live_c, rows_c=rows_c,
                                   not_causal=not_causal, tri_flat=tri_flat, keep_s=False)
        assert mode.peak <= 2, mode.peak
        want = torch.softmax((0.3 * q_bar @ k_bar.transpose(1, 2)).masked_fill(not_causal, float("-inf")), -1)
        if live_c is not None:
            want = torch.where(live_c, want, 0.0)
        want = want.flatten(1)[:, tri_flat] / (rows_c[:, None] if rows_c is not None else nb)
        torch.testing.assert_close(flat, want, rtol=1e-6, atol=1e-7)
        s, flat2 = BS._qa_scores(q_bar, k_bar, scale=0.3, nb=nb, live_c=live_c, rows_c=rows_c,
                                not_causal=not_causal, tri_flat=tri_flat)
        assert s.shape == (c, nb, nb) and torch.equal(flat, flat2)


def test_head_chunking_does_not_change_the_selection(monkeypatch):
    """The assembly processes heads a chunk at a time (smaller chunks inside a CUDA graph): same result."""

    from flexprefill import search as S
    from flexprefill.search import block_sets as BS

    q, k, _ = structured_qkv(2, 700, 6, 2, 64, seed=4, dtype=torch.float16)
    cfg = fp.FlexPrefillConfig(block_size=32, min_budget=64, gamma=0.9, tau=0.2)
    whole = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    nb = whole.counts.shape[-1]
    monkeypatch.setattr(BS, "chunk_elems_for", lambda q, k: nb * nb * 5)
    chunked = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    assert torch.equal(whole.counts, chunked.counts) and torch.equal(whole.indices, chunked.indices)


def test_chunk_size_follows_the_qkv_bytes():
    """Eager head chunks: 15% of the q+k+v bytes at ~27 B per element, within [2^22, 2^23]."""
    from flexprefill.search.block_sets import chunk_elems_for as _chunk_elems_for

    meta = lambda n, h: torch.empty(1, n, h, 128, dtype=torch.bfloat16, device="meta")  # noqa: E731
    assert _chunk_elems_for(meta(1024, 32), meta(1024, 8)) == 1 << 22
    assert _chunk_elems_for(meta(1 << 17, 32), meta(1 << 17, 8)) == 1 << 23
    mid = _chunk_elems_for(meta(3 << 15, 32), meta(3 << 15, 8))  # 1152 MiB of q+k+v
    assert mid == int(0.15 * 1152 * 2**20 / 27)


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("varlen", [False, True])
def test_fused_assembly_equals_torch_assembly(tau, varlen, monkeypatch):
    """The one-pass Triton assembly of the block sets picks exactly what the PyTorch ops pick
    (vertical-slash and query-aware heads, ties in the ranking, packed rows, short sequences)."""
    from flexprefill import search as S
    from flexprefill.search import block_sets as BS

    cfg = fp.FlexPrefillConfig(block_size=32, min_budget=64, gamma=0.9, tau=tau)
    if varlen:
        lens = [900, 200, 1300]
        cu = torch.tensor([0, 900, 1100, 2400], dtype=torch.int32)
        q, k, _ = (t[0] for t in structured_qkv(1, sum(lens), 4, 2, 64, seed=11, dtype=torch.float16))
        run = lambda: S.select_blocks_varlen_fast(q, k, cu[:-1], cu[1:], cu[:-1], cu[1:], max(lens), config=cfg,  # noqa: E731
                                                  softmax_scale=0.125, dense_below=300)[:2]
    else:
        q, k, _ = structured_qkv(2, 1500, 4, 2, 64, seed=9, dtype=torch.float16)
        run = lambda: (lambda s: (s.counts, s.indices))(S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125))  # noqa: E731
    fused = run()
    monkeypatch.setattr(BS, "_FUSED_ASSEMBLY", False)
    torch_ops = run()
    assert torch.equal(fused[0], torch_ops[0]) and torch.equal(fused[1], torch_ops[1])


@pytest.mark.parametrize("N", [20, 33, 64, 65])
def test_fused_assembly_on_one_and_two_blocks(N, monkeypatch):
    """Tiny inputs (one or two blocks, a partial last block): the fused pass equals the PyTorch one."""
    from flexprefill import search as S
    from flexprefill.search import block_sets as BS

    cfg = fp.FlexPrefillConfig(block_size=32, min_budget=0, gamma=0.9, tau=1.0)
    q, k, _ = structured_qkv(1, N, 2, 1, 64, seed=N, dtype=torch.float16)
    fused = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    monkeypatch.setattr(BS, "_FUSED_ASSEMBLY", False)
    ref = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    assert torch.equal(fused.counts, ref.counts) and torch.equal(fused.indices, ref.indices)
    assert int(fused.counts[0, 0, -1]) >= 1  # the diagonal block at least


def test_fused_assembly_breaks_ranking_ties_like_a_stable_sort():
    """Equal query-aware scores: the entries at lower flat positions are kept first."""
    from flexprefill.search import block_sets as BS

    nb, D = 12, 16
    cfg = fp.FlexPrefillConfig(block_size=32, min_budget=32, gamma=0.5, tau=10.0)
    # identical block means: every row's softmax is uniform, so most scores tie
    q_bar = torch.ones(3, nb, D)
    k_bar = torch.ones(3, nb, D)
    vert = torch.rand(3, nb, generator=torch.Generator().manual_seed(0))
    slash = torch.rand(3, nb, generator=torch.Generator().manual_seed(1))
    qa = torch.tensor([True, True, False])
    got = BS.assemble(vert, slash, qa, q_bar, k_bar, cfg=cfg, scale=0.25)
    want = BS.assemble_torch(vert, slash, qa, q_bar, k_bar, cfg=cfg, scale=0.25)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("fused", [True, False])
def test_assembly_writes_given_outputs(fused, monkeypatch):
    """``out=(counts, indices)`` (a graph's outputs, made outside its pool): the search's
    tail writes those very tensors, with what it returns without them; tensors of another
    shape or dtype are refused."""
    from flexprefill import search as S
    from flexprefill.search import block_sets as BS

    monkeypatch.setattr(BS, "_FUSED_ASSEMBLY", fused)
    B, nb, Hq, Hkv, D = 1, 10, 4, 2, 16
    cfg = fp.FlexPrefillConfig(block_size=32, min_budget=32, gamma=0.8, tau=0.3)
    g = torch.Generator().manual_seed(5)
    vert = torch.rand(B, Hq, nb, generator=g)
    slash = torch.rand(B, Hq, nb, generator=g)
    q_hat = torch.randn(B, Hq, D, generator=g)
    k_bar = torch.randn(B, nb, Hkv, D, generator=g)
    q_bar = torch.randn(B, nb, Hq, D, generator=g)
    args = dict(vert=vert, slash=slash, q_hat=q_hat, k_bar=k_bar, q_bar=q_bar, cfg=cfg, scale=0.25,
                index_dtype=torch.int16)
    want = S.dense_tail(**args)
    counts = torch.full((B * Hq, nb), -7, dtype=torch.int32)
    indices = torch.full((B * Hq, nb, nb), -7, dtype=torch.int16)
    got = S.dense_tail(**args, out=(counts, indices))
    assert got[0] is counts and got[1] is indices
    assert torch.equal(counts, want[0]) and torch.equal(indices, want[1])
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    with pytest.raises(AssertionError, match="do not fit 4 heads of 10 blocks"):
        S.dense_tail(**args, out=(counts, indices.int()))
    with pytest.raises(AssertionError, match="do not fit"):
        S.dense_tail(**args, out=(counts[:2], indices))


@pytest.mark.parametrize("br", [32, 128])
def test_combine_kernel_matches_torch(br):
    """The one-launch log2-sum-exp over key splits equals the PyTorch version, rows that saw no key included."""
    from flexprefill.search.scores import _combine, _combine_splits

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(br)
    m = (torch.randn(6, 5, br, generator=g) * 4).to(dev)
    l = (torch.rand(6, 5, br, generator=g) * 10 + 0.1).to(dev)
    m[0, 2:] = float("-inf")  # splits past the row's keys
    l[0, 2:] = 0.0
    m[1] = float("-inf")  # a row with no key at all
    l[1] = 0.0
    got, want = _combine(m, l), _combine_splits(m, l)
    assert torch.isneginf(got[1]).all() and torch.isneginf(want[1]).all()
    assert torch.allclose(got[2:], want[2:], rtol=1e-5, atol=1e-5) and torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_int16_block_ids_equal_int32(fused, monkeypatch):
    """The operator's int16 selections hold the same block ids as the public int32 ones."""
    from flexprefill import search as S
    from flexprefill.search import block_sets as BS

    monkeypatch.setattr(BS, "_FUSED_ASSEMBLY", fused)
    cfg = fp.FlexPrefillConfig(block_size=32, min_budget=64, gamma=0.9, tau=0.3)
    q, k, _ = structured_qkv(1, 900, 4, 2, 64, seed=5, dtype=torch.float16)
    wide = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    narrow = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125, index_dtype=torch.int16)
    assert narrow.indices.dtype == torch.int16 and wide.indices.dtype == torch.int32
    assert torch.equal(narrow.counts, wide.counts) and torch.equal(narrow.indices.int(), wide.indices)
    cu = torch.tensor([0, 500, 900], dtype=torch.int32)
    args = (q[0], k[0], cu[:-1], cu[1:], cu[:-1], cu[1:], 500)
    w = S.select_blocks_varlen_fast(*args, config=cfg, softmax_scale=0.125)
    n = S.select_blocks_varlen_fast(*args, config=cfg, softmax_scale=0.125, index_dtype=torch.int16)
    assert n[1].dtype == torch.int16 and torch.equal(n[0], w[0]) and torch.equal(n[1].int(), w[1])


def test_compact_index_dtype(monkeypatch):
    from flexprefill.search import compact_index_dtype

    assert compact_index_dtype(2048) == torch.int16 and compact_index_dtype(32767) == torch.int16
    assert compact_index_dtype(32768) == torch.int32
    fp.set_options(int16_block_ids=False)
    assert compact_index_dtype(2048) == torch.int32
