"""Run the tasks over lengths and methods, resumably, and write every case to JSON lines.

Every method goes through the same transformers attention hook: "full" leaves the model
unpatched (plain SDPA); "flexprefill" patches it with a :class:`FlexPrefillConfig`; the
baselines patch it with a block selector from :mod:`flexprefill_tools.evals.baselines`.  Prefill
is one timed forward pass through the hook, decode is greedy (dense inside the integration).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from dataclasses import dataclass

import torch

from flexprefill.config import FlexPrefillConfig

from . import tasks as task_lib
from .baselines import BASELINES
from .scoring import score as score_fn
from ..cli import _eos_ids, _sync, greedy_tokens

__all__ = ["Method", "parse_method", "split_methods", "Case", "make_cases", "run", "read_results", "case_key"]

SWEEP_TASK = "niah_sweep"


@dataclass(frozen=True)
class Method:
    """One method to evaluate: ``label`` for tables, ``kind`` and all ``settings`` for the resume key."""

    label: str
    kind: str
    settings: tuple = ()

    @property
    def params(self) -> dict:
        return dict(self.settings)

    def key(self) -> str:
        return json.dumps({"kind": self.kind, **self.params}, sort_keys=True)

    def config(self) -> FlexPrefillConfig:
        p = self.params
        fields = ("block_size", "gamma", "tau", "min_budget", "max_budget", "min_seq_len", "backend")
        return FlexPrefillConfig(**{f: p[f] for f in fields if f in p})

    def selector(self):
        if self.kind in BASELINES:
            cls = BASELINES[self.kind]
            names = cls(**{}).settings().keys()
            return cls(**{n: self.params[n] for n in names if n in self.params})
        return None


_SHORT = {"g": "gamma", "t": "tau", "w": "window", "s": "slash", "v": "vertical", "k": "sink", "q": "last_q", "mb": "min_budget"}
_ALIASES = {"vs_fixed": "vertical_slash_fixed", "fp": "flexprefill", "dense": "full"}
_KINDS = ("full", "flexprefill", *BASELINES)


def _num(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_method(spec: str, *, shared: dict | None = None) -> Method:
    """Parse ``kind``, ``kind-g0.95-t0.1`` (short keys: g gamma, t tau, w window, k sink, v vertical,
    s slash, q last_q, mb min_budget) or ``kind:gamma=0.95,tau=0.1``.

    ``shared`` settings (block_size, min_budget, min_seq_len, ...) apply to every sparse method.
    """
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    params: dict = {}
    if not rest and "-" in kind:
        kind, *parts = kind.split("-")
        for part in parts:
            m = re.fullmatch(r"([a-z]+)([0-9.eE+-]+)", part)
            if not m or m.group(1) not in _SHORT:
                raise ValueError(f"method {spec!r}: cannot read {part!r}; short keys: {_SHORT}")
            params[_SHORT[m.group(1)]] = _num(m.group(2))
    elif rest:
        for item in re.split(r"[,;]", rest):
            name, eq, val = item.partition("=")
            if not eq:
                raise ValueError(f"method {spec!r}: {item!r} is not name=value")
            params[name.strip()] = None if val.strip() == "None" else _num(val.strip())
    kind = _ALIASES.get(kind, kind)
    if kind not in _KINDS:
        raise ValueError(f"method {spec!r}: unknown kind {kind!r}; accepted: {_KINDS}")
    if kind == "full":
        return Method(spec, "full", ())
    merged = {**(shared or {}), **params}
    if kind == "flexprefill":
        merged = {**{"gamma": 0.9, "tau": 0.1}, **merged}
    else:
        defaults = BASELINES[kind]().settings()
        unknown = set(params) - set(defaults) - {"block_size", "min_seq_len"}
        if unknown:
            raise ValueError(f"method {spec!r}: {sorted(unknown)} are not settings of {kind}; accepted: {sorted(defaults)}")
        merged = {**defaults, **merged}
    m = Method(spec, kind, tuple(sorted(merged.items())))
    m.config()  # validate now, not in the middle of a run
    return m


def split_methods(text: str) -> list[str]:
    """Split a comma list of method specs; ``name=value`` pieces stay with the spec before them."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if out and "=" in piece and ":" not in piece:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


