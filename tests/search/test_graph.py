"""The CUDA-graph cache around the pattern search: replays equal the eager search; the shared, seeded pool."""

import pytest
import torch

import flexprefill as fp
from flexprefill.search import select_blocks_fast
from flexprefill_tools.synthetic import structured_qkv


@pytest.mark.gpu
def test_graphed_assembly_above_256_blocks_equals_eager(monkeypatch):
    """Past 256 blocks a small ranking (BH * nb^2 <= 2^24) is graphed with larger head chunks: same sets."""
    from flexprefill import search as S
    from flexprefill.search import graph as GR

    assert GR._graph_pays(32, 512) and not GR._graph_pays(32, 1024) and GR._graph_pays(9, 1024)
    fp.set_options(search_graph_max_elems=0)
    assert GR._graph_pays(9, 256) and not GR._graph_pays(9, 257)
    fp.set_options(search_graph_max_elems=1 << 24)
    S.clear_graph_cache()
    cfg = fp.FlexPrefillConfig(tau=0.1, gamma=0.9)
    for seed in (0, 1):
        q, k, _ = structured_qkv(1, 40000, 8, 2, 64, seed=seed, dtype=torch.bfloat16, device="cuda")
        graphed = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
        assert len(GR._graphs) == 1
        fp.set_options(search_graphs=False)
        eager = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
        fp.set_options(search_graphs=True)
        assert torch.equal(graphed.counts, eager.counts) and torch.equal(graphed.indices, eager.indices)
    S.clear_graph_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("tau", [0.1, 0.0])
def test_graphed_assembly_equals_eager(tau, monkeypatch):
    """The cached CUDA graph of the set assembly gives the eager result, for new inputs too."""
    from flexprefill import search as S
    from flexprefill.search import graph as GR

    S.clear_graph_cache()
    cfg = fp.FlexPrefillConfig(tau=tau, gamma=0.9)
    for seed in (0, 1):  # the second call replays the graph captured by the first
        q, k, _ = structured_qkv(2, 4000, 8, 2, 64, seed=seed, dtype=torch.bfloat16, device="cuda")
        graphed = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
        fp.set_options(search_graphs=False)
        eager = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
        fp.set_options(search_graphs=True)
        assert torch.equal(graphed.counts, eager.counts) and torch.equal(graphed.indices, eager.indices)
        # the estimate and the pattern decision are inside the graph too
        assert torch.equal(graphed.query_aware, eager.query_aware) and torch.equal(graphed.js_distance, eager.js_distance)
    assert len(GR._graphs) == 1 and not GR._ungraphable
    # packed sequences take the same path
    lens = [3000, 700, 4100]
    cu = torch.tensor([0, 3000, 3700, 7800], dtype=torch.int32, device="cuda")
    q, k, _ = (t[0] for t in structured_qkv(1, sum(lens), 8, 2, 64, seed=3, dtype=torch.bfloat16, device="cuda"))
    args = (q, k, cu[:-1], cu[1:], cu[:-1], cu[1:], max(lens))
    graphed = S.select_blocks_varlen_fast(*args, config=cfg, softmax_scale=0.125, dense_below=1000)
    fp.set_options(search_graphs=False)
    eager = S.select_blocks_varlen_fast(*args, config=cfg, softmax_scale=0.125, dense_below=1000)
    assert torch.equal(graphed[0], eager[0]) and torch.equal(graphed[1], eager[1])
    S.clear_graph_cache()
    assert not GR._graphs


@pytest.mark.gpu
def test_whole_search_graph_follows_the_inputs(monkeypatch):
    """The whole-search graph reads q and k wherever they are on each call: new tensors
    (the captured ones freed), transformers' [B, H, N, D] layout, and equal to the eager
    search and to the tail-only graph (whole_search_graph=False)."""
    from flexprefill import search as S
    from flexprefill.search import graph as GR

    S.clear_graph_cache()
    cfg = fp.FlexPrefillConfig(tau=0.1, gamma=0.9)
    for layout in ("bnhd", "bhnd"):
        for seed in (0, 1, 2):
            q, k, _ = structured_qkv(1, 5000, 9, 3, 64, seed=seed, dtype=torch.bfloat16, device="cuda")
            if layout == "bhnd":
                q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
            got = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
            fp.set_options(whole_search_graph=False)
            tail = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
            fp.set_options(search_graphs=False)
            eager = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
            fp.set_options(search_graphs=True)
            fp.set_options(whole_search_graph=True)
            for want in (eager, tail):
                assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)
                assert torch.equal(got.query_aware, want.query_aware) and torch.equal(got.js_distance, want.js_distance)
            del q, k
    # one whole-search graph per layout, one tail graph per layout; nothing refused
    assert sum(key[0] == "search" for key in GR._graphs) == 2 and not GR._ungraphable
    # a misaligned q (offset by one element) takes the eager passes, still correct
    q, k, _ = structured_qkv(1, 5000, 9, 3, 64, seed=3, dtype=torch.bfloat16, device="cuda")
    qs = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")[1:].view_as(q).copy_(q)
    ks = k
    assert qs.data_ptr() % 16
    got = S.select_blocks_fast(qs, ks, config=cfg, softmax_scale=0.125)
    fp.set_options(search_graphs=False)
    eager = S.select_blocks_fast(qs, ks, config=cfg, softmax_scale=0.125)
    assert torch.equal(got.counts, eager.counts) and torch.equal(got.indices, eager.indices)
    S.clear_graph_cache()


