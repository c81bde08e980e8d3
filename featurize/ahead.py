"""Batches prepared ahead of the forward pass, in a thread of their own (`decode_ahead`).

The thread takes batches from the DataLoader's workers and does what remains before the
model can run (decoding on the device, resizing, the copy to the device), on a CUDA stream of
its own, while the main thread queues forward passes.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import nullcontext

import torch


class Ahead:
    """Batches prepared ahead in a thread of their own: `prepare(batch)` (decoding, resizing,
    the copy to the device) runs there on a CUDA stream of its own while the main thread
    queues forward passes, at most `depth` batches ahead. Iterating yields (batch, prepared)
    in order; an error in the thread is raised in the iterating thread; `close` stops the
    thread (also on an error in the iterating thread) without waiting for the loader's end.

    On CUDA the prepared tensors were made on the side stream: the consumer's stream waits
    for them (an event) and they are marked as used there (`record_stream`), so their memory
    is not reused before the forward pass that reads them has run.
    """

    _END = object()

    def __init__(self, batches, prepare, depth: int, device: torch.device):
        self.batches, self.prepare, self.device = batches, prepare, device
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.busy = 0.0  # seconds the thread spent preparing
        self.finished = False  # the end, an error or close() was seen: no more batches
        self.thread = threading.Thread(target=self._run, name="featurize-prepare", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        cuda = self.device.type == "cuda"
        try:
            with (torch.cuda.device(self.device) if cuda else nullcontext()), torch.inference_mode():
                stream = torch.cuda.Stream(self.device) if cuda else None
                with torch.cuda.stream(stream) if cuda else nullcontext():
                    for batch in self.batches:
                        if self.stop.is_set():
                            return
                        t = time.perf_counter()
                        out = self.prepare(batch)
                        event = None
                        if cuda:
                            event = torch.cuda.Event()
                            event.record(stream)
                        self.busy += time.perf_counter() - t
                        if not self._put((batch, out, event)):
                            return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)
            return
        self._put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        if self.finished:
            raise StopIteration
        item = self.queue.get()
        if item is self._END:
            self.finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, out, event = item
        if event is not None:
            here = torch.cuda.current_stream(self.device)
            here.wait_event(event)
            for t in out:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(here)
        return batch, out

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread: it ends after the batch it is preparing (a daemon: after `timeout`
        seconds, say on a loader that hangs, it is left behind rather than waited for)."""
        self.finished = True
        self.stop.set()
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            try:
                self.queue.get(timeout=0.1)  # free a put waiting for room
            except queue.Empty:
                pass
