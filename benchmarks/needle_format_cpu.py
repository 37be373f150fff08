"""Which needle prompt do the packaged small models answer? Dense SDPA, greedy, fp32 (or bf16) on CPU.

    PYTHONPATH=src python benchmarks/needle_format_cpu.py --model smollm2-135m-instruct \
        --formats old,demo --lengths 2048,4096,8192 --depths 0.1,0.5,0.9 --seeds 0,1,2 --out needle.jsonl

One JSON line per case: the greedy answer (12 new tokens at most), ``found`` (the number is
in the answer: the demo's scoring), and the teacher-forced log-probability of the number's
tokens after the prompt (``logp`` summed, ``min_lp`` of the worst token, ``worst_rank`` of
the correct token among the vocabulary), a finer signal than found / not found.

Formats: ``demo`` is ``flexprefill_tools.cli.build_needle_prompt`` as shipped; ``old`` is the
demo's former prompt; the others are the variants screened on the way (their keys come from
a fixed list indexed by the seed). Every prompt ends with an answer prefix that repeats the
needle's words up to the number; the question never contains the number. Results:
benchmarks/results/needle_format_cpu.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time

import torch

from flexprefill_tools import cli
from flexprefill_tools.models import haystack_text, load

Q = "What is the special magic number{kk} mentioned in the text above? Answer with the number only."
HEAD = "There is a special magic number{kk} hidden in the text below. Find it and remember it.\n\n"
KEYS = ["tangerine-elephant", "copper-lantern", "velvet-giraffe", "marble-harbor", "silent-pumpkin"]


def seven(r):
    return str(r.randint(1_000_000, 9_999_999))


def spec(name: str) -> dict:
    """needle(value) / head / question / prefix of a screened format; "{kk}" becomes " for <key>"."""
    d = dict(value=seven, needle=lambda v: f"The special magic number{{kk}} is {v}.", head="", question=Q,
             prefix="The special magic number{kk} is", keyed=False)
    if name == "old":
        pass
    elif name == "qboth":  # the question also before the context
        d["head"] = HEAD
    elif name == "5digit":
        d["value"] = lambda r: str(r.randint(10_000, 99_999))
    elif name == "colon":
        d["needle"] = lambda v: f"The special magic number is: {v}."
        d["prefix"] = "The special magic number is:"
    elif name == "distinct":  # the needle as its own emphasised paragraph
        d["needle"] = lambda v: f"\n\nIMPORTANT: The special magic number is {v}. Remember it.\n\n"
    elif name == "repeat":
        d["needle"] = lambda v: f"The special magic number is {v}. Again, the special magic number is {v}."
    elif name == "ruler":  # RULER's niah_single wording without a key
        d["head"] = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the number afterwards.\n")
        d["needle"] = lambda v: f"One of the special magic numbers is: {v}."
        d["question"] = "What is the special magic number mentioned in the provided text?"
        d["prefix"] = "The special magic number mentioned in the provided text is"
    elif name in ("key", "qboth_key", "hash", "key_hash", "key_repeat", "qboth_key_hash"):
        d["keyed"] = "key" in name
        sep = "#" if "hash" in name else ""
        if "qboth" in name:
            d["head"] = HEAD
        if name == "key_repeat":
            d["needle"] = lambda v: f"The special magic number{{kk}} is {v}. Again, the special magic number{{kk}} is {v}."
        else:
            d["needle"] = lambda v: f"The special magic number{{kk}} is {sep}{v}."
        d["prefix"] = "The special magic number{kk} is" + (" " + sep if sep else "")
    else:
        raise SystemExit(f"unknown format {name!r}")
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--formats", default="old,demo")
    p.add_argument("--lengths", default="2048,4096,8192", help="capped at the context minus 12 (the answer)")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--plain", action="store_true", help="no chat template (bos + text + answer prefix)")
    p.add_argument("--out", default="needle_format_cpu.jsonl")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load(a.model, attn_implementation="sdpa", dtype=getattr(torch, a.dtype))
    if a.plain:
        tok.chat_template = None
    hay = haystack_text()
    ctx = model.config.get_text_config().max_position_embeddings

    def render(user, prefix):
        if a.plain:
            return user + "\n\n" + prefix
        return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                       add_generation_prompt=True) + prefix

    def enc(text):
        return list(tok(text, add_special_tokens=a.plain)["input_ids"])

    hay_ids = list(tok(hay[: 16 * 32768], add_special_tokens=False)["input_ids"])

    def build(name, length, depth, seed):
        if name == "demo":
            s = cli.build_needle_prompt(tok, hay, length, depth=depth, seed=seed)
            return s["number"], s["prompt"], s["input_ids"], s["depth"]
        d = spec(name)
        v = d["value"](random.Random(seed))
        kk = f" for {KEYS[seed % len(KEYS)]}" if d["keyed"] else ""
        needle = d["needle"](v).replace("{kk}", kk)
        head, question, prefix = (d[k].replace("{kk}", kk) for k in ("head", "question", "prefix"))

        def make(budget):
            context, actual = cli._with_needle(tok.decode(hay_ids[:budget]), needle, depth)
            return render(head + context + "\n\n" + question, prefix), actual

        budget, best = length - len(enc(make(0)[0])), None
        for _ in range(8):
            prompt, actual = make(budget)
            ids = enc(prompt)
            if len(ids) <= length and (best is None or len(ids) > len(best[2])):
                best = (v, prompt, ids, actual)
            if length - 8 <= len(ids) <= length:
                break
            budget += length - len(ids) - (2 if len(ids) > length else 0)
        return best

    eos = cli._eos_ids(model, tok)

    @torch.inference_mode()
    def answer(ids, prompt, v):
        sep = "" if prompt.endswith("#") else " "
        full = enc(prompt + sep + v)
        assert full[: len(ids)] == ids, "the answer does not continue the prompt's tokens"
        ans_ids = full[len(ids):]
        out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        past, first = out.past_key_values, out.logits[0, -1].float().log_softmax(-1)
        # teacher forcing on a copy: a sliding-window cache cannot be cropped back
        forced = model(input_ids=torch.tensor([ans_ids[:-1]]), past_key_values=copy.deepcopy(past), use_cache=True).logits[0]
        logps = [first] + list(forced.float().log_softmax(-1))
        lp = [float(x[t]) for x, t in zip(logps, ans_ids)]
        ranks = [int((x > x[t]).sum()) for x, t in zip(logps, ans_ids)]
        nxt = first.argmax()[None]
        gen = [int(nxt)]
        while len(gen) < cli.MAX_NEW_TOKENS and gen[-1] not in eos:
            o = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1)
            gen.append(int(nxt))
        if gen[-1] in eos:
            gen = gen[:-1]
        text = tok.decode(gen, skip_special_tokens=True).strip()
        return text, dict(logp=round(sum(lp), 2), min_lp=round(min(lp), 2), worst_rank=max(ranks))

    with open(a.out, "a") as f:
        for length in [int(x) for x in a.lengths.split(",")]:
            length = min(length, ctx) - 12
            for name in a.formats.split(","):
                for depth in [float(x) for x in a.depths.split(",")]:
                    for seed in [int(x) for x in a.seeds.split(",")]:
                        v, prompt, ids, actual = build(name, length, depth, seed)
                        t0 = time.time()
                        text, lp = answer(ids, prompt, v)
                        rec = dict(model=a.model, dtype=a.dtype, plain=a.plain, format=name, length=length, tokens=len(ids),
                                   depth=depth, depth_actual=round(actual, 3), seed=seed, value=v, answer=text,
                                   found=v in text, **lp, secs=round(time.time() - t0, 1))
                        print(json.dumps(rec), flush=True)
                        f.write(json.dumps(rec) + "\n")
                        f.flush()


if __name__ == "__main__":
    main()
