"""Zarr v3 backend: one (N, g, g, C) float16 array, one image per chunk, many chunks per shard file.

    features/<split>/features.zarr   chunks (1, g, g, C), shards (S, g, g, C), zstd + crc32c per chunk
    features/<split>/shards/*.json   rows, keys, ids, filenames, captions of each finished shard,
                                     and each record's checksum (`chunk_crc32c`: the CRC-32C its
                                     chunk carries; `crc32c` of the grid where zarr encodes)

Each writer writes whole shards (two writers in one shard file lose data: zarr's sharding
codec does read-modify-write), so many processes can fill one array. Random access by
row serves a map-style Dataset; `iter_records` reads a shard file at a time.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from common.files import atomic_write_json, atomic_write_parts, sha256_file
import shards.format as fmt
from shards.manifest import (IndexedStore, StoreError, check_rows, ensure_plan, row_runs, shard_meta_path,
                             shard_range)

ARRAY = "features.zarr"


def compressors(codec: str) -> list:
    """Lossless codecs by name; crc32c after compression catches a corrupted byte at read time."""
    if codec == "zstd":  # plain zstd level 1
        base = [ZstdCodec(level=1)]
    elif codec == "blosc-zstd":  # byte shuffle + zstd-1 in 256 KiB blocks: the best ratio and speed (bench/RESULTS.md)
        base = [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2, blocksize=BLOSC_BLOCK)]
    elif codec == "lz4":
        base = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2)]
    elif codec == "none":
        base = []
    else:
        raise StoreError(f"unknown zarr codec {codec!r}: blosc-zstd, zstd, lz4 or none")
    return base + [Crc32cCodec()]


# ---- shard files encoded and decoded directly ---------------------------------------------
# zarr-python moves sharded chunks through its event loop one at a time (several times slower
# than the disk, bench/RESULTS.md "Feature store"). For the codecs we write (blosc-zstd, zstd or
# none, then crc32c), shard files are encoded and decoded here, byte for byte in the layout of
# zarr's `sharding_indexed` codec: the encoded chunks, then an index of (offset, nbytes)
# little-endian uint64 pairs with its own crc32c, at the end; 2**64-1 marks an absent chunk.
# zarr reads these files and we read zarr's (tests/test_shards.py checks both ways). Chunks
# decode straight into the output array, several at a time in threads (blosc releases the GIL).
DIRECT_CODECS = ("blosc-zstd", "zstd", "none")
BLOSC_BLOCK = 1 << 18  # 256 KiB: a 14x14x2048 grid in ~3 blocks; smaller blocks compress worse
_ABSENT = 2**64 - 1


@functools.lru_cache(maxsize=None)
def _codec(codec: str):
    """The numcodecs codec of a direct codec name (None: no codec); built once, shared by threads."""
    if codec == "blosc-zstd":
        return numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=BLOSC_BLOCK)
    return numcodecs.Zstd(level=1) if codec == "zstd" else None


def _crc(data: bytes | memoryview) -> bytes:
    """CRC-32C, as zarr's Crc32cCodec. The `crc32c` package releases the GIL on buffers from 32 KiB
    (google_crc32c, which zarr uses, holds it, serializing reader and writer threads: bench/RESULTS.md)."""
    return struct.pack("<I", crc32c.crc32c(data))


def shard_parts(block: np.ndarray, shard_size: int, codec: str, crcs: list | None = None) -> list:
    """A shard file's bytes for `block` (n <= shard_size images, (n, g, g, C) float16), as the
    list of pieces to write one after the other: with no codec the chunks are views of `block`
    itself, so a shard is written without copying its grids. `crcs` receives each chunk's CRC-32C
    (an int), which the shard's JSON lists so that a chunk is bound to its record."""
    comp = _codec(codec)
    parts, offset = [], 0
    index = np.full((shard_size, 2), _ABSENT, dtype="<u8")  # (S, 2): offset, nbytes of each chunk
    for i, x in enumerate(block):
        x = np.ascontiguousarray(x, dtype="<f2")  # blosc shuffles by the item size: 2
        enc = comp.encode(x) if comp else memoryview(x).cast("B")
        crc = _crc(enc)
        if crcs is not None:
            crcs.append(struct.unpack("<I", crc)[0])
        index[i] = (offset, len(enc) + 4)
        offset += len(enc) + 4
        parts += [enc, crc]
    idx = index.tobytes()
    return parts + [idx, _crc(idx)]


