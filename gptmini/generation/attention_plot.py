"""Attention maps as a grid of heatmaps: one row per layer, one column per head.

Uses matplotlib's object API with the Agg canvas directly, so it never needs a display and never changes
pyplot's global backend for the rest of the program.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_LABELS = 32  # more tick labels than this overlap into an unreadable smear
PANEL_INCHES = 2.6  # side of one heatmap
MAX_FIGURE_INCHES = 40.0  # GPT-2-sized grids (12 x 12) shrink their panels to stay a sane image size


def token_label(text: str, max_chars: int = 12) -> str:
    """A printable tick label for a token: whitespace made visible, long tokens cut."""
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·")
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def plot_attention(
    maps: torch.Tensor,
    tokens: list[str],
    path: str | os.PathLike | None = None,
    max_labels: int = MAX_LABELS,
) -> Figure:
    """Draw attention weights (n_layer, n_head, T, T) and save a PNG to ``path`` if given.

    Rows of each panel are queries (the token attending), columns are keys (the token attended to).
    Returns the figure, whose ``axes`` hold exactly n_layer × n_head panels.
    """
    n_layer, n_head, T, _ = maps.shape
    if len(tokens) != T:
        raise ValueError(f"{len(tokens)} token labels for attention maps over {T} tokens")
    panel = min(PANEL_INCHES, MAX_FIGURE_INCHES / max(n_layer, n_head))
    fig = Figure(figsize=(panel * n_head, panel * n_layer), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    weights = maps.detach().float().cpu().numpy()
    ticks, labels = _tick_labels(tokens, max_labels)
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
            ax.set_yticks(ticks, labels, fontsize=6)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def _tick_labels(tokens: list[str], max_labels: int) -> tuple[list[int], list[str]]:
    """Every token's position and label, or every k-th one so at most ``max_labels`` are shown."""
    step = max(1, -(-len(tokens) // max_labels))  # ceiling division
    ticks = list(range(0, len(tokens), step))
    return ticks, [token_label(tokens[i]) for i in ticks]
