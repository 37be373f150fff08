"""Time to first token and prefill throughput of vLLM with FlexPrefill against vLLM's default
backend, chunked prefill on, at 16k/32k/64k/128k: one request and a batch of 4.  Each backend
runs in a process of its own; writes JSON.

    python benchmarks/vllm/speed.py --model FOLDER --out OUT/speed.json [--lengths 16k,32k,64k,128k]
        [--chunk 16384] [--min-seq-len 16384] [--gamma 0.9] [--repeats 2]

A request is a prompt of N tokens generating one token, so the wall time of ``generate`` is
its time to first token (TTFT); a batch of 4 such prompts gives the batch's prefill
throughput (4N / wall time) and the mean TTFT of its requests where vLLM reports it.  The
first request of each length warms up (compilation, autotuning, search graphs); the best of
``--repeats`` later runs is reported.  The packaged models were trained on 8k (SmolLM2) or 32k
(Gemma 3) tokens: past that VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 lets vLLM run them, which is fine
for timing but not for quality, and the attention of such prompts may be denser or sparser
than a long-context model's.  Prompts are the model's tokens of a fixed filler text.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_outputs import filler  # noqa: E402
from report import write_report  # noqa: E402


def _len(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def run(args) -> list[dict]:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    lengths = [_len(x) for x in args.lengths.split(",")]
    kw = dict(model=args.model, dtype="bfloat16", max_model_len=max(lengths) + 64, enable_chunked_prefill=True,
              max_num_batched_tokens=args.chunk, enable_prefix_caching=False, gpu_memory_utilization=0.8, seed=0)
    if args.backend == "flexprefill":
        cfg = {"gamma": args.gamma, "min_seq_len": args.min_seq_len}
        if args.no_graphs:
            cfg["options"] = {"search_graphs": False}
        kw.update(attention_backend="CUSTOM", additional_config={"flexprefill": cfg})
    llm = LLM(**kw)
    tok = llm.get_tokenizer()
    ids = tok(filler(random.Random(7), max(lengths)))["input_ids"]
    while len(ids) < 4 * max(lengths) + 8:
        ids = ids + ids
    one = SamplingParams(temperature=0.0, max_tokens=1)
    rows = []

    def prompts(n, b, shift):
        # distinct prompts (no prefix reuse across requests even if caching were on)
        return [TokensPrompt(prompt_token_ids=ids[shift + i * 7: shift + i * 7 + n]) for i in range(b)]

    for n in lengths:
        llm.generate(prompts(n, 1, 1), one, use_tqdm=False)
        for b in (1, 4):
            best, ttfts = None, None
            for r in range(args.repeats):
                ps = prompts(n, b, 3 + r)
                t0 = time.perf_counter()
                outs = llm.generate(ps, one, use_tqdm=False)
                dt = time.perf_counter() - t0
                if best is None or dt < best:
                    best = dt
                    ttfts = []
                    for o in outs:
                        m = getattr(o, "metrics", None)
                        ft, at = getattr(m, "first_token_ts", None), getattr(m, "arrival_time", None)
                        if ft is None:
                            ft, at = getattr(m, "first_token_time", None), getattr(m, "arrival_time", None)
                        ttfts.append((ft - at) if ft is not None and at is not None else None)
            row = dict(backend=args.backend, N=n, batch=b, wall_s=best, prefill_tok_per_s=n * b / best,
                       ttft_s=best if b == 1 else None, request_ttft_s=ttfts, chunk=args.chunk,
                       gamma=args.gamma if args.backend == "flexprefill" else None,
                       min_seq_len=args.min_seq_len if args.backend == "flexprefill" else None,
                       search_graphs=(not args.no_graphs) if args.backend == "flexprefill" else None)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="16k,32k,64k,128k")
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (the prefill chunk)")
    ap.add_argument("--min-seq-len", type=int, default=16384)
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backends", default="default,flexprefill", help="also: flexprefill-nographs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--no-graphs", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run(args)), flush=True)
        return 0
    report = {"rows": [], "errors": {}}
    for name in args.backends.split(","):
        backend = "flexprefill" if name.startswith("flexprefill") else "default"
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--backend", backend, "--lengths",
               args.lengths, "--chunk", str(args.chunk), "--min-seq-len", str(args.min_seq_len), "--gamma",
               str(args.gamma), "--repeats", str(args.repeats)] + (["--no-graphs"] if name.endswith("nographs") else [])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not lines:
            report["errors"][name] = (r.stdout + r.stderr)[-6000:]
            print(f"{name}: failed rc={r.returncode}", flush=True)
            continue
        for row in json.loads(lines[-1][len("RESULT "):]):
            row["variant"] = name
            report["rows"].append(row)
    by = {(r["variant"], r["N"], r["batch"]): r for r in report["rows"]}
    for (v, n, b), r in sorted(by.items()):
        base = by.get(("default", n, b))
        sp = base["wall_s"] / r["wall_s"] if base else None
        print(f"{v:24s} N={n:7d} batch={b} wall {r['wall_s']:.3f} s  {r['prefill_tok_per_s']:9.0f} tok/s"
              + (f"  speed-up {sp:.2f}x" if sp and v != "default" else ""), flush=True)
    write_report(report, args.out)
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
