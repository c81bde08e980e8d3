"""Feature store benchmark: bytes per image, compression, write and read speed, against `cat`.

    python -m bench.store [--num 256] [--channels 2048] [--zeros 0.37,0.6] [--features DIR]

Writes N ReLU-like float16 grids (a set fraction of exact zeros, the rest the positive
part of a normal) with each backend and zarr codec, reads them back in order, and reads
the same files with `cat`: cold (the files' pages evicted first, so both read from disk:
the physical limit) and hot (from the page cache). `--features` also measures a real
features folder (e.g. the demo's). Prints one table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from shards import open_store, write_records
from shards.__main__ import convert
from shards.zarr_store import ZarrReader


def relu_grids(n: int, channels: int, zero_fraction: float, seed: int = 0):
    """Grids whose zero fraction is `zero_fraction`: max(0, N(mu, 1)) with P(x <= 0) = zero_fraction."""
    mu = -statistics.NormalDist().inv_cdf(zero_fraction)
    rng = np.random.default_rng(seed)
    for i in range(n):
        x = np.maximum(rng.standard_normal((14, 14, channels), dtype=np.float32) + mu, 0).astype(np.float16)
        yield {"key": f"img_{i:06d}", "image_id": i, "filename": f"{i}.jpg", "features": x, "captions": [["a", "b"]]}


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (POSIX_FADV_DONTNEED), so the next read comes from disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cat_seconds(files: list[Path]) -> float:
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def read_seconds(root: Path, n: int, threads: int) -> float:
    store = open_store(root)
    t = time.perf_counter()
    records = store.iter_records(threads=threads) if isinstance(store, ZarrReader) else store.iter_records()
    assert sum(1 for _ in records) == n
    return time.perf_counter() - t


def measure(root: Path, n: int, raw_bytes: int, write_s: float | None, threads: int) -> dict:
    """Cold (pages evicted: from disk) and hot (page cache) reads, ours and `cat`'s, best of 2 each."""
    files = [p for _, p in open_store(root).shard_files() if p.exists()]
    disk = sum(p.stat().st_size for p in files)
    runs: dict[str, list[float]] = {"cat_cold": [], "read_cold": [], "cat_hot": [], "read_hot": []}
    for _ in range(2):
        evict(files)
        runs["cat_cold"].append(cat_seconds(files))
        runs["cat_hot"].append(cat_seconds(files))
        evict(files)
        runs["read_cold"].append(read_seconds(root, n, threads))
        runs["read_hot"].append(read_seconds(root, n, threads))
    t = {k: min(v) for k, v in runs.items()}
    return {"bytes_per_image": disk / n, "ratio": raw_bytes / disk,
            "write_MBps": raw_bytes / write_s / 1e6 if write_s else float("nan"),
            "read_MBps": raw_bytes / t["read_hot"] / 1e6,
            "read_img_s": n / t["read_hot"], "cat_img_s": n / t["cat_hot"], "read_vs_cat": t["cat_hot"] / t["read_hot"],
            "cold_read_img_s": n / t["read_cold"], "cold_cat_img_s": n / t["cat_cold"],
            "cold_read_vs_cat": t["cat_cold"] / t["read_cold"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--zeros", default="0.37,0.6", help="zero fractions to try (random-init ResNets ~0.37)")
    p.add_argument("--codecs", default="blosc-zstd,zstd,lz4,none,wds", help="zarr codecs to try, and wds")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="decoding threads of the zarr reader, and writer threads (against 1, the baseline)")
    p.add_argument("--features", default=None, help="also measure this real features folder (one split)")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:  # set TMPDIR to measure another disk (not a tmpfs)
        for z in map(float, a.zeros.split(",")):
            raw = a.num * 14 * 14 * a.channels * 2
            for codec in a.codecs.split(","):
                backend = "wds" if codec == "wds" else "zarr"
                root = Path(tmp) / f"{codec}-{z}"
                records = list(relu_grids(a.num, a.channels, z))  # made before the clock starts
                w = {}
                for threads, where in ((1, root.with_name(root.name + "-1")), (a.threads, root)):
                    t = time.perf_counter()
                    write_records(where, records, backend=backend, num_records=a.num, grid=14,
                                  channels=a.channels, shard_size=64, codec=codec, threads=threads)
                    w[threads] = time.perf_counter() - t
                del records
                rows.append({"data": f"relu zeros={z:.2f}", "store": codec if backend == "wds" else f"zarr {codec}",
                             **measure(root, a.num, raw, w[a.threads], a.threads), "write1_MBps": raw / w[1] / 1e6})
        if a.features:
            src = open_store(a.features)
            n, m = len(src), src.manifest
            raw = n * m["raw_bytes_per_image"]
            rows.append({"data": f"{a.features} (C={m['channels']})", "store": f"{m['backend']} {m.get('codec', '')}".strip(),
                         **measure(Path(a.features), n, raw, None, a.threads)})
            for backend in ("wds",) if m["backend"] == "zarr" else ("zarr",):
                dst = Path(tmp) / "real-convert"
                t = time.perf_counter()
                convert(a.features, dst, backend)
                rows.append({"data": f"{a.features} (C={m['channels']})", "store": backend,
                             **measure(dst, n, raw, time.perf_counter() - t, a.threads)})
    print(f"{a.threads} reader and writer threads (write MB/s; '1 thread': the same writes by one); cold: file pages evicted before reading (from disk); hot: page cache")
    head = (f"{'data':<26} {'store':<16} {'B/img':>9} {'ratio':>6} {'write MB/s':>10} {'1 thread':>8} {'read MB/s':>9} "
            f"{'cold img/s':>10} {'cat cold':>9} {'cold r/c':>8} {'hot img/s':>9} {'cat hot':>8} {'hot r/c':>7}")
    print(head)
    for r in rows:
        print(f"{r['data']:<26} {r['store']:<16} {r['bytes_per_image']:>9.0f} {r['ratio']:>6.2f} {r['write_MBps']:>10.0f} {r.get('write1_MBps', float('nan')):>8.0f} "
              f"{r['read_MBps']:>9.0f} {r['cold_read_img_s']:>10.0f} {r['cold_cat_img_s']:>9.0f} {r['cold_read_vs_cat']:>8.2f} "
              f"{r['read_img_s']:>9.0f} {r['cat_img_s']:>8.0f} {r['read_vs_cat']:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
