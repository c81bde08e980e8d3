"""Decoding as pure functions over a step function: greedy, sampling, batched beam search.

A step function maps (tokens (R,), state) -> (log p (R, V), state), where every tensor in
`state` has R rows (`Decoder.step` is one; tests use hand-written ones). `state["alpha"]`,
when a step sets it, is recorded as the attention of the word just emitted.

Sequences come back without <bos>, cut before <eos>, padded with <eos>.
At the end, the same over a trained decoder: `caption_features` (a batch of grids) and
`decode_records` (a feature store's records, many images per beam search).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from caption.model import PER_IMAGE, Decoder, State, expand_state, select_images, select_state
from caption.noise import SC_SAMPLE, RowNoise, categorical
from caption.vocab import Vocab
from shards.format import Record

StepFn = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]
NEG_INF = float("-inf")


@dataclass
class Decoded:
    tokens: torch.Tensor  # (R, T) word ids, <eos>-padded after each sequence's end
    lengths: torch.Tensor  # (R,) words before <eos>
    scores: torch.Tensor  # (R,) sum of log p of the words and the final <eos> (beam: length-normalized if asked)
    alphas: torch.Tensor | None  # (R, T, L) attention per emitted word, or None
    logprobs: torch.Tensor | None = None  # (R, T) per-word log p (sampling; differentiable)


def _rows(state: State) -> int:
    """Rows being decoded (per-image entries such as the grid may hold fewer: one per image)."""
    return next(v.shape[0] for k, v in state.items() if torch.is_tensor(v) and k not in PER_IMAGE)


def _ancestral(step: StepFn, state: State, bos: int, eos: int, max_length: int, pick, suppress: Sequence[int],
               noise: RowNoise | None = None) -> Decoded:
    """Left-to-right decoding, one word per row per step, `pick(scores, noise_t) -> tokens` choosing
    it; with `noise` (training), step t's draws of each row go to the step and to `pick`."""
    R = _rows(state)
    device = next(v.device for v in state.values() if torch.is_tensor(v))
    tokens = torch.full((R,), bos, dtype=torch.long, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    lengths = torch.full((R,), max_length, dtype=torch.long, device=device)
    out, lps, alphas = [], [], []
    for t in range(max_length):
        noise_t = None if noise is None else noise.at(t)
        logp, state = step(tokens, state) if noise is None else step(tokens, state, noise_t)  # (R, V)
        scores = logp
        if suppress:
            scores = scores.clone()
            scores[:, list(suppress)] = NEG_INF
        tokens = torch.where(done, torch.full_like(tokens, eos), pick(scores, noise_t))  # (R,)
        lp = logp.gather(1, tokens[:, None]).squeeze(1)  # (R,): log p under the model itself
        lps.append(lp.masked_fill(done, 0.0))
        newly = ~done & (tokens == eos)
        lengths = torch.where(newly, torch.full_like(lengths, t), lengths)
        done = done | newly  # not in place: masked_fill above keeps the old mask for backward
        out.append(tokens)
        if "alpha" in state:
            alphas.append(state["alpha"])
        if done.all():
            break
    logprobs = torch.stack(lps, dim=1)  # T x (R,) -> (R, T)
    return Decoded(torch.stack(out, dim=1), lengths, logprobs.detach().float().sum(1),
                   torch.stack(alphas, dim=1) if alphas else None, logprobs)


def greedy(step: StepFn, state: State, bos: int, eos: int, max_length: int = 20,
           suppress: Sequence[int] = ()) -> Decoded:
    """The argmax word at every step, until every row has emitted <eos> or max_length words."""
    return _ancestral(step, state, bos, eos, max_length, lambda scores, _: scores.argmax(dim=-1), suppress)


def sample(step: StepFn, state: State, bos: int, eos: int, max_length: int = 20, temperature: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None, suppress: Sequence[int] = (),
           noise: RowNoise | None = None) -> Decoded:
    """Ancestral sampling (temperature, optional top-k). `logprobs` keeps the graph (for REINFORCE).
    With `noise` (self-critical training), each row's words come from its own numbers (the same
    on any number of processes, caption/noise.py) and `step` gets them (its dropout masks)."""
    def pick(scores: torch.Tensor, noise_t: RowNoise | None) -> torch.Tensor:
        scores = scores.detach().float() / temperature
        if top_k > 0:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
            scores = scores.masked_fill(scores < kth, NEG_INF)
        if noise_t is not None:
            return categorical(scores.softmax(dim=-1), noise_t, SC_SAMPLE)
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
    return _ancestral(step, state, bos, eos, max_length, pick, suppress, noise)


# long: batched beam search is one loop (rank, finish, continue, shrink) over state that every step shares
def beam_search(step: StepFn, state: State, bos: int, eos: int, beam_size: int = 3, max_length: int = 20,
                length_penalty: float = 0.0, suppress: Sequence[int] = ()) -> Decoded:
    """Batched beam search: B images x K beams as one tensor program.

    Each step ranks the 2K best extensions of an image's K beams: those among the top K
    that end in <eos> are finished and kept, and the K best that do not continue. With
    K = 1 this is exactly greedy decoding. The answer per image is the best finished
    hypothesis, or the best unfinished one when none ever finished. Scores are summed log p,
    divided by length**length_penalty when it is > 0. Without a length penalty an image
    leaves the batch as soon as no live beam can beat its best finished hypothesis (log p
    only falls with length), so the batch shrinks as captions end.

    Each step only records its words, back-pointers and attention; the chosen hypotheses
    are traced back once at the end (no per-step copying of every beam's history).

    Args:
        state: per-image state with B rows (expanded to B*K here).
    """
    B, K = _rows(state), beam_size
    state = expand_state(state, K)  # (B*K, ...)
    device = next(v.device for v in state.values() if torch.is_tensor(v))
    # Per live image (A of them, `active` their ids): scores (A, K).
    active = torch.arange(B, device=device)
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    scores = torch.full((B, K), NEG_INF, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    # Per step t: the live images' ids (A_t,), each kept beam's word and the beam (of step
    # t-1's kept beams) it extends (A_t, K), and the attention of every beam entering the step.
    ids_at: list[torch.Tensor] = []
    word_at: list[torch.Tensor] = []
    origin_at: list[torch.Tensor] = []
    alpha_at: list[torch.Tensor] = []
    # Per image, by id: the best hypothesis so far, as its length in words (before any <eos>),
    # the beam of step length-1 it ends on, and whether an <eos> closes it.
    best_score = torch.full((B,), NEG_INF, device=device)
    best_len = torch.zeros(B, dtype=torch.long, device=device)
    best_beam = torch.zeros(B, dtype=torch.long, device=device)
    best_eos = torch.zeros(B, dtype=torch.bool, device=device)

    def norm(s: torch.Tensor, n: int) -> torch.Tensor:
        return s / (float(n) ** length_penalty) if length_penalty > 0 else s

    for t in range(max_length):
        A = active.shape[0]
        logp, state = step(tokens, state)  # (A*K, V)
        V = logp.shape[-1]
        logp = logp.float()
        if suppress:
            logp = logp.clone()
            logp[:, list(suppress)] = NEG_INF
        alpha = state.get("alpha")
        cand = scores.view(A * K, 1) + logp  # (A*K, V)
        # The 2K best extensions of each image: at most K of them end in <eos>, so K continue.
        n_top = min(2 * K, K * V)
        top, idx = cand.view(A, K * V).topk(n_top, dim=1)  # (A, 2K), best first
        origin, word = idx // V, idx % V  # (A, 2K): the beam each came from, and its word
        is_eos = word == eos
        # Finished: <eos> hypotheses ranked among the top K (K=1 is then exactly greedy).
        ranked = torch.arange(n_top, device=device)[None, :] < K
        fin = torch.where(is_eos & ranked, norm(top, t + 1), torch.full_like(top, NEG_INF))  # the <eos> counts as a step
        fin_score, fin_pos = fin.max(dim=1)  # (A,)
        better = fin_score > best_score[active]  # (A,)
        if bool(better.any()):
            ids = active[better]
            best_score[ids] = fin_score[better]
            best_len[ids] = t
            best_beam[ids] = origin[better, fin_pos[better]]
            best_eos[ids] = True
        # Continuing: the K best non-<eos> extensions, in rank order.
        keep = top.masked_fill(is_eos, NEG_INF).topk(K, dim=1).indices.sort(dim=1).values  # (A, K) positions in the 2K
        scores = top.gather(1, keep).masked_fill(is_eos.gather(1, keep), NEG_INF)
        origin, word = origin.gather(1, keep), word.gather(1, keep)  # (A, K)
        ids_at.append(active)
        word_at.append(word)
        origin_at.append(origin)
        if alpha is not None:
            alpha_at.append(alpha.view(A, K, -1))  # (A*K, L) -> (A, K, L)
        rows_a = torch.arange(A, device=device)
        state = select_state(state, (origin + rows_a[:, None] * K).view(-1))  # (A*K,) rows to keep
        tokens = word.view(-1)
        if length_penalty == 0:  # images whose live beams cannot beat their best finished one are done
            live = scores.max(dim=1).values > best_score[active]  # (A,)
            if not bool(live.any()):
                active = active[:0]
                break
            if not bool(live.all()):
                kept = live.nonzero().squeeze(1)
                rows = (kept[:, None] * K + torch.arange(K, device=device)).view(-1)
                active, scores = active[kept], scores[kept]
                state, tokens = select_images(state, kept, rows), tokens[rows]
    # Images still live after the last step: their best live beam when it beats their best finished one.
    if active.numel():
        T = len(word_at)
        live_score, live_beam = norm(scores.max(dim=1).values, T), scores.argmax(dim=1)
        use = live_score > best_score[active]
        ids = active[use]
        best_score[ids] = live_score[use]
        best_len[ids] = T
        best_beam[ids] = live_beam[use]
        best_eos[ids] = False
    tokens_out, alphas = _trace_back(B, best_len, best_beam, best_eos, ids_at, word_at, origin_at, alpha_at,
                                     eos, max_length)
    return Decoded(tokens_out, best_len, best_score, alphas)


def _trace_back(B: int, length: torch.Tensor, beam: torch.Tensor, closed: torch.Tensor, ids_at: list, word_at: list,
                origin_at: list, alpha_at: list, eos: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Words and attention of each image's chosen hypothesis, from the per-step back-pointers.

    Image b's hypothesis has length[b] words and ends on beam[b] of step length[b]-1 (for a
    hypothesis closed by <eos> at step length[b], that is the beam <eos> extended).
    """
    device = length.device
    T_out = min(int(length.max().item()) + 1 if B else 1, max_length)
    tokens = torch.full((B, T_out), eos, dtype=torch.long, device=device)
    alphas = torch.zeros(B, T_out, alpha_at[0].shape[-1], device=device) if alpha_at else None

    pos = []  # per step: image id -> its row then (-1: not live)
    for ids in ids_at[:T_out]:
        pos.append(torch.full((B,), -1, dtype=torch.long, device=device))
        pos[-1][ids] = torch.arange(ids.shape[0], device=device)

    if alphas is not None:  # the attention of each closing <eos>
        for t in range(min(T_out, len(alpha_at))):
            sel = (closed & (length == t)).nonzero().squeeze(1)
            if sel.numel():
                alphas[sel, t] = alpha_at[t][pos[t][sel], beam[sel]]
    b = beam.clone()
    for t in range(int(length.max().item()) - 1 if B else -1, -1, -1):
        sel = (length > t).nonzero().squeeze(1)  # hypotheses with a word at step t
        p, bb = pos[t][sel], b[sel]
        tokens[sel, t] = word_at[t][p, bb]
        o = origin_at[t][p, bb]  # the beam of step t-1 this one extended
        if alphas is not None:
            alphas[sel, t] = alpha_at[t][p, o]
        b[sel] = o
    return tokens, alphas


# ---- a trained decoder over grids and records ----------------------------------------
def _batched(it: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def caption_features(model: Decoder, vocab: Vocab, features: torch.Tensor, beam_size: int = 3, max_length: int = 20,
                     length_penalty: float = 0.0, suppress_unk: bool = False):
    """Decoded output for (B, L, D) or (B, g, g, D) features (beam_size 1 is greedy)."""
    state = model.init_state(features)
    return beam_search(model.step, state, vocab.bos_id, vocab.eos_id, beam_size=beam_size, max_length=max_length,
                       length_penalty=length_penalty, suppress=(vocab.unk_id,) if suppress_unk else ())


def decode_records(model: Decoder, vocab: Vocab, records: Iterable[Record], device, beam_size: int = 3,
                   batch_size: int = 50, max_length: int = 20, length_penalty: float = 0.0, suppress_unk: bool = False,
                   keep_alphas: bool = False, progress: bool = False, total: int | None = None) -> list[dict]:
    """[{"image_id", "caption", "key", ("alphas": (T, L) array)}] for records, many images per beam search."""
    out = []
    bar = tqdm(total=total, desc=f"beam {beam_size}", unit="img", disable=not progress)
    for batch in _batched(records, batch_size):
        feats = torch.from_numpy(np.stack([r["features"] for r in batch])).to(device)  # (B, g, g, D)
        dec = caption_features(model, vocab, feats, beam_size, max_length, length_penalty, suppress_unk)
        for i, r in enumerate(batch):
            words = vocab.decode(dec.tokens[i].tolist())
            item = {"image_id": int(r["image_id"]), "caption": " ".join(words), "key": r["key"]}
            if keep_alphas and dec.alphas is not None:
                item["alphas"] = dec.alphas[i, : len(words)].float().cpu().numpy()  # (T, L)
            out.append(item)
        bar.update(len(batch))
    bar.close()
    return out
