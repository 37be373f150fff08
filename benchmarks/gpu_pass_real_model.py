"""FlexPrefill on a real model, in one process: its own Q/K/V, its prefill, its accuracy.

    python benchmarks/gpu_pass_real_model.py --out OUT              # GPU: the whole pass (~9 min)
    python benchmarks/gpu_pass_real_model.py --smoke --out OUT      # CPU: every part at tiny lengths

The model is Qwen2.5-Coder-0.5B-Instruct (``--model``: any name of flexprefill_tools.models or a
.gguf path). Parts (``--parts``), run in this order, each saving ``OUT/real_model.json`` when it
ends, so a run cut short keeps what the earlier parts measured:

- ``layers``: the needle prompt of ``flexprefill demo`` at each length (4k-32k); the Q/K/V
  that every layer of the model computes for it are captured, and per layer timed: cuDNN SDPA,
  flash SDPA, our kernel on FlexPrefill's selection, the pattern search alone, and the whole
  operator (search included), with the selection's density. Summed over the layers, and the
  break-even length (the shortest length from which the operator wins at every longer one).
- ``model``: whole-model prefill (time to first token, ``model(ids)`` with ``logits_to_keep=1``)
  on the same prompts: SDPA with cuDNN first, ``attn_implementation="flexprefill"``
  (``min_seq_len=0``: sparse at every length), FlexPrefill with the default config, and the model
  with its attention removed (what the rest of the model costs); each needle answer; the share
  of the prefill spent in attention, by removal and from the summed per-layer times.
- ``evals``: RULER-style tasks (``flexprefill_tools.evals``) at 8k/16k/32k, >= 5 samples per task:
  full attention, FlexPrefill gamma 0.9 and 0.95 (tau 0.1), the streaming and fixed
  vertical-slash baselines; density beside each score.
- ``sweep``: accuracy against density over gamma and tau on a subset of the tasks.
- ``yarn``: ``layers`` and ``model`` at 64k and 128k, the model loaded with YaRN (factor 4 over
  its 32768 context), while time is left.

Outputs: ``OUT/real_model.json`` (rows in the benchmark harness's format: per-layer rows carry
``layer``, summed rows have mode ``real_model``, so ``benchmarks/min_seq_len_table.py`` reads
them), ``OUT/evals/results.jsonl`` (every eval case), ``OUT/evals_summary.md``. Plots:
``benchmarks/plot_real_model.py``. Timings are printed as they come. The pattern search is
inside every operator number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

MODEL = "qwen2.5-coder-0.5b-instruct"
# over the context the model was trained for (32768 for Qwen2.5-Coder: 131072 with YaRN)
YARN = {"rope_type": "yarn", "factor": 4.0}
PARTS = ("layers", "model", "evals", "sweep", "yarn")
LAYER_METHODS = ("cudnn", "flash", "triton_kernel", "selection", "flexprefill")
EVAL_METHODS = ("full", "flexprefill-g0.9-t0.1", "flexprefill-g0.95-t0.1", "streaming", "vertical_slash_fixed")
# cwe (common words, up to 96 answer tokens) is left out by default: its decoding would take a
# third of the evals' time; --eval-tasks adds it
EVAL_TASKS = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt")
SWEEP_METHODS = ("full",) + tuple(f"flexprefill-g{g}-t0.1" for g in (0.7, 0.8, 0.85, 0.9, 0.95, 0.99)) + tuple(
    f"flexprefill-g0.9-t{t}" for t in (0.0, 0.2, 0.3))
SWEEP_TASKS = ("niah_multikey_1", "vt")
# tokens left after the prompt: the needle answer is generated within the length
ANSWER_TOKENS = 32


class Clock:
    """Seconds since the start and a deadline (``minutes`` <= 0: none)."""

    def __init__(self, minutes: float):
        self.t0 = time.perf_counter()
        self.limit = minutes * 60.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.limit <= 0 else self.limit - self.elapsed()


def _log(clock: Clock, msg: str) -> None:
    print(f"[{clock.elapsed():6.1f} s] {msg}", flush=True)


def _save(payload: dict, out: Path) -> None:
    tmp = out / ".real_model.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, default=harness._json_default))
    os.replace(tmp, out / "real_model.json")


def _load(args, *, rope_scaling=None):
    from flexprefill_tools import models

    model, tok = models.load(args.model, dtype=args.torch_dtype, device=args.device, attn_implementation="sdpa",
                             rope_scaling=rope_scaling)
    return model, tok


def _shape(model) -> harness.Shape:
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return harness.Shape(str(getattr(c, "model_type", "model")), c.num_attention_heads, c.num_key_value_heads, d)


class Prompts:
    """The needle prompt of each nominal length (``ANSWER_TOKENS`` fewer tokens), built once."""

    def __init__(self, tok):
        self.tok = tok
        self.cache: dict[int, tuple[list[int], str]] = {}

    def __call__(self, n: int) -> tuple[list[int], str]:
        if n not in self.cache:
            self.cache[n] = harness.needle_prompt(self.tok, n - ANSWER_TOKENS)
        return self.cache[n]


def _best_dense(by_method: dict) -> tuple[str | None, float | None]:
    m = next((m for m in harness.DENSE_METHODS if by_method.get(m)), None)
    return m, (by_method[m] if m else None)


def run_layers(model, tok, prompts, lengths, args, state, *, rope: str) -> None:
    """Per-layer timing on captured Q/K/V at each length, summed rows and the break-even."""
    clock, payload, stamp = state["clock"], state["payload"], state["stamp"]
    from flexprefill.config import FlexPrefillConfig

    shape = _shape(model)
    layers = _timed_layers(model.config.num_hidden_layers, args.max_layers)
    cfg = FlexPrefillConfig(block_size=args.block_size, gamma=args.gamma, tau=args.tau, min_budget=args.min_budget,
                            min_seq_len=0)
    methods = harness._methods_for(torch.device(args.device), LAYER_METHODS)
    unavailable: dict = {}
    dense_cache: dict = {}
    series = []
    for n in lengths:
        if not _fits(state, "layers", n):
            payload["skipped"].append(dict(part=f"layers-{rope}", N=n, reason="time budget"))
            break
        t_len = time.perf_counter()
        ids, _ = prompts(n)
        x = torch.tensor([ids], device=args.device)
        t0 = time.perf_counter()
        rec = harness.capture_qkv(model, x, layers)
        _log(clock, f"layers {rope} N={len(ids)}: captured {len(rec)} layers in {time.perf_counter() - t0:.1f} s")
        summed: dict[str, list[float]] = {}
        dens = []
        for i in layers:
            q, k, v, scale = rec.pop(i)
            case = harness.Case(shape, q.shape[1], "needle", q, k, v, scale, (f"L{i}",))
            rows, pattern = harness.run_case(case, methods, cfg=cfg, stamp=stamp, budget_ms=args.rep_ms,
                                             unavailable=unavailable, dense_cache=dense_cache, mode="real_layer",
                                             log=lambda m: _log(clock, m))
            for r in rows:
                r.update(layer=i, rope=rope, nominal_N=n)
                if r.get("ms"):
                    summed.setdefault(r["method"], []).append(r["ms"])
            payload["rows"].extend(rows)
            if pattern:
                pattern.update(layer=i, rope=rope)
                payload["patterns"].append(pattern)
                dens.append(pattern["density"])
            del q, k, v, case
        harness._free(args.device)
        full = {m: sum(v) for m, v in summed.items() if len(v) == len(layers)}
        base, dense_ms = _best_dense(full)
        density = statistics.mean(dens) if dens else None
        for m, ms in full.items():
            payload["rows"].append(dict(
                mode="real_model", shape=shape.name, Hq=shape.q_heads, Hkv=shape.kv_heads, D=shape.head_dim, B=1,
                N=len(ids), nominal_N=n, input="needle", method=m, ms=ms, layers=len(layers), rope=rope,
                density=1.0 if m in harness.DENSE_METHODS else density, baseline=base,
                speedup=dense_ms / ms if dense_ms else None, dtype=str(args.torch_dtype).replace("torch.", ""),
                block_size=cfg.block_size, gamma=cfg.gamma, tau=cfg.tau, **stamp))
        wins = sum(1 for i in layers if _layer_wins(payload["rows"], i, len(ids), rope))
        series.append((len(ids), full.get("flexprefill"), dense_ms))
        sel_ms = full.get("selection")
        _log(clock, f"layers {rope} N={len(ids)}: {base} {_ms(dense_ms)}, kernel {_ms(full.get('triton_kernel'))}, "
                    f"search {_ms(sel_ms)}, operator {_ms(full.get('flexprefill'))} over {len(layers)} layers"
                    + (f" ({dense_ms / full['flexprefill']:.2f}x)" if dense_ms and full.get("flexprefill") else "")
                    + (f", density {density:.3f}" if density is not None else "") + f", {wins}/{len(layers)} layers faster")
        payload["layer_summary"].append(dict(rope=rope, N=len(ids), nominal_N=n, baseline=base, dense_ms=dense_ms,
                                             kernel_ms=full.get("triton_kernel"), search_ms=sel_ms,
                                             operator_ms=full.get("flexprefill"), density=density,
                                             layers_faster=wins, layers=len(layers),
                                             model_layers=model.config.num_hidden_layers))
        del rec
        harness._free(args.device)
        _save(payload, state["out"])
        state["costs"]["layers"] = (n, time.perf_counter() - t_len)
    if series:
        from flexprefill.config import default_min_seq_len, device_kind

        n_be = harness.break_even_length(*zip(*series))
        kind = device_kind(args.device)
        entry = dict(rope=rope, shape=shape.name, Hq=shape.q_heads, Hkv=shape.kv_heads, D=shape.head_dim,
                     lengths=[s[0] for s in series], operator_ms=[s[1] for s in series], dense_ms=[s[2] for s in series],
                     break_even_N=n_be, device_kind=kind,
                     current_default=default_min_seq_len(head_dim=shape.head_dim, q_heads=shape.q_heads,
                                                         kv_heads=shape.kv_heads, device=args.device))
        payload["breakeven"].append(entry)
        _log(clock, f"break-even {rope} ({kind}, D={shape.head_dim}, {shape.q_heads}/{shape.kv_heads}): "
                    + (f"faster from N={n_be} on" if n_be else f"not faster up to N={series[-1][0]}")
                    + f"; the current default min_seq_len is {entry['current_default']}")
        _save(payload, state["out"])


def _fits(state, part: str, n: int) -> bool:
    """Whether ``part`` at length ``n`` should fit in the time left: its last measured length's
    seconds scaled by the square of the length ratio (attention dominates long lengths), 20% over."""
    last = state["costs"].get(part)
    if last is None:
        return True
    n0, cost = last
    need = 1.2 * cost * max(1.0, n / n0) ** 2
    left = state["clock"].left()
    if left < need:
        _log(state["clock"], f"{part} N={n}: skipped, {left:.0f} s left, about {need:.0f} s needed "
                             f"({cost:.0f} s at N={n0})")
        return False
    return True


def _timed_layers(n: int, most: int) -> list[int]:
    """All ``n`` layers, or ``most`` of them spread from the first to the last."""
    if most <= 0 or most >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(most - 1, 1)) for i in range(most)})


def _ms(x) -> str:
    return f"{x:.2f} ms" if x else "-"


def _layer_wins(rows, layer: int, n: int, rope: str) -> bool:
    by = {r["method"]: r.get("ms") for r in rows
          if r.get("mode") == "real_layer" and r.get("layer") == layer and r.get("N") == n and r.get("rope") == rope}
    _, dense = _best_dense(by)
    return bool(dense and by.get("flexprefill") and by["flexprefill"] < dense)


_NO_ATTENTION = "flexprefill_bench_no_attention"


def _register_no_attention() -> None:
    """An attention implementation that returns zeros: the model's cost without attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def no_attention(module, query, key, value, attention_mask, **kwargs):
        B, H, N, D = query.shape
        return query.new_zeros(B, N, H, value.shape[-1]), None

    AttentionInterface.register(_NO_ATTENTION, no_attention)
    AttentionMaskInterface.register(_NO_ATTENTION, sdpa_mask)


