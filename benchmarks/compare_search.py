"""The pattern search eager, with only its tail graphed, or whole in one graph (JSON to $OUT or ./out).

For the Llama-3.1-8B (32/8/128), SmolLM2 (9/3/64) and Gemma 3 (4/1/256) layer shapes on the
structured synthetic inputs (bf16, gamma 0.9, tau 0.1) at N = 32k, 64k, 128k, in one process:
the search alone and the whole operator (median ms, ``do_bench``) against cuDNN dense SDPA
for three variants, set by environment switches:

* ``eager``: no CUDA graph (``FLEXPREFILL_SELECTION_GRAPHS=0``);
* ``tail_graph``: the passes over q and k eager, the rest graphed where that pays
  (``FLEXPREFILL_SEARCH_GRAPH=0``);
* ``two_pass``: the default with ``FLEXPREFILL_REP_BLOCK_STATS=0`` (two passes over the keys
  for the representative rows);
* ``default``: where a graph pays, the whole search in one graph (its kernels read q and k
  at the addresses two device words hold); one pass with block statistics while heads x key
  blocks <= 2^14;
* ``block_stats``: the default with ``FLEXPREFILL_REP_BLOCK_STATS=1`` (one pass always).
``COMPARE_SEARCH_VARIANTS=a,b``: only those.

``FLEXPREFILL_RADIX_SELECT=0`` takes the query-aware threshold by sort instead of radix
selection.  Also: whether each variant's
selection equals the first one's (heads whose block count differs), the memory a cached
graph keeps, and the HBM bandwidth of a 4 GiB device copy (what bounds the sparse kernel on
selections without K/V reuse).
Usage: python benchmarks/compare_search.py [lengths] [shapes]
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
from triton.testing import do_bench

import flexprefill as fp
from harness import cached_graph_pool_mb, causal_density, cudnn_reference, env_stamp
from flexprefill_tools.synthetic import structured_qkv
from flexprefill import search as S
from flexprefill.options import set_from_env

VARIANTS = {
    "eager": {"FLEXPREFILL_SELECTION_GRAPHS": "0"},
    "tail_graph": {"FLEXPREFILL_SEARCH_GRAPH": "0"},
    "two_pass": {"FLEXPREFILL_REP_BLOCK_STATS": "0"},
    "default": {},
    "block_stats": {"FLEXPREFILL_REP_BLOCK_STATS": "1"},
}
if os.environ.get("COMPARE_SEARCH_VARIANTS"):  # e.g. two_pass,default,block_stats
    VARIANTS = {k: VARIANTS[k] for k in os.environ["COMPARE_SEARCH_VARIANTS"].split(",")}
KNOBS = ("FLEXPREFILL_RADIX_SELECT", "FLEXPREFILL_SELECTION_GRAPH_MAX_ELEMS", "FLEXPREFILL_SELECTION_GRAPHS",
         "FLEXPREFILL_SEARCH_GRAPH", "FLEXPREFILL_REP_BLOCK_STATS")


def _set(env: dict) -> None:
    for k in KNOBS:
        set_from_env(k, None)
    for k, val in env.items():
        set_from_env(k, val)
    S.clear_graph_cache()
    gc.collect()
    torch.cuda.empty_cache()


def hbm_bandwidth() -> dict:
    x = torch.empty(1 << 31, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()

    def copy():
        y.copy_(x)

    ms = do_bench(copy, warmup=3, rep=100)
    return dict(copy_gib=4.0, ms=ms, tb_per_s=nbytes / (ms * 1e-3) / 1e12)


def main():
    lens = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "32768,65536,131072").split(",")]
    shapes = [tuple(int(v) for v in s.split("/")) for s in (sys.argv[2] if len(sys.argv) > 2 else "9/3/64,4/1/256,32/8/128").split(",")]
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    stamp = env_stamp()
    path = os.path.join(out, f"compare_search_{stamp.get('commit', 'unknown')}.json")
    res = dict(env=stamp, hbm=hbm_bandwidth(), rows=[])
    print("HBM copy:", res["hbm"], flush=True)
    cfg = fp.FlexPrefillConfig(min_seq_len=0)
    try:
        for Hq, Hkv, D in shapes:
            for N in lens:
                q, k, v = structured_qkv(1, N, Hq, Hkv, D, seed=N, dtype=torch.bfloat16, device="cuda", generate_on="device")
                scale = D**-0.5
                dense_ms, _ = cudnn_reference(q, k, v, scale=scale)
                ref_counts = None
                for name, env in VARIANTS.items():
                    _set(env)
                    search = lambda: S.select_blocks_fast(q, k, config=cfg, softmax_scale=scale)  # noqa: E731
                    sel = search()
                    if ref_counts is None:
                        ref_counts = sel.counts.clone()
                    heads_differ = int((sel.counts.sum(-1) != ref_counts.sum(-1)).sum())
                    search_ms = do_bench(search, warmup=5, rep=100)
                    op = lambda: fp.flex_prefill_attention(q, k, v, config=cfg, softmax_scale=scale)  # noqa: E731
                    op()
                    op_ms = do_bench(op, warmup=3, rep=200)
                    pool_mb = cached_graph_pool_mb()
                    row = dict(shape=f"{Hq}/{Hkv}/{D}", N=N, variant=name, search_ms=search_ms, operator_ms=op_ms,
                               cudnn_ms=dense_ms, search_share_of_cudnn=search_ms / dense_ms,
                               speedup=dense_ms / op_ms, density=causal_density(sel.counts),
                               heads_with_other_counts_than_first=heads_differ,
                               graph_pool_mb=pool_mb, **stamp)
                    row["share_of_ideal"] = row["speedup"] * row["density"]
                    res["rows"].append(row)
                    print(f"{row['shape']:9s} {N:7d} {name:12s} search {search_ms:7.3f} ms ({row['search_share_of_cudnn']:.1%} of cuDNN "
                          f"{dense_ms:.2f}) operator {op_ms:8.3f} ms {row['speedup']:.2f}x ({row['share_of_ideal']:.0%} of ideal) "
                          f"differ {heads_differ} pool {row['graph_pool_mb']:.0f} MB", flush=True)
                q = k = v = sel = None
                _set({})
    finally:
        for kname in KNOBS:
            set_from_env(kname, None)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
