"""Host time of the windowed-kernel call and its parts (run on a CUDA machine).

Gemma 3's local layer (4/1 heads, d256, window 512, bf16) at N tokens: the host time to
enqueue one call (mean over many calls, GPU not drained in between: the rate the host can
issue them), for the band table (built, and from the cache), the tensor descriptors, the
op-level call, the public API call; against the GPU time of the call (do_bench, median).
JSON to $OUT/window_host.json.

    python benchmarks/profile_window_host.py [N]
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from triton.testing import do_bench

import flexprefill
from harness import env_stamp, random_qkv
from flexprefill import block_table
from flexprefill.ops import window_attention
from flexprefill.ops.sparse_attention import _tma_descriptors
from flexprefill.options import set_from_env


def _host_us(fn, reps: int = 300) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return t


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    q, k, v = random_qkv(1, N, 4, 1, 256, seed=0, device="cuda")
    nb = (N + 127) // 128
    call = lambda: window_attention.sliding_window_attention(q, k, v, window=512, softmax_scale=0.0625)  # noqa: E731
    api = lambda: flexprefill.sliding_window_attention(q, k, v, window=512, softmax_scale=0.0625)  # noqa: E731
    row = dict(N=N, window=512, heads="4/1/256")
    row["band_table_build_us"] = _host_us(lambda: block_table.band_table(nb, 128, 512, q.device))
    row["window_selection_cached_us"] = _host_us(lambda: block_table.window_selection(1, 4, N, 128, 512, q.device))
    row["tma_descriptors_us"] = _host_us(lambda: _tma_descriptors(k, v, 256, 256))
    row["op_call_host_us"] = _host_us(call)
    row["api_call_host_us"] = _host_us(api)
    row["op_call_gpu_ms"] = do_bench(call, warmup=5, rep=100)
    set_from_env("FLEXPREFILL_TMA", "0")
    row["op_call_host_us_no_tma"] = _host_us(call)
    row["op_call_gpu_ms_no_tma"] = do_bench(call, warmup=5, rep=100)
    set_from_env("FLEXPREFILL_TMA", None)
    print(json.dumps(row), flush=True)
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"window_host_{N}.json"), "w") as f:
        json.dump(dict(env=env_stamp(), row=row), f, indent=1)


if __name__ == "__main__":
    main()
