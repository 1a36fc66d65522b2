"""The import graph runs one way (issue 15): base and kernels -> ops -> models -> data -> views ->
eval -> train -> cli. A module imports only from its own layer or lower ones, and no group of modules
imports each other in a circle. Every import counts, also those inside functions (a lazy import is
still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# layer of each module, by longest matching prefix (the package __init__ files re-export their
# children and sit in their children's layer)
LAYERS: dict[str, int] = {
    "lafs_fast._torchvision_fix": 0,
    "lafs_fast.errors": 0,
    "lafs_fast.io": 0,
    "lafs_fast.config": 0,
    "lafs_fast.logs": 0,
    "lafs_fast.launch": 0,
    "lafs_fast.kernels": 0,
    "lafs_fast.dispatch": 1,
    "lafs_fast.sampling": 1,
    "lafs_fast.augment": 1,
    "lafs_fast.models": 2,
    "lafs_fast.data": 3,
    "lafs_fast.dense_landmarks": 4,
    "lafs_fast.views": 4,
    "lafs_fast.compat": 4,
    "lafs_fast.eval": 5,
    "lafs_fast.train": 6,
    "lafs_fast.cli": 7,
    "lafs_fast.info": 7,
}
NAMES = ["base/kernels", "ops", "models", "data", "views", "eval", "train", "cli"]


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in ((ROOT / "lafs_fast", "lafs_fast"), (ROOT / "kernels", "lafs_fast.kernels")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = path
    return mods


def _layer(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """lafs_fast modules ``module`` imports (a ``from package import name`` of a submodule counts as
    that submodule)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    assert [m for m in _graph() if _layer(m) is None and m != "lafs_fast"] == []


def test_no_import_from_a_higher_layer():
    graph = _graph()
    wrong = sorted(
        f"{m} ({NAMES[_layer(m)]}) imports {d} ({NAMES[_layer(d)]})"
        for m, deps in graph.items()
        if m != "lafs_fast"
        for d in deps
        if d != "lafs_fast" and _layer(d) > _layer(m)
    )
    assert wrong == []


def test_no_import_cycle():
    graph = {m: {d for d in deps if d != "lafs_fast"} for m, deps in _graph().items() if m != "lafs_fast"}
    # a package __init__ re-exporting its children is not a cycle: drop child -> own-package-init edges
    for m, deps in graph.items():
        deps -= {d for d in deps if m.startswith(d + ".") and (ROOT / Path(*d.split(".")[1:]) / "__init__.py").exists()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []
