"""Attention maps as a picture: a heatmap per layer and head, and its output path checked and written safely.

One concern: drawing and saving the figure. It does not run the model (``text`` computes the maps) and
must not import ``training``, ``checkpoint`` or ``data``; it imports only torch, matplotlib and
``gptmini.common``.

Uses matplotlib's object API with the Agg canvas directly, so it never needs a display and never changes
pyplot's global backend for the rest of the program.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gptmini.common import GptMiniError, atomic_file, describe_os_error

MAX_TOKENS = 48  # more tokens than this and neither the cells nor their labels can be read
DEFAULT_NAME = "attention.png"  # the file written when attention_plot names a folder
DPI = 100
LABEL_POINTS = 6.0  # font size of a token label; a label needs about this much height
PROMPT_COLOUR, GENERATED_COLOUR = "black", "tab:red"
# Every format the Agg canvas can write, except pgf (it needs a LaTeX installation to measure text).
FORMATS = tuple(sorted(set(FigureCanvasAgg(Figure()).get_supported_filetypes()) - {"pgf"}))


def token_label(text: str, max_chars: int = 10) -> str:
    """A printable tick label for a token: whitespace made visible, control bytes escaped, long tokens cut."""
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def token_window(n_prompt: int, n_generated: int, cap: int = MAX_TOKENS) -> tuple[int, int]:
    """Which tokens of prompt + generated text to draw: ``(start, end)``, at most ``cap`` of them.

    Everything when it fits. Otherwise the generated text gets at least half the cap (when there is that
    much of it) and the end of the prompt the rest, so the picture always shows the prompt-to-text seam.
    """
    if n_prompt + n_generated <= cap:
        return 0, n_prompt + n_generated
    shown_generated = min(n_generated, max(cap - n_prompt, cap // 2))
    shown_prompt = min(n_prompt, cap - shown_generated)
    return n_prompt - shown_prompt, n_prompt + shown_generated


def plot_attention(
    maps: torch.Tensor,
    tokens: list[str],
    n_prompt: int | None = None,
    max_labels: int | None = None,
) -> Figure:
    """Draw attention weights (n_layer, n_head, T, T) as a grid of heatmaps with a shared colour scale.

    Rows of each panel are queries (the token attending), columns are keys (the token attended to); the
    future a causal model cannot see is left blank. ``tokens`` label both axes; the first ``n_prompt`` are
    the prompt (black labels), the rest were generated (red labels, after a white seam line). Labels go on
    the outer panels only, every token's when they fit, else every k-th (at most ``max_labels``).
    Returns the figure: n_layer × n_head heatmap axes, then the colour bar's.
    """
    n_layer, n_head, T, _ = maps.shape
    if len(tokens) != T:
        raise ValueError(f"{len(tokens)} token labels for attention maps over {T} tokens")
    n_prompt = T if n_prompt is None else n_prompt
    # A panel grows with the tokens so each label has room, and shrinks for big grids (GPT-2's 12 x 12).
    panel = min(max(2.2, T * LABEL_POINTS * 1.15 / 72), 40.0 / max(n_layer, n_head))
    fits = int(panel * 72 / (LABEL_POINTS * 1.15))
    max_labels = fits if max_labels is None else min(max_labels, fits)
    fig = Figure(figsize=(panel * n_head + 1.5, panel * n_layer + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_layer, n_head, squeeze=False, sharex=True, sharey=True)
    weights = maps.detach().float().cpu().numpy()
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    ticks = _tick_positions(T, max_labels)
    image = None
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            masked = np.ma.masked_where(future, weights[layer, head])
            image = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_facecolor("white")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            if 0 < n_prompt < T:
                ax.axhline(n_prompt - 0.5, color="white", linewidth=0.8)
                ax.axvline(n_prompt - 0.5, color="white", linewidth=0.8)
            ax.tick_params(length=2, labelsize=LABEL_POINTS)
    labels = [token_label(tokens[i]) for i in ticks]
    colours = [PROMPT_COLOUR if i < n_prompt else GENERATED_COLOUR for i in ticks]
    for ax in axes[-1]:
        ax.set_xticks(ticks, labels, rotation=90)
        _colour(ax.get_xticklabels(), colours)
        ax.set_xlabel("key (attended to)", fontsize=7)
    for row in axes:
        row[0].set_yticks(ticks, labels)
        _colour(row[0].get_yticklabels(), colours)
        row[0].set_ylabel("query (attending)", fontsize=7)
    colourbar = fig.colorbar(image, ax=axes, shrink=min(1.0, 4.0 / (panel * n_layer)), aspect=30)
    colourbar.set_label("attention weight", fontsize=8)
    seam = " | generated in red" if n_prompt < T else ""
    fig.suptitle(f"Attention over {T} tokens: prompt in black{seam}; · is a space", fontsize=9)
    return fig


def _tick_positions(n_tokens: int, max_labels: int) -> list[int]:
    """Every token's position, or every k-th one so at most ``max_labels`` are shown."""
    step = max(1, -(-n_tokens // max(1, max_labels)))  # ceiling division
    return list(range(0, n_tokens, step))


def _colour(labels, colours: list[str]) -> None:
    for label, colour in zip(labels, colours, strict=True):
        label.set_color(colour)


def plot_path(value: str) -> Path:
    """The file ``attention_plot=value`` will write, checked now so a bad path fails before the model runs.

    A folder (an existing one, or a value ending in ``/``) gets ``attention.png`` inside it. The extension
    picks the format and must be one matplotlib writes; the nearest existing folder above the file must be a
    writable folder (missing folders below it are created when the plot is written).
    """
    path = Path(value).expanduser()
    if path.is_dir() or str(value).endswith(("/", os.sep)):
        path = path / DEFAULT_NAME
    suffix = path.suffix.lower().lstrip(".")
    if not suffix:
        raise GptMiniError(
            f"attention_plot={value} has no file extension, so the image format is unknown; "
            f"name a file such as attention_plot={value}.png."
        )
    if suffix not in FORMATS:
        raise GptMiniError(
            f"attention_plot={value}: matplotlib cannot write .{suffix} files; "
            f"use .png or another of: {', '.join(FORMATS)}."
        )
    if path.exists() and not path.is_file():
        raise GptMiniError(f"attention_plot={value} exists and is not a file; pick a file path.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise GptMiniError(
            f"attention_plot={value}: {folder} is a file, not a folder, so nothing can be written under it; "
            "pick another path."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GptMiniError(
            f"attention_plot={value}: no permission to write in {folder}; pick a folder you can write to."
        )
    return path


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` atomically (the format from its extension); a failure is a GptMiniError.

    The image goes to a temporary file that replaces ``path`` only once complete, so an existing picture
    is never left half-written.
    """
    path = Path(path)
    try:
        with atomic_file(path, "wb") as handle:
            fig.savefig(handle, format=path.suffix.lower().lstrip("."), dpi=DPI)
    except OSError as exc:
        message = describe_os_error(exc, "the attention plot")
        raise GptMiniError(f"{message}; pick another attention_plot path.") from None
    return path
