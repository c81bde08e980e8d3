"""Beyond cross entropy on the shapes world, with equal extra step budgets after the same run.

    python -m experiments.extras --base demo/run --steps 200

From a finished cross-entropy run (e.g. `make demo`'s), trains for `--steps` more steps:
  xent       continued cross entropy (the control);
  scst       self-critical training, CIDEr-D reward, mean-of-other-samples baseline;
  finetune   end-to-end: the backbone's layer3 trains with the decoder, from images;
and, from scratch with the base run's settings and epochs:
  hard       stochastic hard attention (REINFORCE, semi-sampling 0.5), against the base (soft).
Each is scored on the test split (beam 3) with BLEU-4, CIDEr-D and attention grounding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from caption import train
from caption.evaluate import evaluate
from common import config as C


def score(run: Path) -> dict:
    m = evaluate(run, "test", beam_size=3, with_grounding=True, scorers=("Bleu", "CIDEr"), progress=False)
    return {"Bleu_4": m["Bleu_4"], "CIDEr": m["CIDEr"], "grounding": m["grounding"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.extras", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a finished cross-entropy run folder")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=None, help="where the extra runs go (default: BASE_extras)")
    p.add_argument("--only", default="xent,scst,finetune,hard")
    a = p.parse_args(argv)
    base = Path(a.base)
    cfg = C.load(base / "config.yaml")
    out = Path(a.out or f"{base}_extras")
    common = ["--config", str(base / "config.yaml"), "--input_json", cfg.data.input_json, "--features", cfg.data.features,
              "--id", "", "--resume", "false", "--init_from", ""]
    arms = {
        "xent": ["--init_from", str(base), "--max_steps", str(a.steps), "--learning_rate", "2e-4",
                 "--learning_rate_decay_start", "-1"],
        "scst": ["--init_from", str(base), "--max_steps", str(a.steps), "--learning_rate", "2e-4",
                 "--learning_rate_decay_start", "-1", "--self_critical_after", "0", "--sc_sample_n", "5", "--sc_baseline", "mean"],
        "finetune": ["--init_from", str(base), "--max_steps", str(a.steps), "--learning_rate", "2e-4",
                     "--learning_rate_decay_start", "-1", "--finetune", "true", "--finetune_layers", "layer3",
                     "--cnn_learning_rate", "1e-4"],
        "hard": ["--attention", "hard"],
    }
    rows = {"base (soft, cross entropy)": {**score(base), "seconds": float("nan")}}
    for name in a.only.split(","):
        run = out / name
        t = time.perf_counter()
        if not (run / "best.safetensors").exists():
            if train.main(common + arms[name] + ["--checkpoint_path", str(run), "--save_checkpoint_every", "0"]) != 0:
                return 1
        rows[name] = {**score(run), "seconds": time.perf_counter() - t}
        print(json.dumps({name: rows[name]}), flush=True)
    print(f"\n{'arm':<28} {'BLEU-4':>7} {'CIDEr-D':>8} {'grounding':>9} {'train s':>8}")
    for k, r in rows.items():
        print(f"{k:<28} {r['Bleu_4']:>7.3f} {r['CIDEr']:>8.3f} {r['grounding']:>9.1%} {r['seconds']:>8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
