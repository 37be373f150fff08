"""Kernel efficiency against density for the three block-sparse kernels on Hopper, from the JSON
that ``compare_hopper_kernel.py`` writes (runs on the CPU: it only reads and draws).

One panel per head dim at the longest N in the files: the Triton kernel, the tiled Gluon kernel
(autotuned) and the warp-specialised Gluon kernel (its default config), each as TFLOP/s on the
computed blocks over cuDNN dense's in the same run, with a line at the 0.85 target.  For a head
dim found in several files the later file on the command line wins; each panel names its commit.
Usage: python benchmarks/plot_hopper_kernels.py OUT.png RESULTS.json [RESULTS.json ...]
"""

from __future__ import annotations

import json
import sys

TARGET = 0.85
# (label, how a row's efficiency key is picked)
SERIES = (
    ("Triton kernel", lambda k: k == "efficiency_triton"),
    ("tiled Gluon kernel", lambda k: k == "efficiency_gluon_tuned"),
    ("warp-specialised Gluon kernel", lambda k: k.startswith("efficiency_ws_") and k.count("_") == 4),
)


def panels(paths: list[str]) -> dict[int, list[dict]]:
    """Rows per head dim at its longest N, the later file winning."""
    by_dim: dict[int, list[dict]] = {}
    for path in paths:
        with open(path) as f:
            rows = json.load(f)
        for D in sorted({r["D"] for r in rows}):
            mine = [r for r in rows if r["D"] == D]
            n = max(r["N"] for r in mine)
            by_dim[D] = sorted((r for r in mine if r["N"] == n), key=lambda r: r["density"])
    return by_dim


def series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (densities, efficiencies) for the kernels the rows measured."""
    out = {}
    for label, pick in SERIES:
        xs, ys = [], []
        for r in rows:
            keys = [k for k in r if pick(k)]
            if keys:
                xs.append(r["density"])
                ys.append(r[keys[0]])
        if xs:
            out[label] = (xs, ys)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out, paths = argv[0], argv[1:]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_dim = panels(paths)
    if not by_dim:
        print(f"no rows in {paths}", file=sys.stderr)
        return 1
    fig, axes = plt.subplots(1, len(by_dim), figsize=(5 * len(by_dim), 4), squeeze=False, sharey=True)
    for ax, (D, rows) in zip(axes[0], sorted(by_dim.items())):
        for label, (xs, ys) in series(rows).items():
            ax.plot([100 * x for x in xs], ys, marker="o", label=label)
        ax.axhline(TARGET, color="gray", linestyle="--", linewidth=1, label=f"target {TARGET}")
        r0 = rows[0]
        ax.set_title(f"head dim {D}, N={r0['N'] // 1024}k ({r0.get('commit', '?')})")
        ax.set_xlabel("density of the selection (% of causal blocks)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TFLOP/s on computed blocks / cuDNN dense")
    axes[0][0].legend(fontsize=8, loc="lower right")
    r0 = next(iter(by_dim.values()))[0]
    fig.suptitle(f"{r0.get('gpu', 'GPU')}: block-sparse kernel efficiency (torch {r0.get('torch', '?')}, "
                 f"triton {r0.get('triton', '?')})")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