def _eager_search(monkeypatch, q, k, cfg, index_dtype=torch.int32):
    """The search with CUDA graphs off: what every graph replay must equal."""
    fp.set_options(search_graphs=False)
    try:
        return select_blocks_fast(q, k, config=cfg, softmax_scale=0.125, index_dtype=index_dtype)
    finally:
        fp.set_options(search_graphs=True)


def _assert_same_blocks(got, want):
    assert torch.equal(got.counts, want.counts) and torch.equal(got.indices, want.indices)


@pytest.mark.gpu
def test_graphs_of_several_shapes_share_one_pool(monkeypatch):
    """Cached graphs of different shapes share one memory pool (each may reuse the others'
    temporaries): replays interleaved across shapes still equal the eager search, and the
    pool keeps less than the private pools of the same graphs."""
    from flexprefill import search as S
    from flexprefill.search import graph as GR

    cfg = fp.FlexPrefillConfig(tau=0.1, gamma=0.9)
    shapes = [(3000, 9, 3, 64), (5000, 9, 3, 64), (4200, 4, 1, 128), (7000, 8, 2, 64)]
    inputs = {s: structured_qkv(1, s[0], *s[1:], seed=s[0], dtype=torch.bfloat16, device="cuda")[:2] for s in shapes}
    want = {s: _eager_search(monkeypatch, q, k, cfg) for s, (q, k) in inputs.items()}
    reserved = {}
    for mode in ("private", "shared"):
        fp.set_options(graph_pool=mode)
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
        assert len(GR._graphs) == len(shapes) and not GR._ungraphable
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
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from harness import cached_graph_memory

    from flexprefill import search as S
    from flexprefill.search import graph as GR

    cfg = fp.FlexPrefillConfig(tau=0.1, gamma=0.9)
    q, k, _ = structured_qkv(1, N, 9, 3, 64, seed=3, dtype=torch.bfloat16, device="cuda")
    # the operator's block table (int16; the public int32 one is twice as large: at 128k 36 MB,
    # the caller's output as much as the graph's)
    dt = S.compact_index_dtype(N // cfg.block_size)
    want = _eager_search(monkeypatch, q, k, cfg, dt)
    kept = {}
    for seed in ("0", "1"):
        fp.set_options(graph_seed=seed == "1")
        S.clear_graph_cache()
        GR.seed_log.clear()
        # pools of earlier tests' graphs may still be alive: only new ones count
        before = {tuple(seg.get("segment_pool_id", (0, 0))) for seg in torch.cuda.memory_snapshot()}
        for _ in range(2):
            _assert_same_blocks(S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125, index_dtype=dt), want)
        assert GR._graphs and not GR._ungraphable
        # the seed's trial calls' private pools are gone: the graphs' pool is the only new one
        pools = {tuple(seg.get("segment_pool_id", (0, 0))) for seg in torch.cuda.memory_snapshot()}
        assert pools - before <= {tuple(GR._graph_pool(q.device))}, (pools, before)
        kept[seed] = cached_graph_memory()["held_mb"]
    # the trial calls placed the requests as the capture did: it added nothing past the seed
    assert len(GR.seed_log) == 1 and GR.seed_log[0]["seed"] > 0 and GR.seed_log[0]["grown"] == 0, GR.seed_log
    assert GR.seed_log[0]["trials"][-1] == (GR.seed_log[0]["seed"], 0), GR.seed_log
    assert kept["1"] < kept["0"], kept
    # the bound on the search's extra memory: a quarter of one layer's q + k + v
    # (H200, the trial seed: 13 of 60 MB at 32k, 56 of 240 MB at 128k)
    qkv_mb = N * (9 + 3 + 3) * 64 * 2 / 2**20
    assert kept["1"] <= 0.25 * qkv_mb, (kept, qkv_mb)


