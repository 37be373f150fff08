"""The pattern search: device path against the oracle, and the invariants users rely on."""

import math

import pytest
import torch

import flexprefill as fp
from flexprefill import reference as R
from flexprefill.ops.selection import representative_block_scores, select_blocks_fast
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
    """FLEXPREFILL_REP_BLOCK_STATS=1 (one pass over the keys storing each block's row max and
    sum, the masses from them): the two-pass result within fp32 rounding, and the oracle's."""
    q, k = _inputs(B, N, Hq, Hkv, D, seed=N + 1, structured=True)
    scale = D**-0.5
    monkeypatch.setenv("FLEXPREFILL_REP_BLOCK_STATS", "0")
    v0, s0 = representative_block_scores(q, k, block_size=bs, scale=scale)
    monkeypatch.setenv("FLEXPREFILL_REP_BLOCK_STATS", "1")
    v1, s1 = representative_block_scores(q, k, block_size=bs, scale=scale)
    torch.testing.assert_close(v1, v0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s1, s0, atol=1e-6, rtol=1e-5)
    vr, sr = R.representative_block_scores(q, k, block_size=bs, scale=scale)
    torch.testing.assert_close(v1, vr, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(s1, sr, atol=2e-6, rtol=1e-4)


def test_block_stats_default_follows_heads_times_blocks(monkeypatch):
    """Unset: one pass with block statistics while heads x key blocks <= 2^14 (measured faster
    up to 9216, slower at 32768); '0' and '1' force it off and on."""
    from flexprefill.ops.selection import _block_stats_enabled

    monkeypatch.delenv("FLEXPREFILL_REP_BLOCK_STATS", raising=False)
    assert _block_stats_enabled(32, 256) and _block_stats_enabled(9, 1024) and _block_stats_enabled(4, 4096)
    assert not _block_stats_enabled(32, 1024) and not _block_stats_enabled(64, 512)
    monkeypatch.setenv("FLEXPREFILL_REP_BLOCK_STATS", "0")
    assert not _block_stats_enabled(1, 1)
    monkeypatch.setenv("FLEXPREFILL_REP_BLOCK_STATS", "1")
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
    from flexprefill.ops.selection import block_means

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
    from flexprefill.ops import selection as S

    cfg = fp.FlexPrefillConfig(block_size=64, tau=0.2, gamma=0.9)
    q, k, _ = structured_qkv(1, 700, 4, 2, 64, seed=5, dtype=torch.float16)
    q2, k2, _ = structured_qkv(1, 700, 4, 2, 64, seed=6, dtype=torch.float16)
    src = (torch.tensor([q2.data_ptr()]), torch.tensor([k2.data_ptr()]))
    v0, s0 = representative_block_scores(q2, k2, block_size=64, scale=0.125)
    v1, s1 = representative_block_scores(q, k, block_size=64, scale=0.125, src=src)
    assert torch.equal(v0, v1) and torch.equal(s0, s1)
    assert torch.equal(S.block_means(k2, 64), S.block_means(k, 64, src=src[1]))
    kw = dict(cfg=cfg, scale=0.125, chunk_elems=1 << 22, index_dtype=torch.int16)
    want = S._search(q2, k2, **kw)
    got = S._search(q, k, **kw, src=src)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert not torch.equal(want[2], S._search(q, k, **kw)[2])  # the inputs do differ (js distance)


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
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("FLEXPREFILL_RADIX_SELECT", "0")
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


@pytest.mark.parametrize("n", [7, 4096, 4097, 5000, 1 << 16, 300_001])
def test_two_level_scan_equals_cumsum(n):
    from flexprefill.ops.selection import _count_to_mass, _cumsum_rows

    g = torch.Generator().manual_seed(n)
    x = torch.rand(3, n, generator=g)
    got = _cumsum_rows(x)
    want = x.double().cumsum(-1)
    assert got.shape == x.shape
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    # the count of entries that reach gamma of the mass: at most one off from float rounding
    srt = torch.sort(x, dim=-1, descending=True).values
    exact = ((srt.double().cumsum(-1) < 0.9 * want[:, -1:]).sum(-1) + 1).clamp_max(n)
    assert (_count_to_mass(x, 0.9) - exact).abs().max() <= 1


@pytest.mark.gpu
def test_graphed_assembly_above_256_blocks_equals_eager(monkeypatch):
    """Past 256 blocks a small ranking (BH * nb^2 <= 2^24) is graphed with larger head chunks: same sets."""
    from flexprefill.ops import selection as S

    assert S._graph_pays(32, 512) and not S._graph_pays(32, 1024) and S._graph_pays(9, 1024)
    monkeypatch.setenv("FLEXPREFILL_SELECTION_GRAPH_MAX_ELEMS", "0")
    assert S._graph_pays(9, 256) and not S._graph_pays(9, 257)
    monkeypatch.delenv("FLEXPREFILL_SELECTION_GRAPH_MAX_ELEMS")
    S.clear_graph_cache()
    cfg = fp.FlexPrefillConfig(tau=0.1, gamma=0.9)
    for seed in (0, 1):
        q, k, _ = structured_qkv(1, 40000, 8, 2, 64, seed=seed, dtype=torch.bfloat16, device="cuda")
        graphed = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
        assert len(S._graphs) == 1
        monkeypatch.setenv("FLEXPREFILL_SELECTION_GRAPHS", "0")
        eager = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
        monkeypatch.delenv("FLEXPREFILL_SELECTION_GRAPHS")
        assert torch.equal(graphed.counts, eager.counts) and torch.equal(graphed.indices, eager.indices)
    S.clear_graph_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("tau", [0.1, 0.0])
def test_graphed_assembly_equals_eager(tau, monkeypatch):
    """The cached CUDA graph of the set assembly gives the eager result, for new inputs too."""
    from flexprefill.ops import selection as S

    S.clear_graph_cache()
    cfg = fp.FlexPrefillConfig(tau=tau, gamma=0.9)
    for seed in (0, 1):  # the second call replays the graph captured by the first
        q, k, _ = structured_qkv(2, 4000, 8, 2, 64, seed=seed, dtype=torch.bfloat16, device="cuda")
        graphed = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
        monkeypatch.setenv("FLEXPREFILL_SELECTION_GRAPHS", "0")
        eager = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
        monkeypatch.delenv("FLEXPREFILL_SELECTION_GRAPHS")
        assert torch.equal(graphed.counts, eager.counts) and torch.equal(graphed.indices, eager.indices)
        # the estimate and the pattern decision are inside the graph too
        assert torch.equal(graphed.query_aware, eager.query_aware) and torch.equal(graphed.js_distance, eager.js_distance)
    assert len(S._graphs) == 1 and not S._ungraphable
    # packed sequences take the same path
    lens = [3000, 700, 4100]
    cu = torch.tensor([0, 3000, 3700, 7800], dtype=torch.int32, device="cuda")
    q, k, _ = (t[0] for t in structured_qkv(1, sum(lens), 8, 2, 64, seed=3, dtype=torch.bfloat16, device="cuda"))
    args = (q, k, cu[:-1], cu[1:], cu[:-1], cu[1:], max(lens))
    graphed = S.select_blocks_varlen_fast(*args, config=cfg, softmax_scale=0.125, dense_below=1000)
    monkeypatch.setenv("FLEXPREFILL_SELECTION_GRAPHS", "0")
    eager = S.select_blocks_varlen_fast(*args, config=cfg, softmax_scale=0.125, dense_below=1000)
    assert torch.equal(graphed[0], eager[0]) and torch.equal(graphed[1], eager[1])
    S.clear_graph_cache()
    assert not S._graphs


@pytest.mark.gpu
def test_whole_search_graph_follows_the_inputs(monkeypatch):
    """The whole-search graph reads q and k wherever they are on each call: new tensors
    (the captured ones freed), transformers' [B, H, N, D] layout, and equal to the eager
    search and to the tail-only graph (FLEXPREFILL_SEARCH_GRAPH=0)."""
    from flexprefill.ops import selection as S

    S.clear_graph_cache()
    cfg = fp.FlexPrefillConfig(tau=0.1, gamma=0.9)
    for layout in ("bnhd", "bhnd"):
        for seed in (0, 1, 2):
            q, k, _ = structured_qkv(1, 5000, 9, 3, 64, seed=seed, dtype=torch.bfloat16, device="cuda")
            if layout == "bhnd":
                q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
            got = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
            monkeypatch.setenv("FLEXPREFILL_SEARCH_GRAPH", "0")
            tail = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
            monkeypatch.setenv("FLEXPREFILL_SELECTION_GRAPHS", "0")
            eager = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
            monkeypatch.delenv("FLEXPREFILL_SELECTION_GRAPHS")
            monkeypatch.delenv("FLEXPREFILL_SEARCH_GRAPH")
            for want in (eager, tail):
                assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)
                assert torch.equal(got.query_aware, want.query_aware) and torch.equal(got.js_distance, want.js_distance)
            del q, k
    # one whole-search graph per layout, one tail graph per layout; nothing refused
    assert sum(key[0] == "search" for key in S._graphs) == 2 and not S._ungraphable
    # a misaligned q (offset by one element) takes the eager passes, still correct
    q, k, _ = structured_qkv(1, 5000, 9, 3, 64, seed=3, dtype=torch.bfloat16, device="cuda")
    qs = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")[1:].view_as(q).copy_(q)
    ks = k
    assert qs.data_ptr() % 16
    got = S.select_blocks_fast(qs, ks, config=cfg, softmax_scale=0.125)
    monkeypatch.setenv("FLEXPREFILL_SELECTION_GRAPHS", "0")
    eager = S.select_blocks_fast(qs, ks, config=cfg, softmax_scale=0.125)
    assert torch.equal(got.counts, eager.counts) and torch.equal(got.indices, eager.indices)
    S.clear_graph_cache()


