import json
import re

import pytest
import torch
from safetensors.torch import load_file

from caption import train
from tests.conftest import ROOT, tiny_args


def val_rows(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_CIDEr" in r]


def test_finetune_mechanics(shapes, tiny_features, trained_run, tmp_path):
    run = tmp_path / "ft"
    args = tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--finetune", "true", "--init_from", str(trained_run),
                     "--finetune_layers", "layer3", "--cnn_learning_rate", "1e-3", "--max_steps", "6", "--batch_size", "8")
    assert train.main(args) == 0
    before = load_file(str(tiny_features / "backbone.safetensors"))
    after = load_file(str(run / "backbone_last.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("stages.layer3.") for k in changed)  # only the chosen block trained
    assert not any("running_" in k or ".bn" in k or "downsample.1" in k for k in changed)  # BatchNorm frozen
    assert any(k.startswith("stages.layer3.") and "conv" in k for k in changed)
    # step 0 scores what the cached run scored: same decoder, grids from the same backbone
    first = val_rows(run)[0]
    cached_best = max(val_rows(trained_run), key=lambda r: r["val_CIDEr"])
    assert first["step"] == 0
    assert first["val_CIDEr"] == pytest.approx(cached_best["val_CIDEr"], abs=0.02)
    assert first["val_Bleu_4"] == pytest.approx(cached_best["val_Bleu_4"], abs=0.02)
    # evaluate computes the test grids from images with the fine-tuned backbone
    from caption.evaluate import evaluate
    m = evaluate(run, "test", beam_size=1, scorers=("Bleu",), progress=False)
    assert "Bleu_4" in m and len(json.loads((run / "eval_test" / "results.json").read_text())) == 12
    # re-featurize with the fine-tuned backbone: the cheap cached path benefits from it
    import featurize.__main__ as fz
    from shards import load_manifest, open_store
    out = tmp_path / "refeat"
    assert fz.main(tiny_args(shapes, out, "--split", "test", "--weights", str(run / "backbone.safetensors"))) == 0
    m = load_manifest(out / "test")
    assert m["weights"] == str((run / "backbone.safetensors").resolve()) and m["count"] == 12
    old, new = open_store(tiny_features / "test")[0]["features"], open_store(out / "test")[0]["features"]
    assert old.shape == new.shape and not (old == new).all()
    # predict uses the fine-tuned backbone saved with the run
    from caption.encoder import backbone_for_run
    from common.config import load
    bb, _ = backbone_for_run(run, load(run / "config.yaml"))
    ref = load_file(str(run / "backbone.safetensors"))
    assert torch.equal(bb.state_dict()["stages.layer3.0.conv1.weight"], ref["stages.layer3.0.conv1.weight"])


def test_select_on_nll_measures_the_encoder_being_trained(shapes, tiny_features, trained_run, tmp_path):
    """With --select_on nll, a fine-tuning run's val NLL is that of grids from its backbone as it
    is at the validation (the same grids its CIDEr-D is measured on), not of the cached grids."""
    import numpy as np
    from caption.data import collate, encode_record
    from caption.encoder import backbone_from_manifest, image_records
    from caption.model import sequence_loss
    from caption.run import load_decoder
    from shards import load_manifest, open_store
    from shards.karpathy import load_split
    run = tmp_path / "ft"
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--finetune", "true", "--init_from",
                                str(trained_run), "--finetune_layers", "layer3", "--cnn_learning_rate", "3e-2",
                                "--max_steps", "6", "--batch_size", "8", "--select_on", "nll")) == 0
    logged = val_rows(run)[-1]
    assert logged["step"] == 6
    decoder, vocab, cfg = load_decoder(run, "last")
    seed, S, T = cfg.train.seed, cfg.train.seq_per_img, cfg.train.max_length

    def nll(records):
        items = [encode_record(r, vocab, S, T, np.random.default_rng([seed, j])) for j, r in enumerate(records)]
        b = collate(items, vocab)
        with torch.no_grad():
            out = decoder(b["features"], b["tokens"], S)
            _, xent, ntok = sequence_loss(out.logits, b["targets"], out.alphas, vocab.pad_id, 0.0)
        return (xent / ntok).item()

    backbone = backbone_from_manifest(load_manifest(tiny_features / "train"), tiny_features,
                                      override=run / "backbone_last.safetensors")
    now = list(image_records(load_split(shapes / "dataset.json", "val"), shapes, 64, backbone, "cpu"))
    cached = list(open_store(tiny_features / "val").iter_records())
    assert logged["val_NLL"] == pytest.approx(nll(now), abs=1e-4)
    assert abs(nll(cached) - nll(now)) > 1e-3  # the backbone moved: the cached grids would say something else


def test_finetune_needs_a_cached_run(shapes, tiny_features, tmp_path, capsys):
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(tmp_path / "x"), "--finetune", "true")) == 1
    assert "--init_from" in capsys.readouterr().err


def test_two_process_finetune(shapes, tiny_features, trained_run, tmp_path, run_torchrun):
    r = run_torchrun(ROOT / "caption" / "train.py",
                     *tiny_args(shapes, tiny_features, "--checkpoint_path", str(tmp_path / "ft2"), "--finetune", "true",
                                "--init_from", str(trained_run), "--max_steps", "3", "--finetune_start", "1",
                                "--finetune_layers", "layer3"))
    out = r.out
    assert r.returncode == 0, out[-3000:]
    assert "2 process(es)" in out
    assert sorted(re.findall(r"rank \d/2: \d+ batches this run", out)) == [
        "rank 0/2: 3 batches this run", "rank 1/2: 3 batches this run"]
