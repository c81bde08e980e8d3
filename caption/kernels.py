"""Fast forms of the attention scores e = w^T tanh(k + q) + b_w (caption/model.py, Eq. 4), for
float32 only: tests/test_model.py pins every path here to the plain tanh form.

Shapes: keys k (B, L, A) once per image, queries q (B, G, 1, A) for G rows per image
(captions in training, beams in decoding); scores (B, G, L).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def applies(keys: torch.Tensor, q: torch.Tensor) -> bool:
    """The sigmoid identity is used in float32 (in half precision it would differ from tanh)."""
    return keys.dtype == torch.float32 and q.dtype == torch.float32


def tanh_scores(keys: torch.Tensor, q: torch.Tensor, score: nn.Linear) -> torch.Tensor:
    """w^T tanh(k + q) + b_w as (2w)^T sigmoid(2k + 2q) + (b_w - sum(w)), since tanh(x) = 2 sigmoid(2x) - 1:
    the (B, G, L, A) pre-activation, the cost of decoding, takes one add and one in-place sigmoid
    (a CPU's tanh is much slower than its sigmoid, bench/RESULTS.md); the two agree to ~1e-7 in
    float32. Without autograd on a CPU, a few images at a time (`chunked`)."""
    A = keys.shape[-1]
    w2, b = 2 * score.weight.view(A), score.bias - score.weight.sum()
    if keys.device.type == "cpu" and not (torch.is_grad_enabled() and (keys.requires_grad or q.requires_grad)):
        return chunked(keys, q, w2) + b
    s = torch.add(2 * keys[:, None], 2 * q).sigmoid_()  # (B, G, L, A); doubling is exact
    return torch.matmul(s, w2) + b  # (B, G, L)


def chunked(keys: torch.Tensor, q: torch.Tensor, w2: torch.Tensor, chunk_bytes: int = 4 << 20) -> torch.Tensor:
    """(2w)^T sigmoid(2k + 2q), (B, G, L), a few images at a time through one reused ~4 MB buffer:
    without autograd nothing needs the whole (B, G, L, A) tensor, and on a CPU a cache-sized
    buffer saves allocating (and page-faulting) it at every step; the doubling, 2 (k + q) (exact,
    the same bits as 2k + 2q), happens in that buffer too, not on a copy of the keys at every
    step. (A GPU takes the whole tensor at once: its allocator caches, and small chunks would
    cost a kernel launch each.)"""
    B, L, A = keys.shape
    G = q.shape[1]
    n = max(1, chunk_bytes // (G * L * A * keys.element_size()))  # images per chunk
    out = keys.new_empty(B, G, L)
    buf = keys.new_empty(min(n, B), G, L, A)
    for i in range(0, B, n):
        m = min(n, B - i)
        s = torch.add(keys[i:i + m, None], q[i:i + m], out=buf[:m]).mul_(2).sigmoid_()  # (m, G, L, A)
        torch.matmul(s, w2, out=out[i:i + m])  # (m, G, L)
    return out
