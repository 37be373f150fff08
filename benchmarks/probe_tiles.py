"""Where the block-sparse kernel loses at low density (run on a CUDA machine; JSON to $OUT or ./out).

For head dims 128, 256, 64 (32 query / 8 KV heads, bf16, block size 128, N = 131072 unless
given) and two kinds of selections:

* the suite's random selections at 5%, 10% and 20% of the causal blocks (kernel efficiency,
  TFLOP/s on the computed blocks over cuDNN dense's on the same inputs);
* "k per row": every query block's diagonal plus its ``k`` nearest blocks before it (k = 0,
  8, 32), from which a straight-line fit ``time = tiles * (a + b * blocks per tile)`` gives the
  fixed cost of a query tile ``a`` in units of one block's cost ``b``;

each with a few explicit tile configs (some capped at 128 registers per thread with
``maxnreg`` so that two CTAs fit on an SM) and the autotuned one.  Per config: registers,
spills, shared memory, and the CTAs per SM they allow.
Usage: python benchmarks/probe_tiles.py [N]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from triton.testing import do_bench

import flexprefill.ops.sparse_attention as SA
from harness import (
    attention_flops, causal_density, count_pairs, cudnn_reference, env_stamp, random_qkv, random_selection,
)
from flexprefill.block_table import compact_block_mask

HQ, HKV, BS = 32, 8, 128
CONFIGS = {
    128: [
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, maxnreg=128),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    ],
    256: [
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    ],
    64: [
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
    ],
}


def k_per_row_selection(heads: int, N: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query block's diagonal and its ``k`` nearest blocks before it, for every head."""
    nb = math.ceil(N / BS)
    r = torch.arange(nb, device=device)
    mask = (r[None, :] <= r[:, None]) & (r[None, :] >= r[:, None] - k)
    counts, idx = compact_block_mask(mask[None, None].expand(1, heads, nb, nb).contiguous())
    return counts, idx


def _occupancy(kernel, num_warps: int) -> dict:
    regs = int(getattr(kernel, "n_regs", 0))
    spills = int(getattr(kernel, "n_spills", 0))
    smem = int(getattr(getattr(kernel, "metadata", None), "shared", 0) or 0)
    threads = 32 * num_warps
    by_regs = 65536 // max(1, (-(-regs * 32 // 256) * 256) * num_warps) if regs else None
    by_smem = (233472 // smem) if smem else None
    ctas = min(x for x in (by_regs, by_smem, 2048 // threads) if x is not None)
    return dict(regs=regs, spills=spills, smem=smem, ctas_per_sm=ctas)


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    stamp = env_stamp()
    path = os.path.join(out, f"probe_tiles_{stamp.get('commit', 'unknown')}.json")
    rows = []
    captured = {}
    run0 = SA._run

    def capture_run(args, grid, BD, block_size, config, descs):
        captured["k"] = run0(args, grid, BD, block_size, config, descs)

    SA._run = capture_run
    t0 = time.time()
    try:
        for D in (128, 256, 64):
            q, k, v = random_qkv(1, N, HQ, HKV, D, seed=0, device="cuda")
            scale = D**-0.5
            base_ms, base_tf = cudnn_reference(q, k, v, scale=scale)
            print(f"D={D} N={N} cuDNN {base_ms:.2f} ms {base_tf:.0f} TFLOP/s  [{time.time() - t0:.0f}s]", flush=True)
            sels = []
            for density in (0.05, 0.10, 0.20):
                sel = random_selection(1, HQ, N, block_size=BS, density=density, device="cuda", seed=0)
                sels.append((f"random {density:.2f}", sel.counts, sel.indices.to(torch.int16)))
                del sel
            for kk in (0, 8, 32):
                c, i = k_per_row_selection(HQ, N, kk, "cuda")
                sels.append((f"k={kk}", c, i.to(torch.int16)))
            for name, counts, idx in sels:
                flops = attention_flops(count_pairs(counts, idx, block_size=BS, seq_len=N), D)
                blocks_per_row = float(counts.float().mean())
                for cfg in [None] + CONFIGS[D]:
                    fn = lambda: SA._launch(q, k, v, counts, idx, block_size=BS, softmax_scale=scale,  # noqa: E731
                                            return_lse=False, config=cfg)
                    try:
                        fn()
                        ms = do_bench(fn, warmup=2, rep=40)
                    except Exception as e:  # a config this GPU cannot run: keep the others
                        rows.append(dict(D=D, sel=name, config=cfg, error=str(e)[:200]))
                        continue
                    r = dict(D=D, N=N, sel=name, density=causal_density(counts), blocks_per_row=blocks_per_row,
                             config=cfg or "autotuned", ms=ms, cudnn_ms=base_ms,
                             efficiency=flops / (ms * 1e-3) / 1e12 / base_tf, **stamp)
                    if cfg is not None and captured.get("k") is not None:
                        r.update(_occupancy(captured["k"], cfg["num_warps"]))
                    if cfg is None:
                        tuned = SA.sparse_attention_fwd_tuned[max(64, D)]
                        best = getattr(tuned, "best_config", None)
                        r["config"] = str(best)
                    rows.append(r)
                    print(f"  {name:12s} {str(r['config'])[:70]:70s} {ms:8.3f} ms eff {r['efficiency']:.3f}"
                          f" regs {r.get('regs', '-')} spills {r.get('spills', '-')} ctas {r.get('ctas_per_sm', '-')}",
                          flush=True)
            q = k = v = None
            sels = None
            torch.cuda.empty_cache()
    finally:
        SA._run = run0
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
