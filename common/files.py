"""File writes that readers never see half done, and reads that fail with one line naming the file.

Every write goes to a temporary name beside its target, is fsynced, and replaces the target
in one rename: a killed writer leaves the old file (or none) and a `.NAME.PID.tmp` to ignore.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import IO, Iterable, Iterator

from common.errors import UserError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`with atomic_open(p) as f: f.write(...)`: p is replaced by what was written, or untouched
    when the block raises. The temporary name is unique per process and thread."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_path(path: str | os.PathLike) -> Path:
    """A temporary name beside `path` for writers that take a file name (safetensors, savefig);
    `os.replace(temp_path, path)` when done."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors, replaced atomically (`atomic_write_parts`), with the permissions open() gives
    any file (safetensors' own save_file creates its files 0600)."""
    from safetensors.torch import save
    atomic_write_parts(path, [save(tensors, metadata=metadata)])


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = None) -> None:
    """JSON, written atomically: readers see the old file or the new one."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_parts(path: str | os.PathLike, parts: Iterable) -> tuple[int, str]:
    """A file from its pieces (bytes or buffer views, written as they are, never joined), written
    atomically; returns (bytes, sha256 hex) of what was written."""
    h, size = hashlib.sha256(), 0
    with atomic_open(path, "wb") as f:
        for part in parts:
            f.write(part)
            h.update(part)
            size += memoryview(part).nbytes
    return size, h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def regular_file(path: str | os.PathLike, what: str, error: type[Exception] = UserError) -> os.stat_result:
    """stat() of a regular file, or `error` saying what is there instead: nothing, a folder, a
    symlink loop, a FIFO or device (which would block or never end when read)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: a broken symlink, not a {what}" if path.is_symlink() else f"{path}: no such {what}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{path}: a symlink loop, not a {what}") from None
        raise error(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: a folder, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file (a FIFO, socket or device), not a {what}")
    return st


def read_json(path: str | os.PathLike, what: str, error: type[Exception] = UserError):
    """A JSON file's content, or `error` with one line naming the file: missing, not a file, or
    malformed where. A UTF-8 byte-order mark is accepted (editors on Windows write one)."""
    path = Path(path)
    regular_file(path, what, error)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({what}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({what}): {e}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deep to read ({what})") from None


def inside(root: str | os.PathLike, rel, where: str, error: type[Exception] = UserError) -> Path:
    """root/rel, when `rel` (from a manifest, shard JSON or split file) names a path inside root:
    relative, no `..`, and, symlinks resolved, still under the resolved root. Else `error`."""
    root = Path(root)
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise error(f"{where}: path {rel!r} is not inside {root} (relative paths below it only)")
    path = root / rel
    real, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        raise error(f"{where}: {path} resolves to {real}, outside {root} (a symlink)")
    return path
