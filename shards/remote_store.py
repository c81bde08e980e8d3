"""A finished WebDataset feature store read from a URL: `open_store("http://host/features/train")`.

The small files come first, whole: manifest.json, then every shards/NNNNNN.json (fetched by 16
threads; the records' metadata and captions), checked as a folder's are (the shard list complete
and in order, counts adding up, keys unique, file names plain names inside the store). The tar
shards are then streamed by the readers (`shards.wds.stream`), never downloaded first, each
record checked against its CRC-32C. Zarr stores are read from a folder (a mounted bucket works):
their reads are random access, not streams.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from shards.manifest import MANIFEST, StoreError, check_manifest
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
        with ThreadPoolExecutor(max_workers=16) as pool:
            metas = list(pool.map(lambda k: read_remote_json(join(self.root, "shards", f"{k:06d}.json"), "shard metadata",
                                                             timeout),
                                  range(len(shards))))
        self.records, self.shard_of, self.paths, keys = [], [], [], set()
        for k, (s, meta) in enumerate(zip(shards, metas)):
            where = join(self.root, "shards", f"{k:06d}.json")
            name = s.get("file")
            if not isinstance(meta, dict) or not isinstance(meta.get("records"), list) or meta.get("file") != name:
                raise StoreError(f"{where}: not the metadata of shard {k} ({name!r})")
            if not isinstance(name, str) or "/" in name or name.startswith(".") or not name.endswith(".tar"):
                raise StoreError(f"{where}: shard file {name!r} is not a plain .tar name inside the store")
            recs = meta["records"]
            if len(recs) != s.get("count"):
                raise StoreError(f"{where}: {len(recs)} records, the manifest says {s.get('count')}")
            for r in recs:
                key = r.get("key") if isinstance(r, dict) else None
                if not isinstance(key, str) or key in keys:
                    raise StoreError(f"{where}: a bad or repeated key {key!r}")
                keys.add(key)
            self.records += recs
            self.shard_of += [k] * len(recs)
            self.paths.append(join(self.root, name))
        if len(self.records) != self.manifest["count"]:
            raise StoreError(f"{join(self.root, MANIFEST)}: count {self.manifest['count']}, the shards hold "
                             f"{len(self.records)} records")
        self.require_checksum = bool(self.manifest.get("record_checksum"))