def _eager_search(monkeypatch, q, k, cfg, index_dtype=torch.int32):
    """The search with CUDA graphs off: what every graph replay must equal."""
    monkeypatch.setenv("FLEXPREFILL_SELECTION_GRAPHS", "0")
    try:
        return select_blocks_fast(q, k, config=cfg, softmax_scale=0.125, index_dtype=index_dtype)
    finally:
        monkeypatch.delenv("FLEXPREFILL_SELECTION_GRAPHS")


def _assert_same_blocks(got, want):
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)


@pytest.mark.gpu
def test_graphs_of_several_shapes_share_one_pool(monkeypatch):
    """Cached graphs of different shapes share one memory pool (each may reuse the others'
    temporaries): replays interleaved across shapes still equal the eager search, and the
    pool keeps less than the private pools of the same graphs."""
    from flexprefill.ops import selection as S

    cfg = fp.FlexPrefillConfig(tau=0.1, gamma=0.9)
    shapes = [(3000, 9, 3, 64), (5000, 9, 3, 64), (4200, 4, 1, 128), (7000, 8, 2, 64)]
    inputs = {s: structured_qkv(1, s[0], *s[1:], seed=s[0], dtype=torch.bfloat16, device="cuda")[:2] for s in shapes}
    want = {s: _eager_search(monkeypatch, q, k, cfg) for s, (q, k) in inputs.items()}
    reserved = {}
    for mode in ("private", "shared"):
        monkeypatch.setenv("FLEXPREFILL_GRAPH_POOL", mode)
        S.clear_graph_cache()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        r0 = torch.cuda.memory_reserved()
        for _ in range(2):  # captured, then replayed in turn: A B C D A B C D
            for s, (q, k) in inputs.items():
                got = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
                _assert_same_blocks(got, want[s])
                assert torch.equal(got.js_distance, want[s].js_distance)
        for s, (q, k) in reversed(list(inputs.items())):  # other order
            _assert_same_blocks(S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125), want[s])
        assert len(S._graphs) == len(shapes) and not S._ungraphable
        del got
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        reserved[mode] = torch.cuda.memory_reserved() - r0
    assert reserved["shared"] < reserved["private"], reserved
    S.clear_graph_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("N", [32768, 131072])
