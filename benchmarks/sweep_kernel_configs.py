"""Tile/warp/stage sweep of the block-sparse kernel on a GPU (JSON to $OUT or ./out).

For head dims 64, 128, 256 (32 query / 8 KV heads, bf16, block size 128) at N (default
65536) and a fixed random selection of the given density, every candidate config is
timed (triton.testing.do_bench median) and its TFLOP/s on the computed blocks compared
with cuDNN dense SDPA's TFLOP/s on the same inputs.

    python benchmarks/sweep_kernel_configs.py [N] [density] [budget_s] [head dims, e.g. 128,64]  The winners go into the autotune
space in flexprefill/ops/sparse_attention.py.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

import torch
from triton.testing import do_bench

from harness import (
    attention_flops, causal_density, count_pairs, cudnn_reference, env_stamp, random_qkv, random_selection,
)
from flexprefill.ops.sparse_attention import _launch

HQ, HKV, BS = 32, 8, 128


def candidates(D):
    bns = (32, 64) if D > 128 else (64, 128)
    for bm, bn, w, s in itertools.product((64, 128), bns, (4, 8), (2, 3, 4)):
        if D > 128 and s > 3:
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


def main():
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    density = float(sys.argv[2]) if len(sys.argv) > 2 else 0.3
    budget_s = float(sys.argv[3]) if len(sys.argv) > 3 else 200
    head_dims = [int(x) for x in sys.argv[4].split(",")] if len(sys.argv) > 4 else [128, 64, 256]
    t0 = time.time()
    rows = []
    for D in head_dims:
        q, k, v = random_qkv(1, N, HQ, HKV, D, seed=0, device="cuda")
        scale = D**-0.5
        base_ms, base_tf = cudnn_reference(q, k, v, scale=scale)
        sel = random_selection(1, HQ, N, block_size=BS, density=density, device="cuda", seed=0)
        flops = attention_flops(count_pairs(sel.counts, sel.indices, block_size=BS, seq_len=N), D)
        dens = causal_density(sel.counts)
        print(f"D={D} N={N} cuDNN {base_ms:.2f} ms {base_tf:.0f} TFLOP/s; selection density {dens:.3f}", flush=True)
        for cfg in candidates(D):
            if time.time() - t0 > budget_s:
                break
            r = dict(D=D, N=N, density=dens, cudnn_ms=base_ms, cudnn_tflops=base_tf, **cfg, **env_stamp())
            try:
                ms = do_bench(lambda: _launch(q, k, v, sel.counts, sel.indices, block_size=BS, softmax_scale=scale,
                                              return_lse=False, config=cfg), warmup=3, rep=60)
                r.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
                r["efficiency"] = r["tflops"] / base_tf
                print(f"  {cfg}: {ms:.2f} ms {r['tflops']:.0f} TFLOP/s eff {r['efficiency']:.3f}", flush=True)
            except Exception as e:  # out of shared memory and the like: the next config
                r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"  {cfg}: {r['error']}", flush=True)
            rows.append(r)
        q = k = v = sel = None  # free before the next head dim
        torch.cuda.empty_cache()
    with open(os.path.join(out, "kernel_config_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
