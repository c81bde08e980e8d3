"""Zarr v3 backend: one (N, g, g, C) float16 array, one image per chunk, many chunks per shard file.

    features/<split>/features.zarr   chunks (1, g, g, C), shards (S, g, g, C), zstd + crc32c per chunk
    features/<split>/shards/*.json   rows, keys, ids, filenames, captions of each finished shard

Each writer writes whole shards (two writers in one shard file lose data: zarr's sharding
codec does read-modify-write), so many processes can fill one array. Random access by
row serves a map-style Dataset; `iter_records` reads a shard file at a time.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Iterator

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from shards import format as fmt
from shards.manifest import (StoreError, atomic_write_json, ensure_plan, load_manifest, read_json,
                             sha256_file, shard_meta_path, shard_range)

ARRAY = "features.zarr"


def compressors(codec: str) -> list:
    """Lossless codecs by name; crc32c after compression catches a corrupted byte at read time."""
    if codec == "zstd":  # level 1: the ratio of level 3 (1.47x on ReLU grids) at 2.3x its speed (bench/RESULTS.md)
        base = [ZstdCodec(level=1)]
    elif codec == "blosc-zstd":
        base = [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=2)]
    elif codec == "lz4":
        base = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2)]
    elif codec == "none":
        base = []
    else:
        raise StoreError(f"unknown zarr codec {codec!r}: zstd, blosc-zstd, lz4 or none")
    return base + [Crc32cCodec()]


# ---- shard files encoded and decoded directly ---------------------------------------------
# zarr-python moves sharded chunks through its event loop one at a time (~90 MB/s written,
# ~350 images/s read here, bench/RESULTS.md). For the codecs we write (zstd level 1 or none,
# then crc32c), shard files are encoded and decoded here, byte for byte in the layout of zarr's
# `sharding_indexed` codec: the encoded chunks, then an index of (offset, nbytes) little-endian
# uint64 pairs with its own crc32c, at the end; 2**64-1 marks an absent chunk. zarr reads these
# files and we read zarr's (tests/test_shards.py checks both ways).
DIRECT_CODECS = ("zstd", "none")
_ABSENT = 2**64 - 1


def _crc(data: bytes | memoryview) -> bytes:
    return struct.pack("<I", google_crc32c.value(np.frombuffer(data, dtype=np.uint8)))  # a view: no copy


def encode_shard(block: np.ndarray, shard_size: int, codec: str) -> bytes:
    """A shard file's bytes for `block` (n <= shard_size images, (n, g, g, C) float16)."""
    zstd = numcodecs.Zstd(level=1) if codec == "zstd" else None
    parts, offset = [], 0
    index = np.full((shard_size, 2), _ABSENT, dtype="<u8")
    for i, x in enumerate(block):
        raw = np.ascontiguousarray(x, dtype="<f2").tobytes()
        enc = bytes(zstd.encode(raw)) if zstd else raw
        enc += _crc(enc)
        index[i] = (offset, len(enc))
        offset += len(enc)
        parts.append(enc)
    idx = index.tobytes()
    return b"".join(parts) + idx + _crc(idx)


def _index(data: bytes, shard_size: int, where: str) -> np.ndarray:
    tail = data[-(shard_size * 16 + 4):]
    if len(tail) != shard_size * 16 + 4 or _crc(tail[:-4]) != tail[-4:]:
        raise StoreError(f"{where}: corrupted data (shard index fails its crc32c)")
    return np.frombuffer(tail[:-4], dtype="<u8").reshape(shard_size, 2)


def _chunk(enc: memoryview, codec: str, shape: tuple, where: str) -> np.ndarray:
    """One encoded chunk (a view into the shard's bytes: no copies) -> its (g, g, C) array."""
    payload = enc[:-4]
    if len(enc) < 4 or _crc(payload) != bytes(enc[-4:]):
        raise StoreError(f"{where}: corrupted data (chunk fails its crc32c)")
    raw = numcodecs.Zstd().decode(payload) if codec == "zstd" else payload
    return np.frombuffer(raw, dtype="<f2").reshape(shape)


def decode_shard(data: bytes, n: int, shard_size: int, codec: str, shape: tuple, where: str) -> np.ndarray:
    """(n, g, g, C) float16 from a shard file's bytes; absent chunks read as zeros (the fill value)."""
    index = _index(data, shard_size, where)
    view = memoryview(data)
    out = np.zeros((n, *shape), dtype=np.float16)
    for i in range(n):
        off, nb = (int(v) for v in index[i])
        if off != _ABSENT:
            out[i] = _chunk(view[off:off + nb], codec, shape, f"{where}: chunk {i}")
    return out


