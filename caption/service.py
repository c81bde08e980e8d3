"""What a page (or any server) calls to caption an uploaded image: the run loaded once, one
request = one image in, the caption and each word's attention over the photo out, or a message.

    service = CaptionService("runs/shapes")
    out = service.caption(uploaded_bytes, beam_size=3)
    out.caption, out.words, out.overlays[0]     # (H, W, 3) uint8: word 0's map over the photo
    out.error                                   # a one-line message instead, for bad input

Bad input never raises: an empty upload, a file that is no image, a truncated one, an image
above `max_pixels` (refused from its header, before it is decoded) each come back as `error`.
Requests are served one at a time (a lock around the model), so concurrent ones queue.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from caption.encoder import backbone_for_run
from caption.predict import caption_image
from caption.run import load_decoder
from caption.visualize import dim, upsample
from common.errors import UserError
from common.files import read_json
from common.tensors import default_device
from featurize.images import ImageError, decode_rgb, to_rgb

MAX_PIXELS = 40_000_000  # ~6300 x 6300: refused above this, before decoding


@dataclass
class Captioned:
    caption: str = ""
    words: list[str] = field(default_factory=list)
    overlays: list[np.ndarray] = field(default_factory=list)  # per word, (H, W, 3) uint8 over the photo
    image: np.ndarray | None = None  # the photo as captioned, (H, W, 3) uint8
    error: str | None = None


def about(run: Path, vocab, encoder: dict) -> str:
    """What the model knows, in a few lines read from the run: its words, its encoder and, when the
    run was evaluated, its scores (with what a shapes-world model names correctly)."""
    words = [w for w in vocab.words if not w.startswith("<")]
    lines = [f"**What this model knows**: {len(words)} words, all from its training captions "
             f"(e.g. {', '.join(words[:12])}{', ...' if len(words) > 12 else ''}); every caption is made of them, so "
             "an image of anything else still gets the nearest of these words.",
             f"Encoder: {encoder.get('backbone', '?')} to {encoder.get('layer', '?')}, weights "
             f"`{Path(str(encoder.get('weights', '?'))).name}`."]
    metrics = next((run / d / "metrics.json" for d in ("eval_test", "eval_val") if (run / d / "metrics.json").is_file()), None)
    if metrics is not None:
        try:
            m = read_json(metrics, "evaluation metrics")
        except UserError:  # an unreadable metrics file leaves the scores out, not the page
            m = {}
        split = metrics.parent.name.removeprefix("eval_")
        if isinstance(m, dict) and isinstance(m.get("shape_precision"), (int, float)):
            lines.append(f"On its {split} split: shape words right {m['shape_precision']:.0%} (a random one: "
                         f"{m.get('shape_precision_chance', 0):.0%}), color words {m.get('color_precision', 0):.0%}, "
                         f"color+shape pairs {m.get('pair_precision', 0):.0%}, attention on the named object "
                         f"{m.get('grounding', 0):.0%}.")
        elif isinstance(m, dict) and isinstance(m.get("CIDEr"), (int, float)):
            lines.append(f"On its {split} split: CIDEr-D {m['CIDEr']:.3f}, BLEU-4 {m.get('Bleu_4', 0):.3f}.")
    return "\n\n".join(lines)


class CaptionService:
    """A run's decoder and encoder, loaded once and reused by every request."""

    def __init__(self, run: str | Path, checkpoint: str = "best", max_pixels: int = MAX_PIXELS,
                 display_size: int = 384):
        self.device = default_device()
        self.model, self.vocab, cfg = load_decoder(run, checkpoint, self.device)
        backbone, manifest = backbone_for_run(run, cfg)
        self.backbone = backbone.to(self.device).freeze()
        self.image_size, self.grid = int(manifest["image_size"]), int(manifest["grid"])
        self.max_pixels, self.display_size = max_pixels, display_size
        self.lock = threading.Lock()
        self.about = about(Path(run), self.vocab, manifest)

    def open_image(self, source) -> Image.Image:
        """8-bit RGB from bytes, a path or a PIL image (featurize's decoding, with the pixel limit);
        ImageError with the reason for anything else."""
        if source is None or (isinstance(source, (bytes, bytearray)) and not source):
            raise ImageError("no image was uploaded")
        if isinstance(source, Image.Image):
            return to_rgb(source)
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
        if not data:
            raise ImageError("the uploaded file is empty")
        return decode_rgb(io.BytesIO(data), "the upload", self.max_pixels)

    @torch.no_grad()
    def caption(self, source, beam_size: int = 3, max_length: int = 20) -> Captioned:
        """The caption and per-word overlays of one image, or `error`."""
        try:
            image = self.open_image(source)
            beam_size, max_length = int(beam_size), int(max_length)
            if not (1 <= beam_size <= 20 and 1 <= max_length <= 50):
                raise ValueError("beam size must be 1-20 and max length 1-50")
        except (ImageError, ValueError) as e:
            return Captioned(error=str(e))
        with self.lock:
            words, alphas = caption_image(self.model, self.vocab, self.backbone, image, self.image_size, beam_size,
                                          max_length, self.device)
        shown = image.copy()
        shown.thumbnail((self.display_size, self.display_size))
        photo = np.asarray(shown, dtype=np.float32)  # (H, W, 3)
        overlays = []
        for t in range(len(words)):
            overlays.append(dim(photo, upsample(alphas[t], self.grid, shown.size)))  # (H, W, 3)
        return Captioned(" ".join(words), words, overlays, photo.astype(np.uint8))
