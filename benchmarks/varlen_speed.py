"""Speed of the varlen / chunked-prefill path on a GPU (JSON to $OUT or ./out).

bf16, Llama-8B heads 32/8/128, structured inputs; triton.testing.do_bench median, ms;
FlexPrefill time includes the pattern search (correctness: tests/test_gpu_checks_varlen.py).
  1. a batch of mixed lengths (4k..64k, 256k tokens): FlexPrefill varlen vs dense
     (torch.nn.attention.varlen.varlen_attn when this torch has it, FlashAttention inside;
     and cuDNN SDPA per sequence, summed);
  2. chunked prefill of a 128k prompt in 8k chunks (16 calls, each chunk over the whole
     cached prefix): FlexPrefill vs dense chunked (varlen_attn when present, bottom-right
     causal; and FlexPrefill's own kernel with gamma=1, i.e. every block), with cuDNN SDPA
     on the whole 128k at once as the reference point.
Each row carries GPU, torch, triton and the commit (env FLEXPREFILL_COMMIT, else git).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import flexprefill as fp
from flexprefill_tools.synthetic import structured_qkv

HQ, HKV, D = 32, 8, 128
BF16 = torch.bfloat16
ROWS: list[dict] = []


def _stamp() -> dict:
    commit = os.environ.get("FLEXPREFILL_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            commit = "unknown"
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, commit=commit)


STAMP: dict = {}


def row(**kw):
    r = {**STAMP, **kw}
    ROWS.append(r)
    print(json.dumps(r), flush=True)


def _cu(lens):
    return torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device="cuda")


def _seq(n, seed):
    q, k, v = structured_qkv(1, n, HQ, HKV, D, seed=seed, dtype=BF16, device="cuda")
    return q[0], k[0], v[0]


def _bench(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def _sdpa_cudnn(q, k, v, scale):
    """cuDNN SDPA of one whole sequence [n, H, D] (causal, GQA by repetition)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = HQ // HKV
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=scale)
    return o[0].transpose(0, 1)


def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn as a causal (bottom-right) GQA call, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    params = inspect.signature(varlen_attn).parameters
    kw = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        return None
    gqa = "enable_gqa" in params
    if gqa:
        kw["enable_gqa"] = True

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        if not gqa:
            k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        extra = dict(scale=scale) if "scale" in params else {}
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw, **extra)

    call.desc = f"torch.nn.attention.varlen.varlen_attn({', '.join(f'{a}={b}' for a, b in kw.items())}, gqa={'native' if gqa else 'repeat'})"
    return call


def case(name):
    def deco(fn):
        def run():
            t0 = time.time()
            try:
                fn()
            except Exception as e:  # one failing case must not stop the others
                row(case=name, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
            print(f"# {name}: {time.time() - t0:.1f}s", flush=True)
            torch.cuda.empty_cache()

        return run

    return deco


def _mixed_lens():
    return [65536, 49152, 32768, 32768, 24576, 16384, 16384, 8192, 8192, 4096, 4096]


@case("speed_mixed_batch")
def speed_mixed():
    lens = _mixed_lens()
    seqs = [_seq(n, seed=100 + i) for i, n in enumerate(lens)]
    q, k, v = (torch.cat([s[i] for s in seqs]) for i in range(3))
    del seqs
    cu, mx = _cu(lens), max(lens)
    scale = D**-0.5
    cfg = fp.FlexPrefillConfig()
    flex = lambda: fp.flex_prefill_attention_varlen(q, k, v, cu, cu, mx, mx, config=cfg)  # noqa: E731
    _, st = fp.flex_prefill_attention_varlen(q, k, v, cu, cu, mx, mx, config=cfg, return_stats=True)
    sel_only = lambda: fp.select_blocks_varlen(q, k, cu, cu, mx, mx, config=cfg)  # noqa: E731
    full = lambda: fp.flex_prefill_attention_varlen(q, k, v, cu, cu, mx, mx, config=cfg.replace(gamma=1.0))  # noqa: E731
    offs = cu.tolist()
    per_seq = lambda: [_sdpa_cudnn(q[a:b], k[a:b], v[a:b], scale) for a, b in zip(offs[:-1], offs[1:])]  # noqa: E731
    t_flex, t_sel, t_full, t_cudnn = _bench(flex), _bench(sel_only), _bench(full), _bench(per_seq)
    r = dict(case="speed_mixed_batch", lens=lens, total=sum(lens), heads=f"{HQ}/{HKV}/{D}",
             flexprefill_ms=t_flex, selection_ms=t_sel, flexprefill_gamma1_ms=t_full, cudnn_sdpa_per_seq_ms=t_cudnn,
             density_mean=st.density.mean().item())
    tv = _torch_varlen()
    if tv is not None:
        try:
            r["torch_varlen_ms"] = _bench(lambda: tv(q, k, v, cu, cu, mx, mx, scale))
            r["torch_varlen"] = tv.desc
        except Exception as e:
            r["torch_varlen_error"] = f"{type(e).__name__}: {e}"
    best = min(x for x in (t_cudnn, r.get("torch_varlen_ms", float("inf"))))
    r["speedup_vs_best_dense"] = best / t_flex
    row(**r)


@case("speed_chunked_128k")
def speed_chunked():
    N, C = 131072, 8192
    q, k, v = _seq(N, seed=200)
    scale = D**-0.5
    n = N // C
    cfg = fp.FlexPrefillConfig()
    one = _cu([C])
    cus = [_cu([(i + 1) * C]) for i in range(n)]

    def chunked(c):
        return [fp.flex_prefill_attention_varlen(q[i * C : (i + 1) * C], k[: (i + 1) * C], v[: (i + 1) * C], one, cus[i], C, (i + 1) * C, config=c) for i in range(n)]

    t_flex = _bench(lambda: chunked(cfg))
    t_g1 = _bench(lambda: chunked(cfg.replace(gamma=1.0)))
    t_whole = _bench(lambda: _sdpa_cudnn(q, k, v, scale))
    t_flex_whole = _bench(lambda: fp.flex_prefill_attention(q[None], k[None], v[None], config=cfg))
    r = dict(case="speed_chunked_128k", N=N, chunk=C, flexprefill_chunked_ms=t_flex, flexprefill_gamma1_chunked_ms=t_g1,
             cudnn_sdpa_whole_ms=t_whole, flexprefill_whole_ms=t_flex_whole)
    tv = _torch_varlen()
    if tv is not None:
        try:
            t_tv = _bench(lambda: [tv(q[i * C : (i + 1) * C], k[: (i + 1) * C], v[: (i + 1) * C], one, cus[i], C, (i + 1) * C, scale) for i in range(n)])
            r["torch_varlen_chunked_ms"] = t_tv
            r["torch_varlen"] = tv.desc
        except Exception as e:
            r["torch_varlen_error"] = f"{type(e).__name__}: {e}"
    r["speedup_vs_dense_chunked"] = min(t_g1, r.get("torch_varlen_chunked_ms", float("inf"))) / t_flex
    row(**r)


def main():
    STAMP.update(_stamp())
    out_dir = os.environ.get("OUT", "./out")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    for fn in (speed_mixed, speed_chunked):
        fn()
    with open(os.path.join(out_dir, "varlen_speed.json"), "w") as f:
        json.dump(ROWS, f, indent=1)
    print(f"# total {time.time() - t0:.1f}s, {len(ROWS)} rows -> {out_dir}/varlen_speed.json")


if __name__ == "__main__":
    main()
