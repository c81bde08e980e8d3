"""Benchmarks: each prints a ratio against a baseline measured in the same run."""

import argparse

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "CPU"


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Decoder sizes: the shapes world's (the default) and the COCO setting (configs/coco.yaml).
SHAPES_DIMS = {"channels": 256, "embed": 128, "hidden": 256, "attn": 64, "vocab": 1000}
COCO_DIMS = {"channels": 2048, "embed": 512, "hidden": 512, "attn": 512, "vocab": 9487}


def add_decoder_dims(p: argparse.ArgumentParser) -> None:
    """--coco and --channels/--embed/--hidden/--attn/--vocab; resolve them with `decoder_dims`."""
    p.add_argument("--coco", action="store_true", help="COCO decoder dims (D=2048 E=H=A=512 V=9487)")
    for k, v in SHAPES_DIMS.items():
        p.add_argument(f"--{k}", type=int, default=None, help=f"default {v}, or {COCO_DIMS[k]} with --coco")


def decoder_dims(a: argparse.Namespace) -> argparse.Namespace:
    """Fill the dims not given on the command line from the chosen preset (in place)."""
    preset = COCO_DIMS if a.coco else SHAPES_DIMS
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a
