"""The built-in shapes world: a small captioning dataset that any machine can make.

    python -m featurize.synthetic --out data/shapes --num_images 2400 --seed 0

Renders scenes of 1 to 3 objects (shape, color, size, position) on a textured, noisy
background into `OUT/images/*.jpg` and writes `OUT/dataset.json` in exactly the format
of Karpathy's `dataset_coco.json` (filepath `images`, so the image root is OUT), with 5
captions per image from a small grammar (synonyms, word order, spatial relations).
Each image entry also carries `objects`: shape, color, size and pixel box
[x0, y0, x1, y1] of every object, so attention can be checked against the object a
word names. The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from common.cli import command
from common.config import check_args
from common.files import atomic_write_json

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Synonyms the grammar draws from; the first is the canonical word.
SHAPE_WORDS = {
    "circle": ("circle", "circle", "disk"),
    "square": ("square", "square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond",),
}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
SIZE_PIXELS = {"small": (0.20, 0.26), "large": (0.32, 0.40)}  # side as a fraction of the image


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random color field plus pixel noise: nothing is trivially clean."""
    low = rng.uniform(40, 150, size=(4, 4, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)
    field += rng.normal(0, 14, size=field.shape)
    # A few faint stripes of texture.
    yy, xx = np.mgrid[0:size, 0:size]
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.2)
    field += 10 * np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)))[..., None]
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int] | int) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _place(rng: random.Random, size: int, n: int) -> list[dict]:
    """Sample n objects with non-overlapping boxes (retrying a whole scene if needed)."""
    for _ in range(1000):
        objs = []
        for _ in range(n):
            sz = rng.choice(("small", "large"))
            side = int(size * rng.uniform(*SIZE_PIXELS[sz]))
            x0, y0 = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
            box = (x0, y0, x0 + side, y0 + side)
            if any(not (box[2] + 4 < o["box"][0] or o["box"][2] + 4 < box[0] or box[3] + 4 < o["box"][1] or o["box"][3] + 4 < box[1]) for o in objs):
                break
            colors_used = {o["color"] for o in objs}
            color = rng.choice([c for c in COLORS if c not in colors_used])
            objs.append({"shape": rng.choice(SHAPES), "color": color, "size": sz, "box": list(box)})
        if len(objs) == n:
            return objs
    raise RuntimeError("could not place objects")  # pragma: no cover - 1000 tries never fail at these sizes


def _np(rng: random.Random, o: dict, with_size: bool | None = None) -> list[str]:
    """A noun phrase for an object: 'a (size) color shape'."""
    words = ["a"]
    if with_size or (with_size is None and rng.random() < 0.5):
        words.append(rng.choice(SIZE_WORDS[o["size"]]))
    words += [o["color"], rng.choice(SHAPE_WORDS[o["shape"]])]
    return words


def _where(o: dict, size: int) -> str:
    x0, y0, x1, y1 = o["box"]
    cx, cy = (x0 + x1) / 2 / size, (y0 + y1) / 2 / size
    if abs(cx - 0.5) > abs(cy - 0.5):
        return "left" if cx < 0.5 else "right"
    return "top" if cy < 0.5 else "bottom"


