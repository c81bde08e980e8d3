import json

import pytest

from caption.vocab import SPECIALS, Vocab, VocabError, build_from_split_file, main


def test_threshold_boundary():
    caps = [["a"]] * 6 + [["b"]] * 5 + [["c"]] * 7
    v = Vocab.build(caps, word_count_threshold=5)
    # seen 5 times or fewer -> <unk>; more -> kept, most frequent first
    assert v.words == [*SPECIALS, "c", "a"]
    assert v.encode(["b", "a", "zzz"]) == [v.unk_id, v.index["a"], v.unk_id]
    assert Vocab.build(caps, word_count_threshold=4).words == [*SPECIALS, "c", "a", "b"]


def test_truncation_and_round_trip():
    v = Vocab.build([["w%d" % i for i in range(30)]] * 2, word_count_threshold=0)
    words = ["w%d" % i for i in range(30)]
    ids = v.encode(words, max_length=16)
    assert len(ids) == 16
    assert v.decode(ids) == words[:16]
    # decode stops at <eos>, drops <pad>/<bos>
    assert v.decode([v.bos_id, *ids[:3], v.eos_id, *ids[3:5]]) == words[:3]
    assert v.decode([*ids[:2], v.pad_id, v.pad_id]) == words[:2]


def test_json_round_trip(tmp_path):
    v = Vocab.build([["a", "b", "b"]], word_count_threshold=0)
    v.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text()) == v.words
    assert Vocab.load(tmp_path / "vocab.json") == v


def test_bad_vocab_files(tmp_path):
    with pytest.raises(VocabError, match="no such vocabulary"):
        Vocab.load(tmp_path / "x.json")
    (tmp_path / "v.json").write_text('["a", "b"]')
    with pytest.raises(VocabError, match="v.json: a vocabulary starts with <pad>"):
        Vocab.load(tmp_path / "v.json")


def test_cli_and_count_splits(shapes, tmp_path, capsys):
    assert main(["--input_json", str(shapes / "dataset.json"), "--out", str(tmp_path / "v.json"), "--word_count_threshold", "2"]) == 0
    assert "words" in capsys.readouterr().out
    v = Vocab.load(tmp_path / "v.json")
    everything = build_from_split_file(shapes / "dataset.json", 2, "all")
    assert set(v.words) <= set(everything.words)
    assert "circle" in v.index and "red" in v.index
