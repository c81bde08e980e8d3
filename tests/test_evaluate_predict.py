import json

import numpy as np
import pytest
from PIL import Image

from caption.evaluate import main as evaluate_main
from caption.predict import main as predict_main
from caption.visualize import figure_size


@pytest.mark.slow
def test_evaluate_writes_coco_results(trained_run, shapes, capsys):
    assert evaluate_main(["--run", str(trained_run), "--split", "test", "--beam_size", "2", "--grounding"]) == 0
    out = capsys.readouterr().out
    assert "Bleu_4" in out and "CIDEr" in out and "grounding" in out
    results = json.loads((trained_run / "eval_test" / "results.json").read_text())
    test_ids = [im["cocoid"] for im in json.loads((shapes / "dataset.json").read_text())["images"] if im["split"] == "test"]
    assert sorted(r["image_id"] for r in results) == sorted(test_ids)
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    metrics = json.loads((trained_run / "eval_test" / "metrics.json").read_text())
    assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr", "grounding"} <= set(metrics)
    # the scorer CLI gives the same numbers from the results file
    from caption.score import score_file
    m, _, _ = score_file(trained_run / "eval_test" / "results.json", shapes / "dataset.json", "test", scorers=("Bleu", "CIDEr"))
    assert m["CIDEr"] == metrics["CIDEr"] and m["Bleu_4"] == metrics["Bleu_4"]


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_predict_any_image(trained_run, tmp_path, mode, capsys):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / f"photo_{mode}.jpg"
    img.save(path)
    fig = tmp_path / "attn.png"
    assert predict_main(["--run", str(trained_run), str(path), "--beam_size", "2", "--attention", str(fig)]) == 0
    line = capsys.readouterr().out.rstrip("\n")
    assert line.startswith(f"{path}: ") and line.endswith(f"[{fig}]")
    caption = line[len(f"{path}: "):-len(f"  [{fig}]")]
    assert caption.split() and all(w.isalpha() for w in caption.split())
    with Image.open(fig) as f:
        assert f.size == figure_size(len(caption.split()))


def test_predict_a_folder_and_bad_files(trained_run, tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (i * 100, 50, 50)).save(d / f"{i}.png")
    assert predict_main(["--run", str(trained_run), str(d), "--attention", str(tmp_path / "figs")]) == 0
    assert len(list((tmp_path / "figs").glob("*_attention.png"))) == 2
    (tmp_path / "bad.jpg").write_text("no")
    assert predict_main(["--run", str(trained_run), str(tmp_path / "bad.jpg")]) == 1
    assert "bad.jpg" in capsys.readouterr().err
