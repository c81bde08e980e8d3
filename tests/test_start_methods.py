"""DataLoader workers under forkserver (Python 3.14's default on Linux) and spawn: every dataset and
collate function the loaders hand to a worker must pickle, so training (zarr, webdataset, images
when fine-tuning) and featurizing with `num_workers 1` run to the end under each start method."""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_args

SCRIPT = """
import multiprocessing, sys
multiprocessing.set_start_method(sys.argv[1], force=True)
import {module} as m
raise SystemExit(m.main(sys.argv[2:]))
"""


def run_with(method: str, module: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(module=module), method, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_train_and_featurize_with_workers(method, shapes, tiny_features, trained_run, tmp_path, copy_backbone):
    feats = copy_backbone(tiny_features, tmp_path / "features")  # the same encoder: val can come from tiny_features
    r = run_with(method, "featurize.__main__", tiny_args(shapes, feats, "--split", "train", "--num_workers", "1",
                                                          "--format", "wds"))
    assert r.returncode == 0, r.stderr[-3000:]
    for name, extra in (("zarr", ["--features", str(tiny_features)]),
                        ("wds", ["--features", str(feats)]),
                        ("finetune", ["--features", str(tiny_features), "--finetune", "true", "--init_from",
                                      str(trained_run), "--finetune_layers", "layer3"])):
        if name == "wds":  # validation reads the val split: the zarr one, from the same encoder
            shutil.copytree(tiny_features / "val", feats / "val")
        run = tmp_path / f"run_{name}"
        r = run_with(method, "caption.train", tiny_args(shapes, tiny_features, "--checkpoint_path", str(run),
                                                         "--max_epochs", "1", "--num_workers", "1", *extra))
        assert r.returncode == 0, (name, r.stderr[-3000:])
        assert "Can't pickle" not in r.stderr and (run / "best.safetensors").exists(), name
