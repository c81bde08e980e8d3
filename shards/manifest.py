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

import fcntl
import functools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Iterable

import numpy as np

from common import files
from common.files import atomic_write_json
from shards.format import StoreError, good_key

PLAN, MANIFEST = "plan.json", "manifest.json"


# The file helpers with this layer's error: a features folder's fault is a StoreError.
read_json = functools.partial(files.read_json, error=StoreError)
regular_file = functools.partial(files.regular_file, error=StoreError)
inside = functools.partial(files.inside, error=StoreError)


class WriterLock:
    """An exclusive lock on a features folder for one writing process (rank): a second command
    writing the same folder as the same rank stops at once with a message, instead of the two
    deleting each other's temporary files. flock: released by the kernel when the process dies,
    so a killed run's rerun is never locked out."""

    def __init__(self, root: str | os.PathLike, rank: int = 0):
        self.path = Path(root) / f".writer-{rank}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid = self.file.read().strip() or "?"
            self.file.close()
            raise StoreError(f"{Path(root)}: another process (pid {pid}) is writing this features folder; "
                             "wait for it to finish or write elsewhere") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
            if not done_shards(Path(root)):  # e.g. a run stopped at once by a bad brace range
                raise StoreError(f"{path}: the folder holds a different run that wrote nothing usable (differs in "
                                 f"{', '.join(diff)}); delete the folder (rm -r {root}) and run again")
            raise StoreError(f"{path}: the folder holds a different run (differs in {', '.join(diff)}); "
                             "delete it or write elsewhere")
        return old
    atomic_write_json(path, plan)
    return plan


def shard_range(plan: dict, k: int) -> range:
    """Record rows of shard k."""
    s = plan["shard_size"]
    return range(k * s, min((k + 1) * s, plan["num_records"]))