@pytest.mark.gpu
def test_seed_trial_failure_keeps_the_graph(monkeypatch):
    """Where the seed's trial calls fail (a torch without the MemPool API they use), the search
    is still captured, without a seed, with a warning, and selects what the eager one does."""
    from flexprefill import search as S
    from flexprefill.search import graph as GR

    cfg = fp.FlexPrefillConfig(tau=0.1, gamma=0.9)
    q, k, _ = structured_qkv(1, 16384, 9, 3, 64, seed=4, dtype=torch.bfloat16, device="cuda")
    want = _eager_search(monkeypatch, q, k, cfg)

    def broken(*args, **kwargs):
        raise TypeError("use_mem_pool() got an unexpected keyword argument 'device'")

    monkeypatch.setattr(GR, "_trial_added", broken)
    S.clear_graph_cache()
    GR.seed_log.clear()
    with pytest.warns(RuntimeWarning, match="pool seed could not be sized"):
        got = S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125)
    _assert_same_blocks(got, want)
    _assert_same_blocks(S.select_blocks_fast(q, k, config=cfg, softmax_scale=0.125), want)
    assert GR._graphs and not GR._ungraphable and not GR.seed_log
    S.clear_graph_cache()


def test_graph_pool_policy(monkeypatch):
    """One pool handle per device, shared by every capture until the cache is cleared;
    graph_pool="private" gives none (each graph its own pool)."""
    from flexprefill import search as S
    from flexprefill.search import graph as GR

    made = []
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: made.append(len(made)) or (len(made), 0))
    S.clear_graph_cache()
    a, b = GR._graph_pool("cuda:0"), GR._graph_pool(torch.device("cuda", 0))
    c = GR._graph_pool("cuda:1")
    assert a == b and a != c and len(made) == 2
    fp.set_options(graph_pool="private")
    assert GR._graph_pool("cuda:0") is None
    fp.set_options(graph_pool="shared")
    S.clear_graph_cache()  # dropping the graphs drops the pool too
    assert GR._graph_pool("cuda:0") != a and len(made) == 3
    S.clear_graph_cache()


def test_pool_seed_size():
    """The pool's large segments on the capture stream (small segments, other pools and other
    streams don't count; wholly free ones listed), and the seed chosen from trial calls: none
    where nothing would be added without it, else the trial that adds least, seed included;
    the trials stop at the first seed that holds everything."""
    from flexprefill.search import graph as GR

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
    assert GR._pool_large(segments, (3, 0), Stream()) == (77 * mb, 47 * mb, [20 * mb, 12 * mb])
    assert GR._pool_large(segments, (5, 0), Stream()) == (0, 0, [])
    assert GR._round_seed(4 * mb) == 10 * mb and GR._round_seed(21 * mb + 5) == 22 * mb

    def pool_of(hold):
        """trial(seed): what a pool adds past a seed when it holds ``hold`` bytes (else 20 MB
        segments for the rest)."""
        calls = []

        def trial(seed):
            calls.append(seed)
            return 0 if seed >= hold else -(-(hold - seed) // (20 * mb)) * 20 * mb
        return trial, calls

    trial, calls = pool_of(0)
    assert GR._choose_seed(trial, 8 * mb, 2 * mb) == (0, [(0, 0)]) and calls == [0]
    # 30 MB of requests: 40 MB unseeded; need + 1/8 rounded = 34 MB holds them
    trial, calls = pool_of(30 * mb)
    assert GR._choose_seed(trial, 30 * mb, 8 * mb) == (34 * mb, [(0, 40 * mb), (34 * mb, 0)])
    # the measured need misses part of 45 MB: 34 adds 20 more (54 in all, less than 60 unseeded);
    # 34 + max(34/4, 8) = 44 (rounded) adds 20 too; 44 + 11 = 56 holds it all but is more
    trial, calls = pool_of(45 * mb)
    seed, log = GR._choose_seed(trial, 30 * mb, 8 * mb)
    assert seed == 34 * mb and log == [(0, 60 * mb), (34 * mb, 20 * mb), (44 * mb, 20 * mb), (56 * mb, 0)]
    # no seed adds less than none: none is kept, after at most _SEED_TRIALS calls
    trial, calls = pool_of(200 * mb)
    seed, log = GR._choose_seed(trial, 10 * mb, 2 * mb)
    assert seed == 0 and len(calls) == GR._SEED_TRIALS and log[0] == (0, 200 * mb)
