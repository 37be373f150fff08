"""Run under torchrun by test_context_parallel.py (gloo, CPU) and test_context_parallel_gpu.py
(``--cuda``: NCCL, one GPU per rank, half precision, the Triton kernels): every case on every
rank against the single-process operator on the whole sequence (each rank builds the same inputs
and compares its own part).  Rank 0 writes {case: [per-rank result]} to argv[1] as JSON; a case
that raises records its error instead."""

import json
import sys
import traceback

import torch
import torch.distributed as dist

from flexprefill import FlexPrefillConfig, block_sparse_attention, flex_prefill_attention, select_blocks
from flexprefill.distributed import (
    LocalBlockSelection,
    block_sparse_attention_cp,
    exchange_volume,
    flex_prefill_attention_cp,
    select_blocks_cp,
    zigzag_shard,
    zigzag_unshard,
)
from flexprefill.distributed.comm import Comm
from flexprefill.distributed.search import collective_top_mass
from flexprefill.search.torch_search import top_mass
from flexprefill_tools.synthetic import structured_qkv

CUDA = "--cuda" in sys.argv
if CUDA:
    import os

    DEV = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(DEV)
    dist.init_process_group("nccl", device_id=DEV)
else:
    DEV = torch.device("cpu")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
RANK, WORLD = dist.get_rank(), dist.get_world_size()
# the CUDA kernels take half precision only; the context-parallel calls run the Triton kernel there
SPARSE_DTYPE = torch.bfloat16 if CUDA else torch.float32
CP_BACKEND = "auto" if CUDA else "torch"
results = {}


def case(fn):
    try:
        res = fn()
    except Exception as e:  # recorded, and the test that reads it fails with the traceback
        res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    every = [None] * WORLD
    dist.all_gather_object(every, res)
    results[fn.__name__] = every
    return fn


def inputs(N, Hq, Hkv, D, dtype, seed=0, B=1):
    q, k, v = structured_qkv(B, N, Hq, Hkv, D, dtype=torch.float32, seed=seed)
    return q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype)


def shard(*ts):
    return [zigzag_shard(t, WORLD, RANK) for t in ts]


def max_diff(a, b):
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def gamma_one(dtype, exchange, B=1, Hkv=2):
    N = 64 * 2 * WORLD * 2  # 4 blocks of 32 per chunk
    q, k, v = inputs(N, 4, Hkv, 64, dtype, seed=1, B=B)
    cfg = FlexPrefillConfig(block_size=32, gamma=1.0, tau=0.5, min_budget=32, min_seq_len=0, backend="torch")
    with torch.no_grad():
        # the single-device operator on the same backend (the Triton kernel on CUDA), and fp32 on the CPU
        ref, ref_lse = flex_prefill_attention(q, k, v, config=cfg.replace(backend=CP_BACKEND), return_lse=True)
        exact = flex_prefill_attention(*(t.float().cpu() for t in (q, k, v)), config=cfg)
        out, lse, stats, comm = flex_prefill_attention_cp(*shard(q, k, v), config=cfg.replace(backend=CP_BACKEND),
                                                          exchange=exchange, return_lse=True, return_stats=True,
                                                          return_comm=True)
    full = [None] * WORLD
    dist.all_gather_object(full, out.cpu())
    return dict(out_diff=max_diff(out, zigzag_shard(ref, WORLD, RANK)),
                lse_diff=max_diff(lse, zigzag_shard(ref_lse, WORLD, RANK, dim=2)),
                single_err=max_diff(ref, exact), cp_err=max_diff(zigzag_unshard(full), exact),
                density=float(stats.density.mean()), comm=comm.as_dict())


if not CUDA:
    @case
    def gamma1_fp32_ring():
        return gamma_one(torch.float32, "ring")

    @case
    def gamma1_fp32_all_to_all():
        return gamma_one(torch.float32, "all_to_all")


@case
def gamma1_bf16_ring():
    return gamma_one(torch.bfloat16, "ring")


@case
def gamma1_bf16_all_to_all():
    return gamma_one(torch.bfloat16, "all_to_all")


@case
def gamma1_fp16_batch2_mqa():
    return gamma_one(torch.float16, "ring", B=2, Hkv=1)


