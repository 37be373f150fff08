"""The gamma rule on the device: per row, the fewest largest entries whose sum reaches
``gamma`` of the row total (ties: lower position first, as a stable descending sort orders
them).  Every set of the search (vertical, slash, query-aware) is cut by these functions."""

from __future__ import annotations

import torch
import triton

from ..options import options
from ..ops.kernels.search import radix_final_kernel, radix_hist_kernel

__all__ = ["sort_desc", "cumsum_rows", "count_to_mass", "top_n", "keep_to_mass", "threshold_entry"]

# rows longer than this are scanned in two levels (see cumsum_rows)
_SCAN_TILE = 1024


def cumsum_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.cumsum(-1)`` for fp32 rows of any length, in two levels when rows are long.

    CUDA's scan along the last dimension runs one row per thread block: a few rows of a
    million entries (the query-aware search at 128k, nb*nb per head) took 13 ms of a 22 ms
    search on an H200.  Scanning tiles of 1024 entries, then the tile totals, keeps every
    launch wide.  Sums are grouped differently from a flat scan, so results may differ in
    the last bits of fp32.
    """
    n = x.shape[-1]
    if n <= 4 * _SCAN_TILE:
        return x.cumsum(-1)
    pad = (-n) % _SCAN_TILE
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    tiles = xp.unflatten(-1, (xp.shape[-1] // _SCAN_TILE, _SCAN_TILE)).cumsum(-1)
    totals = tiles[..., -1]
    tiles += (totals.cumsum(-1) - totals)[..., None]
    out = tiles.flatten(-2)
    return out[..., :n] if pad else out


def sort_desc(scores: torch.Tensor):
    """``scores`` sorted per row in the order of the rule: value descending, position ascending
    (a stable sort); ``.values`` and ``.indices``."""
    return torch.sort(scores, dim=-1, descending=True, stable=True)


def count_to_mass(scores: torch.Tensor, gamma: float, sorted_desc: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the fewest largest entries whose sum reaches ``gamma`` of the row total (int64 [...]).

    ``sorted_desc``: the rows already sorted (``sort_desc(scores).values``), where the caller
    needs the sort too."""
    n = scores.shape[-1]
    if gamma >= 1.0:
        return torch.full(scores.shape[:-1], n, dtype=torch.int64, device=scores.device)
    if sorted_desc is None:
        sorted_desc = sort_desc(scores).values
    cum = cumsum_rows(sorted_desc)
    return ((cum < gamma * cum[..., -1:]).sum(-1) + 1).clamp_max(n)


def top_n(scores: torch.Tensor, n: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``n[...]`` largest entries per row (ties: lower index first).

    ``order``: ``sort_desc(scores).indices`` where the caller has it."""
    if order is None:
        order = sort_desc(scores).indices
    rank_ok = torch.arange(scores.shape[-1], device=scores.device) < n[..., None]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank_ok)


def keep_to_mass(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """Bool mask of the entries the rule keeps per row: the ``count_to_mass`` largest."""
    srt = sort_desc(scores)
    return top_n(scores, count_to_mass(scores, gamma, srt.values), srt.indices)


def _radix_enabled() -> bool:
    return options().radix_select


# list entries per program of a radix pass (at least; more past _RADIX_MAX_SPLITS splits:
# every program reads all splits' histograms of the pass before), and per loop step.  At
# 4096 a pass over SmolLM2's 32k ranking (9 heads x 33k entries, 81 programs) took ~10 us on
# an H200; 1024 spreads it over 4x the programs: the 9 passes 88.8 -> 67.8 us there, Gemma 3's
# (4 heads) 87.3 -> 40.1 us
_RADIX_PER_SPLIT = 1024
_RADIX_MAX_SPLITS = 128
_RADIX_BT = 1024


def threshold_entry(flat: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``flat`` (fp32 [H, T], entries >= 0), the value (fp32 [H]) and position (int64
    [H]) of its ``count_to_mass`` -th entry in (value desc, position asc) order: where the
    running sum of the largest entries first reaches ``gamma`` of the row total.

    By radix selection on the fp32 bit patterns (10 launches, no sort, no [H, T] temporaries)
    for ``gamma < 1`` with ``Options.radix_select`` on; else by a stable sort.
    The running sums are grouped differently from a sorted cumsum, so where a partial sum
    lies within fp32 rounding of the goal the two may pick neighbouring entries.
    """
    H, T = flat.shape
    if gamma >= 1.0 or not _radix_enabled():
        srt = sort_desc(flat)
        last = (count_to_mass(flat, gamma, srt.values) - 1)[:, None]
        return srt.values.gather(1, last).squeeze(1), srt.indices.gather(1, last).squeeze(1)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    dev = flat.device
    per_split = max(_RADIX_PER_SPLIT, triton.cdiv(triton.cdiv(T, _RADIX_MAX_SPLITS), _RADIX_BT) * _RADIX_BT)
    per_split = min(per_split, triton.cdiv(T, _RADIX_BT) * _RADIX_BT)
    splits = triton.cdiv(T, per_split)
    bsplit = triton.next_power_of_2(splits)
    part_cnt = torch.empty(9, H, splits, 16, dtype=torch.int32, device=dev)
    part_sum = torch.empty(9, H, splits, 16, dtype=torch.float32, device=dev)
    st_bits = torch.empty(8, H, dtype=torch.int32, device=dev)
    st_above = torch.empty(8, H, dtype=torch.float32, device=dev)
    st_n_above = torch.empty(8, H, dtype=torch.int32, device=dev)
    st_goal = torch.empty(H, dtype=torch.float32, device=dev)
    state = (st_bits, st_above, st_n_above, st_goal)
    for p in range(9):
        radix_hist_kernel[(H, splits)](
            flat, part_cnt, part_sum, *state, T, flat.stride(0), H, splits, per_split, float(gamma),
            P=p, BSPLIT=bsplit, BT=_RADIX_BT, num_warps=4,
        )
    thr = torch.empty(H, dtype=torch.float32, device=dev)
    thr_pos = torch.empty(H, dtype=torch.int64, device=dev)
    radix_final_kernel[(H,)](
        flat, part_cnt, thr, thr_pos, *state, T, flat.stride(0), H, splits, per_split,
        BSPLIT=bsplit, BT=_RADIX_BT, num_warps=4,
    )
    return thr, thr_pos

