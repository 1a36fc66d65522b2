"""Code written twice (issue 23): the package's repeated blocks of 6 lines may not grow in number.

A block is 6 consecutive lines of code of one file after white space is folded, with blank lines,
comments, docstrings, import lines and lone punctuation passed over (as a reader skims). A block
repeated elsewhere in ``lafs_fast/`` or ``kernels/`` counts once however often it stands. The
ceiling is the count after issue 23's clean-up: a change that writes code again fails here, naming
where, and either calls the first copy or (a repetition that is right) raises the ceiling with a
reason.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 6
# after issue 23: none in lafs_fast/; 13 in kernels/, the Triton kernels' inlined corner / bilinear / Philox
# code (each @triton.jit body spells out what the other's does) and the three samplers' keyword lists
CEILING = 13
_PUNCT = re.compile(r"^[\s()\[\]{},:.]*$")


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, folded text) of the lines that count."""
    text = path.read_text()
    skip: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.update(range(first.lineno, first.end_lineno + 1))
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        folded = " ".join(line.split())
        if no in skip or not folded or folded.startswith("#") or _PUNCT.match(folded):
            continue
        out.append((no, folded))
    return out


def repeated_blocks(folders: tuple[str, ...] = ("lafs_fast", "kernels")) -> dict[str, list[str]]:
    """{block digest: ["file:line", ...]} for every run of repeated lines at least a block long that
    stands in two places or more (a longer run counts once: a block continuing the previous block's
    places line for line is not counted again; places of one file that overlap are one place)."""
    places: dict[str, list[tuple[Path, int, int]]] = defaultdict(list)
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = _lines(path)
            for i in range(len(lines) - BLOCK + 1):
                key = hashlib.sha1("\n".join(t for _, t in lines[i : i + BLOCK]).encode()).hexdigest()
                here = places[key]
                if not (here and here[-1][0] == path and i - here[-1][2] < BLOCK):
                    here.append((path, lines[i][0], i))
    repeated = {k: v for k, v in places.items() if len(v) > 1}
    starts = {tuple((p, i) for p, _, i in v) for v in repeated.values()}
    return {
        k: [f"{p.relative_to(ROOT)}:{no}" for p, no, _ in v]
        for k, v in repeated.items()
        if tuple((p, i - 1) for p, _, i in v) not in starts
    }


def test_repeated_blocks_do_not_grow():
    found = repeated_blocks()
    shown = "\n".join(" ~ ".join(v) for v in sorted(found.values()))
    assert len(found) <= CEILING, f"{len(found)} repeated {BLOCK}-line blocks (ceiling {CEILING}):\n{shown}"


def test_the_count_sees_a_planted_copy(tmp_path, monkeypatch):
    """The check is not blind: a function copied into another module adds blocks."""
    src = ROOT / "lafs_fast" / "config.py"
    (tmp_path / "lafs_fast").mkdir()
    (tmp_path / "lafs_fast" / "a.py").write_text(src.read_text())
    (tmp_path / "lafs_fast" / "b.py").write_text(src.read_text())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = repeated_blocks(("lafs_fast",))
    assert len(found) >= 1 and any("lafs_fast/a.py" in p and "lafs_fast/b.py" in q for p, q in found.values()), found
