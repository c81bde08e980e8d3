"""Caption any image with a trained run, and draw where it looked.

    python -m caption.predict --run runs/shapes photo.jpg --attention attn.png
    python -m caption.predict --run runs/shapes photos/ --beam_size 5 --attention figures/

The backbone, its weights and the preprocessing come from the run's features manifest
(the same resize and normalization featurize used), so captions match what training saw.
A fine-tuned run's RUN/backbone.safetensors takes precedence.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from caption.decode import caption_features
from caption.encoder import backbone_for_run
from caption.run import RunError, load_decoder
from caption.visualize import attention_figure
from common.cli import command
from common.config import check_args
from common.tensors import default_device, to_fp16
from featurize.backbone import Backbone
from featurize.images import ImageError, load_rgb, to_tensor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def list_images(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images; a folder without one is an ImageError."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageError(f"{p}: a folder without images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        else:
            out.append(p)
    return out


@torch.no_grad()
def caption_image(model, vocab, backbone: Backbone, image, image_size: int, beam_size: int, max_length: int,
                  device) -> tuple[list[str], np.ndarray]:
    """(words, alphas (T, L)) for one RGB image: resized and normalized as featurize did, the grid
    rounded through float16 as the cached grids are, then beam search. The one per-image path of
    `predict` and the page (caption/service.py)."""
    x = to_tensor(image, image_size)[None].to(device)  # (1, 3, P, P) uint8
    grid = to_fp16(backbone(x))  # (1, g, g, C), fp16 like the cached grids
    dec = caption_features(model, vocab, grid, beam_size, max_length)
    words = vocab.decode(dec.tokens[0].tolist())
    L = grid.shape[1] * grid.shape[2]
    alphas = dec.alphas[0].float().cpu().numpy() if dec.alphas is not None else np.zeros((len(words), L))
    return words, alphas


@torch.no_grad()
def predict(run: str | Path, images: list[str], beam_size: int = 3, max_length: int = 20, attention: str | None = None,
            checkpoint: str = "best") -> list[dict]:
    """[{"image", "caption", "figure", "error"}] for each image path (folders expanded). An image
    that cannot be read has its reason in "error" (caption and figure None); the others are captioned."""
    device = default_device()
    model, vocab, cfg = load_decoder(run, checkpoint, device)
    backbone, m = backbone_for_run(run, cfg)
    backbone = backbone.to(device).freeze()
    paths = list_images(images)
    out = []
    for path in paths:
        try:
            image = load_rgb(path)
        except ImageError as e:
            out.append({"image": str(path), "caption": None, "figure": None, "error": str(e)})
            continue
        words, alphas = caption_image(model, vocab, backbone, image, int(m["image_size"]), beam_size, max_length, device)
        item = {"image": str(path), "caption": " ".join(words), "figure": None, "error": None}
        if attention:
            target = Path(attention)
            if len(paths) > 1 or target.suffix.lower() != ".png":
                target = target / f"{path.stem}_attention.png"
            try:
                item["figure"] = str(attention_figure(image, words, alphas, int(m["grid"]), target))
            except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
                raise RunError(f"--attention {target}: cannot write the figure ({e.strerror})") from None
        out.append(item)
    return out


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caption.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--beam_size", type=int, default=3)
    p.add_argument("--max_length", type=int, default=20)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--attention", default=None, help="PNG path (one image) or folder: attention figures")
    a = p.parse_args(argv)
    check_args(a, {"beam_size": {"ge": 1, "le": 100}, "max_length": {"ge": 1, "le": 1000}})
    results = predict(a.run, a.images, a.beam_size, a.max_length, a.attention, a.checkpoint)
    for r in results:
        if r["error"]:
            print(f"error: {r['error']}", file=sys.stderr)
        else:
            print(f"{r['image']}: {r['caption']}" + (f"  [{r['figure']}]" if r["figure"] else ""))
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
