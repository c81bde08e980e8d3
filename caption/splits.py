"""A split's data, opened once: its feature store, its images, its references.

    data = open_splits(cfg, ("train", "val"))   # in train.py's setup, once per run
    check_split(data["val"], ...)               # training and evaluation check a split alike

A store made from a Karpathy split file has the file's entries for its images and their raw
sentences as references; a store made from image-text input shards has no split file: its
records are its images and their token lists its references. Everything that reads a
split (the loaders, validation, the vocabulary, CIDEr-D's document frequencies) takes the
`Split` instead of opening the store again: a store over HTTP is fetched once, a folder's
index read and checked once. This module is the only place caption/ opens a store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from caption.references import raw_references
from shards import open_store
from shards.format import Record
from shards.karpathy import ImageEntry, expand_split, load_split
from shards.manifest import StoreError, check_same_features, foreign_records


def from_records(manifest: dict) -> bool:
    """Whether a store was made from image-text input shards: its records are its only references."""
    return "input_shards" in manifest


@dataclass
class Split:
    """One split of a run: the opened store and, when there is one, the split file's entries."""
    name: str
    root: Path | str
    store: object  # shards' ZarrReader, WdsReader or RemoteWdsReader
    entries: list[ImageEntry] | None = None  # the split file's (`attach`); None for a store made from input shards
    split_file: str = ""
    _refs: dict | None = field(default=None, repr=False)

    @property
    def manifest(self) -> dict:
        return self.store.manifest

    @property
    def from_records(self) -> bool:
        return from_records(self.manifest)

    def attach(self, entries: list[ImageEntry], split_file: str, restval_in_train: bool = True) -> "Split":
        """The split file's entries of this split, from `entries` (the whole file's, parsed once for
        every split); a store made from input shards keeps its records as its images."""
        if not self.from_records:
            names = expand_split(self.name, restval_in_train)
            self.entries, self.split_file = [e for e in entries if e.split in names], str(split_file)
        return self

    def file_entries(self) -> list[ImageEntry]:
        """The split file's entries of this split (a store made from a split file, `attach`ed)."""
        if self.entries is None:
            raise StoreError(f"{self.root}: made from a split file, which was not read (give --input_json)")
        return self.entries

    def image_ids(self) -> set[int]:
        """The split's images: the store's own records (input shards), or the split file's."""
        if self.from_records:
            return {r["image_id"] for r in self.store.records}
        return {e.image_id for e in self.file_entries()}

    def references(self, image_ids: Iterable[int] | None = None) -> dict[int, list[str]]:
        """Raw reference sentences by image id (what coco-caption tokenizes): the records' token
        lists joined by spaces (read back as the same tokens), or the split file's sentences."""
        if self._refs is None:
            if self.from_records:
                self._refs = {r["image_id"]: [" ".join(c) for c in r["captions"]] for r in self.store.records}
            else:
                self._refs = raw_references(self.file_entries())
        return self._refs if image_ids is None else {i: self._refs[i] for i in image_ids}

    def records(self, rank: int = 0, world: int = 1, limit: int = -1) -> Iterator[Record]:
        """The store's records in order, this rank's share (i % world == rank), the first `limit` overall."""
        return share(self.store.iter_records(), rank, world, limit)

    def entries_in_store(self) -> list[ImageEntry]:
        """The split file's entries whose image the store holds (no failures, --limit), in file order."""
        keys = {r["key"] for r in self.store.records}
        return [e for e in self.file_entries() if e.key in keys]


def share(items: Iterable, rank: int = 0, world: int = 1, limit: int = -1) -> Iterator:
    """Items in order, this rank's share (i % world == rank), the first `limit` overall."""
    for i, item in enumerate(items):
        if 0 <= limit <= i:
            break
        if i % world == rank:
            yield item


def open_split(root: Path | str, name: str, split_file: str = "", restval_in_train: bool = True,
               url_timeout: float = 60.0) -> Split:
    """The split `name` stored at `root`, its store opened (a store at a URL: `url_timeout` seconds
    per connect and read, for its index and every stream of its shards), and its entries read from
    `split_file` when given, unless the store was made from input shards."""
    split = Split(name, root, open_store(root, timeout=url_timeout))
    if split_file and not split.from_records:
        split.attach(load_split(split_file, "all"), split_file, restval_in_train)
    return split


def check_split(split: Split, identity: dict | None = None, against: str = "", others: Iterable[Split] = ()) -> None:
    """A split fit to train on or score: its grids from the encoder `identity` names (described by
    `against`), every record an image of the split in the split file (none smuggled in), and for
    stores made from input shards, no image also in one of `others`. A StoreError names the folder."""
    if identity is not None:
        check_same_features(split.manifest, identity, str(split.root), against)
    if split.from_records:
        for other in others:  # the smaller split's keys held, the larger one's streamed past them
            small, large = sorted((split, other), key=lambda x: len(x.store))
            keys = {r["key"] for r in small.store.records}
            both = [r["key"] for r in large.store.records if r["key"] in keys]
            if both:
                raise StoreError(f"{split.root}: {len(both)} record(s) are also in {other.root} (first: {both[0]}); the "
                                 f"{split.name} shards must hold other images than the {other.name} shards")
        return
    bad = foreign_records(split.store.records, split.image_ids())
    if bad:
        raise StoreError(f"{split.root}: {len(bad)} record(s) are not images of split {split.name!r} in {split.split_file} "
                         f"(first: {bad[0]['key']}); featurize this split from the same split file")
