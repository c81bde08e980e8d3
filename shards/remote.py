"""Shards wherever they live: a path, a `file:` URL, `http(s)://`, or `pipe:COMMAND` (its stdout).

    expand("http://host/cc3m/{00000..00331}.tar")        # brace expansion, webdataset's syntax
    for sample in tar_samples("http://host/cc3m/00000.tar"): ...   # {"__key__", "__url__", "jpg": ...}
    read_bytes("http://host/features/train/manifest.json")

A shard is streamed, never downloaded first. Every fault is a StoreError naming the URL (and the
last key read): an HTTP status (404), a refused or timed-out connection (`timeout` seconds per
connect and per read), a transfer that stalls (fewer than 64 KiB in any `timeout` seconds: a
server that drips bytes, a `pipe:` command that writes nothing), a member larger than its stated
cap (read whole otherwise: `max_member`), a command that exits non-zero,
a tar cut short anywhere (mid-member, at a member boundary, or before its end-of-archive blocks: a
tar stream holds no length of its own, so the end blocks are checked, and an HTTP body shorter than
its Content-Length is named as such). Object stores go through their own command line tools:
`pipe:aws s3 cp s3://bucket/00000.tar -`, `pipe:gsutil cat gs://bucket/00000.tar`.
"""

from __future__ import annotations

import functools
import http.client
import io
import os
import select
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
import webdataset as wds

from common.machine import cores
from shards.ahead import ReceiveAhead
from shards.format import StoreError

TIMEOUT = 60.0  # seconds per connect and per read of an HTTP shard
MIN_PROGRESS = 1 << 16  # bytes a transfer must deliver in every `timeout` seconds (else it has stalled)
MAX_INPUT_MEMBER = 256 << 20  # an input sample's member (an image, a caption): larger is refused, not read
_AFTER_END = 1 << 20  # zero bytes accepted after the end-of-archive blocks begin (record padding)
# Without the receiving thread (READ_AHEAD off), a streamed tar is received into a reused buffer of
# this size and each member copied out of it: the kernel's copy into memory in the cache costs less
# than into each member's new array (2 cores, the same rounds: 376 µs a grid against 415 with a
# 64 KiB buffer, whose larger reads go straight into the member's array, and 418 with 16 KiB;
# bench/RESULTS.md).
_BUFFER = 1 << 20
# An HTTP shard's socket gets a receive buffer of this many bytes (the kernel doubles it), as far as
# net.core.rmem_max allows (at least 1 MiB, else the kernel's own sizing is kept): on 2 cores grids
# streamed at 0.89 of the local read with 4 MiB against 0.63 with the kernel's growing buffer (the
# same rounds, received by the thread below; on the reading thread 376-408 µs a grid against
# 418-450, the kernel's time per grid 117-137 µs against 156-176). A fixed window bounds one stream
# to about 8 MiB per round trip: 8 GB/s at 1 ms, 80 MB/s at 100 ms (another region):
# SHARDS_RECEIVE_BUFFER=0 leaves it to the kernel.
RECEIVE_BUFFER = int(os.environ.get("SHARDS_RECEIVE_BUFFER", 4 << 20))
_SCHEMES = ("http://", "https://", "pipe:", "file:")
# A streamed tar is received by a thread of its own (shards.ahead.ReceiveAhead) into AHEAD_BUFFERS
# reused buffers of AHEAD_SIZE bytes while the consumer parses and checks the bytes before: the
# kernel's copy out of the socket (the GIL released) overlaps the consumer's work, the GIL changing
# hands once per buffer. On 2 cores, with the server on the same two, grids in shards of featurize's
# size streamed at 0.77-0.90 of the local read with it (median 0.82 over six runs) and 0.69-0.77
# without (the same rounds; bench/RESULTS.md, "Streaming over HTTP"); the earlier thread, which
# also parsed the tar, 0.49.
# Not on one core, where there is nothing to overlap. SHARDS_READ_AHEAD=1 or 0 in the environment
# decides instead (every process and DataLoader worker of a run reads it).
READ_AHEAD = {"1": True, "0": False}.get(os.environ.get("SHARDS_READ_AHEAD", ""), cores() > 1)
AHEAD_SIZE, AHEAD_BUFFERS = 4 << 20, 2


