"""Self-critical sequence training (Rennie et al. 2017) with an in-process CIDEr-D reward.

reward(sample) = CIDEr-D(sample) - baseline, where the baseline is the greedy caption's
CIDEr-D (`greedy`, Rennie et al.) or the mean reward of the image's other samples (`mean`,
the "new self-critical" variant); loss = -sum_t reward * log p(w_t) over the sampled words.

`CiderD` is coco-caption's CIDEr-D (pycocoevalcap's `Cider`: n = 1..4, tf-idf vectors,
clipped counts, a Gaussian length penalty with sigma 6, x10), with the document
frequencies computed once from the training references, as self-critical.pytorch does.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch

from caption.decode import greedy, sample
from caption.model import expand_state
from caption.noise import RowNoise
from caption.vocab import Vocab
from common.config import ConfigError

Tokens = Sequence[str]


def ngrams(words: Tokens, n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D with fixed document frequencies.

    Args:
        references: per image, its reference token lists; the document frequency of an
            n-gram is the number of images whose references contain it, and the log of the
            number of images is the reference length, exactly as pycocoevalcap computes them
            over the set it scores.
    """

    def __init__(self, references: Iterable[Sequence[Tokens]], n: int = 4, sigma: float = 6.0):
        df: Counter = Counter()
        count = 0
        for refs in references:
            df.update(document_ngrams(refs, n))
            count += 1
        self._set(df, count, n, sigma)

    @classmethod
    def from_counts(cls, df: Counter, count: int, n: int = 4, sigma: float = 6.0) -> "CiderD":
        """From document frequencies counted elsewhere (per shard: `reward_document_counts`) over
        `count` images."""
        cider = cls.__new__(cls)
        cider._set(df, count, n, sigma)
        return cider

    def _set(self, df: Counter, count: int, n: int, sigma: float) -> None:
        self.n, self.sigma, self.df = n, sigma, df
        self.ref_len = math.log(float(count))
        self._cache: dict = {}

    def _vec(self, counts: Counter):
        vec = [defaultdict(float) for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            vec[k][g] = float(tf) * (self.ref_len - math.log(max(1.0, self.df[g])))
            norm[k] += vec[k][g] ** 2
            if k == 1:  # pycocoevalcap counts the length in bigrams; kept for identical scores
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(self, hyp, ref) -> np.ndarray:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        delta = float(lh - lr)
        val = np.zeros(self.n)
        for k in range(self.n):
            for g in vh[k]:
                val[k] += min(vh[k][g], vr[k][g]) * vr[k][g]
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.e ** (-(delta ** 2) / (2 * self.sigma ** 2))
        return val

    def score(self, hypothesis: Tokens, references: Sequence[Tokens], key=None) -> float:
        """CIDEr-D of one caption against its image's references (`key` caches the references' vectors)."""
        refs = self._cache.get(key) if key is not None else None
        if refs is None:
            refs = [self._vec(ngrams(r, self.n)) for r in references]
            if key is not None:
                self._cache[key] = refs
        hyp = self._vec(ngrams(hypothesis, self.n))
        total = np.zeros(self.n)
        for ref in refs:
            total += self._sim(hyp, ref)
        return float(np.mean(total) / len(refs) * 10.0)


def words_of(tokens: torch.Tensor, lengths: torch.Tensor, vocab: Vocab, eos: bool = False) -> list[list[str]]:
    """Each row's words; with `eos`, "<eos>" after those that ended before the last step."""
    T = tokens.shape[1]
    return [[vocab.words[int(i)] for i in tokens[r, : int(lengths[r])]] + ([vocab.words[vocab.eos_id]]
            if eos and int(lengths[r]) < T else []) for r in range(tokens.shape[0])]


def document_ngrams(references: Sequence[Tokens], n: int = 4) -> set:
    """The n-grams an image's references hold, each once (its share of the document frequencies)."""
    return set(g for r in references for g in ngrams(r, n))


def reward_document_counts(records: list[dict], vocab: Vocab, max_length: int, labels: bool, eos: bool,
                           n: int = 4) -> Counter:
    """These records' share of CIDEr-D's document frequencies, their references as the reward
    sees them (shards.passes.count_records adds the shards' shares up)."""
    df: Counter = Counter()
    for r in records:
        df.update(document_ngrams(reward_references(r["captions"], vocab, max_length, labels, eos), n))
    return df


def reward_references(captions: Sequence[Tokens], vocab: Vocab, max_length: int, labels: bool = True,
                      eos: bool = True) -> list[list[str]]:
    """An image's references as the reward sees them: with `labels`, cut at max_length and mapped
    through the vocabulary (unknown words become <unk>), as the training labels are; with `eos`,
    each ends with "<eos>"."""
    end = [vocab.words[vocab.eos_id]] if eos else []
    if not labels:
        return [list(c) + end for c in captions]
    return [[vocab.words[i] for i in vocab.encode(c, max_length)] + end for c in captions]


def scst_loss(decoder, features: torch.Tensor, references: list[list[Tokens]], image_keys: list, vocab: Vocab,
              cider: CiderD, sample_n: int = 5, baseline: str = "mean", max_length: int = 16,
              generator: torch.Generator | None = None, log_greedy: bool = True, eos: bool = False,
              noise: RowNoise | None = None) -> tuple[torch.Tensor, dict, dict]:
    """Policy-gradient loss of `sample_n` sampled captions per image, summed (`policy_loss`); returns
    (summed loss, its normalizers {"caption": sampled captions, "token": their words and <eos>}, stats).

    `references` are as the reward sees them (`reward_references`); `eos` appends "<eos>" to the
    sampled and greedy captions that ended. With `noise` (training: the batch's RowNoise), sample
    s of image j draws its words and dropout masks from global row j * sample_n + s, so a run on
    W processes samples the captions one process would. The greedy
    captions' CIDEr-D (stats["greedy_cider"]) is the greedy baseline; with the mean baseline it
    is only measured, and only when `log_greedy` (a step that is logged).
    """
    B = features.shape[0]
    if baseline == "mean" and sample_n < 2:
        raise ConfigError("--sc_baseline mean (the mean of the other samples) needs --sc_sample_n 2 or more")
    state = expand_state(decoder.init_state(features, noise), sample_n)  # (B*n rows), grid once per image
    rows = None if noise is None else noise.per_image_rows(sample_n)  # (B*n) rows, image-major as `state`
    out = sample(decoder.step, state, vocab.bos_id, vocab.eos_id, max_length, generator=generator, noise=rows)
    sampled = words_of(out.tokens, out.lengths, vocab, eos)
    rewards = torch.tensor([cider.score(sampled[r], references[r // sample_n], image_keys[r // sample_n])
                            for r in range(B * sample_n)], device=features.device).view(B, sample_n)
    greedy_reward = None
    if baseline == "greedy" or log_greedy:
        was = decoder.training
        decoder.eval()
        with torch.no_grad():
            g = greedy(decoder.step, decoder.init_state(features), vocab.bos_id, vocab.eos_id, max_length)
        decoder.train(was)
        greedy_words = words_of(g.tokens, g.lengths, vocab, eos)
        greedy_reward = torch.tensor([cider.score(greedy_words[b], references[b], image_keys[b]) for b in range(B)],
                                     device=features.device)
    if baseline == "greedy":
        base = greedy_reward[:, None].expand(B, sample_n)
    elif baseline == "mean":
        base = (rewards.sum(1, keepdim=True) - rewards) / (sample_n - 1)  # the other samples' mean
    else:
        raise ValueError(f"unknown SCST baseline {baseline!r}: greedy or mean")
    advantage = (rewards - base).reshape(-1)  # (B*n,)
    total, tokens = policy_loss(out.logprobs, out.lengths, advantage)
    stats = {"reward": rewards.mean().item(), "advantage": advantage.abs().mean().item()}
    if greedy_reward is not None:
        stats["greedy_cider"] = greedy_reward.mean().item()
    return total, {"caption": torch.tensor(B * sample_n, device=features.device), "token": tokens}, stats


def policy_loss(logprobs: torch.Tensor, lengths: torch.Tensor, advantage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(-sum of advantage x log p over each sampled caption's words and its <eos>, how many such
    steps): logprobs (N, T) of the sampled words, lengths (N,) words before <eos> (T: none),
    advantage (N,). Divided by the steps it is self-critical.pytorch's RewardCriterion (mean over
    the unmasked steps, losses.py:30-35); by N, the mean per sampled caption."""
    T = logprobs.shape[1]
    mask = torch.arange(T, device=logprobs.device)[None, :] <= lengths[:, None]  # (N, T): words and <eos>
    logp = (logprobs * mask).sum(1)
    return -(advantage.detach() * logp).sum(), mask.sum()
