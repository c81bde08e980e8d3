"""Faults made on purpose: each is a one-line error naming the file or flag and a non-zero exit,
or the documented behaviour. Nothing wrong is read as data; nothing outside a folder is opened."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from caption import train
from caption.evaluate import main as evaluate_main
from caption.predict import main as predict_main
import featurize.__main__ as fz
from shards import StoreError, open_store
from shards.__main__ import main as shards_main
from shards.karpathy import DatasetError, load_split
from tests.conftest import ROOT, read_tars, tiny_args
from tests.test_shards import make_records, write


def one_line_error(err: str, *needles: str) -> str:
    """The one `error: ...` line of a CLI's stderr (progress bars aside), holding every needle; no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def copy_features(src: Path, dst: Path, splits=("train", "val", "test")) -> Path:
    for s in splits:
        shutil.copytree(src / s, dst / s)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


# ---- the store's reader, against its manifest -----------------------------------------------
@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_a_deleted_shard_file_is_an_error_not_zeros(tmp_path, backend, capsys):
    write(tmp_path / "s", make_records(8), backend)
    victim = open_store(tmp_path / "s").shard_files()[1][1]
    victim.unlink()
    store = open_store(tmp_path / "s")  # opening reads the manifest only; the file is checked when read
    with pytest.raises(StoreError, match=f"{victim}: no such shard file"):
        list(store)
    if backend == "zarr":
        with pytest.raises(StoreError, match=f"{victim}: no such shard file"):
            store[5]
    for cmd in ("stats", "verify"):
        assert shards_main([cmd, str(tmp_path / "s")]) == 1
        one_line_error(capsys.readouterr().err, str(victim))


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_a_flipped_payload_byte_is_caught_at_read_time(tmp_path, backend):
    recs = make_records(4)
    write(tmp_path / "s", recs, backend)
    f = open_store(tmp_path / "s").shard_files()[0][1]
    data = bytearray(f.read_bytes())
    if backend == "wds":  # a byte inside the grid of record 2, past its .npy header
        with tarfile.open(f) as tar:
            m = [i for i in tar.getmembers() if i.name == "rec_00002.features.npy"][0]
        data[m.offset_data + m.size - 1000] ^= 0x10
    else:
        data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))  # same size: only a checksum can tell
    store = open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="corrupted data"):
        list(store.iter_records())
    if backend == "wds":  # the same shard streamed without the folder's manifest
        with pytest.raises(StoreError, match=r"rec_00002\.features\.npy: corrupted data"):
            read_tars([f"pipe:cat {f}"], grid=14)


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_counts_rows_and_keys_are_cross_checked(tmp_path, backend):
    """The manifest's shard list and counts are checked when the store is opened; a shard's JSON
    (its count, rows, keys) when its records are first read; a key repeated in another shard by
    `shards verify` (and when the writer finalizes)."""
    from shards.__main__ import verify
    write(tmp_path / "s", make_records(8), backend)
    root = tmp_path / "s"
    original = (root / "manifest.json").read_text(), (root / "shards" / "000001.json").read_text()

    def restore():
        (root / "manifest.json").write_text(original[0])
        (root / "shards" / "000001.json").write_text(original[1])

    faults = [
        ("manifest.json", lambda m: m.update(count=10), "count 10, the shards hold 8"),
        ("manifest.json", lambda m: m["shards"][1].update(count=3), "count 8, the shards hold 7"),
        ("manifest.json", lambda m: m.update(count=0), "count must be a positive integer"),
        ("shards/000001.json", lambda m: m["records"][0].update(row=40), "row 40, outside shard 1"),
        ("shards/000001.json", lambda m: m["records"][1].update(key="rec_00004"), "key rec_00004 appears twice"),
        ("shards/000001.json", lambda m: m["records"].pop(), "3 records, the manifest says 4"),
    ]
    for name, change, message in faults:
        edit_json(root / name, change)
        with pytest.raises(StoreError, match=message):
            list(open_store(root).records)
        restore()
    edit_json(root / "shards" / "000001.json", lambda m: m["records"][1].update(key="rec_00000"))
    assert any("key rec_00000 appears twice" in p for p in verify(root, progress=False))
    restore()
    assert len(open_store(root)) == 8 and verify(root, progress=False) == []


