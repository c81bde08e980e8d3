"""Run the frozen backbone over a split and write its grids, with the captions, into the store.

Work unit: the shard. Shard k holds rows [k*S, (k+1)*S) of the split; process r of W
takes shards k % W == r, so processes never share a file; a shard is skipped when its
JSON exists (a restart), and batches never cross a shard boundary, so a resumed run
computes exactly what an uninterrupted one would. Decoding runs in DataLoader workers
(or on the GPU, from a thread of its own that keeps `decode_ahead` batches ready, on a side
stream), the model on the main thread, validation, encoding and writing in writer threads.

The grids travel without host-side copies (featurize/assemble.py): every batch's output is
cast to float16 on the device and copied asynchronously into its shard's buffer, and a writer
thread encodes the shard's file from there. The main thread never waits for the GPU, so the
next batch's forward pass is queued while earlier shards are copied and written.

    featurize/prepare.py    the backbone, its weights, the inference model
    featurize/ahead.py      batches decoded and moved to the device ahead, in a thread
    featurize/assemble.py   shard buffers and writer threads
    featurize/extract.py    this loop
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.config import DataConfig, FeaturizeConfig, images_root
from common.tensors import to_fp16
from featurize.ahead import Ahead
from featurize.assemble import BlockPool, ShardAssembler
from featurize.backbone import Backbone
from featurize.images import SplitFiles, SplitImages, collate_files, decode_on_device
from featurize.prepare import FeaturizeError, SingleProcess, autocast, build_backbone, inference_model
from shards import create_writer, done_shards, finalize, make_plan, shard_range, writer_threads
from shards.karpathy import load_split
from shards.manifest import WriterLock

log = logging.getLogger(__name__)

__all__ = ["FeaturizeError", "build_backbone", "featurize_split", "inference_model", "shard_size", "timing_summary"]


def shard_size(fcfg: FeaturizeConfig, fmt_name: str, channels: int) -> int:
    """Images per shard: zarr `shard_images`; wds as many as fit `shard_bytes` (capped by `shard_images`)."""
    raw = fcfg.grid * fcfg.grid * channels * 2
    if fmt_name == "zarr":
        return max(1, fcfg.shard_images)
    return max(1, min(fcfg.shard_images, fcfg.shard_bytes // raw))


def timing_summary(t: dict) -> str:
    """featurize_split's `timing` in one line."""
    total = max(t["total"], 1e-9)
    ahead = "" if t.get("preparing") is None else \
        f"; the thread preparing batches (decode, resize, copy to the device) was busy {100 * t['preparing'] / total:.0f}%"
    return (f"the main thread waited {100 * t['wait_images'] / total:.0f}% of the time for images and "
            f"{100 * t['wait_writers'] / total:.0f}% for the {t['writer_threads']} writer thread(s), "
            f"which were busy {100 * t['writing'] / (t['writer_threads'] * total):.0f}%{ahead}")


def bottleneck(t: dict) -> str:
    """What limited featurize_split's rate, from its `timing`, in a few words (the full account:
    `timing_summary`, printed by bench/featurize.py)."""
    total = max(t["total"], 1e-9)
    if t["wait_images"] / total > 0.3:
        return (f"reading and decoding images was the limit ({100 * t['wait_images'] / total:.0f}% of the time "
                "waiting for them: more --num_workers, or --decode device on a GPU)")
    if t["wait_writers"] / total > 0.3:
        return (f"writing the store was the limit ({100 * t['wait_writers'] / total:.0f}% of the time waiting for "
                "it: --codec none, or more --writer_threads)")
    return "the model was the limit"


