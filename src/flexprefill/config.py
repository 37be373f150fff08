"""Settings of FlexPrefill: one frozen, validated dataclass, and the per-shape default of
``min_seq_len``."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

__all__ = ["FlexPrefillConfig", "BACKENDS", "BLOCK_SIZES", "DEFAULT_MIN_SEQ_LEN", "MIN_SEQ_LEN_BY_SHAPE",
           "default_min_seq_len", "device_kind"]

BLOCK_SIZES = (32, 64, 128)
BACKENDS = ("auto", "triton", "torch", "reference")

# Below min_seq_len tokens the operator runs dense causal attention: the pattern search
# cannot pay for itself there.  A shape with no measured break-even takes this value: on the
# H200 every measured shape was faster than cuDNN from 32k on, on structured and uniform
# random inputs.
DEFAULT_MIN_SEQ_LEN = 32768

# The measured break-even per (device kind, head dim, query heads per KV head): the shortest
# measured length from which the whole operator (search included, gamma 0.9, block 128) was
# faster than the best dense kernel at every longer measured length, for every input kind of
# that measurement (the largest of their break-evens).  Device kinds: "sm90" (compute
# capability 9.0; measured on an H200), "cpu" (the torch backend against torch SDPA, fp32).
# docs/tuning.md says which measurements these are and how to refresh them.
MIN_SEQ_LEN_BY_SHAPE: dict[tuple[str, int, int], int] = {
    ("sm90", 128, 4): 16384,  # Llama-3.1-8B, 32/8 heads
    ("sm90", 256, 4): 16384,  # Gemma 3 270M, 4/1 heads
    ("sm90", 64, 3): 32768,  # SmolLM2-135M, 9/3 heads
    ("cpu", 64, 3): 16384,  # SmolLM2-135M, 9/3 heads
}


def device_kind(device) -> str:
    """The key of ``MIN_SEQ_LEN_BY_SHAPE`` for a device: ``"sm<major><minor>"`` for a CUDA
    device (its compute capability), else the device type (``"cpu"``)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return _cuda_kind(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_kind(index: int) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def default_min_seq_len(*, head_dim: int, q_heads: int, kv_heads: int, device) -> int:
    """``min_seq_len`` of a shape on a device: its entry of ``MIN_SEQ_LEN_BY_SHAPE``, else
    ``DEFAULT_MIN_SEQ_LEN``.  ``device``: a torch device, or a device kind such as "sm90"."""
    for name, value in (("head_dim", head_dim), ("q_heads", q_heads), ("kv_heads", kv_heads)):
        _check_int(name, value)
        if value < 1:
            raise ValueError(f"{name}={value!r} must be >= 1")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
    kind = device if isinstance(device, str) and device.startswith("sm") else device_kind(device)
    return MIN_SEQ_LEN_BY_SHAPE.get((kind, head_dim, q_heads // kv_heads), DEFAULT_MIN_SEQ_LEN)


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
            :func:`flexprefill.flex_prefill_attention`.  None (default): the measured
            break-even of the call's shape and device (:func:`default_min_seq_len`, 32768
            where none was measured); :meth:`min_seq_len_for` gives the value a call uses.
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
    min_seq_len: int | None = None
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
        if self.min_seq_len is not None:
            _check_int("min_seq_len", self.min_seq_len)
            if self.min_seq_len < 0:
                raise ValueError(f"min_seq_len={self.min_seq_len!r} must be None or >= 0")
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

    def min_seq_len_for(self, *, head_dim: int, q_heads: int, kv_heads: int, device) -> int:
        """The ``min_seq_len`` a call with this shape on ``device`` uses: the field when set,
        else :func:`default_min_seq_len`."""
        if self.min_seq_len is not None:
            return self.min_seq_len
        return default_min_seq_len(head_dim=head_dim, q_heads=q_heads, kv_heads=kv_heads, device=device)

    def resolved(self, q, k) -> "FlexPrefillConfig":
        """This config with ``min_seq_len`` filled in for ``q`` [..., Hq, D] and ``k``
        [..., Hkv, D] on their device (itself when the field is set)."""
        if self.min_seq_len is not None:
            return self
        value = self.min_seq_len_for(head_dim=q.shape[-1], q_heads=q.shape[-2], kv_heads=k.shape[-2], device=q.device)
        return _with_min_seq_len(self, value)


@functools.lru_cache(maxsize=256)
def _with_min_seq_len(config: FlexPrefillConfig, value: int) -> FlexPrefillConfig:
    # one validated copy per (config, value), not one per call
    return config.replace(min_seq_len=value)


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name}={value!r} must be a real number")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
