"""The README's code, run as written (paths swapped for the test's files): every Python block,
and every `python -m caption.*` / `python -m shards` command it gives that needs no COCO."""

import re
import shlex
import textwrap
from importlib import import_module

import numpy as np
import pytest

from shards import open_store
from shards.__main__ import convert
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
RUN_BY = {"From Python:": "test_the_readmes_python_snippet_runs",
          "A zarr store read with zarr-python alone": "test_the_readmes_zarr_snippet_reads_a_store",
          "A wds store read with webdataset alone": "test_the_readmes_webdataset_snippet_reads_a_store"}


def python_block(after: str) -> str:
    """The first Python block after the text `after`, dedented."""
    block = README.split(after, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return textwrap.dedent(block)


def test_every_python_block_of_the_readme_is_run_here():
    """A new block without a test here fails this test: name it in RUN_BY and run it."""
    covered = [textwrap.dedent(python_block(after)) for after in RUN_BY]
    assert sorted(covered) == sorted(textwrap.dedent(b) for b in PYTHON_BLOCKS)
    assert all(name in globals() for name in RUN_BY.values())


def test_the_readmes_zarr_snippet_reads_a_store(tiny_features, monkeypatch):
    """The zarr-python block, run in the features folder of a store of ours: it finds the first
    filled row's grid, key and captions, equal to what the project's reader gives."""
    block = python_block("A zarr store read with zarr-python alone")
    monkeypatch.chdir(tiny_features.parent)
    block = block.replace('"features/train"', repr(f"{tiny_features.name}/train"))
    scope: dict = {}
    exec(block, scope)  # noqa: S102 - the README's own code
    first = open_store(tiny_features / "train")[0]
    assert scope["key"] == first["key"] and scope["refs"] == first["captions"]
    assert np.asarray(scope["grid"]).tobytes() == first["features"].tobytes()


def test_the_readmes_python_snippet_runs(trained_run, shapes, tmp_path, monkeypatch, capsys):
    """README's "From Python" block, run as written against a trained run and a shapes image."""
    import caption.evaluate
    code = python_block("From Python:")
    image = next((shapes / "images").glob("*.jpg"))
    code = (code.replace('"demo/run"', repr(str(trained_run))).replace('"photo.jpg"', repr(str(image)))
                .replace('"figures/"', repr(str(tmp_path / "figures"))))
    monkeypatch.setattr(caption.evaluate, "ALL", ("Bleu", "CIDEr"))  # the snippet's defaults, without Java's METEOR
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    caption_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert caption_line.split()[-1].endswith("_attention.png") and (tmp_path / "figures").is_dir()
    assert scope["metrics"]["CIDEr"] >= 0 and (trained_run / "eval_test" / "metrics.json").exists()


def test_the_readmes_webdataset_snippet_reads_a_store(tiny_features, tmp_path):
    """The README's block for webdataset users runs as written on a wds store of ours (paths
    swapped): every record's grid and metadata, the member names as the README gives them."""
    convert(tiny_features / "train", tmp_path / "train", "wds", shard_size=16)
    block = python_block("A wds store read with webdataset alone")
    tars = sorted(p.name for p in (tmp_path / "train").glob("shard-*.tar"))
    assert len(tars) == 6
    block = re.sub(r'"features/cc3m/train/shard-\{000000\.\.000009\}\.tar"',
                   f'"{tmp_path}/train/shard-{{000000..{len(tars) - 1:06d}}}.tar"', block)
    block = block.replace("for s in", "seen = []\nfor s in") + "\n    seen.append((grid, meta))\n"
    scope: dict = {}
    exec(block, scope)  # noqa: S102 - the README's own code
    store = open_store(tiny_features / "train")
    assert len(scope["seen"]) == len(store) == 96
    first = store[0]
    grid, meta = scope["seen"][0]
    assert grid.shape == first["features"].shape and grid.dtype == np.float16 and meta["key"] == first["key"]


@pytest.mark.slow  # pycocoevalcap's Java (PTB tokenizer, METEOR)
def test_the_readmes_commands_run(trained_run, shapes, tiny_features, tmp_path, capsys):
    """Every `python -m caption.evaluate|predict|score|export` and `python -m shards verify` line of
    the README, its COCO paths swapped for the tiny world's: each exits 0 and writes what it says."""
    image = sorted((shapes / "images").glob("*.jpg"))[0]
    swap = {"runs/coco": str(trained_run), "demo/run": str(trained_run), "photo.jpg": str(image),
            "IMAGE": str(image), "attn.png": str(tmp_path / "attn.png"), "out.png": str(tmp_path / "out.png"),
            "other.json": str(trained_run / "eval_test" / "results.json"),
            "data/coco/dataset_coco.json": str(shapes / "dataset.json"),
            "features/coco/train": str(tiny_features / "train"), "exported/coco": str(tmp_path / "exported")}
    found = re.findall(r"python -m (caption\.(?:evaluate|predict|score|export)|shards) ([^`\n]*)", README)
    commands = []
    for module, args in found:
        argv = shlex.split(args.split("#")[0])
        if module == "shards" and len(argv) < 2:
            continue  # "verify|stats|convert" or a subcommand named in prose, not a command
        commands.append((module, [swap.get(x, x) for x in argv]))
    order = ["caption.evaluate", "caption.export", "caption.score", "caption.predict", "shards"]
    commands.sort(key=lambda c: order.index(c[0]))
    assert {m for m, _ in commands} == set(order), commands
    for module, argv in commands:
        main = import_module("shards.__main__" if module == "shards" else module).main
        assert main(argv) == 0, (module, argv, capsys.readouterr())
    assert (trained_run / "eval_test" / "metrics.json").is_file() and (tmp_path / "attn.png").stat().st_size > 0
    assert (tmp_path / "exported" / "README.md").is_file() and "CIDEr" in capsys.readouterr().out
