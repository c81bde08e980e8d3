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


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_a_stores_words_counted_in_processes_are_the_same_counts(tiny_features, tmp_path, backend):
    """The vocabulary of a store made from input shards counts its records' captions shard by
    shard; in several (forkserver) processes the counts, and so the vocabulary, are the same."""
    from collections import Counter

    from caption.vocab import count_store_words
    from shards import open_store
    from shards.__main__ import convert
    root = tiny_features / "train"
    if backend == "wds":
        convert(root, tmp_path / "train", "wds", shard_size=16)
        root = tmp_path / "train"
    stores = [open_store(root), open_store(tiny_features / "val")]
    assert len(stores[0].manifest["shards"]) > 2
    want = Counter(w for s in stores for r in s.records for cap in r["captions"] for w in cap)
    assert count_store_words(stores, workers=1) == want
    assert count_store_words(stores, workers=2) == want
    assert count_store_words(stores[:1]) == Counter(w for r in stores[0].records for cap in r["captions"] for w in cap)
    assert Vocab.from_counts(want, 2) == Vocab.build((cap for s in stores for r in s.records for cap in r["captions"]), 2)


def test_a_pass_over_a_large_store_takes_its_share_of_the_cores(tiny_features, monkeypatch):
    """Above PARALLEL_RECORDS records a pass runs in one process per core of this process's share
    (LOCAL_WORLD_SIZE processes on the machine split its cores: each does the pass, as SCST's
    document frequencies), or per core of the machine when it runs alone (the vocabulary: the other
    processes wait for vocab.json); at most one process per shard."""
    import os
    import shards.passes as passes
    from caption.vocab import caption_words
    from shards import open_store
    store = open_store(tiny_features / "train")
    shards = len(store.manifest["shards"])
    asked = []

    class InProcess:  # the pool's arithmetic, without starting processes
        def __init__(self, workers, mp_context, initializer, initargs):
            asked.append(workers)
            initializer(*initargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, items):
            return map(fn, items)

    monkeypatch.setattr(passes, "ProcessPoolExecutor", InProcess)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2 * shards)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(shards))
    want = passes.count_records([store], caption_words, workers=1)
    assert passes.count_records([store], caption_words) == want and asked == []  # 96 records: in this process
    monkeypatch.setattr(passes, "PARALLEL_RECORDS", 10)
    assert passes.count_records([store], caption_words) == want and asked == [2]  # 2 x shards cores / shards processes
    assert passes.count_records([store], caption_words, alone=True) == want and asked == [2, shards]  # one per shard