def test_seeded_pool_keeps_less_and_selects_the_same(N, monkeypatch):
    """A seeded shared pool (default) keeps less memory than an unseeded one for a small-head
    32k and 128k search (the capture's 1-10 MB requests carved from one block, not 20 MB segments, and
    the seed held them all, as the trial calls said), and the graphs select exactly what the
    eager search does."""
    import sys
    from pathlib import Path

    # the benchmark harness is not installed: it lives in the repository's benchmarks/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from harness import cached_graph_memory

    from flexprefill.ops import selection as S

    cfg = fp.FlexPrefillConfig(tau=0.1, gamma=0.9)
    q, k, _ = structured_qkv(1, N, 9, 3, 64, seed=3, dtype=torch.bfloat16, device="cuda")
    # the operator's block table (int16; the public int32 one is twice as large: at 128k 36 MB,
    # the caller's output as much as the graph's)
    dt = S.compact_index_dtype(N // cfg.block_size)
    want = _eager_search(monkeypatch, q, k, cfg, dt)
    kept = {}
    for seed in ("0", "1"):
        monkeypatch.setenv("FLEXPREFILL_GRAPH_SEED", seed)
        S.clear_graph_cache()
        S.seed_log.clear()
        # pools of earlier tests' graphs may still be alive: only new ones count
        before = {tuple(seg.get("segment_pool_id", (0, 0))) for seg in torch.cuda.memory_snapshot()}
        for _ in range(2):
            _assert_same_blocks(S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125, index_dtype=dt), want)
        assert S._graphs and not S._ungraphable
        # the seed's trial calls' private pools are gone: the graphs' pool is the only new one
        pools = {tuple(seg.get("segment_pool_id", (0, 0))) for seg in torch.cuda.memory_snapshot()}
        assert pools - before <= {tuple(S._graph_pool(q.device))}, (pools, before)
        kept[seed] = cached_graph_memory()["held_mb"]
    # the trial calls placed the requests as the capture did: it added nothing past the seed
    assert len(S.seed_log) == 1 and S.seed_log[0]["seed"] > 0 and S.seed_log[0]["grown"] == 0, S.seed_log
    assert S.seed_log[0]["trials"][-1] == (S.seed_log[0]["seed"], 0), S.seed_log
    assert kept["1"] < kept["0"], kept
    # the bound on the search's extra memory: a quarter of one layer's q + k + v
    # (H200, the trial seed: 13 of 60 MB at 32k, 56 of 240 MB at 128k)
    qkv_mb = N * (9 + 3 + 3) * 64 * 2 / 2**20
    assert kept["1"] <= 0.25 * qkv_mb, (kept, qkv_mb)


