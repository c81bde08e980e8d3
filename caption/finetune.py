"""End-to-end fine-tuning's batches: images of a split with their captions.

    python caption/train.py --config configs/shapes.yaml --finetune true --init_from runs/shapes \\
        --checkpoint_path runs/shapes_ft --finetune_layers layer3 --cnn_learning_rate 1e-5

The loop is the same for every run: `caption/train.py`'s setup gives the `Captioner` a
`FineTuned` encoder (caption/encoder.py: the backbone that made the cached run's features,
so step 0 scores what the cached run scored) and these image batches instead of feature
batches; checkpoints, resume, validation and many-process training are the same code.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from caption.data import EpochBatches, collate, pick_captions
from caption.encoder import load_image
from caption.vocab import Vocab
from shards.karpathy import ImageEntry


class CaptionedImages(Dataset):
    """Images of a split with seq_per_img captions each, decoded as featurize decodes them."""

    def __init__(self, entries: list[ImageEntry], root: str | Path, image_size: int, vocab: Vocab, seq_per_img: int,
                 max_length: int, seed: int = 0):
        self.entries, self.root, self.image_size = entries, Path(root), image_size
        self.vocab, self.seq_per_img, self.max_length, self.seed = vocab, seq_per_img, max_length, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        image = load_image(self.root, e.filename, self.image_size)  # (3, P, P); a broken image: a black frame
        rng = np.random.default_rng([self.seed, self.epoch, i])
        caps = [self.vocab.encode(c, self.max_length) for c in pick_captions(e.tokens, self.seq_per_img, rng)]
        return {"features": image, "captions": caps, "image_id": e.image_id, "index": i, "refs": e.tokens, "key": e.key}


def image_batches(entries: list[ImageEntry], root: str | Path, image_size: int, vocab: Vocab, *, batch_size: int,
                  seq_per_img: int, max_length: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  num_workers: int = 0, start: int = 0, pin_memory: bool = False) -> tuple[int, DataLoader]:
    """Like `caption.data.train_batches`, with images (B, 3, P, P) uint8 in batch["features"]."""
    ds = CaptionedImages(entries, root, image_size, vocab, seq_per_img, max_length, seed)
    ds.epoch = epoch
    sampler = EpochBatches(len(ds), batch_size, rank, world, seed, epoch, start=start)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        collate_fn=partial(collate, vocab=vocab), generator=torch.Generator().manual_seed(seed))
    return sampler.num_batches(), loader
