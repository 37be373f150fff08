"""FlexPrefill on the CPU against torch SDPA (causal), SmolLM2-135M's attention shape.

For each length and dtype: SDPA causal; FlexPrefill (search + attention, backend "torch",
what "auto" runs on the CPU) on structured inputs; and the attention alone at fixed
densities from random block tables.  Density is against the causal grid nb*(nb+1)/2.
Times are the best of ``--repeat`` runs (ms), SDPA and FlexPrefill interleaved in one
process (the machine may be shared: each round times every contender once).  Prints one JSON row per measurement and
writes them all to ``--out``.

    PYTHONPATH=src python benchmarks/cpu_attention.py --lengths 4096 8192 16384 --out cpu_attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time

import torch
import torch.nn.functional as F

from flexprefill import FlexPrefillConfig, select_blocks
from flexprefill.block_table import mask_to_selection
from flexprefill.ops import torch_attention
from flexprefill_tools.synthetic import structured_qkv


def _best(fns, repeat):
    """Best time (ms) of each function, timed in turns: one warm-up each, then ``repeat`` rounds."""
    for fn in fns:
        fn()
    best = [math.inf] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return [b * 1e3 for b in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], metavar=("HQ", "HKV", "D"))
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    Hq, Hkv, D = args.heads
    bs = args.block_size
    scale = 1 / math.sqrt(D)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    meta = dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, commit=commit, Hq=Hq, Hkv=Hkv, D=D, block_size=bs)
    rows = []

    def emit(**row):
        row = {**meta, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for N in args.lengths:
        nb = math.ceil(N / bs)
        for name in args.dtypes:
            dtype = getattr(torch, name)
            q, k, v = structured_qkv(1, N, Hq, Hkv, D, dtype=dtype, seed=N)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            cfg = FlexPrefillConfig(block_size=bs, min_seq_len=0, backend="torch")
            sel = select_blocks(q, k, config=cfg)

            def dense():
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

            def attend(s):
                return torch_attention.sparse_attention(q, k, v, s.counts, s.indices, block_size=bs, softmax_scale=scale)

            sdpa, search, att = _best([dense, lambda: select_blocks(q, k, config=cfg), lambda: attend(sel)], args.repeat)
            dens = sel.stats().density.mean().item()
            emit(N=N, dtype=name, inputs="structured", density=round(dens, 4), sdpa_ms=round(sdpa, 1),
                 search_ms=round(search, 1), attention_ms=round(att, 1), total_ms=round(search + att, 1),
                 speedup=round(sdpa / (search + att), 2), attention_speedup=round(sdpa / att, 2))
            g = torch.Generator().manual_seed(N)
            for d in args.densities:
                # a random causal table at this density, the diagonal always kept
                mask = torch.rand(1, Hq, nb, nb, generator=g) < d * (nb + 1) / nb
                mask |= torch.eye(nb, dtype=torch.bool)
                rsel = mask_to_selection(mask, block_size=bs, seq_len=N, query_aware=torch.zeros(1, Hq, dtype=torch.bool),
                                         js_distance=torch.zeros(1, Hq))
                sdpa_r, att = _best([dense, lambda: attend(rsel)], args.repeat)
                emit(N=N, dtype=name, inputs="random table", density=round(rsel.stats().density.mean().item(), 4),
                     sdpa_ms=round(sdpa_r, 1), attention_ms=round(att, 1), attention_speedup=round(sdpa_r / att, 2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
