"""WebDataset backend: tar shards of `<key>.features.npy` + `<key>.json`.

    features/<split>/shard-000000.tar ...   each about `shard_bytes`, written to a temporary
                                            name and renamed when closed
    features/<split>/shards/*.json          keys and checksums of each finished shard

Decoding never unpickles: `.npy` through numpy's header parser with object arrays refused
(what `np.load(allow_pickle=False)` allows), `.json` through `json.loads`; any other member
(a `.pyd`, `.pickle`, `.pth`) is an error naming shard and key.

Each record's `.json` carries `crc32c`, the CRC-32C of its grid's bytes (`shards.format.checksum`),
checked at every read, so a flipped byte in a payload is an error naming shard and key, whether
the shard is read from a folder or streamed from a URL (a tar has no checksum of its own).
"""

from __future__ import annotations

import functools
import io
import json
import mmap
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from common.files import atomic_write_json, atomic_write_parts
import shards.format as fmt
from shards import remote
from shards.manifest import IndexedStore, StoreError, check_rows, ensure_plan, shard_meta_path, shard_range

ALLOWED = {"features.npy", "json"}
_INTERNAL = {"__key__", "__url__", "__local_path__"}


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def _member(name: str, payload: list) -> list:
    """One tar member as pieces to write: tarfile's own PAX header, the payload (buffers, not
    copied), zero padding to the 512-byte block. Fixed metadata: same records, same bytes."""
    size = sum(memoryview(p).nbytes for p in payload)
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return [info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), *payload, bytes(-size % tarfile.BLOCKSIZE)]


def _end_of_archive(written: int) -> bytes:
    """Two zero blocks, then zeros up to tarfile's record size, as `TarFile.close` writes them."""
    end = 2 * tarfile.BLOCKSIZE
    return bytes(end + (-(written + end) % tarfile.RECORDSIZE))


def npy_parts(x: np.ndarray) -> list:
    """`np.save`'s bytes for x as two pieces: the .npy header and a view of x's memory."""
    x = np.ascontiguousarray(x)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(x))
    return [head.getvalue(), memoryview(x).cast("B")]


