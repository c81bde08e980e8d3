"""An iterator run in a thread of its own, a bounded amount ahead of its consumer.

    for member in ReadAhead(tar_members(url), limit=32 << 20, cost=lambda m: m[1].nbytes): ...
    for batch in ReadAhead(resident_batches(...), limit=2): ...

Streamed tars are received and parsed this way while their members are used (shards.remote),
and training batches held in memory are made while the model trains on the previous ones
(caption.resident). The producer's work overlaps the consumer's where it releases the GIL
(socket reads, torch ops, copies).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, TypeVar

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
