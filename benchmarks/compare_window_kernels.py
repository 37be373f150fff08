"""Sliding-window attention on Hopper: the warp-specialised Gluon kernel against the Triton
kernel, same process, same inputs, alternating (JSON to $OUT or ./out).

Shapes: Gemma 3 270M's local layers (4/1/256, window 512), Mistral-7B (32/8/128, window 4096)
and a Llama-shaped layer with a 1024 window (32/8/128), bf16, N = 8k, 32k, 128k; per case the
median ms of ``flexprefill.sliding_window_attention`` (``do_bench``) with the default kernel
and with ``FLEXPREFILL_HOPPER_KERNEL=0``, the default's kernel (``kernel_name``: gluon-ws or
triton), and the largest difference between their outputs.
Usage: python benchmarks/compare_window_kernels.py [lengths]
"""

from __future__ import annotations

import json
import os
import sys

import torch
from triton.testing import do_bench

import flexprefill as fp
from harness import env_stamp
from flexprefill.ops.sparse_attention import kernel_name
from flexprefill.options import set_from_env

SHAPES = (("gemma3-270m-local", 4, 1, 256, 512), ("mistral-7b", 32, 8, 128, 4096), ("llama-w1024", 32, 8, 128, 1024))


def main():
    lens = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768,131072").split(",")]
    out = os.environ.get("OUT", "./out")
    os.makedirs(out, exist_ok=True)
    stamp = env_stamp()
    rows = []
    try:
        for name, Hq, Hkv, D, w in SHAPES:
            for N in lens:
                g = torch.Generator(device="cuda").manual_seed(N + D)
                q = torch.randn(1, N, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
                k = torch.randn(1, N, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
                v = torch.randn(1, N, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
                fn = lambda: fp.sliding_window_attention(q, k, v, window=w)  # noqa: E731
                res = {}
                for _ in range(2):  # A B A B: the second round is the one reported
                    for label, flag in (("default", None), ("triton", "0")):
                        if flag is None:
                            set_from_env("FLEXPREFILL_HOPPER_KERNEL", None)
                        else:
                            set_from_env("FLEXPREFILL_HOPPER_KERNEL", flag)
                        o = fn()
                        res[label] = dict(ms=do_bench(fn, warmup=10, rep=200), out=o,
                                          kernel=kernel_name(q, k, v, 128, packed_or_windowed=True))
                set_from_env("FLEXPREFILL_HOPPER_KERNEL", None)
                diff = float((res["default"]["out"].float() - res["triton"]["out"].float()).abs().max())
                row = dict(shape=name, Hq=Hq, Hkv=Hkv, D=D, window=w, N=N, default_kernel=res["default"]["kernel"],
                           default_ms=res["default"]["ms"], triton_ms=res["triton"]["ms"],
                           speedup_default_vs_triton=res["triton"]["ms"] / res["default"]["ms"], max_abs_diff=diff, **stamp)
                rows.append(row)
                print(f"{name:18s} N={N:7d} w={w:5d} {row['default_kernel']:6s} {row['default_ms']:8.3f} ms  triton "
                      f"{row['triton_ms']:8.3f} ms  x{row['speedup_default_vs_triton']:.2f}  diff {diff:.4f}", flush=True)
                del q, k, v, res
    finally:
        set_from_env("FLEXPREFILL_HOPPER_KERNEL", None)
        path = os.path.join(out, f"compare_window_kernels_{stamp.get('commit', 'unknown')}.json")
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
