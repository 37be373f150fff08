"""Public sliding-window attention (dense and packed/chunked): Triton kernel against the fp32 reference."""

import math

import pytest
import torch

import flexprefill
from flexprefill import reference as R

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def _oracle(q, k, v, window, scale):
    """Masked fp32 attention, one (batch, head) at a time, written out from the definition."""
    B, N, Hq, D = q.shape
    g = Hq // k.shape[2]
    out = torch.empty(B, N, Hq, D, device=q.device)
    i = torch.arange(N, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    for b in range(B):
        for h in range(Hq):
            s = (q[b, :, h].float() @ k[b, :, h // g].float().T) * scale
            out[b, :, h] = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v[b, :, h // g].float()
    return out


@pytest.mark.parametrize("window", [1, 50, 128, 1000])
def test_reference_matches_definition(window):
    q, k, v = (_rand((2, 300, h, 64), F32, s) for h, s in ((4, 1), (2, 2), (2, 3)))
    out = flexprefill.sliding_window_attention(q, k, v, window=window, backend="reference")
    assert torch.allclose(out, _oracle(q, k, v, window, 64**-0.5), atol=1e-5)


@pytest.mark.parametrize("dtype", [F16, F32, pytest.param(BF16, marks=pytest.mark.gpu)])
def test_kernel_matches_reference(dtype):
    q, k, v = (_rand((1, 700, h, 64), dtype, s) for h, s in ((4, 4), (1, 5), (1, 6)))
    out, lse = flexprefill.sliding_window_attention(q, k, v, window=300, return_lse=True, backend="triton")
    # the fp32 reference on the CPU (fp32 is a CPU dtype of the API; CUDA takes fp16/bf16)
    ref, ref_lse = flexprefill.sliding_window_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), window=300,
                                                        return_lse=True, backend="reference")
    tol = {F32: 1e-4, F16: 4e-3, BF16: 3e-2}[dtype]
    assert (out.float().cpu() - ref).abs().max().item() < tol
    assert (lse.cpu() - ref_lse).abs().max().item() < 1e-3


def _packed(lens_q, lens_k, Hq, Hkv, D, dtype, seed):
    q = _rand((sum(lens_q), Hq, D), dtype, seed)
    k = _rand((sum(lens_k), Hkv, D), dtype, seed + 1)
    v = _rand((sum(lens_k), Hkv, D), dtype, seed + 2)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


@pytest.mark.parametrize("dtype", [F32, pytest.param(BF16, marks=pytest.mark.gpu)])
def test_varlen_packed_and_chunked(dtype):
    # three sequences: plain (n_q = n_k), a chunk over a 250-token prefix, a short one
    lens_q, lens_k = [400, 150, 60], [400, 400, 60]
    window = 130
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 4, 2, 64, dtype, seed=9)
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    out, lse = flexprefill.sliding_window_attention_varlen(*args, window=window, return_lse=True, backend="triton")
    ref, ref_lse = flexprefill.sliding_window_attention_varlen(*args, window=window, return_lse=True, backend="reference")
    tol = {F32: 1e-4, BF16: 3e-2}[dtype]
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    assert (out.float() - ref.float()).abs().max().item() < tol
    assert (lse - ref_lse).abs().max().item() < 1e-3
    # the chunk equals the last 150 rows of the same sequence run whole
    q_whole = torch.cat([torch.zeros(250, 4, 64, device=DEV, dtype=dtype), q[400:550]])  # the first 250 rows: unused
    whole = flexprefill.sliding_window_attention(q_whole[None], k[None, 400:800], v[None, 400:800], window=window, backend="triton")
    assert (whole[0, 250:].float() - out[400:550].float()).abs().max().item() < tol


@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 256])
def test_varlen_windowed_default_path_on_hopper(D):
    # head dims 128/256 on Hopper: the warp-specialised Gluon kernel with VARLEN and WINDOWED
    # (a plain sequence, a chunk over a 1000-token prefix, a short one, a one-query chunk)
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("the Gluon kernels need an sm_90 GPU")
    from flexprefill.ops.sparse_attention import _hopper_kernel

    lens_q, lens_k = [900, 300, 60, 1], [900, 1300, 60, 200]
    window = 300
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 8, 2, D, BF16, seed=D)
    assert _hopper_kernel(q, k, v, 128) == "ws"
    args = (q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    out, lse = flexprefill.sliding_window_attention_varlen(*args, window=window, return_lse=True, backend="triton")
    ref, ref_lse = flexprefill.sliding_window_attention_varlen(*args, window=window, return_lse=True, backend="reference")
    assert (out.float() - ref.float()).abs().max().item() < 3e-2
    assert (lse - ref_lse).abs().max().item() < 1e-3


def test_bad_windows_are_refused():
    q = _rand((1, 64, 2, 64), F32, 0)
    k = _rand((1, 64, 1, 64), F32, 1)
    with pytest.raises(ValueError, match="window"):
        flexprefill.sliding_window_attention(q, k, k, window=0)
    for w in (2.5, True, None):
        with pytest.raises(TypeError, match="window"):
            flexprefill.sliding_window_attention(q, k, k, window=w)
    cu = torch.tensor([0, 64], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="window"):
        flexprefill.sliding_window_attention_varlen(q[0], k[0], k[0], cu, cu, 64, 64, window=-1)
    assert math.isfinite(float(R.dense_attention(q, k, k, window=3).abs().max()))
