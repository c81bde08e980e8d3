import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featurize.__main__ as fz
from featurize.backbone import Backbone, BackboneConfig, BackboneError, channels
from featurize.images import load_rgb
from shards import load_manifest, open_store
import shards.format as fmt
from shards.karpathy import load_split
from tests.conftest import ROOT, same_record, tiny_args


def records(root):
    return list(open_store(root).iter_records())


def test_end_to_end_zarr(shapes, tiny_features):
    for split, n in (("train", 96), ("val", 12), ("test", 12)):
        m = load_manifest(tiny_features / split)
        assert m["count"] == n and m["backend"] == "zarr" and m["grid"] == 14 and m["channels"] == 256
        assert m["backbone"] == "resnet18" and m["layer"] == "layer3" and m["weights"] == "none"
        assert m["image_size"] == 64 and m["failures"] == [] and m["bn_calibration"]["images"] == 16
        assert m["split"] == split and m["bytes_on_disk"] > 0
    recs = records(tiny_features / "test")
    entries = load_split(shapes / "dataset.json", "test")
    assert [r["key"] for r in recs] == [e.key for e in entries]
    assert [r["captions"] for r in recs] == [e.tokens for e in entries]
    x = recs[0]["features"]
    assert x.shape == (14, 14, 256) and x.dtype == np.float16 and np.isfinite(x).all()
    # BatchNorm re-estimated: well scaled, not the 1e4-1e5 of a raw random ResNet
    assert 0.01 < float(np.abs(x.astype(np.float32)).mean()) < 10
    assert (tiny_features / "backbone.safetensors").exists()


def test_wds_matches_zarr_and_batch_size_does_not_matter(shapes, tiny_features, tmp_path, copy_backbone):
    out = tmp_path / "f"
    shutil.copy(tiny_features / "backbone.safetensors", tmp_path / "backbone.safetensors")
    copy_backbone(tiny_features, out)
    assert fz.main(tiny_args(shapes, out, "--split", "test", "--format", "wds", "--batch_size", "1")) == 0
    a, b = records(tiny_features / "test"), records(out / "test")
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra["features"].astype(np.float32), rb["features"].astype(np.float32), rtol=2e-3, atol=2e-3)
    assert load_manifest(out / "test")["backend"] == "wds"


