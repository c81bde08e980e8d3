"""Reference captions from a split file: the raw sentences coco-caption tokenizes with the
results. (A feature store's own references, for stores made from input shards and for
CIDEr-D's rewards, come from caption/splits.py.)"""

from __future__ import annotations

from typing import Iterable

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
