"""End-to-end fine-tuning: the backbone's upper blocks train with the decoder, from images.

    python caption/train.py --config configs/shapes.yaml --finetune true --init_from runs/shapes \\
        --checkpoint_path runs/shapes_ft --finetune_layers layer3 --cnn_learning_rate 1e-5

One loop with a switch: `caption/train.py` builds a `Captioner` (backbone + decoder) instead
of a bare `Decoder`, and image batches instead of feature batches; checkpoints, resume,
validation and many-process training are the same code. The backbone is the one that made
the cached run's features (its manifest names it), so step 0 scores what the cached run scored.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from caption.data import EpochBatches, collate, pick_captions
from caption.model import Decoder
from caption.vocab import Vocab
from common.tensors import to_fp16
from featurize.backbone import Backbone, BackboneConfig
from featurize.images import ImageError, image_file, load_rgb, to_tensor
from shards.karpathy import ImageEntry
from shards.manifest import inside


def backbone_from_manifest(manifest: dict, features_root: str | Path, override: str | Path | None = None) -> Backbone:
    """The encoder that wrote a features folder (or `override`, e.g. a fine-tuned backbone.safetensors)."""
    weights = manifest["weights"]
    if override and Path(override).exists():
        weights = str(override)
    elif weights == "none":  # the calibrated random backbone, inside the features folder
        weights = str(inside(features_root, manifest.get("backbone_file"), f"{features_root}: manifest's backbone_file"))
    elif weights.startswith("imagenet"):
        weights = "imagenet"
    return Backbone(BackboneConfig(manifest["backbone"], manifest["layer"], weights, manifest["grid"]))


class Captioner(nn.Module):
    """Backbone + decoder with the decoder's calling convention: (images, tokens, S) -> logits, alphas."""

    def __init__(self, backbone: Backbone, decoder: Decoder, layers: list[str], freeze_bn: bool = True,
                 checkpointing: bool = False):
        super().__init__()
        self.backbone, self.decoder, self.freeze_bn = backbone, decoder, freeze_bn
        self.backbone.freeze()
        self.backbone_params = self.backbone.trainable(layers)
        if freeze_bn:  # small batches: keep BatchNorm's statistics and affine weights as they are
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)
            self.backbone_params = [p for p in self.backbone_params if p.requires_grad]
        self.backbone.checkpointing = checkpointing
        self.backbone_trains = True  # False before `finetune_start`: the backbone runs without gradients

    def train(self, mode: bool = True) -> "Captioner":
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, g, g, C) grids, rounded through float16 as the cached grids are."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trains):
            grid = self.backbone(images)
        return to_fp16(grid).float() + (grid - grid.detach())  # fp16 values, full gradient

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, seq_per_img: int = 1, ss_prob: float = 0.0, noise=None):
        return self.decoder(self.encode(images), tokens, seq_per_img=seq_per_img, ss_prob=ss_prob, noise=noise)


class CaptionedImages(Dataset):
    """Images of a split with seq_per_img captions each, decoded as featurize decodes them."""

    def __init__(self, entries: list[ImageEntry], root: str | Path, image_size: int, vocab: Vocab, seq_per_img: int,
                 max_length: int, seed: int = 0):
        self.entries, self.root, self.image_size = entries, Path(root), image_size
        self.vocab, self.seq_per_img, self.max_length, self.seed = vocab, seq_per_img, max_length, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        try:
            image = to_tensor(load_rgb(image_file(self.root, e.filename)), self.image_size)
        except ImageError:  # a broken training image: a black frame (featurize listed it in its manifest)
            image = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        caps = [self.vocab.encode(c, self.max_length) for c in pick_captions(e.tokens, self.seq_per_img, rng)]
        return {"features": image, "captions": caps, "image_id": e.image_id, "index": i, "refs": e.tokens, "key": e.key}


def image_batches(entries: list[ImageEntry], root: str | Path, image_size: int, vocab: Vocab, *, batch_size: int,
                  seq_per_img: int, max_length: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  num_workers: int = 0, start: int = 0, pin_memory: bool = False) -> tuple[int, DataLoader]:
    """Like `caption.data.train_batches`, with images (B, 3, S, S) uint8 in batch["features"]."""
    ds = CaptionedImages(entries, root, image_size, vocab, seq_per_img, max_length, seed)
    ds.epoch = epoch
    sampler = EpochBatches(len(ds), batch_size, rank, world, seed, epoch, start=start)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        collate_fn=partial(collate, vocab=vocab), generator=torch.Generator().manual_seed(seed))
    return sampler.num_batches(), loader


@torch.no_grad()
def image_records(entries: list[ImageEntry], root: str | Path, image_size: int, backbone: Backbone, device,
                  batch_size: int = 32) -> Iterator[dict]:
    """Records like the feature store's, with grids computed now by `backbone` (validation while fine-tuning)."""
    was = backbone.training
    backbone.eval()
    for i in range(0, len(entries), batch_size):
        chunk = entries[i:i + batch_size]
        images = []
        for e in chunk:
            try:
                images.append(to_tensor(load_rgb(image_file(root, e.filename)), image_size))
            except ImageError:
                images.append(torch.zeros(3, image_size, image_size, dtype=torch.uint8))
        grids = to_fp16(backbone(torch.stack(images).to(device))).cpu().numpy()  # (b, g, g, C)
        for e, g in zip(chunk, grids):
            yield {"key": e.key, "image_id": e.image_id, "filename": e.filename, "features": g, "captions": e.tokens}
    backbone.train(was)

