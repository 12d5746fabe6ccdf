"""Figures people would rather look at than read: reconstructions and confusion matrices."""
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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


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
