"""One block-sparse kernel case for Nsight Compute (GPU): ``ncu ... python benchmarks/ncu_kernel.py D N DENSITY``.

Runs our kernel on a fixed random selection (32 query / 8 KV heads, bf16, block 128) at the
given head dim, length and density with the config the autotuner picks at 128k (fixed here,
so no tuning launches): one warm-up, then three launches; ``benchmarks/gpu_pass.sh ncu``
profiles the third launch.  With
``--dense`` it runs cuDNN SDPA on the same inputs instead (the reference profile).
"""

from __future__ import annotations

import sys

import torch

from harness import make_dense_fn, random_qkv, random_selection
from flexprefill.ops.sparse_attention import _launch

# the fastest tile per head dim at 128k on the H200 (docs/results.md)
BEST = {64: (128, 128, 4, 3), 128: (128, 128, 8, 2), 256: (128, 64, 8, 2)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dense = "--dense" in argv
    argv = [a for a in argv if a != "--dense"]
    D = int(argv[0]) if argv else 128
    N = int(argv[1]) if len(argv) > 1 else 131072
    density = float(argv[2]) if len(argv) > 2 else 0.05
    q, k, v = random_qkv(1, N, 32, 8, D, seed=0, device="cuda")
    scale = D**-0.5
    if dense:
        fn, _ = make_dense_fn("cudnn", q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                              v.transpose(1, 2).contiguous(), scale=scale)
    else:
        sel = random_selection(1, 32, N, block_size=128, density=density, device="cuda", seed=0)
        bm, bn, w, st = BEST[D]
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        fn = lambda: _launch(q, k, v, sel.counts, sel.indices, block_size=128, softmax_scale=scale,  # noqa: E731
                             return_lse=False, config=cfg)
    fn()  # compile
    torch.cuda.synchronize()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    print(f"ran {'cuDNN' if dense else 'sparse kernel'} D={D} N={N} density={density}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
