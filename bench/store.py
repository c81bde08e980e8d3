"""Feature store benchmark: bytes per image, compression, write and read speed, against `cat`.

    python -m bench.store [--num 256] [--channels 2048] [--zeros 0.37,0.6] [--features DIR]

Writes N ReLU-like float16 grids (a set fraction of exact zeros, the rest the positive
part of a normal) with each backend and zarr codec, reads them back sequentially, and
reads the same files with `cat` (hot page cache: the physical limit here). `--features`
also measures a real features folder (e.g. the demo's). Prints one table; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from shards import open_store, write_records
from shards.__main__ import convert


def relu_grids(n: int, channels: int, zero_fraction: float, seed: int = 0):
    """Grids whose zero fraction is `zero_fraction`: max(0, N(mu, 1)) with P(x <= 0) = zero_fraction."""
    mu = -statistics.NormalDist().inv_cdf(zero_fraction)
    rng = np.random.default_rng(seed)
    for i in range(n):
        x = np.maximum(rng.standard_normal((14, 14, channels), dtype=np.float32) + mu, 0).astype(np.float16)
        yield {"key": f"img_{i:06d}", "image_id": i, "filename": f"{i}.jpg", "features": x, "captions": [["a", "b"]]}


def cat_seconds(files: list[Path]) -> float:
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def measure(root: Path, n: int, raw_bytes: int, write_s: float | None) -> dict:
    store = open_store(root)
    files = [p for _, p in store.shard_files() if p.exists()]
    list(store.iter_records())  # warm
    t = time.perf_counter()
    count = sum(1 for _ in store.iter_records())
    read_s = time.perf_counter() - t
    assert count == n
    disk = sum(p.stat().st_size for p in files)
    cat_s = cat_seconds(files)
    return {"bytes_per_image": disk / n, "ratio": raw_bytes / disk,
            "write_MBps": raw_bytes / write_s / 1e6 if write_s else float("nan"),
            "read_MBps": raw_bytes / read_s / 1e6, "read_img_s": n / read_s, "cat_img_s": n / cat_s,
            "read_vs_cat": (n / read_s) / (n / cat_s)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--zeros", default="0.37,0.6", help="zero fractions to try (random-init ResNets ~0.37)")
    p.add_argument("--features", default=None, help="also measure this real features folder (one split)")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for z in map(float, a.zeros.split(",")):
            raw = a.num * 14 * 14 * a.channels * 2
            for backend, codec in (("zarr", "zstd"), ("zarr", "blosc-zstd"), ("zarr", "lz4"), ("zarr", "none"), ("wds", "")):
                root = Path(tmp) / f"{backend}-{codec}-{z}"
                t = time.perf_counter()
                write_records(root, relu_grids(a.num, a.channels, z), backend=backend, num_records=a.num, grid=14,
                              channels=a.channels, shard_size=64, codec=codec or "zstd")
                w = time.perf_counter() - t
                rows.append({"data": f"relu zeros={z:.2f}", "store": f"{backend} {codec}".strip(), **measure(root, a.num, raw, w)})
        if a.features:
            src = open_store(a.features)
            n, m = len(src), src.manifest
            raw = n * m["raw_bytes_per_image"]
            rows.append({"data": f"{a.features} (C={m['channels']})", "store": f"{m['backend']} {m.get('codec', '')}".strip(),
                         **measure(Path(a.features), n, raw, None)})
            for backend in ("wds",) if m["backend"] == "zarr" else ("zarr",):
                dst = Path(tmp) / "real-convert"
                t = time.perf_counter()
                convert(a.features, dst, backend)
                rows.append({"data": f"{a.features} (C={m['channels']})", "store": backend, **measure(dst, n, raw, time.perf_counter() - t)})
    head = f"{'data':<26} {'store':<16} {'B/img':>9} {'ratio':>6} {'write MB/s':>10} {'read MB/s':>9} {'read img/s':>10} {'cat img/s':>9} {'read/cat':>8}"
    print(head)
    for r in rows:
        print(f"{r['data']:<26} {r['store']:<16} {r['bytes_per_image']:>9.0f} {r['ratio']:>6.2f} {r['write_MBps']:>10.0f} "
              f"{r['read_MBps']:>9.0f} {r['read_img_s']:>10.0f} {r['cat_img_s']:>9.0f} {r['read_vs_cat']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