def _relation(rng: random.Random, a: dict, b: dict) -> list[str]:
    """'A left of B' style phrase, the relation read off the boxes' centers."""
    ax, ay = (a["box"][0] + a["box"][2]) / 2, (a["box"][1] + a["box"][3]) / 2
    bx, by = (b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2
    if abs(ax - bx) >= abs(ay - by):
        rel = rng.choice((["left", "of"], ["to", "the", "left", "of"])) if ax < bx else rng.choice((["right", "of"], ["to", "the", "right", "of"]))
    else:
        rel = ["above"] if ay < by else ["below"]
    return _np(rng, a) + rel + _np(rng, b)


def captions_for(rng: random.Random, objs: list[dict], size: int, n: int = 5) -> list[list[str]]:
    """n captions from the grammar, distinct where the scene allows (each at most 16 tokens)."""
    out: list[list[str]] = []
    for _ in range(n * 6):
        if len(objs) == 1:
            o = objs[0]
            form = rng.randrange(5)
            if form == 0:
                cap = _np(rng, o, with_size=True)
            elif form == 1:
                cap = _np(rng, o) + ["on", "the", _where(o, size)]
            elif form == 2:
                cap = ["there", "is"] + _np(rng, o)
            elif form == 3:
                cap = ["a", rng.choice(SIZE_WORDS[o["size"]]), rng.choice(SHAPE_WORDS[o["shape"]]), "that", "is", o["color"]]
            else:
                cap = ["one"] + _np(rng, o)[1:] + ["on", "a", "noisy", "background"]
        else:
            a, b = rng.sample(objs, 2)
            rest = [o for o in objs if o is not a and o is not b]
            form = rng.randrange(4)
            if form == 0:
                cap = _relation(rng, a, b)
            elif form == 1:
                cap = ["there", "is"] + _relation(rng, a, b)
            elif form == 2:
                cap = ["two" if not rest else "three", "shapes", "with"] + _np(rng, a, False) + ["and"] + _np(rng, b, False)
            else:
                parts = [_np(rng, o, False) for o in (a, b, *rest)]
                cap = [w for p in parts[:-1] for w in p] + ["and"] + parts[-1]
        if cap not in out:
            out.append(cap)
        if len(out) == n:
            break
    while len(out) < n:  # a scene with few phrasings: repeat some
        out.append(list(out[len(out) % len(out)]))
    return out


def render(rng: random.Random, nprng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict]]:
    """One scene of 1-3 objects."""
    n = rng.choices((1, 2, 3), weights=(0.4, 0.4, 0.2))[0]
    objs = _place(rng, size, n)
    img = _background(nprng, size)
    draw = ImageDraw.Draw(img)
    for o in objs:
        jitter = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in COLORS[o["color"]])
        draw_shape(draw, o["shape"], tuple(o["box"]), jitter)
    return img.filter(ImageFilter.GaussianBlur(0.6)), objs


def generate(out: str | Path, num_images: int = 2400, seed: int = 0, image_size: int = 224,
             val_fraction: float = 0.1, test_fraction: float = 0.1, quality: int = 90,
             progress: bool = True) -> Path:
    """Write OUT/images/*.jpg and OUT/dataset.json; returns the JSON's path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_val, n_test = int(round(num_images * val_fraction)), int(round(num_images * test_fraction))
    images, sentid = [], 0
    for i in tqdm(range(num_images), desc="shapes", unit="img", disable=not progress):
        rng = random.Random(seed * 1_000_003 + i)  # per-image streams: any image can be re-made alone
        nprng = np.random.default_rng([seed, i])
        img, objs = render(rng, nprng, image_size)
        filename = f"shapes_{i + 1:06d}.jpg"
        img.save(out / "images" / filename, quality=quality)
        split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
        sents = []
        for toks in captions_for(rng, objs, image_size):
            sents.append({"tokens": toks, "raw": " ".join(toks).capitalize() + ".", "imgid": i, "sentid": sentid})
            sentid += 1
        images.append({
            "filepath": "images", "filename": filename, "imgid": i, "cocoid": i + 1, "split": split,
            "sentids": [s["sentid"] for s in sents], "sentences": sents,
            "objects": objs, "width": image_size, "height": image_size,
        })
    path = out / "dataset.json"
    atomic_write_json(path, {"dataset": "shapes", "images": images})
    return path


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m featurize.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write images/ and dataset.json into")
    p.add_argument("--num_images", type=int, default=2400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--test_fraction", type=float, default=0.1)
    a = p.parse_args(argv)
    check_args(a, {"num_images": {"ge": 1, "le": 10_000_000}, "image_size": {"ge": 32, "le": 4096},
                   "val_fraction": {"ge": 0, "le": 0.5}, "test_fraction": {"ge": 0, "le": 0.5}})
    path = generate(a.out, a.num_images, a.seed, a.image_size, a.val_fraction, a.test_fraction)
    print(f"wrote {a.num_images} images and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