SPARSE = {
    # name: (N per rank, Hq, Hkv, config)
    "vs_qa": (256, 4, 2, dict(block_size=32, gamma=0.9, tau=0.5, min_budget=32)),
    "vs_only": (256, 6, 2, dict(block_size=32, gamma=0.8, tau=0.0, min_budget=0)),
    "capped": (256, 4, 1, dict(block_size=32, gamma=0.95, tau=0.3, min_budget=64, max_budget=96)),
    "bs64": (256, 4, 4, dict(block_size=64, gamma=0.85, tau=0.6, min_budget=64)),
}


def sparse(name, exchange):
    n, Hq, Hkv, kw = SPARSE[name]
    N = n * WORLD
    q, k, v = inputs(N, Hq, Hkv, 64, SPARSE_DTYPE, seed=2)
    cfg = FlexPrefillConfig(min_seq_len=0, backend="torch", **kw)
    with torch.no_grad():
        sel = select_blocks(q, k, config=cfg)
        ref, ref_lse = block_sparse_attention(q, k, v, sel, return_lse=True, backend="torch")
        qs, ks, vs = shard(q, k, v)
        local = select_blocks_cp(qs, ks, config=cfg)
        out, lse, stats, comm = flex_prefill_attention_cp(qs, ks, vs, config=cfg.replace(backend=CP_BACKEND),
                                                          exchange=exchange, return_lse=True, return_stats=True,
                                                          return_comm=True)
    want = sel.to_mask()[:, :, local.rows]
    plan = exchange_volume(sel.to_mask(), world=WORLD, block_size=cfg.block_size, num_kv_heads=Hkv, head_dim=64,
                           element_size=q.element_size())[RANK]
    return dict(
        mask_equal=bool(torch.equal(local.mask, want)), mask_diff=int((local.mask ^ want).sum()),
        counts_equal=bool(torch.equal(local.counts, sel.counts[:, :, local.rows])),
        indices_equal=bool(torch.equal(local.indices, sel.indices[:, :, local.rows])),
        query_aware=local.query_aware.tolist(), query_aware_equal=bool(torch.equal(local.query_aware, sel.query_aware)),
        js_diff=max_diff(local.js_distance, sel.js_distance),
        num_blocks_equal=bool(torch.equal(stats.num_blocks, sel.stats().num_blocks)),
        density=float(stats.density.mean()),
        out_diff=max_diff(out, zigzag_shard(ref, WORLD, RANK)),
        lse_diff=max_diff(lse, zigzag_shard(ref_lse, WORLD, RANK, dim=2)),
        comm=comm.as_dict(), plan=plan,
    )


for _name in SPARSE:
    for _ex in ("ring", "all_to_all"):
        def _f(name=_name, ex=_ex):
            return sparse(name, ex)
        _f.__name__ = f"sparse_{_name}_{_ex}"
        case(_f)


def hand(kind, exchange):
    """A hand-made block table: what each rank receives can be counted by hand."""
    bs, Hq, Hkv, D = 32, 4, 2, 64
    nbc = 2
    nb = 2 * WORLD * nbc
    N = nb * bs
    q, k, v = inputs(N, Hq, Hkv, D, SPARSE_DTYPE, seed=3)
    r = torch.arange(nb)
    causal = r[None, :] <= r[:, None]
    mask = torch.zeros(1, Hq, nb, nb, dtype=torch.bool)
    if kind == "sink_diagonal":
        mask[:] = (r[None, :] == 0) | (r[None, :] == r[:, None])
    elif kind == "dense":
        mask[:] = causal
    elif kind == "one_column":
        # diagonal everywhere; block 3 only for query head 0 (K/V head 0), rows after it
        mask[:] = r[None, :] == r[:, None]
        mask[0, 0] |= (r[None, :] == 3) & causal
    glob = mask.to(DEV)
    local = LocalBlockSelection.from_global(glob, world=WORLD, rank=RANK, block_size=bs)
    with torch.no_grad():
        ref, ref_lse = block_sparse_attention(q, k, v, _selection(glob, bs, N), return_lse=True, backend="torch")
        out, lse, comm = block_sparse_attention_cp(*shard(q, k, v), local, exchange=exchange, backend=CP_BACKEND,
                                                   return_lse=True, return_comm=True)
    elem = q.element_size()
    plan = exchange_volume(glob, world=WORLD, block_size=bs, num_kv_heads=Hkv, head_dim=D, element_size=elem)[RANK]
    return dict(out_diff=max_diff(out, zigzag_shard(ref, WORLD, RANK)),
                lse_diff=max_diff(lse, zigzag_shard(ref_lse, WORLD, RANK, dim=2)), comm=comm.as_dict(), plan=plan,
                block_bytes=bs * 2 * D * elem, nbc=nbc, Hkv=Hkv)


