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


def python_loop(seconds: float) -> float:
    """Iterations per second of a pure Python loop on this thread."""
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        n += 1
    return n / (time.perf_counter() - t)


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


def beside(work, main_loop, seconds: float, images: int = 1) -> tuple[float, float]:
    """(`main_loop`'s rate on this thread, the thread's images/s) while another thread runs `work`
    (`images` images per call) in a loop."""
    stop, done = threading.Event(), [0]

    def loop():
        while not stop.is_set():
            work()
            done[0] += images

    th = threading.Thread(target=loop)
    th.start()
    t = time.perf_counter()
    rate = main_loop(seconds)
    stop.set()
    th.join()
    return rate, done[0] / (time.perf_counter() - t)


def google_crc(data) -> bytes:
    return struct.pack("<I", google_crc32c.value(np.frombuffer(data, dtype=np.uint8)))


def best_of_3(run) -> float:
    """The least of three `run()` results (each a time)."""
    return min(run() for _ in range(3))


def timed(f):
    """`f`, and its wall time, as one call: () -> seconds."""
    def run() -> float:
        t = time.perf_counter()
        f()
        return time.perf_counter() - t
    return run


def store_paths(block: np.ndarray, codec: str) -> dict:
    """The store's write path (`shard_parts`) and read path (`decode_shard`) over one shard of `block`."""
    n = block.shape[0]
    data = b"".join(bytes(x) for x in zarr_store.shard_parts(block, n, codec))
    return {"write": lambda: zarr_store.shard_parts(block, n, codec),
            "read": lambda: zarr_store.decode_shard(data, n, n, codec, block.shape[1:], "bench")}


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
    held = {name: statistics.median(beside(lambda: [crc(g) for g in grids], python_loop, 0.6)[0] / python_loop(0.3)
                                    for _ in range(3))
            for name, crc in crcs.items()}
    print(f"{a.num} grids 14x14x{a.channels}, {a.zeros:.0%} zeros, one shard per call")
    print("main thread's Python speed while another thread computes CRCs: "
          + ", ".join(f"{n} {v:.2f} ({'holds' if v < 0.75 else 'releases'} the GIL)" for n, v in held.items()))
    print(f"{'codec':11s} {'path':6s} {'ms/image':>9s} | CRC ms/image: {'google_crc32c':>13s} {'crc32c':>8s} | "
          f"GIL-bound cap, img/s: {'google_crc32c':>13s} {'crc32c':>8s}")
    spent = [0.0]

    def counting(crc):  # crc, adding its time to spent[0]
        def f(data):
            t = time.perf_counter()
            out = crc(data)
            spent[0] += time.perf_counter() - t
            return out
        return f

    def crc_seconds(work) -> float:
        spent[0] = 0.0
        work()
        return spent[0]

    try:
        for codec in a.codecs.split(","):
            for path, work in store_paths(block, codec).items():
                total = 1e3 * best_of_3(timed(work)) / a.num
                crc_ms = {}
                for name, crc in crcs.items():
                    zarr_store._crc = counting(crc)
                    crc_ms[name] = 1e3 * best_of_3(lambda: crc_seconds(work)) / a.num
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
            for path, work in store_paths(block, codec).items():
                main_, thread_ = {}, {}
                for name, crc in crcs.items():
                    zarr_store._crc = crc
                    alone = a.num / best_of_3(timed(work))
                    ops, rate = beside(work, torch_ops, 1.5, a.num)
                    main_[name], thread_[name] = ops / solo, f"{rate:,.0f} ({rate / alone:.2f})"
                zarr_store._crc = ours
                print(f"{codec:11s} {path:6s} | {'':12s} {main_['google_crc32c']:13.2f} {main_['crc32c']:8.2f} | "
                      f"{'':17s} {thread_['google_crc32c']:>13s} {thread_['crc32c']:>8s}")
    finally:
        zarr_store._crc = ours
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
