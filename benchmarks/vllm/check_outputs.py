"""Greedy outputs of vLLM with FlexPrefill (attention_backend="CUSTOM") against vLLM's default
backend, on one model, each backend in a process of its own.  Writes JSON.

    python benchmarks/vllm/check_outputs.py --model FOLDER --out OUT/check.json [--cases mixed,needle]

Cases:
  mixed   gamma=1: a batch of mixed-length prompts, some long enough for several prefill
          chunks (max_num_batched_tokens=1024), some sharing a prefix already in vLLM's prefix
          cache (a first request warms it), decoded together; the token ids must equal the
          default backend's token for token.  min_seq_len=1024, so every chunk whose context
          reaches 1024 tokens runs FlexPrefill (and decodes and shorter chunks FlashAttention).
  needle  gamma=0.9: needle-in-a-haystack prompts at several depths; the answers must equal
          the default backend's.
``FOLDER``: a Hugging Face folder (flexprefill_tools.models.hf_folder("smollm2-135m-instruct")).
Exit status 1 when a case differs.
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

WORDS = ("river mountain lantern quiet harbor violet engine market silver garden thunder paper orbit "
         "meadow copper window signal forest marble candle winter compass ember valley echo").split()


def filler(rng: random.Random, n_words: int) -> str:
    out, n = [], 0
    while n < n_words:
        k = rng.randint(6, 14)
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n += k
    return " ".join(out)


def mixed_prompts(tok) -> tuple[str, list[str]]:
    """(a prompt that puts a shared prefix in the cache, the batch)."""
    rng = random.Random(0)
    shared = filler(rng, 1800)
    warm = shared + " Summarise the text above in one sentence:"
    batch = [
        "Write a short poem about the sea:",
        filler(rng, 120) + " Continue the story:",
        filler(rng, 700) + " What comes next?",
        shared + " Name three words used above:",  # cached prefix + a short new chunk
        shared + filler(rng, 900) + " List the colours mentioned:",  # cached prefix + several chunks
        filler(rng, 2600) + " Describe the landscape:",  # several chunks, no cache
        "Count from one to five:",
    ]
    return warm, batch


def needle_prompts(n_words: int = 3000) -> list[tuple[str, str]]:
    out = []
    for i, depth in enumerate((0.1, 0.35, 0.6, 0.85)):
        rng = random.Random(100 + i)
        number = str(rng.randint(10000, 99999))
        words = filler(rng, n_words).split(" ")
        at = int(len(words) * depth)
        needle = f"The secret number is {number}."
        text = " ".join(words[:at] + [needle] + words[at:])
        out.append((text + "\nQuestion: What is the secret number? Answer: The secret number is", number))
    return out


def run(args) -> dict:
    """One backend in this process."""
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import LLM, SamplingParams

    kw = dict(model=args.model, dtype="bfloat16", max_model_len=args.max_model_len, enable_prefix_caching=True,
              enable_chunked_prefill=True, max_num_batched_tokens=1024, gpu_memory_utilization=0.5, seed=0)
    if args.backend == "flexprefill":
        cfg = {"gamma": args.gamma, "min_seq_len": 1024}
        kw.update(attention_backend="CUSTOM", additional_config={"flexprefill": cfg})
    llm = LLM(**kw)
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    res = {}
    if args.case == "mixed":
        warm, batch = mixed_prompts(tok)
        llm.generate([warm], greedy)
        outs = llm.generate(batch, greedy)
        res["prompt_tokens"] = [len(o.prompt_token_ids) for o in outs]
        res["cached_tokens"] = [getattr(o, "num_cached_tokens", None) for o in outs]
        res["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    else:
        cases = needle_prompts()
        outs = llm.generate([p for p, _ in cases], SamplingParams(temperature=0.0, max_tokens=8))
        res["prompt_tokens"] = [len(o.prompt_token_ids) for o in outs]
        res["answers"] = [o.outputs[0].text for o in outs]
        res["expected"] = [n for _, n in cases]
        res["found"] = [n in o.outputs[0].text for (_, n), o in zip(cases, outs)]
    res["seconds"] = time.perf_counter() - t0
    return res


def _child(model, backend, case, gamma, max_tokens, max_model_len) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--backend", backend, "--case", case,
           "--gamma", str(gamma), "--max-tokens", str(max_tokens), "--max-model-len", str(max_model_len)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"error": f"rc={r.returncode}", "log_tail": (r.stdout + r.stderr)[-6000:]}
    out = json.loads(lines[-1][len("RESULT "):])
    out["log_tail"] = "\n".join(ln for ln in r.stderr.splitlines() if "flexprefill" in ln)[-3000:]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default="mixed,needle")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="default", choices=("default", "flexprefill"), help=argparse.SUPPRESS)
    ap.add_argument("--case", default="mixed", help=argparse.SUPPRESS)
    ap.add_argument("--gamma", type=float, default=1.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run(args)), flush=True)
        return 0
    report, ok = {}, True
    for case in args.cases.split(","):
        gamma = 1.0 if case == "mixed" else 0.9
        dense = _child(args.model, "default", case, gamma, args.max_tokens, args.max_model_len)
        flex = _child(args.model, "flexprefill", case, gamma, args.max_tokens, args.max_model_len)
        key = "tokens" if case == "mixed" else "answers"
        same = "error" not in dense and "error" not in flex and dense[key] == flex[key]
        entry = dict(gamma=gamma, equal=same, default=dense, flexprefill=flex)
        if "error" not in dense and "error" not in flex:
            entry["differing_prompts"] = [i for i, (a, b) in enumerate(zip(dense[key], flex[key])) if a != b]
        report[case] = entry
        ok &= same
        print(f"{case}: gamma={gamma} equal={same} {entry.get('differing_prompts', 'error')}", flush=True)
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
        from flexprefill_tools.stamp import env_stamp

        report["stamp"] = env_stamp()
    except Exception as e:  # noqa: BLE001 - the stamp is informative only
        report["stamp"] = {"error": str(e)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
