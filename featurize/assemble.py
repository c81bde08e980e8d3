"""Shards in progress, assembled in host buffers and written by writer threads.

Each shard being filled owns a (S, g, g, C) float16 buffer from a small pool (pinned on a GPU,
so device-to-host copies are asynchronous). Every batch's grids are copied into their rows;
when a shard's last row is in, a writer thread waits for those copies (a CUDA event) and
encodes the shard file straight from the buffer, then hands the buffer back. Buffers come
back only when their file is written: that is the back-pressure on the forward passes.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from featurize.prepare import FeaturizeError
from shards.karpathy import ImageEntry
from shards.manifest import row_runs, shard_range


class BlockPool:
    """Reusable host buffers for shards in progress, (S, g, g, C) float16 each, pinned on a GPU so
    device-to-host copies run asynchronously. At most `size` exist; `acquire` waits for a free one."""

    def __init__(self, shape: tuple, size: int, pinned: bool, max_bytes: int = 4 << 30):
        block_bytes = int(np.prod(shape)) * 2
        self.shape, self.size, self.pinned = shape, max(2, min(size, max_bytes // block_bytes)), pinned
        self.free: queue.Queue = queue.Queue()
        self.made = 0

    def acquire(self) -> torch.Tensor:
        if self.free.empty() and self.made < self.size:
            self.made += 1
            return torch.empty(self.shape, dtype=torch.float16, pin_memory=self.pinned)
        return self.free.get()

    def release(self, block: torch.Tensor) -> None:
        self.free.put(block)


class ShardAssembler:
    """Fills the shards of `plan` this process writes from batches of rows, in any order of
    shards but each shard's rows complete before its file is written."""

    def __init__(self, writer, plan: dict, shards: list[int], entries: list[ImageEntry], pool: BlockPool,
                 threads: ThreadPoolExecutor, device: torch.device, strict: bool = False):
        self.writer, self.plan, self.entries, self.pool, self.threads = writer, plan, entries, pool, threads
        self.device, self.strict = device, strict
        self.metas: dict[int, list] = {k: [] for k in shards}
        self.failed: dict[int, list] = {k: [] for k in shards}
        self.remaining = {k: len(shard_range(plan, k)) for k in shards}
        self.blocks: dict[int, torch.Tensor] = {}  # shard -> its buffer from the pool
        self.written: dict[int, Future] = {}  # shard -> its writer's future, once closed
        self.filled: dict[int, int] = {}  # shard -> rows of its buffer written (from its start)
        self.futures: list[Future] = []
        self.lock = threading.Lock()
        self.writing = 0.0  # seconds the writer threads were busy, summed
        self.waiting = 0.0  # seconds the caller waited for a free buffer or for the writers at the end

    def add(self, rows: list[int], good: list[bool], errors: list[str], grids: torch.Tensor | None,
            metas: list[dict] | None = None) -> None:
        """One batch: its rows (all in one shard), which decoded, why the others did not, and the
        grids of those that did ((n_good, g, g, C) float16, or None when none did); `metas`, each
        row's key, image_id, filename and captions (None: from the split's entries)."""
        k = rows[0] // self.plan["shard_size"]  # batches never cross a shard boundary
        span = shard_range(self.plan, k)
        host = self._block(k)[:len(span)]  # (n, g, g, C) float16 on the host: this shard's rows
        for i, (row, ok, err) in enumerate(zip(rows, good, errors)):
            if metas is None:
                e = self.entries[row]
                m = {"key": e.key, "image_id": e.image_id, "filename": e.filename, "captions": e.tokens}
            else:
                m = metas[i]
            if ok:
                self.metas[k].append({"row": row, **m})
            elif self.strict:
                raise FeaturizeError(f"{err} (--strict; rerun without it to record such files and go on)")
            else:
                self.failed[k].append({"filename": m["filename"], "reason": err.split(": ", 1)[-1]})
                host[row - span.start].zero_()  # a failed image's rows read as zeros (the fill value)
        self.filled[k] = max(self.filled.get(k, 0), rows[-1] - span.start + 1)
        if grids is not None:
            j = 0
            for a, b in row_runs([r - span.start for r, ok in zip(rows, good) if ok]):
                host[a:b].copy_(grids[j:j + b - a], non_blocking=True)  # (b-a, g, g, C) float16 rows
                j += b - a
        self.remaining[k] -= len(rows)
        if self.remaining[k] == 0:
            self.close(k)
        self._check()

    def close(self, k: int) -> None:
        """Shard k is complete (its rows all added, or, reading input shards, no more will come):
        its file is written by a writer thread; rows never added read as zeros. Once per shard."""
        if k not in self.metas:
            return
        host = self._block(k)[:len(shard_range(self.plan, k))]
        host[self.filled.pop(k, 0):].zero_()  # (the pool's buffers are reused)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.futures.append(self.threads.submit(self._write, k, self.blocks.pop(k), event, self.metas.pop(k),
                                                self.failed.pop(k)))
        self.written[k] = self.futures[-1]

    def all_written(self, shards) -> bool:
        """Whether these shards' files are all written (each closed, its writer finished without error)."""
        return all(k in self.written and self.written[k].done() and self.written[k].exception() is None for k in shards)

    def wait(self) -> None:
        """Every shard file written (a writer's error raised here)."""
        t = time.perf_counter()
        for f in self.futures:
            f.result()
        self.futures = []
        self.waiting += time.perf_counter() - t

    def _block(self, k: int) -> torch.Tensor:
        if k not in self.blocks:
            t = time.perf_counter()
            self.blocks[k] = self.pool.acquire()
            self.waiting += time.perf_counter() - t
        return self.blocks[k]

    def _check(self) -> None:
        """Surface a writer error now, not at the end."""
        for f in [f for f in self.futures if f.done()]:
            f.result()
        self.futures = [f for f in self.futures if not f.done()]

    def _write(self, k: int, block: torch.Tensor, event, metas: list, failed: list) -> None:
        t = time.perf_counter()
        try:
            if event is not None:
                event.synchronize()  # the device-to-host copies of this shard's batches are done
            self.writer.write_block(k, block[:len(shard_range(self.plan, k))].numpy(), metas, failed)
        finally:
            self.pool.release(block)
            with self.lock:
                self.writing += time.perf_counter() - t
