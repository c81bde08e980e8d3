"""The vocabulary: words of the training captions, rare ones mapped to <unk> (neuraltalk2 rule).

    python -m caption.vocab --input_json data/shapes/dataset.json --out vocab.json

`vocab.json` is the ordered word list (index = id), never a pickle.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from common.cli import command
from common.config import check_args
from common.errors import UserError
from common.files import read_json
from common.files import atomic_write_json
from shards.karpathy import load_split
from shards.passes import count_records

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class VocabError(UserError):
    pass


class Vocab:
    """Words <-> ids. Ids 0..3 are <pad>, <bos>, <eos>, <unk>."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[:4]) != SPECIALS:
            raise VocabError(f"a vocabulary starts with {', '.join(SPECIALS)}")
        if len(set(words)) != len(words):
            raise VocabError("a vocabulary lists each word once")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.words == other.words

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], word_count_threshold: int = 5) -> "Vocab":
        """Words seen more than `word_count_threshold` times, most frequent first (ties: alphabetical)."""
        return cls.from_counts(Counter(w for cap in captions for w in cap), word_count_threshold)

    @classmethod
    def from_counts(cls, counts: Counter, word_count_threshold: int = 5) -> "Vocab":
        """`build`'s vocabulary from the words' counts."""
        kept = sorted((w for w, n in counts.items() if n > word_count_threshold and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def encode(self, tokens: Sequence[str], max_length: int = 16) -> list[int]:
        """Word ids of the first `max_length` tokens, unknown words as <unk> (no <bos>/<eos>)."""
        return [self.index.get(w, self.unk_id) for w in list(tokens)[:max_length]]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <eos>; <pad> and <bos> dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.words[i])
        return out

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.words, indent=0)  # one word per line

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        p = Path(path)
        words = read_json(p, "vocabulary file", VocabError)
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise VocabError(f"{p}: expected a JSON list of words")
        try:
            return cls(words)
        except VocabError as e:
            raise VocabError(f"{p}: {e}") from None


def build_from_split_file(input_json: str | Path, word_count_threshold: int = 5, count_splits: str = "train",
                          restval_in_train: bool = True) -> Vocab:
    """The vocabulary of a Karpathy-format file (count_splits: train or all)."""
    if count_splits not in ("train", "all"):
        raise VocabError(f"count_splits must be train or all, not {count_splits!r}")
    images = load_split(input_json, count_splits, restval_in_train)
    return Vocab.build((t for img in images for t in img.tokens), word_count_threshold)


def caption_words(records: list[dict]) -> Counter:
    """The words of these records' captions, counted (`count_store_words`, per shard)."""
    return Counter(w for r in records for cap in r["captions"] for w in cap)


def count_store_words(stores: Sequence, workers: int | None = None, alone: bool = False) -> Counter:
    """Every caption's word counts of these opened stores, shard by shard, in several processes
    above shards.passes.PARALLEL_RECORDS records (`count_records`: `workers`, `alone`). The same
    counts either way (tests/test_vocab.py)."""
    return count_records(stores, caption_words, workers, alone)


def unk_rate(vocab: Vocab, captions: Iterable[Sequence[str]]) -> float:
    n = unk = 0
    for cap in captions:
        for w in cap:
            n += 1
            unk += w not in vocab.index
    return unk / max(n, 1)


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caption.vocab", description="Build vocab.json from a Karpathy-format file.")
    p.add_argument("--input_json", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--word_count_threshold", type=int, default=5)
    p.add_argument("--count_splits", default="train", choices=["train", "all"])
    a = p.parse_args(argv)
    check_args(a, {"word_count_threshold": {"ge": 0}})
    vocab = build_from_split_file(a.input_json, a.word_count_threshold, a.count_splits)
    train = load_split(a.input_json, "train")
    vocab.save(a.out)
    rate = unk_rate(vocab, (t for img in train for t in img.tokens))
    print(f"{a.out}: {len(vocab)} words (with {len(SPECIALS)} specials); <unk> rate on train captions {rate:.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