def is_url(location) -> bool:
    """Whether a shard or store location is a URL (http, https, pipe:, file:) rather than a path."""
    return isinstance(location, str) and location.startswith(_SCHEMES)


def is_remote(location) -> bool:
    """http(s) or pipe: (not a file on this machine)."""
    return is_url(location) and not location.startswith("file:")


def local_path(location: str) -> str:
    """The path a location names on this machine (`file:` stripped)."""
    return location[len("file:"):] if location.startswith("file:") else location


def join(root: str, *parts: str) -> str:
    """A URL below `root` (http(s) and file: URLs; a `pipe:` command has no below)."""
    if root.startswith("pipe:"):
        raise StoreError(f"{root}: a pipe: command names one shard; give a store as a folder or an http(s) URL")
    return "/".join([root.rstrip("/"), *parts])


def expand(pattern: str) -> list[str]:
    """Shard URLs of a pattern: brace expansion (`{00000..00099}`), several patterns separated by
    whitespace outside a `pipe:` command or by `::`, as webdataset writes them."""
    out: list[str] = []
    pieces = pattern.split("::") if "::" in pattern or pattern.startswith("pipe:") else pattern.split()
    for piece in pieces:
        out += list(braceexpand.braceexpand(piece.strip()))
    urls = [u for u in out if u]
    if not urls:
        raise StoreError(f"{pattern!r}: names no shards")
    return urls


class _PipeStream(io.RawIOBase):
    """stdout of `pipe:COMMAND`; closing it waits for the command and raises on a non-zero exit."""

    def __init__(self, url: str, timeout: float = TIMEOUT):
        self.url, self.timeout = url, timeout
        self.err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on it
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=self.err, bufsize=0)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not select.select([self.proc.stdout], [], [], self.timeout)[0]:  # unbuffered: select sees what is there
            raise StoreError(f"{self.url}: the command wrote nothing for {self.timeout:g} s (stalled? --url_timeout)")
        return self.proc.stdout.readinto(b)

    def finish(self) -> None:
        """The command's exit status checked (after its output was read to the end)."""
        self.proc.stdout.close()
        rc = self.proc.wait()
        self.err.seek(0)
        said = self.err.read().decode("utf-8", "replace").strip().splitlines()
        self.err.close()
        if rc != 0:
            raise StoreError(f"{self.url}: the command exited with status {rc}" + (f": {said[-1]}" if said else ""))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        super().close()


@contextmanager
def open_stream(url: str, timeout: float = TIMEOUT) -> Iterator:
    """A binary stream of a location's bytes (read sequentially); a StoreError naming it when it
    cannot be opened."""
    if url.startswith(("http://", "https://")):
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "shards"}), timeout=timeout)
        except urllib.error.HTTPError as e:
            raise StoreError(f"{url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise StoreError(f"{url}: cannot connect ({e.reason})") from None
        except (OSError, http.client.HTTPException) as e:
            raise StoreError(f"{url}: cannot connect ({type(e).__name__}: {e})") from None
        with response:
            _widen_receive_buffer(response)
            yield response
    elif url.startswith("pipe:"):
        stream = _PipeStream(url, timeout)
        try:
            yield stream
            stream.finish()
        finally:
            stream.close()
    else:
        path = local_path(url)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise StoreError(f"{path}: cannot open ({e.strerror})") from None
        with f:
            yield f


@functools.lru_cache(maxsize=1)
def _system_receive_limit() -> int:
    """net.core.rmem_max: the most receive buffer a process may ask for (0 where unknown)."""
    try:
        return int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        return 0


def _widen_receive_buffer(response) -> None:
    """The response's socket given RECEIVE_BUFFER bytes of receive buffer, as far as the system
    allows (where it allows less than 1 MiB, or RECEIVE_BUFFER is 0, the kernel's sizing is kept)."""
    size = min(RECEIVE_BUFFER, _system_receive_limit())
    if size >= (1 << 20):
        _on_socket(response, lambda sock: sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size))


