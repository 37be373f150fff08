"""Context-parallel FlexPrefill: the split, the byte counts, and (under torchrun, 2 and 4 CPU
processes over gloo) the output and the selection against the single-process operator."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexprefill import FlexPrefillConfig, flex_prefill_attention, select_blocks
from flexprefill.distributed import (
    LocalBlockSelection,
    block_sparse_attention_cp,
    exchange_volume,
    flex_prefill_attention_cp,
    select_blocks_cp,
    zigzag_chunks,
    zigzag_positions,
    zigzag_shard,
    zigzag_unshard,
)
from flexprefill.distributed.comm import Comm
from flexprefill.distributed.search import collective_top_mass
from flexprefill.search.torch_search import top_mass
from flexprefill_tools.synthetic import structured_qkv

WORKER = Path(__file__).with_name("cp_worker.py")


# --- one process: the layout, the byte planner, the checks ---------------------------------


def test_zigzag_layout_round_trip():
    x = torch.arange(2 * 3 * 8).view(2, 24)  # 24 tokens over 3 ranks: chunks of 4
    parts = [zigzag_shard(x, 3, r) for r in range(3)]
    assert parts[0][0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]  # chunks 0 and 5
    assert parts[2][0].tolist() == [8, 9, 10, 11, 12, 13, 14, 15]  # chunks 2 and 3
    assert torch.equal(zigzag_unshard(parts), x)
    for r in range(3):
        assert torch.equal(zigzag_positions(24, 3, r), parts[r][0])
    assert zigzag_chunks(4, 1) == (1, 6)
    with pytest.raises(ValueError, match="rank=4"):
        zigzag_chunks(4, 4)
    with pytest.raises(ValueError, match="not a multiple of 2 \\* world = 6"):
        zigzag_shard(torch.zeros(1, 10), 3, 0)


def _hand_masks(world, nbc, Hq):
    nb = 2 * world * nbc
    r = torch.arange(nb)
    causal = r[None, :] <= r[:, None]
    sink_diag = ((r[None, :] == 0) | (r[None, :] == r[:, None])).expand(1, Hq, nb, nb)
    return causal.expand(1, Hq, nb, nb), sink_diag


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_exchange_volume_hand_count(world):
    """Bytes from a whole-sequence mask, counted by hand: a dense causal table receives every
    remote chunk before a rank's late chunk; sink + diagonal receives block 0 of each K/V head."""
    nbc, Hq, Hkv, D, bs = 3, 4, 2, 64, 32
    blk = bs * 2 * D * 2
    chunk = nbc * Hkv * blk
    dense, sink = _hand_masks(world, nbc, Hq)
    got_dense = exchange_volume(dense, world=world, block_size=bs, num_kv_heads=Hkv, head_dim=D, element_size=2)
    got_sink = exchange_volume(sink, world=world, block_size=bs, num_kv_heads=Hkv, head_dim=D, element_size=2)
    for r in range(world):
        late = 2 * world - 1 - r
        assert got_dense[r]["kv_bytes_received"] == (late - 1) * chunk == got_dense[r]["dense_causal_bytes"]
        assert got_dense[r]["dense_ring_bytes"] == 2 * (world - 1) * chunk
        assert got_sink[r]["kv_bytes_received"] == (0 if r == 0 else Hkv * blk)
    assert sum(g["kv_bytes_sent"] for g in got_dense) == sum(g["kv_bytes_received"] for g in got_dense)
    assert got_sink[0]["kv_bytes_sent"] == (world - 1) * Hkv * blk
    # over all ranks a dense causal exchange moves 3/4 of what dense ring does
    if world > 1:
        ring = sum(g["dense_ring_bytes"] for g in got_dense)
        assert 4 * sum(g["kv_bytes_received"] for g in got_dense) == 3 * ring


def _cfg(**kw):
    return FlexPrefillConfig(block_size=32, min_seq_len=0, backend="torch", **kw)


