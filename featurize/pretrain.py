"""Pretrain the demo's encoder on the shapes world, as ImageNet pretrains a ResNet for COCO.

    python -m featurize.pretrain --input_json data/shapes/dataset.json --out data/shapes/encoder.safetensors
    python -m featurize --config configs/shapes.yaml --weights data/shapes/encoder.safetensors --split all

COCO's grids come from a ResNet that learned ImageNet's objects; a random ResNet knows no
shapes (a decoder over its grids learns colors but names the shape at chance). This trains the
same trunk (ResNet-18 up to layer3 by default) on what the generator's labels give for free:
for every cell of the 14x14 grid, the shape and the color of the object under the cell's center
(or background), through a 1x1 convolution on the grid: the grid itself must then say, linearly
and where the object is, which shape and color is there, which is what the decoder's attention
and output layer read. Cells inside an object's box but outside its shape are not scored.

Only the train split's images are used. Written: OUT (safetensors, the trunk's `stem.*` and
`stages.*`, loaded by featurize like any weights file) and OUT with `.json` (what it was trained
on, the held-out cell accuracy, the preprocessing). A rerun with the same settings and split file
reuses them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.cli import command
from common.errors import UserError
from common.files import atomic_write_json, sha256_file
from featurize.backbone import Backbone, BackboneConfig, imagenet_weights
from featurize.images import SplitImages
from featurize.synthetic import COLORS, SHAPES, draw_shape
from shards.karpathy import DatasetError, load_split

log = logging.getLogger(__name__)
IGNORE = -100  # a cell inside an object's box but outside its shape: not scored


class PretrainError(UserError):
    """A pretraining run that cannot start as asked."""


STRIDE = {"layer3": 16, "layer4": 32}  # pixels per grid cell of a ResNet trunk


@dataclass(frozen=True)
class PretrainConfig:
    arch: str = "resnet18"
    layer: str = "layer3"
    image_size: int = 224  # featurize's input size; the trunk's own grid is image_size / its stride
    crop: int = 128  # training crops (a multiple of the stride, so labels stay on the grid)
    epochs: int = 6
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    max_images: int = -1  # train images used (-1: all)
    holdout: float = 0.1  # of those, scored for the JSON's accuracy and never trained on
    seed: int = 0

    @property
    def grid(self) -> int:
        return self.image_size // STRIDE[self.layer]


def cell_labels(objects: list[dict], width: int, height: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(grid, grid) shape and color labels: 0 background, 1.. SHAPES / COLORS order of the object
    under the cell's center; IGNORE inside a box but outside the drawn shape."""
    shape = np.zeros((grid, grid), np.int64)
    color = np.zeros((grid, grid), np.int64)
    ys = (np.arange(grid) + 0.5) * height / grid  # cell centers in image pixels
    xs = (np.arange(grid) + 0.5) * width / grid
    for o in objects:
        mask = Image.new("L", (width, height), 0)
        draw_shape(ImageDraw.Draw(mask), o["shape"], tuple(o["box"]), 255)
        m = np.asarray(mask)[ys.astype(int).clip(0, height - 1)][:, xs.astype(int).clip(0, width - 1)] > 127  # (g, g)
        x0, y0, x1, y1 = o["box"]
        in_box = (ys[:, None] >= y0) & (ys[:, None] <= y1) & (xs[None] >= x0) & (xs[None] <= x1)  # (g, g)
        shape[in_box & ~m], color[in_box & ~m] = IGNORE, IGNORE
        shape[m], color[m] = SHAPES.index(o["shape"]) + 1, list(COLORS).index(o["color"]) + 1
    return shape, color


class Labeled(torch.utils.data.Dataset):
    """Images (uint8, decoded and resized as featurize does) with their cell labels, held in memory."""

    def __init__(self, images: torch.Tensor, shape: torch.Tensor, color: torch.Tensor):
        self.images, self.shape, self.color = images, shape, color  # (N, 3, S, S), (N, g, g), (N, g, g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.shape[i], self.color[i]


