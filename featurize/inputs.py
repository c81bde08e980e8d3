"""Image-text tar shards (img2dataset's layout) as featurize's input, beside Karpathy's split file.

    python -m featurize --split train --input_shards 'http://host/cc3m/{00000..00331}.tar' --format wds

Rows are reserved per input shard before any is read: input shard i owns rows [i*R, (i+1)*R),
R = the most samples an input shard holds by img2dataset's `NNNNN_stats.json` beside it (else
`input_shard_samples`), rounded up to whole output shards, and its sample j is row i*R + j. Output shards never mix input shards, so the output
store's plan is fixed before anything is read, and the work unit is the input shard:

- each process takes input shards i % processes == rank, and each of its DataLoader workers
  whole input shards of those (disjoint: no two readers ever open the same tar);
- an input shard is done when `inputs/NNNNNN.json` (its URL, sample count, failures) exists,
  written after all of its output shards; a killed run redoes the input shards that have none,
  dropping whatever of their output shards it had written;
- a sample that cannot be used (no image, no caption, a refused member, a caption that is not
  UTF-8, an image that does not decode) is a listed failure naming URL and key; a shard that
  cannot be read (HTTP 404, refused, cut short, torn) stops the run with its URL.
"""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from common.files import atomic_write_json, read_json
from featurize.images import ImageError, decode_rgb, to_tensor
from shards.format import StoreError
from shards.imagetext import InputSample, parse_sample
from shards.manifest import shard_meta_path
from shards.remote import read_bytes, tar_samples

INPUTS = "inputs"  # features/<split>/inputs/NNNNNN.json: input shard i done


def shard_label(url: str) -> str:
    """The input shard's file name (e.g. 00000.tar), whatever reads it: records name their image
    `00000.tar#<key>`, the same whether the shard was read from a folder, over HTTP or a pipe."""
    names = re.findall(r"[^/\s'\"]+\.tar\b", url)
    return names[-1] if names else url


def img2dataset_counts(urls: list[str], timeout: float = 60.0) -> list[int] | None:
    """How many samples each input shard holds by img2dataset's own count: the `successes` of the
    `NNNNN_stats.json` it writes beside each `NNNNN.tar` (local or http(s)). None when a shard has
    none (a `pipe:` URL, shards another tool wrote): then `input_shard_samples` rows are reserved."""
    def count(url: str) -> int | None:
        if url.startswith("pipe:") or not url.endswith(".tar"):
            return None
        try:
            stats = json.loads(read_bytes(url[:-len(".tar")] + "_stats.json", timeout))
        except (StoreError, ValueError, UnicodeDecodeError, RecursionError):
            return None
        n = stats.get("successes") if isinstance(stats, dict) else None
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None

    with ThreadPoolExecutor(max_workers=16) as pool:
        counts = list(pool.map(count, urls))
    return None if not counts or any(n is None for n in counts) else counts


def rows_per_input(samples: int, shard_size: int) -> int:
    """R: the rows each input shard owns, `samples` rounded up to whole output shards."""
    return -(-samples // shard_size) * shard_size


def input_marker(root: Path, i: int) -> Path:
    return Path(root) / INPUTS / f"{i:06d}.json"


def done_inputs(root: Path, n: int) -> set[int]:
    return {i for i in range(n) if input_marker(root, i).exists()}


def drop_unfinished(root: Path, n: int, parts: int) -> None:
    """The output shards of input shards without their marker: a killed run wrote some of them;
    they are written again with the rest of their input shard."""
    for i in set(range(n)) - done_inputs(root, n):
        for k in range(i * parts, (i + 1) * parts):
            shard_meta_path(root, k).unlink(missing_ok=True)


def mark_done(root: Path, i: int, url: str, samples: int, failures: int) -> None:
    atomic_write_json(input_marker(root, i), {"url": url, "samples": samples, "failures": failures})


def input_counts(root: Path, n: int) -> list[dict]:
    return [read_json(input_marker(root, i), "input shard marker") for i in range(n)]


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
    """Batches of decoded images of whole input shards, for featurize's loader.

    Each batch: {"row" (b,), "image" (b, 3, S, S) uint8 (zeros where a sample failed), "ok" (b,),
    "error" [b], "meta" [b] (key, image_id, filename, captions), "closes" (output shards complete
    after it), "input_done" ((i, url, samples, failures) or None), "fatal" (a message or "")}.
    A batch never spans two output shards. Errors come back as a batch with `fatal` set, so the
    main process raises one clear line (not a worker's traceback)."""

    def __init__(self, urls: list[str], mine: list[int], rows: int, shard_size: int, image_size: int,
                 batch_size: int, timeout: float):
        self.urls, self.mine, self.R, self.S = urls, mine, rows, shard_size
        self.image_size, self.batch_size, self.timeout = image_size, batch_size, timeout

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.mine[info.id::info.num_workers] if info else self.mine
        for i in mine:
            try:
                yield from self._shard(i)
            except StoreError as e:
                yield {**self._batch([], []), "fatal": str(e)}
                return

    def _shard(self, i: int) -> Iterator[dict]:
        url, parts = self.urls[i], self.R // self.S
        items, part, j, failures = [], 0, 0, 0
        for sample in tar_samples(url, self.timeout):
            if j >= self.R:
                raise StoreError(f"{url}: holds more than {self.R} samples; raise --input_shard_samples to the most "
                                 "samples an input shard holds (img2dataset's number_sample_per_shard)")
            if j // self.S != part:  # the previous output shard is complete
                yield self._batch(items, [i * parts + part])
                items, part = [], j // self.S
            item = self._item(url, i * self.R + j, parse_sample(sample), sample.get("__key__", "?"))
            failures += not item["ok"]
            items.append(item)
            j += 1
            if len(items) == self.batch_size:
                yield self._batch(items, [])
                items = []
        yield {**self._batch(items, list(range(i * parts + part, (i + 1) * parts))),
               "input_done": (i, url, j, failures)}

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
