"""An exported run is a self-contained captioner: the same captions from the export as from the
run, with no features folder; a model card whose metrics are the run's; no pickle."""

import json
import re
import shutil

from caption.evaluate import evaluate
from caption.export import main as export_main
from caption.predict import predict
from common import config as C


def test_exported_run_captions_like_the_run(trained_run, shapes, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    metrics = evaluate(run, "test", beam_size=3, scorers=("Bleu", "CIDEr"), progress=False)
    out = tmp_path / "exported"
    assert export_main(["--run", str(run), "--out", str(out)]) == 0
    names = {f.name for f in out.iterdir()}
    assert {"best.safetensors", "vocab.json", "config.yaml", "encoder.json", "features.json", "metrics.json",
            "README.md", "backbone.safetensors"} <= names  # a random backbone: its weights travel with it
    assert {f.suffix for f in out.iterdir()} <= {".safetensors", ".json", ".yaml", ".md"}  # nothing pickled
    # moved elsewhere, its config naming no features folder: it needs nothing but itself
    moved = tmp_path / "elsewhere" / "captioner"
    shutil.move(str(out), str(moved))
    assert C.load(moved / "config.yaml").data.features == ""
    images = sorted((shapes / "images").glob("*.jpg"))[:4]
    ours = [r["caption"] for r in predict(run, [str(p) for p in images], beam_size=3)]
    theirs = [r["caption"] for r in predict(moved, [str(p) for p in images], beam_size=3, attention=str(tmp_path / "fig"))]
    assert ours == theirs
    # the same encoder, bit for bit (the tiny run's captions are short, so compare the grids too)
    import torch
    from caption.encoder import backbone_for_run
    from featurize.images import load_rgb, to_tensor
    x = to_tensor(load_rgb(images[0]), 64)[None]
    (b1, m1), (b2, m2) = backbone_for_run(run, C.load(run / "config.yaml")), backbone_for_run(moved, C.load(moved / "config.yaml"))
    with torch.no_grad():
        assert torch.equal(b1.freeze()(x), b2.freeze()(x)) and m1["image_size"] == m2["image_size"] == 64
    card = (moved / "README.md").read_text()
    for k in ("Bleu_4", "CIDEr"):
        assert re.search(rf"\| {k} \| {metrics[k]:.4f} \|", card), k
    assert json.loads((moved / "metrics.json").read_text())["CIDEr"] == metrics["CIDEr"]
    assert "hf upload" in card and "caption.predict --run" in card
    # the Hub reads the YAML header: task, dataset, metrics and their values
    import yaml
    from huggingface_hub import ModelCard
    hub = ModelCard.load(moved / "README.md")
    assert hub.data.pipeline_tag == "image-to-text" and hub.data.library_name == "pytorch"
    assert {r.metric_name: r.metric_value for r in hub.data.eval_results}["CIDEr"] == round(metrics["CIDEr"], 4)
    assert all(r.dataset_split == "test" for r in hub.data.eval_results)
    head = yaml.safe_load(card.split("---")[1])
    assert head["pipeline_tag"] == "image-to-text" and head["datasets"] == ["shapes (synthetic)"]
    assert head["model-index"][0]["name"] == "exported"  # the folder it was exported to
    values = {m["name"]: m["value"] for m in head["model-index"][0]["results"][0]["metrics"]}
    assert values["CIDEr"] == round(metrics["CIDEr"], 4)
    assert "# Show, Attend and Tell captioner: exported" in card and "synthetic" in card and "@inproceedings{xu2015show" in card
    assert "best CIDEr-D" in card  # the validation during training, too
    # the card's Python snippet runs as written
    snippet = card.split("```python\n")[1].split("```")[0].replace("THIS_FOLDER", str(moved))
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - our own card's code
    assert "embed.weight" in scope["tensors"] and len(scope["vocab"]) == scope["cfg"].model.vocab_size
    # a second export into a non-empty folder is refused
    assert export_main(["--run", str(run), "--out", str(moved)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_the_publish_command_the_card_names_exists():
    """The card's `hf upload` comes with huggingface_hub 2.x (installed with accelerate), in this environment."""
    import subprocess
    import sys
    from pathlib import Path
    hf = Path(sys.executable).parent / "hf"
    assert hf.exists(), hf
    r = subprocess.run([str(hf), "upload", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "upload" in r.stdout.lower()
