"""How long the feature store's reader and writer hold Python's GIL per image: their CRC-32C.

    python -m bench.gil [--num 64] [--zeros 0.37] [--codecs blosc-zstd,none]

Reading and writing shards runs in threads (featurize's writers beside the main thread that
launches the model; the reader's decoding threads). Compression, decompression, hashing and
numpy's reductions release the GIL; a call that holds it runs one thread at a time, caps the
rate of any number of threads at 1 / (its time per image), and takes that time from the main
thread. The store computes a CRC-32C of every chunk (and of each shard's index). Printed, for
the `crc32c` package the store uses and, as the baseline in the same run, google_crc32c
(zarr's own):
  holds GIL  a pure Python loop on the main thread, while another thread runs only CRCs of
             grids, keeps this fraction of its solo speed (~0.5 on 2 cores: the GIL is held; ~1: released);
  per image  ms of CRCs per image in the write path (`shard_parts`) and the read path
             (`decode_shard`), against the whole path's ms per image (one thread);
  beside     one thread writing or reading shards in a loop while the main thread issues small
             torch ops, as featurize's main thread does between writers: the speed each keeps
             against its own alone. Each torch op releases the GIL and takes it back; a thread
             that holds the GIL for CRC after CRC makes it wait a switch interval (5 ms) each time.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import threading
import time

import google_crc32c
import numpy as np
import torch

from bench.store import relu_grids
from shards import zarr_store


def spin(seconds: float) -> float:
    """Iterations per second of a pure Python loop on this thread."""
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        n += 1
    return n / seconds


def kept_speed(work, seconds: float = 0.6, rounds: int = 3) -> float:
    """The main thread's Python speed while another thread runs `work` in a loop, over its solo speed (median)."""
    ratios = []
    for _ in range(rounds):
        solo = spin(seconds / 2)
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                work()

        th = threading.Thread(target=loop)
        th.start()
        time.sleep(0.02)
        ratios.append(spin(seconds) / solo)
        stop.set()
        th.join()
    return statistics.median(ratios)


def google_crc(data) -> bytes:
    return struct.pack("<I", google_crc32c.value(np.frombuffer(data, dtype=np.uint8)))


def per_image(work, images: int) -> float:
    """ms per image of `work()` (best of 3)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / images


def torch_ops(seconds: float) -> float:
    """Small torch ops per second on this thread, as a main thread launching a model issues them
    (each op releases the GIL inside and must take it back)."""
    x = torch.zeros(8)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        for _ in range(20):
            x = x + 1
        n += 20
    return n / (time.perf_counter() - t)


def beside(work, images: int, seconds: float = 1.5) -> tuple[float, float]:
    """(the main thread's torch ops/s, the worker's images/s) while a thread runs `work` in a loop."""
    stop, done = threading.Event(), [0]

    def loop():
        while not stop.is_set():
            work()
            done[0] += images

    th = threading.Thread(target=loop)
    th.start()
    t = time.perf_counter()
    ops = torch_ops(seconds)
    stop.set()
    th.join()
    return ops, done[0] / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gil", description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=64, help="grids per shard")
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--zeros", type=float, default=0.37)
    p.add_argument("--codecs", default="blosc-zstd,none")
    a = p.parse_args(argv)
    block = np.stack([r["features"] for r in relu_grids(a.num, a.channels, a.zeros)])  # (N, 14, 14, C) float16
    ours = zarr_store._crc
    crcs = {"google_crc32c": google_crc, "crc32c": ours}
    grids = [memoryview(x).cast("B") for x in block]
    held = {name: kept_speed(lambda: [crc(g) for g in grids]) for name, crc in crcs.items()}
    print(f"{a.num} grids 14x14x{a.channels}, {a.zeros:.0%} zeros, one shard per call")
    print("main thread's Python speed while another thread computes CRCs: "
          + ", ".join(f"{n} {v:.2f} ({'holds' if v < 0.75 else 'releases'} the GIL)" for n, v in held.items()))
    print(f"{'codec':11s} {'path':6s} {'ms/image':>9s} | CRC ms/image: {'google_crc32c':>13s} {'crc32c':>8s} | "
          f"GIL-bound cap, img/s: {'google_crc32c':>13s} {'crc32c':>8s}")
    spent = [0.0]

    def timed(crc):
        def f(data):
            t = time.perf_counter()
            out = crc(data)
            spent[0] += time.perf_counter() - t
            return out
        return f

    try:
        for codec in a.codecs.split(","):
            data = b"".join(bytes(x) for x in zarr_store.shard_parts(block, a.num, codec))
            paths = {"write": lambda: zarr_store.shard_parts(block, a.num, codec),
                     "read": lambda: zarr_store.decode_shard(data, a.num, a.num, codec, block.shape[1:], "bench")}
            for path, work in paths.items():
                total = per_image(work, a.num)
                crc_ms = {}
                for name, crc in crcs.items():
                    zarr_store._crc = timed(crc)
                    best = float("inf")
                    for _ in range(3):
                        spent[0] = 0.0
                        work()
                        best = min(best, spent[0])
                    crc_ms[name] = 1e3 * best / a.num
                    zarr_store._crc = ours
                caps = {n: (f"{1e3 / crc_ms[n]:,.0f}" if held[n] < 0.75 else "none") for n in crcs}
                print(f"{codec:11s} {path:6s} {total:9.3f} | {'':13s} {crc_ms['google_crc32c']:13.3f} {crc_ms['crc32c']:8.3f} | "
                      f"{'':21s} {caps['google_crc32c']:>13s} {caps['crc32c']:>8s}")
        solo = torch_ops(0.75)
        print(f"\nbeside a main thread issuing small torch ops ({solo:,.0f} ops/s alone): its speed and the thread's, "
              "each against its own alone")
        print(f"{'codec':11s} {'path':6s} | main thread: {'google_crc32c':>13s} {'crc32c':>8s} | "
              f"the thread, img/s: {'google_crc32c':>13s} {'crc32c':>8s}")
        for codec in a.codecs.split(","):
            data = b"".join(bytes(x) for x in zarr_store.shard_parts(block, a.num, codec))
            paths = {"write": lambda: zarr_store.shard_parts(block, a.num, codec),
                     "read": lambda: zarr_store.decode_shard(data, a.num, a.num, codec, block.shape[1:], "bench")}
            for path, work in paths.items():
                main_, thread_ = {}, {}
                for name, crc in crcs.items():
                    zarr_store._crc = crc
                    alone = 1e3 / per_image(work, a.num)
                    ops, rate = beside(work, a.num)
                    main_[name], thread_[name] = ops / solo, f"{rate:,.0f} ({rate / alone:.2f})"
                print(f"{codec:11s} {path:6s} | {'':12s} {main_['google_crc32c']:13.2f} {main_['crc32c']:8.2f} | "
                      f"{'':17s} {thread_['google_crc32c']:>13s} {thread_['crc32c']:>8s}")
                zarr_store._crc = ours
    finally:
        zarr_store._crc = ours
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
