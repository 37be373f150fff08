"""Every GPU kernel of one pattern search, and the graphed search by graph head-chunk size (CUDA; JSON to $OUT).

For the given head shapes (``Hq/Hkv/D``, default SmolLM2 9/3/64 and Gemma 3 4/1/256) at N
(default 32768), structured synthetic bf16 inputs, gamma 0.9, tau 0.1: the kernels of one
eager search (torch.profiler, graphs off: inside a graph the same kernels run) with their
device time and count, their sum and number; then the median time of the graphed search
(``do_bench``) with the graph's head chunks of 2^19 and 2^21 elements, against cuDNN dense
on the same inputs.  Where the search is GPU-bound, this says
which launches to fuse.
Usage: python benchmarks/search_kernels.py [N] [shapes]
"""

from __future__ import annotations

import json
import os
import sys

import torch
from triton.testing import do_bench

import flexprefill as fp
from harness import cached_graph_pool_mb, cudnn_reference, env_stamp
from flexprefill_tools.synthetic import structured_qkv
from flexprefill import search as S
from flexprefill.search import graph as G
from flexprefill.options import set_from_env


def kernels_of(fn) -> tuple[list, float, int]:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            r = rows.setdefault(e.name[:140], dict(name=e.name[:140], calls=0, us=0.0))
            r["calls"] += 1
            r["us"] += e.device_time
    out = sorted(rows.values(), key=lambda r: -r["us"])
    return out, sum(r["us"] for r in out), sum(r["calls"] for r in out)


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    shapes = [tuple(int(v) for v in s.split("/")) for s in (sys.argv[2] if len(sys.argv) > 2 else "9/3/64,4/1/256").split(",")]
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    stamp = env_stamp()
    res = dict(env=stamp, rows=[])
    cfg = fp.FlexPrefillConfig(min_seq_len=0)
    chunk0 = G._graph_chunk
    try:
        for Hq, Hkv, D in shapes:
            q, k, v = structured_qkv(1, N, Hq, Hkv, D, seed=N, dtype=torch.bfloat16, device="cuda", generate_on="device")
            scale = D**-0.5
            dense_ms, _ = cudnn_reference(q, k, v, scale=scale)
            search = lambda: S.select_blocks_fast(q, k, config=cfg, softmax_scale=scale)  # noqa: E731
            set_from_env("FLEXPREFILL_SELECTION_GRAPHS", "0")
            kern, total_us, launches = kernels_of(search)
            eager_ms = do_bench(search, warmup=5, rep=100)
            set_from_env("FLEXPREFILL_SELECTION_GRAPHS", None)
            row = dict(shape=f"{Hq}/{Hkv}/{D}", N=N, cudnn_ms=dense_ms, eager_ms=eager_ms, kernel_us=total_us,
                       launches=launches, kernels=kern, graphed={}, **stamp)
            print(f"{row['shape']} N={N}: cuDNN {dense_ms:.3f} ms, eager search {eager_ms:.3f} ms, "
                  f"{launches} kernels summing {total_us:.0f} us", flush=True)
            for r in kern[:30]:
                print(f"   {r['us']:8.1f} us x{r['calls']:<3d} {r['name'][:100]}", flush=True)
            for chunk in (1 << 19, 1 << 21):
                G._graph_chunk = lambda nb, chunk=chunk: chunk
                S.clear_graph_cache()
                search()
                ms = do_bench(search, warmup=5, rep=100)
                row["graphed"][str(chunk)] = dict(ms=ms, share_of_cudnn=ms / dense_ms, pool_mb=cached_graph_pool_mb())
                print(f"   graphed, head chunks of {chunk} elements: {ms:.3f} ms ({ms / dense_ms:.1%} of cuDNN), "
                      f"pool {row['graphed'][str(chunk)]['pool_mb']:.0f} MB", flush=True)
            S.clear_graph_cache()
            res["rows"].append(row)
            q = k = v = None
            torch.cuda.empty_cache()
    finally:
        G._graph_chunk = chunk0
        set_from_env("FLEXPREFILL_SELECTION_GRAPHS", None)
        with open(os.path.join(out, f"search_kernels_{stamp.get('commit', 'unknown')}.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
