"""``flexprefill tp-check``: tensor-parallel prefill under ``torchrun``, checked against one device.

Loads the model sharded over all ranks (transformers' tensor-parallel plan, prepared by
:mod:`flexprefill.integrations.tensor_parallel`) with ``attn_implementation`` switched to
FlexPrefill, runs a long prefill, and checks it against the same model on one device: logits
with ``gamma=1``, the greedy answer (the needle's number for a packaged model) with the chosen
gamma, and prefill times of dense SDPA and FlexPrefill on one device and on all ranks.  Writes
``tp_prefill.json`` and a plot.

    torchrun --nproc-per-node 2 -m flexprefill_tools tp-check --model gemma3-270m --out tp-gemma
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from flexprefill.integrations.tensor_parallel import (
    _RANDOM_PREFIX,
    ARCHITECTURES,
    _config,
    _text_config,
    check_tp_heads,
    init_distributed,
    load_sharded,
    prepare_checkpoint,
)

__all__ = ["build_parser", "run", "main", "prepare_packaged_checkpoint"]


def _log(msg: str) -> None:
    rank = os.environ.get("RANK")
    print(f"[flexprefill tp-check{'' if rank is None else ' rank ' + rank}] {msg}", file=sys.stderr, flush=True)


def prepare_packaged_checkpoint(model: str, *, tp_size: int, dtype: torch.dtype, layers: int | None = None,
                                seed: int = 0, cache_dir: str | None = None) -> Path:
    """:func:`~flexprefill.integrations.tensor_parallel.prepare_checkpoint` that also reads the
    packaged models and ``.gguf`` files (through :func:`flexprefill_tools.models.load`)."""
    from .models import load
    from .models.packages import cache_root

    def loader(name):
        return load(name, dtype=torch.float32, cache_dir=cache_dir)

    return prepare_checkpoint(model, tp_size=tp_size, dtype=dtype, layers=layers, seed=seed,
                              folder_root=cache_root(cache_dir) / "tp", loader=loader)




def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexprefill tp-check",
        description=(
            "Run under torchrun. Loads the model sharded by heads over all ranks (transformers' tensor-parallel "
            "plan) and on one device, runs a long prefill with dense SDPA, FlexPrefill at gamma=1 and at --gamma, "
            "and checks the sharded model against the single-device one (logits at gamma=1, greedy answer at "
            "--gamma); times each prefill. Writes tp_prefill.json and tp_prefill.png."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="gemma3-270m",
                   help=f"packaged name, HF folder, .gguf, or {_RANDOM_PREFIX}<arch> with arch in {sorted(ARCHITECTURES)}")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of a random:<arch> model (default: the architecture's)")
    p.add_argument("--length", type=_tokens, default=None,
                   help="prompt tokens, e.g. 32k (default: the model's context less the answer, 2048 on CPU)")
    p.add_argument("--gamma", type=float, default=0.9, help="FlexPrefill's attention mass for the sparse run")
    p.add_argument("--block-size", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--min-budget", type=int, default=None, help="tokens (default 1024, or length/8 below 8k)")
    p.add_argument("--min-seq-len", type=int, default=None, help="shorter prompts run dense (default: half the prompt)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per case (median)")
    p.add_argument("--check-positions", type=int, default=64, help="last positions whose logits are compared")
    p.add_argument("--max-new-tokens", type=int, default=12, help="greedy answer length")
    p.add_argument("--no-single", action="store_true", help="skip the single-device run (no checks, no 1-device times)")
    p.add_argument("--seed", type=int, default=0, help="random weights and random prompt / needle seed")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in the essays, 0 (start) to 1 (end)")
    p.add_argument("--cache-dir", default=None, help="where converted checkpoints go (default $FLEXPREFILL_CACHE or ~/.cache/flexprefill)")
    p.add_argument("--out", default="./flexprefill-tp", help="folder for tp_prefill.json and tp_prefill.png")
    return p


def _tokens(text: str) -> int:
    from .evals import _ints

    try:
        n = _ints(text)
    except ValueError:
        n = []
    if len(n) != 1 or n[0] < 1:
        raise argparse.ArgumentTypeError(f"--length {text!r}: expected a positive number of tokens such as 32768 or 32k")
    return n[0]


def _barrier(world: int, device: torch.device) -> None:
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@torch.inference_mode()
def _run_case(model, ids, device, world, *, keep: int, repeats: int, max_new_tokens: int, eos: set[int]):
    """One case on one model: a prefill that returns the last ``keep`` positions' logits (also the
    warm-up), ``repeats`` timed prefills (no cache, last logits only), then prefill + greedy
    decode.  Times are the slowest rank's."""
    from .cli import _sync, greedy_tokens

    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[0].float().cpu()
    times = []
    for _ in range(repeats):
        _barrier(world, device)
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times = [max(ts) for ts in zip(*_gather(times, world))]
    gen = greedy_tokens(model, model(input_ids=ids, use_cache=True, logits_to_keep=1), max_new_tokens, eos)
    return logits, times, gen


