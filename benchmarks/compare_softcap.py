"""What logit soft-capping (``softcap``, Gemma 2) costs on a GPU (JSON to $OUT or ./out).

Kernel: for head dims 64, 128, 256 (32 query / 8 KV heads, bf16, block size 128) at N
(default 32768) and the suite's fixed random selections (5, 20, 60% of the causal blocks, int16
block ids), three runs of ``sparse_attention`` on the same inputs, interleaved twice (best
kept): the default kernel without a cap (the Gluon kernels on Hopper), the Triton kernel
without a cap (``hopper_kernel="off"``) and the kernel a capped call takes (the Triton kernel
everywhere); TFLOP/s on the computed blocks over cuDNN dense SDPA's, as in the suite.
Operator: Gemma 2 9B's layer shape (16 query / 8 KV heads, D=256) on structured inputs,
``flex_prefill_attention`` (search included, gamma 0.9) without and with ``softcap=50``,
and each one's density.
Usage: python benchmarks/compare_softcap.py [N]
"""

from __future__ import annotations

import json
import os
import sys

import torch
from triton.testing import do_bench

from harness import causal_density, efficiency_cases, env_stamp
import flexprefill as fp
from flexprefill.ops.sparse_attention import kernel_name, sparse_attention
from flexprefill_tools.synthetic import structured_qkv

BS = 128
CAP = 50.0  # Gemma 2's attn_logit_softcapping
DENSITIES = (0.05, 0.20, 0.60)


def _kernel_rows(N: int, stamp: dict) -> list:
    rows = []
    for case in efficiency_cases((64, 128, 256), N, DENSITIES):
        q, k, v, counts, idx = (case[n] for n in ("q", "k", "v", "counts", "idx"))
        runs = {
            "default": (dict(), None),
            "triton": (dict(hopper_kernel="off"), None),
            "softcap": (dict(), CAP),
        }
        times = {name: [] for name in runs}
        for _ in range(2):
            for name, (opts, cap) in runs.items():
                with fp.use_options(**opts):
                    fn = lambda: sparse_attention(q, k, v, counts, idx, block_size=BS,  # noqa: E731
                                                  softmax_scale=case["scale"], softcap=cap)
                    fn()  # autotunes this key once
                    times[name].append(do_bench(fn, warmup=3, rep=100))
        r = dict(part="kernel", D=case["D"], N=N, density=causal_density(counts), cudnn_ms=case["cudnn_ms"],
                 cudnn_tflops=case["cudnn_tflops"], kernel_default=kernel_name(q, k, v, BS),
                 kernel_softcap=kernel_name(q, k, v, BS, softcap=CAP), **stamp)
        for name, ts in times.items():
            r[f"ms_{name}"] = min(ts)
            r[f"efficiency_{name}"] = case["flops"] / (min(ts) * 1e-3) / 1e12 / case["cudnn_tflops"]
        rows.append(r)
        print(f"  D={r['D']} density {r['density']:.3f}: efficiency default {r['efficiency_default']:.3f} "
              f"({r['kernel_default']}), triton {r['efficiency_triton']:.3f}, softcap {r['efficiency_softcap']:.3f}",
              flush=True)
        q = k = v = counts = idx = case = None
    return rows


def _operator_rows(N: int, stamp: dict) -> list:
    q, k, v = structured_qkv(1, N, 16, 8, 256, seed=0, dtype=torch.bfloat16, device="cuda", generate_on="device")
    cfg = fp.FlexPrefillConfig(gamma=0.9, min_seq_len=0)
    rows = []
    for cap in (None, CAP):
        fn = lambda: fp.flex_prefill_attention(q, k, v, config=cfg, softmax_scale=256**-0.5, softcap=cap)  # noqa: E731
        fn()
        _, stats = fp.flex_prefill_attention(q, k, v, config=cfg, softmax_scale=256**-0.5, softcap=cap,
                                             return_stats=True)
        ms = min(do_bench(fn, warmup=3, rep=100) for _ in range(2))
        rows.append(dict(part="operator", shape="gemma2-9b 16/8/256", N=N, softcap=cap, ms=ms,
                         density=float(stats.density.mean()), **stamp))
        print(f"  operator softcap={cap}: {ms:.3f} ms, density {rows[-1]['density']:.3f}", flush=True)
    return rows


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    stamp = env_stamp()
    path = os.path.join(out, f"softcap_{stamp.get('commit', 'unknown')}.json")
    rows = []
    try:
        rows += _kernel_rows(N, stamp)
        rows += _operator_rows(N, stamp)
    finally:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
