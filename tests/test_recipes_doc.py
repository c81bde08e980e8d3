"""docs/recipes.md and the shipped recipes cannot drift apart: every setting a COCO recipe makes
is a row of the document with the same value, a source and a verdict, and every row is set."""

import re

import pytest
import yaml

from common import config as C
from tests.conftest import ROOT

RECIPES = ("coco", "coco_authors", "coco_hard", "coco_scst", "coco_fast")


def rows() -> list[dict]:
    out = []
    for line in (ROOT / "docs" / "recipes.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in RECIPES:
            out.append(dict(zip(("recipe", "setting", "ours", "source", "theirs", "verdict"), cells)))
    return out


def test_the_document_has_a_table_per_recipe():
    assert {r["recipe"] for r in rows()} == set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_setting_of_a_recipe_is_a_row_with_its_value(recipe):
    path = ROOT / "configs" / f"{recipe}.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg = C.load(path)
    set_here = {f"{s}.{k}" for s in ("model", "train") for k in (raw.get(s) or {})}
    table = {r["setting"]: r for r in rows() if r["recipe"] == recipe}
    assert set(table) == set_here, (f"in {path.name}, not in docs/recipes.md: {sorted(set_here - set(table))}; "
                                    f"in docs/recipes.md, not set by {path.name}: {sorted(set(table) - set_here)}")
    for setting, row in table.items():
        section, key = setting.split(".")
        want = float(row["ours"]) if isinstance(getattr(getattr(cfg, section), key), float) else yaml.safe_load(row["ours"])
        got = getattr(getattr(cfg, section), key)
        assert got == want, f"{recipe} {setting}: docs/recipes.md says {row['ours']}, {path.name} sets {got!r}"
        assert re.match(r"(same|choice|infra)\b", row["verdict"]), row
        assert row["verdict"].startswith("infra") or row["source"] == "-" or \
            re.match(r"(seed|capgen|sc) \S+", row["source"]), row  # a source file (and line), or none


def test_recipe_headers_point_to_the_table():
    for recipe in RECIPES:
        assert "docs/recipes.md" in (ROOT / "configs" / f"{recipe}.yaml").read_text(), recipe
