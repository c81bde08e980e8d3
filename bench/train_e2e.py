"""Training end to end: whole optimizer steps fed from a store on disk, against the model step
alone on the same batches, in one run.

    python -m bench.train_e2e                          # CPU, the shapes world's decoder size
    python -m bench.train_e2e --coco --precision bf16  # a GPU, the COCO setting

model     the step alone: the same batches collated beforehand and already on the device;
zarr-*    batches streamed from a zarr store (blosc-zstd, or no codec) through the DataLoader;
wds       batches streamed from tar shards;
ram/device  the store's grids held in memory (`train.features_in_memory`), gathered by index;
ram-ahead/device-ahead  the same, the batches made ahead in a thread (what training does on a GPU).
Each path prints captions/s, its ratio to the model step alone, and the share of the step time
spent waiting for the next batch. The resident paths also print their one-time load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from bench import add_decoder_dims, decoder_dims, device_name, pick_device, sync
from caption.data import train_batches
from caption.model import Decoder, DecoderConfig, sequence_loss
from caption.resident import ResidentFeatures, resident_batches
from caption.vocab import Vocab
from shards import open_store, write_records

WARMUP = 2  # steps not timed (allocator, first DataLoader batches)


def make_store(root: Path, backend: str, codec: str, n: int, channels: int, words: list[str]) -> None:
    rng = np.random.default_rng(0)
    recs = ({"key": f"k{i}", "image_id": i, "filename": "x",
             "captions": [list(rng.choice(words, rng.integers(8, 17))) for _ in range(5)],
             # ReLU'd normal grids: ~50% zeros, as compressible as a trained ResNet's layer4
             "features": np.maximum(rng.standard_normal((14, 14, channels), dtype=np.float32), 0).astype(np.float16)}
            for i in range(n))
    write_records(root, recs, backend=backend, num_records=n, grid=14, channels=channels, shard_size=64, codec=codec)


def timed_steps(batches, step, device: torch.device) -> tuple[float, float]:
    """(captions/s, share of the time spent waiting for batches) over the batches after WARMUP."""
    it = iter(batches)
    caps, wait, t0 = 0, 0.0, None
    i = 0
    while True:
        t = time.perf_counter()
        b = next(it, None)
        if b is None:
            break
        if i >= WARMUP:
            wait += time.perf_counter() - t
        if i == WARMUP:
            sync(device)
            t0, caps, wait = time.perf_counter(), 0, 0.0
        step(b)
        caps += b["tokens"].shape[0]
        i += 1
    sync(device)
    total = time.perf_counter() - t0
    return caps / total, wait / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_e2e", description=__doc__.split("\n\n")[0])
    add_decoder_dims(p)
    p.add_argument("--batch_images", type=int, default=32)
    p.add_argument("--seq_per_img", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per path")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers of the streaming paths")
    p.add_argument("--paths", default="zarr-blosc-zstd,zarr-none,wds,ram,ram-ahead,device,device-ahead")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every path; the median of each")
    a = decoder_dims(p.parse_args(argv))
    device = pick_device()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if a.precision == "bf16" else nullcontext()
    n = a.batch_images * (a.steps + WARMUP)
    words = [f"w{i}" for i in range(a.vocab - 4)]
    vocab = Vocab(["<pad>", "<bos>", "<eos>", "<unk>", *words])
    cfg = DecoderConfig(vocab_size=len(vocab), feature_dim=a.channels, embed_dim=a.embed, hidden_dim=a.hidden, attn_dim=a.attn)
    kw = dict(batch_size=a.batch_images, seq_per_img=a.seq_per_img, max_length=16, seed=0, epoch=0)
    paths = [x for x in a.paths.split(",") if x and not (x.startswith("device") and device.type != "cuda")]
    torch.manual_seed(0)
    model = Decoder(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), 4e-4)

    def step(b: dict) -> None:
        with amp:
            logits, alphas, *_ = model(b["features"].to(device, non_blocking=True), b["tokens"].to(device, non_blocking=True),
                                   a.seq_per_img)
        total, _, ntok = sequence_loss(logits, b["targets"].to(device, non_blocking=True), alphas, 0, 1.0)
        (total / ntok).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rates: dict[str, list] = {}
    loads: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        stores = {"zarr-blosc-zstd": ("zarr", "blosc-zstd"), "zarr-none": ("zarr", "none"), "wds": ("wds", "")}
        for name, (backend, codec) in stores.items():
            if name in paths or (name == "zarr-none" and set(paths) - set(stores)):
                make_store(Path(tmp) / name, backend, codec, n, a.channels, words)
        print(f"stores of {n} records made", flush=True)
        held = ResidentFeatures(open_store(Path(tmp) / "zarr-none"), "ram", torch.device("cpu"), progress=False)
        ready = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
                 for b in resident_batches(held, vocab, **kw)]
        resident = {}
        for name in sorted({x.removesuffix("-ahead") for x in paths} - set(stores)):  # ram, device: loaded once
            t = time.perf_counter()
            resident[name] = ResidentFeatures(open_store(Path(tmp) / "zarr-none"), name, device, progress=False)
            loads[name] = f"load {time.perf_counter() - t:.2f} s for {n} images ({resident[name].nbytes / 1e6:.0f} MB)"
        for _ in range(a.rounds):  # interleaved: a machine's slow minute spreads over every path
            rates.setdefault("model", []).append(timed_steps(ready, step, device))  # the model step alone
            for name in paths:
                if name in stores:
                    batches = train_batches(open_store(Path(tmp) / name), vocab, num_workers=a.num_workers,
                                            pin_memory=device.type == "cuda", **kw)[1]
                else:
                    batches = resident_batches(resident[name.removesuffix("-ahead")], vocab, **kw,
                                               ahead=2 if name.endswith("-ahead") else 0)
                rates.setdefault(name, []).append(timed_steps(batches, step, device))
    median = {k: (float(np.median([r for r, _ in v])), float(np.median([w for _, w in v]))) for k, v in rates.items()}
    model_rate = median["model"][0]
    print(f"device {device_name(device)}; D={a.channels} E={a.embed} H={a.hidden} A={a.attn} V={len(vocab)}; "
          f"{a.batch_images} images x {a.seq_per_img} captions per step, {a.steps} timed steps; {a.precision}")
    print(f"(median of {a.rounds} interleaved rounds; streamed paths with {a.num_workers} DataLoader workers)")
    for name, (rate, wait) in median.items():
        label = "model (batches ready on the device)" if name == "model" else \
            f"{name}, {'resident' if name.removesuffix('-ahead') in ('ram', 'device') else 'streamed'}"
        print(f"{label:<38} {rate:9.0f} captions/s  {rate / model_rate:5.2f}x the model step  "
              f"waiting {100 * wait:4.1f}%  {loads.get(name, '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