def load_world(input_json: str | os.PathLike, cfg: PretrainConfig, images_root: str | os.PathLike = "") -> Labeled:
    """The train split's images and cell labels (the split file must carry `objects`, as the shapes world's does)."""
    try:
        entries = load_split(input_json, "train")
    except DatasetError as e:
        raise PretrainError(str(e)) from None
    if cfg.max_images > 0:
        entries = entries[: cfg.max_images]
    if not entries or any("objects" not in e.extra for e in entries):
        raise PretrainError(f"{input_json}: pretraining needs train images with `objects` (the shapes world's "
                            "labels: python -m featurize.synthetic)")
    root = Path(images_root) if images_root else Path(input_json).parent
    loader = DataLoader(SplitImages(entries, root, cfg.image_size), batch_size=64, num_workers=0)
    images = []
    for b in tqdm(loader, desc="load train images", unit="batch"):
        if not bool(b["ok"].all()):
            bad = b["error"][int((~b["ok"]).nonzero()[0])]
            raise PretrainError(f"{input_json}: a train image cannot be read ({bad})")
        images.append(b["image"])
    labels = [cell_labels(e.extra["objects"], e.extra.get("width", cfg.image_size), e.extra.get("height", cfg.image_size),
                          cfg.grid) for e in entries]
    return Labeled(torch.cat(images), torch.from_numpy(np.stack([s for s, _ in labels])),
                   torch.from_numpy(np.stack([c for _, c in labels])))


class CellClassifier(nn.Module):
    """The trunk, then a 1x1 convolution to shape and color logits per cell."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.trunk = Backbone(BackboneConfig(cfg.arch, cfg.layer, "none", grid=0, seed=cfg.seed))
        self.trunk.requires_grad_(True)
        self.head = nn.Conv2d(self.trunk.channels, 1 + len(SHAPES) + 1 + len(COLORS), 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) uint8 -> shape logits (B, 5, g, g), color logits (B, 7, g, g)."""
        x = self.trunk.stem(self.trunk.normalize(images))
        for stage in self.trunk.stages.values():
            x = stage(x)
        logits = self.head(x)  # (B, C, g, g) -> (B, 5 + 7, g, g)
        return logits[:, : 1 + len(SHAPES)], logits[:, 1 + len(SHAPES):]


def random_crops(images, shape, color, cfg: PretrainConfig, gen: torch.Generator):
    """The same cell-aligned crop of a batch's images and labels, flipped left-right half the time."""
    cell = STRIDE[cfg.layer]
    k = cfg.crop // cell  # crop in cells
    i, j = (int(v) for v in torch.randint(0, cfg.grid - k + 1, (2,), generator=gen))
    images = images[:, :, i * cell:(i + k) * cell, j * cell:(j + k) * cell]  # (B, 3, crop, crop)
    shape, color = shape[:, i:i + k, j:j + k], color[:, i:i + k, j:j + k]  # (B, k, k)
    if bool(torch.rand((), generator=gen) < 0.5):
        images, shape, color = images.flip(-1), shape.flip(-1), color.flip(-1)
    return images, shape, color


@torch.no_grad()
def accuracy(model: CellClassifier, data: Labeled) -> dict[str, float]:
    """Cell accuracy on whole images: shape and color of object cells, and background vs object."""
    model.eval()
    hits = torch.zeros(3)
    counts = torch.zeros(3)
    for images, shape, color in DataLoader(data, batch_size=64):
        ps, pc = model(images)
        ps, pc = ps.argmax(1), pc.argmax(1)  # (B, g, g)
        obj = shape > 0
        hits += torch.tensor([(ps == shape)[obj].sum(), (pc == color)[obj].sum(), ((ps > 0) == obj)[shape != IGNORE].sum()])
        counts += torch.tensor([obj.sum(), obj.sum(), (shape != IGNORE).sum()])
    model.train()
    acc = (hits / counts.clamp_min(1)).tolist()
    return {"object_cell_shape": acc[0], "object_cell_color": acc[1], "object_vs_background": acc[2]}


