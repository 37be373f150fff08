"""Pointer loads against tensor-descriptor (TMA) loads of the K/V tiles, on a GPU (JSON to $OUT or ./out).

For head dims 64, 128, 256 (32 query / 8 KV heads, bf16, block size 128) at N (default
131072) and fixed random selections of several densities (1.0 = every causal block), each
candidate config runs once with ``FLEXPREFILL_TMA=0`` (pointer tensors) and once with the
descriptors; the best of each path is compared with cuDNN dense SDPA's TFLOP/s on the same
inputs.  Usage: python benchmarks/compare_kv_loads.py [N] [budget_s]
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from triton.testing import do_bench

from harness import (
    attention_flops, causal_density, count_pairs, cudnn_reference, env_stamp, random_qkv, random_selection,
)
from flexprefill.block_table import full_causal_selection
from flexprefill.ops.sparse_attention import _launch, _tma_descriptors
from flexprefill.options import set_from_env

HQ, HKV, BS = 32, 8, 128
DENSITIES = (0.05, 0.3, 0.6, 1.0)
CONFIGS = {
    64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 2)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 4, 4)],
    256: [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3)],
}


def main():
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    budget_s = float(sys.argv[2]) if len(sys.argv) > 2 else 240
    t0 = time.time()
    rows = []
    for D in (128, 64, 256):
        q, k, v = random_qkv(1, N, HQ, HKV, D, seed=0, device="cuda")
        scale = D**-0.5
        base_ms, base_tf = cudnn_reference(q, k, v, scale=scale)
        print(f"D={D} N={N} cuDNN {base_ms:.2f} ms {base_tf:.0f} TFLOP/s", flush=True)
        assert _tma_descriptors(k, v, D, D) is not None, "descriptors refused on this GPU"
        for density in DENSITIES:
            if density >= 1.0:
                counts, indices = full_causal_selection(1, HQ, N, BS, "cuda")
            else:
                sel = random_selection(1, HQ, N, block_size=BS, density=density, device="cuda", seed=0)
                counts, indices = sel.counts, sel.indices
            flops = attention_flops(count_pairs(counts, indices, block_size=BS, seq_len=N), D)
            dens = causal_density(counts)
            best = {}
            for tma in ("0", "1"):
                set_from_env("FLEXPREFILL_TMA", tma)
                for bm, bn, w, s in CONFIGS[D]:
                    if time.time() - t0 > budget_s:
                        break
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                    r = dict(D=D, N=N, density=dens, tma=tma == "1", cudnn_ms=base_ms, cudnn_tflops=base_tf, **cfg, **env_stamp())
                    try:
                        ms = do_bench(lambda: _launch(q, k, v, counts, indices, block_size=BS, softmax_scale=scale,
                                                      return_lse=False, config=cfg), warmup=3, rep=50)
                        r.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
                        r["efficiency"] = r["tflops"] / base_tf
                        if r["efficiency"] > best.get(tma, (0, None))[0]:
                            best[tma] = (r["efficiency"], cfg)
                    except Exception as e:  # out of shared memory and the like: the next config
                        r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(r)
            print(f"  density {dens:.3f}: pointer best {best.get('0')}, descriptors best {best.get('1')}", flush=True)
        q = k = v = None
        torch.cuda.empty_cache()
    set_from_env("FLEXPREFILL_TMA", None)
    with open(os.path.join(out, "kv_loads.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
