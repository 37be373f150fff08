"""Timing of variants of the pattern search's parts at one length (run on a CUDA machine).

Llama-3.1-8B layer shape (32/8/128, bf16, structured synthetic inputs), tau 0.1 (query-aware
heads on) and 0: the whole search with the set assembly as one Triton pass per row or as the
PyTorch ops it replaced, with the split combine as one Triton launch or as torch ops; for
each, the median time (do_bench), the host time to enqueue one search (GPU drained first;
a host-bound search shows host ~ device) and whether the selections are equal.  Then the sorts alone at the shapes the ranking uses.  JSON to
$OUT/search_parts.json.

    python benchmarks/profile_search_parts.py [N]
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from triton.testing import do_bench

import flexprefill as fp
from harness import env_stamp
from flexprefill_tools.synthetic import structured_qkv
from flexprefill import search as S
from flexprefill.search import block_sets, scores

HQ, HKV, D = 32, 8, 128


def _host_ms(fn, reps: int = 10) -> float:
    """Median host milliseconds to enqueue ``fn`` (GPU drained before each call)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    q, k, v = structured_qkv(1, N, HQ, HKV, D, seed=N, dtype=torch.bfloat16, device="cuda", generate_on="device")
    scale = D**-0.5
    rows = []
    combine = scores._combine
    for tau in (0.1, 0.0):
        cfg = fp.FlexPrefillConfig(tau=tau)
        search = lambda cfg=cfg: S.select_blocks_fast(q, k, config=cfg, softmax_scale=scale)  # noqa: E731
        ref = None
        for fused in (True, False):
            for triton_combine in (True, False):
                block_sets._FUSED_ASSEMBLY = fused
                scores._combine = combine if triton_combine else scores._combine_splits
                sel = search()
                if ref is None:
                    ref = sel
                row = dict(N=N, tau=tau, fused_assembly=fused, triton_combine=triton_combine,
                           ms=do_bench(search, warmup=3, rep=100), host_ms=_host_ms(search),
                           equal=bool(torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts)),
                           qa_heads=int(sel.query_aware.sum()))
                rows.append(row)
                print(json.dumps(row), flush=True)
    block_sets._FUSED_ASSEMBLY, scores._combine = True, combine
    nb = (N + 127) // 128
    tri = nb * (nb + 1) // 2
    sorts = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((4, tri), (4, nb * nb), (1, 4 * tri), (1, tri), (32, tri)):
        x = torch.rand(shape, device="cuda", generator=g)
        f = lambda x=x: torch.sort(x, dim=-1, descending=True, stable=True)  # noqa: E731
        r = dict(shape=list(shape), device_ms=do_bench(f, warmup=3, rep=50), host_ms=_host_ms(f))
        sorts.append(r)
        print(json.dumps(r), flush=True)
    tri_flat = torch.tril_indices(nb, nb, device="cuda")
    tri_flat = tri_flat[0] * nb + tri_flat[1]
    x = torch.rand(4, nb * nb, device="cuda", generator=g)
    kept = torch.rand(4, tri, device="cuda", generator=g) < 0.1
    parts = dict(
        index_select_ms=do_bench(lambda: x.index_select(1, tri_flat), warmup=3, rep=50),
        index_copy_ms=do_bench(lambda: torch.zeros(4, nb * nb, dtype=torch.bool, device="cuda").index_copy_(1, tri_flat, kept), warmup=3, rep=50),
        tril_indices_ms=do_bench(lambda: torch.tril_indices(nb, nb, device="cuda"), warmup=3, rep=50),
    )
    print(json.dumps(parts), flush=True)
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"search_parts_{N}.json"), "w") as fh:
        json.dump(dict(env=env_stamp(), rows=rows, sorts=sorts, parts=parts), fh, indent=1)


if __name__ == "__main__":
    main()
