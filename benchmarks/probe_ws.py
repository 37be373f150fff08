"""Does triton's automatic warp specialization help the block-sparse kernel? (CUDA; JSON to $OUT or ./out)

The kernel-efficiency misses (head dims 64 and 128 at 5-20% density) come from a query
tile's fixed cost and a loop body below cuDNN's (benchmarks/probe_tiles.py).  Triton >= 3.5
has an automatic warp-specialization pass for Hopper (``tl.range(..., warp_specialize=True)``,
documented as experimental); the kernel's ``WS`` switch puts it on the off-diagonal loop.
For head dims 128 and 64 (32 query / 8 KV heads, bf16, block 128, N = 131072 unless given),
random selections at 5%, 20% and 60%: the autotuned kernel, then explicit configs with and
without ``WS``, with the K/V tiles through TMA descriptors and through pointers
(``FLEXPREFILL_TMA``).  Per row: ms, efficiency (TFLOP/s on the computed blocks over cuDNN
dense's on the same inputs), the largest difference from the autotuned output, or the error
when triton refuses to compile.
Usage: python benchmarks/probe_ws.py [N]
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from triton.testing import do_bench

import flexprefill.ops.sparse_attention as SA
from flexprefill.benchmarking import attention_flops, causal_density, count_pairs, cudnn_reference, env_stamp, random_qkv, random_selection

HQ, HKV, BS = 32, 8, 128
CONFIGS = {
    128: [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2), dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2),
          dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)],
    64: [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3), dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3)],
}


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    stamp = env_stamp()
    path = os.path.join(out, f"probe_ws_{stamp.get('commit', 'unknown')}.json")
    rows = []
    t0 = time.time()
    try:
        for D in (128, 64):
            q, k, v = random_qkv(1, N, HQ, HKV, D, seed=0, device="cuda")
            scale = D**-0.5
            base_ms, base_tf = cudnn_reference(q, k, v, scale=scale)
            print(f"D={D} N={N} cuDNN {base_ms:.2f} ms {base_tf:.0f} TFLOP/s  [{time.time() - t0:.0f}s]", flush=True)
            for density in (0.05, 0.20, 0.60):
                sel = random_selection(1, HQ, N, block_size=BS, density=density, device="cuda", seed=0)
                counts, idx = sel.counts, sel.indices.to(torch.int16)
                flops = attention_flops(count_pairs(counts, idx, block_size=BS, seq_len=N), D)
                ref = None
                for tma in ("1", "0"):
                    os.environ["FLEXPREFILL_TMA"] = tma
                    for cfg in ([None] if tma == "1" else []) + [dict(c, WS=ws) for c in CONFIGS[D] for ws in (False, True)]:
                        fn = lambda: SA._launch(q, k, v, counts, idx, block_size=BS, softmax_scale=scale,  # noqa: E731
                                                return_lse=False, config=cfg)
                        r = dict(D=D, N=N, density=causal_density(counts), tma=tma == "1",
                                 config=cfg or "autotuned", cudnn_ms=base_ms, **stamp)
                        try:
                            o = fn()
                            torch.cuda.synchronize()
                            if ref is None:
                                ref = o
                            r["max_abs_diff"] = float((o.float() - ref.float()).abs().max())
                            del o
                            ms = do_bench(fn, warmup=2, rep=40)
                            r.update(ms=ms, efficiency=flops / (ms * 1e-3) / 1e12 / base_tf)
                        except Exception as e:  # a config triton refuses: record it, keep the others
                            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        rows.append(r)
                        print(f"  {density:.2f} tma={tma} {str(r['config'])[:90]:90s} "
                              + (f"{r['ms']:8.3f} ms eff {r['efficiency']:.3f} diff {r['max_abs_diff']:.1e}" if "ms" in r
                                 else r["error"][:160]), flush=True)
                sel = counts = idx = ref = None
            q = k = v = None
            torch.cuda.empty_cache()
    finally:
        os.environ.pop("FLEXPREFILL_TMA", None)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
