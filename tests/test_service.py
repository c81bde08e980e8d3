"""The page's function layer (caption/service.py): loaded once, the same caption as
caption.predict, every bad upload a message (never an exception), concurrent requests served."""

import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from caption.predict import predict
from caption.service import CaptionService


@pytest.fixture(scope="module")
def service(trained_run):
    return CaptionService(trained_run)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def huge_png_header(w: int, h: int) -> bytes:
    """A PNG whose header says w x h (its data is a few bytes): what a decompression bomb looks like."""
    data = png_bytes(Image.new("L", (1, 1)))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def test_a_good_image_gives_predicts_caption_and_one_overlay_per_word(service, trained_run, shapes):
    path = sorted((shapes / "images").glob("*.jpg"))[0]
    out = service.caption(path.read_bytes(), beam_size=3)
    assert out.error is None
    assert out.caption == predict(trained_run, [str(path)], beam_size=3)[0]["caption"]
    assert len(out.overlays) == len(out.words) == len(out.caption.split())
    assert out.image.dtype == np.uint8 and out.image.shape[2] == 3
    assert all(o.shape == out.image.shape and o.dtype == np.uint8 for o in out.overlays)


@pytest.mark.parametrize("name,data,needle", [
    ("empty upload", b"", "no image"),
    ("nothing", None, "no image"),
    ("a text file renamed .jpg", b"just some text, not a JPEG\n" * 10, "not an image"),
    ("a 20,000 x 20,000 image", huge_png_header(20_000, 20_000), "too large"),
    ("a 7,000 x 7,000 image", huge_png_header(7_000, 7_000), "too large: 7000 x 7000"),
])
def test_bad_uploads_are_messages(service, name, data, needle):
    out = service.caption(data)
    assert out.error and needle in out.error and out.caption == "", (name, out.error)


def test_a_truncated_jpeg_is_a_message(service, shapes):
    data = sorted((shapes / "images").glob("*.jpg"))[0].read_bytes()
    out = service.caption(data[: len(data) // 2])
    assert out.error and "cannot decode" in out.error


@pytest.mark.parametrize("make", [
    lambda: Image.new("RGB", (1, 1), (200, 30, 30)),  # a 1x1 PNG
    lambda: Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)),  # 16-bit grey
    lambda: Image.new("CMYK", (64, 48), (0, 200, 200, 0)),
    lambda: Image.new("P", (32, 32)),
])
def test_unusual_images_are_captioned(service, make):
    im = make()
    assert im.mode != "I;16" or im.getextrema()[1] > 255
    data = png_bytes(im) if im.mode != "CMYK" else (lambda b: (im.save(b, "JPEG"), b.getvalue())[1])(io.BytesIO())
    out = service.caption(data, beam_size=2)
    assert out.error is None and len(out.overlays) == len(out.words)


def test_bad_settings_and_concurrent_requests(service, shapes):
    assert "beam size" in service.caption(sorted((shapes / "images").glob("*.jpg"))[0].read_bytes(), beam_size=0).error
    paths = sorted((shapes / "images").glob("*.jpg"))[:6]
    results = [None] * len(paths)

    def work(i):
        results[i] = service.caption(paths[i].read_bytes(), beam_size=2).caption

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    alone = [service.caption(p.read_bytes(), beam_size=2).caption for p in paths]
    assert results == alone


def test_the_page_says_what_its_model_knows(service, tmp_path):
    from caption.service import about
    assert f"{len(service.vocab) - 4} words" in service.about and "Encoder: resnet18 to layer3" in service.about
    (tmp_path / "eval_test").mkdir()
    (tmp_path / "eval_test" / "metrics.json").write_text(
        '{"CIDEr": 3.3, "Bleu_4": 0.74, "shape_precision": 0.99, "shape_precision_chance": 0.42, '
        '"color_precision": 1.0, "pair_precision": 0.9, "grounding": 0.81}')
    text = about(tmp_path, service.vocab, {"backbone": "resnet18", "layer": "layer3", "weights": "/x/enc.safetensors"})
    assert "shape words right 99% (a random one: 42%)" in text and "attention on the named object 81%" in text
    assert "`enc.safetensors`" in text