@pytest.mark.slow
def test_compiled_featurize_matches_eager(shapes, tiny_features, tmp_path, copy_backbone):
    """--compile: BatchNorm-folded, torch.compile'd, short batches padded to one static shape."""
    out = tmp_path / "f"
    copy_backbone(tiny_features, out)
    # 12 test images in batches of 5, 5 and 2: the last one is padded to 5
    assert fz.main(tiny_args(shapes, out, "--split", "test", "--batch_size", "5", "--compile", "true")) == 0
    a, b = records(tiny_features / "test"), records(out / "test")
    assert [r["key"] for r in a] == [r["key"] for r in b] and len(b) == 12
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra["features"].astype(np.float32), rb["features"].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_fused_backbone_is_the_same_function():
    net = Backbone(BackboneConfig("resnet18", "layer4", "none"))
    x = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    net.calibrate_bn(iter(x.view(2, 4, 3, 64, 64)))
    keys = set(net.state_dict())
    fused = net.fused()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert set(net.state_dict()) == keys and any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    with torch.inference_mode():
        a, b = net(x), fused(x)  # (8, 14, 14, 512) each
    assert a.shape == b.shape == (8, 14, 14, 512)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def make_broken_world(tmp_path) -> Path:
    """A Karpathy file whose images cover what real data throws at a decoder."""
    d = tmp_path / "world"
    (d / "im").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))
    rgb.save(d / "im" / "ok.jpg")
    rgb.convert("CMYK").save(d / "im" / "cmyk.jpg")
    rgb.convert("L").save(d / "im" / "gray.png")
    rgb.convert("RGBA").save(d / "im" / "alpha.png")
    rgb.convert("P").save(d / "im" / "palette.gif")
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(d / "im" / "sixteen.png")
    rgb.save(d / "im" / "png_named.jpg", format="PNG")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "im" / "tiny.jpg")
    Image.new("RGB", (2000, 12), (9, 200, 9)).save(d / "im" / "wide.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    rgb.save(d / "im" / "exif.jpg", exif=exif)
    full = (d / "im" / "ok.jpg").read_bytes()
    (d / "im" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "im" / "empty.jpg").write_bytes(b"")
    (d / "im" / "text.jpg").write_text("not an image")
    names = ["ok.jpg", "cmyk.jpg", "gray.png", "alpha.png", "palette.gif", "sixteen.png", "png_named.jpg", "tiny.jpg",
             "wide.jpg", "exif.jpg", "truncated.jpg", "empty.jpg", "text.jpg", "missing.jpg"]
    images = [{"filepath": "im", "filename": n, "imgid": i, "cocoid": i + 1, "split": "train",
               "sentences": [{"tokens": ["a", "b"], "raw": "A b.", "imgid": i, "sentid": i}]} for i, n in enumerate(names)]
    (d / "dataset.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return d


def test_robust_decoding_records_exactly_the_broken(tmp_path):
    d = make_broken_world(tmp_path)
    assert load_rgb(d / "im" / "exif.jpg").size == (48, 40)  # EXIF orientation applied: 40x48 -> 48x40
    for n in ("cmyk.jpg", "gray.png", "alpha.png", "palette.gif", "sixteen.png", "png_named.jpg", "wide.jpg"):
        assert load_rgb(d / "im" / n).mode == "RGB"
    # 4 images per shard, 3 per batch: the shard buffers are reused (a pool of 3 on 2 cores)
    args = tiny_args(d, tmp_path / "f", "--split", "train", "--calibration_images", "4", "--shard_images", "4",
                     "--batch_size", "3", "--writer_threads", "1")
    assert fz.main(args) == 0
    m = load_manifest(tmp_path / "f" / "train")
    failed = {f["filename"]: f["reason"] for f in m["failures"]}
    assert set(failed) == {"im/truncated.jpg", "im/empty.jpg", "im/text.jpg", "im/missing.jpg"}
    assert "empty file" in failed["im/empty.jpg"] and "no such file" in failed["im/missing.jpg"]
    assert m["count"] == 10
    import zarr
    grids = zarr.open_array(tmp_path / "f" / "train" / "features.zarr", mode="r")[:]  # (14, 14, 14, C)
    assert not grids[10:].any() and all(grids[i].any() for i in range(10))  # failed rows are zeros, not stale data
    good = records(tmp_path / "f" / "train")
    names = [i["filename"] for i in json.loads((d / "dataset.json").read_text())["images"]]
    assert [r["filename"] for r in good] == [f"im/{n}" for n in names[:10]]
    assert all(np.array_equal(r["features"], grids[i]) for i, r in enumerate(good))


def test_strict_names_the_first_broken_file(tmp_path, capsys):
    d = make_broken_world(tmp_path)
    assert fz.main(tiny_args(d, tmp_path / "f", "--split", "train", "--strict", "true", "--calibration_images", "4")) == 1
    assert "truncated.jpg" in capsys.readouterr().err
    import threading
    assert not [t for t in threading.enumerate() if t.name == "featurize-prepare"]  # stopped with the error


def test_imagenet_weights_offline_message(tmp_path, monkeypatch):
    import urllib.error

    import featurize.backbone as fb
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    real = fb.imagenet_weights("resnet18")

    class Offline:  # torchvision's weights entry, as it behaves with no network
        url, name = real.url, real.name

        def get_state_dict(self, progress=True):
            raise urllib.error.URLError("no network")

        def transforms(self):
            return real.transforms()
    monkeypatch.setattr(fb, "imagenet_weights", lambda arch: Offline())
    with pytest.raises(BackboneError, match=r"resnet18-f37072fd.pth .* at .*hub/checkpoints"):
        Backbone(BackboneConfig("resnet18", "layer4", "imagenet"))


def test_local_weights_file(tmp_path):
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    bb = Backbone(BackboneConfig("resnet18", "layer4", str(tmp_path / "r18.pth")))
    assert torch.equal(bb.stages["layer4"][0].conv1.weight, net.layer4[0].conv1.weight)
    assert channels("resnet101", "layer4") == 2048 and channels("resnet50", "layer3") == 1024
    out = bb(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert out.shape == (2, 14, 14, 512)  # 2x2 layer4 grid adaptive-pooled to 14x14
    with pytest.raises(BackboneError, match="not resnet50 weights"):
        Backbone(BackboneConfig("resnet50", "layer4", str(tmp_path / "r18.pth")))


KILLABLE = """
import sys, time
sys.path.insert(0, {root!r})
import featurize.extract as ex
orig = ex.SplitImages.__getitem__
def slow(self, i):
    time.sleep({delay})
    return orig(self, i)
ex.SplitImages.__getitem__ = slow
import featurize.__main__ as fz
raise SystemExit(fz.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_featurize_resumes_to_the_same_store(shapes, tiny_features, tmp_path, copy_backbone):
    out = tmp_path / "f"
    copy_backbone(tiny_features, out)
    script = tmp_path / "slow.py"
    script.write_text(KILLABLE.format(root=str(ROOT), delay=0.05))
    args = tiny_args(shapes, out, "--split", "train")
    p = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(2400):
        if (out / "train" / "shards" / "000002.json").exists():
            break
        assert p.poll() is None, "featurize ended before it could be killed"
        time.sleep(0.05)
    else:
        pytest.fail("featurize did not finish three shards")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "train" / "manifest.json").exists()
    assert fz.main(args) == 0
    a, b = records(tiny_features / "train"), records(out / "train")
    assert len(a) == len(b) == 96 and all(same_record(x, y) for x, y in zip(a, b))


def test_two_process_featurize(shapes, tiny_features, tmp_path, copy_backbone, run_torchrun):
    out = tmp_path / "f"
    copy_backbone(tiny_features, out)
    r = run_torchrun("-m", "featurize", *tiny_args(shapes, out, "--split", "val", "--shard_images", "4"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[rank 0]" in r.stderr and "[rank 1]" in r.stderr  # two processes really ran
    a, b = records(tiny_features / "val"), records(out / "val")
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert fmt.meta(x) == fmt.meta(y)
        np.testing.assert_allclose(x["features"].astype(np.float32), y["features"].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_device_decoding_matches_worker_decoding(tmp_path, copy_backbone):
    """--decode device (nvjpeg on a GPU; torchvision's libjpeg here) gives the same grids, EXIF and failures included."""
    d = make_broken_world(tmp_path)
    a = tiny_args(d, tmp_path / "f", "--split", "train", "--calibration_images", "4")
    assert fz.main(a) == 0
    b = tiny_args(d, tmp_path / "g", "--split", "train", "--calibration_images", "4", "--decode", "device")
    copy_backbone(tmp_path / "f", tmp_path / "g")
    assert fz.main(b) == 0
    ma, mb = load_manifest(tmp_path / "f" / "train"), load_manifest(tmp_path / "g" / "train")
    assert [f["filename"] for f in ma["failures"]] == [f["filename"] for f in mb["failures"]]
    for x, y in zip(records(tmp_path / "f" / "train"), records(tmp_path / "g" / "train")):
        assert x["key"] == y["key"]
        diff = np.abs(x["features"].astype(np.float32) - y["features"].astype(np.float32)).mean()
        scale = np.abs(x["features"].astype(np.float32)).mean()
        assert diff < 0.05 * scale, x["filename"]  # JPEG decoders differ in the last bits only


def test_exif_orientation_on_tensors():
    from featurize.images import apply_orientation
    from PIL import ImageOps
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    for o in range(1, 9):
        im = Image.fromarray(arr)
        im.getexif()[0x0112] = o
        ref = np.asarray(ImageOps.exif_transpose(im))
        assert np.array_equal(apply_orientation(t, o).permute(1, 2, 0).numpy(), ref), o


def test_decode_ahead_changes_nothing(tmp_path, copy_backbone):
    """Batches prepared in a thread of their own give the store the main thread gives, to the bit."""
    d = make_broken_world(tmp_path)
    common = ("--split", "train", "--calibration_images", "4", "--decode", "device", "--batch_size", "3",
              "--shard_images", "4", "--writer_threads", "1")
    assert fz.main(tiny_args(d, tmp_path / "f", *common, "--decode_ahead", "0")) == 0
    copy_backbone(tmp_path / "f", tmp_path / "g")
    timing = {}
    import argparse

    from common import config as C
    from featurize.extract import build_backbone, featurize_split
    p = argparse.ArgumentParser()
    p.add_argument("--split")
    cfg, _ = C.parse(tiny_args(d, tmp_path / "g", *common, "--decode_ahead", "2"), p, ("data", "featurize"))
    net, info = build_backbone(cfg.data, cfg.featurize)
    featurize_split(cfg.data, cfg.featurize, "train", net, info, progress=False, timing=timing)
    assert timing["preparing"] > 0  # the thread did the preparing
    ma, mb = load_manifest(tmp_path / "f" / "train"), load_manifest(tmp_path / "g" / "train")
    assert ma["failures"] == mb["failures"] and ma["count"] == mb["count"] == 10
    for x, y in zip(records(tmp_path / "f" / "train"), records(tmp_path / "g" / "train"), strict=True):
        assert fmt.meta(x) == fmt.meta(y) and np.array_equal(x["features"], y["features"])


def test_ahead_order_errors_and_stop():
    import threading

    from featurize.ahead import Ahead
    cpu = torch.device("cpu")
    assert [b for b, _ in Ahead(iter(range(20)), lambda b: (b * 2,), 2, cpu)] == list(range(20))
    assert [o for _, (o,) in Ahead(iter(range(5)), lambda b: (b * 2,), 1, cpu)] == [0, 2, 4, 6, 8]

    def bad(b):
        if b == 3:
            raise ValueError("batch 3 is broken")
        return (b,)
    got = []
    with pytest.raises(ValueError, match="batch 3 is broken"):
        for b, _ in Ahead(iter(range(10)), bad, 2, cpu):
            got.append(b)
    assert got == [0, 1, 2]  # everything before the error, in order
    a = Ahead(iter(range(3)), lambda b: (b,), 2, cpu)
    assert len(list(a)) == 3 and next(a, None) is None  # stays ended
    # a consumer that stops early: the thread, blocked on a full queue over an endless source, ends
    a = Ahead(iter(int, 1), lambda b: (b,), 2, cpu)
    next(a)
    a.close()
    assert not a.thread.is_alive() and next(a, None) is None
    assert not [t for t in threading.enumerate() if t.name == "featurize-prepare"]
