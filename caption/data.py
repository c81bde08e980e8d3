"""Training batches over the feature store: each image's grid read once, all its captions with it.

A batch is {"features" (B, L, D) float16, "tokens" (B*S, T) inputs <bos> w1..wn,
"targets" (B*S, T) w1..wn <eos>, both <pad>-padded, "image_id" (B,), "index" (B,),
"refs" (B lists of all reference token lists), "keys" (B,)},
where image b owns caption rows b*S .. b*S+S-1 (S = seq_per_img). Images with more than
S captions contribute a seeded random S of them, images with fewer repeat theirs.

The loop never knows the backend: `train_batches` returns an iterable of batches for one
epoch, already split across processes (the loaders are not passed through
`accelerator.prepare`), with the same number of batches on every rank.
"""

from __future__ import annotations

from functools import partial
from itertools import islice
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from caption.vocab import Vocab
from shards.format import Record, StoreError
from shards.wds import stream


def pick_captions(captions: list[list[str]], n: int, rng: np.random.Generator) -> list[list[str]]:
    """n of an image's captions: a random subset when it has more, repeats when fewer."""
    if len(captions) >= n:
        return [captions[i] for i in sorted(rng.choice(len(captions), n, replace=False))]
    return [captions[i % len(captions)] for i in range(n)]


def encode_record(rec: Record, vocab: Vocab, seq_per_img: int, max_length: int, rng: np.random.Generator) -> dict:
    g, _, c = rec["features"].shape
    caps = [vocab.encode(c_, max_length) for c_ in pick_captions(rec["captions"], seq_per_img, rng)]
    return {"features": torch.from_numpy(rec["features"].reshape(g * g, c)),  # (g, g, D) -> (L, D)
            "captions": caps, "image_id": int(rec["image_id"]), "refs": rec["captions"], "key": rec["key"]}


def collate(items: list[dict], vocab: Vocab) -> dict:
    """Stack grids once per image; pad captions into (B*S, T) inputs and targets."""
    return {"features": torch.stack([it["features"] for it in items]), **collate_captions(items, vocab)}  # (B, L, D)


def collate_captions(items: list[dict], vocab: Vocab) -> dict:
    """A batch without its grids: captions padded into (B*S, T) inputs and targets, ids, references, keys."""
    caps = [c for it in items for c in it["captions"]]
    T = max(len(c) for c in caps) + 1
    tokens = torch.full((len(caps), T), vocab.pad_id, dtype=torch.long)
    targets = torch.full((len(caps), T), vocab.pad_id, dtype=torch.long)
    for i, c in enumerate(caps):
        tokens[i, 0] = vocab.bos_id
        tokens[i, 1:len(c) + 1] = torch.tensor(c, dtype=torch.long)
        targets[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        targets[i, len(c)] = vocab.eos_id
    return {"tokens": tokens, "targets": targets,
            "image_id": torch.tensor([it["image_id"] for it in items]),
            "index": torch.tensor([it.get("index", -1) for it in items]),
            "refs": [it.get("refs") for it in items],  # every reference token list (self-critical rewards)
            "keys": [it.get("key") for it in items]}


class CaptionedFeatures(Dataset):
    """Map-style view of a zarr store for training (random access by index)."""

    def __init__(self, store, vocab: Vocab, seq_per_img: int, max_length: int, seed: int = 0):
        self.store = store  # a ZarrReader (open_store)
        if not hasattr(self.store, "__getitem__"):
            raise StoreError(f"{store.root}: a {store.manifest['backend']} store streams; random access needs zarr")
        self.vocab, self.seq_per_img, self.max_length, self.seed = vocab, seq_per_img, max_length, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, i])  # which captions: fixed per (seed, epoch, image)
        item = encode_record(self.store[i], self.vocab, self.seq_per_img, self.max_length, rng)
        item["index"] = i
        return item


class EpochBatches(torch.utils.data.Sampler):
    """Batches of indices for one rank: a (seed, epoch) permutation, dealt round-robin to ranks.

    Every rank gets floor(N / (B * world)) batches (the tail of the permutation waits for the
    next epoch's shuffle), and `start` skips batches already seen (resume mid-epoch).
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool = True, start: int = 0):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.epoch, self.shuffle, self.start = seed, epoch, shuffle, start

    def num_batches(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        per = self.batch_size * self.world
        for b in range(self.start, self.num_batches()):
            block = order[b * per:(b + 1) * per]
            yield block[self.rank::self.world].tolist()


class StreamedCaptions(IterableDataset):
    """A webdataset store as an endless per-rank stream (re-shuffled each pass) of encoded images."""

    def __init__(self, store, vocab: Vocab, seq_per_img: int, max_length: int, seed: int, epoch: int,
                 shuffle_buffer: int, rank: int, world: int):
        self.store, self.vocab, self.seq_per_img, self.max_length = store, vocab, seq_per_img, max_length
        self.seed, self.epoch, self.shuffle_buffer, self.rank, self.world = seed, epoch, shuffle_buffer, rank, world

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        urls = self.store.urls()
        # Each rank takes every world-th shard (split_by_node would need torch.distributed in workers);
        # with fewer shards than ranks, every rank reads them all and keeps every world-th record.
        mine = urls[self.rank::self.world] if len(urls) >= self.world else urls
        subsample = len(urls) < self.world
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        n = 0
        for p in range(1_000_000):  # endless: the loader's epoch length cuts it
            pipe = stream(mine, grid=self.store.manifest["grid"], channels=self.store.manifest["channels"],
                          require_checksum=self.store.require_checksum, timeout=self.store.timeout, shuffle=True,
                          seed=self.seed + self.rank, epoch=self.epoch * 1000 + p, shuffle_buffer=self.shuffle_buffer,
                          listed=self.store.listed())  # every record one its shard's JSON lists
            got = 0
            for rec in pipe:
                n += 1
                got += 1
                if subsample and (n - 1) % self.world != self.rank:
                    continue
                yield encode_record(rec, self.vocab, self.seq_per_img, self.max_length, rng)
            if got == 0:
                raise StoreError(f"{self.store.root}: worker {worker} of rank {self.rank} got no records from {mine}")


def train_batches(store, vocab: Vocab, *, batch_size: int, seq_per_img: int, max_length: int, seed: int,
                  epoch: int, rank: int = 0, world: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000,
                  start: int = 0, pin_memory: bool = False) -> tuple[int, object]:
    """(batches in this epoch per rank, an iterable of the batches from `start` on) of an opened
    store (caption/splits.py)."""
    root = store.root
    backend = store.manifest["backend"]
    n_batches = len(store) // (batch_size * world)
    if n_batches == 0:
        raise StoreError(f"{root}: {len(store)} images cannot fill one batch of {batch_size} on {world} process(es)")
    if backend == "zarr":
        ds = CaptionedFeatures(store, vocab, seq_per_img, max_length, seed)
        ds.epoch = epoch
        sampler = EpochBatches(len(ds), batch_size, rank, world, seed, epoch, start=start)
        # Its own generator: creating the loader mid-epoch (resume) must not draw from the global RNG.
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                            collate_fn=partial(collate, vocab=vocab),
                            generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        return n_batches, loader
    ds = StreamedCaptions(store, vocab, seq_per_img, max_length, seed, epoch, shuffle_buffer, rank, world)
    workers = min(num_workers, max(1, len(store.urls()) // world))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                        collate_fn=partial(collate, vocab=vocab),
                        generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    # The same number of batches on every rank: cut the endless stream; skip what a resumed run saw.
    return n_batches, islice(iter(loader), start, n_batches) if start else islice(iter(loader), n_batches)
