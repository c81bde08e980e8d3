"""Image-text tar shards (img2dataset's layout) as featurize's input, beside Karpathy's split file.

    python -m featurize --split train --input_shards 'http://host/cc3m/{00000..00331}.tar' --format wds

Rows follow what the input shards hold. Each input shard's sample count is known before anything
is featurized: img2dataset's `NNNNN_stats.json` beside it (`successes`: the samples its tar holds,
local or at the same URL prefix), else, for a local tar, a count of its samples. Input shard i's
samples are rows off_i .. off_i + count_i - 1 (off_i: the counts before it), so the store's rows
are exactly the samples, and output shards of S rows are cut from them whatever the input shards'
sizes: no output shard is empty, only the last one is partial, and the only unfilled rows are
samples that failed (listed). Only a shard whose count cannot be known before it is read (a `pipe:`
or http(s) URL without its stats file) falls back to reserving `input_shard_samples` rows (whole
output shards) per input shard, with a warning.

The work unit is the input shard i: it writes the output shards whose first row is one of its
samples, from its first such row on, reading into the next input shards for the rest of its last
output shard (at most S - 1 samples of them; their earlier samples are skipped, not decoded).

- each process takes input shards i % processes == rank, and each of its DataLoader workers
  whole units of those;
- a unit is done when `inputs/NNNNNN.json` (its URL, the rows it wrote, their failures) exists,
  written after all of its output shards; a killed run redoes the units that have none, dropping
  whatever of their output shards it had written, and writes the same store;
- a sample that cannot be used (no image, no caption, a refused member, a caption that is not
  UTF-8, an image that does not decode) is a listed failure naming URL and key, and so is a sample
  a stats file counts that its tar does not hold; a shard that cannot be read (HTTP 404, refused,
  cut short, torn) or that holds more samples than its count stops the run with its URL.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from common.files import atomic_write_json
from featurize.images import ImageError, decode_rgb, to_tensor
from shards.format import StoreError
from shards.imagetext import InputSample, parse_sample
from shards.manifest import shard_meta_path
from shards.remote import _reraise, local_path, read_bytes, tar_samples
from shards.wds import local_tar_members, map_shard

INPUTS = "inputs"  # features/<split>/inputs/NNNNNN.json: input shard i done


def shard_label(url: str) -> str:
    """The input shard's file name (e.g. 00000.tar), whatever reads it: records name their image
    `00000.tar#<key>`, the same whether the shard was read from a folder, over HTTP or a pipe."""
    names = re.findall(r"[^/\s'\"]+\.tar\b", url)
    return names[-1] if names else url


def stats_count(url: str, timeout: float = 60.0) -> int | None:
    """The samples an input shard holds by img2dataset's own count: the `successes` of the
    `NNNNN_stats.json` it writes beside each `NNNNN.tar` (local or http(s)); None without one."""
    if url.startswith("pipe:") or not url.endswith(".tar"):
        return None
    try:
        stats = json.loads(read_bytes(url[:-len(".tar")] + "_stats.json", timeout))
    except (StoreError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    n = stats.get("successes") if isinstance(stats, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def count_local(url: str) -> int | None:
    """The samples of a local tar (None: not a local file), grouped by webdataset's own rule as
    featurize will read them: its members through the same tar reader, from the headers alone
    (the file mapped, the members' data never touched)."""
    if url.startswith(("pipe:", "http:", "https:")):
        return None
    path = local_path(url)
    try:
        members = local_tar_members(path, map_shard(path, populate=False))
        return sum(1 for _ in wds.tariterators.group_by_keys(members, handler=_reraise))
    except OSError as e:
        raise StoreError(f"{path}: cannot count its samples ({type(e).__name__}: {e})") from None
    except StoreError as e:  # a torn or unreadable shard, named as featurize would name it
        raise StoreError(f"{path}: cannot count its samples ({str(e).removeprefix(f'{path}: ')})") from None


@dataclass(frozen=True)
class Layout:
    """Where each input shard's samples go. `counts[i]`: its samples (exact) or the rows reserved
    for it (not exact: whole output shards, `input_shard_samples`); `source`: where the counts
    came from. Input shard i's sample j is row offsets[i] + j."""

    counts: tuple[int, ...]
    shard_size: int
    exact: bool
    source: str

    @functools.cached_property
    def offsets(self) -> list[int]:
        return [0, *itertools.accumulate(self.counts)]

    @property
    def rows(self) -> int:
        return self.offsets[-1]

    def shards(self, i: int) -> range:
        """The output shards unit i writes: those whose first row is one of input shard i's."""
        off, S = self.offsets, self.shard_size
        return range(-(-off[i] // S), -(-off[i + 1] // S))

    def info(self) -> dict:
        """What the plan (and the manifest) records of it; `from_info` reads it back."""
        return {"input_shard_counts": list(self.counts), "input_counts_exact": self.exact, "input_counts_from": self.source}

    @classmethod
    def from_info(cls, info: dict, shard_size: int) -> "Layout":
        return cls(tuple(info["input_shard_counts"]), shard_size, bool(info["input_counts_exact"]), info["input_counts_from"])


def layout(urls: list[str], reserve: int, shard_size: int, timeout: float = 60.0) -> Layout:
    """The counts of the input shards (stats files, else local counts, read in threads), or, when
    one cannot be known before reading, `reserve` rows (whole output shards) for each."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = list(pool.map(lambda u: stats_count(u, timeout), urls))
        if all(n is not None for n in counts):
            return Layout(tuple(counts), shard_size, True, "img2dataset's NNNNN_stats.json")
        local = list(pool.map(lambda a: a[1] if a[1] is not None else count_local(a[0]), zip(urls, counts)))
    if all(n is not None for n in local):
        return Layout(tuple(local), shard_size, True, "stats files and counts of the local tars" if any(
            n is not None for n in counts) else "counts of the local tars")
    R = -(-reserve // shard_size) * shard_size
    return Layout((R,) * len(urls), shard_size, False, f"reserved (--input_shard_samples {reserve})")


def input_marker(root: Path, i: int) -> Path:
    return Path(root) / INPUTS / f"{i:06d}.json"


def done_inputs(root: Path, n: int) -> set[int]:
    return {i for i in range(n) if input_marker(root, i).exists()}


def drop_unfinished(root: Path, lay: Layout) -> None:
    """The output shards of units without their marker: a killed run wrote some of them; they are
    written again with the rest of their unit."""
    n = len(lay.counts)
    for i in set(range(n)) - done_inputs(root, n):
        for k in lay.shards(i):
            shard_meta_path(root, k).unlink(missing_ok=True)


def mark_done(root: Path, i: int, url: str, rows: int, failures: int) -> None:
    atomic_write_json(input_marker(root, i), {"url": url, "rows": rows, "failures": failures})


def first_images(urls: list[str], n: int, image_size: int, timeout: float) -> Iterator[torch.Tensor]:
    """(b, 3, S, S) uint8 batches of the first n usable images of the input shards (BatchNorm
    calibration of a random backbone)."""
    batch, seen = [], 0
    for url in urls:
        for sample in tar_samples(url, timeout):
            s = parse_sample(sample)
            if isinstance(s, str):
                continue
            try:
                batch.append(to_tensor(decode_rgb(io.BytesIO(s.image), f"{url}#{s.key}"), image_size))
            except ImageError:
                continue
            seen += 1
            if len(batch) == 32 or seen == n:
                yield torch.stack(batch)  # (b, 3, S, S)
                batch = []
            if seen == n:
                return
    if batch:
        yield torch.stack(batch)


class InputShardImages(IterableDataset):
    """Batches of decoded images of whole units (input shards, `Layout`), for featurize's loader.

    Each batch: {"row" (b,), "image" (b, 3, S, S) uint8 (zeros where a sample failed), "ok" (b,),
    "error" [b], "meta" [b] (key, image_id, filename, captions), "closes" (output shards complete
    after it), "input_done" ((i, url, rows, failures) or None), "fatal" (a message or "")}.
    A batch never spans two output shards. Errors come back as a batch with `fatal` set, so the
    main process raises one clear line (not a worker's traceback)."""

    def __init__(self, urls: list[str], mine: list[int], lay: Layout, image_size: int, batch_size: int, timeout: float):
        self.urls, self.mine, self.lay = urls, mine, lay
        self.image_size, self.batch_size, self.timeout = image_size, batch_size, timeout

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.mine[info.id::info.num_workers] if info else self.mine
        for i in mine:
            try:
                yield from self._unit(i)
            except StoreError as e:
                yield {**self._batch([], []), "fatal": str(e)}
                return

    def _samples(self, i: int, start: int, stop: int) -> Iterator[tuple[int, str, InputSample | str | None, str]]:
        """(row, url, sample or its failure or None (counted but missing), key) for rows start..stop-1,
        from input shard i on (the next ones when the rows run past its samples)."""
        lay, off, row, m = self.lay, self.lay.offsets, start, i
        while row < stop and m < len(self.urls):
            url, j = self.urls[m], 0
            skip = row - off[m]  # the earlier unit's samples of this shard: counted, not decoded
            for sample in tar_samples(url, self.timeout):
                if j >= lay.counts[m]:
                    raise StoreError(f"{url}: holds more than the {lay.counts[m]} samples "
                                     + ("its NNNNN_stats.json counts (a stale stats file?)" if lay.exact else
                                        "reserved per input shard; raise --input_shard_samples to the most samples an "
                                        "input shard holds (img2dataset's number_sample_per_shard)"))
                if j >= skip:
                    if row >= stop:
                        return
                    yield row, url, parse_sample(sample), sample.get("__key__", "?")
                    row += 1
                j += 1
            if not lay.exact:  # reserved rows the shard did not fill stay empty
                return
            while row < min(off[m + 1], stop):  # counted, not in the tar
                yield row, url, None, f"<sample {row - off[m]}>"
                row += 1
            m += 1

    def _unit(self, i: int) -> Iterator[dict]:
        shards, S = self.lay.shards(i), self.lay.shard_size
        start, stop = shards.start * S, min(shards.stop * S, self.lay.rows)
        items, part, failures, written = [], shards.start, 0, 0
        for row, url, sample, key in self._samples(i, start, stop) if shards else ():
            if row // S != part:  # the previous output shard is complete
                yield self._batch(items, [part])
                items, part = [], row // S
            if sample is None:
                item = self._item(url, row, "missing: its NNNNN_stats.json counts more samples than the tar holds", key)
            else:
                item = self._item(url, row, sample, key)
            failures += not item["ok"]
            written += 1
            items.append(item)
            if len(items) == self.batch_size:
                yield self._batch(items, [])
                items = []
        yield {**self._batch(items, list(range(part, shards.stop))), "input_done": (i, self.urls[i], written, failures)}

    def _item(self, url: str, row: int, s: InputSample | str, key: str) -> dict:
        blank = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        if isinstance(s, str):
            return {"row": row, "image": blank, "ok": False, "error": f"{url}#{key}: {s}",
                    "meta": {"filename": f"{shard_label(url)}#{key}"}}
        where = f"{url}#{s.key}"
        meta = {"key": s.key, "image_id": s.image_id, "filename": f"{shard_label(url)}#{s.key}", "captions": s.tokens}
        try:
            image = to_tensor(decode_rgb(io.BytesIO(s.image), where), self.image_size)
        except ImageError as e:
            return {"row": row, "image": blank, "ok": False, "error": str(e), "meta": meta}
        return {"row": row, "image": image, "ok": True, "error": "", "meta": meta}

    def _batch(self, items: list[dict], closes: list[int]) -> dict:
        S = self.image_size
        return {"row": torch.tensor([it["row"] for it in items], dtype=torch.long),
                "image": torch.stack([it["image"] for it in items]) if items else torch.empty(0, 3, S, S, dtype=torch.uint8),
                "ok": torch.tensor([it["ok"] for it in items], dtype=torch.bool),
                "error": [it["error"] for it in items], "meta": [it["meta"] for it in items],
                "closes": closes, "input_done": None, "fatal": ""}