@pytest.mark.parametrize("collide", [False, True])
def test_repeated_keys_across_shards_are_found_by_their_hashes(tmp_path, monkeypatch, collide):
    """`shards verify` finds keys repeated across shards from 8 bytes per record (the keys'
    hashes), then names them in a second pass; keys that only share a hash (here, with `collide`,
    every key's) are not repeats."""
    import shards.__main__ as tool
    write(tmp_path / "s", make_records(12), "wds")
    root = tmp_path / "s"
    assert tool.repeated_keys(open_store(root)) == []
    edit_json(root / "shards" / "000001.json", lambda m: m["records"][2].update(key="rec_00001"))
    edit_json(root / "shards" / "000002.json", lambda m: (m["records"][0].update(key="rec_00001"),
                                                          m["records"][3].update(key="rec_00005")))
    if collide:
        monkeypatch.setattr(tool, "hash", lambda key: 7, raising=False)
    assert tool.repeated_keys(open_store(root)) == [("rec_00001", 1), ("rec_00001", 2), ("rec_00005", 2)]


@pytest.mark.parametrize("codec", ["none", "blosc-zstd", "lz4"])
def test_swapped_zarr_shard_files_are_an_error(tmp_path, codec):
    """Two full shard files swapped (with --codec none every full shard file has the same size, so
    the manifest's sizes and zarr's per-chunk crc32c both pass): each record's checksum in its
    shard's JSON binds the grid to the record; reading by index and in order both stop, naming it."""
    recs = make_records(8)
    write(tmp_path / "s", recs, "zarr", codec=codec)
    a, b = (p for p in sorted((tmp_path / "s" / "features.zarr" / "c").rglob("*")) if p.is_file())
    if codec == "none":
        assert a.stat().st_size == b.stat().st_size
    data_a, data_b = a.read_bytes(), b.read_bytes()
    store = open_store(tmp_path / "s")
    assert [r["key"] for r in store.iter_records()] == [r["key"] for r in recs]  # before: fine
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    if codec == "none":  # what the manifest checks on open cannot see
        store = open_store(tmp_path / "s")
    else:
        (tmp_path / "s" / "manifest.json").write_text((tmp_path / "s" / "manifest.json").read_text())
        store = open_store(tmp_path / "s")
        if a.stat().st_size != b.stat().st_size:  # sizes differ: caught at the first read of either file
            with pytest.raises(StoreError, match="bytes, the manifest says"):
                list(store.iter_records())
            return
    with pytest.raises(StoreError, match="rec_00000 .*another record's grid|chunk 0: holds another record's grid"):
        list(store.iter_records())
    with pytest.raises(StoreError, match="another record's grid"):
        store[5]


