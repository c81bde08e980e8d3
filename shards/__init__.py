"""The feature store both stages share: one record format, two backends (Zarr, WebDataset).

    writer = create_writer("features/train", plan)   # plan from shards.manifest.make_plan
    writer.write_shard(k, [(row, record), ...])      # whole shards, atomically
    finalize("features/train")                        # manifest.json once every shard is done
    store = open_store("features/train")              # ZarrReader or WdsReader by the manifest
    store = open_store("http://host/features/train")  # a wds store streamed from a URL
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from common.machine import cores_per_process
from shards.format import Record, RecordError, validate
from shards import manifest as _manifest
from shards.manifest import StoreError, WriterLock, done_shards, make_plan, merge_shards, shard_range, write_manifest
from shards.remote import TIMEOUT, is_url, local_path
from shards.remote_store import RemoteWdsReader, remote_manifest
from shards.wds import WdsReader, WdsWriter
from shards.zarr_store import ZarrReader, ZarrWriter, write_row_index


def create_writer(root: str | Path, plan: dict):
    """A ZarrWriter or WdsWriter for `plan["backend"]`."""
    if plan["backend"] == "zarr":
        return ZarrWriter(root, plan)
    if plan["backend"] == "wds":
        return WdsWriter(root, plan)
    raise StoreError(f"unknown backend {plan['backend']!r}: zarr or wds")


def location(root: str | Path) -> str | Path:
    """A store's location: a folder (a path or `file:` URL) as a Path, an http(s) URL as it is."""
    if is_url(str(root)) and not str(root).startswith("file:"):
        return str(root)
    return Path(local_path(str(root)))


def load_manifest(root: str | Path) -> dict:
    """The manifest of a finished store, in a folder or at an http(s) URL."""
    root = location(root)
    return remote_manifest(root) if isinstance(root, str) else _manifest.load_manifest(root)


def open_store(root: str | Path, timeout: float = TIMEOUT):
    """The reader of a finished store, chosen by its manifest: a folder's (zarr or wds), or a wds
    store's at an http(s) URL (`RemoteWdsReader`: the shards streamed, `timeout` seconds per
    connect and read, `data.url_timeout`)."""
    root = location(root)
    if isinstance(root, str):
        return RemoteWdsReader(root, timeout=timeout)
    manifest = load_manifest(root)
    if manifest["backend"] == "zarr":
        return ZarrReader(root, manifest)
    if manifest["backend"] == "wds":
        return WdsReader(root, manifest, timeout)
    raise StoreError(f"{Path(root) / 'manifest.json'}: unknown backend {manifest['backend']!r}")


def finalize(root: str | Path, split: str = "") -> dict:
    """manifest.json once every shard is done (shards.manifest.merge_shards says what it holds);
    a zarr store first becomes a zarr group that zarr-python alone can read (the grids, each
    row's key, image id, file name and captions, the filled rows)."""
    manifest, records = merge_shards(Path(root), split)
    if manifest["backend"] == "zarr":
        write_row_index(Path(root), records, manifest["num_rows"])
    return write_manifest(Path(root), manifest)


def writer_threads(n: int = 0) -> int:
    """Threads that encode and write shard files: n, or when n is 0 one per CPU core this process
    may run on (its affinity mask), the cores shared among the processes a launcher started on
    this machine (LOCAL_WORLD_SIZE, e.g. one per GPU), at most 16. Encoding (numpy, blosc, zstd,
    crc32c), hashing and file writes release the GIL."""
    return n or min(16, cores_per_process())


def write_records(root: str | Path, records: Iterable[Record], *, backend: str, num_records: int, grid: int,
                  channels: int, shard_size: int, info: dict | None = None, codec: str = "blosc-zstd",
                  rank: int = 0, world_size: int = 1, split: str = "", threads: int = 0) -> dict | None:
    """Write records (in row order) into a store, skipping shards already done; returns the manifest.

    Complete shards are validated, encoded and written by `threads` threads (0: the default of
    `writer_threads`) while the next shard's records come in; at most ~2 GB of records wait.
    With world_size > 1 this process writes only shards k with k % world_size == rank and
    does not finalize (the caller finalizes once every writer is done).
    """
    plan = make_plan(backend, num_records, shard_size, grid, channels, info or {}, codec if backend == "zarr" else "")
    with WriterLock(root, rank):  # another command writing this folder as this rank: a message, not a race
        return _write_locked(root, records, plan, rank, world_size, split, threads)


def _write_locked(root, records, plan: dict, rank: int, world_size: int, split: str, threads: int) -> dict | None:
    shard_size, grid, channels = plan["shard_size"], plan["grid"], plan["channels"]
    writer = create_writer(root, plan)
    done = done_shards(Path(root))
    threads = writer_threads(threads)
    waiting = max(1, min(threads, (2 << 30) // max(1, shard_size * grid * grid * channels * 2)))  # shards in flight
    pending: list = []
    k = 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        inflight: list = []
        for row, rec in enumerate(records):
            k = row // shard_size
            if k % world_size != rank or k in done:
                continue
            pending.append((row, rec))
            if row == shard_range(plan, k).stop - 1:
                inflight.append(pool.submit(writer.write_shard, k, pending))
                pending = []
                while len(inflight) > waiting or (inflight and inflight[0].done()):
                    inflight.pop(0).result()  # back-pressure, and a writer's error surfaces now
        if pending:
            inflight.append(pool.submit(writer.write_shard, k, pending))
        for f in inflight:
            f.result()
    return finalize(Path(root), split) if world_size == 1 else None


__all__ = ["Record", "RecordError", "StoreError", "create_writer", "done_shards", "finalize",
           "load_manifest", "location", "make_plan", "open_store", "shard_range", "validate", "write_records", "writer_threads"]
