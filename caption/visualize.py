"""Pictures: where the model looked for each word, and how training went.

`attention_figure` draws the image and, for each generated word, the grid x grid attention
upsampled to the image and overlaid, the word as the title (Xu et al. 2015, Fig. 2-3).
`training_curves` plots loss and validation scores from a run's metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

PANEL_INCHES, DPI, COLUMNS = 2.0, 100, 5


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def figure_size(n_words: int, columns: int = COLUMNS) -> tuple[int, int]:
    """Pixel size (width, height) of an attention figure with n_words panels plus the image."""
    panels = n_words + 1
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    return int(cols * PANEL_INCHES * DPI), int(rows * PANEL_INCHES * DPI)


def upsample(alpha: np.ndarray, grid: int, size: tuple[int, int]) -> np.ndarray:
    """(L,) attention -> (H, W) map in [0, 1], bilinear, for an image of size (W, H)."""
    a = alpha.reshape(grid, grid).astype(np.float32)  # (L,) -> (g, g)
    a = a / max(float(a.max()), 1e-12)
    return np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize(size, Image.BILINEAR), dtype=np.float32) / 255.0


def attention_figure(image: Image.Image, words: list[str], alphas: np.ndarray, grid: int, out: str | Path,
                     columns: int = COLUMNS) -> Path:
    """Write a PNG: the image, then one panel per word with its attention overlaid.

    Args:
        alphas: (T, L) attention per word (T >= len(words)).
    """
    plt = _pyplot()
    w_px, h_px = figure_size(len(words), columns)
    cols = min(columns, len(words) + 1)
    rows = math.ceil((len(words) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w_px / DPI, h_px / DPI), dpi=DPI, squeeze=False)
    img = np.asarray(image.convert("RGB"))
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(img)
    axes.flat[0].set_title(" ".join(words[:6]) + (" ..." if len(words) > 6 else ""), fontsize=7)
    for t, word in enumerate(words):
        ax = axes.flat[t + 1]
        ax.imshow(img)
        ax.imshow(upsample(alphas[t], grid, image.size), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.set_title(word, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def training_curves(metrics_jsonl: str | Path, out: str | Path) -> Path:
    """Loss per step and validation CIDEr-D / BLEU-4 from a run's metrics.jsonl."""
    plt = _pyplot()
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_CIDEr" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=DPI)
    a.plot([r["step"] for r in train], [r["xent"] for r in train], label="cross entropy / token")
    a.plot([r["step"] for r in train], [r["loss"] for r in train], label="+ attention regularizer", alpha=0.6)
    a.set_xlabel("step")
    a.set_yscale("log")
    a.legend(fontsize=8)
    a.set_title("training loss")
    b.plot([r["step"] for r in val], [r["val_CIDEr"] for r in val], "o-", label="CIDEr-D")
    b.plot([r["step"] for r in val], [r["val_Bleu_4"] for r in val], "s-", label="BLEU-4")
    b.set_xlabel("step")
    b.legend(fontsize=8)
    b.set_title("validation (greedy)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
