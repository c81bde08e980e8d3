"""Reading Karpathy's split file (`dataset_coco.json`) or any file in its format.

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "...jpg",
      "imgid": 0, "cocoid": 391895, "split": "test",
      "sentences": [{"tokens": [...], "raw": "...", "imgid": 0, "sentid": 0}, ...]}]}

Every stage reads the split file through `load_split`, so featurize, the vocabulary
and the scorer agree on which images a split holds and what their captions are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from common.files import read_json

SPLITS = ("train", "val", "test", "restval")


class DatasetError(UserError):
    """A split file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageEntry:
    """One image of a split: what featurize reads and what the scorer compares against."""

    key: str  # stable unique record key, e.g. coco_000000391895
    image_id: int  # COCO id (Karpathy `cocoid`), used in results JSON
    filename: str  # path relative to the image root: filepath/filename
    split: str
    tokens: list[list[str]]  # one token list per reference sentence
    raw: list[str]  # the raw reference sentences (what coco-caption tokenizes)
    extra: dict = field(default_factory=dict, compare=False)  # e.g. object boxes of the shapes world


def _fail(path: str | os.PathLike, msg: str) -> DatasetError:
    return DatasetError(f"{path}: {msg}")


def read_split_file(path: str | os.PathLike) -> dict:
    """Load a split file, with one-line errors for a missing file, malformed JSON, or another format."""
    data = read_json(path, "file (expected Karpathy's dataset_coco.json or a file in its format)", DatasetError)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise _fail(path, 'not a Karpathy split file: expected an object with an "images" list')
    return data


def expand_split(split: str, restval_in_train: bool = True) -> set[str]:
    """Karpathy split names a requested split covers (`train` includes `restval` by default)."""
    if split == "all":
        return set(SPLITS)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: choose one of train, val, test, restval, all")
    if split == "train" and restval_in_train:
        return {"train", "restval"}
    return {split}


def _key(dataset: str, image_id: int) -> str:
    return f"{dataset}_{image_id:012d}"


def _image_id(path, img: dict, index: int) -> int:
    """The entry's COCO id (`cocoid`, else `imgid`, else its place in the file)."""
    value = img.get("cocoid", img.get("imgid", index))
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise _fail(path, f"images[{index}] has a non-integer image id {value!r}")
    return int(value)


def parse_image(path: str | os.PathLike, dataset: str, img: dict, index: int) -> ImageEntry:
    """Validate one `images[]` entry and turn it into an ImageEntry."""
    where = f"images[{index}]"
    for name in ("filename", "split", "sentences"):
        if name not in img:
            raise _fail(path, f"{where} has no {name!r} field")
    if img["split"] not in SPLITS:
        raise _fail(path, f"{where} ({img['filename']}) has unknown split {img['split']!r}")
    sentences = img["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise _fail(path, f"{where} ({img['filename']}) has no sentences")
    tokens, raw = [], []
    for s in sentences:
        if not isinstance(s, dict) or not isinstance(s.get("tokens"), list):
            raise _fail(path, f"{where} ({img['filename']}) has a sentence without a tokens list")
        tokens.append([str(t) for t in s["tokens"]])
        raw.append(str(s.get("raw", " ".join(s["tokens"]))))
    image_id = _image_id(path, img, index)
    rel = os.path.join(img.get("filepath", ""), img["filename"])
    # Paths from a split file never leave the image root.
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        raise _fail(path, f"{where} has a file path outside the image root: {rel!r}")
    extra = {k: v for k, v in img.items() if k not in ("filepath", "filename", "imgid", "cocoid", "split", "sentences", "sentids")}
    return ImageEntry(_key(dataset, image_id), image_id, rel, img["split"], tokens, raw, extra)


def load_split(path: str | os.PathLike, split: str = "train", restval_in_train: bool = True) -> list[ImageEntry]:
    """The images of `split` in file order.

    Args:
        path: Karpathy-format JSON.
        split: train, val, test, restval or all.
        restval_in_train: `train` also takes `restval` (the anchors' choice: 113,287 images).
    """
    wanted = expand_split(split, restval_in_train)
    data = read_split_file(path)
    dataset = str(data.get("dataset", "coco"))
    out, seen = [], {}  # image id -> (index, split) of every image in the file, whichever split was asked
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise _fail(path, f"images[{i}] is not an object")
        image_id = _image_id(path, img, i)
        if image_id in seen:  # the same image twice, e.g. in train and in test: scores would be meaningless
            j, other = seen[image_id]
            raise _fail(path, f"images[{i}] ({img.get('split')}) repeats image id {image_id} of images[{j}] ({other})")
        seen[image_id] = (i, img.get("split"))
        if img.get("split") not in wanted and img.get("split") in SPLITS:
            continue
        out.append(parse_image(path, dataset, img, i))
    if not out:
        raise _fail(path, f"split {split!r} holds no images")
    return out
