"""Beam search throughput: many images x k beams as one tensor program vs one image at a time.

    python -m bench.decode                     # CPU, the shapes world's decoder size
    python -m bench.decode --channels 2048 --embed 512 --hidden 512 --attn 512 --images 1000   # a GPU

Both run `caption.decode.beam_search` over the same random decoder and grids, max_length steps
per image; the baseline calls it once per image (k beams as its batch), as the common tutorial does.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import device_name, sync
from caption.decode import beam_search
from caption.model import Decoder, DecoderConfig




@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--attn", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--one_by_one", type=int, default=20, help="images decoded one at a time for the baseline")
    p.add_argument("--beam_size", type=int, default=5)
    p.add_argument("--batch", type=int, default=100, help="images per batched beam search")
    p.add_argument("--max_length", type=int, default=16)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=a.vocab, feature_dim=a.channels, embed_dim=a.embed, hidden_dim=a.hidden,
                                  attn_dim=a.attn)).to(device).eval()
    # A random decoder's words are near-uniform, so no hypothesis ends early: every image decodes
    # max_length steps, in both loops (a trained model stops earlier; batched images then leave
    # the batch as they finish).
    feats = torch.relu(torch.randn(a.images, 196, a.channels, device=device)).half()

    def batched() -> float:
        sync(device)
        t = time.perf_counter()
        for i in range(0, a.images, a.batch):
            beam_search(model.step, model.init_state(feats[i:i + a.batch]), 1, 2, a.beam_size, a.max_length)
        sync(device)
        return a.images / (time.perf_counter() - t)

    def one_by_one() -> float:
        sync(device)
        t = time.perf_counter()
        for i in range(a.one_by_one):
            beam_search(model.step, model.init_state(feats[i:i + 1]), 1, 2, a.beam_size, a.max_length)
        sync(device)
        return a.one_by_one / (time.perf_counter() - t)

    one_by_one(), batched()  # warm up
    base, ours = one_by_one(), batched()
    name = device_name(device)
    print(f"device {name}; beam {a.beam_size}, max_length {a.max_length}, D={a.channels} H={a.hidden} V={a.vocab}")
    print(f"one image at a time {base:9.1f} images/s")
    print(f"batched ({a.batch}/call)   {ours:9.1f} images/s")
    print(f"ratio = {ours / base:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
