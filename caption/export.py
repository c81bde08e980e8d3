"""Package a trained run as a self-contained folder someone else can caption with, offline.

    python -m caption.export --run runs/shapes --out exported/shapes
    python -m caption.predict --run exported/shapes photo.jpg --attention attn.png

The folder holds the decoder (best.safetensors), the encoder it needs (backbone.safetensors, or
the name of torchvision's published ImageNet weights, which torchvision fetches itself),
vocab.json, the resolved config.yaml, encoder.json (the backbone, its weights' identity and the
preprocessing: input size, resize, normalization, grid), metrics.json when the run was
evaluated, and README.md, a model card. Nothing is pickled. It is laid out for the Hugging Face
Hub as it is: `hf upload USER/NAME exported/shapes` (or `huggingface_hub.upload_folder`)
publishes it; nothing here uploads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from caption.encoder import backbone_from_manifest
from caption.metrics import APPROXIMATE
from caption.run import ENCODER, RunError, encoder_of, load_decoder
from common import config as C
from common.cli import command
from common.files import atomic_write_json, atomic_write_text, read_json, sha256_file
from shards.manifest import IDENTITY

def export(run: str | Path, out: str | Path, checkpoint: str = "best") -> Path:
    """Write the folder (see the module's docstring); returns it. An existing `out` is refused."""
    run, out = Path(run), Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out}: exists and is not empty; export into a new folder")
    decoder, vocab, cfg = load_decoder(run, checkpoint)  # checks the checkpoint against vocab and config
    manifest = encoder_of(run, cfg)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / f"{checkpoint}.safetensors", out / "best.safetensors")
    shutil.copy(run / "vocab.json", out / "vocab.json")
    encoder = {k: manifest.get(k) for k in (*IDENTITY, "backbone_file") if k in manifest}
    tuned = run / "backbone.safetensors"
    if tuned.exists() or not str(manifest["weights"]).startswith("imagenet"):
        # the weights file itself: fine-tuned, calibrated random, or a user's file (saved as safetensors)
        backbone = backbone_from_manifest(manifest, cfg.data.features, override=tuned)
        backbone.save(out / "backbone.safetensors")
        encoder.update(weights="backbone.safetensors", weights_sha256=sha256_file(out / "backbone.safetensors")[:16],
                       backbone_file="backbone.safetensors", trained_weights=manifest.get("weights"))
    atomic_write_json(out / ENCODER, encoder, indent=2)
    atomic_write_json(out / "features.json", {k: encoder.get(k) for k in IDENTITY}, indent=2)
    C.save(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features="", input_json="")), out / "config.yaml")
    metrics = run / "eval_test" / "metrics.json"
    if metrics.exists():
        shutil.copy(metrics, out / "metrics.json")
    if (run / "eval_test" / "skipped.json").exists():
        shutil.copy(run / "eval_test" / "skipped.json", out / "skipped.json")
    atomic_write_text(out / "README.md", model_card(run, cfg, encoder, read_json(metrics, "metrics") if metrics.exists()
                                                    else None, len(vocab), manifest, name=out.name))
    return out


BIBTEX = """@inproceedings{xu2015show,
  title     = {Show, Attend and Tell: Neural Image Caption Generation with Visual Attention},
  author    = {Xu, Kelvin and Ba, Jimmy and Kiros, Ryan and Cho, Kyunghyun and Courville, Aaron and
               Salakhutdinov, Ruslan and Zemel, Richard and Bengio, Yoshua},
  booktitle = {Proceedings of the 32nd International Conference on Machine Learning (ICML)},
  year      = {2015}
}"""
CARD_METRICS = {"Bleu_1": "bleu", "Bleu_4": "bleu", "METEOR": "meteor", "ROUGE_L": "rouge", "CIDEr": "cider",
                "SPICE": "spice"}


def training_data(cfg: C.Config, manifest: dict) -> tuple[str, str, bool]:
    """(what the run trained on, a dataset id for the card's YAML, whether it is the synthetic world)."""
    if manifest.get("input_shards"):
        return f"the image-text shards `{manifest['input_shards']}`", str(manifest["input_shards"]), False
    split_file = manifest.get("input_json") or cfg.data.input_json or "its split file"
    try:
        name = read_json(Path(split_file), "split file").get("dataset", "coco")
    except Exception:  # noqa: BLE001 - the file is gone or unreadable: the card says only its path
        name = "coco"
    if name == "shapes":
        return (f"the `train` split of {split_file}: the project's synthetic shapes world (`python -m "
                "featurize.synthetic`), not photographs"), "shapes (synthetic)", True
    return f"the `train` split of {split_file} (Karpathy's split)", name, False


def best_val(run: Path) -> dict | None:
    """The validation row of metrics.jsonl with the best CIDEr-D (greedy decoding during training)."""
    path = run / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("val_CIDEr"), (int, float)):
                rows.append(row)
    return max(rows, key=lambda r: r["val_CIDEr"]) if rows else None


def val_summary(run: Path) -> str:
    """The best validation scores during training, as a sentence, or ''."""
    best = best_val(run)
    if best is None:
        return ""
    return (f"Validation during training (greedy, `val_images_use` images): best CIDEr-D {best['val_CIDEr']:.4f}, "
            f"BLEU-4 {best.get('val_Bleu_4', float('nan')):.4f} at step {best['step']}.\n")


