import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caption import train
from caption.run import RunError, load_decoder
from tests.conftest import ROOT, tiny_args


def run_args(shapes, features, run, *extra):
    return tiny_args(shapes, features, "--checkpoint_path", str(run), *extra)


def test_train_writes_a_run(shapes, tiny_features, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(run_args(shapes, tiny_features, run, "--max_epochs", "1")) == 0
    for f in ("config.yaml", "vocab.json", "best.safetensors", "last.safetensors", "metrics.jsonl", "state/progress.json"):
        assert (run / f).exists(), f
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_CIDEr" in r for r in rows) and any("loss" in r for r in rows)
    model, vocab, cfg = load_decoder(run)
    assert cfg.model.feature_dim == 256 and cfg.model.vocab_size == len(vocab)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for events in run.glob("tb/**/events.out.tfevents*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train/loss", "train/xent", "train/lr", "val/CIDEr-D", "val/BLEU-4"} <= tags, tags  # grouped, named
    assert {"hparam/best_val_CIDEr-D", "hparam/steps"} <= tags, tags  # HPARAMS: the settings with their results
    # a second run into the same folder without --resume is refused
    assert train.main(run_args(shapes, tiny_features, run)) == 1
    assert "pass --resume" in capsys.readouterr().err


def test_each_store_is_opened_once_per_run(shapes, tiny_features, tmp_path, monkeypatch):
    """Two epochs with validation after each: the train and val stores are opened (their index
    read and checked, or fetched over HTTP) once each, and every reader shares them."""
    from caption import splits
    opened = []
    real = splits.open_store
    monkeypatch.setattr(splits, "open_store", lambda root, **kw: opened.append(Path(root).name) or real(root, **kw))
    run = tmp_path / "run"
    assert train.main(run_args(shapes, tiny_features, run, "--max_epochs", "2", "--select_on", "nll")) == 0
    assert sorted(opened) == ["train", "val"]
    assert len([r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_NLL" in r]) == 2


def test_resume_equals_uninterrupted(shapes, tiny_features, tmp_path):
    common = ("--dropout", "0.3", "--max_epochs", "3", "--save_checkpoint_every", "0")
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(run_args(shapes, tiny_features, a, *common, "--max_steps", "30")) == 0
    assert train.main(run_args(shapes, tiny_features, b, *common, "--max_steps", "15")) == 0  # 15 = mid-epoch (24 per epoch)
    progress = json.loads((b / "state" / "progress.json").read_text())
    assert progress["step"] == 15 and progress["batch"] == 15
    assert train.main(run_args(shapes, tiny_features, b, *common, "--max_steps", "30", "--resume", "true")) == 0
    wa, wb = load_file(str(a / "last.safetensors")), load_file(str(b / "last.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_guards(shapes, tiny_features, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(run_args(shapes, tmp_path / "nofeatures", run)) == 1
    assert "no such features folder" in capsys.readouterr().err
    assert train.main(run_args(shapes, tiny_features, run, "--learning_rate", "1e30", "--grad_clip", "0", "--max_epochs", "1")) == 1
    assert "loss is" in capsys.readouterr().err
    ok = tmp_path / "ok"
    assert train.main(run_args(shapes, tiny_features, ok, "--max_steps", "2")) == 0
    words = json.loads((ok / "vocab.json").read_text())
    (ok / "vocab.json").write_text(json.dumps(words + ["extra"]))
    with pytest.raises(RunError, match="vocabulary"):
        load_decoder(ok)


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_two_process_training(shapes, tiny_features, tmp_path, backend, run_torchrun):
    features = tiny_features
    if backend == "wds":
        from shards.__main__ import convert
        features = tmp_path / "wds"
        for split in ("train", "val"):
            convert(tiny_features / split, features / split, "wds", shard_size=16)
    r = run_torchrun(ROOT / "caption" / "train.py",
                     *run_args(shapes, features, tmp_path / "run", "--max_epochs", "2", "--num_workers", "0"))
    out = r.out
    assert r.returncode == 0, out[-3000:]
    assert "2 process(es)" in out
    counts = sorted(re.findall(r"rank \d/2: \d+ batches this run", out))
    assert counts == ["rank 0/2: 24 batches this run", "rank 1/2: 24 batches this run"]  # 96 images / (4 x 2) x 2 epochs
    assert (tmp_path / "run" / "best.safetensors").exists()
