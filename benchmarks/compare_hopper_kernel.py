"""The Gluon kernel for Hopper against the Triton kernel on the same fixed selections (JSON to $OUT).

For head dims 128, 64, 256 (32 query / 8 KV heads, bf16, block size 128) at N (default
131072) and the suite's random selections (5-60% of the causal blocks, int16 block ids as
the operator passes them), plus 82% at 32k for head dim 128 (the density of the random-input
Llama rows of the suite): cuDNN dense SDPA, the autotuned Triton kernel, the tiled Gluon
kernel with each of its tile configs and autotuned, and the warp-specialised Gluon kernel
(its default config, then with ping-pong switched, then with the tile schedule switched
between counter and fixed stride).  Each row: ms, efficiency (TFLOP/s on the computed blocks
over cuDNN's), and the largest |difference| of each Gluon output from the Triton kernel's.
Usage: python benchmarks/compare_hopper_kernel.py [N] [head dims] [configs]
configs: Gluon tile configs to try besides the kernel's own, comma-separated
BLOCK_MxBLOCK_N[sSTAGES][rMAXNREG], e.g. 128x64s2r128 (register cap 128 per thread: two CTAs
of 8 warps per SM; the warps are always BLOCK_M / 16, one warpgroup per 64 rows); a config
that does not fit a head dim's shared memory is skipped.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from triton.testing import do_bench

from harness import EFFICIENCY_DENSITIES, causal_density, efficiency_cases, env_stamp
from flexprefill.ops.sparse_attention import _launch
from flexprefill.ops.sparse_attention_hopper import hopper_configs, ws_configs
from flexprefill.options import set_from_env

BS = 128


def _cases(N, dims):
    for D in dims:
        yield D, N, EFFICIENCY_DENSITIES
        if D == 128 and N != 32768:
            yield D, 32768, (0.82,)


def _parse_configs(text):
    configs = []
    for item in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)x(\d+)(?:s(\d+))?(?:r(\d+))?", item.strip())
        if not m:
            raise SystemExit(f"configs: cannot read {item!r}; expected e.g. 128x64s2r128")
        bm, bn, st, r = m.groups()
        c = dict(BLOCK_M=int(bm), BLOCK_N=int(bn), STAGES=int(st or 2), num_warps=int(bm) // 16)
        if r:
            c["maxnreg"] = int(r)
        configs.append(c)
    return configs


def _name(c):
    return "gluon_{BLOCK_M}x{BLOCK_N}_s{STAGES}_w{num_warps}".format(**c) + (f"_r{c['maxnreg']}" if c.get("maxnreg") else "")


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
    dims = [int(d) for d in sys.argv[2].split(",")] if len(sys.argv) > 2 else [128, 64, 256]
    extra_configs = _parse_configs(sys.argv[3]) if len(sys.argv) > 3 else []
    out_dir = os.environ.get("OUT", "./out")
    os.makedirs(out_dir, exist_ok=True)
    stamp = env_stamp()
    path = os.path.join(out_dir, f"hopper_kernel_{stamp.get('commit', 'unknown')}.json")
    rows = []
    t0 = time.time()
    for D, n, densities in _cases(N, dims):
        for case in efficiency_cases((D,), n, densities):
            q, k, v, counts, idx, scale = (case[x] for x in ("q", "k", "v", "counts", "idx", "scale"))
            flops, base_ms, base_tf = case["flops"], case["cudnn_ms"], case["cudnn_tflops"]
            kw = dict(block_size=BS, softmax_scale=scale, return_lse=False)
            # FLEXPREFILL_HOPPER_KERNEL picks the kernel of the untuned calls: 0 Triton, 1 Gluon
            set_from_env("FLEXPREFILL_HOPPER_KERNEL", "0")
            ref = _launch(q, k, v, counts, idx, **kw)  # the Triton kernel (autotunes once per length class)
            variants = {"triton": dict(_env="0"), "gluon_tuned": dict(_env="1")}
            for c in hopper_configs(D, BS) + hopper_configs(D, BS, extra_configs):
                variants[_name(c)] = dict(hopper_config=c)
            # the warp-specialised persistent kernel: its default, with ping-pong, with a fixed stride
            for c in ws_configs(D, BS):
                name = f"ws_n{c['BLOCK_N']}_s{c['STAGES']}_q{c['Q_STAGES']}"
                variants[name] = dict(hopper_config=dict(c, kernel="ws"))
                variants[name + "_pingpong"] = dict(hopper_config=dict(c, kernel="ws", PINGPONG=not c["PINGPONG"]))
                variants[name + "_stride"] = dict(hopper_config=dict(c, kernel="ws", DYNAMIC=not c["DYNAMIC"]))
            r = dict(D=D, N=n, density=causal_density(counts), cudnn_ms=base_ms, cudnn_tflops=base_tf, **stamp)
            for name, extra in variants.items():
                extra = dict(extra)
                set_from_env("FLEXPREFILL_HOPPER_KERNEL", extra.pop("_env", "0"))
                try:
                    fn = lambda: _launch(q, k, v, counts, idx, **kw, **extra)  # noqa: E731
                    o = fn()
                    ms = do_bench(fn, warmup=3, rep=60)
                    r[f"ms_{name}"] = ms
                    r[f"efficiency_{name}"] = flops / (ms * 1e-3) / 1e12 / base_tf
                    r[f"maxdiff_{name}"] = (o.float() - ref.float()).abs().max().item()
                except Exception as e:  # a config that fails to compile or launch is reported, not fatal
                    r[f"error_{name}"] = f"{type(e).__name__}: {str(e)[:300]}"
                finally:
                    set_from_env("FLEXPREFILL_HOPPER_KERNEL", None)
            rows.append(r)
            eff = {k[len("efficiency_"):]: round(v, 3) for k, v in r.items() if k.startswith("efficiency_")}
            errs = [k for k in r if k.startswith("error_")]
            diff = max((v for k, v in r.items() if k.startswith("maxdiff_")), default=0.0)
            print(f"  density {r['density']:.3f}: {eff} maxdiff {diff:.3g} {errs} ({time.time() - t0:.0f} s)",
                  flush=True)
            with open(path, "w") as f:
                json.dump(rows, f, indent=1)
            q = k = v = counts = idx = ref = case = None


if __name__ == "__main__":
    main()
