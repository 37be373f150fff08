"""The block-sparse attention kernel at long lengths, against an exact fp32 attention.

N in {1000, 4097, 16384, 131072}, D in {64, 128, 256}, bf16 and fp16, random selections
(~10% and ~50% of the causal blocks, plus the diagonal) and the full causal one.  The exact
attention is computed in plain fp32 torch on a sample of query blocks per head (the last,
partial block always among them), so it stays cheap at 128k.  Tolerance: the kernel's max
error may be at most twice that of the same rows computed by torch in the input dtype (plus
1e-6), the LSE within 1e-3, and every output and LSE value finite.

Six small fp16 cases (N 300 and 1000) also run on the CPU in the Triton interpreter (code paths only).
"""

import math

import pytest
import torch

from flexprefill.block_table import compact_block_mask, full_causal_selection
from flexprefill.ops.sparse_attention import sparse_attention

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BS = 128
BF16, F16 = torch.bfloat16, torch.float16
DENSITY = {"d10": 0.1, "d50": 0.5}


def _qkv(B, N, Hq, Hkv, D, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, N, Hq, D, generator=g, device=DEV, dtype=dtype)
    k = torch.randn(B, N, Hkv, D, generator=g, device=DEV, dtype=dtype)
    v = torch.randn(B, N, Hkv, D, generator=g, device=DEV, dtype=dtype)
    return q, k, v


def _causal(nb):
    r = torch.arange(nb, device=DEV)
    return r[None, :] <= r[:, None]


def _random_selection(B, H, N, density, seed):
    """Each block kept with probability ``density`` (causal), plus the diagonal."""
    nb = math.ceil(N / BS)
    g = torch.Generator(device=DEV).manual_seed(seed)
    mask = torch.rand(B, H, nb, nb, generator=g, device=DEV) < density
    return (mask | torch.eye(nb, dtype=torch.bool, device=DEV)) & _causal(nb)


def _cases():
    cases = []
    for N in (1000, 4097, 16384, 131072):
        Hq, Hkv = (8, 2) if N > 20000 else (32, 8)
        for D in (64, 128, 256):
            for dtype, dname in ((BF16, "bf16"), (F16, "fp16")):
                for kind in ("d10", "d50", "full"):
                    marks = [pytest.mark.gpu] + ([pytest.mark.slow] if N > 20000 else [])
                    cases.append(pytest.param(N, Hq, Hkv, D, dtype, kind, 8, marks=marks,
                                              id=f"N{N}-H{Hq}/{Hkv}-D{D}-{dname}-{kind}"))
    # the interpreter's smoke cases (fp16: bf16 tl.dot is wrong under the interpreter)
    for N in (300, 1000):
        for kind in ("d10", "d50", "full"):
            marks = [pytest.mark.slow] if N > 300 else []
            cases.append(pytest.param(N, 4, 2, 64, F16, kind, 2, marks=marks, id=f"N{N}-H4/2-D64-fp16-{kind}"))
    return cases


@pytest.mark.parametrize("N,Hq,Hkv,D,dtype,kind,n_samples", _cases())
def test_kernel_matches_exact_attention_on_sampled_blocks(N, Hq, Hkv, D, dtype, kind, n_samples):
    B = 1
    q, k, v = _qkv(B, N, Hq, Hkv, D, dtype, seed=N + D)
    nb = math.ceil(N / BS)
    if kind == "full":
        counts, indices = full_causal_selection(B, Hq, N, BS, DEV)
        mask = _causal(nb).expand(B, Hq, nb, nb)
    else:
        mask = _random_selection(B, Hq, N, DENSITY[kind], seed=N + D + 1)
        counts, indices = compact_block_mask(mask)
    scale = D**-0.5
    out, lse = sparse_attention(q, k, v, counts, indices, block_size=BS, softmax_scale=scale, return_lse=True)
    assert out.isfinite().all() and lse.isfinite().all(), "non-finite output or LSE"
    group = Hq // Hkv
    g = torch.Generator(device="cpu").manual_seed(N)
    pos = torch.arange(N, device=DEV)
    blk = pos // BS
    max_abs = max_abs_dtype = lse_err = 0.0
    for h in range(Hq):
        # always test the last (partial, longest) block, plus random ones
        r_s = torch.randperm(nb, generator=g)[: n_samples - 1].tolist()
        r_s = sorted(set(r_s + [nb - 1]))
        kh, vh = k[0, :, h // group], v[0, :, h // group]
        for r in r_s:
            lo, hi = r * BS, min((r + 1) * BS, N)
            allowed = mask[0, h, r][blk] & (pos[None, :] <= pos[lo:hi, None])  # [rows, N]
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
            lse_err = max(lse_err, (lse[0, h, lo:hi] - ref_lse).abs().max().item())
    assert max_abs <= 2 * max_abs_dtype + 1e-6, f"max abs error {max_abs:.3e} > 2 x torch {dtype}'s {max_abs_dtype:.3e}"
    assert lse_err < 1e-3, f"LSE max abs error {lse_err:.3e}"
