"""The encoder featurize runs: which backbone and weights (and what the manifest says about
them), and the inference model built from it for a device.

weights=imagenet: torchvision's published weights (from its cache; nothing is downloaded at
run time when they are there). weights=PATH: a safetensors or torch state dict, recorded by
its SHA-256. weights=none: a random ResNet whose BatchNorm statistics are re-estimated on train
images once, saved as FEATURES/backbone.safetensors and shared by every split and process.
"""

from __future__ import annotations

import json
import weakref
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.config import DataConfig, FeaturizeConfig, images_root
from common.errors import UserError
from common.files import atomic_write_json
from featurize.backbone import Backbone, BackboneConfig, file_digest, imagenet_weights
from featurize.images import SplitImages
from featurize.inputs import first_images
from shards.karpathy import DatasetError, load_split
from shards.remote import expand

RANDOM_BACKBONE = "backbone.safetensors"  # in the features root: the calibrated random backbone all splits share


class FeaturizeError(UserError):
    """A featurize run that cannot go on as asked (calibration without images, --strict, ...)."""


class SingleProcess:
    """Stand-in for accelerate's PartialState in a plain single process."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wait_for_everyone(self) -> None:
        pass


def autocast(device: torch.device, precision: str):
    """bf16 on GPU by default; fp32 on CPU (bf16 autocast is emulated, and slow, on CPUs without
    AVX512-bf16)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise FeaturizeError(f"unknown precision {precision!r}: auto, fp32, fp16 or bf16")
    return torch.autocast(device.type, dtype=dtype)


def build_backbone(dcfg: DataConfig, fcfg: FeaturizeConfig, state=None) -> tuple[Backbone, dict]:
    """The backbone and what the manifest says about it (see the module's docstring)."""
    state = state or SingleProcess()
    bcfg = BackboneConfig(fcfg.backbone, fcfg.layer, fcfg.weights, fcfg.grid)
    transforms = imagenet_weights(fcfg.backbone).transforms()
    info = {"backbone": fcfg.backbone, "layer": fcfg.layer, "image_size": fcfg.image_size,
            "normalization": {"mean": list(transforms.mean), "std": list(transforms.std)},
            "resize": "whole image to image_size x image_size, bilinear antialiased"}
    if fcfg.weights == "imagenet":
        return Backbone(bcfg), {**info, "weights": f"imagenet:{imagenet_weights(fcfg.backbone).name}"}
    if fcfg.weights != "none":
        return Backbone(bcfg), {**info, "weights": str(Path(fcfg.weights).resolve()), "weights_sha256": file_digest(fcfg.weights)}
    root = Path(dcfg.features)
    path, meta_path = root / RANDOM_BACKBONE, root / "backbone.json"
    meta = {"arch": fcfg.backbone, "layer": fcfg.layer, "grid": fcfg.grid, "calibration_images": fcfg.calibration_images,
            "calibration_split": "train", "input_json": dcfg.input_json}
    if state.is_main_process and not (path.exists() and meta_path.exists()):
        calibrated_random_backbone(dcfg, fcfg, bcfg, path, meta_path, meta)
    state.wait_for_everyone()
    saved = json.loads(meta_path.read_text())
    if {k: saved.get(k) for k in ("arch", "layer", "grid")} != {k: meta[k] for k in ("arch", "layer", "grid")}:
        raise FeaturizeError(f"{meta_path}: the features folder holds a random {saved.get('arch')} {saved.get('layer')} backbone; "
                             f"write {fcfg.backbone} {fcfg.layer} features elsewhere")
    net = Backbone(replace(bcfg, weights=str(path)))
    return net, {**info, "weights": "none", "backbone_file": RANDOM_BACKBONE, "weights_sha256": saved.get("sha256"),
                 "bn_calibration": {"images": saved["calibration_images"], "split": "train"}}


def calibrated_random_backbone(dcfg: DataConfig, fcfg: FeaturizeConfig, bcfg: BackboneConfig, path: Path,
                               meta_path: Path, meta: dict) -> None:
    """weights=none: a random ResNet, its BatchNorm statistics re-estimated on the first
    `calibration_images` train images, saved to `path` (and what was done to `meta_path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    net = Backbone(bcfg)
    if dcfg.input_shards:  # the first images of the input shards
        used = net.calibrate_bn(tqdm(first_images(expand(dcfg.input_shards), fcfg.calibration_images, fcfg.image_size,
                                                  dcfg.url_timeout), desc="calibrate BatchNorm", unit="batch"))
        if used == 0:
            raise FeaturizeError(f"--weights none: no image of {dcfg.input_shards} could be read for BatchNorm calibration")
        net.save(path)
        atomic_write_json(meta_path, {**meta, "input_shards": dcfg.input_shards, "calibration_images": used,
                                      "sha256": file_digest(path)})
        return
    try:
        entries = load_split(dcfg.input_json, "train", dcfg.restval_in_train)[: fcfg.calibration_images]
    except DatasetError as e:
        raise FeaturizeError(f"--weights none re-estimates BatchNorm statistics on train images, and there are "
                             f"none: {e}") from None
    loader = DataLoader(SplitImages(entries, images_root(dcfg), fcfg.image_size),
                        batch_size=min(32, fcfg.calibration_images), num_workers=0)
    errors: list[str] = []

    def good_images():
        for b in tqdm(loader, desc="calibrate BatchNorm", unit="batch"):
            errors.extend(e for e, ok in zip(b["error"], b["ok"].tolist()) if not ok)
            yield b["image"][b["ok"]]

    used = net.calibrate_bn(good_images())
    if used == 0:  # nothing saved: a later run must not reuse an uncalibrated backbone
        raise FeaturizeError(f"--weights none: none of the {len(entries)} train images for BatchNorm calibration "
                             f"could be read (first: {errors[0] if errors else '?'}); check --images_root")
    net.save(path)
    atomic_write_json(meta_path, {**meta, "calibration_images": used, "sha256": file_digest(path)})


_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # backbone -> (key, its inference model)


def inference_model(backbone: Backbone, device: torch.device, compile: bool = False) -> torch.nn.Module:
    """What featurize runs: the frozen backbone on `device`, channels_last on a GPU, optionally
    compiled (static shapes: pass full batches) with its BatchNorms folded into the convolutions
    first. The eager model keeps its BatchNorms (folding them changes the grids' last bits, and
    gains little eagerly: bench/RESULTS.md). Kept per backbone, so the splits of one run compile once."""
    key = (str(device), compile)
    if backbone in _PREPARED and _PREPARED[backbone][0] == key:
        return _PREPARED[backbone][1]
    model = backbone.to(device).freeze()
    if hasattr(model, "fused") and compile:
        model = model.fused()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once
    if compile:
        model = torch.compile(model, dynamic=False)
    if model is not backbone:  # (a value holding its key would keep it alive)
        _PREPARED[backbone] = (key, model)
    return model