def row_runs(rows: Iterable[int]) -> list[list[int]]:
    """Sorted rows as [start, stop) runs of consecutive rows: [0, 1, 2, 5, 6] -> [[0, 3], [5, 7]]."""
    out: list[list[int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return out


def check_rows(root: Path, plan: dict, k: int, rows: Iterable[int]) -> range:
    """Shard k's row range; a StoreError when a row given for it lies outside."""
    span = shard_range(plan, k)
    for row in rows:
        if row not in span:
            raise StoreError(f"{root}: row {row} is not in shard {k} ({span.start}..{span.stop - 1})")
    return span


def check_shard_meta(root: Path, k: int, meta, count: int | None, num_rows: int, shard_size: int,
                     keys: dict | None = None) -> list[dict]:
    """Shard k's metadata (its JSON), checked: its file inside the folder, as many records as the
    manifest says (`count`, None: not known yet), each record's row inside the shard's range and
    rising, keys well formed and unique across the store (`keys` collects them, with their file names).
    Returns the records."""
    where = shard_meta_path(root, k)
    if not isinstance(meta, dict) or not isinstance(meta.get("records"), list):
        raise StoreError(f"{where}: not shard metadata (no records list)")
    inside(root, meta.get("file"), str(where))
    recs = meta["records"]
    if count is not None and len(recs) != count:
        raise StoreError(f"{where}: {len(recs)} records, the manifest says {count}")
    lo, hi = k * shard_size, min((k + 1) * shard_size, num_rows)
    last = lo - 1
    for r in recs:
        row, key = r.get("row") if isinstance(r, dict) else None, r.get("key") if isinstance(r, dict) else None
        if not isinstance(row, int) or isinstance(row, bool) or not last < row < hi:
            raise StoreError(f"{where}: record {key!r} has row {row!r}, outside shard {k}'s rows {lo}..{hi - 1} "
                             "or out of order")
        if not isinstance(key, str) or not good_key(key):
            raise StoreError(f"{where}: row {row} has a bad key {key!r}")
        if keys is not None:
            if key in keys:
                two = f" ({keys[key]} and {r.get('filename')})"
                hint = ("; two input shards hold this sample's key: featurize each sample once (list the input shards "
                        f"without the repeat), after deleting {root}") if "#" in str(r.get("filename")) else ""
                raise StoreError(f"{where}: key {key} appears twice in the store{two}{hint}")
            keys[key] = r.get("filename")
        last = row
    return recs


def check_shard_list(root: Path, manifest: dict) -> list[int]:
    """A finished store's shard list, checked at opening (no file touched): complete and in order,
    each count within the shard size, the counts adding up. Returns the counts."""
    mpath = Path(root) / MANIFEST
    shards, S = manifest["shards"], manifest.get("shard_size")
    if not isinstance(shards, list) or not isinstance(S, int) or S < 1 or len(shards) != manifest.get("num_shards", len(shards)):
        raise StoreError(f"{mpath}: the shard list does not match num_shards / shard_size")
    try:  # the common case in three passes at C speed
        counts = [s["count"] for s in shards]
        fine = [s["index"] for s in shards] == list(range(len(shards))) and set(map(type, counts)) <= {int} \
            and (not counts or 0 <= min(counts) and max(counts) <= S)
    except (TypeError, KeyError):
        fine = False
    if not fine:  # entry by entry, to name the first fault
        counts = []
        for k, s in enumerate(shards):
            if not isinstance(s, dict) or s.get("index") != k:
                raise StoreError(f"{mpath}: shard entry {k} is not shard {k}")
            count = s.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= S:
                raise StoreError(f"{mpath}: shard {k} has count {count!r}, not 0..{S}")
            counts.append(count)
    if sum(counts) != manifest["count"]:
        raise StoreError(f"{mpath}: count {manifest['count']}, the shards hold {sum(counts)} records")
    return counts


class ShardFiles(Sequence):
    """Each shard's data file of a finished store, checked against the manifest before anything
    is read from it: inside the folder, a regular file, of the size written (a shard whose images
    all failed may have no file: zarr writes no chunk of fill values). A shard's file is checked
    when it is first asked for (a stat), so opening a store touches no shard file."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.shards = Path(root), manifest["shards"]
        self._checked: dict[int, Path] = {}

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if k not in self._checked:
            s = self.shards[k]
            path = inside(self.root, s.get("file"), f"{self.root / MANIFEST}: shard {k}")
            if s["count"] or s.get("bytes", 0) or path.exists() or path.is_symlink():
                st = regular_file(path, "shard file")
                if st.st_size != s.get("bytes"):
                    raise StoreError(f"{path}: {st.st_size} bytes, the manifest says {s.get('bytes')} (cut short or "
                                     "changed after it was written; `python -m shards verify` checks every file)")
            self._checked[k] = path
        return self._checked[k]

    def __iter__(self) -> Iterator[Path]:
        return (self[k] for k in range(len(self)))


class ShardRecords(Sequence):
    """Every record's metadata of a store (row, key, image_id, filename, captions), in row order,
    read shard by shard when asked: `load(k)` reads and checks shard k's JSON. Opening a store
    costs its shard list (the counts, from the manifest), not its records: a few shards' records
    are held at a time, so a pass over them all runs in the memory of one shard."""

    def __init__(self, load: Callable[[int], list[dict]], counts: list[int], keep: int = 4):
        self._load, self._keep = load, keep
        self.starts = np.zeros(len(counts) + 1, dtype=np.int64)  # record position of each shard's first
        np.cumsum(counts, out=self.starts[1:])
        self._held: OrderedDict[int, list[dict]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, i: int) -> int:
        """The shard holding record position i."""
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def shard(self, k: int) -> list[dict]:
        """Shard k's records (read at the first ask, kept among the last few asked)."""
        with self._lock:
            if k in self._held:
                self._held.move_to_end(k)
                return self._held[k]
        recs = self._load(k)
        with self._lock:
            self._held[k] = recs
            while len(self._held) > self._keep:
                self._held.popitem(last=False)
        return recs

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            out: list[dict] = []
            while start < stop:
                k = self.shard_of(start)
                first = int(self.starts[k])
                recs = self.shard(k)[start - first:stop - first]
                out += recs
                start = first + len(self.shard(k))
            return out
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        k = self.shard_of(i)
        return self.shard(k)[i - int(self.starts[k])]

    def __iter__(self) -> Iterator[dict]:
        for k in range(len(self.starts) - 1):
            yield from self.shard(k)

    def __getstate__(self) -> dict:  # to DataLoader workers: without the records held
        return {**self.__dict__, "_held": OrderedDict(), "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class IndexedStore:
    """What both readers share: a finished store's manifest (its shard list checked at opening), its
    shards' data files (`paths`, each checked when first used) and every record's metadata in row
    order (`records`, read shard by shard as asked, each shard's JSON checked when read: its file,
    count, rows and keys). Opening reads the manifest and nothing else."""

    def __init__(self, root: str | os.PathLike, manifest: dict | None = None):
        self.root = Path(root)
        self.manifest = manifest or load_manifest(self.root)
        counts = check_shard_list(self.root, self.manifest)
        self.paths = ShardFiles(self.root, self.manifest)  # each shard's data file, checked when first used
        self.records = ShardRecords(self._shard_records, counts)

    def _shard_records(self, k: int) -> list[dict]:
        s = self.manifest["shards"][k]
        self.paths[k]  # the manifest's file for it: inside the folder, of its size
        meta = read_json(shard_meta_path(self.root, k), "shard metadata")
        recs = check_shard_meta(self.root, k, meta, s["count"], self.manifest.get("num_rows", len(self.paths) *
                                self.manifest["shard_size"]), self.manifest["shard_size"], {})
        if meta["file"] != s["file"]:
            raise StoreError(f"{shard_meta_path(self.root, k)}: file {meta['file']!r}, the manifest says {s['file']!r}")
        return recs

    def shard_of(self, i: int) -> int:
        return self.records.shard_of(i)

    def __len__(self) -> int:
        return len(self.records)


def merge_shards(root: Path, split: str = "") -> tuple[dict, list[dict]]:
    """(manifest, records: each filled row's {"row", "key", ...}): every shard's JSON and every writer's failures merged (all shards
    must be done, and at least one image must have been read: a store of failures only is an
    error, with the first failure named, not an empty store). `shards.finalize` writes it."""
    root = Path(root)
    plan = read_json(root / PLAN, "plan (not a features folder?)")
    missing = sorted(set(range(plan["num_shards"])) - done_shards(root))
    if missing:
        raise StoreError(f"{root}: {len(missing)} of {plan['num_shards']} shards unfinished (first: {missing[0]}); rerun the writer")
    shards, failures, count, keys, checksums, records = [], [], 0, {}, set(), []
    for k in range(plan["num_shards"]):
        m = read_json(shard_meta_path(root, k), "shard metadata")
        checksums.add(m.get("record_checksum", ""))
        recs = check_shard_meta(root, k, m, None, plan["num_records"], plan["shard_size"], keys)
        shards.append({"index": k, "file": m["file"], "count": len(recs), "bytes": m["bytes"], "sha256": m["sha256"]})
        records += recs
        count += len(recs)
        failures += m.get("failures", [])
    if count == 0:
        first = f" (first: {failures[0]['filename']}: {failures[0]['reason']})" if failures else ""
        raise StoreError(f"{root}: none of the {plan['num_records']} images could be read{first}; check --images_root "
                         f"and the split file, then delete {root} and rerun")
    data_bytes = sum(s["bytes"] for s in shards)
    manifest = {
        "backend": plan["backend"], "split": split or plan["info"].get("split", ""), "count": count,
        "num_rows": plan["num_records"], "num_shards": plan["num_shards"], "shard_size": plan["shard_size"],
        "grid": plan["grid"], "channels": plan["channels"], "dtype": plan["dtype"], "codec": plan["codec"],
        "bytes_on_disk": data_bytes, "bytes_per_image": data_bytes / max(count, 1),
        "raw_bytes_per_image": plan["grid"] ** 2 * plan["channels"] * 2,
        **{k: v for k, v in plan["info"].items() if k not in ("split",)},
        "failures": failures, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shards": shards,
    }
    if checksums == {"crc32c"}:  # every shard's records carry their grid's CRC-32C (wds; zarr checks per chunk)
        manifest["record_checksum"] = "crc32c"
    return manifest, records


def write_manifest(root: Path, manifest: dict) -> dict:
    """manifest.json, written last: its presence is what "complete" means."""
    atomic_write_json(Path(root) / MANIFEST, manifest)
    for tmp in Path(root).rglob(".*.tmp"):  # what writers killed mid-file left behind; every shard is done now
        tmp.unlink(missing_ok=True)
    return manifest


# What makes two features folders the same features: the encoder, its weights and the input it saw.
IDENTITY = ("backbone", "layer", "weights", "weights_sha256", "image_size", "grid", "channels", "normalization", "resize")


def identity(manifest: dict) -> dict:
    """The fields of a manifest that say which encoder made its grids (see IDENTITY)."""
    return {k: manifest.get(k) for k in IDENTITY}


def check_same_features(manifest: dict, expected: dict, where: str, against: str) -> None:
    """A StoreError when `manifest`'s identity differs from `expected` (an identity dict): the
    decoder would read grids of another encoder, layer or input size without a word."""
    got = identity(manifest)
    diff = [k for k in IDENTITY if got.get(k) != expected.get(k) and not (k == "weights_sha256" and None in (got.get(k), expected.get(k)))]
    if diff:
        shown = ", ".join(f"{k} {got.get(k)!r} vs {expected.get(k)!r}" for k in diff)
        raise StoreError(f"{where}: features from another encoder than {against} ({shown}); featurize this split "
                         "with the same settings")


def foreign_records(records: list[dict], image_ids: set[int]) -> list[dict]:
    """The records whose image is not among `image_ids` (a split's): not to be trained on or scored."""
    return [r for r in records if r.get("image_id") not in image_ids]


def load_manifest(root: Path) -> dict:
    """The manifest of a complete features folder, or a one-line error saying what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: no such features folder")
    path = root / MANIFEST
    if not path.exists():
        hint = " (a writer has not finished: rerun it to resume)" if (root / PLAN).exists() else " (not a features folder?)"
        raise StoreError(f"{path}: no manifest{hint}")
    return check_manifest(read_json(path, "manifest"), path)


def check_manifest(m, path) -> dict:
    """A manifest's required fields present and well formed (`path` names it in errors)."""
    if not isinstance(m, dict):
        raise StoreError(f"{path}: not a manifest (expected a JSON object)")
    for k in ("backend", "count", "grid", "channels", "shard_size", "shards"):
        if k not in m:
            raise StoreError(f"{path}: manifest lacks {k!r}")
    for k in ("count", "grid", "channels", "shard_size"):
        if not isinstance(m[k], int) or isinstance(m[k], bool) or m[k] < 1:
            raise StoreError(f"{path}: {k} must be a positive integer, got {m[k]!r}")
    check_encoder_fields(m, path, StoreError)
    return m


# What a manifest (or an export's encoder.json) may say: beyond these, a number is an error before
# anything is allocated from it (a grid of 100,000 would ask for terabytes).
LIMITS = {"grid": (1, 256), "channels": (1, 65536), "shard_size": (1, 1 << 24), "image_size": (16, 8192),
          "count": (1, 1 << 40), "num_rows": (1, 1 << 40)}


def check_encoder_fields(m: dict, path, error: type[Exception] = StoreError) -> dict:
    """The numbers and names an encoder description holds, of their type and within LIMITS."""
    for k, (lo, hi) in LIMITS.items():
        if k in m and (not isinstance(m[k], int) or isinstance(m[k], bool) or not lo <= m[k] <= hi):
            raise error(f"{path}: {k} must be an integer from {lo} to {hi}, got {m[k]!r}")
    for k in ("backend", "backbone", "layer", "weights", "codec"):
        if k in m and not isinstance(m[k], str):
            raise error(f"{path}: {k} must be a string, got {m[k]!r}")
    return m
