"""Image decoding that survives real data, and the Dataset featurize and fine-tuning read.

Decoding: EXIF orientation applied; grayscale, 16-bit, CMYK, palette and alpha images
become 8-bit RGB (alpha composited on black, as the pixels carry no meaning there);
a PNG named .jpg decodes by content. A missing, empty, truncated or non-image file is
an ImageError with the reason; featurize records it and goes on (or stops with --strict).

Resize policy: the whole image is resized to image_size x image_size (aspect ratio not
kept, no crop), as sgrvinod's tutorial does (256x256) and as the DESIGN's 448x448 input
for a 14x14 layer4 grid implies. Cropping, as the paper's VGG setup did (shortest side
256, center 224), would cut off objects at the borders that the captions mention;
ruotianluo's prepro_feats keeps the original size and adaptive-pools the grid, which makes
the receptive field of a cell depend on the image size. Normalization is applied on the
model's device from the weights' own transforms (`featurize.backbone`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from shards.karpathy import ImageEntry


class ImageError(ValueError):
    """An image that cannot be decoded; the message names the file and the reason."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode any image PIL reads into 8-bit RGB with EXIF orientation applied."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # a truncated file fails here ("image file is truncated")
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode ({e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode (L, I;16, I, F, P, PA, LA, RGBA, CMYK, YCbCr, 1)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


def to_tensor(im: Image.Image, image_size: int) -> torch.Tensor:
    """(3, S, S) uint8: the whole image resized (bilinear, antialiased) to S x S."""
    t = TF.pil_to_tensor(im)  # (3, H, W) uint8
    return TF.resize(t, [image_size, image_size], antialias=True)


class SplitImages(Dataset):
    """Images of a split, by row: {"row", "image" (3, S, S) uint8, "ok", "error"}.

    A failed image yields zeros with ok=False and the reason, so one bad file does
    not stop a DataLoader; the caller records or raises.
    """

    def __init__(self, entries: list[ImageEntry], root: str | os.PathLike, image_size: int, rows: list[int] | None = None):
        self.entries, self.root, self.image_size = entries, Path(root), image_size
        self.rows = list(range(len(entries))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        entry = self.entries[row]
        try:
            image, ok, error = to_tensor(load_rgb(self.root / entry.filename), self.image_size), True, ""
        except ImageError as e:
            image, ok, error = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), False, str(e)
        return {"row": row, "image": image, "ok": ok, "error": error}
