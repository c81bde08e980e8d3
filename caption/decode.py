"""Decoding as pure functions over a step function: greedy, sampling, batched beam search.

A step function maps (tokens (R,), state) -> (log p (R, V), state), where every tensor in
`state` has R rows (`Decoder.step` is one; tests use hand-written ones). `state["alpha"]`,
when a step sets it, is recorded as the attention of the word just emitted.

Sequences come back without <bos>, cut before <eos>, padded with <eos>.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from caption.model import PER_IMAGE, State, expand_state, select_images, select_state

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


def _ancestral(step: StepFn, state: State, bos: int, eos: int, max_length: int, pick, suppress: Sequence[int]) -> Decoded:
    """Left-to-right decoding, one word per row per step, `pick(scores) -> tokens` choosing it."""
    R = _rows(state)
    device = next(v.device for v in state.values() if torch.is_tensor(v))
    tokens = torch.full((R,), bos, dtype=torch.long, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    lengths = torch.full((R,), max_length, dtype=torch.long, device=device)
    out, lps, alphas = [], [], []
    for t in range(max_length):
        logp, state = step(tokens, state)  # (R, V)
        scores = logp
        if suppress:
            scores = scores.clone()
            scores[:, list(suppress)] = NEG_INF
        tokens = torch.where(done, torch.full_like(tokens, eos), pick(scores))  # (R,)
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
    return _ancestral(step, state, bos, eos, max_length, lambda scores: scores.argmax(dim=-1), suppress)


def sample(step: StepFn, state: State, bos: int, eos: int, max_length: int = 20, temperature: float = 1.0,
           top_k: int = 0, generator: torch.Generator | None = None, suppress: Sequence[int] = ()) -> Decoded:
    """Ancestral sampling (temperature, optional top-k). `logprobs` keeps the graph (for REINFORCE)."""
    def pick(scores: torch.Tensor) -> torch.Tensor:
        scores = scores.detach().float() / temperature
        if top_k > 0:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
            scores = scores.masked_fill(scores < kth, NEG_INF)
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
    return _ancestral(step, state, bos, eos, max_length, pick, suppress)


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

    Args:
        state: per-image state with B rows (expanded to B*K here).
    """
    B, K = _rows(state), beam_size
    state = expand_state(state, K)  # (B*K, ...)
    device = next(v.device for v in state.values() if torch.is_tensor(v))
    # Per live image (A of them, `active` their ids): scores (A, K), seqs (A, K, t), hist (A, K, t, L).
    active = torch.arange(B, device=device)
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    scores = torch.full((B, K), NEG_INF, device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    seqs = torch.empty(B, K, 0, dtype=torch.long, device=device)
    hist: torch.Tensor | None = None
    # Per image, by id: the best finished hypothesis.
    best_score = torch.full((B,), NEG_INF, device=device)
    best_seq = torch.full((B, max_length), eos, dtype=torch.long, device=device)
    best_len = torch.zeros(B, dtype=torch.long, device=device)
    best_alpha: torch.Tensor | None = None

    def norm(s: torch.Tensor, n: int) -> torch.Tensor:
        return s / (float(n) ** length_penalty) if length_penalty > 0 else s

    for t in range(max_length):
        A = active.shape[0]
        rows_a = torch.arange(A, device=device)
        logp, state = step(tokens, state)  # (A*K, V)
        V = logp.shape[-1]
        logp = logp.float()
        if suppress:
            logp = logp.clone()
            logp[:, list(suppress)] = NEG_INF
        alpha = state.get("alpha")
        if alpha is not None and best_alpha is None:
            best_alpha = torch.zeros(B, max_length, alpha.shape[-1], device=device)
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
        better = (fin_score > best_score[active]).nonzero().squeeze(1)  # local indices
        if better.numel():
            ids, beam = active[better], origin[better, fin_pos[better]]
            best_score[ids] = fin_score[better]
            best_seq[ids] = eos
            best_seq[ids, :t] = seqs[better, beam]
            best_len[ids] = t
            if best_alpha is not None:
                best_alpha[ids] = 0.0
                if hist is not None:
                    best_alpha[ids, :t] = hist[better, beam]
                best_alpha[ids, t] = alpha.view(A, K, -1)[better, beam]  # attention of the <eos> step
        # Continuing: the K best non-<eos> extensions, in rank order.
        keep = top.masked_fill(is_eos, NEG_INF).topk(K, dim=1).indices.sort(dim=1).values  # (A, K) positions in the 2K
        scores = top.gather(1, keep).masked_fill(is_eos.gather(1, keep), NEG_INF)
        origin, word = origin.gather(1, keep), word.gather(1, keep)  # (A, K)
        seqs = torch.cat([seqs[rows_a[:, None], origin], word[..., None]], dim=2)  # (A, K, t+1)
        if alpha is not None:
            a = alpha.view(A, K, 1, -1)[rows_a[:, None], origin]  # (A, K, 1, L)
            hist = a if hist is None else torch.cat([hist[rows_a[:, None], origin], a], dim=2)
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
                active, scores, seqs = active[kept], scores[kept], seqs[kept]
                hist = hist[kept] if hist is not None else None
                state, tokens = select_images(state, kept, rows), tokens[rows]
    # Images still live at max_length: their best live beam when it beats their best finished one.
    if active.numel():
        T = seqs.shape[2]
        live_score = norm(scores.max(dim=1).values, T)
        use = (live_score > best_score[active]).nonzero().squeeze(1)
        if use.numel():
            ids, beam = active[use], scores[use].argmax(dim=1)
            best_score[ids] = live_score[use]
            best_seq[ids] = eos
            best_seq[ids, :T] = seqs[use, beam]
            best_len[ids] = T
            if best_alpha is not None and hist is not None:
                best_alpha[ids] = 0.0
                best_alpha[ids, :T] = hist[use, beam]
    T_out = min(int(best_len.max().item()) + 1 if B else 1, max_length)
    alphas = best_alpha[:, :T_out] if best_alpha is not None else None
    return Decoded(best_seq[:, :T_out], best_len, best_score, alphas)
