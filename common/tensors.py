"""The two tensor conventions both stages share: where work runs, and how grids become float16."""

from __future__ import annotations

import torch

FP16_MAX = 65504.0  # the largest finite float16


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """`x` as float16, values beyond float16's range clamped to +-65504 instead of becoming inf.

    Clamped in float32: bf16 cannot hold 65504 (it rounds to 65536, inf in float16). A random
    ResNet's activations do exceed the range (FACTS.md); a cached grid is never inf."""
    return x.float().clamp(-FP16_MAX, FP16_MAX).half()
