"""The decoder learns the shapes world from frozen random-init grids (the demo's settings, smaller)."""

import json

from caption import train
from caption.evaluate import evaluate
from featurize.synthetic import generate
import featurize.__main__ as fz
from tests.conftest import ROOT

# Measured on a 2-core CPU (see bench/RESULTS.md): held-out BLEU-4 LEARN_MEASURED after these steps;
# the untrained decoder scores ~0.0 and the best constant caption ~0.1.
MIN_BLEU4 = 0.2


def test_decoder_learns_the_shapes_world(tmp_path):
    data, feats, run = tmp_path / "shapes", tmp_path / "features", tmp_path / "run"
    generate(data, num_images=600, seed=11, progress=False)
    common = ["--config", str(ROOT / "configs" / "shapes.yaml"), "--input_json", str(data / "dataset.json"),
              "--features", str(feats)]
    assert fz.main(common + ["--split", "all", "--calibration_images", "64"]) == 0
    assert train.main(common + ["--checkpoint_path", str(run), "--max_epochs", "5", "--learning_rate_decay_start", "2"]) == 0
    m = evaluate(run, "test", beam_size=3, scorers=("Bleu", "CIDEr"), progress=False)
    print(json.dumps({k: v for k, v in m.items() if not k.startswith("_")}))
    assert m["Bleu_4"] > MIN_BLEU4, m