def _on_socket(stream, act) -> None:
    """`act(sock)` on the socket under an HTTP response (through another descriptor of it); nothing
    where there is none (a pipe, a file)."""
    try:
        with socket.socket(fileno=os.dup(stream.fileno())) as sock:
            act(sock)
    except (OSError, ValueError, AttributeError):
        pass


def _short_body(f, url: str) -> None:
    """An HTTP body that ended before its Content-Length: named as a cut-short transfer."""
    missing = getattr(f, "length", None)
    if isinstance(f, http.client.HTTPResponse) and missing:
        raise StoreError(f"{url}: the transfer was cut short ({missing} bytes of the Content-Length never came)")


def read_bytes(url: str, timeout: float = TIMEOUT, limit: int = 1 << 30) -> bytes:
    """A whole (small) file: a manifest or a shard's JSON (at most `limit` bytes)."""
    with open_stream(url, timeout) as f:
        w = _Counted(f, url, timeout)
        try:
            data = bytearray()
            while chunk := w.read(1 << 16):
                data += chunk
                if len(data) > limit:
                    raise StoreError(f"{url}: larger than {limit} bytes; not a manifest or shard JSON")
        except (OSError, http.client.HTTPException) as e:
            raise StoreError(f"{url}: the transfer failed ({type(e).__name__}: {e})") from None
        _short_body(f, url)
    return bytes(data)


class _Counted(io.RawIOBase):
    """A stream that counts the bytes it delivered and stops a
    transfer that stalls: fewer than MIN_PROGRESS bytes in `timeout` seconds (a per-read timeout
    never fires on a server that drips a byte a second)."""

    def __init__(self, f, url: str = "", timeout: float = TIMEOUT):
        self.f, self.n = f, 0
        self.url, self.timeout = url, timeout
        self.waited, self.window_n = 0.0, 0  # seconds spent inside reads since the window began; bytes then

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        t0 = time.monotonic()
        k = self._read_some(b)  # what has arrived (read() would wait for all len(b) bytes)
        self.waited += time.monotonic() - t0  # only time spent waiting for bytes: a slow consumer is not a stall
        self.n += k
        if self.waited >= self.timeout:
            if self.n - self.window_n < MIN_PROGRESS and k:
                raise StoreError(f"{self.url}: the transfer has stalled ({self.n - self.window_n} bytes in "
                                 f"{self.waited:.0f} s of waiting; --url_timeout {self.timeout:g})")
            self.waited, self.window_n = 0.0, self.n
        return k

    def _read_some(self, b) -> int:
        """One read of what is there, into b: an HTTP body of known length straight from its socket
        buffer (http.client's read1 would make a bytes object to copy from), else readinto1 / read1."""
        f = self.f
        if isinstance(f, http.client.HTTPResponse) and not f.chunked and f.length is not None and hasattr(f.fp, "readinto1"):
            if f.length <= 0:
                return 0
            k = f.fp.readinto1(memoryview(b)[:min(len(b), f.length)])
            f.length -= k  # left > 0 when the body ends early: _short_body names it
            return k
        if hasattr(f, "readinto1"):
            return f.readinto1(b)
        read1 = getattr(f, "read1", None)
        if read1 is None:
            return f.readinto(b)  # a pipe's raw stream: what is there
        data = read1(len(b))
        b[:len(data)] = data
        return len(data)


def _exactly(f, n: int) -> np.ndarray:
    """n bytes of a stream read into one new uint8 array (not zero-filled first), or fewer at its end."""
    out = np.empty(n, dtype=np.uint8)
    view, got = memoryview(out), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            break
        got += k
    del view
    return out if got == n else out[:got].copy()


