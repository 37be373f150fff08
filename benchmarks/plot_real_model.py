"""Plots of a real-model pass (``benchmarks/gpu_pass_real_model.py``), drawn from its files.

    python benchmarks/plot_real_model.py RESULTS_DIR [PLOTS_DIR]

RESULTS_DIR holds ``real_model.json`` and, when the evals ran, ``evals/results.jsonl``.
Writes to PLOTS_DIR (default RESULTS_DIR/plots):

- ``layer_speedup.png``: per layer, the whole operator's speed-up over the best dense kernel
  against N, and the sum over the layers (the model's attention);
- ``layer_times.png``: summed per-layer times of dense, kernel, search and operator against N;
- ``prefill.png``: whole-model prefill per method and length, with attention's share;
- from the evals: ``summary.md``, NIAH heatmaps where there are depths, ``accuracy_vs_density.png``
  (one point per method) and ``sweep.png`` (mean score against density for the gamma and tau series).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_speedup(payload: dict, path: Path) -> Path | None:
    rows = [r for r in payload.get("rows", []) if r.get("mode") == "real_layer" and r.get("ms")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rope in sorted({r.get("rope") for r in rows}):
        by: dict = {}
        for r in rows:
            if r.get("rope") == rope:
                by.setdefault((r["layer"], r["N"]), {})[r["method"]] = r["ms"]
        layers = sorted({k[0] for k in by})
        for layer in layers:
            pts = sorted((n, d) for (lay, n), d in by.items() if lay == layer)
            xs, ys = [], []
            for n, d in pts:
                dense = next((d[m] for m in ("cudnn", "flash", "sdpa") if m in d), None)
                if dense and d.get("flexprefill"):
                    xs.append(n)
                    ys.append(dense / d["flexprefill"])
            ax.plot(xs, ys, ".-", color="tab:blue" if rope == "default" else "tab:orange", alpha=0.25, lw=1, ms=3)
    summ = [r for r in payload.get("rows", []) if r.get("mode") == "real_model" and r.get("method") == "flexprefill"]
    for rope in sorted({r.get("rope") for r in summ}):
        pts = sorted((r["N"], r["speedup"]) for r in summ if r.get("rope") == rope and r.get("speedup"))
        if pts:
            ax.plot(*zip(*pts), "o-", lw=2.5, color="tab:blue" if rope == "default" else "tab:orange",
                    label=f"all layers ({'YaRN x4' if rope != 'default' else 'native RoPE'})")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("speed-up over the best dense kernel")
    meta = payload.get("meta", {})
    ax.set_title(f"{meta.get('model')}: FlexPrefill per layer (thin) and summed, search included\n"
                 f"{meta.get('gpu')}, gamma {meta.get('gamma')}, tau {meta.get('tau')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_times(payload: dict, path: Path) -> Path | None:
    summ = payload.get("layer_summary", [])
    if not summ:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("dense_ms", "dense (best kernel)", "k-"), ("kernel_ms", "our kernel on the selection", "g--"),
                              ("search_ms", "search alone", "m:"), ("operator_ms", "whole operator", "b-o")):
        pts = sorted((s["N"], s[key]) for s in summ if s.get(key))
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ms, summed over the layers")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def prefill(payload: dict, path: Path) -> Path | None:
    rows = [r for r in payload.get("rows", []) if r.get("mode") == "model" and r.get("ms")]
    if not rows:
        return None
    plt = _plt()
    lengths = sorted({r["N"] for r in rows})
    methods = [m for m in ("sdpa", "flexprefill", "flexprefill_default", "no_attention") if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(lengths)), 4.5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        for i, n in enumerate(lengths):
            r = next((r for r in rows if r["N"] == n and r["method"] == m), None)
            if r is None:
                continue
            ax.bar(i + j * width, r["ms"], width, color=f"C{j}", label=m if i == 0 else None)
            if "correct" in r:
                ax.text(i + j * width, r["ms"], "ok" if r["correct"] else "x", ha="center", va="bottom", fontsize=7)
    shares = {s["N"]: s.get("attention_share_by_removal") for s in payload.get("model_summary", [])}
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(lengths))])
    ax.set_xticklabels([f"{n}\nattention {shares[n]:.0%}" if shares.get(n) is not None else str(n) for n in lengths],
                       fontsize=8)
    ax.set_ylabel("prefill ms (median)")
    ax.set_title("whole-model prefill; 'ok' = needle answer right", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_SPEC = re.compile(r"flexprefill-g([0-9.]+)-t([0-9.]+)$")


def sweep(records: list[dict], path: Path) -> Path | None:
    """Mean score against mean density: a line over gamma at tau 0.1, one over tau at gamma 0.9."""
    pts: dict = {}
    for r in records:
        m = _SPEC.match(r["method"])
        if m:
            pts.setdefault((float(m.group(1)), float(m.group(2))), []).append(r)
    if len(pts) < 2:
        return None
    from flexprefill_tools.evals.runner import mean

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for fixed, label, style in (("tau", "gamma at tau 0.1", "o-"), ("gamma", "tau at gamma 0.9", "s--")):
        series = sorted((g, t) for g, t in pts if (t == 0.1 if fixed == "tau" else g == 0.9))
        xs, ys = [], []
        for g, t in series:
            rs = pts[(g, t)]
            d, s = mean([r["density"] for r in rs]), mean([r["score"] for r in rs])
            if d is None or s is None:
                continue
            xs.append(d)
            ys.append(s)
            ax.annotate(f"{g if fixed == 'tau' else t}", (d, s), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if xs:
            ax.plot(xs, ys, style, label=label)
    full = [r["score"] for r in records if r["method"] == "full"]
    if full:
        ax.axhline(sum(full) / len(full), color="k", lw=0.8, ls="--", label="full attention")
    ax.set_xlabel("mean density (computed causal blocks)")
    ax.set_ylabel("mean score")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(argv[0])
    dest = Path(argv[1]) if len(argv) > 1 else src / "plots"
    dest.mkdir(parents=True, exist_ok=True)
    payload = json.loads((src / "real_model.json").read_text())
    written = [p for p in (layer_speedup(payload, dest / "layer_speedup.png"), layer_times(payload, dest / "layer_times.png"),
                           prefill(payload, dest / "prefill.png")) if p]
    results = src / "evals" / "results.jsonl"
    if results.is_file():
        from flexprefill_tools.evals.plots import write_reports
        from flexprefill_tools.evals.runner import read_results

        records = read_results(str(results))
        reports = write_reports(records, str(dest))
        written += [Path(reports["summary"]), *map(Path, reports["heatmaps"])]
        if reports["scatter"]:
            written.append(Path(reports["scatter"]))
        s = sweep(records, dest / "sweep.png")
        if s:
            written.append(s)
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
