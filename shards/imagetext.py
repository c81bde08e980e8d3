"""Image-text tar shards in img2dataset's layout: the input of corpora beyond COCO.

    00000.tar:  000000000.jpg   the image (.jpg, .jpeg, .png or .webp)
                000000000.txt   its caption (UTF-8)
                000000000.json  metadata: img2dataset's (url, key, status, width, ...), and
                                optionally `caption` (one) or `captions` (a list: several references)
    00000.parquet               beside the tar: the same metadata as a table (not read here)

`parse_sample` turns one tar sample into an `InputSample` or says why it cannot be used (a
listed failure, not an error: one bad sample does not stop a corpus). Captions are tokenized as
Karpathy's prepro did for COCO (lower case, punctuation removed, split on whitespace), so the
records of both inputs read alike. The record's `image_id` comes from the key: the number itself
for img2dataset's numeric keys, else the first 52 bits of its SHA-256 (stable, within JSON's
exact integers). Nothing is unpickled: members other than these are refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import string
import tarfile
from dataclasses import dataclass
from pathlib import Path

from common.files import temp_path
from shards.format import good_key

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "json")
_INTERNAL = {"__key__", "__url__", "__local_path__"}
_PUNCT = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class InputSample:
    key: str
    image_id: int
    image: bytes
    raw: list[str]  # the captions as written
    tokens: list[list[str]]  # one token list per caption


def tokenize(text: str) -> list[str]:
    """Karpathy's prepro: lower case, punctuation removed, split on whitespace."""
    return text.lower().translate(_PUNCT).split()


def image_id_of(key: str) -> int:
    """A stable integer id of a sample key (results JSON and scoring key on it)."""
    if key.isdigit() and len(key) <= 15:
        return int(key)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big") >> 4 | 1 << 52  # never a numeric key's id


def parse_sample(sample: dict) -> InputSample | str:
    """The usable sample, or the reason it is not (a string)."""
    key = sample.get("__key__", "")
    if not isinstance(key, str) or not good_key(key):
        return f"key {key!r} is not usable as a record key (letters, digits, _ and - only)"
    other = sorted(set(sample) - _INTERNAL - set(IMAGE_EXTS) - set(TEXT_EXTS) - {"parquet"})
    if other:
        return f"refusing member(s) .{', .'.join(other)} (only images, .txt and .json are read; nothing is unpickled)"
    images = [e for e in IMAGE_EXTS if e in sample]
    if not images:
        return "no image (.jpg, .jpeg, .png or .webp)"
    raw: list[str] = []
    if "json" in sample:
        try:
            meta = json.loads(bytes(sample["json"]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f".json is not UTF-8 JSON ({e})"
        except RecursionError:
            return ".json is nested too deep to read"
        if isinstance(meta, dict):
            caps = meta.get("captions", meta.get("caption"))
            caps = [caps] if isinstance(caps, str) else caps
            if caps is not None and (not isinstance(caps, list) or not all(isinstance(c, str) for c in caps)):
                return ".json's captions must be a string or a list of strings"
            raw = list(caps or [])
    if not raw and "txt" in sample:
        try:
            raw = [bytes(sample["txt"]).decode("utf-8")]
        except UnicodeDecodeError as e:
            return f".txt caption is not UTF-8 ({e})"
    raw = [re.sub(r"\s+", " ", c).strip() for c in raw]
    tokens = [t for t in (tokenize(c) for c in raw) if t]
    if not tokens:
        return "no caption (.txt, or .json caption/captions)"
    return InputSample(key, image_id_of(key), bytes(sample[images[0]]), [c for c in raw if tokenize(c)], tokens)


def write_image_text_shards(samples, out, per_shard: int) -> list[Path]:
    """Tar shards in img2dataset's layout from (key, {ext: bytes}) samples, `per_shard` to a tar
    (00000.tar, 00001.tar, ...), each written to a temporary name and renamed; fixed member
    metadata, so the same samples give the same bytes. Returns the shard paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tar = None
    for n, (key, members) in enumerate(samples):
        if n % per_shard == 0:
            if tar is not None:
                _close(tar, paths[-1])
            paths.append(out / f"{n // per_shard:05d}.tar")
            tar = tarfile.open(temp_path(paths[-1]), "w", format=tarfile.PAX_FORMAT)
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    if tar is not None:
        _close(tar, paths[-1])
    return paths


def _close(tar: tarfile.TarFile, path: Path) -> None:
    tar.close()
    os.replace(tar.name, path)