def run_model(model, tok, prompts, lengths, args, state, *, rope: str) -> None:
    """Time to first token of the whole model per method and length, needle answers, attention's share."""
    import flexprefill
    from flexprefill.config import FlexPrefillConfig
    from flexprefill.integrations import transformers as tf

    clock, payload, stamp = state["clock"], state["payload"], state["stamp"]
    _register_no_attention()
    sparse = FlexPrefillConfig(block_size=args.block_size, gamma=args.gamma, tau=args.tau, min_budget=args.min_budget,
                               min_seq_len=0)
    methods = {
        "sdpa": None,
        "flexprefill": sparse,
        "flexprefill_default": FlexPrefillConfig(),
        "no_attention": None,
    }
    layers_ms = {(s["rope"], s["nominal_N"]): s for s in payload["layer_summary"]}
    for n in lengths:
        if not _fits(state, "model", n):
            payload["skipped"].append(dict(part=f"model-{rope}", N=n, reason="time budget"))
            break
        t_len = time.perf_counter()
        ids, number = prompts(n)
        x = torch.tensor([ids], device=args.device)
        got = {}
        for method, cfg in methods.items():
            row = dict(mode="model", shape=_shape(model).name, N=len(ids), nominal_N=n, input="needle", method=method,
                       rope=rope, expected=number, **stamp)
            try:
                if cfg is not None:
                    flexprefill.patch(model, cfg)
                elif method == "no_attention":
                    harness._set_attn(model, _NO_ATTENTION)
                try:
                    with harness._dense_sdpa_context(), torch.inference_mode():
                        def prefill(m=model, x=x):
                            return m(input_ids=x, logits_to_keep=1)

                        t0 = time.perf_counter()
                        prefill()
                        harness._sync(torch.device(args.device))
                        row["warmup_s"] = round(time.perf_counter() - t0, 3)
                        # long prefills (128k) are steady: fewer repetitions
                        reps = args.model_reps if row["warmup_s"] < 0.5 else min(args.model_reps, 3)
                        times = [harness._timed_call(prefill, torch.device(args.device)) for _ in range(reps)]
                        row.update(ms=statistics.median(times), ms_all=[round(t, 3) for t in times], reps=len(times))
                        if cfg is not None:
                            paths = [r.path for r in tf.last_record(model, prefill=True).values()]
                            row["sparse_layers"] = sum(p == "flexprefill" for p in paths)
                            row["layers"] = len(paths)
                            row["min_seq_len"] = cfg.min_seq_len_for(
                                head_dim=_shape(model).head_dim, q_heads=_shape(model).q_heads,
                                kv_heads=_shape(model).kv_heads, device=args.device)
                        if method != "no_attention":
                            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.answer_tokens,
                                                 do_sample=False)
                            answer = tok.decode(gen[0, x.shape[1]:], skip_special_tokens=True).strip()
                            row.update(answer=answer, correct=number in answer)
                finally:
                    if cfg is not None:
                        flexprefill.unpatch(model)
                    elif method == "no_attention":
                        harness._set_attn(model, "sdpa")
                got[method] = row["ms"]
            except Exception as e:  # noqa: BLE001 - one method's failure never stops the pass
                traceback.print_exc()
                row["error"] = harness._first_line(e)
            payload["rows"].append(row)
            _log(clock, f"model {rope} N={len(ids)} {method}: "
                        + (f"{row['ms']:.1f} ms" if row.get("ms") else row.get("error", ""))
                        + (f", answer {row.get('answer')!r} ({'right' if row.get('correct') else 'wrong'})" if "answer" in row else "")
                        + (f", {row['sparse_layers']}/{row['layers']} layers sparse" if "sparse_layers" in row else ""))
        summary = dict(rope=rope, N=len(ids), nominal_N=n, **{f"{m}_ms": v for m, v in got.items()})
        if got.get("sdpa"):
            for m in ("flexprefill", "flexprefill_default"):
                if got.get(m):
                    summary[f"{m}_speedup"] = got["sdpa"] / got[m]
            if got.get("no_attention"):
                summary["attention_share_by_removal"] = 1.0 - got["no_attention"] / got["sdpa"]
                if got.get("flexprefill"):
                    summary["attention_share_flexprefill_by_removal"] = 1.0 - got["no_attention"] / got["flexprefill"]
            lay = layers_ms.get((rope, n))
            if lay and lay.get("dense_ms"):
                # the timed layers stand for all of them (--max-layers times a few)
                per_model = lay["model_layers"] / lay["layers"]
                summary["attention_share_from_layers"] = lay["dense_ms"] * per_model / got["sdpa"]
                if lay.get("operator_ms") and got.get("flexprefill"):
                    summary["attention_share_flexprefill_from_layers"] = lay["operator_ms"] * per_model / got["flexprefill"]
        payload["model_summary"].append(summary)
        _log(clock, "model summary " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in summary.items()))
        _save(payload, state["out"])
        state["costs"]["model"] = (n, time.perf_counter() - t_len)