@dataclass(frozen=True)
class Case:
    task: str
    length: int
    seed: int
    depth: float | None = None


def make_cases(
    task_names: list[str], lengths: list[int], samples: int, *, seed: int = 0, sweep_depths: list[float] | None = None
) -> list[Case]:
    """All cases, sample-major (a run cut short by a time limit loses later samples, not the long lengths).

    ``niah_sweep`` cases (the classic NIAH grid) get one per depth and sample.
    """
    cases = []
    for s in range(samples):
        for length in lengths:
            for task in task_names:
                if task == SWEEP_TASK:
                    cases += [Case(task, length, seed + s, float(d)) for d in (sweep_depths or [0.5])]
                else:
                    cases.append(Case(task, length, seed + s))
    return cases


def case_key(model_name: str, case: Case, method: Method) -> str:
    return json.dumps([model_name, case.task, case.length, case.seed, case.depth, method.key()])


def read_results(path: str) -> list[dict]:
    """Every record of a results file (a torn last line from an interrupted run is skipped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return out


class _Recorder:
    """Wraps a selector to keep each call's mean density (tensors; read after the prefill)."""

    def __init__(self, inner):
        self.inner = inner
        self.densities: list[torch.Tensor] = []

    def __call__(self, q, k, *, config, softmax_scale=None):
        sel = self.inner(q, k, config=config, softmax_scale=softmax_scale)
        self.densities.append(sel.stats().density.float().mean())
        return sel


def _integration():
    import flexprefill

    patch = getattr(flexprefill, "patch", None)
    unpatch = getattr(flexprefill, "unpatch", None)
    if patch is None or unpatch is None:
        raise RuntimeError(
            "flexprefill.patch / flexprefill.unpatch are not available: the transformers integration "
            "(flexprefill.integrations.transformers) is needed for every method but 'full'"
        )
    return patch, unpatch


def _last_stats(model):
    try:
        from flexprefill.integrations.transformers import last_stats
    except ImportError:
        return None
    try:
        return last_stats(model)
    except Exception:  # noqa: BLE001 - stats are a report, never a reason to lose a case
        return None


def _stats_density(stats) -> tuple[float | None, int]:
    if stats is None:
        return None, 0
    items = stats.values() if isinstance(stats, dict) else stats
    vals = [s.density.float().mean() for s in items if s is not None]
    if not vals:
        return None, 0
    return float(torch.stack(vals).mean()), len(vals)


@contextlib.contextmanager
def applied(model, method: Method):
    """The model with ``method`` installed; yields a function giving the last prefill's (density, layers)."""
    if method.kind == "full":
        yield lambda: (1.0, 0)
        return
    patch, unpatch = _integration()
    recorder = _Recorder(method.selector()) if method.kind in BASELINES else None
    kwargs = dict(config=method.config(), selector=recorder)
    try:
        patch(model, collect_stats=True, **kwargs)
    except TypeError:
        patch(model, **kwargs)

    def density():
        d, n = _stats_density(_last_stats(model))
        if recorder is not None and recorder.densities:
            rd = float(torch.stack(recorder.densities).mean())
            n_rec = len(recorder.densities)
            recorder.densities.clear()
            return (d, n) if d is not None else (rd, n_rec)
        return d, n

    try:
        yield density
    finally:
        unpatch(model)


