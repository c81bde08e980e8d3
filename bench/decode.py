"""Beam search throughput: many images x k beams as one tensor program vs one image at a time.

    python -m bench.decode                     # the shapes world's decoder size
    python -m bench.decode --coco              # the COCO decoder: D=2048, E=H=A=512, V=9487

Three beam searches over the same random decoder and grids, max_length words per image:

tutorial  the common tutorial's loop (sgrvinod's caption.py), re-implemented over our Decoder:
          one image at a time, its k beams as the batch, the attention keys W_a a_i
          recomputed from the grid at every step (that tutorial's attention module projects
          the encoder output inside forward), hypotheses kept in Python lists;
one       our `caption.decode.beam_search` called one image at a time (batching alone);
batched   our `beam_search` over --batch images per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import add_decoder_dims, decoder_dims, device_name, pick_device, sync
from caption.decode import beam_search
from caption.model import Decoder, DecoderConfig


def tutorial_beam(model: Decoder, grid: torch.Tensor, bos: int, eos: int, k: int, max_length: int) -> list[int]:
    """One image's beam search as the tutorial writes it; grid (L, D). Returns the best words."""
    L, D = grid.shape
    enc = grid.float()[None].expand(k, L, D)  # (k, L, D): the grid copied per beam
    mean = enc.mean(dim=1)  # (k, D)
    h, c = model.init_h(mean), model.init_c(mean)  # (k, H)
    prev = torch.full((k, 1), bos, dtype=torch.long, device=grid.device)
    seqs = prev
    seqs_alpha = torch.ones(k, 1, L, device=grid.device)
    top_scores = torch.zeros(k, 1, device=grid.device)
    complete, complete_alpha, complete_scores = [], [], []
    for step in range(1, max_length + 1):
        emb = model.embed(prev).squeeze(1)  # (s, E)
        keys = model.attention.keys(enc)  # (s, L, D) -> (s, L, A), every step
        alpha = model.attention(keys, h)  # (s, L)
        z = torch.sigmoid(model.f_beta(h)) * (enc * alpha[..., None]).sum(dim=1)  # (s, D)
        h, c = model.lstm(torch.cat([emb, z], dim=1), (h, c))
        scores = model.output(emb, h, z).log_softmax(dim=1)  # (s, V)
        V = scores.shape[1]
        scores = top_scores.expand_as(scores) + scores
        if step == 1:
            top_scores, top_words = scores[0].topk(k, 0, True, True)
        else:
            top_scores, top_words = scores.view(-1).topk(k, 0, True, True)
        prev_inds, next_words = top_words // V, top_words % V
        seqs = torch.cat([seqs[prev_inds], next_words.unsqueeze(1)], dim=1)
        seqs_alpha = torch.cat([seqs_alpha[prev_inds], alpha[prev_inds].unsqueeze(1)], dim=1)
        incomplete = [i for i, w in enumerate(next_words) if w != eos]
        done = list(set(range(len(next_words))) - set(incomplete))
        if done:
            complete.extend(seqs[done].tolist())
            complete_alpha.extend(seqs_alpha[done].tolist())
            complete_scores.extend(top_scores[done])
        k -= len(done)
        if k == 0:
            break
        seqs, seqs_alpha = seqs[incomplete], seqs_alpha[incomplete]
        h, c, enc = h[prev_inds[incomplete]], c[prev_inds[incomplete]], enc[prev_inds[incomplete]]
        top_scores = top_scores[incomplete].unsqueeze(1)
        prev = next_words[incomplete].unsqueeze(1)
    if not complete_scores:  # the tutorial raises here ("max() arg is an empty sequence")
        return seqs[int(top_scores.argmax())].tolist()[1:]
    return complete[complete_scores.index(max(complete_scores))][1:]


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    add_decoder_dims(p)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--one_by_one", type=int, default=20, help="images decoded one at a time for the baselines")
    p.add_argument("--beam_size", type=int, default=5)
    p.add_argument("--batch", type=int, default=100, help="images per batched beam search")
    p.add_argument("--max_length", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median rate of each loop is reported")
    a = decoder_dims(p.parse_args(argv))
    device = pick_device()
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=a.vocab, feature_dim=a.channels, embed_dim=a.embed, hidden_dim=a.hidden,
                                  attn_dim=a.attn)).to(device).eval()
    # A random decoder's words are near-uniform, so hypotheses rarely end early: nearly every
    # image decodes max_length steps in all three loops (a trained model stops earlier, and
    # batched images then leave the batch as they finish).
    feats = torch.relu(torch.randn(a.images, 196, a.channels, device=device)).half()  # (N, L, D)
    n_one = min(a.one_by_one, a.images)

    def timed(fn, n: int) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return n / (time.perf_counter() - t)

    def tutorial() -> None:
        for i in range(n_one):
            tutorial_beam(model, feats[i], 1, 2, a.beam_size, a.max_length)

    def one() -> None:
        for i in range(n_one):
            beam_search(model.step, model.init_state(feats[i:i + 1]), 1, 2, a.beam_size, a.max_length)

    def batched() -> None:
        for i in range(0, a.images, a.batch):
            beam_search(model.step, model.init_state(feats[i:i + a.batch]), 1, 2, a.beam_size, a.max_length)

    # The loops answer alike: where the tutorial finished no hypothesis early, its best words
    # are our best words.
    ours = beam_search(model.step, model.init_state(feats[:n_one]), 1, 2, a.beam_size, a.max_length)
    agree = sum(tutorial_beam(model, feats[i], 1, 2, a.beam_size, a.max_length)
                == ours.tokens[i, :int(ours.lengths[i])].tolist() for i in range(n_one))
    timed(one, n_one)  # warm up
    # The three loops take turns, round after round, so a noisy neighbour slows all of them alike.
    runs: dict[str, list[float]] = {"tutorial": [], "one": [], "batched": []}
    for _ in range(a.repeats):
        runs["tutorial"].append(timed(tutorial, n_one))
        runs["one"].append(timed(one, n_one))
        runs["batched"].append(timed(batched, a.images))
    rates = {k: statistics.median(v) for k, v in runs.items()}
    print(f"device {device_name(device)}; beam {a.beam_size}, {a.max_length} words, D={a.channels} "
          f"E={a.embed} H={a.hidden} A={a.attn} V={a.vocab}; threads {torch.get_num_threads()}")
    print(f"tutorial loop, one image at a time     {rates['tutorial']:9.1f} images/s")
    print(f"our beam search, one image at a time   {rates['one']:9.1f} images/s")
    print(f"our beam search, {a.batch} images per call {rates['batched']:9.1f} images/s")
    print(f"(median of {a.repeats} interleaved rounds)")
    print(f"same best caption as the tutorial loop: {agree}/{n_one} images")
    print(f"batched / tutorial = {rates['batched'] / rates['tutorial']:.1f}x; "
          f"batched / one at a time (batching alone) = {rates['batched'] / rates['one']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
