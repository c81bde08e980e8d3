"""Run the frozen backbone over a split and write its grids, with the captions, into the store.

Work unit: the shard. Shard k holds rows [k*S, (k+1)*S) of the split; process r of W
takes shards k % W == r, so processes never share a file; a shard is skipped when its
JSON exists (a restart), and batches never cross a shard boundary, so a resumed run
computes exactly what an uninterrupted one would. Decoding runs in DataLoader workers
(or on the GPU, from a thread of its own that keeps `decode_ahead` batches ready, on a side
stream), the model on the main thread, validation, encoding and writing in writer threads.

The grids travel without host-side copies: each shard in progress owns a buffer of
(S, g, g, C) float16 (pinned on a GPU, reused from a small pool); every batch's output is
cast to float16 on the device and copied into its rows asynchronously, and when the shard's
last batch is in, a writer thread waits for that copy (a CUDA event) and encodes the file
straight from the buffer. The main thread never waits for the GPU, so the next batch's
forward pass is queued while earlier shards are copied and written.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from caption.config import DataConfig, FeaturizeConfig, images_root
from featurize.backbone import Backbone, BackboneConfig, file_digest, imagenet_weights
from featurize.images import SplitFiles, SplitImages, collate_files, decode_on_device
from shards import create_writer, done_shards, finalize, make_plan, shard_range, writer_threads
from shards.karpathy import DatasetError, load_split
from shards.manifest import WriterLock, atomic_write_json, row_runs

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
        try:
            entries = load_split(dcfg.input_json, "train", dcfg.restval_in_train)[: fcfg.calibration_images]
        except DatasetError as e:
            raise FeaturizeError(f"--weights none re-estimates BatchNorm statistics on train images, and there are "
                                 f"none: {e}") from None
        ds = SplitImages(entries, images_root(dcfg), fcfg.image_size)
        loader = DataLoader(ds, batch_size=min(32, fcfg.calibration_images), num_workers=0)
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
    state.wait_for_everyone()
    saved = json.loads(meta_path.read_text())
    if {k: saved.get(k) for k in ("arch", "layer", "grid")} != {k: meta[k] for k in ("arch", "layer", "grid")}:
        raise FeaturizeError(f"{meta_path}: the features folder holds a random {saved.get('arch')} {saved.get('layer')} backbone; "
                             f"write {fcfg.backbone} {fcfg.layer} features elsewhere")
    net = Backbone(replace(bcfg, weights=str(path)))
    return net, {**info, "weights": "none", "backbone_file": RANDOM_BACKBONE, "weights_sha256": saved.get("sha256"),
                 "bn_calibration": {"images": saved["calibration_images"], "split": "train"}}


_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # backbone -> (key, its inference model)


def inference_model(backbone: Backbone, device: torch.device, compile: bool = False) -> torch.nn.Module:
    """What featurize runs: the frozen backbone on `device`, channels_last on a GPU, optionally
    compiled (static shapes: pass full batches) with its BatchNorms folded into the convolutions
    first. The eager model keeps them: an H100 ran the folded eager ResNet-101 at 0.88x the plain
    one (cuDNN's BatchNorm beats a separate bias add), a 2-core CPU at 1.06-1.18x, too little to
    change the features that existing runs were trained on. Kept per backbone, so the splits of
    one run compile once."""
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


def shard_size(fcfg: FeaturizeConfig, fmt_name: str, channels: int) -> int:
    """Images per shard: zarr `shard_images`; wds as many as fit `shard_bytes` (capped by `shard_images`)."""
    raw = fcfg.grid * fcfg.grid * channels * 2
    if fmt_name == "zarr":
        return max(1, fcfg.shard_images)
    return max(1, min(fcfg.shard_images, fcfg.shard_bytes // raw))


class BlockPool:
    """Reusable host buffers for shards in progress, (S, g, g, C) float16 each, pinned on a GPU so
    device-to-host copies run asynchronously. At most `size` exist; `acquire` waits for a free one."""

    def __init__(self, shape: tuple, size: int, pinned: bool, max_bytes: int = 4 << 30):
        block_bytes = int(np.prod(shape)) * 2
        self.shape, self.size, self.pinned = shape, max(2, min(size, max_bytes // block_bytes)), pinned
        self.free: queue.Queue = queue.Queue()
        self.made = 0

    def acquire(self) -> torch.Tensor:
        if self.free.empty() and self.made < self.size:
            self.made += 1
            return torch.empty(self.shape, dtype=torch.float16, pin_memory=self.pinned)
        return self.free.get()

    def release(self, block: torch.Tensor) -> None:
        self.free.put(block)


class Ahead:
    """Batches prepared ahead in a thread of their own: `prepare(batch)` (decoding, resizing,
    the copy to the device) runs there on a CUDA stream of its own while the main thread
    queues forward passes, at most `depth` batches ahead. Iterating yields (batch, prepared)
    in order; an error in the thread is raised in the iterating thread; `close` stops the
    thread (also on an error in the iterating thread) without waiting for the loader's end.

    On CUDA the prepared tensors were made on the side stream: the consumer's stream waits
    for them (an event) and they are marked as used there (`record_stream`), so their memory
    is not reused before the forward pass that reads them has run.
    """

    _END = object()

    def __init__(self, batches, prepare, depth: int, device: torch.device):
        self.batches, self.prepare, self.device = batches, prepare, device
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.busy = 0.0  # seconds the thread spent preparing
        self.finished = False  # the end, an error or close() was seen: no more batches
        self.thread = threading.Thread(target=self._run, name="featurize-prepare", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        cuda = self.device.type == "cuda"
        try:
            with (torch.cuda.device(self.device) if cuda else nullcontext()), torch.inference_mode():
                stream = torch.cuda.Stream(self.device) if cuda else None
                with torch.cuda.stream(stream) if cuda else nullcontext():
                    for batch in self.batches:
                        if self.stop.is_set():
                            return
                        t = time.perf_counter()
                        out = self.prepare(batch)
                        event = None
                        if cuda:
                            event = torch.cuda.Event()
                            event.record(stream)
                        self.busy += time.perf_counter() - t
                        if not self._put((batch, out, event)):
                            return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)
            return
        self._put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        if self.finished:
            raise StopIteration
        item = self.queue.get()
        if item is self._END:
            self.finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, out, event = item
        if event is not None:
            here = torch.cuda.current_stream(self.device)
            here.wait_event(event)
            for t in out:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(here)
        return batch, out

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread: it ends after the batch it is preparing (a daemon: after `timeout`
        seconds, say on a loader that hangs, it is left behind rather than waited for)."""
        self.finished = True
        self.stop.set()
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            try:
                self.queue.get(timeout=0.1)  # free a put waiting for room
            except queue.Empty:
                pass


def timing_summary(t: dict) -> str:
    """featurize_split's `timing` in one line."""
    total = max(t["total"], 1e-9)
    ahead = "" if t.get("preparing") is None else \
        f"; the thread preparing batches (decode, resize, copy to the device) was busy {100 * t['preparing'] / total:.0f}%"
    return (f"the main thread waited {100 * t['wait_images'] / total:.0f}% of the time for images and "
            f"{100 * t['wait_writers'] / total:.0f}% for the {t['writer_threads']} writer thread(s), "
            f"which were busy {100 * t['writing'] / (t['writer_threads'] * total):.0f}%{ahead}")


def featurize_split(dcfg: DataConfig, fcfg: FeaturizeConfig, split: str, backbone: Backbone, info: dict,
                    state=None, progress: bool = True, timing: dict | None = None) -> dict | None:
    """Featurize one split into FEATURES/split; returns the manifest (main process).

    `timing`, when given, receives where this process's time went (seconds): `total`; the main
    thread waiting for images (`wait_images`) and for a free shard buffer, i.e. for the writers
    (`wait_writers`); the writer threads' summed busy time (`writing`) and thread count; the
    busy time of the thread preparing batches (`preparing`, None without one).
    """
    state = state or _Single()
    entries = load_split(dcfg.input_json, split, dcfg.restval_in_train)
    if fcfg.limit:
        entries = entries[: fcfg.limit]
    out = Path(dcfg.features) / split
    S = shard_size(fcfg, dcfg.format, backbone.channels)
    plan = make_plan(dcfg.format, len(entries), S, fcfg.grid, backbone.channels,
                     {**info, "split": split, "input_json": dcfg.input_json, "images_root": str(images_root(dcfg)),
                      "limit": fcfg.limit}, fcfg.codec if dcfg.format == "zarr" else "")
    with WriterLock(out, state.process_index):  # a second command writing this folder stops here, with a message
        return _featurize_locked(dcfg, fcfg, split, backbone, state, entries, out, plan, progress, timing)


def _featurize_locked(dcfg: DataConfig, fcfg: FeaturizeConfig, split: str, backbone: Backbone, state, entries: list,
                      out: Path, plan: dict, progress: bool, timing: dict | None) -> dict | None:
    """featurize_split's work, with this process's lock on the folder held."""
    device = state.device
    S = plan["shard_size"]
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
    # pinned image batches cross to the GPU asynchronously; undecoded JPEGs go to nvjpeg, not pinned
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=fcfg.num_workers, pin_memory=device.type == "cuda" and not on_device,
                        collate_fn=collate_files if on_device else None,
                        persistent_workers=False, prefetch_factor=4 if fcfg.num_workers else None)
    model = inference_model(backbone, device, fcfg.compile)
    metas: dict[int, list] = {k: [] for k in mine}
    failed: dict[int, list] = {k: [] for k in mine}
    remaining = {k: len(shard_range(plan, k)) for k in mine}
    total = sum(remaining.values())
    # Shard files are independent: several threads validate, compress and write them. Back-pressure:
    # a shard needs a buffer from the pool, and buffers come back only when their file is written.
    writers = writer_threads(fcfg.writer_threads)
    pool = BlockPool((S, fcfg.grid, fcfg.grid, backbone.channels), writers + 2, pinned=device.type == "cuda")
    blocks: dict[int, torch.Tensor] = {}  # shard -> its buffer from the pool
    futures = []
    bar = tqdm(total=total, desc=f"featurize {split}" + (f" [rank {state.process_index}]" if state.num_processes > 1 else ""),
               unit="img", disable=not progress or total == 0)

    lock = threading.Lock()
    clock = {"total": time.perf_counter(), "wait_images": 0.0, "wait_writers": 0.0, "writing": 0.0, "writer_threads": writers}

    def write(k: int, block: torch.Tensor, event, metas_k: list, failed_k: list) -> None:
        t = time.perf_counter()
        try:
            if event is not None:
                event.synchronize()  # the device-to-host copies of this shard's batches are done
            writer.write_block(k, block[:len(shard_range(plan, k))].numpy(), metas_k, failed_k)
        finally:
            pool.release(block)
            with lock:
                clock["writing"] += time.perf_counter() - t

    def prepare(batch: dict) -> tuple[torch.Tensor, list[bool], list[str]]:
        """A loader batch as (b, 3, S, S) uint8 images of the rows that decoded, on the device; per row ok, error."""
        if on_device:
            return decode_on_device(batch, device, fcfg.image_size)
        ok = batch["ok"]
        images = batch["image"]  # pinned by the loader on a GPU: copied asynchronously
        if not ok.all():
            images = images[ok]
        return images.to(device, non_blocking=True), ok.tolist(), batch["error"]

    # the loader's workers start here, on the main thread; the thread only takes batches from them
    ahead = Ahead(iter(loader), prepare, fcfg.decode_ahead, device) if fcfg.decode_ahead > 0 else None
    batches_in = ahead if ahead is not None else ((b, prepare(b)) for b in loader)
    with ThreadPoolExecutor(max_workers=writers) as threads, torch.inference_mode(), \
            (closing(ahead) if ahead is not None else nullcontext()):
        while True:
            t = time.perf_counter()
            item = next(batches_in, None)
            clock["wait_images"] += time.perf_counter() - t
            if item is None:
                break
            batch, (images, good, errors) = item
            rows = batch["row"].tolist()
            k = rows[0] // S  # batches never cross a shard boundary
            span = shard_range(plan, k)
            start = span.start
            if k not in blocks:
                t = time.perf_counter()
                blocks[k] = pool.acquire()
                clock["wait_writers"] += time.perf_counter() - t
            host = blocks[k][:len(span)]  # (n, g, g, C) float16 on the host: this shard's rows
            for row, g, err in zip(rows, good, errors):
                e = entries[row]
                if g:
                    metas[k].append({"row": row, "key": e.key, "image_id": e.image_id, "filename": e.filename,
                                     "captions": e.tokens})
                elif fcfg.strict:
                    raise FeaturizeError(f"{err} (--strict; rerun without it to record such files and go on)")
                else:
                    failed[k].append({"filename": e.filename, "reason": err.split(": ", 1)[-1]})
                    host[row - start].zero_()  # a failed image's rows read as zeros (the fill value)
            if any(good):
                n = images.shape[0]
                if fcfg.compile and n < fcfg.batch_size:  # one static shape: pad with blank images
                    images = torch.cat([images, images.new_zeros((fcfg.batch_size - n, *images.shape[1:]))])
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast(device, fcfg.precision):
                    grids = model(images)[:n]  # (b, g, g, C)
                # float32 first: clamping in bf16 would round 65504 up to 65536, inf in float16
                grids = grids.float().clamp_(-65504, 65504)
                if device.type == "cuda":
                    grids = grids.half()  # cast on the GPU: half the bytes cross to the host
                j = 0
                for a, b in row_runs([r - start for r, g in zip(rows, good) if g]):
                    host[a:b].copy_(grids[j:j + b - a], non_blocking=True)  # (b-a, g, g, C) -> float16 rows
                    j += b - a
            remaining[k] -= len(rows)
            if remaining[k] == 0:
                event = None
                if device.type == "cuda":
                    event = torch.cuda.Event()
                    event.record()
                futures.append(threads.submit(write, k, blocks.pop(k), event, metas.pop(k), failed.pop(k)))
            bar.update(len(rows))
            for f in [f for f in futures if f.done()]:
                f.result()  # surface a writer error now, not at the end
            futures = [f for f in futures if not f.done()]
        t = time.perf_counter()
        for f in futures:
            f.result()
        clock["wait_writers"] += time.perf_counter() - t
    bar.close()
    clock["preparing"] = ahead.busy if ahead is not None else None
    clock["total"] = time.perf_counter() - clock["total"]
    if timing is not None:
        timing.update(clock)
    if progress and total:
        tqdm.write(f"featurize {split}: {total} images in {clock['total']:.1f} s; {timing_summary(clock)}")
    state.wait_for_everyone()
    if state.is_main_process:
        return finalize(out, split)
    return None