@pytest.mark.parametrize("gamma,tau", [(1.0, 0.5), (0.9, 0.5), (0.85, 0.0)])
def test_one_rank_is_the_single_process_operator(gamma, tau):
    """Without a process group the call is one rank holding chunks 0 and 1 in order: the same
    selection and, block for block in the same order, the same output bits."""
    q, k, v = structured_qkv(1, 512, 4, 2, 64, dtype=torch.float32, seed=5)
    cfg = _cfg(gamma=gamma, tau=tau, min_budget=32)
    with torch.no_grad():
        ref, ref_lse, ref_stats = flex_prefill_attention(q, k, v, config=cfg, return_lse=True, return_stats=True)
        out, lse, stats, comm = flex_prefill_attention_cp(q, k, v, config=cfg, return_lse=True, return_stats=True,
                                                          return_comm=True)
        sel = select_blocks(q, k, config=cfg)
        local = select_blocks_cp(q, k, config=cfg)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert torch.equal(local.mask, sel.to_mask()) and torch.equal(local.indices, sel.indices)
    assert torch.equal(stats.num_blocks, ref_stats.num_blocks)
    assert comm.kv_bytes_received == comm.dense_ring_bytes == 0
    if gamma < 1:
        assert float(stats.density.mean()) < 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_whole_block_means_are_the_reference_block_means(dtype):
    from flexprefill.distributed.search import whole_block_means
    from flexprefill.reference import block_means

    x = torch.randn(2, 512, 3, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    for bs in (32, 128):
        assert torch.equal(whole_block_means(x, bs), block_means(x, bs))


@pytest.mark.parametrize("entries", [1 << 24, 700])
def test_collective_top_mass_one_rank_is_top_mass(entries, monkeypatch):
    from flexprefill.distributed import search

    monkeypatch.setattr(search, "_HIST_ENTRIES", entries)  # 700: one head at a time
    g = torch.Generator().manual_seed(0)
    flat = torch.rand(5, 2 * 300, generator=g) ** 4
    flat[:, ::7] = 0.25  # exact ties
    flat[:, 3::11] = 0.0
    for gamma in (0.1, 0.5, 0.9, 0.999, 1.0):
        assert torch.equal(collective_top_mass(flat, gamma, comm=Comm()), top_mass(flat, gamma)), gamma


def test_checks_name_the_argument():
    q = torch.zeros(1, 128, 2, 64)
    cfg = _cfg()
    with pytest.raises(ValueError, match="n=96 tokens on each rank, not a multiple of 2 \\* block_size = 64"):
        flex_prefill_attention_cp(q[:, :96], q[:, :96], q[:, :96], config=cfg)
    with pytest.raises(ValueError, match="exchange='tree'"):
        flex_prefill_attention_cp(q, q, q, config=cfg, exchange="tree")
    with pytest.raises(ValueError, match="backend='reference' has no context-parallel path"):
        flex_prefill_attention_cp(q, q, q, config=cfg.replace(backend="reference"))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        flex_prefill_attention_cp(q.long(), q.long(), q.long(), config=cfg)
    with pytest.raises(RuntimeError, match="no backward"):
        w = q.clone().requires_grad_()
        flex_prefill_attention_cp(w, q, q, config=cfg)
    with pytest.raises(ValueError, match="group was given but torch.distributed is not initialised"):
        flex_prefill_attention_cp(q, q, q, config=cfg, group=object())
    sel = LocalBlockSelection.from_global(torch.ones(1, 2, 8, 8, dtype=torch.bool).tril(), world=1, rank=0,
                                          block_size=32)
    with pytest.raises(ValueError, match="does not fit q"):
        block_sparse_attention_cp(q, q, q, sel)
    with pytest.raises(TypeError, match="LocalBlockSelection"):
        block_sparse_attention_cp(q, q, q, sel.mask)


# --- torchrun: 2 and 4 processes over gloo ---------------------------------------------------


def _run_worker(world, tmp_path_factory, *extra):
    out = tmp_path_factory.mktemp(f"cp{world}") / "res.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), str(WORKER),
           str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both worlds, run lazily and once per module."""
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = _run_worker(world, tmp_path_factory, *(["--triton"] if world == 2 else []))
        return cache[world]

    return get


WORLDS = [2, pytest.param(4, marks=pytest.mark.slow)]


def _ranks(res, name, world):
    got = res[name]
    assert len(got) == world
    for r in got:
        assert "error" not in r, r.get("trace", r)
    return got


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["gamma1_fp32_ring", "gamma1_fp32_all_to_all"])
def test_gamma_one_equals_single_process_fp32(runs, world, name):
    for r in _ranks(runs(world), name, world):
        assert r["density"] == 1.0
        assert r["out_diff"] < 2e-5 and r["lse_diff"] < 1e-5
        # dense: every block before the late chunk moves, as a causal dense exchange
        assert r["comm"]["kv_bytes_received"] == r["comm"]["dense_causal_bytes"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["gamma1_bf16_ring", "gamma1_fp16_batch2_mqa"])
def test_gamma_one_half_precision_error_matches_single_process(runs, world, name):
    """Against the fp32 result the split's error is the single process's (partials merge in fp32)."""
    for r in _ranks(runs(world), name, world):
        assert r["cp_err"] <= 1.25 * r["single_err"] + 1e-6, r


SPARSE = ["vs_qa", "vs_only", "capped", "bs64"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("exchange", ["ring", "all_to_all"])
@pytest.mark.parametrize("name", SPARSE)
def test_sparse_selection_and_output_equal_single_process(runs, world, name, exchange):
    """gamma < 1: each rank's block lists are exactly the single-process rows (query-aware heads
    included: their gamma threshold is collective), and the output is that selection's."""
    got = _ranks(runs(world), f"sparse_{name}_{exchange}", world)
    for r in got:
        assert r["mask_equal"] and r["counts_equal"] and r["indices_equal"], r["mask_diff"]
        assert r["query_aware_equal"] and r["js_diff"] <= 1e-6 and r["num_blocks_equal"]
        assert r["out_diff"] < 1e-5 and r["lse_diff"] < 1e-5
        # the bytes moved are the planner's count from the single-process selection
        for key in ("kv_bytes_received", "kv_bytes_sent", "kv_blocks_received", "dense_ring_bytes",
                    "dense_causal_bytes"):
            assert r["comm"][key] == r["plan"][key], key
        assert r["comm"]["kv_bytes_received"] <= r["comm"]["dense_causal_bytes"] <= r["comm"]["dense_ring_bytes"]
    if name in ("vs_qa", "capped"):
        assert any(any(row) for row in got[0]["query_aware"])  # the case covers query-aware heads
    assert sum(r["comm"]["kv_bytes_received"] for r in got) < sum(r["comm"]["dense_ring_bytes"] for r in got)
    assert sum(r["comm"]["kv_bytes_received"] for r in got) == sum(r["comm"]["kv_bytes_sent"] for r in got)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("exchange", ["ring", "all_to_all"])
