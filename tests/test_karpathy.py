import json

import pytest

from shards.karpathy import DatasetError, load_split


def write(tmp_path, obj, name="dataset.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def image(i, split, sentences=None, filepath="val2014"):
    if sentences is None:
        sentences = [{"tokens": ["a", "cat"], "raw": "A cat.", "imgid": i, "sentid": 2 * i},
                     {"tokens": ["a", "dog"], "raw": "A dog!", "imgid": i, "sentid": 2 * i + 1}]
    return {"filepath": filepath, "filename": f"COCO_{i}.jpg", "imgid": i, "cocoid": 1000 + i, "split": split,
            "sentids": [s["sentid"] for s in sentences], "sentences": sentences}


def test_reads_coco_format_and_restval_rule(tmp_path):
    p = write(tmp_path, {"dataset": "coco", "images": [image(0, "train"), image(1, "restval"), image(2, "val"), image(3, "test")]})
    train = load_split(p, "train")
    assert [e.image_id for e in train] == [1000, 1001]
    assert [e.image_id for e in load_split(p, "train", restval_in_train=False)] == [1000]
    e = load_split(p, "test")[0]
    assert e.filename == "val2014/COCO_3.jpg" and e.key == "coco_000000001003"
    assert e.tokens == [["a", "cat"], ["a", "dog"]] and e.raw == ["A cat.", "A dog!"]
    assert len(load_split(p, "all")) == 4


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_split(tmp_path / "nope.json")


def test_malformed_json(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset.json: malformed JSON at line 1"):
        load_split(write(tmp_path, '{"images": [}'))


def test_not_karpathy(tmp_path):
    with pytest.raises(DatasetError, match="images"):
        load_split(write(tmp_path, {"foo": 1}))


def test_unknown_split_requested(tmp_path):
    p = write(tmp_path, {"images": [image(0, "train")]})
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_split(p, "dev")


def test_unknown_split_in_file(tmp_path):
    p = write(tmp_path, {"images": [image(0, "holdout")]})
    with pytest.raises(DatasetError, match=r"images\[0\].*unknown split 'holdout'"):
        load_split(p, "train")


def test_image_without_sentences(tmp_path):
    p = write(tmp_path, {"images": [image(0, "train", sentences=[])]})
    with pytest.raises(DatasetError, match=r"images\[0\] \((val2014/COCO_0\.jpg|COCO_0\.jpg)\).*has no sentences"):
        load_split(p, "train")


def test_path_outside_root(tmp_path):
    p = write(tmp_path, {"images": [image(0, "train", filepath="../../etc")]})
    with pytest.raises(DatasetError, match="outside the image root"):
        load_split(p, "train")


def test_empty_split(tmp_path):
    p = write(tmp_path, {"images": [image(0, "train")]})
    with pytest.raises(DatasetError, match="holds no images"):
        load_split(p, "test")
