"""The record: one per image, identical whichever backend wrote it. Written down once, here.

| field      | type                                   | notes                                        |
|------------|----------------------------------------|----------------------------------------------|
| key        | str                                    | stable, unique, e.g. coco_000000391895       |
| image_id   | int                                    | COCO id (Karpathy cocoid), used in results   |
| filename   | str                                    | path relative to the image root              |
| features   | np.ndarray float16 (grid, grid, C) HWC | C = 2048 for ResNet-50/101/152 layer4        |
| captions   | list[list[str]]                        | Karpathy's sentences[].tokens, words not ids |
"""

from __future__ import annotations

import re
from typing import TypedDict

import crc32c
import numpy as np

from common.errors import UserError

DTYPE = np.dtype("float16")
GRID = 14
FIELDS = ("key", "image_id", "filename", "features", "captions")
_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")  # no dots: a dot would split webdataset's field names


def good_key(key: str) -> bool:
    return bool(_KEY.match(key))


def checksum(x: np.ndarray) -> int:
    """CRC-32C of a grid's bytes (C order, little-endian float16): the per-record checksum the
    WebDataset backend stores beside each grid and checks at every read (zarr checks its own
    crc32c per chunk). The `crc32c` package releases the GIL."""
    return crc32c.crc32c(memoryview(np.ascontiguousarray(x, dtype="<f2")).cast("B"))


class Record(TypedDict):
    key: str
    image_id: int
    filename: str
    features: np.ndarray
    captions: list[list[str]]


class StoreError(UserError):
    """A features folder that cannot be used; the message names the file and the problem."""


class RecordError(StoreError):
    """A record that breaks the format (written or read, either backend); the message names where
    it came from and its key."""


def meta(record: Record) -> dict:
    """Everything but the features: what sits beside the grid (JSON-able)."""
    return {"key": record["key"], "image_id": int(record["image_id"]), "filename": record["filename"],
            "captions": record["captions"]}


def validate(record: dict, grid: int | None = GRID, channels: int | None = None, where: str = "",
             finite_values: bool | None = None) -> Record:
    """Check a record's fields, shape, dtype and values; return it unchanged.

    Args:
        grid: expected grid side (None: any square grid).
        channels: expected C (None: any).
        where: the file the record came from, for the error message.
        finite_values: whether the features are known finite (checked already, e.g. by the
            thread that decoded them); None: check here.
    """
    prefix = f"{where}: " if where else ""
    key = record.get("key")
    if not isinstance(key, str) or not good_key(key):
        raise RecordError(f"{prefix}bad key {key!r} (letters, digits, _ and - only)")
    at = f"{prefix}record {key}: "
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise RecordError(at + f"missing field(s) {', '.join(missing)}")
    if not isinstance(record["image_id"], (int, np.integer)) or isinstance(record["image_id"], bool):
        raise RecordError(at + f"image_id must be an integer, got {record['image_id']!r}")
    if not isinstance(record["filename"], str):
        raise RecordError(at + "filename must be a string")
    caps = record["captions"]
    if not isinstance(caps, list) or not all(isinstance(c, list) and all(isinstance(w, str) for w in c) for c in caps):
        raise RecordError(at + "captions must be a list of token lists")
    x = record["features"]
    if not isinstance(x, np.ndarray):
        raise RecordError(at + f"features must be a numpy array, got {type(x).__name__}")
    if x.dtype != DTYPE:
        raise RecordError(at + f"features dtype {x.dtype}, expected float16")
    if x.ndim != 3 or x.shape[0] != x.shape[1] or (grid is not None and x.shape[0] != grid):
        want = f"({grid}, {grid}, C)" if grid else "(g, g, C)"
        raise RecordError(at + f"features shape {x.shape}, expected {want}")
    if channels is not None and x.shape[2] != channels:
        raise RecordError(at + f"features have {x.shape[2]} channels, expected {channels}")
    if not (finite(x) if finite_values is None else finite_values):
        raise RecordError(at + "features hold NaN or inf")
    return record  # type: ignore[return-value]


def finite(x: np.ndarray) -> bool:
    """No NaN or inf in a float16 array. Read as int16, finite values lie below +inf's bits (0x7C00);
    read as uint16, below -inf's (0xFC00): two max reductions, no temporaries (np.isfinite on half makes a float32 copy)."""
    return x.size == 0 or (int(x.view(np.int16).max()) < 0x7C00 and int(x.view(np.uint16).max()) < 0xFC00)
