"""Passes over every record's metadata of opened stores, shard by shard, in one process per core.

    words = count_records(stores, caption_words)          # caption.vocab: a Counter over every record
    df = count_records([store], partial(reward_document_counts, vocab=vocab, ...))   # caption.scst

`count(records) -> Counter` is applied to each shard's records (one shard's records in memory at
a time per process) and the counts are added up: the same result in one process or many. Above
PARALLEL_RECORDS records the shards go to forkserver processes, one per core of this process's
share (or of the machine, `alone`: the launcher's other processes wait meanwhile) (reading and parsing
the shard JSONs runs at ~21,000-26,000 records/s on one core; 1M records: ~40 s in one process,
~25 s in two; bench/index.py). `count` must be picklable (a module-level function, or a
functools.partial of one).
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence

from common.machine import cores, cores_per_process

PARALLEL_RECORDS = 200_000  # more processes above this many records (their pool starts in ~3 s)

_POOL: tuple = ()  # a worker's (stores, count)


def _shard_counts(stores: Sequence, count: Callable, where: tuple[int, int]) -> Counter:
    i, k = where
    return count(stores[i].records.shard(k))


def _pool_init(stores: Sequence, count: Callable) -> None:
    global _POOL
    _POOL = (stores, count)


def _pool_counts(where: tuple[int, int]) -> Counter:
    return _shard_counts(*_POOL, where)


def count_records(stores: Sequence, count: Callable[[list[dict]], Counter], workers: int | None = None,
                  alone: bool = False) -> Counter:
    """The sum of `count` over every shard's records of these opened stores, in `workers`
    processes (None: for stores of more than PARALLEL_RECORDS records one per core of this
    process's share, or of the machine when it runs `alone`; else this process; 0 or 1: this
    process)."""
    where = [(i, k) for i, s in enumerate(stores) for k in range(len(s.manifest["shards"]))]
    if workers is None:
        large = sum(s.manifest["count"] for s in stores) > PARALLEL_RECORDS
        workers = (cores() if alone else cores_per_process()) if large else 1
    workers = min(workers, len(where))
    total: Counter = Counter()
    if workers <= 1:
        for w in where:
            total.update(_shard_counts(stores, count, w))
        return total
    # forkserver: workers that do not inherit a training process's threads or CUDA state
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                             initializer=_pool_init, initargs=(list(stores), count)) as pool:
        for counts in pool.map(_pool_counts, where):
            total.update(counts)
    return total
