"""GPU check of the block-sparse attention kernel: correctness and speed against cuDNN SDPA.

1. Correctness, bf16 and fp16, N in {1000, 4097, 16384, 131072}, D in {64, 128, 256}, random
   selections (~10%, ~50%) and the full causal one: an exact fp32 attention in plain torch on a
   sample of query blocks per head (so it stays cheap at 128k) against the kernel's rows and LSE.
2. Speed at N=131072 and 32768, bf16, Hq=32 Hkv=8: the kernel on vertical-slash-like
   selections (random column blocks + sink + diagonal) at 5-100% density, against dense causal
   SDPA through cuDNN and FlashAttention on the same inputs.  TFLOP/s counted on computed
   blocks (4*D per token pair; the causal diagonal block counts half).

Run:  python benchmarks/gpu_check_kernel.py   (writes $OUT/kernel_check.json, or ./out)
Without CUDA it runs a tiny smoke version under the Triton interpreter (code paths only).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from flexprefill.block_table import full_causal_selection  # noqa: E402
from flexprefill.ops.sparse_attention import sparse_attention_fwd_tuned  # noqa: E402
from flexprefill.ops.sparse_attention import sparse_attention  # noqa: E402
from harness import env_stamp  # noqa: E402
from flexprefill.block_table import compact_block_mask, num_causal_blocks  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
BS = 128
T0 = time.time()


def _stamp():
    stamp = env_stamp()
    if not CUDA:
        stamp["gpu"] = "cpu (interpreter smoke run)"
    return stamp


def _qkv(B, N, Hq, Hkv, D, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, N, Hq, D, generator=g, device=DEV, dtype=dtype)
    k = torch.randn(B, N, Hkv, D, generator=g, device=DEV, dtype=dtype)
    v = torch.randn(B, N, Hkv, D, generator=g, device=DEV, dtype=dtype)
    return q, k, v


def _causal(nb):
    r = torch.arange(nb, device=DEV)
    return r[None, :] <= r[:, None]


def random_selection(B, H, N, density, seed):
    """Each block kept with probability ``density`` (causal), plus the diagonal."""
    nb = math.ceil(N / BS)
    g = torch.Generator(device=DEV).manual_seed(seed)
    mask = torch.rand(B, H, nb, nb, generator=g, device=DEV) < density
    mask = (mask | torch.eye(nb, dtype=torch.bool, device=DEV)) & _causal(nb)
    return mask


def vertical_slash_selection(B, H, N, density, seed):
    """Per head, random column blocks (plus the sink) and the diagonal, like a vertical-slash head."""
    nb = math.ceil(N / BS)
    g = torch.Generator(device=DEV).manual_seed(seed)
    # a uniformly placed column covers about half the rows below the diagonal
    n_cols = max(0, min(nb, round(density * (nb + 1)) - 1))
    order = torch.rand(B, H, nb, generator=g, device=DEV).argsort(-1)
    cols = torch.zeros(B, H, nb, dtype=torch.bool, device=DEV).scatter_(-1, order[..., :n_cols], True)
    cols[..., 0] = True
    mask = (cols[:, :, None, :] | torch.eye(nb, dtype=torch.bool, device=DEV)) & _causal(nb)
    return mask


def computed_pairs(counts, N):
    """Token pairs computed, summed over heads (every row holds its diagonal in these selections):
    off-diagonal blocks in full, the causal diagonal block as half; the last block may be partial."""
    nb = counts.shape[-1]
    heads = counts.shape[0] * counts.shape[1]
    last = N - (nb - 1) * BS
    off = counts.sum().item() - heads * nb
    off_last = counts[..., -1].sum().item() - heads
    diag = (nb - 1) * BS * BS / 2 + last * last / 2
    pairs = (off - off_last) * BS * BS + off_last * last * BS + heads * diag
    return pairs, counts.sum().item() / (heads * num_causal_blocks(nb))


def check_correctness(N, Hq, Hkv, D, dtype, kind, rows, n_samples=8):
    B = 1
    q, k, v = _qkv(B, N, Hq, Hkv, D, dtype, seed=N + D)
    nb = math.ceil(N / BS)
    if kind == "full":
        counts, indices = full_causal_selection(B, Hq, N, BS, DEV)
        mask = _causal(nb).expand(B, Hq, nb, nb)
    else:
        mask = random_selection(B, Hq, N, {"d10": 0.1, "d50": 0.5}[kind], seed=N + D + 1)
        counts, indices = compact_block_mask(mask)
    scale = D**-0.5
    t = time.time()
    out, lse = sparse_attention(q, k, v, counts, indices, block_size=BS, softmax_scale=scale, return_lse=True)
    if CUDA:
        torch.cuda.synchronize()
    t_kernel = time.time() - t
    finite = bool(out.isfinite().all() and lse.isfinite().all())
    group = Hq // Hkv
    g = torch.Generator(device="cpu").manual_seed(N)
    pos = torch.arange(N, device=DEV)
    blk = pos // BS
    max_abs = max_abs_dtype = lse_err = rounding = 0.0
    num = den = 0.0
    for h in range(Hq):
        # always test the last (partial, longest) block, plus random ones
        r_s = torch.randperm(nb, generator=g)[: n_samples - 1].tolist()
        r_s = sorted(set(r_s + [nb - 1]))
        for r in r_s:
            lo, hi = r * BS, min((r + 1) * BS, N)
            allowed = mask[0, h, r][blk] & (pos[None, :] <= pos[lo:hi, None])  # [rows, N]
            kh, vh = k[0, :, h // group], v[0, :, h // group]
            s = (q[0, lo:hi, h].float() @ kh.float().T) * scale
            s = s.masked_fill(~allowed, float("-inf"))
            ref_lse = torch.logsumexp(s, -1)
            ref = torch.softmax(s, -1) @ vh.float()
            # the same rows computed by torch in the input dtype: the error scale of that dtype
            s_d = ((q[0, lo:hi, h] @ kh.T) * scale).float().masked_fill(~allowed, float("-inf"))
            pt = torch.softmax(s_d, -1).to(dtype) @ vh
            o = out[0, lo:hi, h].float()
            max_abs = max(max_abs, (o - ref).abs().max().item())
            max_abs_dtype = max(max_abs_dtype, (pt.float() - ref).abs().max().item())
            # the floor: the exact result rounded once to the output dtype
            rounding = max(rounding, (ref.to(dtype).float() - ref).abs().max().item())
            num += (o - ref).pow(2).sum().item()
            den += ref.pow(2).sum().item()
            lse_err = max(lse_err, (lse[0, h, lo:hi] - ref_lse).abs().max().item())
    rel = math.sqrt(num / max(den, 1e-30))
    row = dict(
        check="correctness", N=N, Hq=Hq, Hkv=Hkv, D=D, dtype=str(dtype).split(".")[-1], selection=kind,
        density=round(counts.sum().item() / (B * Hq * num_causal_blocks(nb)), 4), sampled_blocks_per_head=n_samples,
        max_abs_err=max_abs, torch_same_dtype_max_abs_err=max_abs_dtype, output_rounding_max_abs_err=rounding, rel_err=rel, lse_max_abs_err=lse_err,
        all_finite=finite, ok=bool(finite and max_abs <= 2 * max_abs_dtype + 1e-6 and lse_err < 1e-3),
        kernel_s=round(t_kernel, 4),
    )
    rows.append(row)
    print(
        f"[{time.time() - T0:6.1f}s] correct N={N:6d} D={D:3d} {row['dtype']:8s} {kind:4s} dens={row['density']:.3f} "
        f"max_abs={max_abs:.2e} (torch {row['dtype']} {max_abs_dtype:.2e}, rounding {rounding:.2e}) rel={rel:.2e} lse={lse_err:.2e} ok={row['ok']}",
        flush=True,
    )


def _bench(fn):
    if CUDA:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _sdpa_ms(q, k, v, scale, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[2] // k.shape[2]
    # cuDNN does not take grouped heads everywhere: give both backends full heads (copy not timed)
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def fn():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)

    return _bench(fn)


def check_speed(N, Hq, Hkv, D, densities, rows):
    B = 1
    dtype = torch.bfloat16 if CUDA else torch.float16
    q, k, v = _qkv(B, N, Hq, Hkv, D, dtype, seed=7 + D)
    scale = D**-0.5
    full_counts, _ = full_causal_selection(B, Hq, N, BS, DEV)
    dense_pairs, _ = computed_pairs(full_counts, N)
    dense_flops = 4 * D * dense_pairs
    base = {}
    for backend in ("cudnn", "flash"):
        try:
            ms = _sdpa_ms(q, k, v, scale, backend) if CUDA else float("nan")
            base[backend] = ms
            rows.append(dict(check="speed", impl=f"sdpa_{backend}", N=N, Hq=Hq, Hkv=Hkv, D=D, dtype="bf16", density=1.0,
                             ms=ms, tflops=dense_flops / ms / 1e9))
            print(f"[{time.time() - T0:6.1f}s] speed N={N} D={D} sdpa_{backend}: {ms:.3f} ms {dense_flops / ms / 1e9:.1f} TFLOP/s", flush=True)
        except Exception:
            base[backend] = float("nan")
            print(f"sdpa {backend} failed at N={N} D={D}:", flush=True)
            traceback.print_exc()
    for dens in densities:
        try:
            if dens >= 1.0:
                counts, indices = full_causal_selection(B, Hq, N, BS, DEV)
            else:
                counts, indices = compact_block_mask(vertical_slash_selection(B, Hq, N, dens, seed=N + int(dens * 1000)))
            pairs, real_density = computed_pairs(counts, N)
            flops = 4 * D * pairs

            def fn():
                return sparse_attention(q, k, v, counts, indices, block_size=BS, softmax_scale=scale)

            fn()  # autotunes on the first call of a (head dim, block size, dtype)
            ms = _bench(fn)
            tf = flops / ms / 1e9
            cudnn_tf = dense_flops / base["cudnn"] / 1e9
            best = sparse_attention_fwd_tuned[max(64, triton.next_power_of_2(D))].best_config
            row = dict(check="speed", impl="flexprefill_triton", N=N, Hq=Hq, Hkv=Hkv, D=D, dtype="bf16",
                       target_density=dens, density=round(real_density, 4), ms=ms, tflops=tf,
                       efficiency_vs_cudnn=tf / cudnn_tf if cudnn_tf == cudnn_tf else None,
                       speedup_vs_cudnn=base["cudnn"] / ms, speedup_vs_flash=base["flash"] / ms, config=str(best))
            rows.append(row)
            print(
                f"[{time.time() - T0:6.1f}s] speed N={N} D={D} density={real_density:.3f}: {ms:.3f} ms {tf:.1f} TFLOP/s "
                f"eff={row['efficiency_vs_cudnn']} speedup_vs_cudnn={row['speedup_vs_cudnn']:.2f} cfg={best}",
                flush=True,
            )
        except Exception:
            print(f"kernel timing failed at N={N} D={D} density={dens}:", flush=True)
            traceback.print_exc()


def main():
    stamp = _stamp()
    print(stamp, flush=True)
    rows = []
    if CUDA:
        dens = (0.05, 0.1, 0.2, 0.4, 0.6, 1.0)
        # timing first: the autotuner picks its bf16 config at a long length
        speed = [(32768, 32, 8, 128), (131072, 32, 8, 128), (131072, 32, 8, 64), (131072, 32, 8, 256)]
        correct = [(N, D) for N in (1000, 4097, 16384, 131072) for D in (64, 128, 256)]
    else:
        dens = (0.3, 1.0)
        speed = [(600, 4, 2, 64)]
        correct = [(300, 64), (1000, 64)]
    for N, Hq, Hkv, D in speed:
        try:
            check_speed(N, Hq, Hkv, D, dens, rows)
        except Exception:
            traceback.print_exc()
    dtypes = (torch.bfloat16, torch.float16) if CUDA else (torch.float16,)
    for N, D in correct:
        Hq, Hkv = (8, 2) if N > 20000 else ((32, 8) if CUDA else (4, 2))
        for dtype in dtypes:
            for kind in ("d10", "d50", "full"):
                try:
                    check_correctness(N, Hq, Hkv, D, dtype, kind, rows, n_samples=8 if CUDA else 2)
                except Exception:
                    print(f"correctness failed at N={N} D={D} {dtype} {kind}:", flush=True)
                    traceback.print_exc()
                if CUDA:
                    torch.cuda.empty_cache()
    for r in rows:
        r.update(stamp)
    out_dir = os.environ.get("OUT", "./out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "kernel_check.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)

    print("\n== correctness (sampled query blocks vs exact fp32) ==")
    print(f"{'N':>7} {'D':>4} {'dtype':>8} {'sel':>4} {'dens':>6} {'max_abs':>9} {'torch_dt':>9} {'round':>9} {'rel':>9} {'lse':>9} ok")
    for r in rows:
        if r["check"] == "correctness":
            print(f"{r['N']:7d} {r['D']:4d} {r['dtype']:>8} {r['selection']:>4} {r['density']:6.3f} {r['max_abs_err']:9.2e} "
                  f"{r['torch_same_dtype_max_abs_err']:9.2e} {r['output_rounding_max_abs_err']:9.2e} {r['rel_err']:9.2e} {r['lse_max_abs_err']:9.2e} {r['ok']}")
    print("\n== speed (bf16, ms median; TFLOP/s on computed blocks; eff = ours / cuDNN dense TFLOP/s) ==")
    print(f"{'N':>7} {'D':>4} {'impl':>19} {'dens':>6} {'ms':>9} {'TFLOP/s':>8} {'eff':>6} {'x cudnn':>8}")
    for r in rows:
        if r["check"] == "speed":
            eff = r.get("efficiency_vs_cudnn")
            eff_s = f"{eff:6.2f}" if isinstance(eff, float) else "     -"
            sp = r.get("speedup_vs_cudnn")
            sp_s = f"{sp:8.2f}" if isinstance(sp, float) else "       -"
            print(f"{r['N']:7d} {r['D']:4d} {r['impl']:>19} {r['density']:6.3f} {r['ms']:9.3f} {r['tflops']:8.1f} {eff_s} {sp_s}")
    n_bad = sum(1 for r in rows if r["check"] == "correctness" and not r["ok"])
    print(f"\nwrote {len(rows)} rows to {path}; correctness failures: {n_bad}; total {time.time() - T0:.0f}s")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