def _pax_fields(data: bytes, name: str) -> dict[str, str]:
    """A PAX extended header's records ("%d %s=%s\n"), as tarfile writes them for long names."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        if length <= 0:
            raise tarfile.ReadError(f"bad PAX header after {name}")
        pos += length
    return out


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
_PLAIN = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.XHDTYPE)


def tar_header(block: bytes) -> tuple[str, int, bytes]:
    """(name, size, type) of a 512-byte tar header block, as `tarfile.TarInfo.frombuf` reads them,
    its checksum checked (a bad one: tarfile.InvalidHeaderError). The common header (a regular
    member or a PAX header, an octal size, no ustar name prefix) is read here in ~4 µs, where
    tarfile takes ~21 µs (two headers per record); any other (GNU, base-256 sizes, prefixed or V7
    names, signed checksums) by tarfile. Fields the readers do not use (mode, owner, times) are not read."""
    kind = block[156:157]
    if kind in _PLAIN and block[124] < 0x80 and not block[345]:
        try:
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            check = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            check = -1
        if check == 256 + sum(block) - sum(block[148:156]):  # the field counted as eight spaces
            name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if not (kind == tarfile.AREGTYPE and name.endswith("/")):  # a V7 directory: tarfile's
                return name, size, kind
    info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    return info.name, info.size, info.type


class MappedTar:
    """A tar held in memory (a mapped local shard) read as `read_members` reads a stream: header
    blocks and extended headers as bytes, each member's data a view of the memory (`take`: no copy)."""

    def __init__(self, data):
        self.view, self.pos = memoryview(data), 0

    def read(self, n: int) -> bytes:
        out = self.view[self.pos:self.pos + n].tobytes()
        self.pos += len(out)
        return out

    def take(self, n: int) -> memoryview:
        out = self.view[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def read_members(f, take, url: str, max_member: int, end: dict) -> Iterator[tuple[str, np.ndarray | memoryview]]:
    """(name, data) of each regular member of a tar read sequentially from `f` (its `read(n)`
    gives headers, pads and extended headers as bytes; `take(n)` a member's data: a streamed
    member's own array, a view of a mapped shard), each header read by `tar_header` (tarfile's
    stream mode copies every byte several times through 10 KiB reads; its TarFile parses a header
    in ~25 µs). Ustar, PAX ('x', 'g') and GNU long-name headers; other member types are skipped; a
    cut or malformed tar raises tarfile.ReadError (a bad header tarfile.InvalidHeaderError). At a
    zero block (the end-of-archive blocks begin) `end["zeros"]` is set; at the stream's end between
    members it is not."""
    pax: dict[str, str] = {}
    longname = ""
    last = "the first member"
    while True:
        block = f.read(tarfile.BLOCKSIZE)
        if not block:
            return  # no end-of-archive blocks: the caller names a torn tar
        if len(block) < tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"cut short after {last}")
        if block == _ZERO_BLOCK:
            end["zeros"] = True  # the end-of-archive blocks begin here (the caller checks the rest)
            return
        name, size, kind = tar_header(block)
        size = int(pax.get("size", size))
        name = pax.get("path") or longname or name
        if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) and size > (1 << 20):
            raise tarfile.ReadError(f"an extended header of {size} bytes after {last}")
        if size > max_member:  # any member type: nothing larger is ever allocated
            raise StoreError(f"{url}: member {name} says it holds {size} bytes, more than the {max_member} a member "
                             "may (refused before reading it)")
        regular = kind in tarfile.REGULAR_TYPES
        data = take(size) if regular else f.read(size)
        if len(data) < size:
            raise tarfile.ReadError(f"{name} cut short")
        pad = -size % tarfile.BLOCKSIZE
        if pad and len(f.read(pad)) < pad:
            raise tarfile.ReadError(f"{name} cut short")
        if kind == tarfile.XHDTYPE:
            pax = _pax_fields(data, last)
            continue
        if kind == tarfile.GNUTYPE_LONGNAME:
            longname = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind in (tarfile.GNUTYPE_LONGLINK, tarfile.XGLTYPE):  # a link's long target, global fields: not read
            continue
        pax, longname, last = {}, "", name
        if regular:
            yield name, data


