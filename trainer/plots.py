"""Rank pictures for the rank-adaptive methods (AdaLoRA, AROMA): where the rank went, and when."""

from __future__ import annotations

from pathlib import Path

from adapters_store.basemodels import TARGETS, layer_index


def rank_grid(ranks: dict[str, int], paths: list[str]) -> tuple[list[int], list[str], list[list[int]]]:
    """(layers, module names, grid[layer][module]) from per-module ranks; modules absent from ``ranks``
    (rank 0, left out of the file) count as 0. Module names follow the architecture's target order."""
    cells: dict[tuple[int, str], int] = {}
    for path in paths:
        layer = layer_index(path)
        name = path.split(f".{layer}.", 1)[1] if layer is not None else path
        cells[(-1 if layer is None else layer, name)] = ranks.get(path, 0)
    order = [t for family in TARGETS.values() for t in family]

    def position(name: str) -> tuple[int, str]:
        hits = [(len(t), i) for i, t in enumerate(order) if name == t or name.endswith("." + t)]
        return (max(hits)[1] if hits else len(order), name)  # the longest (most specific) target name

    layers = sorted({layer for layer, _ in cells})
    names = sorted({name for _, name in cells}, key=position)
    return layers, names, [[cells.get((layer, name), 0) for name in names] for layer in layers]


def plot_ranks(ranks: dict[str, int], paths: list[str], rank_history: list[list[int]], out_prefix: str | Path,
               title: str) -> list[Path]:
    """Write ``<prefix>.ranks.png`` (heatmap: layers x modules) and ``<prefix>.rank_history.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, names, grid = rank_grid(ranks, paths)
    out_prefix = Path(out_prefix)
    heat = out_prefix.with_name(out_prefix.name + ".ranks.png")
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1.2 + 0.45 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=8)
    ax.set_ylabel("layer")
    top = max((v for row in grid for v in row), default=0)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v < 0.6 * top else "black")
    fig.colorbar(im, ax=ax, label="rank")
    ax.set_title(f"{title}: final rank per module (total {sum(map(sum, grid))})", fontsize=9)
    fig.tight_layout()
    fig.savefig(heat, dpi=120)
    plt.close(fig)

    timeline = out_prefix.with_name(out_prefix.name + ".rank_history.png")
    fig, ax = plt.subplots(figsize=(6, 3))
    if rank_history:
        steps, totals = zip(*rank_history, strict=True)
        ax.step(steps, totals, where="post")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("total rank")
    ax.set_title(f"{title}: total rank over training", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(timeline, dpi=120)
    plt.close(fig)
    return [heat, timeline]
