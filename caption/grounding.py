"""What a shapes-world model knows, scored against the generator's own object lists.

    python -m caption.evaluate --run demo/run --split test --grounding

For each generated caption of a shapes image (its entry lists every object's shape, color and
box): whether each color word names a color in the image, each shape word a shape in the image
(synonyms: disk = circle, box = square), each color+shape pair ("a purple square", "a triangle
that is yellow") an object that has both; and grounding: whether the argmax cell of the word's
attention has its center inside the box of the object the word names. Each figure comes with its
chance level (a random word of its kind, a random cell), computed on the same images.
"""

from __future__ import annotations

import numpy as np

from featurize.synthetic import COLORS, SHAPE_WORDS, SHAPES
from shards.karpathy import DatasetError, ImageEntry

SHAPE_OF = {w: s for s, words in SHAPE_WORDS.items() for w in words}
WORLD_KEYS = {f"{k}{suffix}" for k in ("color_precision", "shape_precision", "pair_precision", "grounding")
              for suffix in ("", "_words", "_chance")} | {"pair_count", "grounding_unmatched"}  # not captioning metrics


def pairs(words: list[str]) -> list[tuple[int, int]]:
    """(color index, shape index) of each color+shape pair: 'COLOR SHAPE' or 'SHAPE that is COLOR'."""
    out = []
    for t, w in enumerate(words):
        if w in COLORS and t + 1 < len(words) and words[t + 1] in SHAPE_OF:
            out.append((t, t + 1))
        elif w in SHAPE_OF and words[t + 1:t + 3] == ["that", "is"] and t + 3 < len(words) and words[t + 3] in COLORS:
            out.append((t + 3, t))
    return out


def named_objects(words: list[str], objs: list[dict]) -> dict[int, dict | None]:
    """The object each color or shape word names (None: no such object in the image). A color names
    the object of that color (colors are unique in an image); a shape in a pair names the pair's
    object when it has that shape, and otherwise the one object of that shape, if only one."""
    named: dict[int, dict | None] = {}
    for t, w in enumerate(words):
        if w in COLORS:
            named[t] = next((o for o in objs if o["color"] == w), None)
        elif w in SHAPE_OF:
            same = [o for o in objs if o["shape"] == SHAPE_OF[w]]
            named[t] = same[0] if len(same) == 1 else None
    for c, s in pairs(words):
        o = named[c]
        named[s] = o if o is not None and o["shape"] == SHAPE_OF[words[s]] else None
    return named


def _rate(hits: int, n: int) -> float:
    return hits / n if n else 0.0


def world_scores(results: list[dict], entries: dict[int, ImageEntry], grid: int | None = None) -> dict:
    """Word, pair and (with `alphas` in the results and the grid size) grounding precision, with
    chance levels. `results`: {"image_id", "caption"[, "alphas" (T, L)]}."""
    c = {k: [0, 0, 0.0] for k in ("color", "shape", "pair", "grounding")}  # hits, count, summed chance
    unmatched = 0
    for r in results:
        e = entries[r["image_id"]]
        objs = e.extra.get("objects")
        if objs is None:
            raise DatasetError(f"image {e.image_id} ({e.filename}) has no `objects` list: these scores need the shapes world")
        W, H = e.extra.get("width"), e.extra.get("height")
        colors, shapes = {o["color"] for o in objs}, {o["shape"] for o in objs}
        words = r["caption"].split()
        for w in words:
            if w in COLORS:
                c["color"][0] += w in colors
                c["color"][1] += 1
                c["color"][2] += len(colors) / len(COLORS)
            elif w in SHAPE_OF:
                c["shape"][0] += SHAPE_OF[w] in shapes
                c["shape"][1] += 1
                c["shape"][2] += len(shapes) / len(SHAPES)
        for ci, si in pairs(words):
            c["pair"][0] += any(o["color"] == words[ci] and o["shape"] == SHAPE_OF[words[si]] for o in objs)
            c["pair"][1] += 1
            c["pair"][2] += len(objs) / (len(COLORS) * len(SHAPES))
        if grid is None or "alphas" not in r:
            continue
        for t, obj in named_objects(words, objs).items():
            if obj is None:
                unmatched += 1
                continue
            i, j = divmod(int(np.argmax(r["alphas"][t])), grid)
            cx, cy = (j + 0.5) * W / grid, (i + 0.5) * H / grid  # the cell's center in image pixels
            x0, y0, x1, y1 = obj["box"]
            c["grounding"][0] += x0 <= cx <= x1 and y0 <= cy <= y1
            c["grounding"][1] += 1
            c["grounding"][2] += (x1 - x0) * (y1 - y0) / (W * H)  # a random cell lands in the box
    out = {}
    for k, (hits, n, chance) in c.items():
        if k == "grounding" and grid is None:
            continue
        name = k if k == "grounding" else f"{k}_precision"
        out.update({name: _rate(hits, n), f"{name}_words" if k != "pair" else "pair_count": n,
                    f"{name}_chance": _rate(chance, n)})
    if grid is not None:
        out["grounding_unmatched"] = unmatched
    return out


def summary(m: dict) -> str:
    """The lines the demo and `evaluate --grounding` print."""
    lines = [f"{'color words':<12} {m['color_precision']:6.1%} name a color in the image "
             f"(of {m['color_precision_words']}; a random color word: {m['color_precision_chance']:.1%})",
             f"{'shape words':<12} {m['shape_precision']:6.1%} name a shape in the image "
             f"(of {m['shape_precision_words']}; a random shape word: {m['shape_precision_chance']:.1%})",
             f"{'pairs':<12} {m['pair_precision']:6.1%} name an object with both color and shape "
             f"(of {m['pair_count']}; a random pair: {m['pair_precision_chance']:.1%})"]
    if "grounding" in m:
        lines.append(f"{'grounding':<12} {m['grounding']:6.1%} argmax attention inside the named object's box "
                     f"(of {m['grounding_words']} words; a random cell: {m['grounding_chance']:.1%})")
    return "\n".join(lines)
