"""Score any COCO-format results file against a Karpathy-format split, as caption.evaluate does.

    python -m caption.score --results results.json --input_json dataset_coco.json --split test --out metrics.json

results.json is [{"image_id": int, "caption": str}, ...]; image ids are Karpathy's cocoid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from caption.metrics import ALL, format_table, score
from caption.references import references_for
from common.cli import command
from common.errors import UserError
from common.files import read_json
from common.files import atomic_write_json


class ResultsError(UserError):
    pass


def read_results(path: str | Path) -> dict[int, str]:
    p = Path(path)
    data = read_json(p, "results file", ResultsError)
    if not isinstance(data, list):
        raise ResultsError(f'{p}: expected a list of {{"image_id", "caption"}} objects')
    out: dict[int, str] = {}
    for i, r in enumerate(data):
        if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("caption"), str):
            raise ResultsError(f'{p}: entry {i} is not {{"image_id": int, "caption": str}}')
        if int(r["image_id"]) in out:
            raise ResultsError(f"{p}: image {r['image_id']} has more than one caption")
        out[int(r["image_id"])] = r["caption"]
    return out


def score_file(results: str | Path, input_json: str | Path, split: str = "test", allow_missing: bool = False,
               scorers=ALL, restval_in_train: bool = True) -> tuple[dict, dict, dict]:
    """(metrics, skipped scorers, coverage) for a results file; coverage lists extra/missing images."""
    res = read_results(results)
    refs = references_for(str(input_json), split, None, restval_in_train)
    extra = sorted(set(res) - set(refs))
    missing = sorted(set(refs) - set(res))
    if (extra or missing) and not allow_missing:
        parts = []
        if extra:
            parts.append(f"{len(extra)} result image(s) not in split {split!r} (first: {extra[0]})")
        if missing:
            parts.append(f"{len(missing)} image(s) of split {split!r} without a result (first: {missing[0]})")
        raise ResultsError(f"{results}: " + "; ".join(parts) + " (pass --allow_missing to score the overlap)")
    common = {i: res[i] for i in res if i in refs}
    if not common:
        raise ResultsError(f"{results}: no result belongs to split {split!r} of {input_json}")
    metrics, skipped = score({i: refs[i] for i in common}, common, scorers)
    return metrics, skipped, {"scored": len(common), "extra": extra, "missing": missing}


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caption.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True)
    p.add_argument("--input_json", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="write metrics.json here")
    p.add_argument("--allow_missing", action="store_true", help="score the images present in both; report the rest")
    a = p.parse_args(argv)
    metrics, skipped, cov = score_file(a.results, a.input_json, a.split, a.allow_missing)
    if cov["extra"] or cov["missing"]:
        print(f"scored {cov['scored']} images; {len(cov['extra'])} not in the split, {len(cov['missing'])} missing")
    print(format_table(metrics, skipped))
    if a.out:
        atomic_write_json(Path(a.out), metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