@pytest.mark.gpu
def test_seed_trial_failure_keeps_the_graph(monkeypatch):
    """Where the seed's trial calls fail (a torch without the MemPool API they use), the search
    is still captured, without a seed, with a warning, and selects what the eager one does."""
    from flexprefill.ops import selection as S

    cfg = fp.FlexPrefillConfig(tau=0.1, gamma=0.9)
    q, k, _ = structured_qkv(1, 16384, 9, 3, 64, seed=4, dtype=torch.bfloat16, device="cuda")
    want = _eager_search(monkeypatch, q, k, cfg)

    def broken(*args, **kwargs):
        raise TypeError("use_mem_pool() got an unexpected keyword argument 'device'")

    monkeypatch.setattr(S, "_trial_added", broken)
    S.clear_graph_cache()
    S.seed_log.clear()
    with pytest.warns(RuntimeWarning, match="pool seed could not be sized"):
        got = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    _assert_same_blocks(got, want)
    _assert_same_blocks(S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125), want)
    assert S._graphs and not S._ungraphable and not S.seed_log
    S.clear_graph_cache()


def test_graph_pool_policy(monkeypatch):
    """One pool handle per device, shared by every capture until the cache is cleared;
    FLEXPREFILL_GRAPH_POOL=private gives none (each graph its own pool)."""
    from flexprefill.ops import selection as S

    made = []
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: made.append(len(made)) or (len(made), 0))
    S.clear_graph_cache()
    a, b = S._graph_pool("cuda:0"), S._graph_pool(torch.device("cuda", 0))
    c = S._graph_pool("cuda:1")
    assert a == b and a != c and len(made) == 2
    monkeypatch.setenv("FLEXPREFILL_GRAPH_POOL", "private")
    assert S._graph_pool("cuda:0") is None
    monkeypatch.delenv("FLEXPREFILL_GRAPH_POOL")
    S.clear_graph_cache()  # dropping the graphs drops the pool too
    assert S._graph_pool("cuda:0") != a and len(made) == 3
    S.clear_graph_cache()


