"""A/B of one of the kernel's environment switches on a GPU (JSON to $OUT or ./out).

For head dims 128, 64, 256 (32 query / 8 KV heads, bf16, block size 128) at N (default 131072)
and the suite's fixed random selections (5-60% of the causal blocks, int16 block ids as the
operator passes them), the autotuned kernel runs with ``SWITCH=0`` and ``SWITCH=1``,
interleaved twice (best of the two kept); TFLOP/s on the computed blocks over cuDNN dense
SDPA's on the same inputs, so each side is a kernel efficiency as in the suite.
Usage: python benchmarks/compare_kernel_switch.py SWITCH [N]
  e.g. python benchmarks/compare_kernel_switch.py FLEXPREFILL_DIAG_FIRST
"""

from __future__ import annotations

import json
import os
import sys

from triton.testing import do_bench

from harness import EFFICIENCY_DENSITIES, causal_density, efficiency_cases, env_stamp
from flexprefill.ops.sparse_attention import sparse_attention
from flexprefill.options import set_from_env

BS = 128


def main():
    switch = sys.argv[1]
    N = int(sys.argv[2]) if len(sys.argv) > 2 else 131072
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    rows = []
    path = os.path.join(out, f"switch_{switch}_{env_stamp().get('commit', 'unknown')}.json")
    try:
        for case in efficiency_cases((128, 64, 256), N, EFFICIENCY_DENSITIES):
            q, k, v, counts, idx = (case[n] for n in ("q", "k", "v", "counts", "idx"))
            times = {"0": [], "1": []}
            for _ in range(2):
                for value in times:
                    set_from_env(switch, value)
                    fn = lambda: sparse_attention(q, k, v, counts, idx, block_size=BS, softmax_scale=case["scale"])  # noqa: E731
                    fn()  # autotunes this value's key once
                    times[value].append(do_bench(fn, warmup=3, rep=100))
            r = dict(switch=switch, D=case["D"], N=N, density=causal_density(counts), cudnn_ms=case["cudnn_ms"],
                     cudnn_tflops=case["cudnn_tflops"], **env_stamp())
            for value, ts in times.items():
                r[f"ms_{value}"] = min(ts)
                r[f"efficiency_{value}"] = case["flops"] / (min(ts) * 1e-3) / 1e12 / case["cudnn_tflops"]
            rows.append(r)
            print(f"  density {r['density']:.3f}: efficiency {switch}=0 {r['efficiency_0']:.3f}, "
                  f"=1 {r['efficiency_1']:.3f}", flush=True)
            q = k = v = counts = idx = case = None
    finally:
        set_from_env(switch, None)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
