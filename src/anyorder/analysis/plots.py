"""Order heatmaps: for a few examples, the step at which each answer position was finalised."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch


def finalization_grid(panels: Dict[str, torch.Tensor], path, n_examples: int = 4,
                      grid_shape: Optional[Sequence[int]] = None, title: str = "") -> Path:
    """One row of panels per (order, decoder), one column per example.

    ``panels`` maps a label to a [B, n] tensor of finalisation steps over the answer positions
    (left to right). With ``grid_shape`` (e.g. (4, 4) for a Sudoku) each example is drawn as
    that grid, else as a strip. Colour = step normalised to [0, 1] within the example;
    the number in each cell is the step itself.
    """
    plt = _plt()
    labels = list(panels)
    rows, cols = len(labels), n_examples
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 1.6, 1.9 * rows + 0.4), squeeze=False)
    for r, label in enumerate(labels):
        steps = panels[label]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(steps):
                ax.axis("off")
                continue
            s = steps[c].double()
            norm = (s - s.min()) / max(float(s.max() - s.min()), 1.0)
            shape = tuple(grid_shape) if grid_shape else (1, len(s))
            img = norm.view(shape).numpy()
            ax.imshow(img, cmap="viridis", vmin=0, vmax=1)
            for idx, v in enumerate(s.view(shape).long().flatten().tolist()):
                ax.text(idx % shape[1], idx // shape[1], str(v), ha="center", va="center", fontsize=7,
                        color="white" if img.flatten()[idx] < 0.6 else "black")
            if c == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title or "step at which each answer cell was finalised (dark = early)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- diagnostics (analysis.report)
def _plt():
    import matplotlib  # lazy: matplotlib is heavy and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only the plots need it

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def position_step_heatmap(matrix: torch.Tensor, path, title: str = "") -> Path:
    """[n_answer, T] share of rows finalising position i at step t (the order heatmap of
    "Parallelism and Generation Order in Masked Diffusion Language Models")."""
    plt = _plt()
    n, T = matrix.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * T, 12), min(1.5 + 0.22 * n, 10)))
    im = ax.imshow(matrix.numpy(), aspect="auto", cmap="magma", origin="upper", interpolation="nearest")
    ax.set_xlabel("decoding step")
    ax.set_ylabel("answer position (left to right)")
    ax.set_title(title or "share of rows finalising position i at step t", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, path)


def bar_histogram(hist: Dict[int, float], path, xlabel: str, ylabel: str, title: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ks = sorted(hist)
    ax.bar(ks, [hist[k] for k in ks], color="tab:blue")
    ax.set_xticks(ks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def distance_plot(curves: Dict[str, Dict[int, float]], bounds: Dict[str, Dict[int, float]], path,
                  title: str = "") -> Path:
    """Measured mean max probability per distance (solid, dots) and Zipf curves (dashed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, c in curves.items():
        ds = sorted(c)
        ax.plot(ds, [c[d] for d in ds], "o-", label=label, ms=3)
    for label, c in bounds.items():
        ds = sorted(c)
        ax.plot(ds, [c[d] for d in ds], "--", label=label)
    ax.set_xlabel("distance to the nearest visible token")
    ax.set_ylabel("mean max probability")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