def featurize_split(dcfg: DataConfig, fcfg: FeaturizeConfig, split: str, backbone: Backbone, info: dict,
                    state=None, progress: bool = True, timing: dict | None = None) -> dict | None:
    """Featurize one split into FEATURES/split; returns the manifest (main process).

    `timing`, when given, receives where this process's time went (seconds): `total`; the main
    thread waiting for images (`wait_images`) and for a free shard buffer, i.e. for the writers
    (`wait_writers`); the writer threads' summed busy time (`writing`) and thread count; the
    busy time of the thread preparing batches (`preparing`, None without one).
    """
    state = state or SingleProcess()
    entries = load_split(dcfg.input_json, split, dcfg.restval_in_train)
    if fcfg.limit:
        entries = entries[: fcfg.limit]
    out = Path(dcfg.features) / split
    S = shard_size(fcfg, dcfg.format, backbone.channels)
    plan = make_plan(dcfg.format, len(entries), S, fcfg.grid, backbone.channels,
                     {**info, "split": split, "input_json": dcfg.input_json, "images_root": str(images_root(dcfg)),
                      "limit": fcfg.limit}, fcfg.codec if dcfg.format == "zarr" else "")
    with WriterLock(out, state.process_index):  # a second command writing this folder stops here, with a message
        clock = _featurize_locked(dcfg, fcfg, split, backbone, state, entries, out, plan, progress)
    if timing is not None:
        timing.update(clock)
    state.wait_for_everyone()
    return finalize(out, split) if state.is_main_process else None


def _featurize_locked(dcfg: DataConfig, fcfg: FeaturizeConfig, split: str, backbone: Backbone, state, entries: list,
                      out: Path, plan: dict, progress: bool) -> dict:
    """The shards of `plan` this process writes and has not written yet, with its lock on the
    folder held; returns where the time went (`featurize_split`'s `timing`)."""
    writer = _writer(out, plan, state)
    done = done_shards(out)
    mine = [k for k in range(plan["num_shards"]) if k % state.num_processes == state.process_index and k not in done]
    batches = [list(shard_range(plan, k))[i:i + fcfg.batch_size] for k in mine
               for i in range(0, len(shard_range(plan, k)), fcfg.batch_size)]
    loader = image_loader(dcfg, fcfg, entries, batches, state.device)
    total = sum(len(shard_range(plan, k)) for k in mine)
    return run_loop(fcfg, split, backbone, state, writer, plan, mine, entries, loader, total, progress)


def _writer(out: Path, plan: dict, state):
    """This process's writer of the store; the main process creates it first (plan.json, the zarr array)."""
    if state.is_main_process:
        writer = create_writer(out, plan)
    state.wait_for_everyone()
    return writer if state.is_main_process else create_writer(out, plan)