class ZarrWriter:
    """Writes whole shards of a planned store; `plan` comes from `shards.manifest.make_plan`."""

    def __init__(self, root: str | Path, plan: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.plan = ensure_plan(self.root, plan)
        g, c, s = plan["grid"], plan["channels"], plan["shard_size"]
        path = self.root / ARRAY
        try:
            self.array = zarr.open_array(path, mode="r+")
        except (FileNotFoundError, zarr.errors.ArrayNotFoundError if hasattr(zarr.errors, "ArrayNotFoundError") else FileNotFoundError):
            self.array = zarr.create_array(
                path, shape=(plan["num_records"], g, g, c), chunks=(1, g, g, c), shards=(s, g, g, c),
                dtype="float16", compressors=compressors(plan["codec"]), fill_value=0, overwrite=False)

    def shard_file(self, k: int) -> Path:
        return self.root / ARRAY / self.array.metadata.encode_chunk_key((k, 0, 0, 0))

    def write_shard(self, k: int, items: list[tuple[int, fmt.Record]], failures: list[dict] = ()) -> None:
        """Write shard k; items are (row, record) with rows inside the shard's range."""
        rows = shard_range(self.plan, k)
        g, c = self.plan["grid"], self.plan["channels"]
        block = np.zeros((len(rows), g, g, c), dtype=fmt.DTYPE)  # (S, g, g, C); failed images stay 0
        metas = []
        for row, rec in items:
            if row not in rows:
                raise StoreError(f"{self.root}: row {row} is not in shard {k} ({rows.start}..{rows.stop - 1})")
            fmt.validate(rec, g, c, where=str(self.root))
            block[row - rows.start] = rec["features"]
            metas.append({"row": row, **fmt.meta(rec)})
        f = self.shard_file(k)
        if self.plan["codec"] in DIRECT_CODECS:
            data = encode_shard(block, self.plan["shard_size"], self.plan["codec"])
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f".{f.name}.{os.getpid()}.{k}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, f)  # a reader sees no file or the whole shard
            size, digest = len(data), hashlib.sha256(data).hexdigest()
        else:
            self.array[rows.start:rows.stop] = block  # one shard file, written whole by zarr
            size, digest = (f.stat().st_size, sha256_file(f)) if f.exists() else (0, "")
        atomic_write_json(shard_meta_path(self.root, k), {
            "file": str(f.relative_to(self.root)), "bytes": size, "sha256": digest, "records": metas,
            "failures": list(failures)})


class ZarrReader:
    """Records of a finished zarr store: `len`, random access by index, and sequential iteration."""

    def __init__(self, root: str | Path, manifest: dict | None = None):
        self.root = Path(root)
        self.manifest = manifest or load_manifest(self.root)
        self.records: list[dict] = []
        self.shard_of: list[int] = []
        for s in self.manifest["shards"]:
            meta = read_json(shard_meta_path(self.root, s["index"]), "shard metadata")
            self.records += meta["records"]
            self.shard_of += [s["index"]] * len(meta["records"])
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

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, sel, where: str) -> np.ndarray:
        try:
            return self.array[sel]
        except Exception as e:  # noqa: BLE001 - crc32c / decompression failures: name the file
            raise StoreError(f"{self.root / ARRAY}: {where}: corrupted data ({type(e).__name__}: {e})") from None

    def _record(self, meta: dict, features: np.ndarray) -> fmt.Record:
        rec = {k: meta[k] for k in ("key", "image_id", "filename", "captions")}
        rec["features"] = features
        return fmt.validate(rec, self.manifest["grid"], self.manifest["channels"], where=str(self.root / ARRAY))

    def __getitem__(self, i: int) -> fmt.Record:
        meta = self.records[i]
        if not self.direct:
            return self._record(meta, self._read(meta["row"], f"record {meta['key']}"))
        k, S = self.shard_of[i], self.manifest["shard_size"]
        path = self.root / self.manifest["shards"][k]["file"]
        where = f"{path}: record {meta['key']}"
        if not path.exists():
            raise StoreError(f"{where}: shard file missing")
        with open(path, "rb") as f:  # two reads: the index at the end, then the one chunk
            f.seek(-(S * 16 + 4), os.SEEK_END)
            off, nb = (int(v) for v in _index(f.read(S * 16 + 4), S, where)[meta["row"] - k * S])
            if off == _ABSENT:
                return self._record(meta, np.zeros(self.shape, dtype=np.float16))
            f.seek(off)
            return self._record(meta, _chunk(memoryview(f.read(nb)), self.manifest["codec"], self.shape, where).copy())

    def iter_records(self) -> Iterator[fmt.Record]:
        """All records in order, reading each shard file once."""
        start = 0
        for s in self.manifest["shards"]:
            metas = self.records[start:start + s["count"]]
            start += s["count"]
            if not metas:
                continue
            lo, hi = metas[0]["row"], metas[-1]["row"] + 1
            if self.direct:
                path, S = self.root / s["file"], self.manifest["shard_size"]
                first = s["index"] * S
                if path.exists():
                    block = decode_shard(path.read_bytes(), hi - first, S, self.manifest["codec"], self.shape, str(path))
                else:  # every image of the shard failed: nothing was written
                    block = np.zeros((hi - first, *self.shape), dtype=np.float16)
                block = block[lo - first:]
            else:
                block = self._read(slice(lo, hi), f"shard {s['index']} ({s['file']})")  # (rows, g, g, C)
            for m in metas:
                yield self._record(m, np.ascontiguousarray(block[m["row"] - lo]))

    __iter__ = iter_records

    def shard_files(self) -> list[tuple[dict, Path]]:
        return [(s, self.root / s["file"]) for s in self.manifest["shards"]]
