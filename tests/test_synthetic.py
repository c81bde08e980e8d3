import hashlib
import json

from featurize.synthetic import generate, main
from shards.karpathy import load_split


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_and_karpathy_format(tmp_path):
    assert main(["--out", str(tmp_path / "a"), "--num_images", "20", "--seed", "7", "--image_size", "64"]) == 0
    generate(tmp_path / "b", 20, seed=7, image_size=64, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    generate(tmp_path / "c", 20, seed=8, image_size=64, progress=False)
    assert digest(tmp_path / "a") != digest(tmp_path / "c")

    data = json.loads((tmp_path / "a" / "dataset.json").read_text())
    img = data["images"][0]
    assert set(img) >= {"filepath", "filename", "imgid", "cocoid", "split", "sentids", "sentences", "objects"}
    assert all(set(s) == {"tokens", "raw", "imgid", "sentid"} for s in img["sentences"])
    entries = load_split(tmp_path / "a" / "dataset.json", "all")
    assert len(entries) == 20 and {e.split for e in entries} == {"train", "val", "test"}
    for e in entries:
        assert len(e.tokens) == 5 and all(1 <= len(t) <= 16 for t in e.tokens)
        assert (tmp_path / "a" / e.filename).is_file()
        for o in e.extra["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # every object's color is named by at least one caption
        named = {w for t in e.tokens for w in t}
        assert any(o["color"] in named for o in e.extra["objects"])


def test_captions_vary_and_describe_relations(tmp_path):
    generate(tmp_path, 60, seed=1, image_size=64, progress=False)
    entries = load_split(tmp_path / "dataset.json", "all")
    words = {w for e in entries for t in e.tokens for w in t}
    assert {"left", "above", "below", "right"} & words
    assert {"disk", "box", "big", "little"} & words  # synonyms
    assert sum(len({tuple(t) for t in e.tokens}) for e in entries) / len(entries) > 3.5
