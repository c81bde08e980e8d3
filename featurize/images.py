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

import io
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


# ---- decoding on the model's device (nvjpeg on a GPU) --------------------------------------
JPEG_MAGIC = b"\xff\xd8"


class SplitFiles(SplitImages):
    """Like SplitImages, but a plain RGB/grayscale JPEG comes back undecoded, as bytes ("jpeg"), with
    its EXIF orientation, for `decode_on_device`; anything else is decoded here as usual."""

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        path = self.root / self.entries[row].filename
        empty = torch.empty(0, dtype=torch.uint8)
        try:
            if path.is_file() and path.stat().st_size > 0:
                data = path.read_bytes()
                if data[:2] == JPEG_MAGIC:
                    with Image.open(io.BytesIO(data)) as im:  # header only: mode and EXIF
                        mode, orientation = im.mode, im.getexif().get(0x0112, 1)
                    if mode in ("RGB", "L"):
                        return {"row": row, "image": empty, "jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                "orientation": int(orientation), "ok": True, "error": ""}
            image = to_tensor(load_rgb(path), self.image_size)
            return {"row": row, "image": image, "jpeg": empty, "orientation": 1, "ok": True, "error": ""}
        except (ImageError, OSError, SyntaxError, ValueError) as e:
            err = str(e) if isinstance(e, ImageError) else f"{path}: cannot decode ({e})"
            return {"row": row, "image": empty, "jpeg": empty, "orientation": 1, "ok": False, "error": err}


def collate_files(items: list[dict]) -> dict:
    return {"row": torch.tensor([it["row"] for it in items]), "ok": torch.tensor([it["ok"] for it in items]),
            "error": [it["error"] for it in items], "image": [it["image"] for it in items],
            "jpeg": [it["jpeg"] for it in items], "orientation": [it["orientation"] for it in items]}


def apply_orientation(t: torch.Tensor, orientation: int) -> torch.Tensor:
    """EXIF orientation on a (3, H, W) tensor, as PIL's ImageOps.exif_transpose."""
    if orientation == 2:
        return t.flip(2)
    if orientation == 3:
        return t.flip(1).flip(2)
    if orientation == 4:
        return t.flip(1)
    if orientation == 5:
        return t.transpose(1, 2)
    if orientation == 6:
        return t.rot90(-1, dims=(1, 2))
    if orientation == 7:
        return t.transpose(1, 2).flip(1).flip(2)
    if orientation == 8:
        return t.rot90(1, dims=(1, 2))
    return t


def decode_on_device(batch: dict, device: torch.device, image_size: int) -> tuple[torch.Tensor, list[bool], list[str]]:
    """(b, 3, S, S) uint8 on `device` for a `collate_files` batch; JPEGs decoded there (nvjpeg on CUDA).

    Returns the images of the rows that decoded, and per row ok / error (a JPEG the device
    decoder refuses is a failure with its reason, like a file PIL refuses).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    ok, errors = list(batch["ok"].tolist()), list(batch["error"])
    jpeg_rows = [i for i, (good, j) in enumerate(zip(ok, batch["jpeg"])) if good and j.numel()]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg_rows:
        datas = [batch["jpeg"][i] for i in jpeg_rows]
        try:
            outs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch call: decode one by one
            outs = []
            for d in datas:
                try:
                    outs.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as e:
                    outs.append(e)
        for i, out in zip(jpeg_rows, outs):
            if isinstance(out, Exception):
                ok[i], errors[i] = False, f"cannot decode JPEG ({str(out).splitlines()[0]})"
            else:
                decoded[i] = apply_orientation(out, batch["orientation"][i])
    images = []
    for i, good in enumerate(ok):
        if not good:
            continue
        if i in decoded:
            images.append(TF.resize(decoded[i], [image_size, image_size], antialias=True))
        else:
            images.append(batch["image"][i].to(device, non_blocking=True))
    stacked = torch.stack(images) if images else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8, device=device)
    return stacked, ok, errors
