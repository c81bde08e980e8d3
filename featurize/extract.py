"""Run the frozen backbone over a split and write its grids, with the captions, into the store.

Work unit: the shard. Shard k holds rows [k*S, (k+1)*S) of the split; process r of W
takes shards k % W == r, so processes never share a file; a shard is skipped when its
JSON exists (a restart), and batches never cross a shard boundary, so a resumed run
computes exactly what an uninterrupted one would. Decoding runs in DataLoader workers,
writes in a background thread, the model on the main thread.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from caption.config import DataConfig, FeaturizeConfig, images_root
from featurize.backbone import Backbone, BackboneConfig, file_digest, imagenet_weights
from featurize.images import SplitFiles, SplitImages, collate_files, decode_on_device
from shards import create_writer, done_shards, finalize, make_plan, shard_range
from shards.karpathy import load_split
from shards.manifest import atomic_write_json

RANDOM_BACKBONE = "backbone.safetensors"  # in the features root: the calibrated random backbone all splits share


class FeaturizeError(RuntimeError):
    pass


class _Single:
    """Stand-in for accelerate's PartialState in a plain single process."""

    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wait_for_everyone(self) -> None:
        pass


def autocast(device: torch.device, precision: str):
    """bf16 on GPU by default; fp32 on CPU (bf16 autocast is 6-7x slower on CPUs without AVX512-bf16)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise FeaturizeError(f"unknown precision {precision!r}: auto, fp32, fp16 or bf16")
    return torch.autocast(device.type, dtype=dtype)


def build_backbone(dcfg: DataConfig, fcfg: FeaturizeConfig, state=None) -> tuple[Backbone, dict]:
    """The backbone and what the manifest says about it.

    weights=none: the main process builds a random ResNet, re-estimates its BatchNorm
    statistics on the first `calibration_images` train images and saves it as
    FEATURES/backbone.safetensors; every split and process then loads that one file, so
    train, val, test and `caption.predict` see the same encoder.
    """
    state = state or _Single()
    bcfg = BackboneConfig(fcfg.backbone, fcfg.layer, fcfg.weights, fcfg.grid)
    info = {"backbone": fcfg.backbone, "layer": fcfg.layer, "image_size": fcfg.image_size,
            "normalization": {"mean": list(imagenet_weights(fcfg.backbone).transforms().mean),
                              "std": list(imagenet_weights(fcfg.backbone).transforms().std)},
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
        root.mkdir(parents=True, exist_ok=True)
        net = Backbone(bcfg)
        entries = load_split(dcfg.input_json, "train", dcfg.restval_in_train)[: fcfg.calibration_images]
        ds = SplitImages(entries, images_root(dcfg), fcfg.image_size)
        loader = DataLoader(ds, batch_size=min(32, fcfg.calibration_images), num_workers=0)
        used = net.calibrate_bn(b["image"][b["ok"]] for b in tqdm(loader, desc="calibrate BatchNorm", unit="batch"))
        net.save(path)
        atomic_write_json(meta_path, {**meta, "calibration_images": used, "sha256": file_digest(path)})
    state.wait_for_everyone()
    saved = json.loads(meta_path.read_text())
    if {k: saved.get(k) for k in ("arch", "layer", "grid")} != {k: meta[k] for k in ("arch", "layer", "grid")}:
        raise FeaturizeError(f"{meta_path}: the features folder holds a random {saved.get('arch')} {saved.get('layer')} backbone; "
                             f"write {fcfg.backbone} {fcfg.layer} features elsewhere")
    net = Backbone(replace(bcfg, weights=str(path)))
    return net, {**info, "weights": "none", "backbone_file": RANDOM_BACKBONE,
                 "bn_calibration": {"images": saved["calibration_images"], "split": "train"}}


def shard_size(fcfg: FeaturizeConfig, fmt_name: str, channels: int) -> int:
    """Images per shard: zarr `shard_images`; wds as many as fit `shard_bytes` (capped by `shard_images`)."""
    raw = fcfg.grid * fcfg.grid * channels * 2
    if fmt_name == "zarr":
        return max(1, fcfg.shard_images)
    return max(1, min(fcfg.shard_images, fcfg.shard_bytes // raw))


def featurize_split(dcfg: DataConfig, fcfg: FeaturizeConfig, split: str, backbone: Backbone, info: dict,
                    state=None, progress: bool = True) -> dict | None:
    """Featurize one split into FEATURES/split; returns the manifest (main process)."""
    state = state or _Single()
    device = state.device
    entries = load_split(dcfg.input_json, split, dcfg.restval_in_train)
    if fcfg.limit:
        entries = entries[: fcfg.limit]
    out = Path(dcfg.features) / split
    S = shard_size(fcfg, dcfg.format, backbone.channels)
    plan = make_plan(dcfg.format, len(entries), S, fcfg.grid, backbone.channels,
                     {**info, "split": split, "input_json": dcfg.input_json, "images_root": str(images_root(dcfg)),
                      "limit": fcfg.limit}, fcfg.codec if dcfg.format == "zarr" else "")
    if state.is_main_process:
        writer = create_writer(out, plan)  # writes plan.json and creates the zarr array once
    state.wait_for_everyone()
    if not state.is_main_process:
        writer = create_writer(out, plan)
    done = done_shards(out)
    mine = [k for k in range(plan["num_shards"]) if k % state.num_processes == state.process_index and k not in done]
    batches = [list(shard_range(plan, k))[i:i + fcfg.batch_size] for k in mine
               for i in range(0, len(shard_range(plan, k)), fcfg.batch_size)]
    if fcfg.decode not in ("workers", "device"):
        raise FeaturizeError(f"unknown --decode {fcfg.decode!r}: workers or device")
    on_device = fcfg.decode == "device"
    dataset = (SplitFiles if on_device else SplitImages)(entries, images_root(dcfg), fcfg.image_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=fcfg.num_workers, pin_memory=device.type == "cuda",
                        collate_fn=collate_files if on_device else None,
                        persistent_workers=False, prefetch_factor=4 if fcfg.num_workers else None)
    backbone = backbone.to(device).freeze()
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    pending: dict[int, list] = {k: [] for k in mine}
    failed: dict[int, list] = {k: [] for k in mine}
    remaining = {k: len(shard_range(plan, k)) for k in mine}
    futures = []
    total = sum(remaining.values())
    # Shard files are independent: several threads compress and write them (blosc and zstd release the GIL),
    # with back-pressure so finished grids never pile up faster than they are written.
    writers = fcfg.writer_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
    bar = tqdm(total=total, desc=f"featurize {split}" + (f" [rank {state.process_index}]" if state.num_processes > 1 else ""),
               unit="img", disable=not progress or total == 0)
    with ThreadPoolExecutor(max_workers=writers) as pool, torch.inference_mode():
        for batch in loader:
            if on_device:
                images, ok_list, errors = decode_on_device(batch, device, fcfg.image_size)
                ok, batch["error"] = torch.tensor(ok_list, dtype=torch.bool), errors
            else:
                ok = batch["ok"]
                images = batch["image"][ok].to(device, non_blocking=True)
            for row, good, err in zip(batch["row"].tolist(), ok.tolist(), batch["error"]):
                if not good:
                    if fcfg.strict:
                        raise FeaturizeError(f"{err} (--strict; rerun without it to record such files and go on)")
                    failed[row // S].append({"filename": entries[row].filename, "reason": err.split(": ", 1)[-1]})
            grids = None
            if ok.any():
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast(device, fcfg.precision):
                    grids = backbone(images)  # (b, g, g, C)
                grids = grids.float().clamp_(-65504, 65504).to(torch.float16).cpu().numpy()
            j = 0
            for row, good in zip(batch["row"].tolist(), ok.tolist()):
                k = row // S
                if good:
                    e = entries[row]
                    pending[k].append((row, {"key": e.key, "image_id": e.image_id, "filename": e.filename,
                                             "features": np.ascontiguousarray(grids[j]), "captions": e.tokens}))
                    j += 1
                remaining[k] -= 1
                if remaining[k] == 0:
                    futures.append(pool.submit(writer.write_shard, k, pending.pop(k), failed.pop(k)))
            bar.update(len(ok))
            for f in [f for f in futures if f.done()]:
                f.result()  # surface a writer error now, not at the end
            busy = [f for f in futures if not f.done()]
            if len(busy) > 2 * writers:
                wait(busy[: len(busy) - 2 * writers])
    for f in futures:
        f.result()
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        return finalize(out, split)
    return None
