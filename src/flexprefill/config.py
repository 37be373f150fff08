"""Settings of FlexPrefill: one frozen, validated dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["FlexPrefillConfig", "BACKENDS", "BLOCK_SIZES"]

BLOCK_SIZES = (32, 64, 128)
BACKENDS = ("auto", "triton", "torch", "reference")

# Below this many tokens the operator runs dense causal attention: the pattern
# search cannot pay for itself there.  Measured on an H200 (bf16, 32/8 heads, d=128,
# structured inputs): 0.81x of cuDNN at 16k, 1.47x at
# 32k; the small-head shapes (9/3 d=64, 4/1 d=256) break even around 32k too.
DEFAULT_MIN_SEQ_LEN = 32768


@dataclass(frozen=True)
class FlexPrefillConfig:
    """Settings of the pattern search and the sparse attention.

    Args:
        block_size: tokens per query and key block (32, 64 or 128).
        gamma: cumulative attention mass each head must keep, in (0, 1].
            ``gamma=1`` with ``max_budget=None`` selects every causal block.
        tau: Jensen-Shannon distance threshold, >= 0.  A head whose block-pooled
            attention estimate is closer than ``tau`` to the true distribution of
            its last queries is query-aware; otherwise vertical-slash.  ``tau=0``
            disables query-aware heads.
        min_budget: tokens; at least ``ceil(min_budget / block_size)`` column blocks
            and as many diagonal offsets are kept per head.
        max_budget: tokens or None; at most ``ceil(max_budget / block_size)`` key
            blocks per query block (the sink and the diagonal are always kept).
        min_seq_len: sequences shorter than this run dense causal attention in
            :func:`flexprefill.flex_prefill_attention`.
        dense_above: None (default) or a density in (0, 1]: when the selection of a call
            keeps more than this share of the causal blocks (mean over batch and heads),
            :func:`flexprefill.flex_prefill_attention` runs dense attention instead (SDPA on
            CUDA), so a near-dense input is not slower than dense.  Reading the density costs
            one host sync per call; it is skipped while a CUDA graph is being captured, with
            ``return_lse=True``, and for packed or padded inputs.
        backend: "auto" (triton on CUDA tensors, torch on the CPU), "triton", "torch"
            (vectorised plain-PyTorch block-sparse attention, any device; on the CPU through
            PyTorch's fused attention kernel, dense fallback through SDPA) or "reference"
            (plain PyTorch in fp32, one head at a time, slow: the test oracle).
    """

    block_size: int = 128
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1024
    max_budget: int | None = None
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN
    backend: str = "auto"
    dense_above: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size={self.block_size!r} is not supported; accepted: {BLOCK_SIZES}")
        _check_real("gamma", self.gamma)
        if not (0.0 < self.gamma <= 1.0):
            raise ValueError(f"gamma={self.gamma!r} must be in (0, 1]")
        _check_real("tau", self.tau)
        if not self.tau >= 0.0:
            raise ValueError(f"tau={self.tau!r} must be >= 0 (0 disables query-aware heads)")
        _check_int("min_budget", self.min_budget)
        if self.min_budget < 0:
            raise ValueError(f"min_budget={self.min_budget!r} must be >= 0 tokens")
        if self.max_budget is not None:
            _check_int("max_budget", self.max_budget)
            if self.max_budget < 1:
                raise ValueError(f"max_budget={self.max_budget!r} must be None or >= 1 token")
        _check_int("min_seq_len", self.min_seq_len)
        if self.min_seq_len < 0:
            raise ValueError(f"min_seq_len={self.min_seq_len!r} must be >= 0")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not supported; accepted: {BACKENDS}")
        if self.dense_above is not None:
            _check_real("dense_above", self.dense_above)
            if not (0.0 < self.dense_above <= 1.0):
                raise ValueError(f"dense_above={self.dense_above!r} must be None or in (0, 1] (a share of the causal blocks)")

    @property
    def min_budget_blocks(self) -> int:
        return math.ceil(self.min_budget / self.block_size)

    @property
    def max_budget_blocks(self) -> int | None:
        if self.max_budget is None:
            return None
        return math.ceil(self.max_budget / self.block_size)

    def replace(self, **changes) -> "FlexPrefillConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name}={value!r} must be a real number")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