def _density(model, world: int) -> float | None:
    """Mean selected density over every FlexPrefill layer and head of all ranks (last prefill)."""
    from flexprefill.integrations.transformers import last_stats

    local = [(float(s.density.float().sum()), int(s.density.numel())) for s in last_stats(model).values() if not s.dense]
    parts = [x for r in _gather(local, world) for x in r]
    n = sum(c for _, c in parts)
    return sum(s for s, _ in parts) / n if n else None


def _cases(args, n_tokens: int):
    from flexprefill.config import DEFAULT_MIN_SEQ_LEN, FlexPrefillConfig

    min_budget = args.min_budget if args.min_budget is not None else (1024 if n_tokens >= 8192 else max(n_tokens // 8, 1))
    min_seq_len = args.min_seq_len if args.min_seq_len is not None else min(DEFAULT_MIN_SEQ_LEN, n_tokens // 2)
    common = dict(block_size=args.block_size, min_budget=min_budget, min_seq_len=min_seq_len)
    return [
        ("sdpa", None),
        ("flexprefill_gamma1", FlexPrefillConfig(gamma=1.0, **common)),
        (f"flexprefill_gamma{args.gamma:g}", FlexPrefillConfig(gamma=args.gamma, **common)),
    ]


def _run_all(model, cases, ids, device, world, args, eos, decode, label: str) -> dict:
    from tqdm.auto import tqdm

    from flexprefill.integrations.transformers import patched

    res = {}
    rank0 = int(os.environ.get("RANK", 0)) == 0
    for name, cfg in tqdm(cases, desc=label, disable=not rank0, file=sys.stderr):
        if cfg is None:
            logits, times, gen = _run_case(model, ids, device, world, keep=args.check_positions, repeats=args.repeats,
                                           max_new_tokens=args.max_new_tokens, eos=eos)
            density = None
        else:
            with patched(model, cfg, collect_stats=True):
                logits, times, gen = _run_case(model, ids, device, world, keep=args.check_positions,
                                               repeats=args.repeats, max_new_tokens=args.max_new_tokens, eos=eos)
                density = _density(model, world)
        res[name] = {"logits": logits, "prefill_s": times, "tokens": gen, "answer": decode(gen), "density": density}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "logit_scale": float(a.abs().max()),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def _environment(device: torch.device, world: int) -> dict:
    """The benchmarks' stamp (GPU name, torch/triton/transformers versions, commit) and the ranks."""
    from .stamp import env_stamp

    env = {**env_stamp(), "world_size": world, "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
    if device.type == "cuda":
        env["gpus_visible"] = torch.cuda.device_count()
    return env


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(report["sharded"]["cases"])
    groups = [("1 device", report.get("single")), (f"{report['environment']['world_size']} ranks (tensor parallel)",
                                                    report["sharded"])]
    groups = [(g, r) for g, r in groups if r is not None]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(groups)
    for gi, (label, r) in enumerate(groups):
        ms = [r["cases"][c]["prefill_ms"] for c in cases]
        xs = [i + (gi - (len(groups) - 1) / 2) * width for i in range(len(cases))]
        bars = ax.bar(xs, ms, width, label=label)
        ax.bar_label(bars, labels=[f"{m:.0f}" for m in ms], fontsize=8)
    ax.set_xticks(range(len(cases)), [c.replace("_", " ") for c in cases])
    ax.set_ylabel("prefill time (ms, median)")
    env = report["environment"]
    ax.set_title(f"{report['model']}: {report['prompt_tokens']} tokens, {env.get('gpu') or 'cpu'}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict | None:
    """The whole ``flexprefill tp-check`` run on this rank; returns the report on rank 0, else None."""
    import gc

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rank, world, device = init_distributed()
    if world == 1:
        _log("one rank (not started by torchrun, or --nproc-per-node 1): the 'sharded' run is the same model "
             "on one device; start with: torchrun --nproc-per-node N -m flexprefill_tools tp-check ...")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"--dtype {args.dtype}: the CPU path computes in float32 only")
    t_start = time.perf_counter()
    if rank == 0:
        folder = prepare_packaged_checkpoint(args.model, tp_size=world, dtype=dtype, layers=args.layers,
                                             seed=args.seed, cache_dir=args.cache_dir)
        info = str(folder)
    else:
        info = None
    folder = Path(_gather(info, world)[0])
    config = _config(folder)
    check_tp_heads(config, world)
    tokenizer = None
    if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ctx = int(getattr(_text_config(config), "max_position_embeddings", 0) or 0)
    length = args.length or (min(ctx or 32768, 131072) - args.max_new_tokens if device.type == "cuda" else 2048)
    if ctx and length + args.max_new_tokens > ctx:
        _log(f"--length {length} plus the answer exceeds the model's context of {ctx} tokens")

    needle = None
    if tokenizer is not None:
        from .cli import build_needle_prompt
        from .models import haystack_text

        needle = build_needle_prompt(tokenizer, haystack_text(), length, depth=args.depth, seed=args.seed)
        ids_list = needle["input_ids"]
        eos = {int(x) for x in ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}

        def decode(gen):
            return tokenizer.decode(gen, skip_special_tokens=True).strip()
    else:
        g = torch.Generator().manual_seed(args.seed)
        ids_list = torch.randint(0, int(_text_config(config).vocab_size), (length,), generator=g).tolist()
        eos = set()

        def decode(gen):
            return " ".join(str(t) for t in gen)
    ids = torch.tensor([ids_list], device=device)
    cases = _cases(args, len(ids_list))
    if rank == 0:
        _log(f"{args.model}: {len(ids_list)} prompt tokens, {world} ranks, {dtype}, cases {[c for c, _ in cases]}")

    single = None
    if not args.no_single:
        if rank == 0:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
            model = model.to(device).eval()
            single = _run_all(model, cases, ids, device, 1, args, eos, decode, "1 device")
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _barrier(world, device)

    model = load_sharded(folder, tp_size=world, dtype=dtype)
    sharded = _run_all(model, cases, ids, device, world, args, eos, decode, f"{world} ranks")
    shard_info = {
        "q_proj_local_rows": int(_local(model, "q_proj").shape[0]),
        "k_proj_local_rows": int(_local(model, "k_proj").shape[0]),
    }
    del model
    gc.collect()
    if rank != 0:
        return None

    def summary(res):
        out = {}
        for name, r in res.items():
            out[name] = {"prefill_ms": round(1000 * statistics.median(r["prefill_s"]), 2),
                         "prefill_ms_all": [round(1000 * t, 2) for t in r["prefill_s"]],
                         "answer": r["answer"], "density": None if r["density"] is None else round(r["density"], 4)}
            if needle is not None:
                out[name]["found"] = needle["number"] in r["answer"]
        return out

    c = _text_config(config)
    report = {
        "model": args.model, "checkpoint": str(folder), "layers": int(c.num_hidden_layers),
        "heads": {"query": int(c.num_attention_heads), "key_value": int(c.num_key_value_heads),
                  "head_dim": int(getattr(c, "head_dim", 0) or c.hidden_size // c.num_attention_heads),
                  "per_rank": {"query": int(c.num_attention_heads) // world, "key_value": int(c.num_key_value_heads) // world},
                  **shard_info},
        "prompt_tokens": len(ids_list), "dtype": str(dtype).replace("torch.", ""),
        "needle": None if needle is None else {"number": needle["number"], "depth": round(needle["depth"], 3)},
        "environment": _environment(device, world),
        "sharded": {"cases": summary(sharded)},
        "single": None if single is None else {"cases": summary(single)},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if single is not None:
        g1 = cases[1][0]
        gs = cases[2][0]
        cmp = {name: _compare(sharded[name]["logits"], single[name]["logits"]) for name in sharded}
        cmp[f"{g1}_vs_sdpa_sharded"] = _compare(sharded[g1]["logits"], sharded["sdpa"]["logits"])
        # the sharded model sums o_proj and down_proj over ranks: its logits differ from one
        # device's by rounding, which dense SDPA shows on its own; gamma=1 must stay within that
        atol = 1e-3 if dtype == torch.float32 else 0.0
        bound = 2 * cmp["sdpa"]["max_abs_diff"] + atol
        checks = {
            "gamma1_logits_match_single": {
                "pass": cmp[g1]["max_abs_diff"] <= bound and cmp[g1]["top1_agree"] >= cmp["sdpa"]["top1_agree"] - 1 / 64,
                "max_abs_diff": cmp[g1]["max_abs_diff"], "bound": bound,
                "rule": "max |sharded - single| of the gamma=1 logits <= 2 x that of dense SDPA + atol "
                        f"({atol:g}), top-1 agreement no worse than dense SDPA's less one position",
            },
        }
        a, b = sharded[gs]["tokens"], single[gs]["tokens"]
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        report["answers"] = {"case": gs, "sharded": sharded[gs]["answer"], "single": single[gs]["answer"],
                             "tokens_agreeing": agree, "tokens": max(len(a), len(b))}
        if needle is not None:
            # the accuracy check: the number the sharded model reads from the needle is the one the
            # single-device model reads (random-weight models have no needle: their greedy tokens
            # are reported above, not checked, since near-uniform random logits tie often)
            num = needle["number"]
            lead = [re.match(r"\s*#?(\d+)", r[gs]["answer"]) for r in (sharded, single)]
            lead = [m.group(1) if m else None for m in lead]
            checks["needle_answer_matches_single"] = {"pass": lead[0] == lead[1], "sharded": lead[0], "single": lead[1]}
            checks["needle_found"] = {"pass": num in sharded[gs]["answer"], "number": num,
                                      "dense_single_found": num in single["sdpa"]["answer"]}
        report["comparison"] = cmp
        report["checks"] = checks
        report["speedup_vs_single"] = {
            name: round(report["single"]["cases"][name]["prefill_ms"] / report["sharded"]["cases"][name]["prefill_ms"], 3)
            for name in sharded}
        report["all_checks_pass"] = all(v["pass"] for v in checks.values())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tp_prefill.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    _plot(report, os.path.join(args.out, "tp_prefill.png"))
    _print(report)
    return report


def _local(model, name: str) -> torch.Tensor:
    for n, p in model.named_parameters():
        if n.endswith(f"{name}.weight"):
            return p.to_local() if hasattr(p, "to_local") else p
    raise ValueError(f"no {name}.weight in the model")


def _print(r: dict) -> None:
    env = r["environment"]
    print(f"model    {r['model']} ({r['layers']} layers, {r['heads']['query']}/{r['heads']['key_value']} heads, "
          f"d={r['heads']['head_dim']}; per rank {r['heads']['per_rank']['query']}/{r['heads']['per_rank']['key_value']})")
    print(f"prompt   {r['prompt_tokens']} tokens, {r['dtype']}, {env['world_size']} ranks on {env.get('gpu') or 'cpu'}")
    width = max(len(c) for c in r["sharded"]["cases"])
    for name, s in r["sharded"]["cases"].items():
        one = (r["single"] or {}).get("cases", {}).get(name)
        line = f"{name:<{width}}  sharded {s['prefill_ms']:9.1f} ms"
        if one is not None:
            line += f"  one device {one['prefill_ms']:9.1f} ms  ({one['prefill_ms'] / s['prefill_ms']:.2f}x)"
        if s["density"] is not None:
            line += f"  density {s['density']:.3f}"
        line += f"  answer {s['answer']!r}"
        print(line)
    if r.get("answers"):
        a = r["answers"]
        print(f"answer   {a['case']}: {a['tokens_agreeing']} of {a['tokens']} greedy tokens agree with one device")
    for name, c in (r.get("checks") or {}).items():
        print(f"check    {name}: {'pass' if c['pass'] else 'FAIL'}  "
              + ", ".join(f"{k}={v}" for k, v in c.items() if k not in ("pass", "rule")))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("repeats", "check_positions", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive int")
    if not 0.0 <= args.depth <= 1.0:
        raise SystemExit(f"--depth {args.depth}: expected a value in [0, 1]")
    if not 0.0 < args.gamma <= 1.0:
        raise SystemExit(f"--gamma {args.gamma}: expected a value in (0, 1]")
    report = run(args)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if report is not None and report.get("all_checks_pass") is False:
        return 1
    return 0
