"""What the pattern search's cached CUDA graph keeps on the device, and what it needs (JSON to $OUT).

For each layer shape (Hq/Hkv/D) and length, the operator's first call captures the search's
graph with the CUDA allocator's history recorded.  Reported per case:

* ``pool_mb`` / ``held_mb``: device memory the cached graph keeps (``cached_graph_memory``:
  reserved bytes the drop gives back / the graph pool's segments plus the bytes of its live
  tensors elsewhere: what no other allocation can use);
* ``segments_mb`` / ``peak_live_mb``: the graph pool's segments and the peak of the bytes
  live in them during the capture (the rest is the allocator's rounding: allocations of 1-10
  MB take 20 MB segments);
* ``top``: the allocations live at that peak, by the flexprefill source line that made them;
* ``search_ms`` / ``operator_ms`` / ``cudnn_ms`` (``do_bench``) for the head-chunk size of the
  query-aware ranking inside the graph (``chunks``, elements; default: the library's), with
  the pool seeded (``seed`` 1, the default) and not (``FLEXPREFILL_GRAPH_SEED=0``);
* ``multi``: the memory kept after caching graphs of four lengths with one shared pool (the
  default, seeded and not) and with one pool per graph (``FLEXPREFILL_GRAPH_POOL=private``).

Usage: python benchmarks/search_pool.py [lengths] [shapes] [chunks] [seeds]
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections import defaultdict

import torch
from triton.testing import do_bench

import flexprefill as fp
from harness import cached_graph_memory, cudnn_reference, env_stamp
from flexprefill_tools.synthetic import structured_qkv
from flexprefill import search as S
from flexprefill.search import graph as G
from flexprefill.options import set_from_env

MB = 2**20


def _fresh():
    S.clear_graph_cache()
    G.seed_log.clear()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _seed_log_mb() -> list:
    """The captures' seed log (selection.seed_log) in MB."""
    return [{k: [(a / MB, b / MB) for a, b in v] if k == "trials" else v / MB for k, v in e.items()}
            for e in G.seed_log]


def _origin(frames) -> str:
    for fr in frames or []:
        name = fr.get("filename", "")
        if "flexprefill" in name and "benchmarks" not in name:
            return f"{name.split('flexprefill/')[-1]}:{fr.get('line')} {fr.get('name')}"
    return "other"


def pool_breakdown(snapshot) -> dict:
    """Segments of non-default pools, and the peak of live bytes in them over the trace."""
    segs = [s for s in snapshot["segments"] if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0)]
    ranges = [(s["address"], s["address"] + s["total_size"]) for s in segs]

    def in_pool(addr):
        return any(a <= addr < b for a, b in ranges)

    live, cur, peak, at_peak = {}, 0, 0, {}
    for tr in snapshot.get("device_traces", []):
        for ev in tr:
            act, addr = ev.get("action"), ev.get("addr")
            if act == "alloc" and in_pool(addr):
                live[addr] = (ev["size"], _origin(ev.get("frames")))
                cur += ev["size"]
                if cur > peak:
                    peak, at_peak = cur, dict(live)
            elif act in ("free_completed",) and addr in live:
                cur -= live.pop(addr)[0]
    by_line = defaultdict(int)
    for size, where in at_peak.values():
        by_line[where] += size
    top = sorted(by_line.items(), key=lambda kv: -kv[1])[:12]
    return dict(segments_mb=sum(s["total_size"] for s in segs) / MB, num_segments=len(segs),
                segment_sizes_mb=sorted((s["total_size"] / MB for s in segs), reverse=True)[:12],
                peak_live_mb=peak / MB, top=[dict(where=w, mb=b / MB) for w, b in top])


