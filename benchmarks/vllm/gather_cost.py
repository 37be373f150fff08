"""What the vLLM backend's gather of a sequence's paged K/V into a contiguous buffer costs, at
32k and 128k, against the FlexPrefill operator that then reads it.  Writes JSON.

    python benchmarks/vllm/gather_cost.py --out OUT/gather.json [--lengths 32k,128k] [--page 16]

Per shape (K/V heads, head dim) and length: the gather's time (Triton kernel and torch
indexing; triton.testing.do_bench median), the bytes it writes (K and V: 2 * N * Hkv * D * 2),
its peak extra memory (torch.cuda.max_memory_allocated over the call), and the time of
flex_prefill_attention_varlen over the gathered K/V for a prefill chunk of ``--chunk`` queries
at the end of the sequence (the step that needs the gather), so the gather's share is visible.
The pages of the sequence are a random permutation of the cache's pages, as after vLLM has run
for a while.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_report  # noqa: E402

SHAPES = {  # name: (query heads, K/V heads, head dim)
    "llama3.1-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
    "gemma3-270m": (4, 1, 256),
}


def _len(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def main(argv=None) -> int:
    import triton

    import flexprefill as fp
    from flexprefill.ops.paged_kv import gather_paged_kv

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="32k,128k")
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for name in args.shapes.split(","):
        Hq, Hkv, D = SHAPES[name]
        for N in (_len(x) for x in args.lengths.split(",")):
            P = args.page
            n_pages = math.ceil(N / P)
            cache = torch.randn(n_pages + 8, 2, P, Hkv, D, device=dev, dtype=torch.bfloat16)
            kc, vc = cache.unbind(1)
            bt = (torch.randperm(n_pages + 7, device=dev)[:n_pages] + 1).to(torch.int32)[None]
            seq = torch.tensor([N], dtype=torch.int32, device=dev)
            cu = torch.tensor([0, N], dtype=torch.int32, device=dev)
            row = dict(shape=name, N=N, page=P, Hkv=Hkv, D=D, bytes_written=2 * N * Hkv * D * 2)
            for backend in ("triton", "torch"):
                fn = lambda: gather_paged_kv(kc, vc, bt, seq, cu, total_k=N, max_seqlen_k=N, backend=backend)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                k, v = fn()
                torch.cuda.synchronize()
                row[f"{backend}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
                del k, v
                row[f"{backend}_ms"] = triton.testing.do_bench(fn, warmup=25, rep=100)
                row[f"{backend}_GBps"] = row["bytes_written"] * 2 / row[f"{backend}_ms"] / 1e6
            k, v = gather_paged_kv(kc, vc, bt, seq, cu, total_k=N, max_seqlen_k=N)
            n_q = min(args.chunk, N)
            q = torch.randn(n_q, Hq, D, device=dev, dtype=torch.bfloat16)
            cu_q = torch.tensor([0, n_q], dtype=torch.int32, device=dev)
            cfg = fp.FlexPrefillConfig(min_seq_len=0)
            op = lambda: fp.flex_prefill_attention_varlen(q, k, v, cu_q, cu, n_q, N, config=cfg)  # noqa: E731
            op()
            row["flexprefill_chunk_ms"] = triton.testing.do_bench(op, warmup=10, rep=50)
            row["chunk"] = n_q
            row["gather_share_of_step"] = row["triton_ms"] / (row["triton_ms"] + row["flexprefill_chunk_ms"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            del cache, kc, vc, k, v, q
            torch.cuda.empty_cache()
    report = {"rows": rows}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