# long: the loop and its clocks read best in one place; every step is a call
def run_loop(fcfg: FeaturizeConfig, split: str, backbone: Backbone, state, writer, plan: dict, mine: list[int],
             entries: list | None, loader, total: int | None, progress: bool, after_batch=None) -> dict:
    """Forward passes over `loader`'s batches into the shards `mine` of `plan`; returns where the
    time went (`total`: the images to expect, None: unknown). A batch may say which shards it completes (`closes`) and carry its rows' metadata
    (`meta`, else from `entries`) or a fatal error (`fatal`); `after_batch(batch, shards)` runs
    after each (input shards: their markers)."""
    device = state.device
    model = inference_model(backbone, device, fcfg.compile)
    # Shard files are independent: several threads validate, compress and write them.
    writers = writer_threads(fcfg.writer_threads)
    pool = BlockPool((plan["shard_size"], fcfg.grid, fcfg.grid, backbone.channels), writers + 2, pinned=device.type == "cuda")
    bar = tqdm(total=total, desc=f"featurize {split}" + (f" [rank {state.process_index}]" if state.num_processes > 1 else ""),
               unit="img", disable=not progress or total == 0)
    start, wait_images = time.perf_counter(), 0.0
    prepare = on_device_batch(device, fcfg)
    # the loader's workers start here, on the main thread; the thread only takes batches from them
    ahead = Ahead(iter(loader), prepare, fcfg.decode_ahead, device) if fcfg.decode_ahead > 0 else None
    batches_in = ahead if ahead is not None else ((b, prepare(b)) for b in loader)
    try:
        with ThreadPoolExecutor(max_workers=writers) as threads, torch.inference_mode(), \
                (closing(ahead) if ahead is not None else nullcontext()):
            shards = ShardAssembler(writer, plan, mine, entries, pool, threads, device, fcfg.strict)
            while True:
                t = time.perf_counter()
                item = next(batches_in, None)
                wait_images += time.perf_counter() - t
                if item is None:
                    break
                batch, (images, good, errors) = item
                if batch.get("fatal"):
                    raise FeaturizeError(batch["fatal"])
                rows = batch["row"].tolist()
                if rows:
                    grids = forward(model, images, fcfg, device) if any(good) else None
                    shards.add(rows, good, errors, grids, batch.get("meta"))
                for k in batch.get("closes", ()):
                    shards.close(k)
                if after_batch is not None:
                    after_batch(batch, shards)
                bar.update(len(good))
            shards.wait()
            if after_batch is not None:
                after_batch(None, shards)
    finally:
        bar.close()  # also on an error: the error's line starts a line of its own
    clock = {"total": time.perf_counter() - start, "wait_images": wait_images, "wait_writers": shards.waiting,
             "writing": shards.writing, "writer_threads": writers, "preparing": ahead.busy if ahead is not None else None}
    if progress and bar.n:
        log.info(f"featurize {split}: {bar.n} images in {clock['total']:.1f} s "
                 f"({bar.n / max(clock['total'], 1e-9):.0f} img/s); {bottleneck(clock)}")
    return clock


def image_loader(dcfg: DataConfig, fcfg: FeaturizeConfig, entries: list, batches: list[list[int]],
                 device: torch.device) -> DataLoader:
    """Batches of rows as decoded, resized images (`decode: workers`) or as file bytes for the
    device to decode (`decode: device`), from DataLoader workers."""
    on_device = fcfg.decode == "device"
    dataset = (SplitFiles if on_device else SplitImages)(entries, images_root(dcfg), fcfg.image_size)
    # pinned image batches cross to the GPU asynchronously; undecoded JPEGs go to nvjpeg, not pinned
    return DataLoader(dataset, batch_sampler=batches, num_workers=fcfg.num_workers,
                      pin_memory=device.type == "cuda" and not on_device, collate_fn=collate_files if on_device else None,
                      persistent_workers=False, prefetch_factor=4 if fcfg.num_workers else None)


def on_device_batch(device: torch.device, fcfg: FeaturizeConfig):
    """`prepare(batch) -> (images, ok, errors)`: a loader batch as (b, 3, S, S) uint8 images of
    the rows that decoded, on the device, and per row whether it decoded and why not."""
    def prepare(batch: dict) -> tuple[torch.Tensor, list[bool], list[str]]:
        if fcfg.decode == "device":
            return decode_on_device(batch, device, fcfg.image_size)
        ok = batch["ok"]
        images = batch["image"]  # pinned by the loader on a GPU: copied asynchronously
        if not ok.all():
            images = images[ok]
        return images.to(device, non_blocking=True), ok.tolist(), batch["error"]
    return prepare


def forward(model: torch.nn.Module, images: torch.Tensor, fcfg: FeaturizeConfig, device: torch.device) -> torch.Tensor:
    """(b, g, g, C) float16 grids of (b, 3, S, S) uint8 images, cast on the device (half the bytes
    cross to the host)."""
    n = images.shape[0]
    if fcfg.compile and n < fcfg.batch_size:  # one static shape: pad with blank images
        images = torch.cat([images, images.new_zeros((fcfg.batch_size - n, *images.shape[1:]))])
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, fcfg.precision):
        return to_fp16(model(images)[:n])  # (b, g, g, C)