@torch.inference_mode()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int, density_fn=None, warmup: bool = False) -> dict:
    """Greedy decode; returns prediction, timings, density read right after the prefill.

    ``warmup``: run the prefill once untimed first (the first call of a method at a new
    length compiles and autotunes kernels, which is not prefill time).
    """
    device = next(model.parameters()).device
    ids = torch.tensor([task_lib.encode(tokenizer, prompt)], device=device)
    eos = _eos_ids(model, tokenizer)
    if warmup:
        model(input_ids=ids, use_cache=False)
    _sync(device)
    t0 = time.perf_counter()
    try:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    except TypeError:
        out = model(input_ids=ids, use_cache=True)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    density, layers = density_fn() if density_fn else (None, 0)
    t1 = time.perf_counter()
    gen = greedy_tokens(model, out, max_new_tokens, eos)
    decode_s = time.perf_counter() - t1
    return {
        "prediction": tokenizer.decode(gen, skip_special_tokens=True).strip(),
        "prompt_tokens": ids.shape[1],
        "new_tokens": len(gen),
        "prefill_s": round(prefill_s, 5),
        "decode_s": round(decode_s, 5),
        "density": None if density is None else round(density, 5),
        "density_layers": layers,
    }


def _git_commit() -> str:
    from ..stamp import git_commit

    return git_commit()


def _max_context(model) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    return getattr(cfg, "max_position_embeddings", None)


def run(
    model,
    tokenizer,
    *,
    model_name: str,
    cases: list[Case],
    methods: list[Method],
    out_dir: str,
    niah_task: str = "niah_single_2",
    max_new_tokens: int | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run every (case, method) not already in ``out_dir/results.jsonl``; returns the new records.

    Cases run in order, all methods of a case together (so a run cut by ``max_minutes``
    leaves comparable results).  The prompt of length ``L`` is fitted to ``L - max_new_tokens``.
    """
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.jsonl")
    done = {r["key"] for r in read_results(path) if "key" in r}
    ctx = _max_context(model)
    device = next(model.parameters()).device
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "commit": _git_commit(),
    }
    todo = []
    for case in cases:
        if ctx is not None and case.length > ctx:
            continue
        missing = [m for m in methods if case_key(model_name, case, m) not in done]
        if missing:
            todo.append((case, missing))
    total = sum(len(ms) for _, ms in todo)
    skipped = len([c for c in cases if ctx is not None and c.length > ctx])
    if skipped:
        print(f"[evals] {skipped} cases skipped: longer than the model's context ({ctx} tokens)")
    print(f"[evals] {total} (case, method) runs to do, {len(done)} already in {path}")
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    new = []
    warmed: set = set()
    bar = tqdm(total=total, disable=not progress, desc="evals", dynamic_ncols=True)
    with open(path, "a", encoding="utf-8") as f:
        for case, missing in todo:
            if deadline is not None and time.monotonic() > deadline:
                print(f"[evals] time limit of {max_minutes} min reached; rerun the same command to resume")
                break
            gen_task = niah_task if case.task == SWEEP_TASK else case.task
            n_new = max_new_tokens or task_lib.MAX_NEW_TOKENS[gen_task]
            sample = task_lib.generate(gen_task, tokenizer, case.length - n_new, case.seed, depth=case.depth)
            for method in missing:
                bar.set_postfix_str(f"{case.task} L={case.length} {method.label}")
                warm = device.type == "cuda" and (method.label, case.length) not in warmed
                warmed.add((method.label, case.length))
                with applied(model, method) as density_fn:
                    res = greedy(model, tokenizer, sample.prompt, n_new, density_fn, warmup=warm)
                rec = {
                    "key": case_key(model_name, case, method),
                    "model": model_name,
                    "task": case.task,
                    "length": case.length,
                    "seed": case.seed,
                    "depth": case.depth if case.depth is not None else sample.meta.get("depth"),
                    "depth_actual": sample.meta.get("depth_actual"),
                    "method": method.label,
                    "kind": method.kind,
                    "settings": method.params,
                    "score": score_fn(res["prediction"], sample.answers),
                    "answers": sample.answers,
                    **res,
                    **env,
                }
                f.write(json.dumps(rec) + "\n")
                f.flush()
                new.append(rec)
                bar.update(1)
    bar.close()
    return new


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None

