"""Where the pattern search spends its time (run on a CUDA machine; JSON to $OUT or ./out).

For the Llama-3.1-8B layer shape (32/8/128, bf16, structured synthetic inputs; or the heads
given as ``Hq/Hkv/D`` in the second argument) at each N:
the median time of the whole search and of its two stages (representative scores; the
set building and compaction), against cuDNN dense attention on the same inputs, and the
CUDA kernels that take the most time in one search (torch.profiler).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flexprefill as fp
from harness import cached_graph_pool_mb, env_stamp
from flexprefill_tools.synthetic import structured_qkv
from flexprefill import search as S
from flexprefill.options import set_from_env

HQ, HKV, D = 32, 8, 128


def _cudnn(q, k, v, scale):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True)


def profile(N: int, tau: float, heads=(HQ, HKV, D)) -> dict:
    Hq, Hkv, D = heads
    q, k, v = structured_qkv(1, N, Hq, Hkv, D, seed=N, dtype=torch.bfloat16, device="cuda", generate_on="device")
    cfg = fp.FlexPrefillConfig(tau=tau)
    scale = D**-0.5
    search = lambda: S.select_blocks_fast(q, k, config=cfg, softmax_scale=scale)  # noqa: E731
    scores = lambda: S.representative_block_scores(q, k, block_size=cfg.block_size, scale=scale)  # noqa: E731
    row = dict(N=N, tau=tau, heads=f"{Hq}/{Hkv}/{D}")
    row["search_ms"] = do_bench(search, warmup=5, rep=50)
    # the same search without the cached CUDA graph of the set assembly
    set_from_env("FLEXPREFILL_SELECTION_GRAPHS", "0")
    row["search_ms_no_graph"] = do_bench(search, warmup=5, rep=50)
    set_from_env("FLEXPREFILL_SELECTION_GRAPHS", None)
    row["rep_scores_ms"] = do_bench(scores, warmup=5, rep=50)
    row["cudnn_dense_ms"] = do_bench(lambda: _cudnn(q, k, v, scale), warmup=5, rep=50)
    row["search_share_of_cudnn"] = row["search_ms"] / row["cudnn_dense_ms"]
    # the whole operator and the kernel alone on the same inputs, against cuDNN
    op_cfg = cfg.replace(min_seq_len=0)
    sel = search()
    _, st = fp.flex_prefill_attention(q, k, v, config=op_cfg, softmax_scale=scale, return_stats=True)
    row["density"] = float(st.density.float().mean())
    row["kernel_ms"] = do_bench(lambda: fp.block_sparse_attention(q, k, v, sel, softmax_scale=scale), warmup=3, rep=50)
    row["operator_ms"] = do_bench(lambda: fp.flex_prefill_attention(q, k, v, config=op_cfg, softmax_scale=scale), warmup=3, rep=50)
    row["operator_speedup_vs_cudnn"] = row["cudnn_dense_ms"] / row["operator_ms"]
    row["kernel_speedup_vs_cudnn"] = row["cudnn_dense_ms"] / row["kernel_ms"]
    row["operator_share_of_ideal"] = row["operator_speedup_vs_cudnn"] * row["density"]
    # after the warm-up (autotune, graph capture) a search must not sync with the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        search()
        row["host_sync_free"] = True
    except RuntimeError as e:
        row["host_sync_free"] = False
        row["host_sync_error"] = str(e)[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the graphed search equals the eager one
    set_from_env("FLEXPREFILL_SELECTION_GRAPHS", "0")
    eager = search()
    set_from_env("FLEXPREFILL_SELECTION_GRAPHS", None)
    graphed = search()
    row["graphed_equals_eager"] = bool(torch.equal(eager.indices, graphed.indices) and torch.equal(eager.counts, graphed.counts))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    search()
    torch.cuda.synchronize()
    row["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    row["qkv_mb"] = (q.numel() + k.numel() + v.numel()) * 2 / 2**20
    # memory the cached graph keeps reserved (its private pool) between searches
    row["graph_pool_mb"] = cached_graph_pool_mb()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            search()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    kern = sorted((e for e in ka if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    row["top_kernels"] = [
        dict(name=e.key[:120], calls_per_search=e.count / 3, device_ms_per_search=e.device_time_total / 3e3) for e in kern[:25]
    ]
    row["device_ms_per_search_total"] = sum(e.device_time_total for e in kern if "cuda" not in e.key.lower()[:4]) / 3e3
    row["launches_per_search"] = sum(e.count for e in ka if e.device_time_total > 0 and e.key.startswith(("void", "triton", "_", "at::"))) / 3
    print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
    for t in row["top_kernels"][:12]:
        print(f"   {t['device_ms_per_search']:8.3f} ms  x{t['calls_per_search']:.0f}  {t['name']}", flush=True)
    return row


def main():
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    lens = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768,131072").split(",")]
    shapes = [tuple(int(x) for x in h.split("/")) for h in (sys.argv[2] if len(sys.argv) > 2 else f"{HQ}/{HKV}/{D}").split(",")]
    taus = [float(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "0.1,0").split(",")]
    rows = []
    for heads in shapes:
        for N in lens:
            for tau in taus:
                try:
                    rows.append(profile(N, tau, heads))
                except Exception as e:  # keep the other lengths
                    rows.append(dict(N=N, tau=tau, heads="/".join(map(str, heads)), error=f"{type(e).__name__}: {e}"))
                    print(rows[-1], flush=True)
                torch.cuda.empty_cache()
    name = "selection_profile.json" if len(sys.argv) <= 2 else f"selection_profile_{sys.argv[2].replace('/', '-').replace(',', '_')}.json"
    with open(os.path.join(out, name), "w") as f:
        json.dump(dict(env=env_stamp(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
