"""Pictures: where the model looked for each word, and how training went.

`attention_figure` draws the image and, for each generated word, the grid x grid attention
upsampled to the image and overlaid, the word as the title (Xu et al. 2015, Fig. 2-3).
`training_curves` plots loss and validation scores from a run's metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
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


def upsample(alpha: np.ndarray, grid: int, size: tuple[int, int], vmax: float | None = None) -> np.ndarray:
    """(L,) attention -> (H, W) map in [0, 1] for an image of size (W, H), bilinear: alpha / vmax
    (default: the map's own maximum; pass one figure-wide value so a flat map looks flat)."""
    a = alpha.reshape(grid, grid).astype(np.float32)  # (L,) -> (g, g)
    a = np.clip(a / max(float(a.max()) if vmax is None else vmax, 1e-12), 0, 1)
    return np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize(size, Image.BILINEAR), dtype=np.float32) / 255.0


FLOOR = 0.2  # the brightness left where the model did not look


def dim(photo: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The photo (H, W, 3) darkened where attention a (H, W) in [0, 1] is low, its own colors kept
    where it is high (a color wash would hide the colors the words name)."""
    return (photo.astype(np.float32) * (FLOOR + (1 - FLOOR) * a[..., None])).clip(0, 255).astype(np.uint8)


def attention_figure(image: Image.Image, words: list[str], alphas: np.ndarray, grid: int, out: str | Path,
                     columns: int = COLUMNS) -> Path:
    """Write a PNG: the image under the whole caption, then one panel per word, the image dimmed
    where that word's attention is low. One scale for every panel (the largest alpha of the
    caption is full brightness), shown by a colorbar.

    Args:
        alphas: (T, L) attention per word (T >= len(words)).
    """
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    w_px, h_px = figure_size(len(words), columns)
    cols = min(columns, len(words) + 1)
    rows = math.ceil((len(words) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w_px / DPI, h_px / DPI), dpi=DPI, squeeze=False)
    img = np.asarray(image.convert("RGB"))
    vmax = float(np.max(alphas[: len(words)])) if len(words) else 1.0
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(img)
    axes.flat[0].set_title("image", fontsize=9)
    for t, word in enumerate(words):
        ax = axes.flat[t + 1]
        ax.imshow(dim(img, upsample(alphas[t], grid, image.size, vmax)))
        ax.set_title(f"{word}  (max {float(np.max(alphas[t])):.2f})", fontsize=9)
    caption = "\n".join(textwrap.wrap(" ".join(words), width=max(30, 18 * cols)))
    fig.suptitle(caption, fontsize=11, y=0.995, va="top")
    top = 1 - (0.55 + 0.2 * caption.count("\n")) / (rows * PANEL_INCHES)  # room for the caption and panel titles
    fig.subplots_adjust(left=0.01, right=0.88, bottom=0.02, top=top, wspace=0.05, hspace=0.25)
    brightness = LinearSegmentedColormap.from_list("brightness", [(FLOOR,) * 3, (1.0, 1.0, 1.0)])
    bar = fig.colorbar(ScalarMappable(Normalize(0, vmax), brightness), ax=list(axes.flat), fraction=0.02, pad=0.01)
    bar.set_label("alpha", fontsize=8)
    bar.ax.tick_params(labelsize=7)
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
    steps = [r["step"] for r in train]
    if train and "xent" in train[0]:
        a.plot(steps, [r["xent"] for r in train], label="cross entropy per token")
    if train and "attention_reg" in train[0]:
        a.plot(steps, [r["attention_reg"] for r in train], label="attention regularizer per token", alpha=0.7)
    if train and "xent" not in train[0]:  # self-critical: the policy loss only
        a.plot(steps, [r["loss"] for r in train], label="loss")
    a.set_xlabel("step")
    a.set_ylabel("per token (log scale)")
    a.set_yscale("log")
    a.legend(fontsize=8)
    a.set_title("training loss")
    b.plot([r["step"] for r in val], [r["val_CIDEr"] for r in val], "o-", label="CIDEr-D")
    b.plot([r["step"] for r in val], [r["val_Bleu_4"] for r in val], "s-", label="BLEU-4")
    b.set_xlabel("step")
    b.set_ylabel("score")
    b.legend(fontsize=8)
    b.set_title("validation (greedy)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
