"""Score a trained run on a split the way papers do: beam search, PTB tokenization, coco-caption.

    python -m caption.evaluate --run runs/shapes --split test --beam_size 3
    python -m caption.evaluate --run runs/shapes --split test --grounding   # shapes world

Writes RUN/eval_<split>/results.json (COCO results format: [{"image_id", "caption"}]) and
metrics.json (a flat object: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE when it runs,
grounding when asked), and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from caption.decode import decode_records
from caption.encoder import backbone_for_run, image_records
from caption.grounding import WORLD_KEYS, summary, world_scores
from caption.metrics import ALL, format_table, score
from caption.references import raw_references
from caption.run import features_dir, load_decoder, run_features
from caption.splits import check_split, open_split
from common.cli import command
from common.config import check_args, images_root
from common.files import atomic_write_json
from common.tensors import default_device
from shards.karpathy import load_split
from shards.manifest import StoreError


def split_entries(cfg, split: str) -> dict:
    """The split's entries by image id (the shapes world's carry their objects)."""
    return {e.image_id: e for e in load_split(cfg.data.input_json, split, cfg.data.restval_in_train)}


def evaluate(run: str | Path, split: str = "test", beam_size: int = 3, features: str | None = None,
             checkpoint: str = "best", max_length: int = 20, length_penalty: float = 0.0, suppress_unk: bool = False,
             with_grounding: bool = False, limit: int = -1, batch_size: int = 50, scorers=None, out: str | Path | None = None,
             progress: bool = True, from_images: bool | None = None) -> dict:
    """Decode a split with a run's decoder, write results.json and metrics.json; returns the metrics.

    from_images: compute the grids now from the split's images with the run's encoder (a
    fine-tuned run's RUN/backbone.safetensors); default: yes for fine-tuned runs, else the
    cached features are read.
    """
    device = default_device()
    model, vocab, cfg = load_decoder(run, checkpoint, device)
    coverage = ""
    from_images = cfg.train.finetune if from_images is None else from_images
    data = None  # the split's opened store (read once), when its grids are read rather than computed
    if from_images:
        backbone, m = backbone_for_run(run, cfg)
        backbone = backbone.to(device)
        entries = load_split(cfg.data.input_json, split, cfg.data.restval_in_train)  # parsed once: images, references
        use = entries[:limit] if limit >= 0 else entries
        n, grid = len(use), int(m["grid"])
        records = image_records(use, images_root(cfg.data), int(m["image_size"]), backbone, device)
    else:
        root = features_dir(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=str(features or cfg.data.features))), split)
        data = open_split(root, split, cfg.data.input_json, cfg.data.restval_in_train, cfg.data.url_timeout)
        if data.manifest["channels"] != cfg.model.feature_dim:
            raise StoreError(f"{root}: {data.manifest['channels']}-channel features, the run's decoder expects {cfg.model.feature_dim}")
        check_split(data, *run_features(run, cfg))
        store, ids, entries = data.store, data.image_ids(), data.entries  # entries: None for input-shard stores
        n, grid = (len(store) if limit < 0 else min(limit, len(store))), int(data.manifest["grid"])
        if limit < 0 and len(store) < len(ids):  # scored anyway (COCO has a broken image), but said
            failed = len(data.manifest.get("failures", []))
            coverage = (f"{root}: scoring {len(store)} of the {len(ids)} images of split {split!r} "
                        f"({failed} failed to decode, listed in its manifest; {len(ids) - len(store) - failed} not featurized)")
        records = data.records(limit=limit)
    res = decode_records(model, vocab, records, device, beam_size, batch_size, max_length,
                         length_penalty, suppress_unk, keep_alphas=with_grounding, progress=progress, total=n)
    results = [{"image_id": r["image_id"], "caption": r["caption"]} for r in res]
    out = Path(out) if out else Path(run) / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    ids = [r["image_id"] for r in results]
    refs = data.references(ids) if data is not None else raw_references(entries, ids)
    metrics, skipped = score(refs, {r["image_id"]: r["caption"] for r in results}, scorers or ALL)
    if with_grounding:
        by_id = {e.image_id: e for e in entries} if entries is not None else split_entries(cfg, split)
        metrics.update(world_scores(res, by_id, grid))
    atomic_write_json(out / "metrics.json", metrics)
    if skipped:
        atomic_write_json(out / "skipped.json", skipped)
    metrics["_skipped"] = skipped
    metrics["_out"] = str(out)
    metrics["_coverage"] = coverage
    return metrics


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caption.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder (config.yaml, vocab.json, best.safetensors)")
    p.add_argument("--split", default="test")
    p.add_argument("--beam_size", type=int, default=3)
    p.add_argument("--features", default=None, help="features folder holding <split>/ (default: the run's)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--max_length", type=int, default=20)
    p.add_argument("--length_penalty", type=float, default=0.0, help="divide log p by length**this (0: off)")
    p.add_argument("--suppress_unk", action="store_true",
                   help="never emit <unk> (off by default: the scores are of what the model says; self-critical.pytorch "
                        "suppresses it by default, opts.py:357, so pass this to compare with its numbers)")
    p.add_argument("--grounding", action="store_true", help="shapes world: color, shape and pair precision, and whether "
                   "each such word's argmax attention lies inside the object it names (caption/grounding.py)")
    p.add_argument("--limit", type=int, default=-1, help="first N images only")
    p.add_argument("--batch_size", type=int, default=50, help="images per batched beam search")
    p.add_argument("--out", default=None, help="output folder (default RUN/eval_SPLIT)")
    p.add_argument("--from_images", default=None, choices=["true", "false"],
                   help="compute grids from the images with the run's encoder (default: true for fine-tuned runs)")
    a = p.parse_args(argv)
    check_args(a, {"beam_size": {"ge": 1, "le": 100}, "max_length": {"ge": 1, "le": 1000}, "batch_size": {"ge": 1, "le": 100_000},
                   "limit": {"ge": -1, "not_zero": True, "help": "-1: every image"}})
    m = evaluate(a.run, a.split, a.beam_size, a.features, a.checkpoint, a.max_length, a.length_penalty,
                 a.suppress_unk, a.grounding, a.limit, a.batch_size, out=a.out,
                 from_images=None if a.from_images is None else a.from_images == "true")
    skipped, out, coverage = m.pop("_skipped"), m.pop("_out"), m.pop("_coverage")
    if coverage:
        print(f"note: {coverage}", file=sys.stderr)
    print(format_table({k: v for k, v in m.items() if k not in WORLD_KEYS}, skipped))
    if a.grounding:
        print(summary(m))
    print(f"wrote {out}/results.json and {out}/metrics.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
