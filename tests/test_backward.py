"""Gradients: the reference path is differentiable and matches dense autograd; the Triton
path has no backward and says so instead of returning outputs without gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import flexprefill as fp
from flexprefill import reference as R


def _leaves(B, N, Hq, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, h, D, generator=g, dtype=torch.float32).requires_grad_() for h in (Hq, Hkv, Hkv)]


def _masked_dense(q, k, v, block_mask, bs, scale):
    """Dense attention through autograd with the selection's token mask (causal inside it)."""
    B, N, Hq, D = q.shape
    group = Hq // k.shape[2]
    kk, vv = (t.repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))
    tok = block_mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :N, :N]
    allowed = tok & torch.ones(N, N, dtype=torch.bool).tril()
    s = (q.transpose(1, 2) @ kk.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return (p @ vv).transpose(1, 2)


@pytest.mark.parametrize("gamma", [1.0, 0.3], ids=["all-blocks", "sparse"])
def test_reference_backward_matches_dense_autograd(gamma):
    B, N, Hq, Hkv, D, bs = 1, 600, 4, 2, 64, 32
    scale = D**-0.5
    q, k, v = _leaves(B, N, Hq, Hkv, D, seed=3)
    cfg = fp.FlexPrefillConfig(block_size=bs, gamma=gamma, tau=0.0, min_budget=0, min_seq_len=0, backend="reference")
    with torch.no_grad():
        sel = R.select_blocks(q.float(), k.float(), config=cfg, softmax_scale=scale)
    if gamma < 1:
        assert sel.stats().density.mean() < 0.9  # a real sparse case
    g_out = torch.randn(B, N, Hq, D, generator=torch.Generator().manual_seed(1))
    out = fp.block_sparse_attention(q, k, v, sel, softmax_scale=scale, backend="reference")
    grads = torch.autograd.grad(out, (q, k, v), g_out)
    want_out = _masked_dense(q, k, v, sel.to_mask(), bs, scale)
    want = torch.autograd.grad(want_out, (q, k, v), g_out)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-4)
    for got, exp, name in zip(grads, want, "qkv"):
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4, msg=name)
    if gamma == 1.0:
        # every causal block: plain causal attention (SDPA) through autograd
        sdpa = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
            is_causal=True, scale=scale).transpose(1, 2)
        for got, exp in zip(grads, torch.autograd.grad(sdpa, (q, k, v), g_out)):
            torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)
    # the whole operator on the reference backend is differentiable too
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    fp.flex_prefill_attention(qf, kf, vf, config=cfg, softmax_scale=scale).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (qf, kf, vf))


def test_triton_backend_refuses_inputs_that_need_grad():
    B, N, Hq, Hkv, D, bs = 1, 96, 2, 1, 64, 32
    q, k, v = (t.detach().float() for t in _leaves(B, N, Hq, Hkv, D, seed=0))
    cfg = fp.FlexPrefillConfig(block_size=bs, min_seq_len=0, backend="triton")
    k.requires_grad_()
    with pytest.raises(RuntimeError, match=r"^k require grad, but the Triton backend has no backward.*backend='reference'"):
        fp.flex_prefill_attention(q, k, v, config=cfg)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match=r"^q, k require grad"):
        fp.sliding_window_attention(q, k, v, window=40, backend="triton")
    sel = fp.select_blocks(q.detach(), k.detach(), config=cfg)
    with pytest.raises(RuntimeError, match="no backward"):
        fp.block_sparse_attention(q, k, v, sel, backend="triton")
    cu = torch.tensor([0, 50, N], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="no backward"):
        fp.flex_prefill_attention_varlen(q[0], k[0], v[0], cu, cu, 50, 50, config=cfg)
    # without grad mode the same call runs
    with torch.no_grad():
        out = fp.flex_prefill_attention(q, k, v, config=cfg)
    assert out.shape == q.shape and not out.requires_grad
    assert math.isfinite(float(out.float().sum()))


def _grads(out, inputs, seed):
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g) for o in outs]
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cot))
    return torch.autograd.grad(loss, inputs)


def _check_same_grads(run, inputs, seed=5):
    """``run(backend)`` on the torch backend and on the reference: outputs and gradients agree."""
    got, want = run("torch"), run("reference")
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    for a, b, name in zip(_grads(got, inputs, seed), _grads(want, inputs, seed), "qkv"):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
def test_torch_backend_backward_matches_reference(return_lse):
    """The torch (CPU fast) path is differentiable and exact: its fused CPU kernel returns an
    LSE without a gradient, so inputs that need grad must take the path autograd handles."""
    B, N, Hq, Hkv, D, bs = 1, 600, 4, 2, 64, 32
    q, k, v = _leaves(B, N, Hq, Hkv, D, seed=3)
    cfg = fp.FlexPrefillConfig(block_size=bs, gamma=0.3, tau=0.0, min_budget=0, min_seq_len=0, backend="reference")
    with torch.no_grad():
        sel = R.select_blocks(q, k, config=cfg, softmax_scale=D**-0.5)
    assert sel.stats().density.mean() < 0.9
    _check_same_grads(lambda be: fp.block_sparse_attention(q, k, v, sel, backend=be, return_lse=return_lse), (q, k, v))
    # the whole operator: the search runs without grad, the attention with it
    _check_same_grads(
        lambda be: fp.flex_prefill_attention(q, k, v, config=cfg.replace(backend=be), return_lse=return_lse), (q, k, v)
    )


def test_torch_backend_backward_varlen_and_window():
    Hq, Hkv, D, bs = 4, 2, 64, 32
    lens = [300, 170]
    q, k, v = (t[0] for t in _leaves(1, sum(lens), Hq, Hkv, D, seed=7))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    cfg = fp.FlexPrefillConfig(block_size=bs, gamma=0.5, tau=0.0, min_budget=0, min_seq_len=0, backend="reference")
    _check_same_grads(
        lambda be: fp.flex_prefill_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), config=cfg.replace(backend=be),
                                                    return_lse=True), (q, k, v))
    qb, kb, vb = (t.detach()[None, :lens[0]].requires_grad_() for t in (q, k, v))
    _check_same_grads(lambda be: fp.sliding_window_attention(qb, kb, vb, window=70, backend=be), (qb, kb, vb))


def test_torch_backend_backward_with_softcap():
    # soft-capped scores: the torch path's gradients are the reference's (tanh through autograd)
    B, N, Hq, Hkv, D, bs = 1, 300, 4, 2, 64, 32
    q, k, v = _leaves(B, N, Hq, Hkv, D, seed=11)
    with torch.no_grad():
        q.mul_(3.0)  # scores past the cap
    cfg = fp.FlexPrefillConfig(block_size=bs, gamma=0.5, tau=0.0, min_budget=0, min_seq_len=0)
    _check_same_grads(lambda be: fp.flex_prefill_attention(q, k, v, config=cfg.replace(backend=be), return_lse=True,
                                                           softcap=2.0), (q, k, v))
    capped = _grads(fp.flex_prefill_attention(q, k, v, config=cfg.replace(backend="reference"), softcap=2.0), (q,), 5)
    plain = _grads(fp.flex_prefill_attention(q, k, v, config=cfg.replace(backend="reference")), (q,), 5)
    assert (capped[0] - plain[0]).abs().max() > 1e-2  # the cap changes the gradient
