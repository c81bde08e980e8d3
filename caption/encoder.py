"""What turns a split's images into annotation grids for the decoder, and the model a run trains.

    net = Captioner(CachedGrids(), decoder)               # the cached-feature run: grids in, grids out
    net = Captioner(FineTuned(backbone, ["layer3"]), dec)  # end to end: images in, the backbone trains

Every training run trains a `Captioner`; only its encoder differs, chosen once in
caption/train.py's `setup`. Serving (predict, the page, export, evaluate) uses the pieces
here too (`backbone_from_manifest`, `image_records`) and imports nothing of training.

Shapes: images (B, 3, P, P) uint8 at the featurizer's side P; grids (B, g, g, D).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from caption.model import Decoder, Forced
from caption.run import ENCODER, encoder_of
from caption.splits import share
from common.tensors import to_fp16
from featurize.backbone import Backbone, BackboneConfig
from featurize.images import ImageError, image_file, load_rgb, to_tensor
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


def backbone_for_run(run: str | Path, cfg) -> tuple[Backbone, dict]:
    """The encoder that made the run's training features (an exported run's encoder.json), or the
    run's fine-tuned one. An exported folder is someone else's: every weights file it names must
    be inside it (no absolute path, no `..`, no symlink out)."""
    m = encoder_of(run, cfg)
    run = Path(run)
    tuned = run / "backbone.safetensors"
    if (run / ENCODER).exists():
        where = f"{run / ENCODER}"
        if tuned.exists() or tuned.is_symlink():
            inside(run, tuned.name, f"{run}: backbone.safetensors")
        weights = m["weights"]  # present and a string: encoder_of checked it
        if not weights.startswith("imagenet") and weights != "none":
            inside(run, weights, f"{where}: weights")
            m = {**m, "weights": str(run / weights)}
        return backbone_from_manifest(m, run, override=tuned), m
    return backbone_from_manifest(m, Path(cfg.data.features), override=tuned), m


def load_image(root: str | Path, filename: str, image_size: int) -> torch.Tensor:
    """(3, P, P) uint8 as featurize decoded it; a broken image is a black frame (featurize listed it)."""
    try:
        return to_tensor(load_rgb(image_file(root, filename)), image_size)
    except ImageError:
        return torch.zeros(3, image_size, image_size, dtype=torch.uint8)


@torch.no_grad()
def image_records(entries: Iterable, root: str | Path, image_size: int, backbone: nn.Module, device,
                  batch_size: int = 32) -> Iterator[dict]:
    """Records like the feature store's (key, image_id, filename, features (g, g, D) float16,
    captions) with grids computed now by `backbone` from split-file entries."""
    was = backbone.training
    backbone.eval()
    entries = list(entries)
    for i in range(0, len(entries), batch_size):
        chunk = entries[i:i + batch_size]
        images = torch.stack([load_image(root, e.filename, image_size) for e in chunk])  # (b, 3, P, P)
        grids = to_fp16(backbone(images.to(device))).cpu().numpy()  # (b, g, g, D)
        for e, g in zip(chunk, grids):
            yield {"key": e.key, "image_id": e.image_id, "filename": e.filename, "features": g, "captions": e.tokens}
    backbone.train(was)


class CachedGrids(nn.Module):
    """The encoder of a cached-feature run: its inputs are the grids featurize wrote."""

    reads_images = False
    params: list = []  # nothing trains

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        return grids

    def records(self, split, rank: int, world: int, limit: int, device) -> Iterator[dict]:
        """A split's records as the store holds them, this rank's share of the first `limit`."""
        return split.records(rank, world, limit)

    def at_step(self, step: int) -> None:
        """Nothing changes with the step."""

    def save_beside(self, weights: Path) -> None:
        """Nothing to save: the features folder's manifest names the encoder."""


class FineTuned(nn.Module):
    """The backbone that made the cached grids, its `layers` training from `start` on (end-to-end
    fine-tuning); BatchNorm frozen when `freeze_bn` (small batches). Its grids are rounded
    through float16 as the cached ones are, with the full gradient."""

    reads_images = True

    def __init__(self, backbone: Backbone, layers: list[str], freeze_bn: bool = True, checkpointing: bool = False,
                 start: int = 0, image_size: int = 224, images_root: str | Path = "."):
        super().__init__()
        self.backbone, self.freeze_bn, self.start = backbone, freeze_bn, start
        self.image_size, self.images_root = image_size, images_root  # the featurizer's side; the split file's images
        self.backbone.freeze()
        self.params = self.backbone.trainable(layers)
        if freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)
            self.params = [p for p in self.params if p.requires_grad]
        self.backbone.checkpointing = checkpointing
        self.trains = True  # False before `start`: the backbone runs without gradients

    def train(self, mode: bool = True) -> "FineTuned":
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def at_step(self, step: int) -> None:
        """The backbone trains from optimizer step `start` on."""
        self.trains = step >= self.start

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, P, P) uint8 -> (B, g, g, D) grids, float16 values with the full gradient."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains):
            grid = self.backbone(images)
        return to_fp16(grid).float() + (grid - grid.detach())

    def records(self, split, rank: int, world: int, limit: int, device) -> Iterator[dict]:
        """A split's records with grids computed now by the backbone as it is (this rank's share of
        the first `limit` of the split file's images)."""
        return image_records(share(split.entries, rank, world, limit), self.images_root, self.image_size, self.backbone,
                             device)

    def save_beside(self, weights: Path) -> None:
        """best.safetensors -> backbone.safetensors, last.safetensors -> backbone_last.safetensors."""
        self.backbone.save(weights.with_name("backbone.safetensors" if weights.stem == "best" else "backbone_last.safetensors"))


class Captioner(nn.Module):
    """encoder + decoder: (inputs, tokens (N, T), S) -> Forced(logits, alphas, ...), the model
    every run trains. Its decoder's weights are the run's best/last.safetensors."""

    def __init__(self, encoder: nn.Module, decoder: Decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Grids (B, g, g, D) or images (B, 3, P, P) -> grids (B, g, g, D)."""
        return self.encoder(inputs)

    def forward(self, inputs: torch.Tensor, tokens: torch.Tensor, seq_per_img: int = 1, ss_prob: float = 0.0,
                noise=None) -> Forced:
        return self.decoder(self.encode(inputs), tokens, seq_per_img=seq_per_img, ss_prob=ss_prob, noise=noise)
