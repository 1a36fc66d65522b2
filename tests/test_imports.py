"""The import graph runs one way (issue 15): base and kernels -> ops -> models -> data -> views ->
eval -> train -> cli. A module imports only from its own layer or lower ones, and no group of modules
imports each other in a circle. Every import counts, also those inside functions (a lazy import is
still a dependency), a module named in a string (``importlib.import_module("lafs_fast.x")``, a lazy
table, ``module:object`` in the command table), and ``from lafs_fast import NAME`` (or from any
package), which counts as the module the package takes NAME from (issue 23).

The checker runs on any tree of ``lafs_fast/`` + ``kernels/``; the last tests plant each fault it
must catch in a small synthetic tree.
"""

from __future__ import annotations

import ast
import re
import textwrap
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
_MODULE_STRING = re.compile(r"^lafs_fast(\.\w+)*(:\w+)?$")  # "lafs_fast.x.y" or "lafs_fast.x:object"


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for folder, package in ((root / "lafs_fast", "lafs_fast"), (root / "kernels", "lafs_fast.kernels")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = path
    return mods


def _layer(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def _known(name: str, known: set[str]) -> str:
    """The longest known module that ``name`` (a module, or a module's attribute) lies in ('' if none)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def _absolute(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    base = node.module or ""
    if not node.level:
        return base
    anchor = module.split(".") if is_pkg else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([base] if base else [])])


def _exports(mods: dict[str, Path]) -> dict[str, dict[str, str]]:
    """For each package: the names its ``__init__`` takes from a module (``from m import NAME``, or a
    lazy table ``{"NAME": "m"}``) -> that module; ``from package import NAME`` depends on it."""
    known = set(mods)
    out: dict[str, dict[str, str]] = {}
    for pkg, path in mods.items():
        if path.name != "__init__.py":
            continue
        names: dict[str, str] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(pkg, True, node)
                for a in node.names:
                    target = _known(f"{base}.{a.name}", known)
                    if target and target != pkg:
                        names[a.asname or a.name] = target
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and isinstance(v.value, str):
                        target = _known(v.value.partition(":")[0], known)
                        if isinstance(k.value, str) and target and target != pkg:
                            names[k.value] = target
        out[pkg] = names
    return out


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _imports(module: str, path: Path, known: set[str], exports: dict[str, dict[str, str]]) -> set[str]:
    """lafs_fast modules ``module`` depends on: its imports (``from package import NAME`` counts as the
    module the package takes NAME from, a submodule as itself) and the modules its strings name."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_pkg, node)
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else exports.get(base, {}).get(a.name, base)
                for a in node.names
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            names = [node.value.partition(":")[0]] if _MODULE_STRING.match(node.value) else []
        else:
            continue
        for name in names:
            name = _known(name, known)
            if name and name != module:
                out.add(name)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = _modules(root)
    exports = _exports(mods)
    return {m: _imports(m, p, set(mods), exports) for m, p in mods.items()}


def higher_layer_imports(g: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} ({NAMES[_layer(m)]}) imports {d} ({NAMES[_layer(d)]})"
        for m, deps in g.items()
        if m != "lafs_fast"
        for d in deps
        if d != "lafs_fast" and _layer(d) > _layer(m)
    )


def import_cycles(g: dict[str, set[str]], root: Path = ROOT) -> list[list[str]]:
    """Groups of modules that import each other in a circle (Tarjan's strongly connected components).
    A child importing its own package's ``__init__`` (which imports its children) is not a cycle: Python
    runs the package first anyway."""
    packages = {m for m, p in _modules(root).items() if p.name == "__init__.py"}
    graph_ = {
        m: {d for d in deps if d != "lafs_fast" and not (d in packages and m.startswith(d + "."))}
        for m, deps in g.items()
        if m != "lafs_fast"
    }
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph_.get(v, ()):
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

    for v in graph_:
        if v not in index:
            visit(v)
    return cycles


def test_every_module_has_a_layer():
    assert [m for m in graph() if _layer(m) is None and m != "lafs_fast"] == []


def test_no_import_from_a_higher_layer():
    assert higher_layer_imports(graph()) == []


def test_no_import_cycle():
    assert import_cycles(graph()) == []


# --------------------------------------------------------------------------------------------------
# planted faults: the checker must catch each one in a synthetic tree


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A synthetic tree: a root package with a lazy table (as lafs_fast's), a models package whose
    ``__init__`` re-exports its children, the base and train modules named, then ``files``."""
    base = {
        "lafs_fast/__init__.py": """
            from lafs_fast.sampling import sample_patches
            _LAZY = {"PartFViT": "lafs_fast.models", "Engine": "lafs_fast.train.engine"}
            """,
        "lafs_fast/sampling.py": "def sample_patches(): ...\n",
        "lafs_fast/io.py": "import os\n",
        "lafs_fast/config.py": "import dataclasses\n",
        "lafs_fast/models/__init__.py": """
            from lafs_fast.models.heads import Head
            from lafs_fast.models.part_fvit import PartFViT

            def helper(): ...
            """,
        "lafs_fast/models/heads.py": "class Head: ...\n",
        "lafs_fast/models/part_fvit.py": "class PartFViT: ...\n",
        "lafs_fast/train/__init__.py": "",
        "lafs_fast/train/engine.py": "class Engine: ...\n",
        "kernels/__init__.py": "",
    }
    for rel, text in {**base, **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return tmp_path


def test_the_checker_passes_a_clean_synthetic_tree(tmp_path):
    root = _tree(tmp_path, {})
    g = graph(root)
    assert higher_layer_imports(g) == [] and import_cycles(g, root) == []


def test_planted_importlib_string_import_in_a_low_layer_is_caught(tmp_path):
    root = _tree(
        tmp_path,
        {
            "lafs_fast/config.py": """
                import importlib

                def engine():
                    return importlib.import_module("lafs_fast.train.engine")
                """,
            "lafs_fast/io.py": """
                COMMANDS = {"train": "lafs_fast.train.engine:Engine"}  # a command table's module:object
                """,
        },
    )
    wrong = higher_layer_imports(graph(root))
    assert "lafs_fast.config (base/kernels) imports lafs_fast.train.engine (train)" in wrong, wrong
    assert "lafs_fast.io (base/kernels) imports lafs_fast.train.engine (train)" in wrong, wrong


def test_planted_from_lafs_fast_import_name_in_a_low_layer_is_caught(tmp_path):
    root = _tree(
        tmp_path,
        {
            "lafs_fast/config.py": "from lafs_fast import PartFViT  # lazy: lafs_fast.models\n",
            "lafs_fast/io.py": "from lafs_fast import Engine, sample_patches\n",
        },
    )
    wrong = higher_layer_imports(graph(root))
    assert wrong == [
        "lafs_fast.config (base/kernels) imports lafs_fast.models (models)",
        "lafs_fast.io (base/kernels) imports lafs_fast.sampling (ops)",
        "lafs_fast.io (base/kernels) imports lafs_fast.train.engine (train)",
    ], wrong


def test_planted_package_reexport_is_exempt_but_a_real_cycle_is_caught(tmp_path):
    """The exemption (a child importing its own package's __init__) holds for every package, not only
    kernels (the old check built the __init__'s path without the lafs_fast/ folder); it hides no real
    cycle between two modules."""
    root = _tree(tmp_path, {"lafs_fast/models/heads.py": "from lafs_fast.models import helper\nclass Head: ...\n"})
    assert import_cycles(graph(root), root) == []
    root = _tree(
        tmp_path,
        {
            "lafs_fast/models/heads.py": "from lafs_fast.models.part_fvit import PartFViT\nclass Head: ...\n",
            "lafs_fast/models/part_fvit.py": "from lafs_fast.models import Head  # -> heads\nclass PartFViT: ...\n",
        },
    )
    assert import_cycles(graph(root), root) == [["lafs_fast.models.heads", "lafs_fast.models.part_fvit"]]
