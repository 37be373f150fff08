"""Packed sequences and chunked prefill on a GPU at long lengths (bf16, Llama-8B heads 32/8/128,
structured inputs).

1. A packed batch of mixed lengths (two below min_seq_len, so dense) equals each sequence alone.
2. Chunked prefill (N=32k in 8k chunks, one packed call and one call per chunk) equals the full
   prefill at gamma=1 and cuDNN SDPA; at gamma=0.9 the packed and per-chunk calls agree and
   both stay close to dense.
3. torch's own varlen attention (when this torch has it) agrees with FlexPrefill at gamma=1, on
   a mixed batch of 256k tokens and on the last 8k chunk of a 128k prompt.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

import flexprefill as fp
from flexprefill_tools.synthetic import structured_qkv

pytestmark = pytest.mark.gpu

HQ, HKV, D = 32, 8, 128
BF16 = torch.bfloat16


def _cu(lens):
    return torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device="cuda")


def _seq(n, seed):
    q, k, v = structured_qkv(1, n, HQ, HKV, D, seed=seed, dtype=BF16, device="cuda")
    return q[0], k[0], v[0]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _sdpa_cudnn(q, k, v, scale):
    """cuDNN SDPA of one whole sequence [n, H, D] (causal, GQA by repetition)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = HQ // HKV
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=scale)
    return o[0].transpose(0, 1)


def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn as a causal (bottom-right) GQA call; skips without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn")
    params = inspect.signature(varlen_attn).parameters
    kw = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        pytest.skip("varlen_attn takes neither is_causal nor window_size")
    gqa = "enable_gqa" in params
    if gqa:
        kw["enable_gqa"] = True

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        if not gqa:
            k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        extra = dict(scale=scale) if "scale" in params else {}
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw, **extra)

    return call


def test_varlen_equals_each_sequence_alone_bf16():
    lens = [16384, 3000, 9000, 130, 12345]
    seqs = [_seq(n, seed=i) for i, n in enumerate(lens)]
    q, k, v = (torch.cat([s[i] for s in seqs]) for i in range(3))
    cu = _cu(lens)
    cfg = fp.FlexPrefillConfig(min_seq_len=8192)  # the 3000 and 130 sequences run dense
    out, lse, st = fp.flex_prefill_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), config=cfg, return_lse=True, return_stats=True)
    for s, (sq, sk, sv) in enumerate(seqs):
        o1, l1, st1 = fp.flex_prefill_attention(sq[None], sk[None], sv[None], config=cfg, return_lse=True, return_stats=True)
        rows = slice(int(cu[s]), int(cu[s + 1]))
        rel = _rel(out[rows], o1[0])
        assert rel < 1e-2, f"n={lens[s]}: rel error {rel:.2e} against the sequence alone"
        lse_err = (lse[:, rows] - l1[0]).abs().max().item()
        assert lse_err < 1e-2, f"n={lens[s]}: LSE differs by {lse_err:.2e}"
        d_var, d_alone = st.density[s].mean().item(), st1.density[0].mean().item()
        assert abs(d_var - d_alone) < 1e-3, f"n={lens[s]}: density {d_var:.4f} packed, {d_alone:.4f} alone"
        if lens[s] < cfg.min_seq_len:
            assert d_var == 1.0, f"n={lens[s]} is below min_seq_len and should run dense"
        else:
            assert d_var < 1.0, f"n={lens[s]} should be sparse"


@pytest.mark.parametrize("gamma", [pytest.param(1.0, id="gamma1"), pytest.param(0.9, id="gamma0.9")])
def test_chunked_prefill_32k_in_8k_chunks(gamma):
    N, C = 32768, 8192
    q, k, v = _seq(N, seed=7)
    scale = D**-0.5
    cfg = fp.FlexPrefillConfig(gamma=gamma, min_seq_len=0)
    full, full_lse = fp.flex_prefill_attention(q[None], k[None], v[None], config=cfg, return_lse=True)
    # all four chunks in one packed call, each over its whole prefix
    n = N // C
    kp = torch.cat([k[: (i + 1) * C] for i in range(n)])
    vp = torch.cat([v[: (i + 1) * C] for i in range(n)])
    out, lse = fp.flex_prefill_attention_varlen(q, kp, vp, _cu([C] * n), _cu([(i + 1) * C for i in range(n)]), C, N, config=cfg, return_lse=True)
    # one call per chunk, as an engine runs them
    seq_out = torch.cat([
        fp.flex_prefill_attention_varlen(q[i * C : (i + 1) * C], k[: (i + 1) * C], v[: (i + 1) * C], _cu([C]), _cu([(i + 1) * C]), C, (i + 1) * C, config=cfg)
        for i in range(n)
    ])
    dense = _sdpa_cudnn(q, k, v, scale)
    assert out.isfinite().all() and seq_out.isfinite().all() and lse.isfinite().all()
    # a packed call is its sequences run alone
    rel = _rel(seq_out, out)
    assert rel < 1e-2, f"per-chunk calls vs the packed call: rel error {rel:.2e}"
    if gamma == 1.0:
        # every block: chunked prefill is the full prefill, and dense attention
        assert _rel(out, full[0]) < 1e-2, _rel(out, full[0])
        assert (lse - full_lse[0]).abs().max().item() < 1e-2
        assert _rel(seq_out, full[0]) < 1e-2, _rel(seq_out, full[0])
        assert _rel(out, dense) < 1e-2, _rel(out, dense)
        assert _rel(full[0], dense) < 1e-2, _rel(full[0], dense)
    else:
        # each chunk searches its own pattern, so chunked and full differ; both stay near dense
        assert _rel(out, dense) < 0.5, _rel(out, dense)
        assert _rel(full[0], dense) < 0.5, _rel(full[0], dense)


@pytest.mark.slow
def test_torch_varlen_agrees_with_gamma_one_on_a_mixed_batch():
    tv = _torch_varlen()
    lens = [65536, 49152, 32768, 32768, 24576, 16384, 16384, 8192, 8192, 4096, 4096]
    seqs = [_seq(n, seed=100 + i) for i, n in enumerate(lens)]
    q, k, v = (torch.cat([s[i] for s in seqs]) for i in range(3))
    del seqs
    cu, mx = _cu(lens), max(lens)
    cfg = fp.FlexPrefillConfig(gamma=1.0)
    ref = tv(q, k, v, cu, cu, mx, mx, D**-0.5)
    full = fp.flex_prefill_attention_varlen(q, k, v, cu, cu, mx, mx, config=cfg)
    rel = _rel(full, ref)
    assert rel < 1e-2, f"rel error {rel:.2e} between gamma=1 and torch varlen_attn"


@pytest.mark.slow
def test_torch_varlen_agrees_with_gamma_one_on_the_last_chunk_of_128k():
    tv = _torch_varlen()
    N, C = 131072, 8192
    q, k, v = _seq(N, seed=200)
    one, cu_k = _cu([C]), _cu([N])
    last = tv(q[-C:], k, v, one, cu_k, C, N, D**-0.5)
    ours = fp.flex_prefill_attention_varlen(q[-C:], k, v, one, cu_k, C, N, config=fp.FlexPrefillConfig(gamma=1.0))
    rel = _rel(last, ours)
    assert rel < 1e-2, f"rel error {rel:.2e} between gamma=1 and torch varlen_attn"
