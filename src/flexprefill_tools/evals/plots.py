"""Reports from the results records: Markdown tables, NIAH heatmaps, accuracy against density."""

from __future__ import annotations

import os
from collections import defaultdict

from .runner import SWEEP_TASK, mean

__all__ = ["markdown_table", "niah_heatmaps", "accuracy_vs_density", "write_reports"]


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def _methods_in_order(records):
    seen = []
    for r in records:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def markdown_table(records: list[dict]) -> str:
    """Two tables: per (task, length, method) mean score, density, prefill time; and task x method."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["model"], r["task"], r["length"], r["method"])].append(r)
    methods = _methods_in_order(records)
    lines = [
        "| model | task | length | method | n | score | density | prefill ms |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for (model, task, length, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], methods.index(kv[0][3]))):
        ms = mean([r["prefill_s"] for r in rs])
        lines.append(
            f"| {model} | {task} | {length} | {method} | {len(rs)} | {_fmt(mean([r['score'] for r in rs]))} | "
            f"{_fmt(mean([r['density'] for r in rs]))} | {_fmt(None if ms is None else 1000 * ms, 1)} |"
        )
    # compact pivot: mean score (mean density) per task over all lengths
    pivot = defaultdict(list)
    for r in records:
        pivot[(r["task"], r["method"])].append(r)
    task_names = sorted({r["task"] for r in records})
    out = ["## Score (density) per task, mean over lengths and samples", ""]
    out.append("| task | " + " | ".join(methods) + " |")
    out.append("|---|" + "---:|" * len(methods))
    for task in task_names + ["**all**"]:
        cells = []
        for m in methods:
            rs = [r for r in records if r["method"] == m and (task == "**all**" or r["task"] == task)]
            cells.append(f"{_fmt(mean([r['score'] for r in rs]), 2)} ({_fmt(mean([r['density'] for r in rs]), 2)})" if rs else "-")
        out.append(f"| {task} | " + " | ".join(cells) + " |")
    out += ["", "## Per task, length and method", ""] + lines
    return "\n".join(out) + "\n"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def niah_heatmaps(records: list[dict], out_dir: str) -> list[str]:
    """One PNG per (model, method): mean score by depth (rows) and context length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    sweep = [r for r in records if r["task"] == SWEEP_TASK]
    paths = []
    for model in sorted({r["model"] for r in sweep}):
        for method in _methods_in_order(sweep):
            rs = [r for r in sweep if r["model"] == model and r["method"] == method]
            if not rs:
                continue
            depths = sorted({r["depth"] for r in rs})
            lengths = sorted({r["length"] for r in rs})
            grid = [[mean([r["score"] for r in rs if r["depth"] == d and r["length"] == L]) for L in lengths] for d in depths]
            dens = mean([r["density"] for r in rs])
            fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.45 * len(depths) + 2))
            data = [[float("nan") if v is None else v for v in row] for row in grid]
            im = ax.imshow(data, cmap=cmap, vmin=0, vmax=1, aspect="auto")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if v is not None:
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
            ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(f"NIAH {model} / {method}  (mean density {_fmt(dens, 2)})", fontsize=9)
            fig.colorbar(im, ax=ax, label="score")
            fig.tight_layout()
            path = os.path.join(out_dir, f"niah_{_safe(model)}_{_safe(method)}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def accuracy_vs_density(records: list[dict], out_dir: str) -> str | None:
    """Scatter: one point per (model, method), mean score over every case against mean density."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for model in sorted({r["model"] for r in records}):
        for method in _methods_in_order(records):
            rs = [r for r in records if r["model"] == model and r["method"] == method]
            if not rs:
                continue
            s, d = mean([r["score"] for r in rs]), mean([r["density"] for r in rs])
            if s is None or d is None:
                continue
            label = method if len({r["model"] for r in records}) == 1 else f"{model}/{method}"
            ax.scatter([d], [s], s=40, label=f"{label} ({s:.2f} @ {d:.2f})")
    ax.set_xlabel("mean attention density (computed causal blocks)")
    ax.set_ylabel("mean score")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("accuracy against density", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "accuracy_vs_density.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(records: list[dict], out_dir: str) -> dict:
    """summary.md, the heatmaps and the scatter, from ``records``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, "summary.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write("# FlexPrefill evaluation\n\n")
        if records:
            envs = sorted({(r.get("device"), r.get("dtype"), r.get("torch"), r.get("commit")) for r in records}, key=str)
            for dev, dt, tv, commit in envs:
                f.write(f"device {dev}, dtype {dt}, torch {tv}, commit {commit}\n\n")
        f.write(
            "Score: RULER string match (fraction of expected strings in the greedy answer). "
            "Density: computed causal blocks over the causal block grid, mean over patched layers, heads and cases "
            "(full = 1).\n\n"
        )
        f.write(markdown_table(records) if records else "no results\n")
    return {"summary": md, "heatmaps": niah_heatmaps(records, out_dir), "scatter": accuracy_vs_density(records, out_dir)}