def test_pool_seed_size():
    """The pool's large segments on the capture stream (small segments, other pools and other
    streams don't count; wholly free ones listed), and the seed chosen from trial calls: none
    where nothing would be added without it, else the trial that adds least, seed included;
    the trials stop at the first seed that holds everything."""
    from flexprefill.ops import selection as S

    class Stream:
        cuda_stream = 7

    mb = 1 << 20

    def seg(pool, kind, stream, *blocks):
        return {"segment_pool_id": pool, "segment_type": kind, "stream": stream,
                "total_size": sum(n for _, n in blocks), "blocks": [{"state": st, "size": n} for st, n in blocks]}

    segments = [
        seg((3, 0), "large", 7, ("active_allocated", 30 * mb), ("inactive", 6 * mb), ("inactive", 9 * mb)),
        seg((3, 0), "large", 7, ("inactive", 20 * mb)),
        seg((3, 0), "large", 7, ("inactive", 12 * mb)),
        seg((3, 0), "large", 8, ("inactive", 40 * mb)),  # another stream's
        seg((3, 0), "small", 7, ("inactive", 2 * mb)),
        seg((4, 0), "large", 7, ("inactive", 50 * mb)),  # another pool's
        seg((0, 0), "large", 7, ("inactive", 60 * mb)),  # the default pool's
    ]
    assert S._pool_large(segments, (3, 0), Stream()) == (77 * mb, 47 * mb, [20 * mb, 12 * mb])
    assert S._pool_large(segments, (5, 0), Stream()) == (0, 0, [])
    assert S._round_seed(4 * mb) == 10 * mb and S._round_seed(21 * mb + 5) == 22 * mb

    def pool_of(hold):
        """trial(seed): what a pool adds past a seed when it holds ``hold`` bytes (else 20 MB
        segments for the rest)."""
        calls = []

        def trial(seed):
            calls.append(seed)
            return 0 if seed >= hold else -(-(hold - seed) // (20 * mb)) * 20 * mb
        return trial, calls

    trial, calls = pool_of(0)
    assert S._choose_seed(trial, 8 * mb, 2 * mb) == (0, [(0, 0)]) and calls == [0]
    # 30 MB of requests: 40 MB unseeded; need + 1/8 rounded = 34 MB holds them
    trial, calls = pool_of(30 * mb)
    assert S._choose_seed(trial, 30 * mb, 8 * mb) == (34 * mb, [(0, 40 * mb), (34 * mb, 0)])
    # the measured need misses part of 45 MB: 34 adds 20 more (54 in all, less than 60 unseeded);
    # 34 + max(34/4, 8) = 44 (rounded) adds 20 too; 44 + 11 = 56 holds it all but is more
    trial, calls = pool_of(45 * mb)
    seed, log = S._choose_seed(trial, 30 * mb, 8 * mb)
    assert seed == 34 * mb and log == [(0, 60 * mb), (34 * mb, 20 * mb), (44 * mb, 20 * mb), (56 * mb, 0)]
    # no seed adds less than none: none is kept, after at most _SEED_TRIALS calls
    trial, calls = pool_of(200 * mb)
    seed, log = S._choose_seed(trial, 10 * mb, 2 * mb)
    assert seed == 0 and len(calls) == S._SEED_TRIALS and log[0] == (0, 200 * mb)


def test_qa_scores_keep_at_most_two_full_buffers():
    """The query-aware scores of a head chunk hold at most two [heads, nb, nb] buffers at once
    (the logits and their softmax; the rest in place), with the out-of-place forms' values."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from flexprefill.ops import selection as S

    c, nb, D = 3, 40, 16
    g = torch.Generator().manual_seed(0)
    q_bar, k_bar = torch.randn(c, nb, D, generator=g), torch.randn(c, nb, D, generator=g)
    ar = torch.arange(nb)
    not_causal = ar[None, :] > ar[:, None]
    tri_flat = S._tri_flat(nb, "cpu", torch.int32)
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
            _, flat = S._qa_scores(q_bar, k_bar, scale=0.3, nb=nb, live_c=live_c, rows_c=rows_c,
                                   not_causal=not_causal, tri_flat=tri_flat, keep_s=False)
        assert mode.peak <= 2, mode.peak
        want = torch.softmax((0.3 * q_bar @ k_bar.transpose(1, 2)).masked_fill(not_causal, float("-inf")), -1)
        if live_c is not None:
            want = torch.where(live_c, want, 0.0)
        want = want.flatten(1)[:, tri_flat] / (rows_c[:, None] if rows_c is not None else nb)
        torch.testing.assert_close(flat, want, rtol=1e-6, atol=1e-7)
        s, flat2 = S._qa_scores(q_bar, k_bar, scale=0.3, nb=nb, live_c=live_c, rows_c=rows_c,
                                not_causal=not_causal, tri_flat=tri_flat)
        assert s.shape == (c, nb, nb) and torch.equal(flat, flat2)


def test_head_chunking_does_not_change_the_selection(monkeypatch):
    """The assembly processes heads a chunk at a time (smaller chunks inside a CUDA graph): same result."""

    from flexprefill.ops import selection as S

    q, k, _ = structured_qkv(2, 700, 6, 2, 64, seed=4, dtype=torch.float16)
    cfg = fp.FlexPrefillConfig(block_size=32, min_budget=64, gamma=0.9, tau=0.2)
    whole = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    nb = whole.counts.shape[-1]
    monkeypatch.setattr(S, "_chunk_elems_for", lambda q, k: nb * nb * 5)
    chunked = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    assert torch.equal(whole.counts, chunked.counts) and torch.equal(whole.indices, chunked.indices)


def test_chunk_size_follows_the_qkv_bytes():
    """Eager head chunks: 15% of the q+k+v bytes at ~27 B per element, within [2^22, 2^23]."""
    from flexprefill.ops.selection import _chunk_elems_for

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
    from flexprefill.ops import selection as S

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
    monkeypatch.setattr(S, "_FUSED_ASSEMBLY", False)
    torch_ops = run()
    assert torch.equal(fused[0], torch_ops[0]) and torch.equal(fused[1], torch_ops[1])


@pytest.mark.parametrize("N", [20, 33, 64, 65])
def test_fused_assembly_on_one_and_two_blocks(N, monkeypatch):
    """Tiny inputs (one or two blocks, a partial last block): the fused pass equals the PyTorch one."""
    from flexprefill.ops import selection as S

    cfg = fp.FlexPrefillConfig(block_size=32, min_budget=0, gamma=0.9, tau=1.0)
    q, k, _ = structured_qkv(1, N, 2, 1, 64, seed=N, dtype=torch.float16)
    fused = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    monkeypatch.setattr(S, "_FUSED_ASSEMBLY", False)
    ref = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    assert torch.equal(fused.counts, ref.counts) and torch.equal(fused.indices, ref.indices)
    assert int(fused.counts[0, 0, -1]) >= 1  # the diagonal block at least


def test_fused_assembly_breaks_ranking_ties_like_a_stable_sort():
    """Equal query-aware scores: the entries at lower flat positions are kept first."""
    from flexprefill.ops import selection as S

    nb, D = 12, 16
    cfg = fp.FlexPrefillConfig(block_size=32, min_budget=32, gamma=0.5, tau=10.0)
    # identical block means: every row's softmax is uniform, so most scores tie
    q_bar = torch.ones(3, nb, D)
    k_bar = torch.ones(3, nb, D)
    vert = torch.rand(3, nb, generator=torch.Generator().manual_seed(0))
    slash = torch.rand(3, nb, generator=torch.Generator().manual_seed(1))
    qa = torch.tensor([True, True, False])
    got = S._assemble(vert, slash, qa, q_bar, k_bar, cfg=cfg, scale=0.25)
    want = S._assemble_torch(vert, slash, qa, q_bar, k_bar, cfg=cfg, scale=0.25)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("fused", [True, False])
def test_assembly_writes_given_outputs(fused, monkeypatch):
    """``out=(counts, indices)`` (a graph's outputs, made outside its pool): the search's
    tail writes those very tensors, with what it returns without them; tensors of another
    shape or dtype are refused."""
    from flexprefill.ops import selection as S

    monkeypatch.setattr(S, "_FUSED_ASSEMBLY", fused)
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
    want = S._dense_tail(**args)
    counts = torch.full((B * Hq, nb), -7, dtype=torch.int32)
    indices = torch.full((B * Hq, nb, nb), -7, dtype=torch.int16)
    got = S._dense_tail(**args, out=(counts, indices))
    assert got[0] is counts and got[1] is indices
    assert torch.equal(counts, want[0]) and torch.equal(indices, want[1])
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    with pytest.raises(AssertionError, match="do not fit 4 heads of 10 blocks"):
        S._dense_tail(**args, out=(counts, indices.int()))
    with pytest.raises(AssertionError, match="do not fit"):
        S._dense_tail(**args, out=(counts[:2], indices))


@pytest.mark.parametrize("br", [32, 128])
def test_combine_kernel_matches_torch(br):
    """The one-launch log2-sum-exp over key splits equals the PyTorch version, rows that saw no key included."""
    from flexprefill.ops.selection import _combine, _combine_splits

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
    from flexprefill.ops import selection as S

    monkeypatch.setattr(S, "_FUSED_ASSEMBLY", fused)
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
    from flexprefill.ops.selection import compact_index_dtype

    assert compact_index_dtype(2048) == torch.int16 and compact_index_dtype(32767) == torch.int16
    assert compact_index_dtype(32768) == torch.int32
    monkeypatch.setenv("FLEXPREFILL_INT16_BLOCK_IDS", "0")
    assert compact_index_dtype(2048) == torch.int32


def _threshold_valid(row: torch.Tensor, value: float, pos: int, gamma: float) -> bool:
    """Whether entry (value, pos) of ``row`` may end the ranking: in (value desc, position asc)
    order the fp64 running sum before it is below the goal and through it reaches the goal,
    both within fp32 rounding of the row total."""
    srt = torch.sort(row.double(), descending=True, stable=True)
    n = int((srt.indices == pos).nonzero()[0, 0])
    assert float(row[pos]) == value
    cum = srt.values.cumsum(0)
    total = float(cum[-1])
    goal, eps = gamma * total, 1e-6 * max(total, 1e-30)
    before = float(cum[n - 1]) if n > 0 else 0.0
    return before < goal + eps and float(cum[n]) >= goal - eps


@pytest.mark.parametrize("T", [1, 7, 136, 5000, 9000])
@pytest.mark.parametrize("kind", ["random", "ties", "sparse", "power-law"])
def test_radix_threshold_entry_equals_sort(T, kind, monkeypatch):
    # the query-aware ranking's threshold entry by radix selection (8 passes of 4 bits, then
    # the ties) against a stable sort and its cumsum; several splits from T > 4096
    from flexprefill.ops.selection import _threshold_entry

    g = torch.Generator().manual_seed(T)
    H = 4
    x = torch.rand(H, T, generator=g)
    if kind == "ties":
        x = (x * 8).floor() / 8
    elif kind == "sparse":
        x = torch.where(torch.rand(H, T, generator=g) < 0.7, 0.0, x)
    elif kind == "power-law":
        x = x**8 / T
    x[-1] = 0.0  # a row of zeros: the first entry ends it
    x = x.to("cuda" if torch.cuda.is_available() else "cpu")
    for gamma in (0.5, 0.9, 0.99):
        thr, pos = _threshold_entry(x, gamma)
        monkeypatch.setenv("FLEXPREFILL_RADIX_SELECT", "0")
        thr_s, pos_s = _threshold_entry(x, gamma)
        monkeypatch.delenv("FLEXPREFILL_RADIX_SELECT")
        assert thr.dtype == thr_s.dtype and pos.dtype == pos_s.dtype
        for h in range(H):
            assert _threshold_valid(x[h].cpu(), float(thr[h]), int(pos[h]), gamma), (kind, T, gamma, h)
        assert torch.equal(thr, thr_s) and torch.equal(pos, pos_s)


def test_radix_threshold_entry_with_long_splits(monkeypatch):
    # past _RADIX_MAX_SPLITS splits each program takes a longer stretch of the list (several
    # loop steps); the same entries as the sort
    from flexprefill.ops import selection as S

    monkeypatch.setattr(S, "_RADIX_MAX_SPLITS", 2)
    monkeypatch.setattr(S, "_RADIX_PER_SPLIT", 1024)
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(3, 9000, generator=g) ** 4).to("cuda" if torch.cuda.is_available() else "cpu")
    x[1, ::3] = 0.25  # many ties
    thr, pos = S._threshold_entry(x, 0.9)
    monkeypatch.setenv("FLEXPREFILL_RADIX_SELECT", "0")
    thr_s, pos_s = S._threshold_entry(x, 0.9)
    assert torch.equal(thr, thr_s) and torch.equal(pos, pos_s)
