"""Context-parallel FlexPrefill: the key/value bytes each rank receives against dense ring attention.

Two modes, both on the CPU:

* ``python benchmarks/cp_bytes.py --out DIR``: the pattern search of one process (the torch
  search, whose block tables the context-parallel search reproduces: tests/distributed/)
  on structured synthetic inputs of the Llama-3.1-8B layer shape and, with ``--captured``, on
  real activations of a packaged model; for each length, gamma and rank count,
  :func:`flexprefill.distributed.exchange_volume` gives every rank's bytes.  Writes
  ``cp_bytes.json`` and ``cp_bytes.md``.
* ``torchrun --nproc-per-node P benchmarks/cp_bytes.py --check --out DIR``: runs the
  context-parallel search and attention itself over gloo at one length and compares every
  rank's block lists and its bytes with the single-process search: ``cp_check_P.json``.

Bytes are for bf16 keys and values (2 bytes an element), whatever dtype the search ran in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flexprefill import FlexPrefillConfig  # noqa: E402
from flexprefill.distributed import exchange_volume  # noqa: E402
from flexprefill.search import torch_search  # noqa: E402
from flexprefill_tools.synthetic import structured_qkv  # noqa: E402


def _lengths(text):
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        out.append(int(t[:-1]) * 1024 if t.endswith("k") else int(t))
    return out


def _summary(vol, density, **key):
    rx = [v["kv_bytes_received"] for v in vol]
    ring = [v["dense_ring_bytes"] for v in vol]
    causal = [v["dense_causal_bytes"] for v in vol]
    return dict(**key, density=round(density, 4), sparse_total=sum(rx), dense_ring_total=sum(ring),
                dense_causal_total=sum(causal), sparse_over_ring=round(sum(rx) / sum(ring), 4),
                sparse_over_causal=round(sum(rx) / max(1, sum(causal)), 4),
                max_rank_sparse=max(rx), max_rank_ring=max(ring),
                max_rank_over_ring=round(max(rx) / max(ring), 4), per_rank=rx)


def _volumes(mask, worlds, bs, Hkv, D, rows, **key):
    density = float(torch_search_density(mask))
    for P in worlds:
        if mask.shape[-1] % (2 * P):
            continue
        vol = exchange_volume(mask, world=P, block_size=bs, num_kv_heads=Hkv, head_dim=D, element_size=2)
        rows.append(_summary(vol, density, world=P, **key))
        r = rows[-1]
        print(f"  P={P}: density {density:.3f}, sparse/ring {r['sparse_over_ring']:.3f}, "
              f"sparse/causal {r['sparse_over_causal']:.3f}, max rank {r['max_rank_over_ring']:.3f}", flush=True)


def torch_search_density(mask):
    nb = mask.shape[-1]
    return mask.sum() / (mask.shape[0] * mask.shape[1] * nb * (nb + 1) / 2)


def planner(args):
    rows = []
    worlds = [int(x) for x in args.worlds.split(",")]
    gammas = [float(x) for x in args.gammas.split(",")]
    Hq, Hkv, D = 32, 8, 128
    bs = 128
    for N in (_lengths(args.lengths) if args.lengths else []):
        t0 = time.time()
        q, k, _ = structured_qkv(1, N, Hq, Hkv, D, dtype=torch.float32, seed=0)
        print(f"synthetic llama3.1-8b N={N} ({time.time() - t0:.0f} s)", flush=True)
        for gamma in gammas:
            cfg = FlexPrefillConfig(block_size=bs, gamma=gamma, min_seq_len=0, backend="torch")
            with torch.no_grad():
                sel = torch_search.select_blocks(q, k, config=cfg)
            print(f" gamma {gamma}: query-aware {float(sel.query_aware.float().mean()):.2f}", flush=True)
            _volumes(sel.to_mask(), worlds, bs, Hkv, D, rows, input="synthetic", shape="32/8/128", N=N, gamma=gamma,
                     qa_frac=round(float(sel.query_aware.float().mean()), 3))
        del q, k
    if args.captured:
        import harness

        for key in args.captured.split(","):
            got = harness.captured_inputs([key], {}, device="cpu", dtype=torch.float32)
            if key not in got:
                continue
            c = got[key]
            q, k = c["q"], c["k"]
            N, Hq, Hkv, D = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
            for gamma in gammas:
                cfg = FlexPrefillConfig(block_size=bs, gamma=gamma, min_seq_len=0, backend="torch")
                with torch.no_grad():
                    sel = torch_search.select_blocks(q, k, config=cfg, softmax_scale=c["scale"])
                print(f"{key} N={N} layers {c['layers']} gamma {gamma}", flush=True)
                _volumes(sel.to_mask(), worlds, bs, Hkv, D, rows, input=f"captured {key} ({'+'.join(c['layers'])})",
                         shape=f"{Hq}/{Hkv}/{D}", N=N, gamma=gamma,
                         qa_frac=round(float(sel.query_aware.float().mean()), 3))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cp_bytes.json").write_text(json.dumps(dict(rows=rows, torch=torch.__version__), indent=1))
    lines = ["| input | shape | N | gamma | ranks | density | sparse / dense ring | sparse / dense causal | "
             "busiest rank / dense ring | sparse total (MB) | dense ring total (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['input']} | {r['shape']} | {r['N']} | {r['gamma']} | {r['world']} | {r['density']:.3f} | "
                     f"{r['sparse_over_ring']:.3f} | {r['sparse_over_causal']:.3f} | {r['max_rank_over_ring']:.3f} | "
                     f"{r['sparse_total'] / 1e6:.1f} | {r['dense_ring_total'] / 1e6:.1f} |")
    (out / "cp_bytes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def check(args):
    """Under torchrun: the context-parallel search and attention against one process, at one length."""
    import torch.distributed as dist

    from flexprefill import block_sparse_attention
    from flexprefill.distributed import flex_prefill_attention_cp, select_blocks_cp, zigzag_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    N = _lengths(args.lengths)[0]
    Hq, Hkv, D = (int(x) for x in args.shape.split("/"))
    q, k, v = structured_qkv(1, N, Hq, Hkv, D, dtype=torch.float32, seed=0)
    res = []
    for gamma in [float(x) for x in args.gammas.split(",")]:
        cfg = FlexPrefillConfig(block_size=128, gamma=gamma, min_seq_len=0, backend="torch")
        with torch.no_grad():
            sel = torch_search.select_blocks(q, k, config=cfg)
            ref = block_sparse_attention(q, k, v, sel, backend="torch")
            qs, ks, vs = (zigzag_shard(t, world, rank) for t in (q, k, v))
            t0 = time.perf_counter()
            local = select_blocks_cp(qs, ks, config=cfg)
            t_search = time.perf_counter() - t0
            out, comm = flex_prefill_attention_cp(qs, ks, vs, config=cfg, return_comm=True)
        want = sel.to_mask()[:, :, local.rows]
        plan = exchange_volume(sel.to_mask(), world=world, block_size=128, num_kv_heads=Hkv, head_dim=D,
                               element_size=4)[rank]
        res.append(dict(gamma=gamma, mask_diff=int((local.mask ^ want).sum()), blocks=int(want.sum()),
                        query_aware_equal=bool(torch.equal(local.query_aware, sel.query_aware)),
                        out_diff=float((out - zigzag_shard(ref, world, rank)).abs().max()),
                        bytes_equal_plan=comm.kv_bytes_received == plan["kv_bytes_received"],
                        comm=comm.as_dict(), search_s=round(t_search, 2)))
    every = [None] * world
    dist.all_gather_object(every, res)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"cp_check_{world}.json").write_text(json.dumps(dict(N=N, shape=args.shape, world=world, ranks=every),
                                                               indent=1))
        for r, rr in enumerate(every):
            for x in rr:
                print(f"rank {r} gamma {x['gamma']}: mask diff {x['mask_diff']} of {x['blocks']}, out diff "
                      f"{x['out_diff']:.2e}, bytes = plan {x['bytes_equal_plan']}, control bytes "
                      f"{x['comm']['control_bytes_received']}, collectives {x['comm']['collectives']}")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="8k,32k,128k")
    ap.add_argument("--gammas", default="0.8,0.9,0.95")
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--captured", default="", help="packaged models to capture, e.g. smollm2-135m,gemma3-270m")
    ap.add_argument("--check", action="store_true", help="under torchrun: compare the distributed run with one process")
    ap.add_argument("--shape", default="32/8/128", help="--check: Hq/Hkv/D")
    args = ap.parse_args()
    (check if args.check else planner)(args)


if __name__ == "__main__":
    main()
