"""The whole path on the built-in shapes world: generate, pretrain the encoder, featurize, train,
evaluate, caption.

    python -m caption.demo --out demo          # what `make demo` runs

Each stage resumes or is skipped when its output is complete, so a second run is quick.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from caption import train
from caption.evaluate import evaluate
from caption.grounding import WORLD_KEYS, summary
from caption.metrics import format_table
from caption.predict import predict
from caption.run import load_progress
from caption.visualize import training_curves
from common.cli import command
from common.config import load
from featurize import synthetic
from featurize.pretrain import PretrainConfig, pretrain
import featurize.__main__ as featurize_cli
from shards.karpathy import load_split


def stage(name: str) -> float:
    print(f"\n== {name} ==", flush=True)
    return time.perf_counter()


def pretrain_encoder(out: Path, data: Path, a: argparse.Namespace) -> Path:
    """COCO's encoder learned ImageNet; the demo's learns the shapes world's train images (each grid
    cell's shape and color), then featurize loads it as it would any weights file."""
    weights = out / "encoder" / "shapes_resnet18.safetensors"
    f = load(a.config).featurize  # the trunk featurize runs, at its input size
    meta = pretrain(data / "dataset.json", weights, PretrainConfig(f.backbone, f.layer, f.image_size, min(128, f.image_size),
                                                                   epochs=a.pretrain_epochs, seed=a.seed))
    acc = meta["held_out_accuracy"]
    print(f"{weights}: held-out object cells: shape {acc['object_cell_shape']:.1%}, color {acc['object_cell_color']:.1%}")
    return weights


def train_stage(args: list[str], run: Path) -> int:
    """Train (resuming where a stopped demo left off); a stop says how to continue and keeps its
    status (130 Ctrl-C, 143 SIGTERM); any other failure is 1."""
    status = train.main(args)
    if status >= 128:  # the state is saved
        step = load_progress(run / "state")["step"]
        print(f"\nstopped during training; run the same command again (`make demo`) to continue from step {step}",
              flush=True)
        return status
    return 1 if status else 0


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caption.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo")
    p.add_argument("--config", default="configs/shapes.yaml")
    p.add_argument("--num_images", type=int, default=2000)
    p.add_argument("--max_epochs", type=int, default=None, help="override the config's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain_epochs", type=int, default=PretrainConfig.epochs, help="the encoder's pretraining epochs")
    a = p.parse_args(argv)
    out = Path(a.out)
    data, feats, run = out / "shapes", out / "features", out / "run"
    common = ["--config", a.config, "--input_json", str(data / "dataset.json"), "--features", str(feats)]
    times = {}

    t = stage("1/6 generate the shapes world")
    there = (data / "dataset.json").exists()
    if not there:
        synthetic.generate(data, a.num_images, a.seed)
    print(f"{data / 'dataset.json'}: {a.num_images} images" + (" (already generated)" if there else ""))
    times["generate"] = time.perf_counter() - t

    t = stage("2/6 pretrain the encoder on the train images' shape and color labels")
    weights = pretrain_encoder(out, data, a)
    times["pretrain"] = time.perf_counter() - t

    t = stage("3/6 featurize train, val, test (the pretrained encoder, frozen)")
    if featurize_cli.main(common + ["--split", "all", "--weights", str(weights)]) != 0:
        return 1
    times["featurize"] = time.perf_counter() - t

    t = stage("4/6 train the attention decoder")  # a finished run resumes to its end at once
    extra = ["--max_epochs", str(a.max_epochs)] if a.max_epochs else []
    status = train_stage(common + ["--checkpoint_path", str(run)] + extra + ["--resume", "auto"], run)
    if status != 0:
        return status
    times["train"] = time.perf_counter() - t

    t = stage("5/6 evaluate on the test split (beam 3): captions, what the words name, where they look")
    m = evaluate(run, "test", beam_size=3, with_grounding=True)
    skipped, eval_dir, _ = m.pop("_skipped"), m.pop("_out"), m.pop("_coverage")
    times["evaluate"] = time.perf_counter() - t

    t = stage("6/6 caption test images with attention figures")
    tests = load_split(data / "dataset.json", "test")[:3]
    figs = out / "figures"
    for r in predict(run, [str(data / e.filename) for e in tests], beam_size=3, attention=str(figs)):
        print(f"{r['image']}: {r['caption']}")
    curves = training_curves(run / "metrics.jsonl", figs / "training_curves.png")
    times["predict"] = time.perf_counter() - t

    print("\n== results ==")
    print(format_table({k: v for k, v in m.items() if k not in WORLD_KEYS}, skipped))
    print("\n" + summary(m))
    print(f"\ndataset      {data}/dataset.json\nfeatures     {feats}/<split>/manifest.json\nrun          {run}/ "
          f"(config.yaml, vocab.json, best.safetensors, metrics.jsonl, tb/)\nresults      {eval_dir}/results.json, metrics.json"
          f"\nencoder      {weights} (+ .json: what it learned)\nfigures      {figs}/ (attention per word; {curves.name})")
    print("time         " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    python = os.path.relpath(sys.executable) if Path(sys.executable).is_relative_to(Path.cwd()) else sys.executable
    print(f"\nthe page: {python} -m caption.app --run {run}   (then open http://127.0.0.1:7860)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