def _eval_summary(records) -> list[dict]:
    """Mean score and density per (task, length, method), and per method over everything."""
    groups: dict = {}
    for r in records:
        for key in ((r["task"], r["length"], r["method"]), ("all", "all", r["method"])):
            groups.setdefault(key, []).append(r)
    out = []
    for (task, length, method), rs in groups.items():
        dens = [r["density"] for r in rs if r.get("density") is not None]
        out.append(dict(task=task, length=length, method=method, n=len(rs),
                        score=statistics.mean(r["score"] for r in rs),
                        density=statistics.mean(dens) if dens else None,
                        prefill_s=statistics.mean(r["prefill_s"] for r in rs)))
    return sorted(out, key=lambda d: (str(d["task"]), str(d["length"]), d["method"]))


def run_evals(model, tok, args, state, *, methods, tasks, lengths, samples, minutes, label: str) -> None:
    """The evals runner in this process (resumable file under OUT/evals), then the summary."""
    from flexprefill_tools.evals.plots import markdown_table
    from flexprefill_tools.evals.runner import make_cases, parse_method, read_results, run

    clock, payload = state["clock"], state["payload"]
    minutes = min(minutes, max(0.0, clock.left() / 60.0 - args.reserve_minutes))
    if minutes <= 0:
        _log(clock, f"{label}: skipped, no time left")
        payload["skipped"].append(dict(part=label, reason="time budget"))
        return
    shared = {"block_size": args.block_size, "min_budget": args.eval_min_budget, "max_budget": None, "min_seq_len": 0}
    parsed = [parse_method(m, shared=shared) for m in methods]
    cases = make_cases(list(tasks), list(lengths), samples, seed=0)
    out_dir = state["out"] / "evals"
    t0 = time.perf_counter()
    _log(clock, f"{label}: {len(cases)} cases x {len(parsed)} methods, at most {minutes:.1f} min")
    new = run(model, tok, model_name=args.model_name, cases=cases, methods=parsed, out_dir=str(out_dir),
              max_minutes=minutes, progress=False)
    records = read_results(str(out_dir / "results.jsonl"))
    payload["evals"] = dict(summary=_eval_summary(records), records=len(records),
                            settings=dict(shared=shared, tasks_main=list(EVAL_TASKS), methods_main=list(EVAL_METHODS)))
    payload["timings"][label] = round(time.perf_counter() - t0, 1)
    (state["out"] / "evals_summary.md").write_text(
        "# FlexPrefill evaluation\n\nScore: RULER string match; density: computed causal blocks over the causal "
        "grid, mean over layers, heads and cases (full = 1).\n\n" + markdown_table(records))
    _log(clock, f"{label}: {len(new)} new runs in {time.perf_counter() - t0:.0f} s")
    for d in payload["evals"]["summary"]:
        if d["task"] == "all":
            _log(clock, f"  {d['method']}: score {d['score']:.3f}, density "
                        + (f"{d['density']:.3f}" if d["density"] is not None else "-") + f" over {d['n']} runs")
    _save(payload, state["out"])


