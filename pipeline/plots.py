"""Figures people would rather look at than read: reconstructions, token maps, confusion matrices,
and for multi-label classifiers per-label ROC curves and a label co-occurrence / error matrix."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


MASKED = 0.8  # the one colour (light grey) masked patches are drawn in, in every figure


def _stretch(img: np.ndarray, rgb: tuple[int, int, int] | None) -> tuple[np.ndarray, float, float]:
    """[C, H, W] normalised -> the displayed bands and their 2-98 % range."""
    img = img[list(rgb)] if rgb and img.shape[0] >= 3 else img[:1]
    return img, float(np.nanpercentile(img, 2)), float(np.nanpercentile(img, 98))


def _display(img: np.ndarray, lo: float, hi: float, hidden: np.ndarray | None = None) -> np.ndarray:
    """Displayed bands [3 or 1, H, W] -> [H, W, 3] or [H, W] in 0..1 for imshow; `hidden` [H, W]
    pixels (masked patches) in the MASKED colour."""
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    if hidden is not None:
        img = np.where(hidden[None], MASKED, img)
    return img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]


def _save(fig, path: str | Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def reconstruction_grid(images, masked, recon, path: str | Path, **kwargs) -> Path:
    """reconstruction_figure(...) saved as a PNG at `path`."""
    fig = reconstruction_figure(images, masked, recon, **kwargs)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def reconstruction_figure(images, masked, recon, title: str = "", rgb: tuple[int, int, int] | None = None,
                          n: int = 8, mask=None, patch_size: int | None = None, channels: list[str] | None = None,
                          labels: list[str] | None = None):
    """Rows: input, masked input, reconstruction; arrays [B, C, H, W] (numpy, normalised) -> figure.

    Each column shares one display stretch (the input's 2-98 %), so colours compare across rows.
    mask [B, L] (1 = masked) with patch_size draws masked patches in one fixed colour (MASKED);
    channels names the bands shown as R, G, B (or grey) on the figure; labels titles each column.
    """
    n = min(n, len(images))
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.9), squeeze=False)
    for col in range(n):
        shown, lo, hi = _stretch(images[col], rgb)
        hidden = None
        if mask is not None and patch_size:
            side = images.shape[-1] // patch_size
            grid = np.asarray(mask[col]).reshape(-1, side) > 0.5  # [h, w] patches
            hidden = grid.repeat(patch_size, 0).repeat(patch_size, 1)
        for row, (name, arr) in enumerate((("input", images), ("masked", masked), ("recon", recon))):
            ax = axes[row, col]
            bands = _stretch(arr[col], rgb)[0]
            ax.imshow(_display(bands, lo, hi, hidden if name == "masked" else None), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
            if row == 0 and labels:
                ax.set_title(labels[col], fontsize=8)
    if channels:
        used = [channels[i] for i in rgb] if rgb and len(channels) >= 3 else [channels[0]]
        bands = f"R, G, B = {', '.join(used)}" if len(used) == 3 else f"grey = {used[0]}"
        fig.text(0.5, 0.01, f"{bands}; masked patches in light grey", ha="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


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


def roc_curves_plot(probs: np.ndarray, targets: np.ndarray, labels: list[str], path: str | Path,
                    title: str = "") -> Path:
    """One ROC curve per label (scikit-learn's roc_curve) with its AUROC in the legend; a label
    without a positive or a negative in `targets` is named in the legend as not scored.
    probs [N, K] (sigmoid outputs), targets [N, K] in {0, 1}."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for k, name in enumerate(labels):
        pos = int(targets[:, k].sum())
        if 0 < pos < len(targets):
            fpr, tpr, _ = roc_curve(targets[:, k], probs[:, k])
            ax.plot(fpr, tpr, lw=1.5, label=f"{name}  {roc_auc_score(targets[:, k], probs[:, k]):.3f} (n+={pos})")
        else:
            ax.plot([], [], ls="none", label=f"{name}  not scored (no {'positive' if not pos else 'negative'})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate"), ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right", title="label  AUROC", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def label_errors_plot(cooccurrence: np.ndarray, predicted_given_true: np.ndarray, labels: list[str],
                      path: str | Path, title: str = "") -> Path:
    """Two [K, K] matrices with rows = true label i (counts, colour = share of row i's examples):
    left, how often label j is also true (co-occurrence; the diagonal is the support); right, how
    often label j is predicted (the diagonal is recall; an off-diagonal cell darker than on the
    left is a label predicted with i more often than it occurs with it: an error to look at)."""
    k = len(labels)
    support = np.maximum(np.diag(cooccurrence), 1)[:, None]
    fig, axes = plt.subplots(1, 2, figsize=(2 * (0.9 * k + 2), 0.9 * k + 2.2))
    for ax, counts, name in ((axes[0], cooccurrence, "true label j (co-occurrence)"),
                             (axes[1], predicted_given_true, "predicted label j")):
        share = counts / support
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{counts[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels, fontsize=8)
        ax.set_xlabel(name), ax.set_ylabel("true label i")
    fig.suptitle(f"{title}\nrow i: the examples with true label i (count, share of them)", fontsize=9)
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
                ax.imshow(_display(*_stretch(images[col], rgb)), cmap="gray", interpolation="nearest")
            else:
                ax.imshow(colours[tokens[col]], interpolation="nearest")
                if masks is not None and r > 1:
                    ax.contourf(masks[col].astype(float), levels=[0.5, 1.5], colors="none", hatches=["///"])
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
    return _save(fig, path, title)
