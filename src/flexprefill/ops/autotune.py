"""All autotuning goes through one helper: a config list on the device, one config under the interpreter."""

from __future__ import annotations

from typing import Iterable

import triton

from ..options import interpreting

__all__ = ["interpreting", "autotune_configs", "length_bucket"]


def autotune_configs(space: Iterable[dict], *, interpret: dict, pre_hook=None) -> list[triton.Config]:
    """Build ``triton.Config`` objects from dicts of meta-parameters.

    Each dict holds the kernel's constexpr meta-parameters plus optional
    ``num_warps`` (default 4) and ``num_stages`` (default 2).  Under the
    interpreter timings mean nothing, so only ``interpret`` is returned.
    ``pre_hook`` (called with the launch arguments) goes on every config.
    """
    chosen = [interpret] if interpreting() else list(space)
    configs = []
    for c in chosen:
        meta = dict(c)
        num_warps = meta.pop("num_warps", 4)
        num_stages = meta.pop("num_stages", 2)
        configs.append(triton.Config(meta, num_warps=num_warps, num_stages=num_stages, pre_hook=pre_hook))
    return configs


def length_bucket(n: int) -> int:
    """Autotune length class of a call with ``n`` keys: log2 rounded up, clamped to [13, 17]."""
    return min(max(int(n - 1).bit_length(), 13), 17)