def _parse_lengths(text: str) -> list[int]:
    return harness._parse_lengths(text) if text else []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_pass_real_model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=MODEL, help="a name of flexprefill_tools.models.MODELS or a .gguf path")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}, run in that order")
    p.add_argument("--layer-lengths", default="4k,8k,16k,32k", help="lengths of the layers and model parts")
    p.add_argument("--lengths", default="8k,16k,32k", help="lengths of the evals")
    p.add_argument("--yarn-lengths", default="64k,128k", help="lengths of the yarn part")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--min-budget", type=int, default=1024, help="FlexPrefill min_budget (tokens) of layers and model")
    p.add_argument("--rep-ms", type=float, default=25.0, help="timing budget per method and layer (ms)")
    p.add_argument("--max-layers", type=int, default=0, help="time this many layers, spread over the model (0: all)")
    p.add_argument("--model-reps", type=int, default=5, help="timed prefills per method and length")
    p.add_argument("--answer-tokens", type=int, default=12, help="greedy tokens of a needle answer")
    p.add_argument("--samples", type=int, default=5, help="eval samples per task and length")
    p.add_argument("--eval-tasks", default=",".join(EVAL_TASKS))
    p.add_argument("--eval-methods", default=",".join(EVAL_METHODS))
    p.add_argument("--eval-min-budget", type=int, default=1024, help="min_budget (tokens) of the eval methods")
    p.add_argument("--eval-minutes", type=float, default=3.6, help="at most this long for evals")
    p.add_argument("--sweep-tasks", default=",".join(SWEEP_TASKS))
    p.add_argument("--sweep-lengths", default="16k,32k")
    p.add_argument("--sweep-samples", type=int, default=3)
    p.add_argument("--sweep-methods", default=",".join(SWEEP_METHODS))
    p.add_argument("--sweep-minutes", type=float, default=1.2, help="at most this long for the sweep")
    p.add_argument("--max-minutes", type=float, default=9.0, help="the whole pass; later parts and lengths are skipped past it")
    p.add_argument("--reserve-minutes", type=float, default=0.3, help="left free at the end of evals and sweep")
    p.add_argument("--smoke", action="store_true", help="tiny lengths and budgets (a CPU check that every part runs)")
    return p


