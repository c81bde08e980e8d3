"""The layers, read from the source tree: common <- shards <- featurize <- caption, nothing upward,
no import cycle among the project's modules, and function-local imports only of optional or
heavy third-party modules (never of the project's own)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["common", "shards", "featurize", "caption"]  # each may import those before it
PACKAGES = set(LAYERS) | {"bench", "experiments"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def imports(path: Path, mods: dict) -> list[tuple[str, bool]]:
    """(project module imported, at module level?) for every import statement in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    for n in tree.body:  # `if __package__ ...:` blocks and try/except at module level are module level too
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(c) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from shards import format` imports the module shards.format
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                out.append((name if name in mods else name.rsplit(".", 1)[0], id(node) in top))
    return out


def test_no_module_imports_a_layer_above_its_own():
    mods = modules()
    wrong = []
    for mod, path in mods.items():
        pkg = mod.split(".")[0]
        if pkg in ("bench", "experiments"):
            continue
        allowed = set(LAYERS[: LAYERS.index(pkg) + 1])
        wrong += [f"{mod} imports {dep}" for dep, _ in imports(path, mods) if dep.split(".")[0] not in allowed]
    assert not wrong, wrong


def test_no_import_cycle_and_no_local_imports_of_our_modules():
    mods = modules()
    graph = {}
    local = []
    for mod, path in mods.items():
        deps = imports(path, mods)
        graph[mod] = {d for d, _ in deps if d != mod}
        local += [f"{mod} imports {d} inside a function" for d, at_top in deps if not at_top]
    assert not local, local

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk finds what it looks for: a local upward import in a file like ours."""
    f = tmp_path / "x.py"
    f.write_text("import os\n\ndef f():\n    from caption.train import main\n    return main\n")
    mods = {"caption.train": None}
    assert imports(f, mods) == [("caption.train", False)]


def test_long_functions_say_why():
    """No function in the libraries runs over 60 lines without a `# long: <reason>` comment on
    the line above its `def` (or its decorators)."""
    unexplained = []
    for mod, path in modules().items():
        if mod.split(".")[0] in ("bench", "experiments"):
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if not lines[first - 2].strip().startswith("# long:"):
                    unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                                       f"({node.end_lineno - node.lineno + 1} lines)")
    assert not unexplained, unexplained


SERVING = ("caption.predict", "caption.service", "caption.app", "caption.export", "caption.visualize")
TRAINING = ("caption.train", "caption.objective", "caption.data", "caption.resident", "caption.scst", "caption.finetune")


def reachable(start: str, mods: dict) -> set[str]:
    """Every project module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for dep, _ in imports(mods[m], mods) if m in mods else ():
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_serving_imports_nothing_of_training():
    """Captioning an image, the page, export and the figures load no training code (the loop,
    the objectives, the loaders, resident features, SCST), so serving stays small and a change
    to training cannot break it."""
    mods = modules()
    wrong = {m: sorted(reachable(m, mods) & set(TRAINING)) for m in SERVING}
    assert not {m: d for m, d in wrong.items() if d}, wrong
    assert "caption.finetune" in reachable("caption.train", mods)  # the walk follows imports (it sees training's)


def test_one_module_of_caption_opens_stores():
    """caption/splits.py opens each split's store once per run; no other module of caption opens one."""
    openers = []
    for mod, path in modules().items():
        if mod.startswith("caption.") and mod != "caption.splits":
            tree = ast.parse(path.read_text())
            openers += [mod for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        for a in n.names if a.name == "open_store" and n.module == "shards"]
    assert not openers, openers
