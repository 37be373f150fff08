"""The diagonal block in the main loop (MERGED) against its separate pass, and the dense path's
SDPA backend order, on a GPU (JSON to $OUT or ./out).

Part 1, kernel: for head dims 64, 128, 256 (32 query / 8 KV heads, bf16, block size 128) at N
(default 131072, a whole number of blocks, so MERGED applies) and the suite's fixed random
selections (5-60% of the causal blocks), the autotuned kernel runs with
``FLEXPREFILL_MERGED_DIAG=0`` (separate diagonal pass, int32 ids), ``=1`` (int32 ids) and ``=1``
with int16 ids (what the operator passes), interleaved twice; TFLOP/s on the computed blocks
over cuDNN dense SDPA's on the same inputs.
Part 2, dense path: ``ops.dense.dense_causal_attention`` on [B, N, H, D] inputs at 32k with
``FLEXPREFILL_DENSE_CUDNN=1`` (cuDNN asked first) and ``=0`` (torch's default order), next to
cuDNN and flash SDPA on contiguous [B, H, N, D] (the suite's baselines).
Usage: python benchmarks/compare_merged_diag.py [N]
"""

from __future__ import annotations

import json
import os
import sys

import torch
from triton.testing import do_bench

from flexprefill.benchmarking import (
    EFFICIENCY_DENSITIES, attention_flops, causal_density, count_pairs, cudnn_reference, env_stamp, make_dense_fn,
    random_qkv, random_selection,
)
from flexprefill.ops.dense import dense_causal_attention
from flexprefill.ops.sparse_attention import sparse_attention

HQ, HKV, BS = 32, 8, 128
VARIANTS = (("separate", "0", torch.int32), ("merged", "1", torch.int32), ("merged_int16", "1", torch.int16))
DENSE_SHAPES = (("llama3.1-8b", 32, 8, 128), ("smollm2-135m", 9, 3, 64), ("gemma3-270m", 4, 1, 256))


def _kernel_part(N, rows):
    for D in (128, 64, 256):
        q, k, v = random_qkv(1, N, HQ, HKV, D, seed=0, device="cuda")
        scale = D**-0.5
        base_ms, base_tf = cudnn_reference(q, k, v, scale=scale)
        print(f"D={D} N={N} cuDNN {base_ms:.2f} ms {base_tf:.0f} TFLOP/s", flush=True)
        for density in EFFICIENCY_DENSITIES:
            sel = random_selection(1, HQ, N, block_size=BS, density=density, device="cuda", seed=0)
            flops = attention_flops(count_pairs(sel.counts, sel.indices, block_size=BS, seq_len=N), D)
            ids = {torch.int32: sel.indices, torch.int16: sel.indices.to(torch.int16)}
            times = {name: [] for name, _, _ in VARIANTS}
            for _ in range(2):
                for name, merged, dt in VARIANTS:
                    os.environ["FLEXPREFILL_MERGED_DIAG"] = merged
                    idx = ids[dt]
                    fn = lambda: sparse_attention(q, k, v, sel.counts, idx, block_size=BS, softmax_scale=scale)  # noqa: E731
                    fn()  # autotune of this variant's key
                    times[name].append(do_bench(fn, warmup=3, rep=100))
            r = dict(part="kernel", D=D, N=N, density=causal_density(sel.counts), cudnn_ms=base_ms, cudnn_tflops=base_tf,
                     **env_stamp())
            for name, ts in times.items():
                ms = min(ts)
                r[f"{name}_ms"] = ms
                r[f"{name}_efficiency"] = flops / (ms * 1e-3) / 1e12 / base_tf
            rows.append(r)
            print(f"  density {r['density']:.3f}: efficiency separate {r['separate_efficiency']:.3f}, merged "
                  f"{r['merged_efficiency']:.3f}, merged+int16 {r['merged_int16_efficiency']:.3f}", flush=True)
        q = k = v = sel = ids = None
        torch.cuda.empty_cache()
    os.environ.pop("FLEXPREFILL_MERGED_DIAG", None)


def _dense_part(rows, N=32768):
    for name, hq, hkv, D in DENSE_SHAPES:
        q, k, v = random_qkv(1, N, hq, hkv, D, seed=1, device="cuda")
        scale = D**-0.5
        r = dict(part="dense", shape=name, N=N, Hq=hq, Hkv=hkv, D=D, **env_stamp())
        layouts = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
        for m in ("cudnn", "flash"):
            fn, note = make_dense_fn(m, *layouts, scale=scale)
            r[f"sdpa_{m}_ms"] = do_bench(fn, warmup=3, rep=100)
            r[f"sdpa_{m}_note"] = note
        ref = None
        for flag in ("1", "0"):
            os.environ["FLEXPREFILL_DENSE_CUDNN"] = flag
            out = dense_causal_attention(q, k, v, softmax_scale=scale)
            ref = out if ref is None else ref
            r[f"dense_path_cudnn{flag}_ms"] = do_bench(lambda: dense_causal_attention(q, k, v, softmax_scale=scale),
                                                       warmup=3, rep=100)
            r[f"dense_path_cudnn{flag}_maxdiff_vs_cudnn1"] = (out.float() - ref.float()).abs().max().item()
        os.environ.pop("FLEXPREFILL_DENSE_CUDNN", None)
        rows.append(r)
        print(f"dense {name} {N}: cuDNN {r['sdpa_cudnn_ms']:.3f} flash {r['sdpa_flash_ms']:.3f} | dense path cuDNN first "
              f"{r['dense_path_cudnn1_ms']:.3f}, default order {r['dense_path_cudnn0_ms']:.3f} ms", flush=True)
        q = k = v = layouts = None
        torch.cuda.empty_cache()


def main():
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    rows = []
    try:
        _dense_part(rows)
        _kernel_part(N, rows)
    finally:
        with open(os.path.join(out, f"merged_diag_{env_stamp().get('commit', 'unknown')}.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