def tar_members(url: str, timeout: float = TIMEOUT, max_member: int = MAX_INPUT_MEMBER,
                read_ahead: bool | None = None) -> Iterator[dict]:
    """webdataset's file samples ({"fname", "data", "__url__"}) of a tar streamed from `url`,
    each member read whole (one larger than `max_member` bytes is an error, before it is read); a
    cut-short or unreadable tar is a StoreError naming the URL and the last member read.
    `read_ahead` (default READ_AHEAD): the bytes received by a thread of its own."""
    for name, data in _tar_members(url, timeout, max_member, READ_AHEAD if read_ahead is None else read_ahead):
        yield {"fname": name, "data": data, "__url__": url}


def _tar_members(url: str, timeout: float, max_member: int, read_ahead: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(name, data) of each regular member of the tar streamed from `url`, every fault a StoreError."""
    last = "the first member"
    with open_stream(url, timeout) as raw:
        f = _Counted(raw, url, timeout)
        if read_ahead:  # received in a thread, members copied out of its buffers
            buf = ReceiveAhead(f, AHEAD_SIZE, AHEAD_BUFFERS, interrupt=functools.partial(_interrupt, raw))
        else:  # received here; headers read and members copied out of it
            buf = io.BufferedReader(f, _BUFFER)
        end: dict = {}
        try:
            for name, data in read_members(buf, functools.partial(_exactly, buf), url, max_member, end):
                last = name
                yield name, data
            rest = tarfile.BLOCKSIZE if end else 0  # bytes from the end-of-archive blocks on, all zeros
            while chunk := buf.read(_BUFFER):  # the second block, the record padding, a body's missing bytes
                rest += len(chunk)
                if chunk.count(0) != len(chunk) or rest > _AFTER_END:
                    raise StoreError(f"{url}: data after the end of the archive")
        except StoreError:
            raise
        except (tarfile.TarError, EOFError, ValueError) as e:
            if isinstance(raw, _PipeStream):  # a command that failed says why better than its empty output
                buf.close()  # the receiving thread stopped before the command's output is closed
                raw.finish()
            raise StoreError(f"{url}: torn or unreadable tar after {last} ({e})") from None
        except (OSError, http.client.HTTPException, socket.timeout) as e:
            raise StoreError(f"{url}: the transfer failed after {last} ({type(e).__name__}: {e})") from None
        finally:
            buf.close()  # the receiving thread stopped before its stream is closed
        _short_body(raw, url)
        if rest < 2 * tarfile.BLOCKSIZE:
            if isinstance(raw, _PipeStream):  # a command that failed says why better than its short output
                raw.finish()
            raise StoreError(f"{url}: torn tar: it ends after {last} without its end-of-archive blocks "
                             f"(cut short in transit?)")


def _interrupt(raw) -> None:
    """A read blocked on an HTTP response woken: its socket shut down (the connection is not reused;
    a `pipe:` command's reads end when the command is stopped, as its stream is closed)."""
    _on_socket(raw, lambda sock: sock.shutdown(socket.SHUT_RDWR))


def _reraise(exn: Exception) -> bool:
    if isinstance(exn, StoreError):
        raise exn
    raise StoreError(f"unreadable shard: {type(exn).__name__}: {exn}") from None


def tar_samples(url: str, timeout: float = TIMEOUT, max_member: int = MAX_INPUT_MEMBER,
                read_ahead: bool | None = None) -> Iterator[dict]:
    """Samples of a streamed tar: members grouped by key, {"__key__", "__url__", ext: bytes}."""
    yield from wds.tariterators.group_by_keys(tar_members(url, timeout, max_member, read_ahead), handler=_reraise)

