"""Pictures of block selections: the causal block grid with the computed blocks filled in."""

from __future__ import annotations

import os

import numpy as np
import torch

from flexprefill.block_table import BlockSelection, num_causal_blocks

__all__ = ["plot_block_masks"]

# colours: above the diagonal (never computed), causal but skipped, selected
_ABOVE = (1.0, 1.0, 1.0)
_SKIPPED = (0.90, 0.91, 0.94)
_PATTERN_COLOURS = {
    "vertical_slash": (0.12, 0.38, 0.70),
    "query_aware": (0.85, 0.40, 0.10),
    "dense": (0.30, 0.30, 0.30),
    None: (0.20, 0.45, 0.30),
}


def _expand(items, titles, patterns):
    """Flatten the inputs to (mask [nb, nb] bool numpy, title, pattern or None) per subplot."""
    if isinstance(items, (BlockSelection, torch.Tensor, np.ndarray)):
        items = [items]
    out = []
    for item in items:
        if isinstance(item, BlockSelection):
            masks = item.to_mask()[0].cpu().numpy()  # batch 0, every head
            qa = item.query_aware[0].cpu().tolist()
            out += [(m, f"head {h}", "query_aware" if qa[h] else "vertical_slash") for h, m in enumerate(masks)]
        else:
            m = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
            if m.ndim != 2 or m.shape[0] != m.shape[1]:
                raise ValueError(f"each mask must be a square [nb, nb] block mask, got shape {m.shape}")
            out.append((m.astype(bool), None, None))
    if titles is not None:
        titles = list(titles)
        if len(titles) != len(out):
            raise ValueError(f"got {len(titles)} titles for {len(out)} subplots")
        out = [(m, t, p) for (m, _, p), t in zip(out, titles)]
    if patterns is not None:
        patterns = list(patterns)
        if len(patterns) != len(out):
            raise ValueError(f"got {len(patterns)} patterns for {len(out)} subplots")
        out = [(m, t, p) for (m, t, _), p in zip(out, patterns)]
    return out


def plot_block_masks(selections_or_masks, titles=None, path="block_masks.png", *, patterns=None, suptitle=None):
    """Draw block selections as causal block grids, one subplot per head, and save a PNG.

    Args:
        selections_or_masks: a :class:`BlockSelection` (batch 0, one subplot per head), a bool
            block mask [nb, nb] (tensor or array, True = computed), or a list of either.
        titles: one title per subplot (default "head h" for selections, none for masks).
        path: where the PNG goes (parent folders are created).
        patterns: one pattern name per subplot ("vertical_slash", "query_aware", "dense"),
            overriding what a selection says; masks have none unless given.
        suptitle: a title over the whole figure.

    Returns:
        ``path``.  Each subplot's legend names its pattern and its density: computed blocks
        over the causal grid ``nb*(nb+1)/2``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    panels = _expand(selections_or_masks, titles, patterns)
    if not panels:
        raise ValueError("nothing to plot: selections_or_masks is empty")
    n = len(panels)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (mask, title, pattern) in zip(axes.flat, panels):
        nb = mask.shape[0]
        causal = np.tril(np.ones((nb, nb), dtype=bool))
        selected = mask & causal
        colour = _PATTERN_COLOURS.get(pattern, _PATTERN_COLOURS[None])
        img = np.empty((nb, nb, 3))
        img[:] = _ABOVE
        img[causal] = _SKIPPED
        img[selected] = colour
        ax.imshow(img, interpolation="nearest", extent=(0, nb, nb, 0))
        if nb <= 64:
            # grid lines between blocks while they are still visible
            ax.set_xticks(np.arange(nb + 1), minor=True)
            ax.set_yticks(np.arange(nb + 1), minor=True)
            ax.grid(which="minor", color="white", linewidth=0.3)
            ax.tick_params(which="minor", length=0)
        density = selected.sum() / num_causal_blocks(nb)
        label = f"{pattern or 'selected'}, density {density:.2f}"
        ax.legend(
            handles=[Patch(color=colour, label=label), Patch(color=_SKIPPED, label="skipped")],
            loc="upper right",
            fontsize=7,
            framealpha=0.9,
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
        if title:
            ax.set_title(title, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
