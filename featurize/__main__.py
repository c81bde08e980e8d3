"""Stage 1: run a frozen ResNet once over a split and cache its grids.

    python -m featurize --split train                          # configs/shapes.yaml
    python -m featurize --config configs/coco.yaml --split all
    accelerate launch -m featurize --config configs/coco.yaml --split train   # many GPUs
    python -m featurize --split train --input_shards 'http://host/cc3m/{00000..00331}.tar' --format wds

Every config field of the `data` and `featurize` sections is a flag (`--backbone resnet50`,
`--image_size 448`, `--format wds`, `--weights none`, ...). Rerunning the same command
after a kill resumes: finished shards are kept, the rest is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from accelerate import PartialState

from common import config as C
from common.cli import command
from common.tensors import default_device
from featurize.extract import build_backbone, featurize_split
from featurize.from_shards import featurize_input_shards
from featurize.prepare import SingleProcess


def process_state():
    """accelerate's PartialState under a launcher (one process per GPU, or gloo on CPU); else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return PartialState(cpu=default_device().type == "cpu")
    return SingleProcess()


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m featurize", description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="all", help="train, val, test, restval or all (train, val, test)")
    p.add_argument("--output", default=None, help="features folder (one subfolder per split); same as --features")
    cfg, ns = C.parse(argv, p, ("data", "featurize"))
    if ns.output:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=ns.output))
    C.require_paths(cfg, "data.features")
    state = process_state()
    backbone, info = build_backbone(cfg.data, cfg.featurize, state)
    splits = ["train", "val", "test"] if ns.split == "all" else [ns.split]
    if cfg.data.input_shards and ns.split == "all":
        splits = [cfg.data.shards_split]  # input shards are one split
    featurize = featurize_input_shards if cfg.data.input_shards else featurize_split
    for split in splits:
        done = (Path(cfg.data.features) / split / "manifest.json").is_file()  # a finished store: checked, not redone
        m = featurize(cfg.data, cfg.featurize, split, backbone, info, state)
        if m is not None:
            print(f"{cfg.data.features}/{split}: {m['count']} records, grid {m['grid']}x{m['grid']}x{m['channels']}, "
                  f"{m['bytes_per_image'] / 1e3:.1f} kB per image, {len(m['failures'])} failed images"
                  + (" (already featurized)" if done else ""))
            for f in m["failures"][:5]:
                print(f"  failed: {f['filename']}: {f['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
