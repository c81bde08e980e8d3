"""Reference captions, where scoring takes them from: raw sentences from the split file for
coco-caption (it tokenizes them with the results), token lists from the feature store's
records for CIDEr-D rewards. A store made from image-text input shards has no split file: its
records are the references (their token lists joined by spaces, which coco-caption's tokenizer
reads back as the same tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from shards import open_store
from shards.karpathy import load_split


def raw_references(entries: list, image_ids: Iterable[int] | None = None) -> dict[int, list[str]]:
    """Raw reference sentences by image id, from a split's entries (`load_split`)."""
    refs = {e.image_id: e.raw for e in entries}
    if image_ids is None:
        return refs
    return {i: refs[i] for i in image_ids}


def references_for(input_json: str, split: str, image_ids: Iterable[int] | None = None,
                   restval_in_train: bool = True) -> dict[int, list[str]]:
    """`raw_references` of a split read from its file."""
    return raw_references(load_split(input_json, split, restval_in_train), image_ids)


def from_records(manifest: dict) -> bool:
    """Whether a store was made from image-text input shards: its records are its only references."""
    return "input_shards" in manifest


def record_references(features: str | Path, image_ids: Iterable[int] | None = None) -> dict[int, list[str]]:
    """Raw reference sentences by image id, from a store's records."""
    refs = {r["image_id"]: [" ".join(c) for c in r["captions"]] for r in open_store(features).records}
    if image_ids is None:
        return refs
    return {i: refs[i] for i in image_ids}


def store_references(features: str | Path) -> list[list[list[str]]]:
    """Every record's reference token lists in a feature store (CIDEr-D's document frequencies
    for self-critical training come from the training images')."""
    return [r["captions"] for r in open_store(features).records]
