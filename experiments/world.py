"""Why the demo's model did not know its world: encoder x alpha_c x epochs (x the attention's query
and dropout), on one generated world.

    python -m experiments.world --out runs/world            # ~40 minutes on 2 cores
    python -m experiments.world --out runs/world --only 4,8   # the paper's query against the word's

Generates the demo's world once (2,000 images, seed 0), featurizes it twice (the random-init
ResNet-18 with BatchNorm re-estimated, and the one `featurize.pretrain` trains on the train
images' cell labels), then trains the demo's decoder settings (configs/shapes.yaml) for each arm
and scores the test split (beam 3): color, shape and pair precision, grounding, BLEU-4, CIDEr-D,
and the training time. Prints a Markdown table (and writes it with the JSON beside the runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from caption import train
from caption.evaluate import evaluate
from common.cli import command
from featurize import synthetic
from featurize.pretrain import PretrainConfig, pretrain
import featurize.__main__ as featurize_cli

# (encoder, alpha_c, epochs, attention query, dropout); alpha_c 0.2 is capgen's weight at this batch: it
# sums the term over the batch's 40 captions and averages it over the 196 cells (40 / 196 per caption).
ARMS = (("random", 1.0, 6, "state", 0.1), ("random", 0.0, 6, "state", 0.1), ("pretrained", 1.0, 6, "state", 0.1),
        ("pretrained", 0.2, 6, "state", 0.1), ("pretrained", 0.0, 6, "state", 0.1), ("pretrained", 0.2, 12, "state", 0.1),
        ("pretrained", 0.2, 6, "state", 0.5), ("pretrained", 0.2, 6, "state_word", 0.1))
COLUMNS = ("shape_precision", "color_precision", "pair_precision", "grounding", "Bleu_4", "CIDEr")


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.world", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/world")
    p.add_argument("--num_images", type=int, default=2000)
    p.add_argument("--only", default="", help="comma-separated arm numbers (1-based); default all")
    a = p.parse_args(argv)
    out = Path(a.out)
    data = out / "shapes"
    if not (data / "dataset.json").exists():
        synthetic.generate(data, a.num_images, 0)
    t = time.perf_counter()
    weights = out / "encoder" / "shapes_resnet18.safetensors"
    meta = pretrain(data / "dataset.json", weights, PretrainConfig())
    pretrain_s = meta["seconds"] if "seconds" in meta else time.perf_counter() - t
    base = ["--config", "configs/shapes.yaml", "--input_json", str(data / "dataset.json")]
    for enc, extra in (("random", []), ("pretrained", ["--weights", str(weights)])):
        if featurize_cli.main(base + ["--features", str(out / f"features_{enc}"), "--split", "all"] + extra) != 0:
            return 1
    rows = []
    chosen = {int(i) for i in a.only.split(",") if i} or set(range(1, len(ARMS) + 1))
    for n, (enc, alpha_c, epochs, query, dropout) in enumerate(ARMS, 1):
        if n not in chosen:
            continue
        run = out / (f"{enc}_alpha{alpha_c:g}_ep{epochs}" + (f"_{query}" if query != "state" else "")
                     + (f"_drop{dropout:g}" if dropout != 0.1 else ""))
        timing = run / "train_seconds.json"
        if not timing.exists():
            t = time.perf_counter()
            if train.main(base + ["--features", str(out / f"features_{enc}"), "--checkpoint_path", str(run),
                                  "--alpha_c", str(alpha_c), "--max_epochs", str(epochs),
                                  "--attention_query", query, "--dropout", str(dropout),
                                  "--resume", "auto"]) != 0:
                return 1
            timing.write_text(json.dumps({"seconds": time.perf_counter() - t}))
        m = evaluate(run, "test", beam_size=3, with_grounding=True, scorers=("Bleu", "CIDEr"), progress=False)
        rows.append({"arm": n, "encoder": enc, "alpha_c": alpha_c, "epochs": epochs, "query": query, "dropout": dropout,
                     **{k: m[k] for k in COLUMNS}, **{f"{k}_chance": m[f"{k}_chance"] for k in COLUMNS[:4]},
                     "train_s": json.loads(timing.read_text())["seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| # | encoder | alpha_c | epochs | query | dropout | shape words | color words | pairs | grounding | BLEU-4 | "
             "CIDEr-D | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['encoder']} | {r['alpha_c']:g} | {r['epochs']} | {r['query']} | {r['dropout']:g} | "
                     f"{r['shape_precision']:.1%} | "
                     f"{r['color_precision']:.1%} | {r['pair_precision']:.1%} | {r['grounding']:.1%} | {r['Bleu_4']:.3f} | "
                     f"{r['CIDEr']:.3f} | {r['train_s']:.0f} |")
    if rows:
        r = rows[0]
        lines.append(f"| | chance | | | | | {r['shape_precision_chance']:.1%} | {r['color_precision_chance']:.1%} | "
                     f"{r['pair_precision_chance']:.1%} | {r['grounding_chance']:.1%} | | | |")
    table = "\n".join(lines)
    print(f"\nencoder pretraining: {pretrain_s:.0f} s, held-out object cells {meta['held_out_accuracy']}\n\n{table}")
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