def test_zarr_python_alone_reads_the_split_as_a_group(tmp_path):
    """A featurized store with a failed image, read with zarr-python alone as the README says: the
    split folder is a group holding the grids, each row's key, image id, file name and captions,
    and the rows that hold an image."""
    import zarr
    from PIL import Image
    d = tmp_path / "w"
    (d / "im").mkdir(parents=True)
    names = ["a.png", "b.png", "broken.jpg", "c.png", "d.png"]
    for i, n in enumerate(names):
        if n == "broken.jpg":
            (d / "im" / n).write_text("no image")
        else:
            Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(d / "im" / n)
    images = [{"filepath": "im", "filename": n, "cocoid": i + 1, "split": "train",
               "sentences": [{"tokens": ["a", "shape"], "raw": "A shape."}]} for i, n in enumerate(names)]
    (d / "dataset.json").write_text(json.dumps({"images": images}))
    assert fz.main(tiny_args(d, tmp_path / "f", "--split", "train", "--calibration_images", "4", "--shard_images", "2")) == 0
    g = zarr.open_group(tmp_path / "f" / "train", mode="r")
    z = g["features.zarr"]
    rows = [r for a, b in z.attrs["filled_rows"] for r in range(a, b)]
    assert rows == [0, 1, 3, 4]
    x = z[:]
    assert not x[2].any() and all(x[r].any() for r in rows)
    keys, ids, files, captions = (g[name][:] for name in ("key", "image_id", "filename", "captions"))
    assert keys[2] == "" and ids[2] == -1 and list(ids[rows]) == [1, 2, 4, 5]
    assert [files[r] for r in rows] == ["im/a.png", "im/b.png", "im/c.png", "im/d.png"]
    ours = {r["key"]: r for r in open_store(tmp_path / "f" / "train").iter_records()}
    for r in rows:  # the same grid, key, id and captions as the project's own reader gives
        rec = ours[keys[r]]
        assert rec["features"].tobytes() == x[r].tobytes() and rec["image_id"] == ids[r]
        assert json.loads(captions[r]) == rec["captions"]


# ---- paths outside the folder ----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_paths_outside_the_store_are_refused(tmp_path, backend):
    write(tmp_path / "s", make_records(4), backend)
    root = tmp_path / "s"
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x" * 100)
    original = (root / "manifest.json").read_text(), (root / "shards" / "000000.json").read_text()
    for bad in ("../secret.bin", str(secret)):
        for name in ("manifest.json", "shards/000000.json"):
            if name == "manifest.json":
                edit_json(root / name, lambda m: m["shards"][0].update(file=bad))
            else:
                edit_json(root / name, lambda m: m.update(file=bad))
            with pytest.raises(StoreError, match="is not inside"):  # the manifest at opening, a shard JSON at its first read
                list(open_store(root).records)
            (root / "manifest.json").write_text(original[0])
            (root / "shards" / "000000.json").write_text(original[1])
    # a symlink inside the folder to a file outside it
    f = open_store(root).shard_files()[0][1]
    shutil.move(f, secret)
    f.symlink_to(secret)
    with pytest.raises(StoreError, match="outside"):  # at the first read of that shard
        list(open_store(root))
    with pytest.raises(StoreError, match="not inside"):  # and finalize never takes such a file into a manifest
        edit_json(root / "shards" / "000000.json", lambda m: m.update(file="../../x"))
        from shards import finalize
        finalize(root)


