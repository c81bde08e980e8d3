"""The bookkeeping of a features folder: plan, per-shard metadata, manifest.

A features folder (one split) holds:

    plan.json              what is being written: backend, record count, shard size, grid, C,
                           and `info` (backbone, weights, input size, ...); fixed at the start
    shards/NNNNNN.json     one per finished shard, written last and atomically: the shard's
                           records' metadata (row, key, image_id, filename, captions), the
                           images of the shard that could not be read (filename, reason), its
                           file's size and sha256. Its presence is what "shard done" means.
    manifest.json          written once every shard is done: the plan, the shard list with
                           checksums, counts, bytes on disk, failures, creation time

A killed writer leaves data files without a shard JSON (redone on restart) and no
manifest.json (so nobody mistakes the folder for complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Iterable

PLAN, MANIFEST = "plan.json", "manifest.json"


class StoreError(ValueError):
    """A features folder that cannot be used; the message names the file and the problem."""


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = None) -> None:
    """Write JSON to a temporary name, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_parts(path: str | os.PathLike, parts: Iterable) -> tuple[int, str]:
    """Write a file from its pieces (bytes or buffer views, written as they are, never joined)
    under a temporary name, fsync, rename; returns (bytes, sha256 hex) of what was written.
    A killed writer leaves only a temporary file; a crash after the rename leaves the whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    h, size = hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        for part in parts:
            f.write(part)
            h.update(part)
            size += memoryview(part).nbytes
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return size, h.hexdigest()


def read_json(path: str | os.PathLike, what: str, error: type[Exception] = StoreError):
    """A JSON file's content, or `error` with one line naming the file: missing, or malformed where."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({what}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({what}): {e}") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_meta_path(root: Path, k: int) -> Path:
    return Path(root) / "shards" / f"{k:06d}.json"


def done_shards(root: Path) -> set[int]:
    d = Path(root) / "shards"
    if not d.is_dir():
        return set()
    return {int(p.stem) for p in d.glob("*.json") if p.stem.isdigit()}


def make_plan(backend: str, num_records: int, shard_size: int, grid: int, channels: int, info: dict,
              codec: str = "") -> dict:
    """What a writer is about to write; restarts must find the same plan."""
    if num_records <= 0 or shard_size <= 0:
        raise StoreError("a store needs at least one record and a positive shard size")
    return {"backend": backend, "num_records": int(num_records), "shard_size": int(shard_size),
            "num_shards": -(-int(num_records) // int(shard_size)), "grid": int(grid), "channels": int(channels),
            "dtype": "float16", "codec": codec, "info": info}


def ensure_plan(root: Path, plan: dict) -> dict:
    """Write the plan, or check that an existing one (a restart) is the same."""
    path = Path(root) / PLAN
    if path.exists():
        old = read_json(path, "plan")
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise StoreError(f"{path}: the folder holds a different run (differs in {', '.join(diff)}); "
                             "delete it or write elsewhere")
        return old
    atomic_write_json(path, plan)
    return plan


def shard_range(plan: dict, k: int) -> range:
    """Record rows of shard k."""
    s = plan["shard_size"]
    return range(k * s, min((k + 1) * s, plan["num_records"]))


def check_rows(root: Path, plan: dict, k: int, rows: Iterable[int]) -> range:
    """Shard k's row range; a StoreError when a row given for it lies outside."""
    span = shard_range(plan, k)
    for row in rows:
        if row not in span:
            raise StoreError(f"{root}: row {row} is not in shard {k} ({span.start}..{span.stop - 1})")
    return span


def finalize(root: Path, split: str = "") -> dict:
    """Merge every shard's JSON and every writer's failures into manifest.json (all shards must be done)."""
    root = Path(root)
    plan = read_json(root / PLAN, "plan (not a features folder?)")
    missing = sorted(set(range(plan["num_shards"])) - done_shards(root))
    if missing:
        raise StoreError(f"{root}: {len(missing)} of {plan['num_shards']} shards unfinished (first: {missing[0]}); rerun the writer")
    shards, failures, count = [], [], 0
    for k in range(plan["num_shards"]):
        m = read_json(shard_meta_path(root, k), "shard metadata")
        shards.append({"index": k, "file": m["file"], "count": len(m["records"]), "bytes": m["bytes"], "sha256": m["sha256"]})
        count += len(m["records"])
        failures += m.get("failures", [])
    data_bytes = sum(s["bytes"] for s in shards)
    manifest = {
        "backend": plan["backend"], "split": split or plan["info"].get("split", ""), "count": count,
        "num_shards": plan["num_shards"], "shard_size": plan["shard_size"],
        "grid": plan["grid"], "channels": plan["channels"], "dtype": plan["dtype"], "codec": plan["codec"],
        "bytes_on_disk": data_bytes, "bytes_per_image": data_bytes / max(count, 1),
        "raw_bytes_per_image": plan["grid"] ** 2 * plan["channels"] * 2,
        **{k: v for k, v in plan["info"].items() if k not in ("split",)},
        "failures": failures, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shards": shards,
    }
    atomic_write_json(root / MANIFEST, manifest)
    for tmp in root.rglob(".*.tmp"):  # what writers killed mid-file left behind; every shard is done now
        tmp.unlink(missing_ok=True)
    return manifest


def load_manifest(root: Path) -> dict:
    """The manifest of a complete features folder, or a one-line error saying what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: no such features folder")
    path = root / MANIFEST
    if not path.exists():
        hint = " (a writer has not finished: rerun it to resume)" if (root / PLAN).exists() else " (not a features folder?)"
        raise StoreError(f"{path}: no manifest{hint}")
    m = read_json(path, "manifest")
    for k in ("backend", "count", "grid", "channels", "shards"):
        if k not in m:
            raise StoreError(f"{path}: manifest lacks {k!r}")
    return m
