"""``flexprefill demo``: a needle-in-a-haystack prompt through a packaged model, once with dense
SDPA and once with FlexPrefill.

Prints both answers, both prefill times, the speed-up and the per-layer density, and draws the
selected block pattern of a few heads.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from .cli import (
    MAX_NEW_TOKENS,
    _context_length,
    _eos_ids,
    _LayerProgress,
    _log,
    _sync,
    add_model_args,
    default_block_size,
    default_length,
    default_min_budget,
    greedy_tokens,
    start_run,
)

__all__ = ["add_parser", "run_demo", "build_needle_prompt", "needle_key", "CPU_LENGTH", "CPU_BLOCK_SIZE"]

# prompt tokens and block size of the demo on the CPU (the GPU runs the model's context at
# block 128): long enough for the search to drop blocks and for SmolLM2 to find the needle,
# short enough for a laptop and for CI (docs/limits.md has the CPU timings)
CPU_LENGTH = 2048
CPU_BLOCK_SIZE = 128

# The needle names a key and marks the number with "#"; the question names the key before and
# after the essays, and the prompt ends with the needle's own words up to the "#", so the model
# only has to copy the digits that follow the one matching place in the context (the question
# never contains the number; docs/results.md has how often the small models find it).
HEAD = "There is a special magic number for {key} hidden in the text below. Find it and remember it."
NEEDLE = "The special magic number for {key} is #{number}."
QUESTION = "What is the special magic number for {key} mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The special magic number for {key} is #"
_KEY_ADJECTIVES = (
    "amber", "brisk", "copper", "dusty", "frozen", "gentle", "hollow", "ivory", "jagged", "lunar", "mellow",
    "nimble", "olive", "purple", "quiet", "rusty", "silent", "tawny", "velvet", "wooden", "golden", "crimson",
)
_KEY_NOUNS = (
    "anchor", "badger", "candle", "dolphin", "elephant", "falcon", "giraffe", "harbor", "igloo", "jackal",
    "kettle", "lantern", "meadow", "nutmeg", "orchard", "pumpkin", "quarry", "raccoon", "saddle", "tangerine",
    "umbrella", "walrus",
)


def add_parser(sub) -> None:
    """Add the ``demo`` subcommand to ``flexprefill``'s argument parser."""
    demo = sub.add_parser(
        "demo",
        help="needle-in-a-haystack: dense SDPA vs FlexPrefill on a packaged model",
        description=(
            "Builds a needle-in-a-haystack prompt (a 7-digit magic number for a named key hidden in essays), answers it "
            "with dense SDPA and with FlexPrefill (FlexPrefill prefill, dense decode), and prints the "
            "answers, prefill times, speed-up and per-layer density; writes a PNG of the selected blocks."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(demo, cpu_length=CPU_LENGTH, block_size=CPU_BLOCK_SIZE)
    demo.add_argument(
        "--min-seq-len",
        type=int,
        default=None,
        help="prompts shorter than this run dense (default: half the prompt length, so FlexPrefill runs)",
    )
    demo.add_argument(
        "--dense-above",
        type=float,
        default=None,
        help="run a layer dense when its selection keeps more than this share of the causal blocks (one host sync per layer)",
    )
    demo.add_argument("--depth", type=float, default=0.5, help="needle depth in the essays, 0 (start) to 1 (end)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the magic number and of its key")
    demo.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    demo.add_argument("--plot-layer", type=int, default=None, help="layer whose heads are drawn (default: a middle FlexPrefill layer)")
    demo.add_argument("--plot-heads", type=int, default=4, help="how many heads to draw")
    demo.add_argument("--out", default="./flexprefill-demo", help="folder for the PNG and a JSON summary")
    demo.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _templated(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, user: str, answer_prefix: str) -> str:
    if _templated(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return text + answer_prefix
    return user + "\n\n" + answer_prefix


def _encode(tokenizer, text: str) -> list[int]:
    # a chat template already carries its special tokens
    return list(tokenizer(text, add_special_tokens=not _templated(tokenizer))["input_ids"])


def _with_needle(context: str, needle: str, depth: float) -> tuple[str, float]:
    """Insert the needle at a sentence end near ``depth`` of the context; returns (text, actual depth)."""
    pos = int(depth * len(context))
    cut = context.rfind(". ", 0, pos)
    pos = 0 if cut < 0 or depth <= 0 else cut + 2
    return context[:pos] + needle + " " + context[pos:], pos / max(len(context), 1)


def needle_key(seed: int) -> tuple[str, str]:
    """(7-digit number, key such as "velvet-lantern") of the needle for ``seed``."""
    rng = random.Random(seed)
    number = str(rng.randint(1_000_000, 9_999_999))
    return number, f"{rng.choice(_KEY_ADJECTIVES)}-{rng.choice(_KEY_NOUNS)}"


def build_needle_prompt(tokenizer, haystack: str, length: int, *, depth: float = 0.5, seed: int = 0) -> dict:
    """A needle-in-a-haystack prompt of about ``length`` tokens (never more).

    The needle ``The special magic number for <key> is #<number>.`` sits at ``depth`` of the
    essays; the task (``HEAD``) before the essays and the question after them name the key
    (never the number), and the prompt ends with the answer prefix ``The special magic number
    for <key> is #``, so a correct greedy answer starts with the number.

    Returns a dict: ``prompt`` (text, chat template applied when the tokenizer has one),
    ``input_ids`` (list), ``number`` (the 7-digit answer, str), ``depth`` (actual).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must be in [0, 1]")
    number, key = needle_key(seed)
    needle = NEEDLE.format(key=key, number=number)
    head = HEAD.format(key=key) + "\n\n"
    question = QUESTION.format(key=key)
    prefix = ANSWER_PREFIX.format(key=key)
    frame = _encode(tokenizer, _render(tokenizer, head + needle + "\n\n" + question, prefix))
    if length <= len(frame) + 16:
        raise ValueError(f"length={length} is too short: the needle and question alone take {len(frame)} tokens")
    # tokenise a generous slice of the essays once; repeat them if they are too short
    chars = max(16 * length, 4096)
    text = haystack
    while len(text) < chars:
        text = text + "\n\n" + haystack
    hay_ids = list(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])
    budget = length - len(frame)
    best = None
    for _ in range(6):
        budget = max(1, min(budget, len(hay_ids)))
        context, actual = _with_needle(tokenizer.decode(hay_ids[:budget]), needle, depth)
        prompt = _render(tokenizer, head + context + "\n\n" + question, prefix)
        ids = _encode(tokenizer, prompt)
        if len(ids) <= length and (best is None or len(ids) > len(best["input_ids"])):
            best = {"prompt": prompt, "input_ids": ids, "number": number, "depth": actual}
        if length - 8 <= len(ids) <= length:
            break
        budget += length - len(ids) - (2 if len(ids) > length else 0)
    if best is None:
        raise RuntimeError(f"could not fit a prompt into {length} tokens")
    return best


@torch.inference_mode()
def _answer(model, tokenizer, input_ids: list[int], max_new_tokens: int, label: str, progress: bool, repeats: int = 1):
    """Prefill (timed; the median of ``repeats``) then greedy decode; returns (answer, prefill seconds)."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    times, out = [], None
    for i in range(repeats):
        with _LayerProgress(model, f"{label} prefill", disable=not progress):
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            _sync(device)
            times.append(time.perf_counter() - t0)
    gen = greedy_tokens(model, out, max_new_tokens, _eos_ids(model, tokenizer))
    return tokenizer.decode(gen, skip_special_tokens=True).strip(), sorted(times)[len(times) // 2]


class _SelectionRecorder:
    """Selector that runs FlexPrefill's own pattern search (``select_blocks``, which with
    ``block_sparse_attention`` is exactly what ``flex_prefill_attention`` runs) and keeps the
    selection of one layer for the picture."""

    def __init__(self, layer_of_call):
        self.layer_of_call = layer_of_call
        self.keep_layer = None
        self.calls = 0
        self.kept = None

    def __call__(self, q, k, *, config, softmax_scale=None):
        from flexprefill.api import select_blocks

        sel = select_blocks(q, k, config=config, softmax_scale=softmax_scale)
        if self.layer_of_call(self.calls) == self.keep_layer:
            self.kept = sel
        self.calls += 1
        return sel


def _pick_heads(sel, n: int) -> list[int]:
    """Up to ``n`` heads of batch 0, mixing patterns when both occur."""
    qa = sel.query_aware[0].cpu().tolist()
    vs = [h for h, x in enumerate(qa) if not x]
    qas = [h for h, x in enumerate(qa) if x]
    heads = []
    while len(heads) < min(n, len(qa)):
        for group in (vs, qas):
            if group and len(heads) < n:
                heads.append(group.pop(0))
    return sorted(heads)


def run_demo(args, *, model=None, tokenizer=None, haystack: str | None = None) -> dict:
    """Run the demo with parsed ``args``; ``model``/``tokenizer``/``haystack`` may be injected
    (tests use a tiny random model).  Prints the report and returns it as a dict."""
    from flexprefill.config import DEFAULT_MIN_SEQ_LEN, FlexPrefillConfig
    from flexprefill.integrations import transformers as tf
    from .plotting import plot_block_masks

    if haystack is None:
        from .models import haystack_text

        # before the model: a missing essay package should stop the demo at once
        haystack = haystack_text()
    progress, device, dtype, steps, model, tokenizer, model_name = start_run(args, "demo", 6, model, tokenizer)
    steps.update(1)

    ctx = _context_length(model)
    length = args.length
    if length is None:
        length = default_length(ctx, device, CPU_LENGTH) - args.max_new_tokens
        if ctx is not None:
            length = min(length, ctx - args.max_new_tokens)
    elif ctx is not None and length + args.max_new_tokens > ctx:
        _log(f"--length {length} plus the answer exceeds the model's context of {ctx} tokens")

    steps.set_postfix_str("building prompt")
    sample = build_needle_prompt(tokenizer, haystack, length, depth=args.depth, seed=args.seed)
    n_tokens = len(sample["input_ids"])
    min_budget = default_min_budget(args, length)
    min_seq_len = args.min_seq_len if args.min_seq_len is not None else min(DEFAULT_MIN_SEQ_LEN, n_tokens // 2)
    cfg = FlexPrefillConfig(
        block_size=default_block_size(args, device, CPU_BLOCK_SIZE), gamma=args.gamma, tau=args.tau,
        min_budget=min_budget, min_seq_len=min_seq_len,
        dense_above=args.dense_above,
    )
    steps.update(1)

    repeats = 3 if device.type == "cuda" else 1
    # dense first, on the model as loaded (SDPA)
    steps.set_postfix_str("dense SDPA")
    # warm-up: one-time library initialisation must not count as dense prefill time
    _answer(model, tokenizer, sample["input_ids"], 1, "warm-up dense", progress)
    dense_answer, dense_s = _answer(model, tokenizer, sample["input_ids"], args.max_new_tokens, "dense", progress, repeats)
    steps.update(1)

    steps.set_postfix_str("FlexPrefill")
    full_layers = tf._full_attention_layers(model)
    recorder = _SelectionRecorder(lambda call: full_layers[call % len(full_layers)] if full_layers else None)
    plot_layer = args.plot_layer if args.plot_layer is not None else (full_layers[len(full_layers) // 2] if full_layers else None)
    with tf.patched(model, cfg, selector=recorder, collect_stats=True):
        # on CPU a full FlexPrefill warm-up would double the slow reference run: warm up on a prefix
        warm = sample["input_ids"] if device.type == "cuda" else sample["input_ids"][: max(min_seq_len, 2 * cfg.block_size)]
        _answer(model, tokenizer, warm, 1, "warm-up FlexPrefill", progress)
        recorder.calls, recorder.keep_layer = 0, plot_layer
        flex_answer, flex_s = _answer(model, tokenizer, sample["input_ids"], args.max_new_tokens, "FlexPrefill", progress, repeats)
        stats = tf.last_stats(model)
        record = tf.last_record(model, prefill=True)
    steps.update(1)

    steps.set_postfix_str("report")
    # a layer whose selection was denser than --dense-above ran dense: listed apart
    too_dense = sorted(i for i, s in stats.items() if s.dense)
    stats = {i: s for i, s in stats.items() if not s.dense}
    density = {i: float(s.density.float().mean()) for i, s in sorted(stats.items())}
    qa_heads = {i: int(s.query_aware.sum()) for i, s in sorted(stats.items())}
    heads = next(iter(stats.values())).density.shape[1] if stats else 0
    dense_layers = {i: r.reason for i, r in sorted(record.items()) if r.path == "dense"}
    window_layers = sorted(i for i, r in record.items() if r.path == "window")
    mean_density = sum(density.values()) / len(density) if density else None
    number = sample["number"]
    report = {
        "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "prompt_tokens": n_tokens,
        "needle_depth": round(sample["depth"], 3),
        "magic_number": number,
        "needle_key": needle_key(args.seed)[1],
        "config": {"block_size": cfg.block_size, "gamma": cfg.gamma, "tau": cfg.tau, "min_budget": cfg.min_budget,
                   "min_seq_len": cfg.min_seq_len, "dense_above": cfg.dense_above},
        "dense": {"answer": dense_answer, "found": number in dense_answer, "prefill_s": round(dense_s, 4)},
        "flexprefill": {"answer": flex_answer, "found": number in flex_answer, "prefill_s": round(flex_s, 4)},
        "speedup": round(dense_s / flex_s, 3) if flex_s > 0 else None,
        "density_per_layer": density,
        "query_aware_heads_per_layer": qa_heads,
        "mean_density": None if mean_density is None else round(mean_density, 4),
        "dense_layers": dense_layers,
        "window_layers": window_layers,
        "dense_above_layers": too_dense,
        "plot": None,
    }
    steps.update(1)

    steps.set_postfix_str("plot")
    os.makedirs(args.out, exist_ok=True)
    if recorder.kept is not None:
        sel = recorder.kept
        picked = _pick_heads(sel, args.plot_heads)
        masks = sel.to_mask()[0]
        qa = sel.query_aware[0].cpu().tolist()
        path = os.path.join(args.out, "block_masks.png")
        plot_block_masks(
            [masks[h] for h in picked],
            [f"layer {plot_layer}, head {h}" for h in picked],
            path,
            patterns=["query_aware" if qa[h] else "vertical_slash" for h in picked],
            suptitle=f"{model_name}: {n_tokens} tokens, block {cfg.block_size}, gamma {cfg.gamma}, tau {cfg.tau}",
        )
        report["plot"] = path
    with open(os.path.join(args.out, "demo.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    steps.update(1)
    steps.close()
    _print_report(report, heads, device)
    return report


def _print_report(r: dict, heads: int, device: torch.device) -> None:
    c = r["config"]
    print(f"model        {r['model']} on {r['device']} ({r['dtype']})")
    print(f"prompt       {r['prompt_tokens']} tokens, needle at depth {r['needle_depth']:.2f}, magic number {r['magic_number']} "
          f"(key {r['needle_key']})")
    print(f"FlexPrefill  block {c['block_size']}, gamma {c['gamma']}, tau {c['tau']}, min_budget {c['min_budget']}, "
          f"min_seq_len {c['min_seq_len']}")
    for key, label in (("dense", "dense SDPA "), ("flexprefill", "FlexPrefill")):
        a = r[key]
        print(f"{label}  answer {a['answer']!r}  found needle: {'yes' if a['found'] else 'no'}  prefill {a['prefill_s']:.3f} s")
    # on the CPU the MLPs dominate a small model's prefill and the plain-torch path gains only on sparse layers
    note = ("  (CPU: the plain-torch path gains only on layers well below half density, and attention is a small "
            "share of this prefill; the fast path is the GPU kernel)") if device.type == "cpu" else ""
    print(f"speed-up     {r['speedup']:.2f}x{note}" if r["speedup"] is not None else "speed-up     n/a")
    if r["density_per_layer"]:
        print(f"density per layer (computed causal blocks, mean over {heads} heads; query-aware heads in brackets):")
        items = [f"{i}: {d:.3f} [{r['query_aware_heads_per_layer'][i]}]" for i, d in r["density_per_layer"].items()]
        for j in range(0, len(items), 6):
            print("  " + "   ".join(items[j : j + 6]))
        print(f"mean density {r['mean_density']:.3f} over {len(items)} FlexPrefill layers")
    else:
        print("density      no layer ran FlexPrefill")
    if r.get("window_layers"):
        print(f"window       layers {r['window_layers']}: exact sliding-window kernel (no pattern search)")
    if r.get("dense_above_layers"):
        print(f"dense        layers {r['dense_above_layers']}: selection denser than --dense-above "
              f"{c['dense_above']}, ran dense attention")
    if r["dense_layers"]:
        reasons = sorted(set(r["dense_layers"].values()))
        print(f"dense layers {sorted(r['dense_layers'])} ({', '.join(reasons)})")
    print(f"plot         {r['plot']}" if r["plot"] else "plot         none (no FlexPrefill layer)")