def _index(data: bytes | memoryview, shard_size: int, where: str) -> np.ndarray:
    tail = data[-(shard_size * 16 + 4):]
    if len(tail) != shard_size * 16 + 4 or _crc(tail[:-4]) != bytes(tail[-4:]):
        raise StoreError(f"{where}: corrupted data (shard index fails its crc32c)")
    return np.frombuffer(tail[:-4], dtype="<u8").reshape(shard_size, 2)


def _chunk_into(enc: memoryview, codec: str, out: np.ndarray, where: str, expect: int | None = None) -> None:
    """Decode one encoded chunk (a view into the shard's bytes) into `out` ((g, g, C) float16,
    contiguous). `expect`: the CRC-32C the shard's JSON lists for the record read here (None: a
    store written before it was listed): a chunk that carries another is another record's."""
    payload, stored = enc[:-4], bytes(enc[-4:])
    if len(enc) < 4 or _crc(payload) != stored:
        raise StoreError(f"{where}: corrupted data (chunk fails its crc32c)")
    if expect is not None and struct.unpack("<I", stored)[0] != expect:
        raise StoreError(f"{where}: holds another record's grid (its chunk's crc32c is not the one the shard's JSON "
                         "lists: a shard file swapped, or copied from another store); verify the store "
                         "(python -m shards verify) and featurize it again")
    comp = _codec(codec)
    try:
        if comp is None:
            if len(payload) != out.nbytes:
                raise ValueError(f"{len(payload)} bytes for {out.nbytes}")
            out.view(np.uint8).reshape(-1)[:] = np.frombuffer(payload, dtype=np.uint8)
        else:
            comp.decode(payload, out=out)
    except (RuntimeError, ValueError, TypeError) as e:  # the crc passed: a chunk of the wrong size or codec
        raise StoreError(f"{where}: undecodable chunk ({type(e).__name__}: {e})") from None


def _shard_decoder(data: bytes | mmap.mmap, n: int, shard_size: int, codec: str, shape: tuple, where: str,
                   expect: dict | None = None):
    """A new (n, g, g, C) float16 array and `one(i)`, which decodes chunk i into it and says
    whether its values are all finite. Absent chunks read as zeros (the fill value). `expect`:
    chunk -> the CRC-32C its record lists."""
    expect = expect or {}
    index = _index(data, shard_size, where)
    view = memoryview(data)
    out = np.empty((n, *shape), dtype=np.float16)

    def one(i: int) -> bool:
        off, nb = (int(v) for v in index[i])
        if off == _ABSENT:
            out[i] = 0
            return True
        _chunk_into(view[off:off + nb], codec, out[i], f"{where}: chunk {i}", expect.get(i))
        return fmt.finite(out[i])

    return out, one


def submit_shard(pool: ThreadPoolExecutor, data: bytes | mmap.mmap, n: int, shard_size: int, codec: str,
                 shape: tuple, where: str, expect: dict | None = None) -> tuple[np.ndarray, list[Future]]:
    """Start decoding a shard file's bytes in `pool`: the array, and per chunk a future of its finiteness."""
    out, one = _shard_decoder(data, n, shard_size, codec, shape, where, expect)
    return out, [pool.submit(one, i) for i in range(n)]


def decode_shard(data: bytes | mmap.mmap, n: int, shard_size: int, codec: str, shape: tuple, where: str) -> np.ndarray:
    """(n, g, g, C) float16 from a shard file's bytes, here and now; NaN/inf raise."""
    out, one = _shard_decoder(data, n, shard_size, codec, shape, where)
    for i in range(n):
        if not one(i):
            raise StoreError(f"{where}: chunk {i} holds NaN or inf")
    return out


