"""CUDA graphs around the pattern search: a cache of captured searches keyed by their input
shapes, replayed where launches, not the GPU, bound the search's time, and the memory pool
the graphs share (seeded so a capture's requests are carved from one block).

The search itself knows nothing of graphs: it takes ``out=(counts, indices)`` to write (a
graph's static outputs, made outside its pool) and, for the whole dense search, ``src`` (two
device words holding q's and k's addresses, which its kernels read them at).  This module
captures such a function once per shape and replays it.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..options import options
from . import gamma as G

__all__ = ["clear_graph_cache", "call", "call_reading_inputs", "seed_log"]

# Where a graph pays.  At nb <= 256 blocks (N <= 32k at block 128) the host cost of the
# search's launches exceeds their GPU time, and one graph replay per shape replaces them
# (H200, 32k, 32 heads, tau 0.1: 1.31 ms against 3.31 ms eager).  With the PyTorch assembly
# at 512 blocks the graph's small head chunks made it slower than eager (64k: 5.1 against
# 3.4 ms), hence 256.  Past 256 blocks a graph pays when the whole ranking is small
# (BH * nb^2 <= 2^24 elements: small-head models, or 64k with 32 heads), where the eager
# search is bound by its ~150 launches (H200, radix threshold: SmolLM2 9/3/64 at 128k 1.46 ms
# graphed vs 4.19 eager, at 64k 0.69 vs 2.41; Gemma 3 4/1/256 at 64k 0.51 vs 1.78; Llama
# 32/8/128 at 64k 1.77 vs 3.36, but at 128k, 2^25 elements, 4.89 vs 4.39).
# ``Options.search_graph_max_elems`` sets that limit (0: 256 blocks only).  A graph's memory
# pool stays reserved while it is cached: at most _GRAPH_CACHE shapes, LRU, and
# ``clear_graph_cache()`` frees them.  Never used while the caller is itself capturing a graph.
_GRAPH_MAX_NB = 256
_GRAPH_MAX_ELEMS = 1 << 24
_GRAPH_CACHE = 4
# head-chunk elements of the ranking inside a graph, where more chunks cost no host time and
# the pool keeps the peak of one chunk's temporaries.  With the radix threshold (no sort
# temporaries) 2^21 at every size: at 32k one chunk instead of two cut the graphed search
# from 0.509 to 0.399 ms on SmolLM2 (9/3/64; pool 28 MB either way) and from 1.193 to 0.930
# ms on the Llama shape (pool 48 -> 68 MB); a cached graph then keeps ~90 MB at SmolLM2's
# 128k, its returned tables included.  With the sort, 2^19 up to 256 blocks (~140 B per
# element: near 70 MB; 2^22 elements held 276 MB at 32k, 32 heads)
_GRAPH_CHUNK_ELEMS = 1 << 19
_GRAPH_CHUNK_ELEMS_LARGE = 1 << 21


def _graph_chunk(nb: int) -> int:
    """Head-chunk elements of the query-aware ranking inside a graph (see above)."""
    if G._radix_enabled() or nb > _GRAPH_MAX_NB:
        return _GRAPH_CHUNK_ELEMS_LARGE
    return _GRAPH_CHUNK_ELEMS


def _graph_pays(bh: int, nb: int) -> bool:
    if nb <= _GRAPH_MAX_NB:
        return True
    return bh * nb * nb <= options().search_graph_max_elems


_graphs: "OrderedDict[tuple, tuple]" = OrderedDict()

# One memory pool per device shared by every cached search graph: a graph's temporaries are
# only live during its replay and every replay's outputs are cloned at once on the same
# stream, so graphs of different shapes may reuse each other's memory; the cache then keeps
# the largest graph's pool instead of the sum over up to _GRAPH_CACHE shapes.  (Replays of
# two shapes on two streams at once would race; so would two replays of one shape with
# private pools, as both write the graph's static outputs.)  ``Options.graph_pool="private"``:
# one pool per graph.
#
# The pool is seeded: the CUDA caching allocator gives every request of 1-10 MB a 20 MB
# segment of its own (a request of 10 MB or more gets a segment of its size, rounded to 2
# MB), and a graph's pool keeps its segments for good.  So a capture may first take one
# block a little larger than the peak of the search's live requests over 1 MB and free it
# at once; the search's requests are then carved out of it.  The graph's counts and indices
# live outside the pool (see _capture), so all of the pool is free between replays.  Which
# seed, if any, is found by trial calls in a private pool set up as the shared pool is (its
# free segments, then the seed): the one the capture grows the pool least with (none where
# other shapes' segments already hold the requests).  ``Options.graph_seed`` off: no seed.
_pools: dict = {}
_capture_streams: dict = {}
_SEED_MIN = 10 << 20  # the allocator's kMinLargeAlloc: smaller large requests take 20 MB segments
_SEED_ROUND = 2 << 20  # its kRoundLarge
_SEED_TRIALS = 4  # trial calls at most per capture (see _choose_seed)
# (measured need and largest request, free bytes and wholly free segments found, seed taken,
# large segments added past it, the trials' (seed, added)) of the last captures, for benchmarks
seed_log: list = []


def clear_graph_cache() -> None:
    """Drop the cached CUDA graphs of the pattern search (frees their memory pool)."""
    _graphs.clear()
    _pools.clear()


def _graph_pool(device):
    """The shared pool handle of ``device`` (None: a private pool per graph)."""
    if options().graph_pool == "private":
        return None
    key = torch.device(device).index
    if key not in _pools:
        _pools[key] = torch.cuda.graph_pool_handle()
    return _pools[key]


def _capture_stream(device):
    """One capture stream per device: a pool's free blocks are reused only by allocations on
    the stream that freed them, so every capture into the shared pool uses the same one (see
    also _capture)."""
    key = torch.device(device).index
    if key not in _capture_streams:
        _capture_streams[key] = torch.cuda.Stream(device=device)
    return _capture_streams[key]


def _seeding() -> bool:
    return options().graph_seed


class _LargePeak(TorchDispatchMode):
    """Records the peak of the caching allocator's large-pool bytes (requests over 1 MB) above
    their level at entry, sampled after every op, and the most one op added (a bound on its
    largest request; allocations come from ops; a transient workspace an op frees before
    returning is not seen)."""

    def __init__(self, device):
        super().__init__()
        self.device = device
        self.base = self.peak = 0
        self.largest = self.kept = 0

    def now(self) -> int:
        return torch.cuda.memory_stats(self.device).get("allocated_bytes.large_pool.current", 0)

    def __enter__(self):
        self.base = self.peak = self.now()
        self.largest = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.now()
        out = func(*args, **(kwargs or {}))
        after = self.now()
        self.peak = max(self.peak, after)
        self.largest = max(self.largest, after - before)
        return out

    @property
    def bytes(self) -> int:
        return self.peak - self.base


def _pool_large(segments, pool, stream) -> tuple[int, int, list]:
    """(bytes of, free bytes in, sizes of the wholly free ones of) ``pool``'s large segments
    (``torch.cuda.memory_snapshot()`` entries) that allocations on ``stream`` may use."""
    size = free = 0
    empty = []
    for seg in segments:
        if (tuple(seg.get("segment_pool_id", (0, 0))) != tuple(pool) or seg.get("segment_type") != "large"
                or seg.get("stream") != stream.cuda_stream):
            continue
        size += seg.get("total_size", 0)
        blocks = seg.get("blocks", [])
        free += sum(blk["size"] for blk in blocks if blk.get("state") == "inactive")
        if blocks and all(blk.get("state") == "inactive" for blk in blocks):
            empty.append(seg.get("total_size", 0))
    return size, free, empty


def _round_seed(n: int) -> int:
    """``n`` bytes as a seed block: rounded up to 2 MB, at least 10 MB (a segment of its own size)."""
    return max(_SEED_MIN, -(-n // _SEED_ROUND) * _SEED_ROUND)


def _choose_seed(trial, need: int, request: int, tries: int = _SEED_TRIALS) -> tuple[int, list]:
    """(seed bytes, [(seed, bytes added past it), ...] of the trials made).

    ``trial(seed)`` returns the bytes the capture would add to the pool past a seed block of
    ``seed`` bytes (0: no seed); the seed taken adds the least, ``seed + added``.  Tried in
    turn: none; ``need`` (the peak of requests over 1 MB) and an eighth more (at least 2 MB:
    the requests' order leaves holes); then a quarter more each time, at least the largest
    request ``request``, until a seed holds everything or ``tries`` are made."""
    log = [(0, trial(0))]
    if log[0][1] == 0 or need <= 0:
        return 0, log
    best = (log[0][1], 0)
    seed = _round_seed(need + max(need // 8, _SEED_ROUND))
    while len(log) < tries:
        added = trial(seed)
        log.append((seed, added))
        if seed + added < best[0]:
            best = (seed + added, seed)
        if added == 0:
            break
        seed = _round_seed(seed + max(seed // 4, request))
    return best[1], log


def _trial_added(run, static, device, stream, empty: list, seed: int, peak=None) -> int:
    """Bytes ``run(out=static)`` adds to a pool whose large segments are ``empty`` (sizes, all
    free) after a seed block of ``seed`` bytes, found by running it on ``stream`` in a
    private pool set up so (the caching allocator places the requests there as it will in
    the capture: same allocator, same requests, same free blocks).  ``peak``: a _LargePeak
    to record the call with."""
    mp = torch.cuda.MemPool()
    with torch.cuda.stream(stream), torch.cuda.use_mem_pool(mp, device=device):
        blocks = [torch.empty(n, dtype=torch.uint8, device=device) for n in (*empty, seed) if n]
        del blocks
        with peak if peak is not None else contextlib.nullcontext():
            outs = run(out=static)
        del outs
        if peak is not None:
            # what stays allocated past the call (a workspace made on first use) is no part
            # of what the graph will need
            peak.kept = max(0, peak.now() - peak.base)
    size = _pool_large(torch.cuda.memory_snapshot(), mp.id, stream)[0]
    del mp
    return size - sum(empty) - seed


def _graphs_enabled() -> bool:
    return options().search_graphs


def _graph_applies(t: torch.Tensor, bh: int, nb: int) -> bool:
    """Whether a search over ``bh`` heads of ``nb`` blocks on ``t``'s device runs from a graph:
    on CUDA, graphs on, the caller not capturing one itself, and a graph pays (_graph_pays)."""
    return t.is_cuda and _graphs_enabled() and not torch.cuda.is_current_stream_capturing() and _graph_pays(bh, nb)


# graph keys whose capture failed: they stay eager (a warning says so once)
_ungraphable: set = set()


def _capture(key, device, fallback: str, run):
    """(graph, outputs) of ``run()`` captured in a CUDA graph, or None, with a warning and
    ``key`` marked ungraphable, where the capture (or a kernel) fails: the caller then stays
    correct, only slower.

    ``run(out=None)`` returns (counts, indices, ...); given ``out``, it writes counts and
    indices there.  A first call warms up (compilation, autotuning) and gives their shapes;
    the graph then writes them into tensors made outside its pool (the [heads, nb, nb] table
    is the largest tensor of the search: inside the pool it stayed live in the middle of the
    seed, and the requests after it did not fit around it), so that everything the graph
    allocates in its pool is free between replays.  Then trial calls, writing into those, in
    a private pool set up as the graph's pool is, find the seed block that adds the least to
    it (_trial_added, _choose_seed).

    Warm-up and capture run on the device's one capture stream: cuBLAS keeps a workspace per
    stream (32 MB and more on Hopper, allocated on the stream's first matmul and never
    freed), so a fresh side stream per capture left one behind each time, and a first matmul
    inside the capture put one into the graph's pool."""
    stream = torch.cuda.current_stream(device)
    cap = _capture_stream(device)
    cap.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    pool = _graph_pool(device)
    # the seed's trial calls need torch.cuda.MemPool (torch >= 2.7)
    seeding = pool is not None and _seeding() and hasattr(torch.cuda, "use_mem_pool")
    try:
        with torch.cuda.stream(cap):
            outs = run()
        stream.wait_stream(cap)
        # made on the caller's stream, where the replays run and the cache frees them
        static = (torch.empty_like(outs[0]), torch.empty_like(outs[1]))
        del outs
        cap.wait_stream(stream)
        seed = 0
        if seeding:
            size0, free, empty = _pool_large(torch.cuda.memory_snapshot(), pool, cap)
            try:
                peak = _LargePeak(device)
                added0 = _trial_added(run, static, device, cap, empty, 0, peak)
                need, request = peak.bytes - peak.kept, peak.largest
                seed, trials = _choose_seed(
                    lambda n: added0 if n == 0 else _trial_added(run, static, device, cap, empty, n), need, request)
            except Exception as e:  # a MemPool API this torch lacks: capture without a seed
                import warnings

                warnings.warn(f"flexprefill: the search graph's pool seed could not be sized "
                              f"({type(e).__name__}: {str(e)[:200]}); captured without one", RuntimeWarning, stacklevel=4)
                seeding, seed = False, 0
            stream.wait_stream(cap)
        with torch.cuda.graph(graph, pool=pool, stream=cap):
            if seed:
                # a block of the pool's own, freed at once: the capture's requests split it
                seed_block = torch.empty(seed, dtype=torch.uint8, device=device)
                del seed_block
            outs = run(out=static)
        stream.wait_stream(cap)
        if seeding:
            # what the capture added to the pool past the seed (requests the seed did not hold)
            grown = _pool_large(torch.cuda.memory_snapshot(), pool, cap)[0] - size0 - seed
            seed_log.append(dict(need=need, request=request, free=free, empty=sum(empty), seed=seed, grown=grown,
                                 trials=trials))
            del seed_log[:-16]
    except Exception as e:  # a capture this torch/triton/driver refuses
        import warnings

        stream.wait_stream(cap)
        warnings.warn(f"flexprefill: the pattern search could not be captured in a CUDA graph "
                      f"({type(e).__name__}: {str(e)[:200]}); {fallback}", RuntimeWarning, stacklevel=4)
        _ungraphable.add(key)
        return None
    return graph, outs


def _cache(key, entry):
    """Keep ``entry`` under ``key``, the least recently used past _GRAPH_CACHE dropped."""
    _graphs[key] = entry
    while len(_graphs) > _GRAPH_CACHE:
        _graphs.popitem(last=False)
    return entry


def _search_graph_enabled() -> bool:
    return options().whole_search_graph


def _kwargs_key(kwargs: dict) -> tuple:
    return tuple((n, float(v) if isinstance(v, float) else v) for n, v in kwargs.items())


def call(fn, tensors: dict, *, chunk_elems: int, **kwargs):
    """``fn(**tensors, **kwargs, chunk_elems=chunk_elems)``, replayed from a cached CUDA graph
    where one pays (on CUDA, graphs on, the caller not capturing, see _graph_pays).

    ``tensors``: the inputs by name (None where absent), ``tensors["vert"]`` [..., nb] giving the
    heads and blocks.  They are small (scores and block means) and copied into the graph's
    own buffers before each replay.  ``fn`` takes ``out=(counts, indices)`` to write and returns
    a tuple of tensors starting with those two; the graph's are cloned out.  ``chunk_elems``
    sizes the eager call's head chunks (a graph uses _graph_chunk).  The key holds ``fn``,
    ``kwargs`` (hashable), the device and the tensors' shapes and dtypes."""
    vert = tensors["vert"]
    if not _graph_applies(vert, vert.numel() // max(1, vert.shape[-1]), vert.shape[-1]):
        return fn(**tensors, **kwargs, chunk_elems=chunk_elems)
    key = (fn.__name__, vert.device, _kwargs_key(kwargs),
           tuple((n, None if t is None else (tuple(t.shape), t.dtype)) for n, t in tensors.items()))
    if key in _ungraphable:
        return fn(**tensors, **kwargs, chunk_elems=chunk_elems)
    graph_chunk = _graph_chunk(vert.shape[-1])
    entry = _graphs.get(key)
    if entry is None:
        static = {n: (None if t is None else t.clone()) for n, t in tensors.items()}
        captured = _capture(key, vert.device, "it runs eagerly for this shape",
                            lambda out=None: fn(**static, **kwargs, chunk_elems=graph_chunk, out=out))
        if captured is None:
            return fn(**tensors, **kwargs, chunk_elems=chunk_elems)
        entry = _cache(key, (captured[0], static, captured[1]))
    else:
        _graphs.move_to_end(key)
    graph, static, outs = entry
    for n, t in tensors.items():
        if t is not None:
            static[n].copy_(t)
    graph.replay()
    return tuple(o.clone() for o in outs)


def call_reading_inputs(fn, q, k, *, heads: int, blocks: int, **kwargs):
    """``fn(q, k, **kwargs, chunk_elems=..., src=src, out=out)`` replayed from a cached CUDA
    graph that reads q and k where they are, or None where that does not apply.

    ``fn``'s kernels take q's and k's addresses from two device words (``src``, int64 [1]
    each), which each call sets with two fills before the replay: the graph reads the
    caller's tensors wherever they are, with no copy of them.  One call is then two fills, a
    replay and the output clones, against ~20 eager launches (3 Triton kernels at 20-40 us
    of host time each, the block means, the copies into a graph of the rest).  Applies where
    :func:`call` would graph ``heads`` x ``blocks`` and q and k have unit last stride at
    16-byte aligned addresses (the key holds their shapes, strides and dtypes); not with
    ``Options.search_graph`` off (the caller then runs the passes eagerly and the rest
    through :func:`call`)."""
    if (
        not _graph_applies(q, heads, blocks)
        or not _search_graph_enabled()
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or q.data_ptr() % 16
        or k.data_ptr() % 16
    ):
        return None
    key = ("search", q.device, _kwargs_key(kwargs),
           tuple(q.shape), q.stride(), q.dtype, tuple(k.shape), k.stride(), k.dtype)
    if key in _ungraphable:
        return None
    entry = _graphs.get(key)
    if entry is None:
        src = (torch.empty(1, dtype=torch.int64, device=q.device), torch.empty(1, dtype=torch.int64, device=q.device))
    else:
        src = entry[1]
    # the addresses this call's kernels read (the capture's warm-up call reads them too)
    src[0].fill_(q.data_ptr())
    src[1].fill_(k.data_ptr())
    if entry is None:
        chunk = _graph_chunk(blocks)

        def run(out=None):
            return fn(q, k, **kwargs, chunk_elems=chunk, src=src, out=out)

        captured = _capture(key, q.device, "its passes over q and k run eagerly for this shape", run)
        if captured is None:
            return None
        entry = _cache(key, (captured[0], src, captured[1]))
    else:
        _graphs.move_to_end(key)
    graph, _, outs = entry
    graph.replay()
    return tuple(o.clone() for o in outs)
