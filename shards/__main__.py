"""Feature store tools.

    python -m shards verify features/train          # every checksum and record; exit 1 on any problem
    python -m shards stats features/train           # count, bytes per image, compression, zero fraction
    python -m shards convert features/train features_wds/train --format wds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.cli import command
from common.files import sha256_file
from shards import open_store, write_records
from shards.manifest import IDENTITY, PLAN, StoreError, done_shards, load_manifest, read_json


def repeated_keys(store) -> list[tuple[str, int]]:
    """(key, shard) of every record whose key an earlier record of the store has. Held: 8 bytes
    per record (each key's hash; 240 MB at 30M records, where a set of the keys took ~3 GB), then
    the keys of the repeated hashes only, found in a second pass (a hash shared by two keys is not
    a repeat)."""
    n = len(store.paths)  # shards
    hashes = np.concatenate([np.fromiter((hash(r["key"]) for r in store.records.shard(k)), np.int64)
                             for k in range(n)] or [np.zeros(0, np.int64)])
    hashes.sort()
    twice = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    out, seen = [], set()
    for k in range(n if twice else 0):
        for r in store.records.shard(k):
            if hash(r["key"]) in twice:
                if r["key"] in seen:
                    out.append((r["key"], k))
                seen.add(r["key"])
    return out


def verify(root: str | Path, progress: bool = True) -> list[str]:
    """Problems found in a features folder (empty: it is complete and intact)."""
    root = Path(root)
    try:
        manifest = load_manifest(root)
    except StoreError as e:
        problems = [str(e)]
        if (root / PLAN).exists():
            plan = read_json(root / PLAN, "plan")
            problems.append(f"{root}: {len(done_shards(root))} of {plan['num_shards']} shards finished")
        return problems
    problems = []
    try:
        store = open_store(root)
    except StoreError as e:
        return [str(e)]
    for s, path in store.shard_files():
        if s["bytes"] == 0 and not path.exists():
            continue  # a shard whose every image failed writes no zarr file
        if not path.exists():
            problems.append(f"{path}: missing shard file")
        elif path.stat().st_size != s["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {s['bytes']}")
        elif sha256_file(path) != s["sha256"]:
            problems.append(f"{path}: checksum mismatch (the file changed after it was written)")
    if problems:
        return problems
    try:  # every shard's JSON (read shard by shard when the store is used), and each key once in the store
        problems += [f"{root}: key {key} appears twice (shard {k})" for key, k in repeated_keys(store)]
    except StoreError as e:
        problems.append(str(e))
    if problems:
        return problems
    n = 0
    try:
        for rec in tqdm(store.iter_records(), total=len(store), desc="verify", unit="rec", disable=not progress):
            n += 1
    except StoreError as e:
        problems.append(str(e))
    if not problems and n != manifest["count"]:
        problems.append(f"{root}: {n} records read, manifest says {manifest['count']}")
    return problems


def stats(root: str | Path, sample: int = 256) -> dict:
    store = open_store(root)
    m = store.manifest
    zeros = total = 0
    for i, rec in enumerate(store.iter_records()):
        if i >= sample:
            break
        zeros += int((rec["features"] == 0).sum())
        total += rec["features"].size
    raw = m["raw_bytes_per_image"]
    return {"count": m["count"], "backend": m["backend"], "codec": m.get("codec", ""),
            "grid": m["grid"], "channels": m["channels"], "bytes_on_disk": m["bytes_on_disk"],
            "bytes_per_image": m["bytes_per_image"], "raw_bytes_per_image": raw,
            "compression_ratio": raw / max(m["bytes_per_image"], 1e-9), "zero_fraction": zeros / max(total, 1),
            "failures": len(m.get("failures", []))}


def convert(src: str | Path, dst: str | Path, backend: str, shard_size: int = 0, codec: str = "blosc-zstd") -> dict:
    """Copy every record into a store of another backend, losslessly."""
    store = open_store(src)
    m = store.manifest
    keep = ("input_json", "images_root", "split", "bn_calibration", "backbone_file", "feature_source", "limit")
    info = {k: m[k] for k in (*IDENTITY, *keep) if k in m and k not in ("grid", "channels")}
    info["converted_from"] = str(src)
    return write_records(dst, tqdm(store.iter_records(), total=len(store), desc="convert", unit="rec"),
                         backend=backend, num_records=len(store), grid=m["grid"], channels=m["channels"],
                         shard_size=shard_size or m["shard_size"], info=info, codec=codec, split=m.get("split", ""))


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards", description="Feature store tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check every record and checksum")
    v.add_argument("dir")
    s = sub.add_parser("stats", help="count, bytes per image, compression ratio, zero fraction")
    s.add_argument("dir")
    c = sub.add_parser("convert", help="copy a store into the other backend")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--format", required=True, choices=["zarr", "wds"])
    c.add_argument("--shard_size", type=int, default=0, help="records per shard (default: the source's)")
    c.add_argument("--codec", default="blosc-zstd", help="zarr codec: blosc-zstd, zstd, lz4 or none")
    a = p.parse_args(argv)
    if a.cmd == "convert" and a.shard_size < 0:
        raise StoreError(f"--shard_size: must be at least 0 (0: the source's), got {a.shard_size}")
    if a.cmd == "verify":
        problems = verify(a.dir)
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        if problems:
            return 1
        m = load_manifest(Path(a.dir))
        print(f"{a.dir}: OK, {m['count']} records in {m['num_shards']} shards, {len(m['failures'])} failed images listed")
        return 0
    if a.cmd == "stats":
        for k, val in stats(a.dir).items():
            print(f"{k:>20}: {val:.4g}" if isinstance(val, float) else f"{k:>20}: {val}")
        return 0
    m = convert(a.src, a.dst, a.format, a.shard_size, a.codec)
    print(f"{a.dst}: {m['count']} records, {m['bytes_per_image']:.0f} bytes per image ({a.format})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