# --smoke: every part at lengths a CPU runs in minutes, with block 64 so the search has blocks
# to drop; options given on the command line keep their values
SMOKE = dict(layer_lengths="512,640", lengths="640", yarn_lengths="768", block_size=64, min_budget=64,
             eval_min_budget=64, rep_ms=1.0, model_reps=1, answer_tokens=9, max_layers=2, samples=1,
             sweep_samples=1, eval_tasks="niah_single_2,vt", sweep_tasks="vt", sweep_lengths="640",
             sweep_methods="full,flexprefill-g0.8-t0.1,flexprefill-g0.9-t0.0", max_minutes=0)


def _smoke(args, parser) -> None:
    defaults = parser.parse_args(["--out", args.out])
    for name, value in SMOKE.items():
        if getattr(args, name) == getattr(defaults, name):
            setattr(args, name, value)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        _smoke(args, parser)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    for x in parts:
        if x not in PARTS:
            raise SystemExit(f"--parts: unknown part {x!r}; accepted: {PARTS}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.torch_dtype = harness._dtype(args.dtype)
    args.model_name = Path(args.model).stem if os.path.exists(args.model) else args.model
    lengths, yarn_lengths = _parse_lengths(args.lengths), _parse_lengths(args.yarn_lengths)
    layer_lengths = _parse_lengths(args.layer_lengths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.max_minutes)
    stamp = harness.env_stamp()
    payload = dict(meta=dict(stamp, model=args.model, parts=parts, argv=list(argv if argv is not None else sys.argv[1:]),
                             device=args.device, dtype=args.dtype, block_size=args.block_size, gamma=args.gamma,
                             tau=args.tau, min_budget=args.min_budget, started=time.strftime("%Y-%m-%d %H:%M:%S")),
                   rows=[], patterns=[], layer_summary=[], breakeven=[], model_summary=[], evals=None,
                   skipped=[], errors=[], timings={})
    state = dict(clock=clock, payload=payload, stamp=stamp, out=out, costs={})
    _log(clock, f"real-model pass: {stamp['gpu']}, torch {stamp['torch']}, triton {stamp['triton']}, "
                f"transformers {stamp['transformers']}, commit {stamp['commit']}; parts {parts}; out {out}")
    t0 = time.perf_counter()
    model, tok = _load(args)
    payload["timings"]["load"] = round(time.perf_counter() - t0, 1)
    shape = _shape(model)
    payload["meta"].update(shape=shape.__dict__, layers=model.config.num_hidden_layers)
    _log(clock, f"loaded {args.model} ({shape.q_heads}/{shape.kv_heads} heads, d{shape.head_dim}, "
                f"{model.config.num_hidden_layers} layers) in {payload['timings']['load']} s")
    prompts = Prompts(tok)
    _save(payload, out)

    def part(name, fn):
        if clock.left() <= 0:
            _log(clock, f"{name}: skipped, past --max-minutes")
            payload["skipped"].append(dict(part=name, reason="time budget"))
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - keep what the other parts measure
            traceback.print_exc()
            payload["errors"].append(dict(part=name, error=harness._first_line(e)))
        payload["timings"][name] = round(time.perf_counter() - t, 1)
        _log(clock, f"{name} done in {payload['timings'][name]} s")
        harness._free(args.device)
        _save(payload, out)

    for name in parts:
        if name == "layers":
            part(name, lambda: run_layers(model, tok, prompts, layer_lengths, args, state, rope="default"))
        elif name == "model":
            part(name, lambda: run_model(model, tok, prompts, layer_lengths, args, state, rope="default"))
        elif name == "evals":
            part(name, lambda: run_evals(model, tok, args, state, methods=harness._split(args.eval_methods),
                                         tasks=harness._split(args.eval_tasks), lengths=lengths, samples=args.samples,
                                         minutes=args.eval_minutes, label="evals"))
        elif name == "sweep":
            part(name, lambda: run_evals(model, tok, args, state, methods=harness._split(args.sweep_methods),
                                         tasks=harness._split(args.sweep_tasks),
                                         lengths=_parse_lengths(args.sweep_lengths), samples=args.sweep_samples,
                                         minutes=args.sweep_minutes, label="sweep"))
        elif name == "yarn":
            def yarn():
                nonlocal model, tok
                del model
                harness._free(args.device)
                t = time.perf_counter()
                model, tok = _load(args, rope_scaling=YARN)
                _log(clock, f"yarn: loaded with {YARN} in {time.perf_counter() - t:.1f} s")
                yprompts = Prompts(tok)
                run_layers(model, tok, yprompts, yarn_lengths, args, state, rope="yarn4")
                run_model(model, tok, yprompts, yarn_lengths, args, state, rope="yarn4")

            part(name, yarn)
    payload["meta"]["elapsed_s"] = round(clock.elapsed(), 1)
    _save(payload, out)
    _log(clock, f"wrote {out / 'real_model.json'}; errors: {payload['errors'] or 'none'}; "
                f"skipped: {[s['part'] + (':' + str(s['N']) if 'N' in s else '') for s in payload['skipped']] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