def card_yaml(name: str, dataset: str, metrics: dict | None, split: str = "test") -> str:
    """The card's YAML header: what the Hub indexes (task, dataset, metrics, model-index)."""
    head = ["---", "library_name: pytorch", "pipeline_tag: image-to-text",
            "tags: [image-captioning, show-attend-and-tell, attention]", "license: mit", f"datasets: [{dataset!r}]",
            f"metrics: [{', '.join(sorted(set(CARD_METRICS.values())))}]"]
    scored = {k: v for k, v in (metrics or {}).items() if k in CARD_METRICS and isinstance(v, (int, float))}
    if scored:
        head += ["model-index:", f"- name: {name!r}", "  results:", "  - task: {type: image-to-text, name: Image captioning}",
                 f"    dataset: {{type: {dataset!r}, name: {dataset!r}, split: {split}}}", "    metrics:"]
        head += [f"    - {{type: {CARD_METRICS[k]}, name: {k}, value: {v:.4f}}}" for k, v in scored.items()]
    return "\n".join(head + ["---"])


# long: one Markdown template, read as the card it writes
def model_card(run: Path, cfg: C.Config, encoder: dict, metrics: dict | None, vocab_size: int, manifest: dict,
               name: str = "") -> str:
    """README.md: what the model is, what it was trained on and how, how well it does, how to use it."""
    m, t = cfg.model, cfg.train
    name = name or run.name
    progress = run / "state" / "progress.json"
    steps = json.loads(progress.read_text()).get("step") if progress.exists() else None
    data, dataset, synthetic = training_data(cfg, manifest)
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in (metrics or {}).items() if isinstance(v, (int, float))
                     and not k.endswith(("_words", "_chance", "_count", "_unmatched")))
    table = (f"Test split, beam 3 (`python -m caption.evaluate`), from metrics.json:\n\n| metric | score |\n|---|---|\n{rows}\n"
             if metrics else "The test split was not evaluated before export (`python -m caption.evaluate --run RUN`).\n")
    table += ("\n" + val_summary(run)) if val_summary(run) else ""
    if synthetic:
        table += ("\nThese scores are on synthetic images of colored shapes; they say nothing about photographs.\n")
    skipped_file = run / "eval_test" / "skipped.json"
    skipped = read_json(skipped_file, "skipped scorers") if metrics and skipped_file.exists() else {}
    if isinstance(skipped, dict) and APPROXIMATE in skipped:
        table += f"\n**APPROXIMATE scores**: {skipped[APPROXIMATE]}\n"
    weights = encoder["weights"] if encoder["weights"] != "backbone.safetensors" else \
        f"backbone.safetensors (trained as: {encoder.get('trained_weights')})"
    val = best_val(run)
    indexed, split = (metrics, "test") if metrics else \
        ({"CIDEr": val["val_CIDEr"], "Bleu_4": val.get("val_Bleu_4")} if val else None, "validation")
    return f"""{card_yaml(name, dataset, indexed, split)}

# Show, Attend and Tell captioner: {name}

A soft-attention LSTM decoder (Xu et al. 2015, arXiv 1502.03044) over {encoder['grid']}x{encoder['grid']}x{encoder['channels']}
grids of a frozen {encoder['backbone']} cut at {encoder['layer']}, as trained by image-caption-attention.

## Use

With the image-caption-attention package installed (`pip install -e .` in its repository):

```bash
python -m caption.predict --run THIS_FOLDER photo.jpg --attention attention.png
```

In Python, the same files (the decoder's tensors are plain safetensors):

```python
from caption.run import load_decoder          # best.safetensors + vocab.json + config.yaml
from safetensors.torch import load_file
decoder, vocab, cfg = load_decoder("THIS_FOLDER")
tensors = load_file("THIS_FOLDER/best.safetensors")   # {{"embed.weight": ..., "attention.key.weight": ...}}
```

Loads offline: best.safetensors (decoder), vocab.json, config.yaml, encoder.json
({'backbone.safetensors' if encoder['weights'] == 'backbone.safetensors' else "torchvision's " + str(encoder['weights'])}).
No pickle anywhere.

## Model

- Decoder: embedding {m.embed_dim}, LSTM {m.hidden_dim}, attention {m.attn_dim} ({m.attn_layers} annotation layer(s)),
  {m.attention} attention, dropout {m.dropout}, vocabulary {vocab_size} words.
- Encoder: {encoder['backbone']} to {encoder['layer']}, weights {weights}; input: {encoder.get('resize')},
  {encoder['image_size']} px, normalization {encoder.get('normalization')}.

## Data and recipe

- Trained on {data} ({manifest.get('count', '?')} images with features), captions cut at {t.max_length} words.
- {t.batch_size} images x {t.seq_per_img} captions per step per process, Adam at {t.learning_rate:g},
  {t.max_epochs} epochs{f', {steps} optimizer steps' if steps is not None else ''}; lambda (doubly stochastic) {t.alpha_c};
  model selection on validation {t.select_on}.

## Metrics

{table}
## Intended use and limits

For captioning images like the training images and for studying where attention looks. It
describes only what its training captions describe; on other kinds of images it will still
produce fluent captions that may be wrong. Attention maps show where the decoder looked, not
why. Scores above are on its own test split only.

## Publish

`hf upload USER/NAME THIS_FOLDER` (or `huggingface_hub.upload_folder(repo_id=..., folder_path=...)`).

## Citation

```bibtex
{BIBTEX}
```
"""


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caption.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a trained run folder")
    p.add_argument("--out", required=True, help="a new folder to write")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    a = p.parse_args(argv)
    out = export(a.run, a.out, a.checkpoint)
    print(f"{out}: {', '.join(sorted(f.name for f in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