class ZarrWriter:
    """Writes whole shards of a planned store; `plan` comes from `shards.manifest.make_plan`."""

    def __init__(self, root: str | Path, plan: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.plan = ensure_plan(self.root, plan)
        g, c, s = plan["grid"], plan["channels"], plan["shard_size"]
        path = self.root / ARRAY
        missing = (FileNotFoundError, getattr(zarr.errors, "ArrayNotFoundError", FileNotFoundError))
        for _ in range(50):
            try:
                self.array = zarr.open_array(path, mode="r+")
                break
            except missing:
                pass
            except ValueError:  # metadata half written by another writer
                time.sleep(0.1)
                continue
            try:
                self.array = zarr.create_array(
                    path, shape=(plan["num_records"], g, g, c), chunks=(1, g, g, c), shards=(s, g, g, c),
                    dtype="float16", compressors=compressors(plan["codec"]), fill_value=0, overwrite=False)
                break
            except getattr(zarr.errors, "ContainsArrayError", FileExistsError):
                time.sleep(0.1)  # another writer created it a moment ago: open that one
        else:
            raise StoreError(f"{path}: cannot open or create the zarr array")

    def shard_file(self, k: int) -> Path:
        return self.root / ARRAY / self.array.metadata.encode_chunk_key((k, 0, 0, 0))

    def write_shard(self, k: int, items: list[tuple[int, fmt.Record]], failures: list[dict] = ()) -> None:
        """Write shard k; items are (row, record) with rows inside the shard's range."""
        rows = check_rows(self.root, self.plan, k, [row for row, _ in items])
        g, c = self.plan["grid"], self.plan["channels"]
        block = np.zeros((len(rows), g, g, c), dtype=fmt.DTYPE)  # (S, g, g, C); failed images stay 0
        for row, rec in items:
            fmt.validate(rec, g, c, where=str(self.root))  # before the copy: a wrong shape names the key
            block[row - rows.start] = rec["features"]
        self._write(k, block, [{"row": row, **fmt.meta(rec)} for row, rec in items], failures)

    def write_block(self, k: int, block: np.ndarray, metas: list[dict], failures: list[dict] = ()) -> None:
        """Write shard k from `block` ((n, g, g, C) float16, the shard's rows in order; rows of
        images that failed hold zeros) and `metas` ({"row", "key", "image_id", "filename",
        "captions"} of each row that holds an image). No grid is copied: featurize hands over
        the buffer the model's output was copied into."""
        rows = check_rows(self.root, self.plan, k, [m["row"] for m in metas])
        g, c = self.plan["grid"], self.plan["channels"]
        if block.shape != (len(rows), g, g, c) or block.dtype != fmt.DTYPE:
            raise StoreError(f"{self.root}: shard {k} block is {block.dtype} {block.shape}, expected float16 {(len(rows), g, g, c)}")
        for m in metas:
            fmt.validate({**m, "features": block[m["row"] - rows.start]}, g, c, where=str(self.root))
        self._write(k, block, [{"row": m["row"], **fmt.meta(m)} for m in metas], failures)

    def _write(self, k: int, block: np.ndarray, metas: list[dict], failures) -> None:
        f = self.shard_file(k)
        rows = shard_range(self.plan, k)
        if self.plan["codec"] in DIRECT_CODECS:
            crcs: list[int] = []
            size, digest = atomic_write_parts(f, shard_parts(block, self.plan["shard_size"], self.plan["codec"], crcs))
            metas = [{**m, "chunk_crc32c": crcs[m["row"] - rows.start]} for m in metas]  # each chunk bound to its record
        else:
            metas = [{**m, "crc32c": fmt.checksum(block[m["row"] - rows.start])} for m in metas]
            self.array[rows.start:rows.stop] = block  # one shard file, written whole by zarr
            size, digest = (f.stat().st_size, sha256_file(f)) if f.exists() else (0, "")
        atomic_write_json(shard_meta_path(self.root, k), {
            "file": str(f.relative_to(self.root)), "bytes": size, "sha256": digest, "records": metas,
            "failures": list(failures)})


FILLED_ROWS = "filled_rows"  # features.zarr attribute: [[start, stop), ...] rows that hold an image
ROW_ARRAYS = ("key", "image_id", "filename", "captions")  # beside features.zarr in the split's group
INDEX_CHUNK = 1 << 16  # rows per chunk of the row arrays


def write_row_index(root: str | Path, records: list[dict], num_rows: int) -> None:
    """Make the split folder a zarr group that zarr-python reads without this project:

        g = zarr.open_group("features/train", mode="r")                 # zarr >= 3
        grids = g["features.zarr"]                                      # (N, g, g, C) float16
        keys, ids, captions = g["key"][:], g["image_id"][:], g["captions"][:]  # (N,) str, int64, str
        rows = [r for a, b in grids.attrs["filled_rows"] for r in range(a, b)]
        grids[rows[0]], keys[rows[0]], json.loads(captions[rows[0]])    # one image's grid, key, captions

    Rows that hold no image (it failed to decode) have key "", image_id -1 and zero grids. The
    shard JSONs stay the project's own index (checked on every open); these arrays are written
    from them when the store is finished. `records` are the filled rows' {"row", "key",
    "image_id", "filename", "captions"}."""
    import json
    root = Path(root)
    array = zarr.open_array(root / ARRAY, mode="r+")
    rows = sorted(r["row"] for r in records)
    array.attrs.update({FILLED_ROWS: row_runs(rows),
                        "filled_rows_about": "[start, stop) row ranges holding an image; other rows are zeros "
                                             "(images that failed to decode, listed in ../manifest.json)"})
    columns = {"key": np.full(num_rows, "", dtype=object), "image_id": np.full(num_rows, -1, dtype=np.int64),
               "filename": np.full(num_rows, "", dtype=object), "captions": np.full(num_rows, "", dtype=object)}
    for r in records:
        i = r["row"]
        columns["key"][i], columns["image_id"][i], columns["filename"][i] = r["key"], r["image_id"], r["filename"]
        columns["captions"][i] = json.dumps(r["captions"], ensure_ascii=False)
    group = zarr.open_group(root, mode="a", attributes={
        "about": "features.zarr: (N, g, g, C) float16 grids, one image per row; key, image_id, filename, "
                 "captions (a JSON list per row): that row's image; rows without an image: key '', image_id -1",
        "rows": num_rows, "images": len(records)})
    for name in ROW_ARRAYS:
        col = columns[name]
        arr = group.create_array(name, shape=(num_rows,), dtype=str if col.dtype == object else col.dtype,
                                 chunks=(min(INDEX_CHUNK, max(num_rows, 1)),), overwrite=True)
        arr[:] = col


class ZarrReader(IndexedStore):
    """Records of a finished zarr store: `len`, random access by index, and sequential iteration."""

    def __init__(self, root: str | Path, manifest: dict | None = None):
        super().__init__(root, manifest)  # manifest, records, shards' files: checked
        self._array = None  # opened lazily: once per DataLoader worker
        self.direct = self.manifest.get("codec") in DIRECT_CODECS  # shard files decoded here, not by zarr
        self.shape = (self.manifest["grid"], self.manifest["grid"], self.manifest["channels"])

    @property
    def array(self):
        if self._array is None:
            try:
                self._array = zarr.open_array(self.root / ARRAY, mode="r")
            except Exception as e:  # noqa: BLE001 - zarr raises several kinds; one line for the user
                raise StoreError(f"{self.root / ARRAY}: cannot open ({type(e).__name__}: {e})") from None
        return self._array

    def _read(self, sel, where: str) -> np.ndarray:
        try:
            return self.array[sel]
        except Exception as e:  # noqa: BLE001 - crc32c / decompression failures: name the file
            raise StoreError(f"{self.root / ARRAY}: {where}: corrupted data ({type(e).__name__}: {e})") from None

    def _record(self, meta: dict, features: np.ndarray, finite: bool | None = None) -> fmt.Record:
        if not self.direct and "crc32c" in meta and fmt.checksum(features) != meta["crc32c"]:
            raise StoreError(f"{self.root / ARRAY}: record {meta['key']} holds another record's grid (its crc32c is not "
                             "the one the shard's JSON lists: a shard file swapped, or copied from another store)")
        rec = {k: meta[k] for k in ("key", "image_id", "filename", "captions")}
        rec["features"] = features
        return fmt.validate(rec, self.manifest["grid"], self.manifest["channels"], where=str(self.root / ARRAY),
                            finite_values=finite)

    def __getitem__(self, i: int) -> fmt.Record:
        meta = self.records[i]
        if not self.direct:
            self.paths[self.shard_of(i)]  # its file checked (present, of its size) before zarr reads it
            return self._record(meta, self._read(meta["row"], f"record {meta['key']}"))
        k, S = self.shard_of(i), self.manifest["shard_size"]
        path = self.paths[k]
        where = f"{path}: record {meta['key']}"
        try:
            with open(path, "rb") as f:  # two reads: the index at the end, then the one chunk
                if os.fstat(f.fileno()).st_size < S * 16 + 4:
                    raise StoreError(f"{where}: corrupted data (shard file shorter than its index)")
                f.seek(-(S * 16 + 4), os.SEEK_END)
                off, nb = (int(v) for v in _index(f.read(S * 16 + 4), S, where)[meta["row"] - k * S])
                out = np.zeros(self.shape, dtype=np.float16)
                if off != _ABSENT:  # an absent chunk is zarr's fill value (zarr skips all-zero chunks)
                    f.seek(off)
                    _chunk_into(memoryview(f.read(nb)), self.manifest["codec"], out, where, meta.get("chunk_crc32c"))
        except OSError as e:
            raise StoreError(f"{where}: cannot read ({e.strerror or e})") from None
        return self._record(meta, out)

    def iter_records(self, threads: int | None = None, span: range | None = None) -> Iterator[fmt.Record]:
        """All records in order (or those at positions `span`), reading each shard file once.

        Shard files are memory-mapped (no copy out of the page cache) and the next one is read
        ahead by the kernel while this one decodes; a shard's chunks decode in `threads`
        threads (default: the CPU count, at most 8).
        """
        threads = threads or min(8, os.cpu_count() or 1)
        span = range(len(self.records)) if span is None else span
        shards = []  # (manifest entry, positions of its records in the span): metadata read as each shard starts
        pos = 0
        for s in self.manifest["shards"]:
            lo, hi = max(pos, span.start), min(pos + s["count"], span.stop)
            pos += s["count"]
            if lo < hi:
                shards.append((s, range(lo, hi)))
        if not self.direct:
            for s, at in shards:
                self.paths[s["index"]]  # its file checked (present, of its size) before zarr reads it
                metas = self.records[at.start:at.stop]  # this shard's, in the span
                lo, hi = metas[0]["row"], metas[-1]["row"] + 1
                block = self._read(slice(lo, hi), f"shard {s['index']} ({s['file']})")  # (rows, g, g, C)
                for m in metas:
                    yield self._record(m, np.ascontiguousarray(block[m["row"] - lo]))
            return

        def load(path: Path) -> mmap.mmap | bytes:
            """The shard file mapped, not copied; the kernel starts reading it ahead of its turn."""
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""  # reported as a corrupted index
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

        S = self.manifest["shard_size"]

        def start(j: int) -> tuple:
            s, at = shards[j]
            metas = self.records[at.start:at.stop]
            first, hi = s["index"] * S, metas[-1]["row"] + 1
            path = self.paths[s["index"]]
            try:
                data = load(path)
            except OSError as e:
                raise StoreError(f"{path}: cannot read ({e.strerror or e})") from None
            expect = {m["row"] - first: m["chunk_crc32c"] for m in metas if "chunk_crc32c" in m}
            return (first, metas, *submit_shard(pool, data, hi - first, S, self.manifest["codec"], self.shape, str(path),
                                                expect))

        # Two shards in flight: the next one decodes in the pool while this one's records go out.
        with ThreadPoolExecutor(threads) as pool:
            queue = [start(j) for j in range(min(2, len(shards)))]
            for j in range(len(shards)):
                first, metas, block, futures = queue.pop(0)
                if j + 2 < len(shards):
                    queue.append(start(j + 2))
                for m in metas:
                    i = m["row"] - first
                    yield self._record(m, block[i], futures[i].result())

    __iter__ = iter_records

    def shard_files(self) -> list[tuple[dict, Path]]:
        return list(zip(self.manifest["shards"], self.paths))