def test_an_image_symlink_leaving_the_image_root_is_a_failed_image(tmp_path):
    from featurize.images import ImageError, image_file
    (tmp_path / "root" / "im").mkdir(parents=True)
    (tmp_path / "outside.jpg").write_bytes(b"x")
    (tmp_path / "root" / "im" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    (tmp_path / "root" / "im" / "real.jpg").write_bytes(b"x")
    (tmp_path / "root" / "im" / "inner.jpg").symlink_to(tmp_path / "root" / "im" / "real.jpg")
    with pytest.raises(ImageError, match="outside"):
        image_file(tmp_path / "root", "im/link.jpg")
    assert image_file(tmp_path / "root", "im/inner.jpg") == tmp_path / "root" / "im" / "inner.jpg"  # links inside: fine
    # a linked image root is followed as a whole (e.g. data/coco -> /datasets/coco)
    (tmp_path / "alias").symlink_to(tmp_path / "root")
    assert image_file(tmp_path / "alias", "im/real.jpg").exists()


# ---- hangs and tracebacks --------------------------------------------------------------------
def test_a_fifo_or_a_short_shard_is_an_error_not_a_hang(tmp_path):
    write(tmp_path / "s", make_records(8), "zarr")
    f = open_store(tmp_path / "s").shard_files()[1][1]
    data = f.read_bytes()
    f.write_bytes(data[:20])  # shorter than its own index
    with pytest.raises(StoreError, match=f"{f}: 20 bytes, the manifest says {len(data)}"):
        list(open_store(tmp_path / "s"))  # checked when the shard is first read (opening reads the manifest only)
    f.unlink()
    os.mkfifo(f)
    result: list = []
    t = threading.Thread(target=lambda: result.append(pytest.raises(StoreError, lambda: list(open_store(tmp_path / "s")))),
                         daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "the reader hung on a FIFO"
    assert "not a regular file" in str(result[0].value)


def test_a_second_writer_on_one_folder_stops_with_a_message(shapes, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from shards.manifest import WriterLock; "
        f"lock = WriterLock({str(tmp_path / 'f' / 'test')!r}, 0); print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert fz.main(tiny_args(shapes, tmp_path / "f", "--split", "test")) == 1
        one_line_error(capsys.readouterr().err, str(tmp_path / "f" / "test"), f"pid {holder.pid}", "another process")
    finally:
        holder.kill()
        holder.wait()
    assert fz.main(tiny_args(shapes, tmp_path / "f", "--split", "test")) == 0  # the lock died with its process


def test_featurize_with_no_readable_image_fails_and_keeps_nothing(shapes, tmp_path, capsys):
    empty = tmp_path / "nowhere"
    empty.mkdir()
    args = tiny_args(shapes, tmp_path / "f", "--split", "test", "--images_root", str(empty))
    assert fz.main(args) == 1
    one_line_error(capsys.readouterr().err, "BatchNorm calibration", "check --images_root")
    assert not (tmp_path / "f" / "backbone.safetensors").exists()  # no uncalibrated backbone for a later split
    # with a calibrated backbone in place, a split whose images are all missing is an error, not an empty store
    assert fz.main(tiny_args(shapes, tmp_path / "g", "--split", "val")) == 0
    assert fz.main(tiny_args(shapes, tmp_path / "g", "--split", "test", "--images_root", str(empty))) == 1
    one_line_error(capsys.readouterr().err, "none of the 12 images could be read", "no such file")
    assert not (tmp_path / "g" / "test" / "manifest.json").exists()


def test_random_weights_without_train_images_say_why(tmp_path, capsys):
    d = tmp_path / "w"
    d.mkdir()
    images = [{"filepath": "im", "filename": "a.jpg", "cocoid": 1, "split": "test", "sentences": [{"tokens": ["a"]}]}]
    (d / "dataset.json").write_text(json.dumps({"images": images}))
    assert fz.main(tiny_args(d, tmp_path / "f", "--split", "test")) == 1
    one_line_error(capsys.readouterr().err, "re-estimates BatchNorm statistics on train images", "holds no images")


# ---- bad numbers, every CLI --------------------------------------------------------------------
FEATURIZE_BAD = [("--batch_size", "0"), ("--batch_size", "-1"), ("--image_size", "0"), ("--grid", "0"),
                 ("--num_workers", "-1"), ("--shard_images", "-3"), ("--calibration_images", "0"),
                 ("--decode_ahead", "-1"), ("--format", "h5"), ("--precision", "fp8"), ("--layer", "layer9")]
TRAIN_BAD = [("--batch_size", "0"), ("--batch_size", "-4"), ("--gradient_accumulation_steps", "0"), ("--log_every", "0"),
             ("--max_epochs", "-1"), ("--seq_per_img", "0"), ("--learning_rate", "0"), ("--val_images_use", "0"),
             ("--max_length", "0"), ("--dropout", "1.5"), ("--mixed_precision", "fp8"), ("--hidden_dim", "0")]
EVAL_BAD = [("--beam_size", "0"), ("--beam_size", "-2"), ("--max_length", "0"), ("--max_length", "-3"),
            ("--batch_size", "0"), ("--limit", "0"), ("--limit", "-5")]
PREDICT_BAD = [("--beam_size", "0"), ("--max_length", "0")]
OTHER_BAD = [("vocab", "--word_count_threshold", "-1"), ("convert", "--shard_size", "-3")]


@pytest.mark.parametrize("cli,flag,value", [("featurize", *b) for b in FEATURIZE_BAD] + [("train", *b) for b in TRAIN_BAD]
                         + [("evaluate", *b) for b in EVAL_BAD] + [("predict", *b) for b in PREDICT_BAD] + OTHER_BAD)
def test_bad_numbers_are_one_line_errors(cli, flag, value, tmp_path, capsys):
    cfg = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--features", str(tmp_path / "f")]
    if cli == "featurize":
        rc = fz.main(cfg + [flag, value])
    elif cli == "train":
        rc = train.main(cfg + ["--checkpoint_path", str(tmp_path / "run"), flag, value])
    elif cli == "evaluate":
        rc = evaluate_main(["--run", str(tmp_path / "run"), flag, value])
    elif cli == "vocab":
        from caption.vocab import main as vocab_main
        rc = vocab_main(["--input_json", str(tmp_path / "x.json"), "--out", str(tmp_path / "f" / "v.json"), flag, value])
    elif cli == "convert":
        rc = shards_main(["convert", str(tmp_path / "a"), str(tmp_path / "f"), "--format", "wds", flag, value])
    else:
        rc = predict_main(["--run", str(tmp_path / "run"), "x.jpg", flag, value])
    assert rc == 1
    one_line_error(capsys.readouterr().err, flag, repr(value) if not value.lstrip("-").replace(".", "").isdigit() else value)
    assert not (tmp_path / "f").exists() and not (tmp_path / "run").exists()  # refused before anything was written


def test_seed_flags_get_a_hint(capsys):
    assert train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--start_from", "log_st"]) == 1
    one_line_error(capsys.readouterr().err, "--start_from is now --resume", "--init_from")
    assert train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--input_h5", "x.h5"]) == 1
    one_line_error(capsys.readouterr().err, "--input_h5 is now --features")
    # the seed's own names (congve1/image_caption_attention opts.py), as its README's command gives them
    assert train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--hidden_size", "512", "--embedding_size",
                       "512"]) == 1
    one_line_error(capsys.readouterr().err, "--hidden_size is now --hidden_dim", "--embedding_size is now --embed_dim")


# ---- runs and the features they read ----------------------------------------------------------
def test_evaluate_refuses_features_of_another_encoder(trained_run, tiny_features, tmp_path, capsys):
    other = copy_features(tiny_features, tmp_path / "other", ("test",))
    edit_json(other / "test" / "manifest.json", lambda m: m.update(image_size=96))  # same channels, another input size
    assert evaluate_main(["--run", str(trained_run), "--features", str(other), "--limit", "2"]) == 1
    one_line_error(capsys.readouterr().err, str(other / "test"), "image_size 96 vs 64")
    assert json.loads((trained_run / "features.json").read_text())["image_size"] == 64


def test_foreign_and_missing_records(trained_run, tiny_features, tmp_path, capsys):
    foreign = copy_features(tiny_features, tmp_path / "foreign", ("test",))
    edit_json(foreign / "test" / "shards" / "000000.json", lambda m: m["records"][0].update(image_id=999999))
    assert evaluate_main(["--run", str(trained_run), "--features", str(foreign)]) == 1
    one_line_error(capsys.readouterr().err, "1 record(s) are not images of split 'test'")
    # a store holding only part of the split is scored, and says how much is missing
    from shards import write_records
    part = tmp_path / "part"
    store = open_store(tiny_features / "test")
    m = store.manifest
    info = {k: m[k] for k in ("backbone", "layer", "weights", "weights_sha256", "image_size", "normalization", "resize")}
    write_records(part / "test", list(store.iter_records())[:9], backend="zarr", num_records=9, grid=14, channels=m["channels"],
                  shard_size=8, info=info)
    assert evaluate_main(["--run", str(trained_run), "--features", str(part), "--out", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "scoring 9 of the 12 images of split 'test' (0 failed to decode, listed in its manifest; 3 not featurized)" in err


def test_training_refuses_smuggled_records(shapes, tiny_features, tmp_path, capsys):
    feats = copy_features(tiny_features, tmp_path / "f")
    edit_json(feats / "val" / "shards" / "000000.json", lambda m: m["records"][0].update(image_id=424242))
    assert train.main(tiny_args(shapes, feats, "--checkpoint_path", str(tmp_path / "run"), "--max_steps", "1")) == 1
    one_line_error(capsys.readouterr().err, str(feats / "val"), "not images of split 'val'")


def test_training_finds_its_split_file_in_the_manifest_and_resumes_cleanly(shapes, tiny_features, tmp_path):
    run = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--features", str(tiny_features), "--input_json",
            str(tmp_path / "moved.json"), "--checkpoint_path", str(run), "--max_epochs", "1"]
    assert train.main(args) == 0
    assert json.loads((run / "state" / "progress.json").read_text(), parse_constant=lambda c: pytest.fail(c))["best"] >= 0
    with open(run / "metrics.jsonl", "a") as f:  # what a run killed after its last checkpoint had logged
        f.write(json.dumps({"step": 10_000, "epoch": 1, "loss": 1.0}) + "\n")
    assert train.main(args[:-1] + ["2", "--resume"]) == 0  # bare --resume
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert 10_000 not in steps and len(steps) == len(set(steps)) and max(steps) == 45  # logged every 5 of 48 steps


# ---- split files and predict -------------------------------------------------------------------
def test_split_file_edges(tmp_path):
    img = {"filepath": "im", "filename": "a.jpg", "cocoid": 7, "split": "train", "sentences": [{"tokens": ["a"]}]}
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": [img]}).encode())
    assert load_split(tmp_path / "bom.json", "train")[0].image_id == 7
    (tmp_path / "twice.json").write_text(json.dumps({"images": [img, {**img, "filename": "b.jpg", "split": "test"}]}))
    with pytest.raises(DatasetError, match=r"images\[1\] \(test\) repeats image id 7 of images\[0\] \(train\)"):
        load_split(tmp_path / "twice.json", "test")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DatasetError, match="dir.json: a folder"):
        load_split(tmp_path / "dir.json")
    (tmp_path / "loop.json").symlink_to(tmp_path / "loop.json")
    with pytest.raises(DatasetError, match="loop.json: a symlink loop"):
        load_split(tmp_path / "loop.json")


def test_predict_captions_the_good_images_beside_the_bad(trained_run, tmp_path, capsys):
    from PIL import Image
    d = tmp_path / "photos"
    d.mkdir()
    Image.new("RGB", (40, 30), (200, 50, 50)).save(d / "a.png")
    (d / "b.jpg").write_text("not an image")
    Image.new("RGB", (40, 30), (50, 50, 200)).save(d / "c.png")
    assert predict_main(["--run", str(trained_run), str(d)]) == 1
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == [str(d / "a.png"), str(d / "c.png")]
    one_line_error(err, str(d / "b.jpg"))
    (tmp_path / "empty").mkdir()
    assert predict_main(["--run", str(trained_run), str(tmp_path / "empty")]) == 1
    one_line_error(capsys.readouterr().err, "a folder without images")


# ---- weights files that are not what they claim (probe D5, D9, D13, D24) ---------------------
def exported(trained_run, tmp_path) -> Path:
    from caption.export import export
    return export(trained_run, tmp_path / "exported")


def test_an_exports_weights_stay_inside_it(trained_run, shapes, tmp_path, capsys):
    """encoder.json naming a weights file outside the folder (absolute, `..`, relative to the
    current folder) or backbone.safetensors a symlink out: one line, nothing outside is loaded."""
    image = str(sorted((shapes / "images").glob("*.jpg"))[0])
    out = exported(trained_run, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(out / "backbone.safetensors", outside)
    enc = json.loads((out / "encoder.json").read_text())
    for bad in (str(outside), "../outside.safetensors"):
        (out / "encoder.json").write_text(json.dumps({**enc, "weights": bad}))
        (out / "backbone.safetensors").rename(out / "kept.safetensors")
        assert predict_main(["--run", str(out), image]) == 1
        one_line_error(capsys.readouterr().err, "weights", "not inside")
        (out / "kept.safetensors").rename(out / "backbone.safetensors")
    (out / "encoder.json").write_text(json.dumps(enc))
    (out / "backbone.safetensors").unlink()
    (out / "backbone.safetensors").symlink_to(outside)
    assert predict_main(["--run", str(out), image]) == 1
    one_line_error(capsys.readouterr().err, "backbone.safetensors", "outside")


def test_broken_decoder_weights_are_one_line(trained_run, shapes, tiny_features, tmp_path, capsys):
    """best.safetensors that is a FIFO (would block), not safetensors, holds NaN, or has the shapes
    of another model: one line naming it, at once; `--init_from` a missing run: one line."""
    import torch
    from safetensors.torch import load_file, save_file
    image = str(sorted((shapes / "images").glob("*.jpg"))[0])
    out = exported(trained_run, tmp_path)
    best = out / "best.safetensors"
    good = load_file(str(best))
    cases = {"not a regular file": lambda: os.mkfifo(best),
             "not a safetensors weights file": lambda: best.write_text("not weights"),
             "L_o.bias holds NaN or inf": lambda: save_file(
                 {**good, "L_o.bias": torch.full_like(good["L_o.bias"], float("nan"))}, str(best)),
             "do not fit": lambda: save_file({**good, "L_h.weight": torch.zeros(3, 3)}, str(best))}
    for needle, make in cases.items():
        best.unlink()
        make()
        assert predict_main(["--run", str(out), image]) == 1, needle
        one_line_error(capsys.readouterr().err, "best.safetensors", needle)
    assert train.main(tiny_args(shapes, tiny_features, "--init_from", str(tmp_path / "nope"),
                                "--checkpoint_path", str(tmp_path / "r"))) == 1
    one_line_error(capsys.readouterr().err, "--init_from", "no such run folder")


def test_json_nested_too_deep_is_that_files_error(tmp_path):
    """JSON nested 100,000 deep (probe D10): an input sample's .json is that sample's listed
    failure; a store's manifest is a one-line error naming it, not a RecursionError."""
    from shards.imagetext import parse_sample
    deep = "[" * 100_000 + "]" * 100_000
    why = parse_sample({"__key__": "000001", "jpg": b"\xff\xd8", "txt": b"a cap", "json": deep.encode()})
    assert isinstance(why, str) and "nested too deep" in why
    recs = make_records(4)
    write(tmp_path / "s", recs, "zarr")
    (tmp_path / "s" / "manifest.json").write_text(deep)
    with pytest.raises(StoreError, match="manifest.json: JSON nested too deep"):
        open_store(tmp_path / "s")


def test_what_the_machine_refuses_is_one_line(trained_run, shapes, tmp_path, capsys):
    """A full disk, a read-only folder, no permission (raised by any write of any CLI) end in one
    line naming the file; `--attention` under a file, not a folder: one line naming the flag."""
    import errno
    from common.cli import command

    for code, needle in ((errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")):
        @command
        def main(argv=None, code=code):
            raise OSError(code, os.strerror(code), str(tmp_path / "run" / "last.safetensors"))
        assert main([]) == 1
        one_line_error(capsys.readouterr().err, "last.safetensors", needle, "run the same command again")
    image = str(sorted((shapes / "images").glob("*.jpg"))[0])
    (tmp_path / "a_file").write_text("x")
    assert predict_main(["--run", str(trained_run), image, "--attention", str(tmp_path / "a_file" / "fig.png")]) == 1
    one_line_error(capsys.readouterr().err, "--attention", "cannot write the figure")


def test_configs_that_are_not_configs_are_one_line(tmp_path, capsys):
    """Probe D15-D17: a binary file, a section that is a list or a number, keys that are not names,
    empty paths: one line each naming the file or flag."""
    cases = {"bin.yaml": (bytes(range(256)) * 4, "not a YAML config"),
             "list.yaml": (b"model: [1, 2]\n", "model: expected a mapping"),
             "scalar.yaml": (b"train: 3\n", "train: expected a mapping"),
             "keys.yaml": (b"model:\n  1: 2\n", "key 1 is not a name")}
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert train.main(["--config", str(tmp_path / name)]) == 1
        one_line_error(capsys.readouterr().err, name, needle)
    assert fz.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--features", ""]) == 1
    one_line_error(capsys.readouterr().err, "--features: empty")
    assert train.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--checkpoint_path", " "]) == 1
    one_line_error(capsys.readouterr().err, "--checkpoint_path: empty")


def test_encoder_fields_of_the_wrong_type_or_range_are_one_line(trained_run, shapes, tmp_path, capsys):
    """Probe D14: a manifest or an export's encoder.json whose grid, image_size or names are of the
    wrong type or out of range: one line naming the file and field, before anything is allocated."""
    recs = make_records(4)
    write(tmp_path / "s", recs, "zarr")
    good = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for field, value, needle in (("grid", 100_000, "grid must be an integer from 1 to 256"),
                                 ("channels", "256", "channels must be a positive integer"),
                                 ("backbone", 18, "backbone must be a string")):
        (tmp_path / "s" / "manifest.json").write_text(json.dumps({**good, field: value}))
        with pytest.raises(StoreError, match=needle):
            open_store(tmp_path / "s")
    image = str(sorted((shapes / "images").glob("*.jpg"))[0])
    out = exported(trained_run, tmp_path)
    enc = json.loads((out / "encoder.json").read_text())
    for change, needle in (({"image_size": 10**9}, "image_size must be an integer from 16 to 8192"),
                           ({"grid": "14"}, "grid must be an integer"), ({"layer": None}, "layer must be a string")):
        (out / "encoder.json").write_text(json.dumps({**enc, **change}))
        assert predict_main(["--run", str(out), image]) == 1
        one_line_error(capsys.readouterr().err, "encoder.json", needle)
    (out / "encoder.json").write_text(json.dumps({k: v for k, v in enc.items() if k != "grid"}))
    assert predict_main(["--run", str(out), image]) == 1
    one_line_error(capsys.readouterr().err, "encoder.json", "lacks 'grid'")


def test_a_streamed_record_its_shard_json_does_not_list_is_an_error(tmp_path):
    """Probe D23: a record added to a wds shard, the manifest edited to match (size, SHA-256): the
    store opens, and the training stream (shuffled, so not checked by order) stops at the record
    its shard's JSON does not list."""
    import hashlib
    import io
    import tarfile
    from shards.wds import stream
    write(tmp_path / "s", make_records(8), "wds")
    store = open_store(tmp_path / "s")
    tar_path = Path(store.urls()[0])
    members = []
    with tarfile.open(tar_path) as tar:
        for info in tar:
            members.append((info, tar.extractfile(info).read()))
    extra = []
    for info, data in members[:2]:  # the first record again, under a key no JSON lists
        name = info.name.replace(info.name.split(".")[0], "rec_99999", 1)
        if name.endswith(".json"):
            data = json.dumps({**json.loads(data), "key": "rec_99999"}).encode()
        extra.append((name, data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(i.name, d) for i, d in members] + extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar_path.write_bytes(buf.getvalue())
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["shards"][0].update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    store = open_store(tmp_path / "s")
    unchecked = [r["key"] for r in stream(store.urls(), grid=14, channels=store.manifest["channels"], shuffle=True)]
    assert "rec_99999" in unchecked  # what the reader did before: trained on it
    with pytest.raises(StoreError, match="rec_99999: a record its shard's JSON does not list"):
        list(stream(store.urls(), grid=14, channels=store.manifest["channels"], shuffle=True, listed=store.listed()))
