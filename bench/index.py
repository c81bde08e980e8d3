"""Opening a feature store at corpus scale: time and memory against the number of records.

    python -m bench.index                              # 10k, 100k and 1M records (~5 minutes)
    python -m bench.index --sizes 10000,100000 --backend wds

Writes one store per size (tiny 2x2x8 grids, COCO-like metadata: 5 captions of 10 words, a key,
an image id and a file name per record; 4,096 records per shard), then, each in a fresh process:
**open** (`open_store` and `len`, best of 20), **first record** (one record's metadata by index:
its shard's JSON read) and, as the baseline in the same
process, **all metadata** (a pass that reads every record's metadata and keeps it, as opening a
store did before the index was read shard by shard); then the vocabulary's word counts over
every caption, in the process and in one process per core (`caption.vocab.count_store_words`). Prints seconds and peak RSS growth (MiB)
over the process before opening (its modules loaded), per size, and the ratios across sizes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shards import write_records

WORDS = "a red circle and blue square on the left of green triangle with yellow diamond small big".split()

PROBE = r"""
import gc, json, sys, time
from shards import open_store
def rss():  # resident set size now, MiB (Linux)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
gc.collect()
base = rss()
opened = first = float("inf")
for _ in range(20):  # best of 20: the open alone, then the first record's metadata (one shard's JSON read)
    t = time.perf_counter()
    store = open_store(sys.argv[1])
    n = len(store)
    t1 = time.perf_counter()
    mid = store.records[n // 2]["key"]
    opened, first = min(opened, t1 - t), min(first, time.perf_counter() - t1)
opened_rss = rss() - base
t = time.perf_counter()
held = list(store.records)  # every record's metadata in memory: what opening cost before
every, every_rss = time.perf_counter() - t, rss() - base
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM"))
del held
gc.collect()
from caption.vocab import count_store_words
from common.machine import cores
cores = cores()
t = time.perf_counter()
one = count_store_words([store], workers=1)  # the vocabulary's counts, in this process
words_1 = time.perf_counter() - t
t = time.perf_counter()
assert count_store_words([store], workers=cores) == one  # the same, in one process per core
words_n = time.perf_counter() - t
print(json.dumps({"records": n, "open_s": opened, "first_s": first, "open_mib": opened_rss, "all_s": every, "all_mib": every_rss,
                  "base_mib": base, "peak_mib": peak, "words_1_s": words_1, "words_n_s": words_n, "cores": cores}))
"""


def records(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    grid = np.zeros((2, 2, 8), np.float16)
    for i in range(n):
        words = rng.integers(0, len(WORDS), (5, 10))
        yield {"key": f"{i:09d}", "image_id": i, "filename": f"{i // 10000:05d}.tar#{i:09d}",
               "captions": [[WORDS[w] for w in row] for row in words], "features": grid}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--backend", default="zarr", choices=("zarr", "wds"))
    p.add_argument("--shard_size", type=int, default=4096)
    p.add_argument("--dir", default="", help="where the stores go (default: a temporary folder, removed after)")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=a.dir or None) as tmp:
        rows = []
        for n in sizes:
            root = Path(tmp) / f"s{n}"
            t = time.perf_counter()
            write_records(root, records(n), backend=a.backend, num_records=n, grid=2, channels=8,
                          shard_size=a.shard_size, codec="none")
            write_s = time.perf_counter() - t
            out = subprocess.run([sys.executable, "-c", PROBE, str(root)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            r["write_s"] = write_s
            r["shards"] = -(-n // a.shard_size)
            r["json_mb"] = sum(f.stat().st_size for f in (root / "shards").glob("*.json")) / 1e6
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{a.backend}, {a.shard_size} records per shard; RSS growth over the process before opening "
          f"(modules loaded: {rows[0]['base_mib']:.0f} MiB)\n")
    print("| records | shards | shard JSON MB | open s | first record s | open + first record: RSS growth MiB | "
          f"all metadata s | all metadata: RSS growth MiB | vocabulary counts s: 1 process, {rows[0]['cores']} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['records']:,} | {r['shards']:,} | {r['json_mb']:.0f} | {r['open_s']:.4f} | {r['first_s']:.3f} | "
              f"{r['open_mib']:.1f} | {r['all_s']:.1f} | {r['all_mib']:.0f} | {r['words_1_s']:.1f}, {r['words_n_s']:.1f} "
              f"({r['words_1_s'] / r['words_n_s']:.2f}x) |")
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        print(f"\n{hi['records'] // lo['records']}x the records: open time x{hi['open_s'] / lo['open_s']:.2f}, open memory "
              f"{lo['open_mib']:.1f} -> {hi['open_mib']:.1f} MiB; all metadata x{hi['all_s'] / lo['all_s']:.1f} time, "
              f"{lo['all_mib']:.0f} -> {hi['all_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