def pretrain(input_json: str | os.PathLike, out: str | os.PathLike, cfg: PretrainConfig = PretrainConfig(),
             images_root: str | os.PathLike = "", progress: bool = True) -> dict:
    """Train, then write OUT (safetensors) and OUT.json; returns the JSON's content. Reused when
    OUT.json says the same settings and split file."""
    out = Path(out)
    meta_path = out.with_suffix(".json")
    source = {"input_json": str(Path(input_json).resolve()), "input_json_sha256": sha256_file(input_json)[:16]}
    if out.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("config") == asdict(cfg) and meta.get("trained_on", {}).get("input_json_sha256") == source["input_json_sha256"]:
            log.info("%s: reused (trained on %s)", out, meta["trained_on"]["input_json"])
            return meta
    if cfg.layer not in STRIDE:
        raise PretrainError(f"--layer {cfg.layer}: layer3 or layer4")
    stride = STRIDE[cfg.layer]
    if cfg.image_size % stride or cfg.crop % stride or cfg.crop > cfg.image_size:
        raise PretrainError(f"--image_size {cfg.image_size}, --crop {cfg.crop}: both must be multiples of {cfg.layer}'s "
                            f"stride ({stride} px), the crop at most the image")
    t0 = time.perf_counter()
    data = load_world(input_json, cfg, images_root)
    n_hold = int(len(data) * cfg.holdout)
    held = Labeled(data.images[:n_hold], data.shape[:n_hold], data.color[:n_hold])
    train = Labeled(data.images[n_hold:], data.shape[n_hold:], data.color[n_hold:])
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = CellClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * (len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=max(steps, 1), pct_start=0.15)
    model.train()
    bar = tqdm(total=steps, desc="pretrain encoder", unit="batch", disable=not progress)
    for _ in range(cfg.epochs):
        for images, shape, color in DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=gen):
            images, shape, color = random_crops(images, shape, color, cfg, gen)
            ps, pc = model(images)
            loss = F.cross_entropy(ps, shape, ignore_index=IGNORE) + F.cross_entropy(pc, color, ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.trunk.freeze()
    acc = accuracy(model, held)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.trunk.save(out)
    tf = imagenet_weights(cfg.arch).transforms()
    meta = {"what": f"{cfg.arch} up to {cfg.layer}, trained to name each grid cell's shape and color",
            "config": asdict(cfg), "trained_on": {**source, "split": "train", "images": len(train),
                                                  "held_out_images": len(held)},
            "held_out_accuracy": acc, "chance": {"object_cell_shape": 1 / len(SHAPES), "object_cell_color": 1 / len(COLORS)},
            "preprocessing": {"resize": f"whole image to {cfg.image_size}x{cfg.image_size}, bilinear antialiased",
                              "normalization": {"mean": list(tf.mean), "std": list(tf.std)}},
            "sha256": sha256_file(out)[:16], "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(meta_path, meta)
    return meta


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m featurize.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input_json", required=True, help="a shapes-world split file (python -m featurize.synthetic)")
    p.add_argument("--out", required=True, help="the weights file to write (.safetensors); its .json beside it")
    p.add_argument("--images_root", default="", help="the image root ('': the split file's folder)")
    defaults = PretrainConfig()
    for k, v in asdict(defaults).items():
        p.add_argument(f"--{k}", type=type(v), default=v)
    a = p.parse_args(argv)
    cfg = PretrainConfig(**{k: getattr(a, k) for k in asdict(defaults)})
    for k in ("epochs", "batch_size", "crop", "image_size"):
        if not 0 < getattr(cfg, k) <= 100_000:
            raise PretrainError(f"--{k} {getattr(cfg, k)}: must be between 1 and 100000")
    if not str(a.out).endswith(".safetensors"):
        raise PretrainError(f"--out {a.out}: the weights file must end in .safetensors")
    meta = pretrain(a.input_json, a.out, cfg, a.images_root)
    acc = meta["held_out_accuracy"]
    print(f"{a.out}: held-out cells: shape {acc['object_cell_shape']:.1%} (chance {1 / len(SHAPES):.0%}), color "
          f"{acc['object_cell_color']:.1%}, object vs background {acc['object_vs_background']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
