"""Figures people would rather look at than read: reconstructions, token maps and confusion matrices."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _display(img: np.ndarray, rgb: tuple[int, int, int] | None) -> np.ndarray:
    """[C, H, W] normalised -> [H, W, 3] or [H, W] in 0..1 for imshow (2-98 % stretch)."""
    img = img[list(rgb)] if rgb and img.shape[0] >= 3 else img[:1]
    lo, hi = np.percentile(img, 2), np.percentile(img, 98)
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    return img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]


def _save(fig, path: str | Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def reconstruction_grid(images, masked, recon, path: str | Path, title: str = "",
                        rgb: tuple[int, int, int] | None = None, n: int = 8) -> Path:
    """Rows: input, masked input, reconstruction. Arrays [B, C, H, W] (numpy)."""
    n = min(n, len(images))
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.6), squeeze=False)
    for col in range(n):
        for row, (name, arr) in enumerate((("input", images), ("masked", masked), ("recon", recon))):
            ax = axes[row, col]
            ax.imshow(_display(arr[col], rgb), cmap="gray", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
    return _save(fig, path, title)


def confusion_matrix_plot(cm: np.ndarray, classes: list[str], path: str | Path, title: str = "") -> Path:
    """Counts with row-normalised colour (recall per true class)."""
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def code_colours(codebook_size: int) -> np.ndarray:
    """A fixed colour per visual token [K, 3] in 0..1 (the same in every figure of a run)."""
    return np.random.default_rng(0).uniform(0.1, 0.95, size=(codebook_size, 3))


def token_map_grid(images, token_rows: dict[str, np.ndarray], codebook_size: int, path: str | Path,
                   title: str = "", rgb: tuple[int, int, int] | None = None, n: int = 8,
                   masks: np.ndarray | None = None) -> Path:
    """Rows: the input tiles [B, C, H, W], then one row per token map [B, h, w] (each patch coloured
    by its code). masks [B, h, w] (True = masked): hatched over every token row after the first."""
    n = min(n, len(images))
    colours = code_colours(codebook_size)
    rows = [("input", None), *token_rows.items()]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.5 * len(rows) + 0.4), squeeze=False)
    for r, (name, tokens) in enumerate(rows):
        for col in range(n):
            ax = axes[r, col]
            if tokens is None:
                ax.imshow(_display(images[col], rgb), cmap="gray", interpolation="nearest")
            else:
                ax.imshow(colours[tokens[col]], interpolation="nearest")
                if masks is not None and r > 1:
                    ax.contourf(masks[col].astype(float), levels=[0.5, 1.5], colors="none", hatches=["///"])
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
    return _save(fig, path, title)
