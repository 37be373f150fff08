"""Logit soft-capping inside the kernels: ``cap * tanh(s / cap)`` of the natural-unit score
``s = scale * q.k``, then in the log2 domain the kernels' exp2 softmax works in.  Tested through
the sparse attention and search kernels against flexprefill.reference (interpreter, fp16/fp32).
Limits: tanh is built from exp2 (libdevice's does not run under the interpreter)."""

import triton
import triton.language as tl

@triton.jit
def tanh(x):
    """tanh from exp2: odd, and the exponent is never positive, so nothing overflows; its
    absolute error is about one fp32 ulp of 1."""
    # exp(-2|x|) = exp2(-2 log2(e) |x|)
    t = tl.exp2(tl.abs(x) * -2.8853900817779268)
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def scores_log2(b_qk, scale_log2, cap_scale, cap_log2, SOFTCAP: tl.constexpr):
    """Raw products ``q.k`` as log2-domain scores: ``scale * q.k * log2(e)`` (``scale_log2``), or
    with ``SOFTCAP`` the capped natural score ``cap * tanh(scale * q.k / cap)`` times ``log2(e)``
    (``cap_scale = scale / cap``, ``cap_log2 = cap * log2(e)``)."""
    if SOFTCAP:
        return cap_log2 * tanh(b_qk * cap_scale)
    else:
        return b_qk * scale_log2
