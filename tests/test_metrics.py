import json

import pytest

from caption import metrics
from caption.score import main as score_main
from caption.score import ResultsError, score_file

REFS = {
    1: ["A man riding a horse on a beach.", "A person rides a brown horse near the ocean.", "Man on horseback, at the shore!"],
    2: ["Two dogs play in the snow.", "Dogs playing outside in the snow.", "A pair of dogs running through snow."],
    3: ["A red circle left of a blue box.", "A red disk and a blue square.", "There is a red circle."],
    4: ["A plate of food with broccoli.", "Broccoli and rice on a white plate.", "A meal of rice and vegetables."],
}
RES = {1: "a man riding a horse on the beach", 2: "two dogs playing in the snow",
       3: "a red circle and a blue box", 4: "a plate of rice with broccoli"}


def oracle():
    """pycocoevalcap itself: its PTBTokenizer (temp file in the package) and its scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in v] for i, v in REFS.items()})
    res = tok.tokenize({i: [{"caption": c}] for i, c in RES.items()})
    out = {}
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{i + 1}": s for i, s in enumerate(b)})
    out["METEOR"], _ = Meteor().compute_score(gts, res)
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    return out


@pytest.mark.slow
def test_reproduces_pycocoevalcap_exactly():
    ours, skipped = metrics.score(REFS, RES)
    expected = oracle()
    for k, v in expected.items():
        assert ours[k] == v, k
    # SPICE runs only where its Stanford CoreNLP jars are installed; otherwise it is skipped with the reason
    if metrics.spice_missing():
        assert "SPICE" not in ours and skipped["SPICE"] == metrics.spice_missing()
    else:
        assert 0 <= ours["SPICE"] <= 1 and "SPICE" not in skipped


def test_stdin_tokenizer_matches_the_package_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    sents = ["A man's hat, on a (red) table.", "Dogs -- playing... outside?!", "It's 3:00 pm; \"quoted\" words."]
    theirs = PTBTokenizer().tokenize({0: [{"caption": s} for s in sents]})[0]
    assert metrics.ptb_tokenize(sents) == theirs


def test_missing_scorers_are_skipped_not_fatal(monkeypatch):
    monkeypatch.setattr(metrics, "java_missing", lambda: "java not found on PATH")
    ours, skipped = metrics.score(REFS, RES)
    assert skipped["METEOR"] == "java not found on PATH" and "SPICE" in skipped
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(ours)
    assert "skipped" in metrics.format_table(ours, skipped)
    # Without Java the numbers are not coco-caption's, and every place that shows them says so.
    assert "APPROXIMATE" in skipped[metrics.APPROXIMATE] and "regex" in skipped[metrics.APPROXIMATE]
    assert metrics.format_table(ours, skipped).splitlines()[0].endswith("(APPROXIMATE: no Java, see below)")


def test_scores_with_java_are_not_marked_approximate():
    if metrics.java_missing():
        import pytest
        pytest.skip(metrics.java_missing())
    _, skipped = metrics.score(REFS, RES, ("Bleu",))
    assert metrics.APPROXIMATE not in skipped


def karpathy(tmp_path):
    images = [{"filepath": "x", "filename": f"{i}.jpg", "imgid": i, "cocoid": i, "split": "test",
               "sentences": [{"tokens": r.lower().split(), "raw": r, "imgid": i, "sentid": 10 * i + j} for j, r in enumerate(v)]}
              for i, v in REFS.items()]
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps({"dataset": "coco", "images": images}))
    return p


def test_score_cli(tmp_path, capsys):
    data = karpathy(tmp_path)
    res = tmp_path / "results.json"
    res.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in RES.items()]))
    assert score_main(["--results", str(res), "--input_json", str(data), "--split", "test", "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["CIDEr"] == metrics.score(REFS, RES)[0]["CIDEr"]
    # an image outside the split, and a split image without a result
    res.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in RES.items() if i != 4] + [{"image_id": 99, "caption": "x"}]))
    with pytest.raises(ResultsError, match=r"1 result image\(s\) not in split 'test' \(first: 99\); 1 image\(s\) .* \(first: 4\)"):
        score_file(res, data, "test")
    assert score_main(["--results", str(res), "--input_json", str(data)]) == 1
    m, _, cov = score_file(res, data, "test", allow_missing=True)
    assert cov == {"scored": 3, "extra": [99], "missing": [4]}
    res.write_text("[{")
    assert score_main(["--results", str(res), "--input_json", str(data)]) == 1
    assert "malformed JSON" in capsys.readouterr().err
