"""Figures and cells the benchmark reports share: numbers as text, matplotlib figures as images, R[t, j]
heatmaps, and sample grids cut into one cell per concept."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image


def fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def fmt_int(x) -> str:
    return "–" if x is None else f"{int(round(x)):,}"


def render_figure(fig) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def matrix(R) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float).reshape(len(R), -1)


def nan_list(values) -> list[float]:
    return [np.nan if v is None else v for v in values]


def heatmap_axes(fig, ax, R, concepts, title: str, higher_is_better: bool = True, rows: list[str] | None = None
                 ) -> None:
    """R[t, j] on ``ax``: columns the concepts, rows "after <concept t>" (or ``rows``), each cell's value written."""
    arr = matrix(R)
    T, J = arr.shape
    rows = rows if rows is not None else [f"after {c}" for c in concepts[:T]]
    finite = np.isfinite(arr).any()
    cmap = "viridis" if higher_is_better else "viridis_r"  # bright = good for every metric
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=np.nanmin(arr) if finite else 0,
                   vmax=np.nanmax(arr) if finite else 1)
    ax.set_xticks(range(J), concepts[:J], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(T), rows, fontsize=8)
    ax.set_xlabel("concept j")
    ax.set_title(title, fontsize=9)
    lo, hi = im.get_clim()
    for t in range(T):
        for j in range(J):
            if np.isfinite(arr[t, j]):
                x = (arr[t, j] - lo) / (hi - lo) if hi > lo else 0.0
                light = (x if higher_is_better else 1 - x) > 0.6  # viridis is light at its top
                ax.text(j, t, f"{arr[t, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if light else "white")
    fig.colorbar(im, ax=ax, shrink=0.8)


def heatmap(R, concepts, title: str, rows: list[str] | None = None) -> Image.Image:
    """R as a heatmap (rows the task just learned, or ``rows``; columns the concepts)."""
    T, J = matrix(R).shape
    fig = Figure(figsize=(2.2 + 0.55 * J, 1.0 + 0.5 * T))
    heatmap_axes(fig, fig.add_subplot(), R, concepts, title, rows=rows)
    return render_figure(fig)


def grid_cells(path: Path, n_rows: int) -> list[Image.Image] | None:
    """Cut a sample grid (one row of square images per concept) into one cell per row, each row's
    images rearranged into a square block (4 images: 2 x 2). None if the file is missing or is not
    ``n_rows`` rows of square images."""
    if not path.is_file():
        return None
    with Image.open(path) as im:
        grid = im.convert("RGB")
    h = grid.height // n_rows
    if n_rows < 1 or h < 1 or grid.height != h * n_rows or grid.width % h:
        return None
    k = grid.width // h
    cols = math.ceil(math.sqrt(k))
    cells = []
    for row in range(n_rows):
        cell = Image.new("RGB", (cols * h, math.ceil(k / cols) * h), "white")
        for i in range(k):
            cell.paste(grid.crop((i * h, row * h, (i + 1) * h, (row + 1) * h)), ((i % cols) * h, (i // cols) * h))
        cells.append(cell)
    return cells
