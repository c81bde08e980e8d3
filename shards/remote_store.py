"""A finished WebDataset feature store read from a URL: `open_store("http://host/features/train")`.

manifest.json comes first, whole, checked as a folder's is (the shard list complete and in order,
counts adding up, file names plain names inside the store); each shards/NNNNNN.json (its records'
metadata and captions) is fetched when a reader reaches that shard, and checked then (its file,
its count, its keys). Opening a store costs its manifest, not its records. The tar
shards are then streamed by the readers (`shards.wds.stream`), never downloaded first, each
record checked against its CRC-32C. Zarr stores are read from a folder (a mounted bucket works):
their reads are random access, not streams.
"""

from __future__ import annotations

import json

from shards.format import good_key
from shards.manifest import MANIFEST, ShardRecords, StoreError, check_manifest
from shards.remote import TIMEOUT, join, read_bytes
from shards.wds import WdsReader


def read_remote_json(url: str, what: str, timeout: float = TIMEOUT):
    data = read_bytes(url, timeout)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{url}: malformed {what} ({e})") from None
    except RecursionError:
        raise StoreError(f"{url}: {what} nested too deep to read") from None


def remote_manifest(root: str, timeout: float = TIMEOUT) -> dict:
    url = join(root, MANIFEST)
    return check_manifest(read_remote_json(url, "manifest", timeout), url)


class RemoteWdsReader(WdsReader):
    """WdsReader over a store at an http(s) or file: URL: same records, same checks, shards streamed."""

    def __init__(self, root: str, manifest: dict | None = None, timeout: float = TIMEOUT):
        self.root, self.timeout = root.rstrip("/"), timeout  # seconds per connect and read (`data.url_timeout`)
        self.manifest = manifest or remote_manifest(self.root, timeout)
        if self.manifest["backend"] != "wds":
            raise StoreError(f"{self.root}: a {self.manifest['backend']} store is read from a folder; stream a wds "
                             "store (--format wds) from a URL")
        shards = self.manifest["shards"]
        if not isinstance(shards, list) or any(not isinstance(s, dict) or s.get("index") != k for k, s in enumerate(shards)):
            raise StoreError(f"{join(self.root, MANIFEST)}: the shard list is not shards 0..{len(shards) - 1} in order")
        self.paths, total = [], 0
        for k, s in enumerate(shards):
            name, count = s.get("file"), s.get("count")
            if not isinstance(name, str) or "/" in name or name.startswith(".") or not name.endswith(".tar"):
                raise StoreError(f"{join(self.root, MANIFEST)}: shard file {name!r} is not a plain .tar name inside the store")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise StoreError(f"{join(self.root, MANIFEST)}: shard {k} has count {count!r}")
            self.paths.append(join(self.root, name))
            total += count
        if total != self.manifest["count"]:
            raise StoreError(f"{join(self.root, MANIFEST)}: count {self.manifest['count']}, the shards hold {total} records")
        self.records = ShardRecords(self._shard_records, [s["count"] for s in shards])
        self.require_checksum = bool(self.manifest.get("record_checksum"))

    def _shard_records(self, k: int) -> list[dict]:
        """Shard k's records from its JSON at the URL, checked: its file, its count, well-formed keys
        unique within it (across shards: `python -m shards verify`)."""
        s = self.manifest["shards"][k]
        where = join(self.root, "shards", f"{k:06d}.json")
        meta = read_remote_json(where, "shard metadata", self.timeout)
        if not isinstance(meta, dict) or not isinstance(meta.get("records"), list) or meta.get("file") != s["file"]:
            raise StoreError(f"{where}: not the metadata of shard {k} ({s['file']!r})")
        recs = meta["records"]
        if len(recs) != s["count"]:
            raise StoreError(f"{where}: {len(recs)} records, the manifest says {s['count']}")
        keys = set()
        for r in recs:
            key = r.get("key") if isinstance(r, dict) else None
            if not isinstance(key, str) or not good_key(key) or key in keys:
                raise StoreError(f"{where}: a bad or repeated key {key!r}")
            keys.add(key)
        return recs
