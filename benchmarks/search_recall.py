"""How much attention mass cheaper searches keep, against the exact search, on a real model's Q/K/V.

The search's fixed cost per call is what keeps FlexPrefill dense at short lengths.  Two ways
to cut it are measured here on Q/K/V captured from a packaged model (a needle-free prefill
of the packaged essays):

- **fewer representative queries**: the pooled scores (step 1-2) and the JS estimate
  (step 3) from the last ``n`` queries instead of the last ``block_size``;
- **reusing the previous layer's selection**: layer ``L`` runs on the blocks that layer
  ``L - 1`` selected, with no search of its own.

For every layer and variant: the density (selected blocks over the causal grid), the
**recall** (the exact attention mass of each (head, query block) that falls in its selected
blocks, from the fp32 softmax over all causal keys, averaged per row, then over rows and
heads; the worst head's mean too), the share of heads whose pattern (query-aware or
vertical-slash) matches the exact search's, and the search time (best of ``--repeat``, on
the device it runs on).  The exact search (``n = block_size``) is checked bit for bit
against ``flexprefill.select_blocks``.

    PYTHONPATH=src python benchmarks/search_recall.py --model smollm2-135m --length 8192 \\
        --layers 4,5,14,15,24,25 --reps 128,64,32,16 --out out/search_recall

Writes ``search_recall.json`` (rows, settings, environment stamp) and ``search_recall.png``
(recall against density per variant) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import harness
from flexprefill import FlexPrefillConfig, select_blocks
from flexprefill.reference import block_means, estimated_block_distribution, js_distance
from flexprefill.search.torch_search import representative_block_scores, row_masks
from flexprefill_tools.stamp import env_stamp


def search_masks(q, k, cfg: FlexPrefillConfig, scale: float, n_rep: int):
    """The torch search with the last ``n_rep`` queries as representatives: bool masks
    [B, Hq, nb, nb] and query_aware [B, Hq] (``n_rep = block_size`` is the library's search)."""
    bs = cfg.block_size
    N = k.shape[1]
    nb = math.ceil(N / bs)
    q_rep = q[:, N - n_rep:]
    vert, slash = representative_block_scores(q_rep, k, block_size=bs, scale=scale)
    dist = js_distance(vert, estimated_block_distribution(q_rep, k, block_size=bs, scale=scale))
    query_aware = dist < cfg.tau
    q_bar = block_means(q, bs) if bool(query_aware.any()) else None
    k_bar = block_means(k, bs) if q_bar is not None else None
    rows = torch.arange(nb, device=q.device)
    masks = row_masks(vert, slash, query_aware, q_bar, k_bar, rows, cfg=cfg, scale=scale, num_rows=nb)
    return masks, query_aware


def block_mass(q, k, scale: float, bs: int, q_chunk: int = 1024) -> torch.Tensor:
    """Exact causal attention mass per block pair, fp32 [Hq, nb, nb]: row ``r`` is the mean over
    the queries of block ``r`` of their softmax mass on each key block (each row sums to 1)."""
    _, N, Hq, D = q.shape
    group = Hq // k.shape[2]
    nb = math.ceil(N / bs)
    pad = nb * bs - N
    out = torch.zeros(Hq, nb, nb, dtype=torch.float32, device=q.device)
    pos = torch.arange(N, device=q.device)
    for h in range(Hq):
        kh = k[0, :, h // group].float()
        for q0 in range(0, N, q_chunk):
            q1 = min(N, q0 + q_chunk)
            s = (q[0, q0:q1, h].float() @ kh.T) * scale
            s.masked_fill_(pos[None, :] > pos[q0:q1, None], float("-inf"))
            p = torch.softmax(s, dim=-1)
            p = torch.nn.functional.pad(p, (0, pad)).view(q1 - q0, nb, bs).sum(-1)  # [rows, nb]
            rblk = torch.div(pos[q0:q1], bs, rounding_mode="floor")
            out[h].index_add_(0, rblk, p)
    counts = torch.bincount(torch.div(pos, bs, rounding_mode="floor"), minlength=nb).float()
    return out / counts[None, :, None]


def score(mass: torch.Tensor, masks: torch.Tensor) -> dict:
    """Density and recall of bool ``masks [Hq, nb, nb]`` against ``mass [Hq, nb, nb]``."""
    nb = mass.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=mass.device).tril()
    m = masks & causal
    recall = (mass * m).sum(-1)  # [Hq, nb]
    per_head = recall.mean(-1)
    return dict(density=float(m.sum()) / (m.shape[0] * nb * (nb + 1) / 2), recall=float(per_head.mean()),
                worst_head_recall=float(per_head.min()), rows_below_0_9=float((recall < 0.9).float().mean()))


def _best_time(fn, repeat: int, device) -> float:
    best = math.inf
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def plot(rows: list, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = [(r["density"], r["recall"]) for r in rows if r["variant"] == variant]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=variant, s=28)
    ax.set_xlabel("density (selected blocks / causal blocks)")
    ax.set_ylabel("recall (exact attention mass kept, mean over rows)")
    ax.set_title("search variants per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(harness.CAPTURE_MODELS))
    ap.add_argument("--length", type=int, default=8192, help="prompt tokens")
    ap.add_argument("--layers", default="4,5,14,15,24,25",
                    help="layers to capture; a layer whose predecessor is listed also gets the reuse variant")
    ap.add_argument("--reps", default="128,64,32,16", help="representative query counts (each <= block size)")
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--min-budget", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="out/search_recall")
    args = ap.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    # the exact search first: the other variants are compared with it
    reps = sorted({int(x) for x in args.reps.split(",")} | {args.block_size}, reverse=True)
    bad = [n for n in reps if not 1 <= n <= args.block_size]
    if bad:
        raise SystemExit(f"--reps {bad}: each must be in 1..--block-size ({args.block_size})")
    device = torch.device(args.device)
    cfg = FlexPrefillConfig(gamma=args.gamma, tau=args.tau, min_budget=args.min_budget, block_size=args.block_size,
                            min_seq_len=0, backend="torch")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tok = harness.load_model(args.model, {}, device=device, dtype=torch.float32)
    ids = torch.tensor([harness._haystack_ids(tok, args.length)], device=device)
    t0 = time.perf_counter()
    rec = harness.capture_qkv(model, ids, layers)
    print(f"captured layers {sorted(rec)} of {args.model} at {ids.shape[1]} tokens ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    del model

    rows, exact = [], {}
    for L in layers:
        q, k, _, scale = rec[L]
        mass = block_mass(q, k, scale, args.block_size)
        ref = select_blocks(q, k, config=cfg, softmax_scale=scale)
        for n in reps:
            masks, qa = search_masks(q, k, cfg, scale, n)
            if n == args.block_size:
                causal = torch.ones(masks.shape[-1], masks.shape[-1], dtype=torch.bool, device=device).tril()
                if not torch.equal(masks & causal, ref.to_mask()):
                    raise SystemExit(f"layer {L}: the search with n={n} differs from flexprefill.select_blocks")
                exact[L] = (masks[0], qa[0])
            t = _best_time(lambda: search_masks(q, k, cfg, scale, n), args.repeat, device)
            # reps run largest first, so exact[L] is this layer's exact search from here on
            row = dict(layer=L, variant=f"reps={n}", n_rep=n, search_ms=round(t * 1000, 2), **score(mass, masks[0]),
                       pattern_agreement=float((qa[0] == exact[L][1]).float().mean()),
                       rows_identical=float((masks[0] == exact[L][0]).all(-1).float().mean()))
            rows.append(row)
            print(json.dumps(row), flush=True)
        if L - 1 in exact:
            row = dict(layer=L, variant="previous layer's", n_rep=None, search_ms=0.0, **score(mass, exact[L - 1][0]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = dict(rows=rows, settings=vars(args), stamp=env_stamp())
    (out / "search_recall.json").write_text(json.dumps(report, indent=1))
    png = plot(rows, out / "search_recall.png")
    print(f"wrote {out / 'search_recall.json'}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