@pytest.mark.parametrize("kind", ["sink_diagonal", "dense", "one_column"])
def test_bytes_moved_hand_count(runs, world, kind, exchange):
    got = _ranks(runs(world), f"hand_{kind}_{exchange}", world)
    for rank, r in enumerate(got):
        blk, nbc, Hkv = r["block_bytes"], r["nbc"], r["Hkv"]
        late = 2 * world - 1 - rank
        want = {
            # block 0 (rank 0's) of each K/V head
            "sink_diagonal": 0 if rank == 0 else Hkv * blk,
            # every block of the remote chunks before the late chunk
            "dense": (late - 1) * nbc * Hkv * blk,
            # block 3 (chunk 1, rank 1's) of K/V head 0 only
            "one_column": 0 if rank == 1 else blk,
        }[kind]
        assert r["comm"]["kv_bytes_received"] == want
        assert r["comm"]["dense_ring_bytes"] == 2 * (world - 1) * nbc * Hkv * blk
        assert r["out_diff"] < 1e-5 and r["lse_diff"] < 1e-5


@pytest.mark.parametrize("world", WORLDS)
def test_collective_gamma_threshold_with_ties_across_ranks(runs, world):
    for r in _ranks(runs(world), "top_mass_with_ties", world):
        assert all(r.values()), r


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name,match", [
    ("error_divisibility", "not a multiple of 2 \\* block_size"),
    ("error_mismatched_ranks", "different gamma: \\[0.9, 0.8"),
    ("error_reference_backend", "no context-parallel path"),
])
def test_errors_raise_on_every_rank(runs, world, name, match):
    import re

    for r in _ranks(runs(world), name, world):
        assert r["raised"] and re.search(match, r["raised"]), r


def test_triton_kernel_under_the_interpreter(runs):
    """The CUDA path's executor (the Triton kernel, fp16, fp32 partials) under the interpreter."""
    for r in _ranks(runs(2), "triton_interpreter_fp16", 2):
        assert r["out_err"] <= r["single_err"] + 1e-4, r
