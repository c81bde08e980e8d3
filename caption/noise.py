"""Training randomness keyed by the caption, not by the process: one trajectory on 1 or W processes.

Dropout masks, sampled attention locations (hard attention), semi-sampling coins, scheduled
sampling and self-critical training's sampled captions draw from `RowNoise`: every process generates the whole global batch's numbers from a
generator seeded by (seed, batch, step t, what the draw is for) and keeps its own rows. A caption therefore gets the same
numbers whichever process holds it, and processes never share masks (a per-process RNG seeded
alike would give every rank the same masks; seeded apart, a 2-process run would not be the
1-process run). The cost is W times the random numbers of one process's batch: tiny next to the
step itself.

Rows: the global batch is EpochBatches' block of batch_size x W images, rank r holding block
positions r, r + W, ...; image position j owns rows j*S .. j*S + S - 1 (S captions per image).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


def _key(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


# What a draw is for: with the step t (`at`), the key of its generator, so a caption's numbers do not
# depend on how long the other captions of its batch are, nor on how many draws came before.
DROP_H, DROP_OUT, HARD_LOCATION, COIN, SS_USE, SS_SAMPLE, SC_SAMPLE, DROP_INIT = range(1, 9)


@dataclass(frozen=True)
class RowNoise:
    seed: int
    batch: int  # which batch of the run (the same number on every process)
    rows: torch.Tensor  # (N,) this process's rows' positions in the global batch
    total: int  # rows in the global batch
    prefix: tuple = field(default=())  # (t,) for a step's draws
    per_image: int = 1  # rows per image (captions, or self-critical's samples)

    @classmethod
    def for_batch(cls, seed: int, batch: int, images: int, seq_per_img: int, rank: int = 0, world: int = 1,
                  device: torch.device | str = "cpu") -> "RowNoise":
        """The rows of `images` local images x `seq_per_img` captions, rank `rank` of `world`."""
        positions = rank + torch.arange(images, device=device) * world  # (B,) block positions of our images
        rows = (positions[:, None] * seq_per_img + torch.arange(seq_per_img, device=device)).flatten()  # (B*S,)
        return cls(seed, batch, rows, images * world * seq_per_img, per_image=seq_per_img)

    def per_image_rows(self, n: int) -> "RowNoise":
        """The same images with n rows each (self-critical's n sampled captions per image): row
        j*n + s for sample s of the image at global position j."""
        positions = self.rows[::self.per_image] // self.per_image  # (B,) the images' global positions
        rows = (positions[:, None] * n + torch.arange(n, device=self.rows.device)).flatten()  # (B*n,)
        return replace(self, rows=rows, total=self.total // self.per_image * n, per_image=n)

    def at(self, t: int) -> "RowNoise":
        """The draws of caption step t."""
        return replace(self, prefix=(*self.prefix, t))

    def _generator(self, key: int) -> torch.Generator:
        g = torch.Generator(device=self.rows.device)
        g.manual_seed(_key(self.seed, self.batch, *self.prefix, key))
        return g

    def uniform(self, key: int, *tail: int) -> torch.Tensor:
        """(N, *tail) uniform [0, 1) numbers: this process's rows of the global batch's draw `key`."""
        return torch.rand((self.total, *tail), generator=self._generator(key), device=self.rows.device)[self.rows]

    def shared(self, key: int) -> float:
        """One uniform number, the same on every process (a coin for the whole global batch)."""
        return float(torch.rand((), generator=self._generator(key), device=self.rows.device))


def dropout(x: torch.Tensor, p: float, noise: RowNoise | None, training: bool, key: int) -> torch.Tensor:
    """Inverted dropout; with `noise`, its mask comes from the rows' own numbers: x (N, H) at one
    step (`noise.at(t)`), or (N, T, H), step t's mask drawn as at step t."""
    if not training or p == 0.0:
        return x
    if noise is None:
        return torch.nn.functional.dropout(x, p, True)
    if x.dim() == 3:
        u = torch.stack([noise.at(t).uniform(key, x.shape[-1]) for t in range(x.shape[1])], dim=1)  # (N, T, H)
    else:
        u = noise.uniform(key, *x.shape[1:])
    return x * (u >= p).to(x.dtype) / (1.0 - p)


def categorical(probs: torch.Tensor, noise: RowNoise | None, key: int) -> torch.Tensor:
    """(N,) one draw per row of probs (N, K): inverse CDF on the rows' own numbers, or multinomial."""
    if noise is None:
        return torch.multinomial(probs, 1).squeeze(1)
    cdf = probs.float().cumsum(-1)  # (N, K)
    u = noise.uniform(key, 1).to(cdf.dtype) * cdf[:, -1:]  # (N, 1), scaled to the row's total
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)
