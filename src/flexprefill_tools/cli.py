"""The ``flexprefill`` command: ``demo``, ``inspect``, ``eval`` and ``tp-check``.

The programs around the library (``pip install "flexprefill[tools]"``).  This module holds the
argument parser and what the subcommands share (device and dtype, model loading, progress bars,
greedy decoding); each subcommand lives in its own module (demo, inspector, evals, tp_check).
"""

from __future__ import annotations

import argparse
import sys

import torch

from ._deps import require
from .hf_compat import cache_kwarg, cache_of

__all__ = ["main", "build_parser", "add_model_args", "greedy_tokens"]

DEFAULT_MODEL = "smollm2-135m-instruct"
GPU_MAX_LENGTH = 32768
MAX_NEW_TOKENS = 12


def _log(msg: str) -> None:
    print(f"[flexprefill] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexprefill", description="FlexPrefill sparse attention for long prefill.")
    sub = parser.add_subparsers(dest="command", required=True)
    from .demo import add_parser as add_demo
    from .inspector import add_parser as add_inspect

    add_demo(sub)
    add_inspect(sub)
    for name, (_, text) in _DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def add_model_args(p, *, cpu_length: int, block_size: int) -> None:
    """Options ``demo`` and ``inspect`` share: model, prompt length, search settings, device.
    ``cpu_length`` and ``block_size`` are the subcommand's defaults on the CPU."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="packaged model name, HF folder or .gguf file")
    p.add_argument(
        "--length",
        type=int,
        default=None,
        help=f"prompt tokens (default: {cpu_length} on CPU; on GPU the model's context, at most {GPU_MAX_LENGTH})",
    )
    p.add_argument("--gamma", type=float, default=0.9, help="attention mass each head keeps")
    p.add_argument("--tau", type=float, default=0.1, help="JS-distance threshold for query-aware heads")
    p.add_argument("--block-size", type=int, default=None, choices=(32, 64, 128),
                   help=f"tokens per block (default: {block_size} on CPU, 128 on GPU)")
    p.add_argument(
        "--min-budget",
        type=int,
        default=None,
        help="tokens of columns and diagonals always kept (default 1024, or length/8 below 8k tokens)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")


def default_min_budget(args, length: int) -> int:
    """``--min-budget``, or 1024 tokens, or length/8 below 8k tokens."""
    return args.min_budget if args.min_budget is not None else (1024 if length >= 8192 else max(length // 8, 1))


def default_length(ctx: int | None, device: torch.device, cpu_length: int) -> int:
    """Prompt tokens when ``--length`` is not given: the model's context (at most
    ``GPU_MAX_LENGTH``) on a GPU, ``cpu_length`` on the CPU."""
    return min(GPU_MAX_LENGTH, ctx or GPU_MAX_LENGTH) if device.type == "cuda" else cpu_length


def default_block_size(args, device: torch.device, cpu_block_size: int) -> int:
    """``--block-size``, or 128 on a GPU, or ``cpu_block_size`` on the CPU."""
    if args.block_size is not None:
        return args.block_size
    return 128 if device.type == "cuda" else cpu_block_size


def start_run(args, desc: str, total: int, model=None, tokenizer=None):
    """The opening ``demo`` and ``inspect`` share: device and dtype from the options, the step
    bar (``total`` steps, its first one loading the model), the model.  Returns
    ``(progress, device, dtype, steps, model, tokenizer, name)``."""
    from tqdm.auto import tqdm

    progress = not args.no_progress
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    steps = tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr)
    steps.set_postfix_str("loading model")
    model, tokenizer, name = load_model_for(args, device, dtype, model, tokenizer)
    return progress, device, dtype, steps, model, tokenizer, name


def load_model_for(args, device, dtype, model=None, tokenizer=None):
    """The model of ``--model`` (SDPA attention), or an injected one moved to ``device``/``dtype``:
    returns (model, tokenizer, name)."""
    if model is None:
        from .models import load

        model, tokenizer = load(args.model, dtype=dtype, device=device, attn_implementation="sdpa")
        name = args.model
    else:
        model = model.to(device=device, dtype=dtype).eval()
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with an injected model")
    return model, tokenizer, name


def _eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a greedy answer: the model's and tokenizer's eos ids and any chat end-of-turn token."""
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    # chat models end a turn with their own token, which the config may not list
    vocab = tokenizer.get_vocab()
    for tok in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        if tok in vocab:
            ids.add(vocab[tok])
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _LayerProgress:
    """A tqdm bar advanced by each attention layer during one prefill (forward hooks, removed after)."""

    def __init__(self, model, desc: str, disable: bool):
        from tqdm.auto import tqdm

        from flexprefill.integrations.transformers import _attention_modules

        self.modules = _attention_modules(model)
        self.bar = tqdm(total=len(self.modules), desc=desc, unit="layer", disable=disable, leave=False, file=sys.stderr)
        self.handles = []

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._step) for m in self.modules]
        return self

    def _step(self, *_):
        # a forward hook that returns something replaces the module's output: return None
        self.bar.update(1)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.bar.close()


def greedy_tokens(model, out, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy continuation after a prefill's output ``out`` (``use_cache=True``): at most
    ``max_new_tokens`` ids, stopping at (and dropping) the first id in ``eos``."""
    name = cache_kwarg(model)  # read the forward's signature once, not per token
    past, nxt = cache_of(out), out.logits[:, -1].argmax(-1)
    gen = [int(nxt)]
    while len(gen) < max_new_tokens and gen[-1] not in eos:
        out = model(input_ids=nxt[:, None], use_cache=True, **{name: past})
        past, nxt = cache_of(out), out.logits[:, -1].argmax(-1)
        gen.append(int(nxt))
    return gen[:-1] if gen[-1] in eos else gen


def _context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# subcommands whose options live with their module: everything after the name is theirs
_DELEGATED = {
    "eval": ("flexprefill_tools.evals", "accuracy on RULER-style tasks and needle sweeps: flexprefill eval --help"),
    "tp-check": (
        "flexprefill_tools.tp_check",
        "tensor-parallel prefill under torchrun, checked against one device: flexprefill tp-check --help",
    ),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command not in (None, "-h", "--help"):
        require(f"flexprefill {command}")
    from .models import MissingPackageError

    try:
        if command in _DELEGATED:
            import importlib

            return importlib.import_module(_DELEGATED[command][0]).main(argv[1:]) or 0
        args = build_parser().parse_args(argv)
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args)
        elif args.command == "inspect":
            from .inspector import run_inspect

            run_inspect(args)
    except MissingPackageError as e:
        raise SystemExit(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
