"""coco-caption metrics through pycocoevalcap, one scorer at a time.

`COCOEvalCap.evaluate()` builds SPICE (which downloads CoreNLP) before scoring anything and
its PTB tokenizer writes a temporary file into the installed package; here the PTB
tokenizer reads stdin (same jar, same tokens), every scorer runs on its own, and one that
cannot run (no Java, SPICE's missing jars) is reported as skipped with the reason.
Metric names are pycocoevalcap's: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (CIDEr-D), SPICE.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

from common.errors import UserError

class ScoreError(UserError):
    """Captions that cannot be scored: none, or some without references."""


ALL = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
APPROXIMATE = "PTBTokenizer"  # the `skipped` entry saying every score was computed without coco-caption's tokenizer
# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def _pkg_dir() -> Path:
    import pycocoevalcap.bleu.bleu as b
    return Path(b.__file__).resolve().parent.parent


def java_missing() -> str:
    """'' when Java runs, else the reason it does not."""
    if shutil.which("java") is None:
        return "java not found on PATH"
    return ""


def ptb_tokenize(sentences: list[str]) -> list[str]:
    """coco-caption's tokenization: Stanford PTBTokenizer, lowercased, punctuation removed.

    Runs the jar pycocoevalcap ships on stdin; without Java, a regex fallback that matches it
    on plain captions (words, punctuation split off and dropped).
    """
    lines = [s.replace("\n", " ").replace("\r", " ") for s in sentences]
    if not lines:
        return []
    if java_missing():
        return [" ".join(w for w in re.findall(r"[\w']+|[^\w\s]", s.lower()) if w not in PUNCTUATIONS) for s in lines]
    jar = _pkg_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    out = subprocess.run(cmd, input="\n".join(lines).encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    toks = out.stdout.decode().split("\n")[: len(lines)]
    if len(toks) != len(lines):
        raise RuntimeError(f"PTBTokenizer returned {len(toks)} lines for {len(lines)} sentences")
    return [" ".join(w for w in t.rstrip().split(" ") if w and w not in PUNCTUATIONS) for t in toks]


def tokenize_groups(groups: dict) -> dict:
    """{id: [sentence, ...]} -> the same, PTB-tokenized, in one tokenizer run."""
    flat = [(k, s) for k, v in groups.items() for s in v]
    toks = ptb_tokenize([s for _, s in flat])
    out: dict = {k: [] for k in groups}
    for (k, _), t in zip(flat, toks):
        out[k].append(t)
    return out


@functools.lru_cache(maxsize=1)
def _meteor():
    """One METEOR process per Python process (its JVM start and paraphrase table cost ~30 s)."""
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def spice_missing() -> str:
    """'' when SPICE can run (its CoreNLP jars and Java), else the reason it cannot."""
    lib = _pkg_dir() / "spice" / "lib"
    if not (lib / "stanford-corenlp-3.6.0.jar").exists() or not (lib / "stanford-corenlp-3.6.0-models.jar").exists():
        return (f"SPICE needs Stanford CoreNLP 3.6.0 jars in {lib} (pycocoevalcap downloads them at first use; "
                "run `python -m pycocoevalcap.spice.get_stanford_models` where there is network)")
    return java_missing()


def score_tokenized(gts: dict, res: dict, scorers=ALL) -> tuple[dict[str, float], dict[str, str], dict[str, list]]:
    """Corpus scores of tokenized results against tokenized references.

    Returns (metrics, skipped {name: reason}, per-image scores {name: [..]}).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    metrics, skipped, per_image = {}, {}, {}
    for name in scorers:
        if name in ("METEOR",) and java_missing():
            skipped[name] = java_missing()
            continue
        if name == "SPICE" and spice_missing():
            skipped[name] = spice_missing()
            continue
        try:
            if name == "Bleu":
                scores, per = Bleu(4).compute_score(gts, res, verbose=0)
                for i, (s, p) in enumerate(zip(scores, per)):
                    metrics[f"Bleu_{i + 1}"], per_image[f"Bleu_{i + 1}"] = float(s), [float(x) for x in p]
                continue
            if name == "METEOR":
                s, p = _meteor().compute_score(gts, res)
            elif name == "ROUGE_L":
                s, p = Rouge().compute_score(gts, res)
            elif name == "CIDEr":
                s, p = Cider().compute_score(gts, res)
            elif name == "SPICE":
                from pycocoevalcap.spice.spice import Spice
                s, p = Spice().compute_score(gts, res)
                p = [x["All"]["f"] for x in p]
            else:
                raise ValueError(f"unknown scorer {name!r}: {', '.join(ALL)}")
            metrics[name], per_image[name] = float(s), [float(x) for x in p]
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a scorer that cannot run is reported, the rest still run
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return metrics, skipped, per_image


def score(references: dict, results: dict, scorers=ALL) -> tuple[dict[str, float], dict[str, str]]:
    """Score raw results {image_id: caption} against raw references {image_id: [sentence, ...]}.

    Both are PTB-tokenized together, as coco-caption does with COCO's captions file.
    """
    ids = list(results)
    if not ids:  # (METEOR's protocol breaks on an empty set, and its process then never exits)
        raise ScoreError("no captions to score")
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ScoreError(f"{len(missing)} captioned image(s) have no references (first: image id {missing[0]})")
    both = tokenize_groups({**{("gt", i): references[i] for i in ids}, **{("res", i): [results[i]] for i in ids}})
    gts = {i: both[("gt", i)] for i in ids}
    res = {i: both[("res", i)] for i in ids}
    metrics, skipped, _ = score_tokenized(gts, res, scorers)
    if java_missing():  # the numbers are not coco-caption's: said wherever they are shown or saved
        skipped[APPROXIMATE] = (f"{java_missing()}: every score above is APPROXIMATE, computed on a regex "
                                "tokenization instead of PTBTokenizer's ('t-shirt' becomes 't shirt'); install "
                                "Java (e.g. apt install default-jre-headless) for coco-caption's numbers")
    return metrics, skipped


SHOWN = {"CIDEr": "CIDEr-D"}  # metrics.json keeps coco-caption's keys


def format_table(metrics: dict[str, float], skipped: dict[str, str] | None = None) -> str:
    approximate = APPROXIMATE in (skipped or {})
    lines = [f"{'metric':<10} {'score':>8}" + ("  (APPROXIMATE: no Java, see below)" if approximate else ""),
             f"{'-' * 10} {'-' * 8}"]
    # pycocoevalcap's "CIDEr" is CIDEr-D (its n-gram clipping and length penalty): named so wherever it is shown
    lines += [f"{SHOWN.get(k, k):<10} {v:>8.4f}" for k, v in metrics.items()]
    for k, why in (skipped or {}).items():
        lines.append(f"{k:<10} {'skipped':>8}  ({why})")
    return "\n".join(lines)

