"""The report's figures as PNG data URIs (matplotlib without pyplot, so no global figure state), and samples.png."""

import base64
import io
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.image import imsave

from fedfactory.report.markup import img
from fedfactory.runs import atomic_write_bytes


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_uri(fig: Figure) -> str:
    """Render a matplotlib figure (no pyplot, so no global figure state) to a PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return png_uri(buf.getvalue())


def image_grid(images: np.ndarray, cols: int = 4, width: int = 140) -> np.ndarray:
    """uint8 (n, H, W, C) images tiled into one RGB uint8 picture about `width` pixels wide (whole-pixel upscaling)."""
    n, h, w, c = images.shape
    scale = max(1, round(width / (cols * w)))
    pad = 1
    rows = max(1, math.ceil(n / cols))
    canvas = np.full((rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        im = np.repeat(np.repeat(im, scale, 0), scale, 1)  # nearest neighbour keeps tiny images honest
        r, q = divmod(i, cols)
        y, x = pad + r * (h * scale + pad), pad + q * (w * scale + pad)
        canvas[y:y + h * scale, x:x + w * scale] = im if c == 3 else np.repeat(im, 3, axis=2)
    return canvas


def grid_uri(images: np.ndarray) -> str:
    buf = io.BytesIO()
    imsave(buf, image_grid(images), format="png")
    return png_uri(buf.getvalue())


def heatmap(ax, values: np.ndarray, xlabels: list[str], ylabels: list[str], annotate: np.ndarray | None,
            cmap: str = "Blues") -> None:
    """Matrix as colored cells with optional integer annotations; text flips to white on dark cells."""
    vmax = float(np.nanmax(values)) if values.size and np.isfinite(values).any() else 1.0
    ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax or 1.0, aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=45 if max(map(len, xlabels), default=0) > 3 else 0,
                  ha="right" if max(map(len, xlabels), default=0) > 3 else "center", fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    if annotate is not None and values.size <= 400:
        for (i, j), v in np.ndenumerate(annotate):
            if v:
                dark = values[i, j] > 0.6 * (vmax or 1.0)
                ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7, color="white" if dark else "black")


def bars(per_series: dict[str, list[float | None]], labels: list[str], ylabel: str, title: str) -> str:
    """Grouped vertical bars, one group per label, one bar per series; None is drawn as a gap."""
    fig = Figure(figsize=(min(7.0, max(4.0, 0.22 * len(labels) * len(per_series) + 1.6)), 3.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(per_series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(per_series.items()):
        ys = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(per_series) - 1) / 2) * width, ys, width, label=name)
    ax.set_xticks(x, labels, rotation=45 if max(map(len, labels), default=0) > 3 else 0,
                  ha="right" if max(map(len, labels), default=0) > 3 else "center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(per_series) > 1:
        ax.legend(fontsize=8, loc="lower right")
    return img(figure_uri(fig), title)


def write_samples_png(images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...], path: Path,
                     per_class: int = 10) -> None:
    """samples.png: a grid with one row of synthetic samples per class, written atomically."""
    fig = Figure(figsize=(per_class * 0.6, len(class_names) * 0.6 + 0.2))
    axes = fig.subplots(len(class_names), per_class)
    axes = np.atleast_2d(axes)
    for c, name in enumerate(class_names):
        rows = np.flatnonzero(labels == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(rows):
                picture = images[rows[j]]
                ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=255)
        axes[c, 0].set_title(name, fontsize=6, loc="left")
    fig.tight_layout(pad=0.1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
