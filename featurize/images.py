"""Image decoding that survives real data, and the Dataset featurize and fine-tuning read.

Decoding: EXIF orientation applied; grayscale, 16-bit, CMYK, palette and alpha images
become 8-bit RGB (alpha composited on black, as the pixels carry no meaning there);
a PNG named .jpg decodes by content. A missing, empty, truncated or non-image file is
an ImageError with the reason; featurize records it and goes on (or stops with --strict).

Resize policy: the whole image is resized to image_size x image_size (aspect ratio not
kept, no crop), as sgrvinod's tutorial does (256x256) and as the 448x448 input (configs/coco.yaml)
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

from common.errors import UserError
from common.files import inside, regular_file
from shards.karpathy import ImageEntry


class ImageError(UserError):
    """An image that cannot be decoded; the message names the file and the reason."""


def image_file(root: str | os.PathLike, filename: str) -> Path:
    """root/filename, when it lies inside the image root with symlinks resolved; else an ImageError
    (recorded as a failed image, like an unreadable one). A split file's paths are checked as text
    when it is read; this also refuses a link under the root to a file elsewhere. Image folders
    that are links to another disk work when --images_root names the folder they really live in."""
    try:
        return inside(root, filename, f"{Path(root) / filename}", ImageError)
    except ImageError as e:
        raise ImageError(f"{e}; point --images_root at the folder that really holds the images") from None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode any image file PIL reads into 8-bit RGB with EXIF orientation applied."""
    path = Path(path)
    if regular_file(path, "file", ImageError).st_size == 0:
        raise ImageError(f"{path}: empty file")
    return decode_rgb(path, str(path))


def decode_rgb(source, where: str, max_pixels: int = 0) -> Image.Image:
    """8-bit RGB, EXIF orientation applied, from a path or a binary file object (an upload), or an
    ImageError naming `where`: not an image, truncated, or larger than `max_pixels` (0: PIL's own
    bomb limit), which is checked from the header, before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:  # reads the header only
                w, h = im.size
                if max_pixels and w * h > max_pixels:
                    raise ImageError(f"{where}: image too large: {w} x {h} pixels, the limit is {max_pixels:,}")
                im.load()  # a truncated file fails here ("image file is truncated")
                return to_rgb(ImageOps.exif_transpose(im))
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not an image PIL can identify") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"{where}: image too large to decode ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{where}: cannot decode ({e})") from None


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
            image, ok, error = to_tensor(load_rgb(image_file(self.root, entry.filename)), self.image_size), True, ""
        except ImageError as e:
            image, ok, error = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), False, str(e)
        return {"row": row, "image": image, "ok": ok, "error": error}


# ---- decoding on the model's device (nvjpeg on a GPU) --------------------------------------
JPEG_MAGIC = b"\xff\xd8"


class SplitFiles(SplitImages):
    """Like SplitImages, but a plain RGB/grayscale JPEG comes back undecoded, as bytes ("jpeg"), with
    its EXIF orientation, for `decode_on_device`; anything else is decoded here as usual ("image")."""

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        try:
            path = image_file(self.root, self.entries[row].filename)
            if path.is_file() and path.stat().st_size > 0:
                data = path.read_bytes()
                if data[:2] == JPEG_MAGIC:
                    with Image.open(io.BytesIO(data)) as im:  # header only: mode and EXIF
                        mode, orientation = im.mode, im.getexif().get(0x0112, 1)
                    if mode in ("RGB", "L"):
                        return {"row": row, "image": None, "jpeg": data, "orientation": int(orientation), "ok": True, "error": ""}
            image = to_tensor(load_rgb(path), self.image_size)
            return {"row": row, "image": image, "jpeg": b"", "orientation": 1, "ok": True, "error": ""}
        except (ImageError, OSError, SyntaxError, ValueError) as e:
            err = str(e) if isinstance(e, ImageError) else f"{self.root / self.entries[row].filename}: cannot decode ({e})"
            return {"row": row, "image": None, "jpeg": b"", "orientation": 1, "ok": False, "error": err}


def collate_files(items: list[dict]) -> dict:
    """A SplitFiles batch in a few tensors (each tensor crosses from a worker through its own shared
    memory segment, so one per image would cost more than the decoding): every JPEG's bytes in one
    flat uint8 tensor with per-row sizes, and the images decoded here stacked, with their rows."""
    data = b"".join(it["jpeg"] for it in items)
    here = [i for i, it in enumerate(items) if it["image"] is not None]
    return {"row": torch.tensor([it["row"] for it in items]), "ok": torch.tensor([it["ok"] for it in items]),
            "error": [it["error"] for it in items], "orientation": [it["orientation"] for it in items],
            "jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
            "jpeg_sizes": [len(it["jpeg"]) for it in items],
            "image": torch.stack([items[i]["image"] for i in here]) if here else torch.empty(0, dtype=torch.uint8),  # (m, 3, S, S)
            "image_rows": here}


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
    ok, errors = list(batch["ok"].tolist()), list(batch["error"])
    sizes = batch["jpeg_sizes"]
    jpegs = torch.split(batch["jpeg"], sizes)  # views, one per row (empty where not a JPEG)
    jpeg_rows = [i for i, (good, n) in enumerate(zip(ok, sizes)) if good and n]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg_rows:
        outs = _decode_jpegs([jpegs[i] for i in jpeg_rows], device)
        for i, out in zip(jpeg_rows, outs):
            if isinstance(out, Exception):
                ok[i], errors[i] = False, f"cannot decode JPEG ({str(out).splitlines()[0]})"
            else:
                decoded[i] = apply_orientation(out, batch["orientation"][i])
    # resize the images of one size together: one call per distinct (H, W), not per image
    by_shape: dict[tuple, list[int]] = {}
    for i, t in decoded.items():
        by_shape.setdefault(tuple(t.shape), []).append(i)
    resized: dict[int, torch.Tensor] = dict(zip(batch["image_rows"], batch["image"]))  # decoded by the workers
    for rows in by_shape.values():
        x = torch.stack([decoded[i] for i in rows])  # (n, 3, H, W)
        resized.update(zip(rows, TF.resize(x, [image_size, image_size], antialias=True)))  # (n, 3, S, S)
    images = [resized[i] for i, good in enumerate(ok) if good]
    if not images:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8, device=device), ok, errors
    return torch.stack([t.to(device, non_blocking=True) for t in images]), ok, errors


_DECODE_STREAMS: dict = {}  # device -> the side stream JPEGs are decoded with


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list:
    """decode_jpeg on a list, one by one if the batch call fails (one bad file fails the batch): a
    (3, H, W) tensor or the exception per file.

    On CUDA, torchvision decodes on its own stream into tensors allocated from the current
    stream's memory pool. A block just freed on the current stream (the compute stream's grids,
    still to be copied to the host, or the preparing thread's last batch, still being resized)
    could then be overwritten before that stream is done with it. So the decode runs with a side
    stream current (its outputs come from that stream's pool), the current stream waits for it,
    and each output is marked as used there (`record_stream`), so its memory is not handed to
    the next decode before the current stream has read it.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode() -> list:
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            outs: list = []
            for d in datas:
                try:
                    outs.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as e:
                    outs.append(e)
            return outs

    if device.type != "cuda":
        return decode()
    main = torch.cuda.current_stream(device)
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    side = _DECODE_STREAMS[device]
    with torch.cuda.stream(side):
        outs = decode()
    main.wait_stream(side)
    for out in outs:
        if isinstance(out, torch.Tensor):
            out.record_stream(main)
    return outs