def _selection(mask, bs, N):
    from flexprefill.block_table import mask_to_selection

    B, Hq = mask.shape[:2]
    return mask_to_selection(mask, block_size=bs, seq_len=N,
                             query_aware=torch.zeros(B, Hq, dtype=torch.bool, device=mask.device),
                             js_distance=torch.zeros(B, Hq, device=mask.device))


for _kind in ("sink_diagonal", "dense", "one_column"):
    for _ex in ("ring", "all_to_all"):
        def _h(kind=_kind, ex=_ex):
            return hand(kind, ex)
        _h.__name__ = f"hand_{_kind}_{_ex}"
        case(_h)


@case
def top_mass_with_ties():
    """The collective gamma threshold against the one-process rule on the concatenated entries,
    with many exact ties spread over ranks and chunks."""
    comm = Comm()
    g = torch.Generator().manual_seed(7)
    A, per_chunk = 3, 40
    # values on a coarse grid: many ties; the same tensor on every rank, each takes its chunks
    whole = ((torch.randint(0, 6, (A, 2 * WORLD * per_chunk), generator=g).float() / 8) ** 2).to(DEV)
    chunks = whole.view(A, 2 * WORLD, per_chunk)
    a, b = RANK, 2 * WORLD - 1 - RANK
    mine = torch.cat([chunks[:, a], chunks[:, b]], -1)
    out = {}
    for gamma in (0.3, 0.7, 0.9, 0.99):
        got = collective_top_mass(mine, gamma, comm=comm)
        want = top_mass(whole, gamma).view(A, 2 * WORLD, per_chunk)
        want = torch.cat([want[:, a], want[:, b]], -1)
        out[str(gamma)] = bool(torch.equal(got, want))
    return out


@case
def error_divisibility():
    q = torch.zeros(1, 96, 2, 64, device=DEV, dtype=SPARSE_DTYPE)
    try:
        flex_prefill_attention_cp(q, q, q, config=FlexPrefillConfig(block_size=32, min_seq_len=0))
    except ValueError as e:
        return {"raised": str(e)}
    return {"raised": None}


@case
def error_mismatched_ranks():
    q = torch.zeros(1, 128, 2, 64, device=DEV, dtype=SPARSE_DTYPE)
    cfg = FlexPrefillConfig(block_size=32, min_seq_len=0, gamma=0.9 if RANK == 0 else 0.8)
    try:
        with torch.no_grad():
            flex_prefill_attention_cp(q, q, q, config=cfg)
    except ValueError as e:
        return {"raised": str(e)}
    return {"raised": None}


@case
def error_reference_backend():
    q = torch.zeros(1, 128, 2, 64, device=DEV, dtype=SPARSE_DTYPE)
    try:
        flex_prefill_attention_cp(q, q, q, config=FlexPrefillConfig(block_size=32, backend="reference"))
    except ValueError as e:
        return {"raised": str(e)}
    return {"raised": None}


if WORLD == 2 and "--triton" in sys.argv and not CUDA:
    @case
    def triton_interpreter_fp16():
        n, Hq, Hkv, kw = SPARSE["vs_qa"]
        N = n * WORLD
        q, k, v = inputs(N, Hq, Hkv, 64, torch.float16, seed=4)
        cfg = FlexPrefillConfig(min_seq_len=0, backend="triton", **kw)
        with torch.no_grad():
            sel = select_blocks(q, k, config=cfg.replace(backend="torch"))
            ref = block_sparse_attention(q.float(), k.float(), v.float(), sel, backend="torch")
            single = block_sparse_attention(q, k, v, sel, backend="triton")
            out, comm = flex_prefill_attention_cp(*shard(q, k, v), config=cfg, return_comm=True)
        return dict(out_err=max_diff(out, zigzag_shard(ref, WORLD, RANK)),
                    single_err=max_diff(single, ref), density=float(sel.stats().density.mean()))


if RANK == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
dist.destroy_process_group()
