"""Work done in a thread of its own, a bounded amount ahead of its consumer.

    for batch in ReadAhead(resident_batches(...), limit=2): ...      # an iterator's items
    with ReceiveAhead(response, size=4 << 20, buffers=2) as f: f.read(512); f.readinto(array)

Training batches held in memory are made while the model trains on the previous ones
(caption.resident, `ReadAhead`); a streamed shard's bytes are received while the previous ones
are parsed and checked (shards.remote, `ReceiveAhead`). The producer's work overlaps the
consumer's where it releases the GIL (socket reads, torch ops, copies).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


class ReadAhead(Iterator[T]):
    """`items` iterated in a thread of its own: they wait in order, at most `limit` of `cost`
    (per item; default 1, so `limit` items) or one item, and an error raised there comes after
    the items before it. The consumer stopping (closing the iterator, or `close()`) stops the
    thread at its next item and closes `items` (a generator's `finally`: its stream closed), in
    that thread; an item blocked in a read ends with that read or its timeout."""

    def __init__(self, items: Iterator[T], limit: float, cost: Callable[[T], float] = lambda item: 1):
        self.limit, self.cost, self.held, self.waiting = limit, cost, 0.0, []
        self.done, self.closed, self.error = False, False, None
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(items,), name="read-ahead", daemon=True)
        self.thread.start()
        self._out = self._consume()

    def _run(self, items) -> None:
        try:
            for item in items:
                with self.cv:
                    while self.held >= self.limit and not self.closed:
                        self.cv.wait()
                    if self.closed:
                        break
                    if not self.waiting:
                        self.cv.notify()  # the consumer may be waiting for this one
                    self.waiting.append(item)
                    self.held += self.cost(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self.error = e
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            with self.cv:
                self.done = True
                self.cv.notify_all()

    def _consume(self) -> Iterator[T]:
        try:
            while True:
                with self.cv:  # everything waiting is taken at once: one lock per batch of items
                    while not self.waiting and not self.done:
                        self.cv.wait()
                    batch, self.waiting = self.waiting, []
                    if not batch and self.error is not None:
                        raise self.error
                if not batch:
                    return
                for item in batch:
                    with self.cv:
                        self.held -= self.cost(item)
                        if self.held < self.limit:
                            self.cv.notify()  # room again for a producer held at the limit
                    yield item
        finally:
            self._stop()

    def __next__(self) -> T:
        return next(self._out)

    def _stop(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def close(self) -> None:
        """Stop the thread at its next item (and close `items` there)."""
        self._stop()
        self._out.close()


_SPARE: dict[int, list[np.ndarray]] = {}  # size -> buffers a finished ReceiveAhead left for the next
_SPARE_LOCK = threading.Lock()
_KEEP = 4  # spare buffers kept per size


def _spare(size: int, n: int) -> list[np.ndarray]:
    """n receive buffers of `size` bytes: those the previous streams left (their pages already in
    memory: a new one's are faulted in by the first read into it), else new, not zero-filled."""
    with _SPARE_LOCK:
        kept = _SPARE.setdefault(size, [])
        got = [kept.pop() for _ in range(min(n, len(kept)))]
    return got + [np.empty(size, np.uint8) for _ in range(n - len(got))]


def _return(size: int, buffers: list[np.ndarray]) -> None:
    with _SPARE_LOCK:
        kept = _SPARE.setdefault(size, [])
        kept.extend(buffers[:max(0, _KEEP - len(kept))])


class ReceiveAhead:
    """A byte stream (`raw.readinto`) received by a thread of its own into `buffers` reused buffers
    of `size` bytes, and read here in order: `read(n)` (bytes) and `readinto(b)` (copied with the
    GIL released). The thread does nothing else: one read per buffer (the kernel's copy out of a
    socket, the GIL released), so the receiving overlaps the consumer's parsing and checking, and
    the two hand over the GIL once per buffer, not per item. At most `buffers` buffers are
    received ahead; an error raised there is raised by the read here that reaches it, every byte
    before it having been read. `close()` (or the end
    of a `with`) stops the thread: at its next buffer, or at once through `interrupt` (something
    that wakes a read blocked on the source, e.g. a socket shut down) when it is inside a read."""

    def __init__(self, raw, size: int, buffers: int, interrupt: Callable[[], None] = lambda: None):
        self.raw, self.interrupt, self.size = raw, interrupt, size
        self.free: queue.SimpleQueue = queue.SimpleQueue()  # buffers the thread may fill; None: stop
        self.full: queue.SimpleQueue = queue.SimpleQueue()  # (buffer, bytes in it) in order; (None, error)
        self.owned = _spare(size, buffers)
        for buf in self.owned:
            self.free.put(buf)
        self.buf: np.ndarray | None = None  # the buffer being read here, its bytes pos:end
        self.pos = self.end = 0
        self.ended = self.closed = False
        self.thread = threading.Thread(target=self._run, name="receive-ahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (buf := self.free.get()) is not None:
                n = self.raw.readinto(buf)
                self.full.put((buf, n))
                if not n:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self.full.put((None, e))

    def _next(self) -> bool:
        """The next received buffer made current (the one read to its end handed back); False at the end."""
        if self.buf is not None:
            self.free.put(self.buf)
            self.buf = None
        if self.ended:
            return False
        buf, n = self.full.get()
        if buf is None:
            self.ended = True
            raise n
        if not n:
            self.ended = True
            return False
        self.buf, self.pos, self.end = buf, 0, n
        return True

    def readinto(self, b) -> int:
        """len(b) bytes into b (fewer only at the end of the stream); how many."""
        out = np.frombuffer(b, np.uint8)
        want, got = len(out), 0
        while got < want:
            if self.pos == self.end and not self._next():
                break
            k = min(want - got, self.end - self.pos)
            np.copyto(out[got:got + k], self.buf[self.pos:self.pos + k])  # releases the GIL: the thread's turn
            self.pos += k
            got += k
        return got

    def read(self, n: int) -> bytes:
        """n bytes (fewer only at the end of the stream)."""
        if self.end - self.pos >= n:
            out = self.buf[self.pos:self.pos + n].tobytes()
            self.pos += n
            return out
        out = bytearray(n)
        return bytes(memoryview(out)[:self.readinto(out)])

    def close(self) -> None:
        """The thread stopped (woken by `interrupt` if it is inside a read) and waited for."""
        if self.closed:
            return
        self.closed = True
        self.free.put(None)
        if self.thread.is_alive() and not self.ended:
            self.interrupt()
        self.thread.join(timeout=1)  # a read that cannot be woken ends by itself (its stream closed, a timeout)
        if not self.thread.is_alive():
            _return(self.size, self.owned)

    def __enter__(self) -> "ReceiveAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
