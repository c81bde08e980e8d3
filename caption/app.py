"""A page that captions any image and shows where each word looked (Gradio; `pip install -e '.[app]'`).

    python -m caption.app --run demo/run                 # http://127.0.0.1:7860
    python -m caption.app --run exported/coco --host 0.0.0.0 --port 8080

Upload a photo or pick an example (the shapes world's test images for the demo's run): it is
captioned at once and shown beside the caption, a word strip (choose a word to see its 14x14
attention upsampled over the photo) and every word's map; "Caption again" re-captions it with a
new beam size or maximum length. The run is loaded once
(caption/service.py) and requests queue; a bad upload is a message on the page.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from caption.service import CaptionService
from common import config as C
from common.cli import command
from common.errors import UserError
from shards.karpathy import load_split


def examples_for(run: Path, limit: int = 6) -> list[str]:
    """Test images of the run's split file, when it is there (the demo's shapes world)."""
    try:
        cfg = C.load(run / "config.yaml")
        entries = load_split(cfg.data.input_json, "test", cfg.data.restval_in_train)[:limit]
        root = C.images_root(cfg.data)
    except UserError:
        return []
    return [str(root / e.filename) for e in entries if (root / e.filename).is_file()]


def build(service: CaptionService, examples: list[str]):
    """The Gradio Blocks page over `service` (gradio imported here: it is an optional extra)."""
    import gradio as gr

    nothing = ("", "", gr.update(choices=[], value=None), None, [], None, [])

    def run_caption(path, beam_size, max_length):
        if not path:  # the file was cleared: an empty page, not an error
            return nothing
        out = service.caption(path, beam_size, max_length)
        if out.error:
            return ("", f"**Could not caption this file:** {out.error}", *nothing[2:])
        strip = [f"{i + 1}. {w}" for i, w in enumerate(out.words)]
        first = out.overlays[0] if out.overlays else out.image
        return (out.caption, "", gr.update(choices=strip, value=strip[0] if strip else None), first,
                [(o, w) for o, w in zip(out.overlays, out.words)], out.image, out.overlays)

    def show_word(choice, overlays):
        if not choice or not overlays:
            return None
        return overlays[int(choice.split(".", 1)[0]) - 1]

    with gr.Blocks(title="Show, Attend and Tell") as page:
        gr.Markdown("# Show, Attend and Tell\nUpload a photo (or pick an example); each word of the caption "
                    "shows where the model looked.")
        gr.Markdown(service.about, elem_id="about")
        overlays = gr.State([])
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image file: upload one, or pick an example below", file_types=["image"],
                                 type="filepath", elem_id="upload")
                photo = gr.Image(label="the image the model captioned", type="numpy", interactive=False,
                                 elem_id="photo")
                beam = gr.Slider(1, 10, value=3, step=1, label="beam size")
                length = gr.Slider(5, 30, value=20, step=1, label="max length")
                button = gr.Button("Caption again", variant="primary", elem_id="caption-button")
                if examples:
                    gr.Examples(examples, inputs=upload, label="examples: the shapes world's test images",
                                elem_id="examples")
            with gr.Column():
                caption = gr.Textbox(label="caption", interactive=False, elem_id="caption")
                message = gr.Markdown(elem_id="message")
                words = gr.Radio([], label="words: choose one to see where it looked", elem_id="words")
                attention = gr.Image(label="where the chosen word looked (the rest dimmed)", type="numpy",
                                     interactive=False, elem_id="attention")
        grid = gr.Gallery(label="where every word looked", columns=6, elem_id="grid")
        outputs = [caption, message, words, attention, grid, photo, overlays]
        # an upload or a picked example is captioned at once; the button re-captions with new settings
        upload.change(run_caption, [upload, beam, length], outputs)
        button.click(run_caption, [upload, beam, length], outputs)
        words.change(show_word, [words, overlays], attention)
    return page


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caption.app", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run folder (or an exported one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    a = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio  # noqa: F401 - present, or a one-line message instead of a traceback
    except ImportError:
        raise UserError("the page needs Gradio: pip install -e '.[app]'") from None
    service = CaptionService(a.run)
    page = build(service, examples_for(Path(a.run)))
    print(f"serving {a.run} at http://{a.host}:{a.port}", flush=True)
    page.queue(default_concurrency_limit=1).launch(server_name=a.host, server_port=a.port, show_error=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
