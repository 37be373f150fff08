"""Long-context evaluation: RULER-style synthetic tasks, a NIAH depth x length sweep, baselines.

``flexprefill_tools.evals.main(argv)`` is the ``flexprefill eval`` command.  Outputs in ``--out``:
``results.jsonl`` (every case; read back to resume), ``summary.md``, ``niah_<model>_<method>.png``
and ``accuracy_vs_density.png``.
"""

from __future__ import annotations

import argparse
import os

from .baselines import StreamingSelector, VerticalSlashFixedSelector
from .scoring import score, string_match_all, string_match_part
from .tasks import TASKS, Sample, generate

__all__ = [
    "main",
    "load_model",
    "Sample",
    "TASKS",
    "generate",
    "score",
    "string_match_all",
    "string_match_part",
    "StreamingSelector",
    "VerticalSlashFixedSelector",
]

DEFAULT_METHODS = "full,flexprefill-g0.9,flexprefill-g0.95,streaming,vertical_slash_fixed"
DEFAULT_TASKS = "niah_sweep,niah_single_1,niah_multikey_1,vt,cwe"


def load_model(name: str | None, path: str | None, *, dtype: str, device: str):
    """A packaged model by ``name`` (flexprefill_tools.models.load) or a local one by ``path``
    (a transformers folder, or a .gguf file)."""
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if path is None:
        from flexprefill_tools.models import load

        return load(name, dtype=torch_dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    folder = path
    if path.endswith(".gguf"):
        folder, kw["gguf_file"] = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation="sdpa", **kw)
    return model.to(device).eval(), tok


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    out = []
    for x in text.split(","):
        x = x.strip().lower()
        if x:
            out.append(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexprefill eval",
        description="RULER-style synthetic tasks and a NIAH sweep for full attention, FlexPrefill and fixed-budget baselines.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="packaged model name (default smollm2-135m-instruct)")
    src.add_argument("--model-path", default=None, help="local transformers folder or .gguf file")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma list from {['niah_sweep', *TASKS]} (default %(default)s)")
    p.add_argument("--lengths", default="1024", help="comma list of total lengths in tokens, 4k style allowed (default %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="samples per task, length (and depth for niah_sweep)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", help="niah_sweep depths, fractions")
    p.add_argument("--niah-task", default="niah_single_2", help="generator behind niah_sweep (default %(default)s)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list: full, flexprefill[-g0.95-t0.1], streaming[-w1024-k128], "
                        "vertical_slash_fixed[-v1024-s2048-q64], or kind:name=value,name=value (default %(default)s)")
    # at the default 1024 tokens: 16 blocks of 64, two of them always kept, so the search selects
    # (a min_budget of 1024 tokens would keep every block: full attention under another name)
    p.add_argument("--block-size", type=int, default=64, help="tokens per block (default %(default)s)")
    p.add_argument("--min-budget", type=int, default=128,
                   help="FlexPrefill min_budget in tokens (default %(default)s; 1024 suits 8k and longer)")
    p.add_argument("--max-budget", type=int, default=None)
    p.add_argument("--min-seq-len", type=int, default=0,
                   help="dense below this many tokens (default 0: sparse at every length, so lengths are comparable)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the per-task generation length")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "eval_out"), help="output folder (default $OUT or ./eval_out)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new case after this; rerun to resume")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    import torch

    from .plots import write_reports
    from .runner import SWEEP_TASK, make_cases, parse_method, read_results, run, split_methods

    args = build_parser().parse_args(argv)
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in task_names:
        if t != SWEEP_TASK and t not in TASKS:
            raise SystemExit(f"--tasks: unknown task {t!r}; accepted: {['niah_sweep', *TASKS]}")
    shared = {"block_size": args.block_size, "min_budget": args.min_budget, "max_budget": args.max_budget,
              "min_seq_len": args.min_seq_len}
    try:
        methods = [parse_method(m, shared=shared) for m in split_methods(args.methods)]
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--methods: {e}") from e
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    name = args.model or (None if args.model_path else "smollm2-135m-instruct")
    model, tok = load_model(name, args.model_path, dtype=dtype, device=device)
    model_name = name or os.path.basename(os.path.normpath(args.model_path))
    cases = make_cases(task_names, _ints(args.lengths), args.samples, seed=args.seed, sweep_depths=_floats(args.depths))
    run(model, tok, model_name=model_name, cases=cases, methods=methods, out_dir=args.out, niah_task=args.niah_task,
        max_new_tokens=args.max_new_tokens, max_minutes=args.max_minutes, progress=not args.no_progress)
    records = read_results(os.path.join(args.out, "results.jsonl"))
    paths = write_reports(records, args.out)
    print(open(paths["summary"], encoding="utf-8").read())
    print(f"[evals] wrote {os.path.join(args.out, 'results.jsonl')}, {paths['summary']}, "
          f"{len(paths['heatmaps'])} heatmaps, {paths['scatter']}")
    return 0
