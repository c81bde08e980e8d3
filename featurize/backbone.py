"""The frozen torchvision ResNet trunk that turns images into (grid, grid, C) annotation grids.

    net = Backbone(BackboneConfig("resnet101", "layer4", "imagenet"))
    grids = net(images_uint8)   # (B, 3, S, S) uint8 -> (B, 14, 14, 2048) float

Weights: `imagenet` (torchvision's registered weights through its cache, TORCH_HOME),
`none` (random init; BatchNorm statistics must then be re-estimated with `calibrate_bn`,
since a random ResNet in eval mode overflows float16), or a local file (a torchvision
state dict, or a backbone.safetensors written by featurize or fine-tuning).
The same module trains its upper blocks during end-to-end fine-tuning.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.fx.experimental.optimization import fuse as fuse_conv_bn
from safetensors.torch import load_file

from common.errors import UserError
from common.files import save_tensors, sha256_file

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STAGES = ("layer1", "layer2", "layer3", "layer4")


class BackboneError(UserError):
    """A backbone that cannot be built; one line saying what to do."""


@dataclass(frozen=True)
class BackboneConfig:
    arch: str = "resnet101"
    layer: str = "layer4"
    weights: str = "imagenet"  # imagenet | none | path
    grid: int = 14
    seed: int = 0  # random init (weights=none)


def channels(arch: str, layer: str) -> int:
    """C of the grid: BasicBlock nets (18/34) end at 512, Bottleneck nets at 2048 (halved per stage up)."""
    top = 512 if arch in ("resnet18", "resnet34") else 2048
    return top // (2 ** (3 - STAGES.index(layer)))


def imagenet_weights(arch: str):
    return torchvision.models.get_model_weights(arch).DEFAULT


def cached_weights_path(arch: str) -> Path:
    """Where torchvision's cache keeps this arch's ImageNet file (TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(imagenet_weights(arch).url)


def load_imagenet_state(arch: str) -> dict:
    w = imagenet_weights(arch)
    path = cached_weights_path(arch)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return w.get_state_dict(progress=True)
    except Exception as e:  # noqa: BLE001 - URLError, socket errors, HTTP errors: all mean "no download"
        raise BackboneError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded ({type(e).__name__}); "
            f"place {os.path.basename(w.url)} (from {w.url}) at {path}, or set TORCH_HOME, or pass --weights PATH") from None


def file_digest(path: str | os.PathLike) -> str:
    """The short form of a weights file's SHA-256 that manifests record (16 hex digits)."""
    return sha256_file(path)[:16]


class Backbone(nn.Module):
    """ResNet conv1..`layer`, then adaptive average pooling to grid x grid if needed; output HWC."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise BackboneError(f"unknown backbone {cfg.arch!r}: choose one of {', '.join(ARCHS)}")
        if cfg.layer not in ("layer3", "layer4"):
            raise BackboneError(f"unknown layer {cfg.layer!r}: layer3 or layer4")
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = getattr(torchvision.models, cfg.arch)(weights=None)
        state = self._weights_state(cfg)
        keep = STAGES[: STAGES.index(cfg.layer) + 1]
        ours = state is not None and any(k.startswith(("stem.", "stages.")) for k in state)
        if state is not None and not ours:  # a torchvision state dict (conv1.*, layer1.*, ..., fc.*)
            try:
                missing, _ = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
            except RuntimeError as e:  # shape mismatches
                raise BackboneError(f"{cfg.weights}: not {cfg.arch} weights ({str(e).splitlines()[-1].strip()})") from None
            missing = [k for k in missing if k.split(".")[0] in ("conv1", "bn1", *keep)]
            if missing:
                raise BackboneError(f"{cfg.weights}: not {cfg.arch} weights (missing {missing[0]} and {len(missing) - 1} more)")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleDict({name: getattr(net, name) for name in keep})
        tf = imagenet_weights(cfg.arch).transforms()  # normalization from the weights, not copied constants
        self.register_buffer("mean", torch.tensor(tf.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(tf.std).view(1, 3, 1, 1), persistent=False)
        self.checkpointing = False
        if ours:  # a backbone.safetensors written by featurize (weights=none) or fine-tuning
            try:
                self.load_state_dict(state)
            except RuntimeError as e:
                raise BackboneError(f"{cfg.weights}: does not fit {cfg.arch} up to {cfg.layer} ({str(e).splitlines()[0]})") from None
        self.freeze()

    @staticmethod
    def _weights_state(cfg: BackboneConfig) -> dict | None:
        if cfg.weights == "none":
            return None
        if cfg.weights == "imagenet":
            return load_imagenet_state(cfg.arch)
        path = Path(cfg.weights)
        if not path.is_file():
            raise BackboneError(f"{path}: no such weights file (expected imagenet, none, or a file path)")
        try:
            if path.suffix == ".safetensors":
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a broken file of any kind gets one line
            raise BackboneError(f"{path}: cannot load weights ({type(e).__name__}: {e})") from None

    @property
    def channels(self) -> int:
        return channels(self.cfg.arch, self.cfg.layer)

    def freeze(self) -> "Backbone":
        """Frozen: no gradients, eval mode (BatchNorm uses its running statistics)."""
        self.requires_grad_(False)
        return self.eval()

    def trainable(self, stages: Iterable[str]) -> list[nn.Parameter]:
        """Unfreeze the named stages (e.g. ["layer3", "layer4"]); returns their parameters."""
        params = []
        for name in stages:
            if name not in self.stages:
                raise BackboneError(f"cannot fine-tune {name!r}: this backbone has {', '.join(self.stages)}")
            self.stages[name].requires_grad_(True)
            params += list(self.stages[name].parameters())
        return params

    def fused(self) -> "Backbone":
        """A frozen copy for inference, every BatchNorm folded into the convolution before it
        (torch.fx's conv-BN fusion): the same function with one pass over the activations fewer
        per convolution. For featurize only: its state dict no longer matches a trunk's."""
        net = copy.deepcopy(self).freeze()
        net.stem = fuse_conv_bn(net.stem, inplace=True)
        for name in list(net.stages):
            net.stages[name] = fuse_conv_bn(net.stages[name], inplace=True)
        return net

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> normalized float."""
        x = images.to(self.mean.dtype if images.dtype == torch.uint8 else images.dtype) / 255.0
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 images -> (B, grid, grid, C) grids."""
        x = self.stem(self.normalize(images))
        for stage in self.stages.values():
            if self.checkpointing and self.training and any(p.requires_grad for p in stage.parameters()):
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        if x.shape[-1] != self.cfg.grid or x.shape[-2] != self.cfg.grid:
            x = F.adaptive_avg_pool2d(x, self.cfg.grid)  # (B, C, h, w) -> (B, C, g, g)
        return x.permute(0, 2, 3, 1)  # (B, C, g, g) -> (B, g, g, C)

    @torch.no_grad()
    def calibrate_bn(self, batches: Iterable[torch.Tensor]) -> int:
        """Re-estimate every BatchNorm's running statistics (cumulative average) on image batches.

        A random-init ResNet in eval mode has identity BN statistics and its layer4 output
        reaches ~1e5 (inf in float16); after this, activations are well scaled. Returns the
        number of images used.
        """
        bns = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
        self.train()
        n = 0
        for images in batches:
            if images.shape[0] == 0:  # every image of the batch failed to decode
                continue
            self(images)
            n += images.shape[0]
        for m in bns:
            m.momentum = 0.1
        self.eval()
        return n

    def save(self, path: str | os.PathLike) -> None:
        """safetensors of the trunk (stem.*, stages.*), atomically."""
        save_tensors({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path)