class WdsWriter:
    """Writes whole tar shards of a planned store."""

    def __init__(self, root: str | Path, plan: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.plan = ensure_plan(self.root, plan)

    def write_shard(self, k: int, items: list[tuple[int, fmt.Record]], failures: list[dict] = ()) -> None:
        """Write shard k; items are (row, record) with rows inside the shard's range."""
        check_rows(self.root, self.plan, k, [row for row, _ in items])
        path = self.root / shard_name(k)
        parts, metas, written = [], [], 0
        for row, rec in items:
            fmt.validate(rec, self.plan["grid"], self.plan["channels"], where=str(path))
            member_meta = {**fmt.meta(rec), "crc32c": fmt.checksum(rec["features"])}
            for name, payload in ((f"{rec['key']}.features.npy", npy_parts(rec["features"])),
                                  (f"{rec['key']}.json", [json.dumps(member_meta).encode()])):
                member = _member(name, payload)
                parts += member
                written += sum(memoryview(p).nbytes for p in member)
            metas.append({"row": row, **fmt.meta(rec)})
        size, digest = atomic_write_parts(path, parts + [_end_of_archive(written)])
        atomic_write_json(shard_meta_path(self.root, k), {
            "file": path.name, "bytes": size, "sha256": digest, "records": metas, "failures": list(failures),
            "record_checksum": "crc32c"})

    def write_block(self, k: int, block: np.ndarray, metas: list[dict], failures: list[dict] = ()) -> None:
        """Write shard k from `block` ((n, g, g, C), the shard's rows in order) and the `metas`
        of its rows that hold an image (see ZarrWriter.write_block); grids are not copied."""
        start = shard_range(self.plan, k).start
        items = [(m["row"], {**fmt.meta(m), "features": block[m["row"] - start]}) for m in metas]
        self.write_shard(k, items, failures)


def load_npy(data: bytes | memoryview | np.ndarray) -> np.ndarray:
    """A .npy file's array, copied once out of `data` (bytes, or a view into a mapped shard; a
    uint8 array, a streamed member's own buffer, is used in place).
    numpy parses the header; object arrays are refused, so nothing is ever unpickled."""
    if len(data) < 12 or bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError("no .npy magic string")
    size_field = 2 if data[6] == 1 else 4  # header length: uint16 in version 1, uint32 after
    offset = 8 + size_field + int.from_bytes(bytes(data[8:8 + size_field]), "little")
    shape, fortran, dtype = _npy_header(bytes(data[:offset]))
    count = int(np.prod(shape))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes for shape {shape} {dtype}")
    x = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")
    return x if isinstance(data, np.ndarray) else x.copy()  # an array is the reader's own buffer (a streamed member)


@functools.lru_cache(maxsize=64)
def _npy_header(head: bytes) -> tuple:
    """(shape, fortran_order, dtype) of a .npy header, parsed once per distinct header (a store's are all alike)."""
    f = io.BytesIO(head)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise ValueError("object arrays need pickle; refused")
    return shape, fortran, dtype


def map_shard(path: str, populate: bool = True) -> mmap.mmap:
    """A local shard mapped read-only with its pages read in now (MAP_POPULATE: one sequential read
    at the disk's speed instead of a page fault per 4 KB; releases the GIL while it reads), or as
    they are touched (`populate=False`: reading only the headers)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise StoreError(f"{path}: empty shard")
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        return mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)


def local_tar_members(path: str, data: mmap.mmap) -> Iterator[dict]:
    """webdataset's file samples ({"fname", "data", "__url__"}) of a mapped local tar shard: read
    as a streamed one is (`remote.read_members`: its header parser), each member's data a view of
    the map (no copies). A member that runs past the end, or a shard cut at a header or before its
    end-of-archive blocks, is torn."""
    tar, end = remote.MappedTar(data), {}
    try:
        for name, member in remote.read_members(tar, tar.take, path, 1 << 62, end):  # a shard's size bounds a member
            yield {"fname": name, "data": member, "__url__": path}
    except tarfile.ReadError as e:
        raise StoreError(f"{path}: torn shard ({e})") from None
    except tarfile.TarError as e:
        raise StoreError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
    at = tar.pos - (tarfile.BLOCKSIZE if end else 0)  # where the end-of-archive blocks should begin
    if not end or tar.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise StoreError(f"{path}: torn shard (no end-of-archive blocks after byte {at})")


def _local_path(url: str) -> str | None:
    """The file a shard URL names, when it is a local file (a path or `file:` URL); None for http, `pipe:`."""
    if remote.is_remote(url):
        return None
    path = remote.local_path(url)
    return path if os.path.isfile(path) else None


def tar_to_samples(src: Iterable[dict], timeout: float = remote.TIMEOUT) -> Iterator[dict]:
    """Stage 5 of `stream`: shards to samples grouped by key. Local files are memory-mapped, the
    next one read in by a background thread while this one's samples go out; `pipe:` and other
    URLs go through webdataset's own tar reader (http(s): `timeout` seconds per connect and read)."""
    shards = [(s, _local_path(s["url"])) for s in src]
    local = [i for i, (_, path) in enumerate(shards) if path is not None]
    following = dict(zip(local, local[1:]))  # each local shard's next local shard
    with ThreadPoolExecutor(max_workers=1) as ahead:
        mapped = {i: ahead.submit(map_shard, shards[i][1]) for i in local[:1]}
        for i, (sample, path) in enumerate(shards):
            if path is None:  # http(s), pipe: streamed, every fault named (shards.remote)
                yield from remote.tar_samples(sample["url"], timeout)
                continue
            if i in following:
                mapped[following[i]] = ahead.submit(map_shard, shards[following[i]][1])
            yield from wds.tariterators.group_by_keys(local_tar_members(path, mapped.pop(i).result()), handler=_reraise)


def decode_sample(sample: dict, grid: int | None = fmt.GRID, channels: int | None = None,
                  require_checksum: bool = False, listed: dict | None = None) -> fmt.Record:
    """A raw tar sample (bytes per extension) -> the record, or a StoreError naming shard and key.

    The grid is checked against the `crc32c` its `.json` carries; `require_checksum`: a sample
    without one is an error (stores written since checksums were added all have them). `listed`:
    shard URL -> the keys its shard JSON lists; a sample not listed there is an error."""
    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    where = f"{url}: {key}"
    if listed is not None and key not in listed.get(url, ()):
        raise StoreError(f"{where}: a record its shard's JSON does not list (a shard file edited, or from another "
                         "store); verify the store (python -m shards verify)")
    extra = sorted(set(sample) - ALLOWED - _INTERNAL)
    if extra:
        raise StoreError(f"{where}: refusing member(s) .{', .'.join(extra)} (only .features.npy and .json are read; nothing is unpickled)")
    missing = sorted(ALLOWED - set(sample))
    if missing:
        raise StoreError(f"{where}: missing member(s) .{', .'.join(missing)}")
    try:
        features = load_npy(sample["features.npy"])
    except Exception as e:  # noqa: BLE001 - any decoding failure is this shard's fault
        raise StoreError(f"{where}.features.npy: not a plain .npy array ({e})") from None
    try:
        meta = json.loads(bytes(sample["json"]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{where}.json: malformed JSON ({e})") from None
    except RecursionError:
        raise StoreError(f"{where}.json: JSON nested too deep to read") from None
    if not isinstance(meta, dict) or meta.get("key") != key:
        raise StoreError(f"{where}.json: metadata does not belong to key {key}")
    rec = {"key": key, "image_id": meta.get("image_id"), "filename": meta.get("filename"),
           "captions": meta.get("captions"), "features": features}
    fmt.validate(rec, grid, channels, where=str(url))
    if "crc32c" in meta or require_checksum:
        if meta.get("crc32c") != fmt.checksum(features):
            why = "has no checksum" if "crc32c" not in meta else "fails its crc32c"
            raise StoreError(f"{where}.features.npy: corrupted data (the grid {why})")
    return rec


def _reraise(exn: Exception) -> bool:
    """webdataset handler: a torn tar or a bad member stops the run with the shard's name."""
    if isinstance(exn, StoreError):
        raise exn
    raise StoreError(f"unreadable shard: {type(exn).__name__}: {exn}") from None


def stream(urls: list[str], *, grid: int | None = fmt.GRID, channels: int | None = None, shuffle: bool = False,
           seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000, split_nodes: bool = False,
           require_checksum: bool = False, timeout: float = remote.TIMEOUT, listed: dict | None = None
           ) -> wds.DataPipeline:
    """The streaming reader: local paths, http(s) or `pipe:` URLs (e.g. `pipe:aws s3 cp s3://b/shard-000000.tar -`).

    Stages, in order:
      1. the shard list;
      2. shard shuffle seeded by (seed, epoch): a new order each epoch, the same on every rank;
      3. split_by_node: each process takes every world_size-th shard (training only);
      4. split_by_worker: each DataLoader worker takes its own shards;
      5. tar -> samples, grouping members by key (a torn tar raises, naming the shard); local
         files memory-mapped, the next one read in ahead (`tar_to_samples`);
      6. a sample shuffle buffer (training only);
      7. decode without unpickling, validate shape/dtype/finiteness and the grid's crc32c, and
         (`listed`: shard URL -> keys) that the shard's JSON lists the record.
    """
    stages: list = [wds.SimpleShardList(list(urls))]
    if shuffle:
        stages.append(wds.detshuffle(bufsize=len(urls) or 1, initial=len(urls) or 1, seed=seed, epoch=epoch))
    if split_nodes:
        stages.append(wds.split_by_node)
    stages.append(wds.split_by_worker)
    stages.append(functools.partial(tar_to_samples, timeout=timeout))
    if shuffle and shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=None, seed=seed + epoch))
    stages.append(wds.map(functools.partial(decode_sample, grid=grid, channels=channels,
                                            require_checksum=require_checksum, listed=listed), handler=_reraise))
    return wds.DataPipeline(*stages)


class ListedKeys:
    """shard URL -> the keys its JSON lists (`stream`'s `listed`), each shard's set made from its
    records when a sample of it first arrives; the last few shards' sets are kept."""

    def __init__(self, reader: "WdsReader", keep: int = 8):
        self.reader, self.keep = reader, keep
        self.shard = {remote.local_path(u): k for k, u in enumerate(reader.urls())}
        self.held: dict[str, frozenset] = {}

    def get(self, url: str, default=()):
        if url not in self.held:
            k = self.shard.get(url)
            if k is None:
                return default
            if len(self.held) >= self.keep:
                self.held.pop(next(iter(self.held)))
            self.held[url] = frozenset(r["key"] for r in self.reader.records.shard(k))
        return self.held[url]


class WdsReader(IndexedStore):
    """Records of a finished wds store, in order (no random access: use zarr for that)."""

    def __init__(self, root: str | Path, manifest: dict | None = None, timeout: float = remote.TIMEOUT):
        super().__init__(root, manifest)  # manifest, records, shards' tars: checked
        # Stores written with per-record checksums say so in every record's .json: from then on
        # a record without one is refused. (Older stores hold none: their grids are read unchecked.)
        self.require_checksum = bool(self.manifest.get("record_checksum"))
        self.timeout = timeout  # seconds per connect and read of a shard over HTTP (`data.url_timeout`)

    def urls(self) -> list[str]:
        return [str(p) for p in self.paths]

    def listed(self) -> "ListedKeys":
        """Each shard's URL (as a streamed sample names it) -> the keys its JSON lists, read as a
        stream reaches the shard (it travels with the reader to DataLoader workers)."""
        return ListedKeys(self)

    def iter_records(self, span: range | None = None) -> Iterator[fmt.Record]:
        """All records in order (or those at positions `span`, streamed from the shard holding
        its first); each one's key must be the one its shard's JSON lists at that place."""
        span = range(len(self.records)) if span is None else span
        skip, n = 0, 0  # shards wholly before the span are not read
        for s in self.manifest["shards"]:
            if n + s["count"] > span.start:
                break
            n += s["count"]
            skip += 1
        for rec in stream(self.urls()[skip:], grid=self.manifest["grid"], channels=self.manifest["channels"],
                          require_checksum=self.require_checksum, timeout=self.timeout):
            if n >= span.stop:
                return
            want = self.records[n]["key"] if n < len(self.records) else None
            if rec["key"] != want:
                raise StoreError(f"{self.root}: record {n} is {rec['key']}, the shard metadata lists {want}")
            if n >= span.start:
                yield rec
            n += 1
        if n < min(span.stop, len(self.records)) or (span.stop >= len(self.records) and n != len(self.records)):
            raise StoreError(f"{self.root}: {n} records in the shards, the shard metadata lists {len(self.records)}")

    __iter__ = iter_records

    def shard_files(self) -> list[tuple[dict, Path]]:
        return list(zip(self.manifest["shards"], self.paths))