def case(q, k, v, cfg, scale, chunk):
    if chunk:
        G._GRAPH_CHUNK_ELEMS_LARGE = G._GRAPH_CHUNK_ELEMS = chunk
    _fresh()
    op = lambda: fp.flex_prefill_attention(q, k, v, config=cfg, softmax_scale=scale)  # noqa: E731
    torch.cuda.memory._record_memory_history(max_entries=200000)
    op()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    row = pool_breakdown(snap)
    op_ms = do_bench(op, warmup=3, rep=100)
    N = q.shape[1]
    idx = S.compact_index_dtype(-(-N // cfg.block_size))
    search = lambda: S.select_blocks_fast(q, k, config=cfg, softmax_scale=scale, index_dtype=idx)  # noqa: E731
    search_ms = do_bench(search, warmup=3, rep=100)
    row["graphs"] = [key[0] for key in G._graphs]
    row["seed_log_mb"] = _seed_log_mb()
    G.seed_log.clear()
    kept = cached_graph_memory()
    row.update(operator_ms=op_ms, search_ms=search_ms, pool_mb=kept["reserved_mb"], held_mb=kept["held_mb"])
    return row


def multi(shape, lengths, cfg) -> dict:
    """Memory kept by the graphs of several lengths of one shape, shared pool vs private pools."""
    Hq, Hkv, D = shape
    res = {}
    for mode in ("shared", "shared_unseeded", "private"):
        set_from_env("FLEXPREFILL_GRAPH_POOL", mode.split("_")[0])
        set_from_env("FLEXPREFILL_GRAPH_SEED", "0" if mode.endswith("unseeded") else "1")
        _fresh()
        for N in lengths:
            q, k, v = structured_qkv(1, N, Hq, Hkv, D, seed=N, dtype=torch.bfloat16, device="cuda", generate_on="device")
            fp.flex_prefill_attention(q, k, v, config=cfg, softmax_scale=D**-0.5)
            del q, k, v
        graphs = len(G._graphs)
        kept = cached_graph_memory()
        res[mode] = dict(graphs=graphs, kept_mb=kept["reserved_mb"], held_mb=kept["held_mb"], seed_log_mb=_seed_log_mb())
    set_from_env("FLEXPREFILL_GRAPH_POOL", None)
    set_from_env("FLEXPREFILL_GRAPH_SEED", None)
    _fresh()
    return res


def main():
    lens = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "32768,131072").split(",")]
    shapes = [tuple(int(v) for v in s.split("/")) for s in (sys.argv[2] if len(sys.argv) > 2 else "9/3/64,4/1/256,32/8/128").split(",")]
    chunks = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "0,1048576").split(",")]
    seeds = (sys.argv[4] if len(sys.argv) > 4 else "1,0").split(",")
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    stamp = env_stamp()
    path = os.path.join(out, f"search_pool_{stamp.get('commit', 'unknown')}.json")
    defaults = (G._GRAPH_CHUNK_ELEMS_LARGE, G._GRAPH_CHUNK_ELEMS)
    res = dict(env=stamp, default_chunks=defaults, rows=[], multi={})
    cfg = fp.FlexPrefillConfig(min_seq_len=0)
    try:
        for Hq, Hkv, D in shapes:
            for N in lens:
                q, k, v = structured_qkv(1, N, Hq, Hkv, D, seed=N, dtype=torch.bfloat16, device="cuda", generate_on="device")
                scale = D**-0.5
                qkv_mb = (q.numel() + k.numel() + v.numel()) * q.element_size() / MB
                dense_ms, _ = cudnn_reference(q, k, v, scale=scale)
                for chunk, seed in [(c, sd) for c in chunks for sd in seeds]:
                    G._GRAPH_CHUNK_ELEMS_LARGE, G._GRAPH_CHUNK_ELEMS = defaults
                    set_from_env("FLEXPREFILL_GRAPH_SEED", seed)
                    row = dict(shape=f"{Hq}/{Hkv}/{D}", N=N, chunk=chunk or "default", seed=int(seed), qkv_mb=qkv_mb,
                               cudnn_ms=dense_ms, **stamp)
                    try:
                        row.update(case(q, k, v, cfg, scale, chunk))
                    except Exception as e:  # noqa: BLE001 - one case's failure is a row
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    if "pool_mb" in row:
                        row["pool_frac_qkv"] = row["pool_mb"] / qkv_mb
                        row["held_frac_qkv"] = row["held_mb"] / qkv_mb
                        row["search_share_of_cudnn"] = row["search_ms"] / dense_ms
                    res["rows"].append(row)
                    print(f"{row['shape']:9s} {N:7d} chunk {str(row['chunk']):8s} seed {seed} " + (
                        f"pool {row['pool_mb']:6.1f} MB ({row['pool_frac_qkv']:.0%} of qkv {qkv_mb:.0f}) held {row['held_mb']:.1f} ({row['held_frac_qkv']:.0%}) segs {row['segments_mb']:.1f} "
                        f"{row['segment_sizes_mb']} {row['seed_log_mb']} peak live {row['peak_live_mb']:.1f}  search {row['search_ms']:.3f} ms ({row['search_share_of_cudnn']:.1%} of cuDNN "
                        f"{dense_ms:.2f}) op {row['operator_ms']:.3f}" if "pool_mb" in row else row.get("error", "")), flush=True)
                    set_from_env("FLEXPREFILL_GRAPH_SEED", None)
                    if chunk == chunks[0] and seed == seeds[0] and "top" in row:
                        for t in row["top"][:6]:
                            print(f"      {t['mb']:7.2f} MB  {t['where']}", flush=True)
                G._GRAPH_CHUNK_ELEMS_LARGE, G._GRAPH_CHUNK_ELEMS = defaults
                del q, k, v
                _fresh()
            try:
                res["multi"][f"{Hq}/{Hkv}/{D}"] = m = multi((Hq, Hkv, D), [16384, 24576, 32768, 65536], cfg)
                print(f"{Hq}/{Hkv}/{D} four lengths cached: {m}", flush=True)
            except Exception as e:  # noqa: BLE001
                res["multi"][f"{Hq}/{Hkv}/{D}"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        G._GRAPH_CHUNK_ELEMS_LARGE, G._GRAPH_CHUNK_ELEMS = defaults
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
